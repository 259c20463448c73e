// pybind11 bindings of semisam_o1._core: argument checks at the boundary (ValueError
// naming the argument), GIL released while the kernels run.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

#include "kernels.hpp"
#include "label_weights.hpp"

namespace py = pybind11;
using semisam::DType;

namespace {

[[noreturn]] void fail(const std::string& msg) { throw py::value_error(msg); }

std::string dtype_name(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

DType float_dtype(const py::array& a, const char* name) {
    const py::dtype dt = a.dtype();
    if (dt.kind() == 'f' && dt.attr("isnative").cast<bool>()) {
        if (dt.itemsize() == 4) return DType::F32;
        if (dt.itemsize() == 2) return DType::F16;
    }
    fail(std::string(name) + ": dtype must be float16 or float32 (native byte order), got " +
         dtype_name(a));
}

void check_2d_contiguous(const py::array& a, const char* name) {
    if (a.ndim() != 2)
        fail(std::string(name) + ": expected a 2-D array, got " + std::to_string(a.ndim()) +
             "-D");
    if (!(a.flags() & py::array::c_style))
        fail(std::string(name) +
             ": array must be C-contiguous (use numpy.ascontiguousarray, or the "
             "semisam_o1.kernels wrapper which copies)");
}

py::tuple prototype_similarity(py::array features, py::array prototypes, int threads) {
    check_2d_contiguous(features, "features");
    check_2d_contiguous(prototypes, "prototypes");
    const DType fdt = float_dtype(features, "features");
    const DType pdt = float_dtype(prototypes, "prototypes");
    const int64_t N = features.shape(0), C = features.shape(1);
    const int64_t K = prototypes.shape(0);
    if (C < 1) fail("features: need at least one channel (shape (N, C) with C >= 1)");
    if (prototypes.shape(1) != C)
        fail("prototypes: channel count " + std::to_string(prototypes.shape(1)) +
             " does not match features' " + std::to_string(C));
    if (K < 1) fail("prototypes: need at least one prototype (shape (K, C) with K >= 1)");
    if (threads < 0) fail("threads: must be >= 1 (or 0 for all cores)");
    py::array_t<float> scores({N, K});
    py::array_t<int32_t> labels({N});
    const void* f = features.data();
    const void* p = prototypes.data();
    float* s = scores.mutable_data();
    int32_t* l = labels.mutable_data();
    {
        py::gil_scoped_release release;
        semisam::prototype_similarity_cpu(f, fdt, N, C, p, pdt, K, s, l, threads);
    }
    return py::make_tuple(scores, labels);
}

py::tuple knn_vote(py::array queries, py::array bank, py::array bank_labels, int64_t k,
                   int threads, bool return_topk, py::object label_weights) {
    check_2d_contiguous(queries, "queries");
    check_2d_contiguous(bank, "bank");
    const DType qdt = float_dtype(queries, "queries");
    const DType bdt = float_dtype(bank, "bank");
    const int64_t Q = queries.shape(0), C = queries.shape(1), N = bank.shape(0);
    if (C < 1) fail("queries: need at least one channel (shape (Q, C) with C >= 1)");
    if (bank.shape(1) != C)
        fail("bank: channel count " + std::to_string(bank.shape(1)) +
             " does not match queries' " + std::to_string(C));
    if (bank_labels.ndim() != 1 || bank_labels.shape(0) != N)
        fail("bank_labels: expected shape (" + std::to_string(N) + ",) to match bank");
    {
        const py::dtype dt = bank_labels.dtype();
        if (!(dt.kind() == 'i' && dt.itemsize() == 4 && dt.attr("isnative").cast<bool>()))
            fail("bank_labels: dtype must be int32, got " + dtype_name(bank_labels));
    }
    if (!(bank_labels.flags() & py::array::c_style))
        fail("bank_labels: array must be C-contiguous");
    if (k < 1) fail("k: must be >= 1, got " + std::to_string(k));
    if (k > N)
        fail("k: must be <= the bank size N=" + std::to_string(N) + ", got " + std::to_string(k));
    if (threads < 0) fail("threads: must be >= 1 (or 0 for all cores)");
    const int32_t* bl = static_cast<const int32_t*>(bank_labels.data());
    semisam::LabelWeights lw;
    py::array_t<float, py::array::c_style | py::array::forcecast> w;
    if (!label_weights.is_none()) {
        w = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(label_weights);
        if (!w || w.ndim() != 1)
            fail("label_weights: expected a 1-D float array with one weight per label");
        const float* wp = w.data();
        const int64_t n = w.shape(0);
        const std::string err = semisam::label_weights_error(wp, n, bl, N);
        if (!err.empty()) fail(err);
        lw.w = wp;
        lw.n = static_cast<int32_t>(n);
    }

    py::array_t<int32_t> labels({Q});
    py::array_t<float> share({Q});
    py::array_t<int64_t> tidx;
    py::array_t<float> tsim;
    int64_t* ti = nullptr;
    float* ts = nullptr;
    if (return_topk) {
        tidx = py::array_t<int64_t>({Q, k});
        tsim = py::array_t<float>({Q, k});
        ti = tidx.mutable_data();
        ts = tsim.mutable_data();
    }
    const void* q = queries.data();
    const void* b = bank.data();
    int32_t* lo = labels.mutable_data();
    float* so = share.mutable_data();
    {
        py::gil_scoped_release release;
        semisam::knn_vote_cpu(q, qdt, Q, b, bdt, N, C, bl, lw, k, lo, so, ti, ts, threads);
    }
    if (return_topk) return py::make_tuple(labels, share, tidx, tsim);
    return py::make_tuple(labels, share);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
    m.doc() =
        "semisam_o1 C++ core (CPU): prototype similarity and fused kNN vote. Use the "
        "semisam_o1.kernels wrappers; these functions require C-contiguous float16/float32 "
        "arrays and int32 labels.";
    m.def("prototype_similarity", &prototype_similarity, py::arg("features"),
          py::arg("prototypes"), py::arg("threads") = 0,
          "prototype_similarity(features (N,C) f16/f32, prototypes (K,C) f16/f32, threads=0) "
          "-> (scores (N,K) float32 cosine, labels (N,) int32 argmax, lowest index on ties)");
    m.def("knn_vote", &knn_vote, py::arg("queries"), py::arg("bank"), py::arg("bank_labels"),
          py::arg("k"), py::arg("threads") = 0, py::arg("return_topk") = false,
          py::arg("label_weights") = py::none(),
          "knn_vote(queries (Q,C), bank (N,C), bank_labels (N,) int32, k, threads=0, "
          "return_topk=False, label_weights=None (L,) float32) -> (labels (Q,) int32, share "
          "(Q,) float32[, topk_index (Q,k) int64, topk_sim (Q,k) float32])");
    m.def("has_avx2", &semisam::cpu_has_avx2_fma_f16c,
          "True when the active path is AVX2 or AVX-512 (see isa())");
    m.def("_force_generic", &semisam::force_generic_kernels, py::arg("on"),
          "Testing aid: _force_generic(True) is set_isa('scalar'), (False) set_isa('auto').");
    m.def(
        "isa", []() { return std::string(semisam::isa_name(semisam::active_isa())); },
        "The instruction-set path the CPU kernels use now: 'avx512', 'avx2' or 'scalar' "
        "(set_isa() override, else the SEMISAM_ISA environment variable read at every call, "
        "else the best path this CPU supports).");
    m.def(
        "supported_isas",
        []() {
            py::list out;
            for (auto i : {semisam::Isa::Scalar, semisam::Isa::AVX2, semisam::Isa::AVX512})
                if (semisam::cpu_supports(i)) out.append(semisam::isa_name(i));
            return out;
        },
        "The paths this CPU can run, e.g. ['scalar', 'avx2', 'avx512'].");
    m.def(
        "set_isa",
        [](const std::string& name) {
            if (name == "auto") return semisam::set_isa_override(false);
            semisam::Isa i;
            if (!semisam::parse_isa(name.c_str(), &i))
                fail("isa: expected 'auto', 'scalar', 'avx2' or 'avx512', got '" + name + "'");
            if (!semisam::cpu_supports(i))
                fail("isa: this CPU cannot run the " + name + " kernels (supported: see "
                     "supported_isas())");
            semisam::set_isa_override(true, i);
        },
        py::arg("name"),
        "Force the CPU kernels' path for this process: 'scalar', 'avx2', 'avx512' (ValueError "
        "if the CPU lacks it), or 'auto' (clear: SEMISAM_ISA, else the best supported).");
    m.attr("__version__") = "0.1.0";
}
