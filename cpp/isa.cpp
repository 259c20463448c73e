// CPU dispatch of the kernels: detection of AVX2 / AVX-512 and the run-time choice of the
// path (override from Python, else SEMISAM_ISA, else the best the CPU has). See common.hpp.
#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "common.hpp"

namespace semisam {

namespace {

// -1: no override; otherwise the Isa value forced by set_isa_override().
std::atomic<int> g_override{-1};

bool detect(Isa isa) {
#if defined(__x86_64__) || defined(__i386__)
    // __builtin_cpu_supports checks both the CPUID bits and that the OS saves the
    // register state (XGETBV: YMM for AVX2, opmask/ZMM for AVX-512).
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
    switch (isa) {
        case Isa::Scalar: return true;
        case Isa::AVX2: return avx2;
        case Isa::AVX512:
            return avx2 && __builtin_cpu_supports("avx512f") &&
                   __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                   __builtin_cpu_supports("avx512dq");
    }
    return false;
#else
    return isa == Isa::Scalar;
#endif
}

Isa best_supported(Isa at_most) {
    for (int i = static_cast<int>(at_most); i > 0; --i)
        if (cpu_supports(static_cast<Isa>(i))) return static_cast<Isa>(i);
    return Isa::Scalar;
}

}  // namespace

const char* isa_name(Isa isa) {
    switch (isa) {
        case Isa::Scalar: return "scalar";
        case Isa::AVX2: return "avx2";
        case Isa::AVX512: return "avx512";
    }
    return "?";
}

bool parse_isa(const char* name, Isa* out) {
    const std::string s(name ? name : "");
    if (s == "scalar" || s == "generic") *out = Isa::Scalar;
    else if (s == "avx2") *out = Isa::AVX2;
    else if (s == "avx512") *out = Isa::AVX512;
    else return false;
    return true;
}

bool cpu_supports(Isa isa) {
    static const bool ok[3] = {true, detect(Isa::AVX2), detect(Isa::AVX512)};
    const int i = static_cast<int>(isa);
    return i >= 0 && i < 3 && ok[i];
}

Isa active_isa() {
    const int o = g_override.load(std::memory_order_relaxed);
    if (o >= 0) return static_cast<Isa>(o);
    const char* env = std::getenv("SEMISAM_ISA");
    if (env && *env && std::string(env) != "auto") {
        Isa want;
        if (!parse_isa(env, &want))
            throw std::invalid_argument(std::string("SEMISAM_ISA: expected scalar, avx2, avx512 "
                                                    "or auto, got '") +
                                        env + "'");
        return best_supported(want);
    }
    return best_supported(Isa::AVX512);
}

void set_isa_override(bool on, Isa isa) {
    if (!on) {
        g_override.store(-1);
        return;
    }
    if (!cpu_supports(isa))
        throw std::invalid_argument(std::string("isa: this CPU cannot run the ") +
                                    isa_name(isa) + " kernels");
    g_override.store(static_cast<int>(isa));
}

bool cpu_has_avx2_fma_f16c() { return active_isa() >= Isa::AVX2; }

void force_generic_kernels(bool on) { set_isa_override(on, Isa::Scalar); }

}  // namespace semisam
