// CPU kernels of semisam_o1._core (declarations). Arrays are C-contiguous, row-major.
#pragma once

#include <cstdint>

#include "common.hpp"
#include "vote.hpp"  // LabelWeights

namespace semisam {

// Cosine similarity of N feature rows (N, C) to K prototypes (K, C).
// scores: (N, K) float32 out; labels: (N,) int32 out = argmax_k scores (lowest k on ties).
void prototype_similarity_cpu(const void* features, DType fdt, int64_t N, int64_t C,
                              const void* prototypes, DType pdt, int64_t K,
                              float* scores, int32_t* labels, int threads);

// Weighted k-nearest-neighbour vote by cosine similarity (see knn_vote.cpp).
// topk_index (Q, k) / topk_sim (Q, k) may be null (not requested); lw.w null: unweighted.
void knn_vote_cpu(const void* queries, DType qdt, int64_t Q, const void* bank, DType bdt,
                  int64_t N, int64_t C, const int32_t* bank_labels, const LabelWeights& lw,
                  int64_t k, int32_t* out_labels, float* out_share, int64_t* topk_index,
                  float* topk_sim, int threads);

// The vote itself on one query's k neighbours, given in rank order (most similar
// first): weights max(sim, 0) summed per label in rank order; highest total wins,
// ties -> lowest label; if every weight is 0 the most similar neighbour's label wins
// with share 0; with label weights each weight is multiplied by w[label]. k <= 64 goes
// through semisam::vote_rank_order (vote.hpp), the CUDA kernels' rule.
void vote_one(const float* sims, const int64_t* idx, int64_t k, const int32_t* bank_labels,
              const LabelWeights& lw, int32_t* label, float* share);

}  // namespace semisam
