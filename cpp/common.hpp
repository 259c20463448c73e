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

// CPU dispatch: true when AVX2 + FMA + F16C are usable (checked once).
bool cpu_has_avx2_fma_f16c();
// Testing aid: force the portable (non-AVX2) code paths.
void force_generic_kernels(bool on);

}  // namespace semisam
