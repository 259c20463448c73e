// Host-side check of per-label vote weights (LabelWeights in vote.hpp), shared by the CPU
// module (module.cpp) and the CUDA module (cuda/module_cuda.cpp) so both reject the same
// inputs with the same message.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

namespace semisam {

// Empty when every weight is finite and >= 0 and every one of the N bank labels has a
// weight (0 <= label < n); otherwise the error message, naming the argument.
inline std::string label_weights_error(const float* w, int64_t n, const int32_t* labels, int64_t N) {
    if (n < 1) return "label_weights: expected a 1-D float array with one weight per label";
    if (n > (int64_t{1} << 30)) return "label_weights: too many labels";
    for (int64_t c = 0; c < n; ++c)
        if (!(w[c] >= 0.f) || !std::isfinite(w[c]))
            return "label_weights: weights must be finite and >= 0, got " + std::to_string(w[c]) +
                   " for label " + std::to_string(c);
    for (int64_t i = 0; i < N; ++i)
        if (labels[i] < 0 || labels[i] >= n)
            return "bank_labels: label " + std::to_string(labels[i]) + " at row " + std::to_string(i) +
                   " has no weight (label_weights covers 0.." + std::to_string(n - 1) + ")";
    return std::string();
}

}  // namespace semisam
