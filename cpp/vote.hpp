// The weighted vote over one query's k neighbours, shared by the CPU core
// (knn_vote.cpp) and the CUDA kernels (cuda/kernels.cuh): a __host__ __device__
// function under nvcc, so both sides follow one rule by construction.
#pragma once

#include <cstdint>

#include "half.hpp"  // SEMISAM_HD

namespace semisam {

// Optional per-label vote weights: a neighbour of label L counts w[L] * max(sim, 0).
// w == nullptr: every label counts 1 (the authors' rule). Labels outside [0, n) count 0
// (callers validate labels against n first; this only keeps the access in bounds).
struct LabelWeights {
    const float* w = nullptr;
    int32_t n = 0;
};

SEMISAM_HD float label_weight(const LabelWeights& lw, int32_t L) {
    if (!lw.w) return 1.f;
    return (L >= 0 && L < lw.n) ? lw.w[L] : 0.f;
}

// Rule (as the SemiSAM-O1 authors' code, arXiv 2604.24109): weights max(sim, 0);
// per-label sums accumulated in rank order; the highest sum wins, ties -> lowest
// label; share = winner's sum / all k weights (clamped to 1). If every weight is 0,
// the most similar neighbour's label wins with share 0. Entries with idx < 0 (fewer
// than k candidates) are skipped. With label weights (LabelWeights) every weight is
// multiplied by its label's weight, in the total too. O(k^2) without memory: for small k
// (<= 64).
SEMISAM_HD float vote_weight(float sim, int32_t L, const LabelWeights& lw) {
    return (sim > 0.f ? sim : 0.f) * label_weight(lw, L);
}

SEMISAM_HD void vote_rank_order(const float* sims, const int64_t* idx, int64_t k,
                                const int32_t* bank_labels, const LabelWeights& lw,
                                int32_t* label, float* share) {
    float total = 0.f;
    for (int64_t a = 0; a < k; ++a)
        if (idx[a] >= 0) total += vote_weight(sims[a], bank_labels[idx[a]], lw);
    bool have = false;
    int32_t best_label = 0;
    float best_w = 0.f;
    for (int64_t a = 0; a < k; ++a) {
        if (idx[a] < 0) continue;
        const int32_t L = bank_labels[idx[a]];
        bool seen = false;
        for (int64_t b = 0; b < a && !seen; ++b) seen = idx[b] >= 0 && bank_labels[idx[b]] == L;
        if (seen) continue;
        float w = 0.f;
        for (int64_t b = a; b < k; ++b)
            if (idx[b] >= 0 && bank_labels[idx[b]] == L) w += vote_weight(sims[b], L, lw);
        if (!have || w > best_w || (w == best_w && L < best_label)) {
            have = true;
            best_label = L;
            best_w = w;
        }
    }
    if (total > 0.f) {
        *label = best_label;
        const float s = best_w / total;
        *share = s < 1.f ? s : 1.f;
    } else {
        *label = (k > 0 && idx[0] >= 0) ? bank_labels[idx[0]] : -1;
        *share = 0.f;
    }
}

}  // namespace semisam
