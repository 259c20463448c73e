// IEEE 754 binary16 -> binary32, shared by the CPU core (common.hpp) and the CUDA
// kernels (cuda/kernels.cuh): a __host__ __device__ function under nvcc.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SEMISAM_HD __host__ __device__ inline
#else
#define SEMISAM_HD inline
#endif

namespace semisam {

// Exact; handles subnormals, inf and NaN.
SEMISAM_HD float half_bits_to_float(uint16_t h) {
    uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1Fu;
    uint32_t mant = h & 0x3FFu;
    uint32_t bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else {  // subnormal: normalise
            int e = -1;
            do {
                mant <<= 1;
                ++e;
            } while ((mant & 0x400u) == 0);
            mant &= 0x3FFu;
            bits = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | (mant << 13);
        }
    } else if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (mant << 13);
    } else {
        bits = sign | ((exp + (127 - 15)) << 23) | (mant << 13);
    }
    union {
        uint32_t u;
        float f;
    } cvt;  // type punning through a union: defined by GCC, Clang and nvcc
    cvt.u = bits;
    return cvt.f;
}

}  // namespace semisam
