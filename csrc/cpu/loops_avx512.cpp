// The CPU loops of loops.h with the SIMD noise generator (noise_simd.h) compiled for
// AVX-512 (F + DQ + BW + VL): 16 Philox calls per 512-bit vector. Picked at run time when
// the CPU has AVX-512; no FMA (-ffp-contract=off), so the results are the scalar bits.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2")
#define FF_HAVE_AVX512_LOOPS 1
// GCC 12 warns on the _mm512_undefined_* inside its own intrinsics (GCC bug 105593)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#endif
#include "loops.h"

#if FF_HAVE_AVX512_LOOPS
#include "noise_simd.h"

namespace fused_flat {
namespace cpu {
namespace {

struct Avx512 {
  static constexpr int W = 16;
  typedef uint32_t U __attribute__((vector_size(64)));
  typedef int32_t I __attribute__((vector_size(64)));
  typedef float F __attribute__((vector_size(64)));

  static inline __attribute__((always_inline)) void mulhilo(U a, uint32_t m, U& hi, U& lo) {
    const __m512i va = (__m512i)a;
    const __m512i vm = _mm512_set1_epi32(static_cast<int>(m));
    const __m512i pe = _mm512_mul_epu32(va, vm);                          // even lanes
    const __m512i po = _mm512_mul_epu32(_mm512_srli_epi64(va, 32), vm);   // odd lanes
    // one merge-masked in-lane shuffle per half instead of a shift and a blend:
    // lo = (pe.lo, po.lo) per 64-bit pair, hi = (pe.hi, po.hi)
    lo = (U)_mm512_mask_shuffle_epi32(pe, 0xAAAA, po, _MM_PERM_CCAA);
    hi = (U)_mm512_mask_shuffle_epi32(po, 0x5555, pe, _MM_PERM_DDBB);
  }
  static inline __attribute__((always_inline)) F sqrt(F x) { return (F)_mm512_sqrt_ps((__m512)x); }
  static inline __attribute__((always_inline)) void store4(float* out, F z0, F z1, F z2, F z3) {
    const __m512 t0 = _mm512_unpacklo_ps((__m512)z0, (__m512)z1);
    const __m512 t1 = _mm512_unpackhi_ps((__m512)z0, (__m512)z1);
    const __m512 t2 = _mm512_unpacklo_ps((__m512)z2, (__m512)z3);
    const __m512 t3 = _mm512_unpackhi_ps((__m512)z2, (__m512)z3);
    const __m512 u0 = _mm512_shuffle_ps(t0, t2, 0x44);   // calls 0 | 4 | 8 | 12
    const __m512 u1 = _mm512_shuffle_ps(t0, t2, 0xEE);   // calls 1 | 5 | 9 | 13
    const __m512 u2 = _mm512_shuffle_ps(t1, t3, 0x44);   // calls 2 | 6 | 10 | 14
    const __m512 u3 = _mm512_shuffle_ps(t1, t3, 0xEE);   // calls 3 | 7 | 11 | 15
    const __m512 a = _mm512_shuffle_f32x4(u0, u1, 0x44);  // 0 4 1 5
    const __m512 b = _mm512_shuffle_f32x4(u2, u3, 0x44);  // 2 6 3 7
    const __m512 c = _mm512_shuffle_f32x4(u0, u1, 0xEE);  // 8 12 9 13
    const __m512 d = _mm512_shuffle_f32x4(u2, u3, 0xEE);  // 10 14 11 15
    _mm512_storeu_ps(out + 0, _mm512_shuffle_f32x4(a, b, 0x88));   // 0 1 2 3
    _mm512_storeu_ps(out + 16, _mm512_shuffle_f32x4(a, b, 0xDD));  // 4 5 6 7
    _mm512_storeu_ps(out + 32, _mm512_shuffle_f32x4(c, d, 0x88));  // 8 9 10 11
    _mm512_storeu_ps(out + 48, _mm512_shuffle_f32x4(c, d, 0xDD));  // 12 13 14 15
  }
};

}  // namespace

bool avx512_compiled() { return true; }
IsaLoops loops_avx512() { return IsaLoopsOf<SimdNoise<Avx512>>::table(); }

}  // namespace cpu
}  // namespace fused_flat

#else
namespace fused_flat {
namespace cpu {
bool avx512_compiled() { return false; }
IsaLoops loops_avx512() { return loops_baseline(); }
}  // namespace cpu
}  // namespace fused_flat
#endif
