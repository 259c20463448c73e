// Prototype similarity: cosine scores of N feature rows against K class prototypes,
// plus the argmax label. Memory bound (one pass over the features); float16 rows are
// widened (F16C / vcvtph2ps) and accumulated in float32 with AVX2/FMA or AVX-512 (the
// path active_isa() picks at call time, isa.cpp).
#include <immintrin.h>

#include <vector>

#include "kernels.hpp"

namespace semisam {

namespace {

constexpr int64_t kRowsPerItem = 2048;  // rows per work item handed to a thread
constexpr int kGroup = 8;               // prototypes per pass over a row

// Scalar reference path (any CPU): dots in float32, same formula as the AVX2 path.
void rows_generic(const void* feat, DType fdt, int64_t r0, int64_t r1, int64_t C,
                  const float* P, int64_t K, float* scores, int32_t* labels) {
    std::vector<float> x(static_cast<size_t>(C));
    for (int64_t r = r0; r < r1; ++r) {
        const char* row = static_cast<const char*>(feat) +
                          r * C * (fdt == DType::F16 ? 2 : 4);
        float ss = 0.f;
        for (int64_t c = 0; c < C; ++c) {
            x[c] = load_elem(row, fdt, c);
            ss += x[c] * x[c];
        }
        float inv = inv_norm_from_sumsq(ss, row, fdt, C);
        float* out = scores + r * K;
        for (int64_t p = 0; p < K; ++p) {
            const float* pp = P + p * C;
            float d = 0.f;
            for (int64_t c = 0; c < C; ++c) d += x[c] * pp[c];
            out[p] = d * inv;
        }
        int32_t best = 0;
        for (int64_t p = 1; p < K; ++p)
            if (out[p] > out[best]) best = static_cast<int32_t>(p);
        labels[r] = best;
    }
}

#if defined(__x86_64__) || defined(__i386__)
__attribute__((target("avx2,fma,f16c"))) inline float hsum256(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v);
    __m128 hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    __m128 sh = _mm_movehdup_ps(lo);
    lo = _mm_add_ps(lo, sh);
    sh = _mm_movehl_ps(sh, lo);
    lo = _mm_add_ss(lo, sh);
    return _mm_cvtss_f32(lo);
}

template <DType FDT>
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const void* row, int64_t c) {
    if constexpr (FDT == DType::F16) {
        return _mm256_cvtph_ps(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(row) + c)));
    } else {
        return _mm256_loadu_ps(static_cast<const float*>(row) + c);
    }
}

// One row against prototypes [p0, p0+G): dots (float32 FMA over C, 8 lanes), and the
// row's sum of squares when `want_norm`. Tail (C % 8) handled in scalar code.
template <DType FDT, int G>
__attribute__((target("avx2,fma,f16c"))) inline void row_group(const void* row, int64_t C,
                                                                 const float* P, int64_t p0,
                                                                 bool want_norm, float* dots,
                                                                 float* sumsq) {
    __m256 acc[G];
    for (int g = 0; g < G; ++g) acc[g] = _mm256_setzero_ps();
    __m256 accn = _mm256_setzero_ps();
    const int64_t C8 = C & ~int64_t(7);
    for (int64_t c = 0; c < C8; c += 8) {
        __m256 x = load8<FDT>(row, c);
        if (want_norm) accn = _mm256_fmadd_ps(x, x, accn);
        for (int g = 0; g < G; ++g)
            acc[g] = _mm256_fmadd_ps(x, _mm256_loadu_ps(P + (p0 + g) * C + c), acc[g]);
    }
    for (int g = 0; g < G; ++g) dots[g] = hsum256(acc[g]);
    float ss = want_norm ? hsum256(accn) : 0.f;
    for (int64_t c = C8; c < C; ++c) {
        float x = load_elem(row, FDT, c);
        if (want_norm) ss += x * x;
        for (int g = 0; g < G; ++g) dots[g] += x * P[(p0 + g) * C + c];
    }
    if (want_norm) *sumsq = ss;
}

// AVX-512: the same computation 16 lanes wide; the C tail by masked loads (no scalar tail).
template <DType FDT>
SEMISAM_AVX512 inline __m512 load16(const void* row, int64_t c, __mmask16 m) {
    if constexpr (FDT == DType::F16) {
        const uint16_t* h = static_cast<const uint16_t*>(row) + c;
        return _mm512_cvtph_ps(m == 0xFFFF ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(h))
                                           : _mm256_maskz_loadu_epi16(m, h));
    } else {
        const float* f = static_cast<const float*>(row) + c;
        return m == 0xFFFF ? _mm512_loadu_ps(f) : _mm512_maskz_loadu_ps(m, f);
    }
}

template <DType FDT, int G>
SEMISAM_AVX512 inline void row_group512(const void* row, int64_t C, const float* P, int64_t p0,
                                        bool want_norm, float* dots, float* sumsq) {
    __m512 acc[G];
    for (int g = 0; g < G; ++g) acc[g] = _mm512_setzero_ps();
    __m512 accn = _mm512_setzero_ps();
    const int64_t C16 = C & ~int64_t(15);
    for (int64_t c = 0; c < C16; c += 16) {
        const __m512 x = load16<FDT>(row, c, 0xFFFF);
        if (want_norm) accn = _mm512_fmadd_ps(x, x, accn);
        for (int g = 0; g < G; ++g)
            acc[g] = _mm512_fmadd_ps(x, _mm512_loadu_ps(P + (p0 + g) * C + c), acc[g]);
    }
    if (C16 < C) {
        const __mmask16 m = static_cast<__mmask16>((1u << (C - C16)) - 1u);
        const __m512 x = load16<FDT>(row, C16, m);
        if (want_norm) accn = _mm512_fmadd_ps(x, x, accn);
        for (int g = 0; g < G; ++g)
            acc[g] = _mm512_fmadd_ps(x, _mm512_maskz_loadu_ps(m, P + (p0 + g) * C + C16), acc[g]);
    }
    for (int g = 0; g < G; ++g) dots[g] = _mm512_reduce_add_ps(acc[g]);
    if (want_norm) *sumsq = _mm512_reduce_add_ps(accn);
}

// The row loop both SIMD paths share: each row's dots with the K prototypes in groups of kGroup
// (row_group / row_group512: the first group also sums the row's squares), then its norm and argmax.
template <DType FDT, int G, bool W512>
__attribute__((always_inline)) inline void group_dots(const void* row, int64_t C, const float* P, int64_t p0,
                                                      bool first, float* dots, float* ss) {
    if constexpr (W512)
        row_group512<FDT, G>(row, C, P, p0, first, dots, ss);
    else
        row_group<FDT, G>(row, C, P, p0, first, dots, ss);
}

template <DType FDT, bool W512>
__attribute__((always_inline)) inline void rows_simd(const void* feat, int64_t r0, int64_t r1, int64_t C,
                                                     const float* P, int64_t K, float* scores, int32_t* labels) {
    const size_t esz = FDT == DType::F16 ? 2 : 4;
    float dots[kGroup];
    for (int64_t r = r0; r < r1; ++r) {
        const void* row = static_cast<const char*>(feat) + static_cast<size_t>(r * C) * esz;
        float* out = scores + r * K;
        float ss = 0.f;
        for (int64_t p0 = 0; p0 < K; p0 += kGroup) {
            const int64_t g = std::min<int64_t>(kGroup, K - p0);
            const bool first = p0 == 0;
            switch (g) {
                case 8: group_dots<FDT, 8, W512>(row, C, P, p0, first, dots, &ss); break;
                case 7: group_dots<FDT, 7, W512>(row, C, P, p0, first, dots, &ss); break;
                case 6: group_dots<FDT, 6, W512>(row, C, P, p0, first, dots, &ss); break;
                case 5: group_dots<FDT, 5, W512>(row, C, P, p0, first, dots, &ss); break;
                case 4: group_dots<FDT, 4, W512>(row, C, P, p0, first, dots, &ss); break;
                case 3: group_dots<FDT, 3, W512>(row, C, P, p0, first, dots, &ss); break;
                case 2: group_dots<FDT, 2, W512>(row, C, P, p0, first, dots, &ss); break;
                default: group_dots<FDT, 1, W512>(row, C, P, p0, first, dots, &ss); break;
            }
            for (int64_t i = 0; i < g; ++i) out[p0 + i] = dots[i];
        }
        const float inv = inv_norm_from_sumsq(ss, row, FDT, C);
        int32_t best = 0;
        for (int64_t p = 0; p < K; ++p) {
            out[p] *= inv;
            if (out[p] > out[best]) best = static_cast<int32_t>(p);
        }
        labels[r] = best;
    }
}

template <DType FDT>
__attribute__((target("avx2,fma,f16c"))) void rows_avx2(const void* feat, int64_t r0, int64_t r1, int64_t C,
                                                          const float* P, int64_t K, float* scores,
                                                          int32_t* labels) {
    rows_simd<FDT, false>(feat, r0, r1, C, P, K, scores, labels);
}

template <DType FDT>
SEMISAM_AVX512 void rows_avx512(const void* feat, int64_t r0, int64_t r1, int64_t C, const float* P, int64_t K,
                                float* scores, int32_t* labels) {
    rows_simd<FDT, true>(feat, r0, r1, C, P, K, scores, labels);
}
#endif

}  // namespace

void prototype_similarity_cpu(const void* features, DType fdt, int64_t N, int64_t C,
                              const void* prototypes, DType pdt, int64_t K, float* scores,
                              int32_t* labels, int threads) {
    // Normalised float32 prototypes (zero prototypes stay zero: score 0).
    std::vector<float> P(static_cast<size_t>(K * C));
    for (int64_t p = 0; p < K; ++p) {
        const char* prow = static_cast<const char*>(prototypes) +
                           p * C * (pdt == DType::F16 ? 2 : 4);
        double ss = 0.0;
        for (int64_t c = 0; c < C; ++c) {
            double v = load_elem(prow, pdt, c);
            ss += v * v;
        }
        double n = std::sqrt(ss);
        double inv = (n >= static_cast<double>(FLT_MIN) && std::isfinite(n)) ? 1.0 / n : 0.0;
        for (int64_t c = 0; c < C; ++c)
            P[p * C + c] = static_cast<float>(load_elem(prow, pdt, c) * inv);
    }
    const int64_t items = (N + kRowsPerItem - 1) / kRowsPerItem;
    const Isa isa = active_isa();
    parallel_items(items, resolve_threads(threads), [&](int64_t item, int) {
        const int64_t r0 = item * kRowsPerItem;
        const int64_t r1 = std::min(N, r0 + kRowsPerItem);
#if defined(__x86_64__) || defined(__i386__)
        if (isa == Isa::AVX512) {
            if (fdt == DType::F16)
                rows_avx512<DType::F16>(features, r0, r1, C, P.data(), K, scores, labels);
            else
                rows_avx512<DType::F32>(features, r0, r1, C, P.data(), K, scores, labels);
            return;
        }
        if (isa == Isa::AVX2) {
            if (fdt == DType::F16)
                rows_avx2<DType::F16>(features, r0, r1, C, P.data(), K, scores, labels);
            else
                rows_avx2<DType::F32>(features, r0, r1, C, P.data(), K, scores, labels);
            return;
        }
#endif
        rows_generic(features, fdt, r0, r1, C, P.data(), K, scores, labels);
    });
}

}  // namespace semisam
