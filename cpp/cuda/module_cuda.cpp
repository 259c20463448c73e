// semisam_o1._core_cuda: the CUDA versions of prototype_similarity and knn_vote, same
// signatures as semisam_o1._core. Inputs are any objects exposing
// __cuda_array_interface__ (CuPy arrays, torch CUDA tensors, Numba arrays); outputs are
// DeviceBuffer objects (cudaMalloc memory, freed when the last reference goes) that
// expose __cuda_array_interface__ themselves, so torch.as_tensor / cupy.asarray wrap
// them without a copy (semisam_o1.kernels does that). Work is queued on the given
// stream and that stream is synchronised before returning.
//
// _emulate_prototype_similarity / _emulate_knn_vote run the kernels' per-thread code
// (cuda/kernels.cuh) on the CPU for NumPy arrays: the tests use them on machines
// without a GPU to check the kernel logic against NumPy.
#include <cuda_runtime_api.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <memory>
#include <string>
#include <vector>

#include "cuda/kernels.cuh"
#include "cuda/launch.hpp"
#include "label_weights.hpp"

namespace py = pybind11;

namespace {

[[noreturn]] void fail(const std::string& msg) { throw py::value_error(msg); }

void check_cuda(cudaError_t err, const char* what) {
    if (err != cudaSuccess)
        throw std::runtime_error(std::string("CUDA error in ") + what + ": " +
                                 cudaGetErrorString(err));
}

// Device memory owned by Python; exposes __cuda_array_interface__ (version 3).
struct DeviceBuffer {
    void* ptr = nullptr;
    std::vector<int64_t> shape;
    std::string typestr;
    int device = 0;
    DeviceBuffer(std::vector<int64_t> shp, std::string ts, size_t itemsize, int dev)
        : shape(std::move(shp)), typestr(std::move(ts)), device(dev) {
        size_t n = itemsize;
        for (int64_t s : shape) n *= static_cast<size_t>(s);
        if (n > 0) check_cuda(cudaMalloc(&ptr, n), "cudaMalloc");
    }
    ~DeviceBuffer() {
        if (ptr) {
            int cur = 0;
            cudaGetDevice(&cur);
            cudaSetDevice(device);
            cudaFree(ptr);
            cudaSetDevice(cur);
        }
    }
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;
    size_t itemsize() const { return static_cast<size_t>(typestr.back() - '0'); }
    size_t nbytes() const {
        size_t n = itemsize();
        for (int64_t s : shape) n *= static_cast<size_t>(s);
        return n;
    }
    py::dict cai() const {
        py::dict d;
        py::tuple shp(shape.size());
        for (size_t i = 0; i < shape.size(); ++i) shp[i] = py::int_(shape[i]);
        d["shape"] = shp;
        d["typestr"] = typestr;
        d["data"] = py::make_tuple(py::int_(reinterpret_cast<uintptr_t>(ptr)), false);
        d["version"] = 3;
        d["strides"] = py::none();
        return d;
    }
    py::array to_host() const {
        std::vector<py::ssize_t> shp(shape.begin(), shape.end());
        py::array out(py::dtype(typestr), shp);
        if (nbytes() > 0)
            check_cuda(cudaMemcpy(out.mutable_data(), ptr, nbytes(), cudaMemcpyDeviceToHost),
                       "cudaMemcpy");
        return out;
    }
};

// A parsed __cuda_array_interface__.
struct DevArr {
    const void* ptr = nullptr;
    std::vector<int64_t> shape;
    std::string typestr;
    int device = -1;
};

DevArr parse_cai(py::handle obj, const char* name) {
    if (!py::hasattr(obj, "__cuda_array_interface__"))
        fail(std::string(name) +
             ": not a device array (no __cuda_array_interface__); host arrays go to "
             "semisam_o1._core");
    py::dict d = obj.attr("__cuda_array_interface__");
    DevArr a;
    for (auto s : d["shape"].cast<py::tuple>()) a.shape.push_back(s.cast<int64_t>());
    a.typestr = d["typestr"].cast<std::string>();
    a.ptr = reinterpret_cast<const void*>(d["data"].cast<py::tuple>()[0].cast<uintptr_t>());
    if (d.contains("mask") && !d["mask"].is_none())
        fail(std::string(name) + ": masked device arrays are not supported");
    if (d.contains("strides") && !d["strides"].is_none()) {
        auto st = d["strides"].cast<py::tuple>();
        int64_t expect = a.typestr.size() >= 3 ? (a.typestr.back() - '0') : 1;
        for (int64_t i = static_cast<int64_t>(a.shape.size()) - 1; i >= 0; --i) {
            if (a.shape[i] > 1 && st[i].cast<int64_t>() != expect)
                fail(std::string(name) + ": device array must be C-contiguous");
            expect *= a.shape[i];
        }
    }
    return a;
}

int float_code(const DevArr& a, const char* name) {
    if (a.typestr == "<f4") return semisam_cuda::kF32;
    if (a.typestr == "<f2") return semisam_cuda::kF16;
    fail(std::string(name) + ": dtype must be float16 or float32, got typestr " + a.typestr);
}

// Device of a pointer (and a check that it is device or managed memory).
int pointer_device(const DevArr& a, const char* name) {
    if (a.ptr == nullptr) return -1;  // empty array
    cudaPointerAttributes attr{};
    cudaError_t err = cudaPointerGetAttributes(&attr, a.ptr);
    if (err != cudaSuccess) {
        cudaGetLastError();
        fail(std::string(name) + ": cannot query the device pointer (" + cudaGetErrorString(err) +
             ")");
    }
    if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
        fail(std::string(name) + ": memory is not on a CUDA device");
    return attr.device;
}

int common_device(std::initializer_list<std::pair<const DevArr*, const char*>> arrs) {
    int dev = -1;
    for (auto& [a, name] : arrs) {
        int d = pointer_device(*a, name);
        if (d < 0) continue;
        if (dev >= 0 && d != dev)
            fail(std::string(name) + ": on device " + std::to_string(d) + ", other inputs on " +
                 std::to_string(dev));
        dev = d;
    }
    if (dev < 0) check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
    return dev;
}

struct TempDev {
    void* p = nullptr;
    explicit TempDev(size_t n) {
        if (n) check_cuda(cudaMalloc(&p, n), "cudaMalloc");
    }
    ~TempDev() {
        if (p) cudaFree(p);
    }
};

py::tuple prototype_similarity(py::object features, py::object prototypes, py::object threads,
                               uintptr_t stream) {
    (void)threads;  // accepted for signature compatibility with _core; unused on GPU
    DevArr f = parse_cai(features, "features");
    DevArr p = parse_cai(prototypes, "prototypes");
    if (f.shape.size() != 2) fail("features: expected a 2-D array");
    if (p.shape.size() != 2) fail("prototypes: expected a 2-D array");
    const int fdt = float_code(f, "features"), pdt = float_code(p, "prototypes");
    const int64_t N = f.shape[0], C = f.shape[1], K = p.shape[0];
    if (C < 1) fail("features: need at least one channel (shape (N, C) with C >= 1)");
    if (p.shape[1] != C) fail("prototypes: channel count does not match features'");
    if (K < 1) fail("prototypes: need at least one prototype (shape (K, C) with K >= 1)");
    const int dev = common_device({{&f, "features"}, {&p, "prototypes"}});
    check_cuda(cudaSetDevice(dev), "cudaSetDevice");
    auto scores = std::make_shared<DeviceBuffer>(std::vector<int64_t>{N, K}, "<f4", 4, dev);
    auto labels = std::make_shared<DeviceBuffer>(std::vector<int64_t>{N}, "<i4", 4, dev);
    {
        py::gil_scoped_release release;
        TempDev pn(static_cast<size_t>(K * C) * sizeof(float));
        auto s = reinterpret_cast<cudaStream_t>(stream);
        check_cuda(semisam_cuda::launch_prototype(f.ptr, fdt, N, C, p.ptr, pdt, K,
                                                  static_cast<float*>(pn.p),
                                                  static_cast<float*>(scores->ptr),
                                                  static_cast<int32_t*>(labels->ptr), s),
                   "prototype kernel launch");
        check_cuda(cudaStreamSynchronize(s), "prototype kernels");
    }
    return py::make_tuple(scores, labels);
}

// Per-label vote weights from a host array-like (None: unweighted). Every bank label
// must have a weight; labels_host holds the N bank labels on the host.
std::vector<float> host_label_weights(py::object label_weights, const int32_t* labels_host,
                                      int64_t N) {
    std::vector<float> out;
    if (label_weights.is_none()) return out;
    auto w = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(label_weights);
    if (!w || w.ndim() != 1)
        fail("label_weights: expected a 1-D float array with one weight per label");
    out.assign(w.data(), w.data() + w.shape(0));
    const std::string err =
        semisam::label_weights_error(out.data(), static_cast<int64_t>(out.size()), labels_host, N);
    if (!err.empty()) fail(err);
    return out;
}

py::tuple knn_vote(py::object queries, py::object bank, py::object bank_labels, int64_t k,
                   py::object threads, bool return_topk, uintptr_t stream,
                   py::object label_weights) {
    (void)threads;
    DevArr q = parse_cai(queries, "queries");
    DevArr b = parse_cai(bank, "bank");
    DevArr l = parse_cai(bank_labels, "bank_labels");
    if (q.shape.size() != 2) fail("queries: expected a 2-D array");
    if (b.shape.size() != 2) fail("bank: expected a 2-D array");
    const int qdt = float_code(q, "queries"), bdt = float_code(b, "bank");
    const int64_t Q = q.shape[0], C = q.shape[1], N = b.shape[0];
    if (C < 1) fail("queries: need at least one channel (shape (Q, C) with C >= 1)");
    if (b.shape[1] != C) fail("bank: channel count does not match queries'");
    if (l.shape.size() != 1 || l.shape[0] != N)
        fail("bank_labels: expected shape (" + std::to_string(N) + ",) to match bank");
    if (l.typestr != "<i4") fail("bank_labels: dtype must be int32, got typestr " + l.typestr);
    if (k < 1) fail("k: must be >= 1, got " + std::to_string(k));
    if (k > N)
        fail("k: must be <= the bank size N=" + std::to_string(N) + ", got " + std::to_string(k));
    const int dev = common_device({{&q, "queries"}, {&b, "bank"}, {&l, "bank_labels"}});
    check_cuda(cudaSetDevice(dev), "cudaSetDevice");
    std::vector<float> lw;
    if (!label_weights.is_none()) {  // validate the labels against the weights on the host
        std::vector<int32_t> lh(static_cast<size_t>(N));
        check_cuda(cudaMemcpy(lh.data(), l.ptr, static_cast<size_t>(N) * sizeof(int32_t),
                              cudaMemcpyDeviceToHost),
                   "bank_labels copy");
        lw = host_label_weights(label_weights, lh.data(), N);
    }
    auto lab = std::make_shared<DeviceBuffer>(std::vector<int64_t>{Q}, "<i4", 4, dev);
    auto share = std::make_shared<DeviceBuffer>(std::vector<int64_t>{Q}, "<f4", 4, dev);
    auto ti = std::make_shared<DeviceBuffer>(std::vector<int64_t>{Q, k}, "<i8", 8, dev);
    auto ts = std::make_shared<DeviceBuffer>(std::vector<int64_t>{Q, k}, "<f4", 4, dev);
    {
        py::gil_scoped_release release;
        TempDev qT(static_cast<size_t>(Q * C) * sizeof(float));
        TempDev binv(static_cast<size_t>(N) * sizeof(float));
        TempDev wdev(lw.size() * sizeof(float));
        if (!lw.empty())
            check_cuda(cudaMemcpy(wdev.p, lw.data(), lw.size() * sizeof(float),
                                  cudaMemcpyHostToDevice),
                       "label_weights copy");
        auto s = reinterpret_cast<cudaStream_t>(stream);
        check_cuda(semisam_cuda::launch_knn(
                       q.ptr, qdt, Q, b.ptr, bdt, N, C, static_cast<const int32_t*>(l.ptr),
                       lw.empty() ? nullptr : static_cast<const float*>(wdev.p),
                       static_cast<int32_t>(lw.size()), k,
                       static_cast<float*>(qT.p), static_cast<float*>(binv.p),
                       static_cast<int64_t*>(ti->ptr), static_cast<float*>(ts->ptr),
                       static_cast<int32_t*>(lab->ptr), static_cast<float*>(share->ptr), s),
                   "knn kernel launch");
        check_cuda(cudaStreamSynchronize(s), "knn kernels");
    }
    if (return_topk) return py::make_tuple(lab, share, ti, ts);
    return py::make_tuple(lab, share);
}

// ---- host emulation of the kernels' per-thread code ------------------------------------

int host_float_code(const py::array& a, const char* name) {
    if (a.ndim() != 2) fail(std::string(name) + ": expected a 2-D array");
    if (!(a.flags() & py::array::c_style)) fail(std::string(name) + ": must be C-contiguous");
    if (a.dtype().kind() == 'f' && a.dtype().itemsize() == 4) return semisam_cuda::kF32;
    if (a.dtype().kind() == 'f' && a.dtype().itemsize() == 2) return semisam_cuda::kF16;
    fail(std::string(name) + ": dtype must be float16 or float32");
}

py::tuple emulate_prototype(py::array features, py::array prototypes) {
    const int fdt = host_float_code(features, "features");
    const int pdt = host_float_code(prototypes, "prototypes");
    const int64_t N = features.shape(0), C = features.shape(1), K = prototypes.shape(0);
    if (prototypes.shape(1) != C || K < 1 || C < 1) fail("prototypes: bad shape");
    std::vector<float> pn(static_cast<size_t>(K * C));
    for (int64_t r = 0; r < K; ++r)
        semisam_cuda::normalise_row(prototypes.data(), pdt, r, C, pn.data(), 1, C);
    py::array_t<float> scores({N, K});
    py::array_t<int32_t> labels({N});
    for (int64_t r = 0; r < N; ++r)
        semisam_cuda::proto_row(features.data(), fdt, r, C, pn.data(), K, scores.mutable_data(),
                                labels.mutable_data());
    return py::make_tuple(scores, labels);
}

py::tuple emulate_knn(py::array queries, py::array bank, py::array_t<int32_t> bank_labels,
                      int64_t k, py::object label_weights) {
    const int qdt = host_float_code(queries, "queries");
    const int bdt = host_float_code(bank, "bank");
    const int64_t Q = queries.shape(0), C = queries.shape(1), N = bank.shape(0);
    if (bank.shape(1) != C || bank_labels.ndim() != 1 || bank_labels.shape(0) != N)
        fail("bank: bad shape");
    if (k < 1 || k > N) fail("k: must be in [1, N]");
    const std::vector<float> w = host_label_weights(label_weights, bank_labels.data(), N);
    semisam_cuda::LabelWeights lw;
    lw.w = w.empty() ? nullptr : w.data();
    lw.n = static_cast<int32_t>(w.size());
    std::vector<float> qT(static_cast<size_t>(Q * C)), binv(static_cast<size_t>(N));
    for (int64_t r = 0; r < Q; ++r)
        semisam_cuda::normalise_row(queries.data(), qdt, r, C, qT.data(), Q, 1);
    for (int64_t r = 0; r < N; ++r) binv[r] = semisam_cuda::inv_norm_row(bank.data(), bdt, r, C);
    py::array_t<int32_t> lab({Q});
    py::array_t<float> share({Q});
    py::array_t<int64_t> ti({Q, k});
    py::array_t<float> ts({Q, k});
    for (int64_t q = 0; q < Q; ++q)
        semisam_cuda::knn_query(qT.data(), Q, q, bank.data(), bdt, binv.data(), N, C,
                                bank_labels.data(), lw, k, ti.mutable_data(), ts.mutable_data(),
                                lab.mutable_data(), share.mutable_data());
    return py::make_tuple(lab, share, ti, ts);
}

int device_count() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return n;
}

}  // namespace

PYBIND11_MODULE(_core_cuda, m) {
    m.doc() = "semisam_o1 CUDA kernels: prototype similarity and kNN vote on device arrays.";
    py::class_<DeviceBuffer, std::shared_ptr<DeviceBuffer>>(m, "DeviceBuffer")
        .def_property_readonly("__cuda_array_interface__", &DeviceBuffer::cai)
        .def_property_readonly("shape", [](const DeviceBuffer& b) {
            py::tuple t(b.shape.size());
            for (size_t i = 0; i < b.shape.size(); ++i) t[i] = py::int_(b.shape[i]);
            return t;
        })
        .def_readonly("device", &DeviceBuffer::device)
        .def("copy_to_host", &DeviceBuffer::to_host, "Copy into a new NumPy array.");
    m.def("prototype_similarity", &prototype_similarity, py::arg("features"),
          py::arg("prototypes"), py::arg("threads") = py::none(), py::arg("stream") = 0,
          "Device version of semisam_o1._core.prototype_similarity.");
    m.def("knn_vote", &knn_vote, py::arg("queries"), py::arg("bank"), py::arg("bank_labels"),
          py::arg("k"), py::arg("threads") = py::none(), py::arg("return_topk") = false,
          py::arg("stream") = 0, py::arg("label_weights") = py::none(),
          "Device version of semisam_o1._core.knn_vote (label_weights: host (L,) float32).");
    m.def("device_count", &device_count, "Number of usable CUDA devices (0 without a driver).");
    m.def("_emulate_prototype_similarity", &emulate_prototype, py::arg("features"),
          py::arg("prototypes"));
    m.def("_emulate_knn_vote", &emulate_knn, py::arg("queries"), py::arg("bank"),
          py::arg("bank_labels"), py::arg("k"), py::arg("label_weights") = py::none());
}
