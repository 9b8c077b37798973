// The CPU loops of loops.h with the SIMD noise generator (noise_simd.h) compiled for
// AVX2: 8 Philox calls per 256-bit vector. kernels_cpu.cpp calls these only when the CPU
// reports AVX2 at run time, so the extension still runs on any x86-64 CPU (no
// -march=native). FMA is not enabled: -ffp-contract=off and no fma target keep every
// operation the scalar one.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx2")
#define FF_HAVE_AVX2_LOOPS 1
#include <immintrin.h>
#endif
#include "loops.h"

#if FF_HAVE_AVX2_LOOPS
#include "noise_simd.h"

namespace fused_flat {
namespace cpu {
namespace {

struct Avx2 {
  static constexpr int W = 8;
  typedef uint32_t U __attribute__((vector_size(32)));
  typedef int32_t I __attribute__((vector_size(32)));
  typedef float F __attribute__((vector_size(32)));

  static inline __attribute__((always_inline)) void mulhilo(U a, uint32_t m, U& hi, U& lo) {
    const __m256i va = (__m256i)a;
    const __m256i vm = _mm256_set1_epi32(static_cast<int>(m));
    const __m256i pe = _mm256_mul_epu32(va, vm);                          // lanes 0,2,4,6
    const __m256i po = _mm256_mul_epu32(_mm256_srli_epi64(va, 32), vm);   // lanes 1,3,5,7
    lo = (U)_mm256_blend_epi32(pe, _mm256_slli_epi64(po, 32), 0xAA);
    hi = (U)_mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA);
  }
  static inline __attribute__((always_inline)) F sqrt(F x) { return (F)_mm256_sqrt_ps((__m256)x); }
  static inline __attribute__((always_inline)) void store4(float* out, F z0, F z1, F z2, F z3) {
    const __m256 t0 = _mm256_unpacklo_ps((__m256)z0, (__m256)z1);
    const __m256 t1 = _mm256_unpackhi_ps((__m256)z0, (__m256)z1);
    const __m256 t2 = _mm256_unpacklo_ps((__m256)z2, (__m256)z3);
    const __m256 t3 = _mm256_unpackhi_ps((__m256)z2, (__m256)z3);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44);   // calls 0 | 4
    const __m256 u1 = _mm256_shuffle_ps(t0, t2, 0xEE);   // calls 1 | 5
    const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44);   // calls 2 | 6
    const __m256 u3 = _mm256_shuffle_ps(t1, t3, 0xEE);   // calls 3 | 7
    _mm256_storeu_ps(out + 0, _mm256_permute2f128_ps(u0, u1, 0x20));
    _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(u2, u3, 0x20));
    _mm256_storeu_ps(out + 16, _mm256_permute2f128_ps(u0, u1, 0x31));
    _mm256_storeu_ps(out + 24, _mm256_permute2f128_ps(u2, u3, 0x31));
  }
};

}  // namespace

bool avx2_compiled() { return true; }
IsaLoops loops_avx2() { return IsaLoopsOf<SimdNoise<Avx2>>::table(); }

}  // namespace cpu
}  // namespace fused_flat

#else
namespace fused_flat {
namespace cpu {
bool avx2_compiled() { return false; }
IsaLoops loops_avx2() { return loops_baseline(); }
}  // namespace cpu
}  // namespace fused_flat
#endif
