// CUDA kernels of semisam_o1._core_cuda: thin __global__ wrappers around the per-thread
// functions of kernels.cuh, and their launchers (called by module_cuda.cpp).
#include <cuda_runtime.h>

#include "cuda/kernels.cuh"
#include "cuda/launch.hpp"

namespace semisam_cuda {

namespace {

constexpr int kThreads = 128;

inline unsigned blocks_for(int64_t n) {
    return static_cast<unsigned>((n + kThreads - 1) / kThreads);
}

__global__ void k_normalise_rows(const void* src, int dt, int64_t R, int64_t C, float* dst,
                                 int64_t cstride, int64_t rstride) {
    const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (r < R) normalise_row(src, dt, r, C, dst, cstride, rstride);
}

__global__ void k_inv_norms(const void* src, int dt, int64_t R, int64_t C, float* inv) {
    const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (r < R) inv[r] = inv_norm_row(src, dt, r, C);
}

__global__ void k_proto(const void* feat, int fdt, int64_t N, int64_t C, const float* Pn,
                        int64_t K, float* scores, int32_t* labels) {
    const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (r < N) proto_row(feat, fdt, r, C, Pn, K, scores, labels);
}

__global__ void k_knn(const float* qT, int64_t Q, const void* bank, int bdt, const float* binv,
                      int64_t N, int64_t C, const int32_t* bank_labels, LabelWeights lw, int64_t k,
                      int64_t* ti, float* ts, int32_t* out_label, float* out_share) {
    const int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (q < Q)
        knn_query(qT, Q, q, bank, bdt, binv, N, C, bank_labels, lw, k, ti, ts, out_label, out_share);
}

}  // namespace

cudaError_t launch_prototype(const void* feat, int fdt, int64_t N, int64_t C, const void* proto,
                             int pdt, int64_t K, float* pn_tmp, float* scores, int32_t* labels,
                             cudaStream_t stream) {
    if (K > 0)
        k_normalise_rows<<<blocks_for(K), kThreads, 0, stream>>>(proto, pdt, K, C, pn_tmp, 1, C);
    if (N > 0)
        k_proto<<<blocks_for(N), kThreads, 0, stream>>>(feat, fdt, N, C, pn_tmp, K, scores, labels);
    return cudaGetLastError();
}

cudaError_t launch_knn(const void* queries, int qdt, int64_t Q, const void* bank, int bdt,
                       int64_t N, int64_t C, const int32_t* bank_labels, const float* label_w,
                       int32_t n_label_w, int64_t k, float* qT_tmp, float* binv_tmp, int64_t* ti,
                       float* ts, int32_t* out_label, float* out_share, cudaStream_t stream) {
    if (Q <= 0) return cudaSuccess;
    k_normalise_rows<<<blocks_for(Q), kThreads, 0, stream>>>(queries, qdt, Q, C, qT_tmp, Q, 1);
    k_inv_norms<<<blocks_for(N), kThreads, 0, stream>>>(bank, bdt, N, C, binv_tmp);
    LabelWeights lw;
    lw.w = label_w;
    lw.n = n_label_w;
    k_knn<<<blocks_for(Q), kThreads, 0, stream>>>(qT_tmp, Q, bank, bdt, binv_tmp, N, C,
                                                  bank_labels, lw, k, ti, ts, out_label, out_share);
    return cudaGetLastError();
}

}  // namespace semisam_cuda
