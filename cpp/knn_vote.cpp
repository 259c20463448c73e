// Fused k-nearest-neighbour vote by cosine similarity.
//
// For each query q (Q, C) and a labelled bank (N, C): the k bank rows with the highest
// cosine similarity (ties -> lowest bank index), then a weighted vote with weights
// max(similarity, 0) (as in the SemiSAM-O1 authors' code), ties -> lowest label.
//
// Layout of the computation (per worker thread, no synchronisation between workers):
//   work item = a chunk of up to kMaxItemQueries queries, normalised into a float32
//   buffer (rows padded to a multiple of MR);
//   for each bank super-block of kSuperRows rows: normalise + transpose it into panels
//   of NR rows (panel[c][r]), then for sub-chunks of kSubQueries queries (L2 resident),
//   for each panel (L1 resident), for each MR-query tile: an MR x NR register-blocked
//   micro-kernel over all C, and a streaming top-k update (vector compare against each
//   query's current k-th best; a binary heap only when a candidate beats it).
// Paths (chosen per call by active_isa(), isa.cpp):
//   AVX-512  MR 14 x NR 32 (28 zmm accumulators, broadcasts from queries packed 14-wide,
//            so one contiguous stream), float16 widened with vcvtph2ps on zmm, C tails by
//            masked loads;
//   AVX2     MR 6 x NR 16 (12 ymm accumulators), queries row-major;
//   scalar   the same tiles as AVX2 in portable C++.
// All paths accumulate every dot product in float32, c = 0..C-1 in order.
// Memory: O(Q*k) for the heaps and results + O(threads * block) buffers; the Q x N
// similarity matrix is never formed.
#include <immintrin.h>

#include <algorithm>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

#include "kernels.hpp"
#include "vote.hpp"

namespace semisam {

namespace {

constexpr int MR = 6;                      // queries per micro-kernel tile (AVX2, scalar)
constexpr int NR = 16;                     // bank rows per micro-kernel tile (2 x ymm)
constexpr int64_t kSubQueries = 192;       // queries per L2-resident sub-chunk (multiple of MR)
constexpr int MR5 = 14;                    // queries per tile, AVX-512 (14 x 2 zmm accumulators)
constexpr int NR5 = 32;                    // bank rows per tile, AVX-512 (2 x zmm)
constexpr int64_t kSubQueries5 = 14 * MR5; // AVX-512 sub-chunk (196 queries, 196 KiB at C=256)
constexpr int64_t kSuperRows = 2048;       // bank rows packed at a time (multiple of NR, NR5)
constexpr int64_t kMaxItemQueries = 4096;  // queries per work item

// Aligned float buffer (64-byte alignment: the packed panels are read with aligned zmm/ymm loads).
struct FBuf {
    float* p = nullptr;
    size_t n = 0;
    void resize(size_t m) {
        if (m <= n) return;
        std::free(p);
        p = static_cast<float*>(std::aligned_alloc(64, ((m * sizeof(float) + 63) / 64) * 64));
        if (!p) throw std::bad_alloc();
        n = m;
    }
    ~FBuf() { std::free(p); }
};

// Per-query top-k: a binary min-heap whose root is the current worst kept neighbour
// ("worse" = lower similarity, or equal similarity and higher index).
struct TopK {
    float* s;
    int64_t* i;
    int64_t k;
    int64_t n = 0;
    static bool worse(float sa, int64_t ia, float sb, int64_t ib) {
        return sa < sb || (sa == sb && ia > ib);
    }
    // Candidates arrive in increasing bank index, so a candidate equal to the root is
    // worse than it; callers only push when sim > threshold().
    float threshold() const { return n < k ? -std::numeric_limits<float>::infinity() : s[0]; }
    void push(float v, int64_t idx) {
        if (n < k) {
            int64_t c = n++;
            while (c > 0) {
                int64_t par = (c - 1) / 2;
                if (!worse(v, idx, s[par], i[par])) break;
                s[c] = s[par];
                i[c] = i[par];
                c = par;
            }
            s[c] = v;
            i[c] = idx;
            return;
        }
        // replace root, sift down
        int64_t c = 0;
        for (;;) {
            int64_t l = 2 * c + 1;
            if (l >= k) break;
            int64_t r = l + 1;
            int64_t m = (r < k && worse(s[r], i[r], s[l], i[l])) ? r : l;
            if (!worse(s[m], i[m], v, idx)) break;
            s[c] = s[m];
            i[c] = i[m];
            c = m;
        }
        s[c] = v;
        i[c] = idx;
    }
    // Sorts in place into rank order (most similar first, ties lowest index).
    void sort_desc() {
        std::vector<std::pair<float, int64_t>> tmp(static_cast<size_t>(n));
        for (int64_t a = 0; a < n; ++a) tmp[a] = {s[a], i[a]};
        std::sort(tmp.begin(), tmp.end(), [](const auto& a, const auto& b) {
            return a.first > b.first || (a.first == b.first && a.second < b.second);
        });
        for (int64_t a = 0; a < n; ++a) {
            s[a] = tmp[a].first;
            i[a] = tmp[a].second;
        }
    }
};

// ---- row normalisation into float32 -------------------------------------------------

void normalise_rows_generic(const void* src, DType dt, int64_t C, int64_t r0, int64_t r1,
                            float* dst, int64_t ld) {
    const size_t esz = dt == DType::F16 ? 2 : 4;
    for (int64_t r = r0; r < r1; ++r) {
        const char* row = static_cast<const char*>(src) + static_cast<size_t>(r * C) * esz;
        float* d = dst + (r - r0) * ld;
        float ss = 0.f;
        for (int64_t c = 0; c < C; ++c) {
            d[c] = load_elem(row, dt, c);
            ss += d[c] * d[c];
        }
        float inv = inv_norm_from_sumsq(ss, row, dt, C);
        for (int64_t c = 0; c < C; ++c) d[c] *= inv;
    }
}

#if defined(__x86_64__) || defined(__i386__)
__attribute__((target("avx2,fma,f16c"))) void normalise_rows_avx2(const void* src, DType dt,
                                                                    int64_t C, int64_t r0,
                                                                    int64_t r1, float* dst,
                                                                    int64_t ld) {
    const size_t esz = dt == DType::F16 ? 2 : 4;
    const int64_t C8 = C & ~int64_t(7);
    for (int64_t r = r0; r < r1; ++r) {
        const char* row = static_cast<const char*>(src) + static_cast<size_t>(r * C) * esz;
        float* d = dst + (r - r0) * ld;
        __m256 acc = _mm256_setzero_ps();
        if (dt == DType::F16) {
            for (int64_t c = 0; c < C8; c += 8) {
                __m256 x = _mm256_cvtph_ps(_mm_loadu_si128(
                    reinterpret_cast<const __m128i*>(reinterpret_cast<const uint16_t*>(row) + c)));
                _mm256_storeu_ps(d + c, x);
                acc = _mm256_fmadd_ps(x, x, acc);
            }
        } else {
            for (int64_t c = 0; c < C8; c += 8) {
                __m256 x = _mm256_loadu_ps(reinterpret_cast<const float*>(row) + c);
                _mm256_storeu_ps(d + c, x);
                acc = _mm256_fmadd_ps(x, x, acc);
            }
        }
        alignas(32) float t[8];
        _mm256_store_ps(t, acc);
        float ss = ((t[0] + t[4]) + (t[1] + t[5])) + ((t[2] + t[6]) + (t[3] + t[7]));
        for (int64_t c = C8; c < C; ++c) {
            d[c] = load_elem(row, dt, c);
            ss += d[c] * d[c];
        }
        const __m256 inv = _mm256_set1_ps(inv_norm_from_sumsq(ss, row, dt, C));
        for (int64_t c = 0; c < C8; c += 8)
            _mm256_storeu_ps(d + c, _mm256_mul_ps(_mm256_loadu_ps(d + c), inv));
        for (int64_t c = C8; c < C; ++c) d[c] *= _mm256_cvtss_f32(inv);
    }
}
#endif

#if defined(__x86_64__) || defined(__i386__)
// 16 lanes of row c.. (float16 widened by vcvtph2ps zmm); `tail` masks a partial load.
SEMISAM_AVX512 inline __m512 load16(const char* row, DType dt, int64_t c, __mmask16 tail) {
    if (dt == DType::F16) {
        const uint16_t* h = reinterpret_cast<const uint16_t*>(row) + c;
        return _mm512_cvtph_ps(tail == 0xFFFF ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(h))
                                              : _mm256_maskz_loadu_epi16(tail, h));
    }
    const float* f = reinterpret_cast<const float*>(row) + c;
    return tail == 0xFFFF ? _mm512_loadu_ps(f) : _mm512_maskz_loadu_ps(tail, f);
}

SEMISAM_AVX512 void normalise_rows_avx512(const void* src, DType dt, int64_t C, int64_t r0,
                                          int64_t r1, float* dst, int64_t ld) {
    const size_t esz = dt == DType::F16 ? 2 : 4;
    const int64_t C16 = C & ~int64_t(15);
    const __mmask16 tail = static_cast<__mmask16>((1u << (C - C16)) - 1u);
    for (int64_t r = r0; r < r1; ++r) {
        const char* row = static_cast<const char*>(src) + static_cast<size_t>(r * C) * esz;
        float* d = dst + (r - r0) * ld;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t c = 0; c < C16; c += 16) {
            const __m512 x = load16(row, dt, c, 0xFFFF);
            _mm512_storeu_ps(d + c, x);
            acc = _mm512_fmadd_ps(x, x, acc);
        }
        if (tail) {
            const __m512 x = load16(row, dt, C16, tail);
            _mm512_mask_storeu_ps(d + C16, tail, x);
            acc = _mm512_fmadd_ps(x, x, acc);
        }
        const __m512 inv = _mm512_set1_ps(inv_norm_from_sumsq(_mm512_reduce_add_ps(acc), row, dt, C));
        for (int64_t c = 0; c < C16; c += 16)
            _mm512_storeu_ps(d + c, _mm512_mul_ps(_mm512_loadu_ps(d + c), inv));
        if (tail)
            _mm512_mask_storeu_ps(d + C16, tail,
                                  _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, d + C16), inv));
    }
}
#endif

void normalise_rows(Isa isa, const void* src, DType dt, int64_t C, int64_t r0, int64_t r1,
                    float* dst, int64_t ld) {
#if defined(__x86_64__) || defined(__i386__)
    if (isa == Isa::AVX512) return normalise_rows_avx512(src, dt, C, r0, r1, dst, ld);
    if (isa == Isa::AVX2) return normalise_rows_avx2(src, dt, C, r0, r1, dst, ld);
#endif
    normalise_rows_generic(src, dt, C, r0, r1, dst, ld);
}

// Transposes normalised rows tmp (rows x C, row-major) into W-row panels:
// panel p holds element (r, c) at [p * C * W + c * W + r]; missing rows are zero.
// (W = NR for the bank; the AVX-512 path also packs its queries this way with W = MR5.)
template <int W>
void pack_panels(const float* tmp, int64_t rows, int64_t C, float* panels) {
    const int64_t np = (rows + W - 1) / W;
    for (int64_t p = 0; p < np; ++p) {
        float* dst = panels + p * C * W;
        const int64_t nr = std::min<int64_t>(W, rows - p * W);
        for (int64_t r = 0; r < nr; ++r) {
            const float* s = tmp + (p * W + r) * C;
            for (int64_t c = 0; c < C; ++c) dst[c * W + r] = s[c];
        }
        for (int64_t r = nr; r < W; ++r)
            for (int64_t c = 0; c < C; ++c) dst[c * W + r] = 0.f;
    }
}

// ---- micro-kernels: out[m][n] = sum_c q[m][c] * panel[c][n] ---------------------------

// Both return a bit mask of the tile rows m with some out[m][n] > thr[m].
inline unsigned micro_generic(const float* q, int64_t ldq, const float* panel, int64_t C,
                              const float* thr, float out[MR][NR]) {
    for (int m = 0; m < MR; ++m)
        for (int n = 0; n < NR; ++n) out[m][n] = 0.f;
    for (int64_t c = 0; c < C; ++c) {
        const float* b = panel + c * NR;
        for (int m = 0; m < MR; ++m) {
            const float a = q[m * ldq + c];
            for (int n = 0; n < NR; ++n) out[m][n] += a * b[n];
        }
    }
    unsigned mask = 0;
    for (int m = 0; m < MR; ++m)
        for (int n = 0; n < NR; ++n)
            if (out[m][n] > thr[m]) mask |= 1u << m;
    return mask;
}

#if defined(__x86_64__) || defined(__i386__)
__attribute__((target("avx2,fma,f16c"), always_inline)) inline bool gt(__m256 x0, __m256 x1,
                                                                      float t) {
    const __m256 tv = _mm256_set1_ps(t);
    return _mm256_movemask_ps(_mm256_or_ps(_mm256_cmp_ps(x0, tv, _CMP_GT_OQ),
                                           _mm256_cmp_ps(x1, tv, _CMP_GT_OQ))) != 0;
}

__attribute__((target("avx2,fma,f16c"))) inline unsigned micro_avx2(
    const float* q, int64_t ldq, const float* panel, int64_t C, const float* thr,
    float out[MR][NR]) {
    __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps();
    __m256 c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
    __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps();
    __m256 c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
    __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps();
    __m256 c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
    const float* q0 = q;
    const float* q1 = q + ldq;
    const float* q2 = q + 2 * ldq;
    const float* q3 = q + 3 * ldq;
    const float* q4 = q + 4 * ldq;
    const float* q5 = q + 5 * ldq;
    for (int64_t c = 0; c < C; ++c) {
        const __m256 b0 = _mm256_load_ps(panel + c * NR);
        const __m256 b1 = _mm256_load_ps(panel + c * NR + 8);
        __m256 a = _mm256_broadcast_ss(q0 + c);
        c00 = _mm256_fmadd_ps(a, b0, c00);
        c01 = _mm256_fmadd_ps(a, b1, c01);
        a = _mm256_broadcast_ss(q1 + c);
        c10 = _mm256_fmadd_ps(a, b0, c10);
        c11 = _mm256_fmadd_ps(a, b1, c11);
        a = _mm256_broadcast_ss(q2 + c);
        c20 = _mm256_fmadd_ps(a, b0, c20);
        c21 = _mm256_fmadd_ps(a, b1, c21);
        a = _mm256_broadcast_ss(q3 + c);
        c30 = _mm256_fmadd_ps(a, b0, c30);
        c31 = _mm256_fmadd_ps(a, b1, c31);
        a = _mm256_broadcast_ss(q4 + c);
        c40 = _mm256_fmadd_ps(a, b0, c40);
        c41 = _mm256_fmadd_ps(a, b1, c41);
        a = _mm256_broadcast_ss(q5 + c);
        c50 = _mm256_fmadd_ps(a, b0, c50);
        c51 = _mm256_fmadd_ps(a, b1, c51);
    }
    _mm256_storeu_ps(out[0], c00);
    _mm256_storeu_ps(out[0] + 8, c01);
    _mm256_storeu_ps(out[1], c10);
    _mm256_storeu_ps(out[1] + 8, c11);
    _mm256_storeu_ps(out[2], c20);
    _mm256_storeu_ps(out[2] + 8, c21);
    _mm256_storeu_ps(out[3], c30);
    _mm256_storeu_ps(out[3] + 8, c31);
    _mm256_storeu_ps(out[4], c40);
    _mm256_storeu_ps(out[4] + 8, c41);
    _mm256_storeu_ps(out[5], c50);
    _mm256_storeu_ps(out[5] + 8, c51);
    unsigned mask = 0;
    mask |= gt(c00, c01, thr[0]) ? 1u : 0u;
    mask |= gt(c10, c11, thr[1]) ? 2u : 0u;
    mask |= gt(c20, c21, thr[2]) ? 4u : 0u;
    mask |= gt(c30, c31, thr[3]) ? 8u : 0u;
    mask |= gt(c40, c41, thr[4]) ? 16u : 0u;
    mask |= gt(c50, c51, thr[5]) ? 32u : 0u;
    return mask;
}
#endif

#if defined(__x86_64__) || defined(__i386__)
// AVX-512 tile: 14 queries (packed: qp[c * MR5 + m]) x 32 bank rows (panel[c * NR5 + n]).
// 28 zmm accumulators + 2 bank vectors + 1 broadcast = 31 of the 32 registers. The tile is
// stored to `out` only when some row beats its threshold (rare once the heaps are full).
SEMISAM_AVX512 inline unsigned micro_avx512(const float* qp, const float* panel, int64_t C,
                                            const float* thr, float out[MR5][NR5]) {
    __m512 acc0[MR5], acc1[MR5];
#pragma GCC unroll 14
    for (int m = 0; m < MR5; ++m) {
        acc0[m] = _mm512_setzero_ps();
        acc1[m] = _mm512_setzero_ps();
    }
    for (int64_t c = 0; c < C; ++c) {
        const __m512 b0 = _mm512_load_ps(panel + c * NR5);
        const __m512 b1 = _mm512_load_ps(panel + c * NR5 + 16);
        const float* a = qp + c * MR5;
#pragma GCC unroll 14
        for (int m = 0; m < MR5; ++m) {
            const __m512 av = _mm512_set1_ps(a[m]);
            acc0[m] = _mm512_fmadd_ps(av, b0, acc0[m]);
            acc1[m] = _mm512_fmadd_ps(av, b1, acc1[m]);
        }
    }
    unsigned mask = 0;
#pragma GCC unroll 14
    for (int m = 0; m < MR5; ++m) {
        const __m512 t = _mm512_set1_ps(thr[m]);
        const unsigned hit = static_cast<unsigned>(_mm512_cmp_ps_mask(acc0[m], t, _CMP_GT_OQ)) |
                             static_cast<unsigned>(_mm512_cmp_ps_mask(acc1[m], t, _CMP_GT_OQ));
        mask |= (hit != 0u ? 1u : 0u) << m;
    }
    if (mask) {
#pragma GCC unroll 14
        for (int m = 0; m < MR5; ++m) {
            _mm512_storeu_ps(out[m], acc0[m]);
            _mm512_storeu_ps(out[m] + 16, acc1[m]);
        }
    }
    return mask;
}
#endif

// Streams one packed bank super-block past the work item's queries, updating the heaps.
struct Scan {
    const float* qb;  // normalised queries (nq_pad, C); AVX-512: packed in MR5-row panels
    int64_t nq, nq_pad, C;
    const float* panels;
    int64_t b0, nb;  // super-block rows [b0, b0 + nb)
    float* thr;      // per query: current k-th best similarity (+inf for padding rows)
    TopK* heaps;
};

// Push the tile's similarities above each flagged query's current k-th best into its heap
// (``rows``: bit m set when query t + m has a candidate; ``tile``: row-major, ``ld`` floats a row).
__attribute__((always_inline)) inline void drain(unsigned rows, const float* tile, int64_t ld, int valid,
                                                 int64_t t, int64_t j0, const Scan& a) {
    while (rows) {
        const int m = __builtin_ctz(rows);
        rows &= rows - 1;
        const int64_t q = t + m;
        const float* sims = tile + m * ld;
        float th = a.thr[q];
        TopK& h = a.heaps[q];
        for (int n = 0; n < valid; ++n) {
            if (sims[n] > th) {
                h.push(sims[n], j0 + n);
                th = h.threshold();
            }
        }
        a.thr[q] = th;
    }
}

template <bool AVX>
__attribute__((always_inline)) inline void scan_impl(const Scan& a) {
    alignas(32) float tile[MR][NR];
    const int64_t C = a.C;
    const int64_t npanels = (a.nb + NR - 1) / NR;
    for (int64_t s0 = 0; s0 < a.nq_pad; s0 += kSubQueries) {
        const int64_t s1 = std::min(a.nq_pad, s0 + kSubQueries);
        for (int64_t p = 0; p < npanels; ++p) {
            const float* panel = a.panels + p * C * NR;
            const int64_t j0 = a.b0 + p * NR;
            const int valid = static_cast<int>(std::min<int64_t>(NR, a.b0 + a.nb - j0));
            for (int64_t t = s0; t < s1; t += MR) {
                unsigned rows;
#if defined(__x86_64__) || defined(__i386__)
                if constexpr (AVX)
                    rows = micro_avx2(a.qb + t * C, C, panel, C, a.thr + t, tile);
                else
#endif
                    rows = micro_generic(a.qb + t * C, C, panel, C, a.thr + t, tile);
                drain(rows, &tile[0][0], sizeof(tile[0]) / sizeof(float), valid, t, j0, a);
            }
        }
    }
}

void scan_generic(const Scan& a) { scan_impl<false>(a); }
#if defined(__x86_64__) || defined(__i386__)
__attribute__((target("avx2,fma,f16c"))) void scan_avx2(const Scan& a) { scan_impl<true>(a); }

// The AVX-512 scan: the same loop nest with 14 x 32 tiles (queries in MR5-row panels).
SEMISAM_AVX512 void scan_avx512(const Scan& a) {
    alignas(64) float tile[MR5][NR5];
    const int64_t C = a.C;
    const int64_t npanels = (a.nb + NR5 - 1) / NR5;
    for (int64_t s0 = 0; s0 < a.nq_pad; s0 += kSubQueries5) {
        const int64_t s1 = std::min(a.nq_pad, s0 + kSubQueries5);
        for (int64_t p = 0; p < npanels; ++p) {
            const float* panel = a.panels + p * C * NR5;
            const int64_t j0 = a.b0 + p * NR5;
            const int valid = static_cast<int>(std::min<int64_t>(NR5, a.b0 + a.nb - j0));
            for (int64_t t = s0; t < s1; t += MR5) {
                unsigned rows = micro_avx512(a.qb + t * C, panel, C, a.thr + t, tile);
                drain(rows, &tile[0][0], sizeof(tile[0]) / sizeof(float), valid, t, j0, a);
            }
        }
    }
}
#endif

}  // namespace

void vote_one(const float* sims, const int64_t* idx, int64_t k, const int32_t* bank_labels,
              const LabelWeights& lw, int32_t* label, float* share) {
    if (k <= 64) {  // the rule shared with the CUDA kernels, O(k^2) without memory
        semisam::vote_rank_order(sims, idx, k, bank_labels, lw, label, share);
        return;
    }
    // Large k: the same rule through a sort by (label, rank); sums still in rank order.
    float total = 0.f;
    for (int64_t a = 0; a < k; ++a)
        if (idx[a] >= 0) total += vote_weight(sims[a], bank_labels[idx[a]], lw);
    bool have = false;
    int32_t best_label = 0;
    float best_w = 0.f;
    thread_local std::vector<std::pair<int32_t, int64_t>> order;
    order.clear();
    for (int64_t a = 0; a < k; ++a)
        if (idx[a] >= 0) order.emplace_back(bank_labels[idx[a]], a);
    std::sort(order.begin(), order.end());  // by label, then rank
    for (size_t a = 0; a < order.size();) {
        size_t b = a;
        float w = 0.f;
        for (; b < order.size() && order[b].first == order[a].first; ++b)
            w += vote_weight(sims[order[b].second], order[b].first, lw);
        if (!have || w > best_w || (w == best_w && order[a].first < best_label)) {
            have = true;
            best_label = order[a].first;
            best_w = w;
        }
        a = b;
    }
    if (total > 0.f) {
        *label = best_label;
        *share = std::min(best_w / total, 1.0f);
    } else {
        *label = idx[0] >= 0 ? bank_labels[idx[0]] : -1;
        *share = 0.f;
    }
}

void knn_vote_cpu(const void* queries, DType qdt, int64_t Q, const void* bank, DType bdt,
                  int64_t N, int64_t C, const int32_t* bank_labels, const LabelWeights& lw,
                  int64_t k, int32_t* out_labels, float* out_share, int64_t* topk_index,
                  float* topk_sim, int threads) {
    if (Q <= 0) return;
    const int nt = resolve_threads(threads);
    const Isa isa = active_isa();
    const bool wide = isa == Isa::AVX512;
    const int mr = wide ? MR5 : MR;  // tile shape of the chosen path
    const int nr = wide ? NR5 : NR;
    // Work items: at least one per thread, at most kMaxItemQueries queries each.
    int64_t items = std::max<int64_t>(1, (Q + kMaxItemQueries - 1) / kMaxItemQueries);
    items = ((items + nt - 1) / nt) * nt;
    int64_t per_item = (Q + items - 1) / items;
    per_item = std::max<int64_t>(mr, ((per_item + mr - 1) / mr) * mr);
    items = (Q + per_item - 1) / per_item;

    // Heap storage for every query: O(Q * k). When the caller wants the top-k we keep
    // the heaps directly in its output arrays.
    std::unique_ptr<float[]> own_s;
    std::unique_ptr<int64_t[]> own_i;
    float* hs = topk_sim;
    int64_t* hi = topk_index;
    if (!hs) {
        own_s.reset(new float[static_cast<size_t>(Q * k)]);
        hs = own_s.get();
    }
    if (!hi) {
        own_i.reset(new int64_t[static_cast<size_t>(Q * k)]);
        hi = own_i.get();
    }

    const int64_t workers = std::min<int64_t>(nt, items);
    struct Scratch {
        FBuf qbuf, qpack, tmp, panels;
    };
    std::vector<Scratch> scratch(static_cast<size_t>(workers));

    parallel_items(items, nt, [&](int64_t item, int worker) {
        Scratch& sc = scratch[static_cast<size_t>(worker)];
        const int64_t q0 = item * per_item;
        const int64_t q1 = std::min(Q, q0 + per_item);
        const int64_t nq = q1 - q0;
        const int64_t nq_pad = ((nq + mr - 1) / mr) * mr;
        sc.qbuf.resize(static_cast<size_t>(nq_pad * C));
        float* qb = sc.qbuf.p;
        normalise_rows(isa, queries, qdt, C, q0, q1, qb, C);
        std::fill(qb + nq * C, qb + nq_pad * C, 0.f);
        if (wide) {  // MR5-row panels: the micro-kernel's broadcasts read one stream
            sc.qpack.resize(static_cast<size_t>(nq_pad * C));
            pack_panels<MR5>(qb, nq_pad, C, sc.qpack.p);
            qb = sc.qpack.p;
        }

        std::vector<TopK> heaps;
        heaps.reserve(static_cast<size_t>(nq));
        for (int64_t a = 0; a < nq; ++a) heaps.push_back(TopK{hs + (q0 + a) * k, hi + (q0 + a) * k, k});
        std::vector<float> thr(static_cast<size_t>(nq_pad), std::numeric_limits<float>::infinity());
        for (int64_t a = 0; a < nq; ++a) thr[a] = heaps[a].threshold();

        const int64_t super = std::min<int64_t>(kSuperRows, ((N + nr - 1) / nr) * nr);
        sc.tmp.resize(static_cast<size_t>(super * C));
        sc.panels.resize(static_cast<size_t>(super * C));
        for (int64_t b0 = 0; b0 < N; b0 += super) {
            const int64_t nb = std::min(super, N - b0);
            normalise_rows(isa, bank, bdt, C, b0, b0 + nb, sc.tmp.p, C);
            if (wide)
                pack_panels<NR5>(sc.tmp.p, nb, C, sc.panels.p);
            else
                pack_panels<NR>(sc.tmp.p, nb, C, sc.panels.p);
            const Scan sc_args{qb, nq, nq_pad, C, sc.panels.p, b0, nb, thr.data(), heaps.data()};
#if defined(__x86_64__) || defined(__i386__)
            if (isa == Isa::AVX512) {
                scan_avx512(sc_args);
                continue;
            }
            if (isa == Isa::AVX2) {
                scan_avx2(sc_args);
                continue;
            }
#endif
            scan_generic(sc_args);
        }
        for (int64_t a = 0; a < nq; ++a) {
            TopK& h = heaps[a];
            for (int64_t e = h.n; e < k; ++e) {  // only if N < k (rejected at the boundary)
                h.s[e] = 0.f;
                h.i[e] = -1;
            }
            h.n = std::min(h.n, k);
            h.sort_desc();
            vote_one(h.s, h.i, k, bank_labels, lw, out_labels + q0 + a, out_share + q0 + a);
        }
    });
}

}  // namespace semisam
