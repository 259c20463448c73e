// Shared helpers for the semisam_o1 C++ core: thread pool loop, float16 decoding,
// robust row norms, CPU feature dispatch.
#pragma once

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "half.hpp"

namespace semisam {

// Number of worker threads to use: `requested` <= 0 means all hardware threads.
inline int resolve_threads(int requested) {
    if (requested > 0) return requested;
    unsigned hw = std::thread::hardware_concurrency();
    return hw == 0 ? 1 : static_cast<int>(hw);
}

// Runs fn(item, worker) for item in [0, n_items), items handed out dynamically
// (an atomic counter) to `threads` workers. The calling thread is worker 0. The
// first exception thrown by any worker is rethrown here after all have joined.
template <class F>
void parallel_items(int64_t n_items, int threads, F&& fn) {
    if (n_items <= 0) return;
    int nt = static_cast<int>(std::min<int64_t>(std::max(threads, 1), n_items));
    std::atomic<int64_t> next{0};
    std::exception_ptr error;
    std::mutex error_mutex;
    auto work = [&](int worker) {
        try {
            for (;;) {
                int64_t item = next.fetch_add(1, std::memory_order_relaxed);
                if (item >= n_items) break;
                fn(item, worker);
            }
        } catch (...) {
            std::lock_guard<std::mutex> lock(error_mutex);
            if (!error) error = std::current_exception();
            next.store(n_items);  // stop the others early
        }
    };
    std::vector<std::thread> pool;
    pool.reserve(nt - 1);
    for (int t = 1; t < nt; ++t) pool.emplace_back(work, t);
    work(0);
    for (auto& th : pool) th.join();
    if (error) std::rethrow_exception(error);
}

// IEEE 754 binary16 -> binary32 (exact; handles subnormals, inf and NaN).
inline float half_to_float(uint16_t h) { return half_bits_to_float(h); }

enum class DType { F32 = 0, F16 = 1 };

inline float load_elem(const void* base, DType dt, int64_t i) {
    if (dt == DType::F32) return static_cast<const float*>(base)[i];
    return half_to_float(static_cast<const uint16_t*>(base)[i]);
}

// Inverse L2 norm from a float32 sum of squares computed by a fast path. Vectors
// whose norm is 0 or below FLT_MIN (the smallest normal float32) count as zero
// vectors and get 0 (so every cosine with them is 0, never NaN). When the fast
// float32 sum overflowed or may have underflowed, the sum is recomputed in double.
inline float inv_norm_from_sumsq(float sumsq, const void* row, DType dt, int64_t C) {
    double s = sumsq;
    if (!(sumsq < FLT_MAX) || sumsq < 1e-30f) {
        s = 0.0;
        for (int64_t c = 0; c < C; ++c) {
            double v = load_elem(row, dt, c);
            s += v * v;
        }
    }
    double n = std::sqrt(s);
    if (!(n >= static_cast<double>(FLT_MIN)) || !std::isfinite(n)) return 0.0f;
    return static_cast<float>(1.0 / n);
}

// ---- CPU dispatch (isa.cpp) ----------------------------------------------------------
// The instruction-set paths of the CPU kernels, in increasing order:
//   Scalar  portable C++ (any CPU)
//   AVX2    AVX2 + FMA + F16C (256-bit)
//   AVX512  AVX-512 F/BW/VL/DQ + FMA + F16C (512-bit registers; float16 widened with
//           vcvtph2ps on zmm); the kNN vote and prototype similarity have one.
// Every path accumulates in float32. The AVX code is compiled with target attributes, so
// the module runs on any x86-64-v2 CPU; which path runs is decided at call time.
enum class Isa : int { Scalar = 0, AVX2 = 1, AVX512 = 2 };

// Target attribute of the AVX-512 functions (x86 only; never inlined into other code).
#define SEMISAM_AVX512 \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))

const char* isa_name(Isa isa);
// Parses "scalar" | "avx2" | "avx512" (also "generic" = scalar); false if unknown.
bool parse_isa(const char* name, Isa* out);
// True when this CPU (and OS) can run `isa` (detected once).
bool cpu_supports(Isa isa);
// The path the kernels use now: the override set by set_isa_override() if any, else the
// environment variable SEMISAM_ISA (read at every call: scalar|avx2|avx512|auto; a path
// the CPU lacks falls back to the best one it has; an unknown value throws
// std::invalid_argument), else the best path the CPU supports.
Isa active_isa();
// Process-wide override; `on` false clears it (back to SEMISAM_ISA / detection).
// Throws std::invalid_argument when the CPU cannot run `isa`.
void set_isa_override(bool on, Isa isa = Isa::Scalar);

// Back-compatible helpers: active_isa() >= AVX2; force_generic_kernels(true) is
// set_isa_override(true, Scalar), (false) clears the override.
bool cpu_has_avx2_fma_f16c();
void force_generic_kernels(bool on);

}  // namespace semisam
