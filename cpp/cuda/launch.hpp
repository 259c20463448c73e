// Host-side launchers of the CUDA kernels (defined in kernels.cu). All pointers are device
// pointers; dtype codes: 0 float32, 1 float16. Temporaries are allocated by the caller:
// pn_tmp (K*C floats), qT_tmp (Q*C floats), binv_tmp (N floats). label_w: device array of
// n_label_w per-label vote weights, or null (unweighted).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace semisam_cuda {

cudaError_t launch_prototype(const void* feat, int fdt, int64_t N, int64_t C, const void* proto,
                             int pdt, int64_t K, float* pn_tmp, float* scores, int32_t* labels,
                             cudaStream_t stream);

cudaError_t launch_knn(const void* queries, int qdt, int64_t Q, const void* bank, int bdt,
                       int64_t N, int64_t C, const int32_t* bank_labels, const float* label_w,
                       int32_t n_label_w, int64_t k, float* qT_tmp, float* binv_tmp, int64_t* ti,
                       float* ts, int32_t* out_label, float* out_share, cudaStream_t stream);

}  // namespace semisam_cuda
