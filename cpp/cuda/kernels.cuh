// Per-thread work of the CUDA kernels, written as __host__ __device__ functions so the
// very same code also runs on the CPU (semisam_o1._core_cuda._emulate_*), which is how
// the kernel logic is tested on machines without a GPU.
//
// Deliberately simple (correctness over speed):
//   prototype similarity: one thread per feature row;
//   kNN vote: one thread per query, queries normalised and transposed (C, Q) so the
//   threads of a warp read consecutive addresses, the bank read in blocks of 8 rows
//   (the same rows for every thread of a warp: broadcast loads), a sorted top-k list
//   per query kept in the output arrays, then the vote.
#pragma once

#include <math.h>

#include <cstdint>

#include "half.hpp"
#include "vote.hpp"

#if defined(__CUDACC__)
#define SS_HD __host__ __device__ inline
#else
#define SS_HD inline
#endif

namespace semisam_cuda {

enum : int { kF32 = 0, kF16 = 1 };

SS_HD float h2f(uint16_t h) { return semisam::half_bits_to_float(h); }

SS_HD float ld(const void* base, int dt, int64_t i) {
    return dt == kF32 ? static_cast<const float*>(base)[i]
                      : h2f(static_cast<const uint16_t*>(base)[i]);
}

// 1/|row| with the CPU core's rule: float32 sum of squares, recomputed in double when it
// overflowed or may have underflowed; norms that are 0, below FLT_MIN or not finite -> 0.
SS_HD float inv_norm_row(const void* base, int dt, int64_t row, int64_t C) {
    const float kFltMin = 1.17549435e-38f, kFltMax = 3.40282347e38f;
    float ss = 0.f;
    for (int64_t c = 0; c < C; ++c) {
        float v = ld(base, dt, row * C + c);
        ss += v * v;
    }
    double s = ss;
    if (!(ss < kFltMax) || ss < 1e-30f) {
        s = 0.0;
        for (int64_t c = 0; c < C; ++c) {
            double v = ld(base, dt, row * C + c);
            s += v * v;
        }
    }
    double n = sqrt(s);
    if (!(n >= static_cast<double>(kFltMin)) || !(n < 1e300)) return 0.f;
    return static_cast<float>(1.0 / n);
}

// dst[c * cstride + row * rstride] = src[row, c] / |src[row]| (float32).
SS_HD void normalise_row(const void* src, int dt, int64_t row, int64_t C, float* dst,
                         int64_t cstride, int64_t rstride) {
    const float inv = inv_norm_row(src, dt, row, C);
    for (int64_t c = 0; c < C; ++c) dst[c * cstride + row * rstride] = ld(src, dt, row * C + c) * inv;
}

// One feature row against K normalised prototypes Pn (K, C) row-major.
SS_HD void proto_row(const void* feat, int fdt, int64_t r, int64_t C, const float* Pn, int64_t K,
                     float* scores, int32_t* labels) {
    const float inv = inv_norm_row(feat, fdt, r, C);
    int32_t best = 0;
    for (int64_t p = 0; p < K; ++p) {
        float d = 0.f;
        for (int64_t c = 0; c < C; ++c) d += ld(feat, fdt, r * C + c) * Pn[p * C + c];
        const float s = d * inv;
        scores[r * K + p] = s;
        if (s > scores[r * K + best]) best = static_cast<int32_t>(p);
    }
    labels[r] = best;
}

// The vote over one query's k neighbours: semisam::vote_rank_order (vote.hpp), the
// CPU core's rule (with the same optional per-label weights).
using semisam::LabelWeights;
using semisam::vote_rank_order;

// One query: qT (C, Q) normalised queries, bank (N, C) raw, binv (N,) inverse bank norms.
// Keeps a sorted top-k list (similarity descending, ties lowest index) in ts/ti, then votes.
SS_HD void knn_query(const float* qT, int64_t Q, int64_t q, const void* bank, int bdt,
                     const float* binv, int64_t N, int64_t C, const int32_t* bank_labels,
                     LabelWeights lw, int64_t k, int64_t* ti, float* ts, int32_t* out_label,
                     float* out_share) {
    const int RB = 8;
    float* s = ts + q * k;
    int64_t* ix = ti + q * k;
    int64_t n = 0;
    for (int64_t j0 = 0; j0 < N; j0 += RB) {
        int64_t rows[RB];
        for (int r = 0; r < RB; ++r) rows[r] = (j0 + r < N ? j0 + r : N - 1) * C;
        float acc[RB];
        for (int r = 0; r < RB; ++r) acc[r] = 0.f;
        for (int64_t c = 0; c < C; ++c) {
            const float qv = qT[c * Q + q];
            for (int r = 0; r < RB; ++r) acc[r] += qv * ld(bank, bdt, rows[r] + c);
        }
        for (int r = 0; r < RB && j0 + r < N; ++r) {
            const int64_t j = j0 + r;
            const float sim = acc[r] * binv[j];
            if (n == k && !(sim > s[k - 1])) continue;
            // insertion position: after every kept entry with similarity >= sim
            int64_t pos = n < k ? n : k - 1;
            while (pos > 0 && s[pos - 1] < sim) {
                s[pos] = s[pos - 1];
                ix[pos] = ix[pos - 1];
                --pos;
            }
            s[pos] = sim;
            ix[pos] = j;
            if (n < k) ++n;
        }
    }
    for (int64_t a = n; a < k; ++a) {  // only when N < k (rejected at the boundary)
        s[a] = 0.f;
        ix[a] = -1;
    }
    vote_rank_order(s, ix, k, bank_labels, lw, out_label + q, out_share + q);
}

}  // namespace semisam_cuda
