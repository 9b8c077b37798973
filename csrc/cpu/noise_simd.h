// SIMD generator of the noise stream (layout version 3) for one ISA: W Philox calls per
// vector (lane l = call j0 + l), then uniform24, the branch-free log and the
// quadrant-reduced sincos of elementwise.h operation for operation on W lanes (their
// polynomials are elementwise.h's log_poly / sincos_poly themselves), and a
// 4 x W transpose so the 4W normals land in element order. kV vectors are generated
// together (interleaved rounds) for instruction-level parallelism.
//
// Included by exactly one translation unit per ISA (loops_avx2.cpp, loops_avx512.cpp)
// after `#pragma GCC target(...)`, with a traits struct S that provides the vector types
// and the few operations GCC's vector extensions do not express:
//   S::W                          lanes (8 or 16)
//   S::U / S::I / S::F            uint32 / int32 / float vectors of W lanes
//   S::mulhilo(U a, uint32_t m, U& hi, U& lo)   32x32 -> 64 products, per lane
//   S::sqrt(F)                    IEEE sqrt (correctly rounded, as __builtin_sqrtf)
//   S::store4(float* out, F z0, F z1, F z2, F z3)  out[4l + q] = zq[l]
// Every other operation is a GCC vector-extension operator, lane-wise the same IEEE
// operation as the scalar code (-ffp-contract=off: no FMA contraction).
#pragma once
#include <stdint.h>
#include <string.h>

#include "fused_flat/elementwise.h"
#include "loops.h"

namespace fused_flat {
namespace cpu {

template <class S>
struct SimdNoise {
  using U = typename S::U;
  using I = typename S::I;
  using F = typename S::F;
  static constexpr int W = S::W;
  // Vectors of calls in flight per block: 4 measured fastest on AVX-512 and AVX2 (2 and 3
  // slower; with AVX-512 one block is then exactly one chunk of loops.h).
  static constexpr int kV = 4;

  // Philox4x32-10 of V independent vectors of calls, round by round: V times the
  // instruction-level parallelism of one vector (each round's products wait on the last).
  // pf: lines [l0, l1) of the next chunk (loops.h Prefetch), a tenth of them after each
  // round, so that they reach the line-fill buffers at the pace the compute allows.
  template <int V>
  static inline __attribute__((always_inline)) void philox_n(U (&c0)[V], U (&c1)[V], U (&c2)[V],
                                                             U (&c3)[V], uint32_t k0, uint32_t k1,
                                                             const Prefetch* pf = nullptr,
                                                             int l0 = 0, int l1 = 0) {
#pragma GCC unroll 10
    for (int round = 0; round < 10; ++round) {
      U hi0[V], lo0[V], hi1[V], lo1[V];
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) S::mulhilo(c0[v], kPhiloxM0, hi0[v], lo0[v]);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) S::mulhilo(c2[v], kPhiloxM1, hi1[v], lo1[v]);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) {
        c0[v] = hi1[v] ^ c1[v] ^ k0;
        c2[v] = hi0[v] ^ c3[v] ^ k1;
        c1[v] = lo1[v];
        c3[v] = lo0[v];
      }
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
      if (pf) pf->issue(l0 + round * (l1 - l0) / 10, l0 + (round + 1) * (l1 - l0) / 10);
    }
  }

  static inline __attribute__((always_inline)) F uniform24(U x) {
    const I v = (I)(x >> 8);
    return (__builtin_convertvector(v, F) + 0.5f) * 5.9604644775390625e-08f;
  }

  // elementwise.h log_unit / sincos_2pi lane-wise: the same reductions around the same
  // polynomials (log_poly, sincos_poly, instantiated for the vector types).
  static inline __attribute__((always_inline)) F log_unit(F x) {
    const U bits = (U)x;
    I e = (I)((bits >> 23) & 0xffu) - 126;
    F m = (F)((bits & 0x007fffffu) | 0x3f000000u);
    const I small = m < 0.707106781186547524f;   // -1 where true
    e = e + small;
    m = small ? (m + m) - 1.0f : m - 1.0f;
    return log_poly(m, __builtin_convertvector(e, F));
  }

  static inline __attribute__((always_inline)) void sincos_2pi(F u, F& c, F& s) {
    const F v = 4.0f * u;
    const I q = __builtin_convertvector(v + 0.5f, I);   // truncation, v + 0.5 >= 0
    const F a = (v - __builtin_convertvector(q, F)) * 1.57079632679489662f;
    sincos_poly(a, (I)(q & 3), c, s);
  }

  static inline __attribute__((always_inline)) void box_muller(U a, U b, F& c, F& s) {
    const F r = S::sqrt(-2.0f * log_unit(uniform24(a)));
    F ct, st;
    sincos_2pi(uniform24(b), ct, st);
    c = r * ct;
    s = r * st;
  }

  // The V W calls j0 .. j0 + V W - 1 as V interleaved vectors (no 2^32 wrap of j_lo inside:
  // checked by the caller): their normals (kNormals) and / or their words (kWords, the same
  // 4 x W transpose on the bit patterns), both in element order.
  template <int V, bool kNormals, bool kWords>
  static inline __attribute__((always_inline)) void block_n(PhiloxKey key, uint32_t step_lo,
                                                            uint32_t tag, int64_t j0,
                                                            float* __restrict__ out,
                                                            uint32_t* __restrict__ wout,
                                                            const Prefetch* pf = nullptr,
                                                            int l0 = 0, int l1 = 0) {
    const uint64_t uj = static_cast<uint64_t>(j0);
    U lane;
    for (int l = 0; l < W; ++l) lane[l] = static_cast<uint32_t>(l);
    U c0[V], c1[V], c2[V], c3[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      c0[v] = lane + static_cast<uint32_t>(uj + static_cast<uint64_t>(v * W));
      c1[v] = lane * 0u + static_cast<uint32_t>(uj >> 32);
      c2[v] = lane * 0u + step_lo;
      c3[v] = lane * 0u + (tag | key.bucket_word);   // noise_words' counter word 3
    }
    philox_n<V>(c0, c1, c2, c3, key.k0, key.k1, pf, l0, l1);
    if (kWords) {
      alignas(64) float tmp[4 * V * W];
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) S::store4(tmp + 4 * v * W, (F)c0[v], (F)c1[v], (F)c2[v], (F)c3[v]);
      memcpy(wout, tmp, sizeof(tmp));
    }
    if (kNormals) {
      F z0[V], z1[V], z2[V], z3[V];
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) box_muller(c0[v], c1[v], z0[v], z1[v]);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) box_muller(c2[v], c3[v], z2[v], z3[v]);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) S::store4(out + 4 * v * W, z0[v], z1[v], z2[v], z3[v]);
    }
  }

  template <bool kNormals, bool kWords>
  FF_HD void run(PhiloxKey key, int64_t step, uint32_t tag, int64_t j0, int64_t n,
                 float* __restrict__ out, uint32_t* __restrict__ w, const Prefetch* pf) {
    const uint32_t step_lo = static_cast<uint32_t>(static_cast<uint64_t>(step));
    // the prefetch lines, split evenly over the full blocks (the rest, if the loop below
    // ends early, are left to the hardware)
    const int64_t nb = n / (kV * W);
    const int ls = pf ? pf->lines : 0;
    int64_t k = 0;
    for (int64_t b = 0; k + kV * W <= n; k += kV * W, ++b) {
      const uint32_t lo = static_cast<uint32_t>(static_cast<uint64_t>(j0 + k));
      if (lo > 0xFFFFFFFFu - (kV * W - 1)) break;   // j_lo wraps in here: the loop below
      block_n<kV, kNormals, kWords>(key, step_lo, tag, j0 + k, kNormals ? out + 4 * k : out,
                                    kWords ? w + 4 * k : w, pf,
                                    static_cast<int>(b * ls / nb),
                                    static_cast<int>((b + 1) * ls / nb));
    }
    if (pf && nb == 0) pf->issue(0, pf->lines);   // a chunk shorter than one block
    for (; k + W <= n; k += W) {
      const uint32_t lo = static_cast<uint32_t>(static_cast<uint64_t>(j0 + k));
      if (lo > 0xFFFFFFFFu - (W - 1)) {   // j_lo wraps inside this vector: portable calls
        tail<kNormals, kWords>(key, step, tag, j0 + k, W, out, w, k);
      } else {
        block_n<1, kNormals, kWords>(key, step_lo, tag, j0 + k, kNormals ? out + 4 * k : out,
                                     kWords ? w + 4 * k : w);
      }
    }
    if (k < n) tail<kNormals, kWords>(key, step, tag, j0 + k, n - k, out, w, k);
  }

  template <bool kNormals, bool kWords>
  static inline __attribute__((always_inline)) void tail(PhiloxKey key, int64_t step,
                                                         uint32_t tag, int64_t j, int64_t n,
                                                         float* out, uint32_t* w, int64_t k) {
    PortableNoise::run<kNormals, kWords>(key, step, tag, j, n, kNormals ? out + 4 * k : out,
                                         kWords ? w + 4 * k : w, nullptr);
  }

  // out[4 (j - j0) + q] = z(tag, 4j + q), j in [j0, j0 + n).
  static void normals(PhiloxKey key, int64_t step, uint32_t tag, int64_t j0, int64_t n,
                      float* __restrict__ out, const Prefetch* pf = nullptr) {
    run<true, false>(key, step, tag, j0, n, out, nullptr, pf);
  }
  // ... and w[4 (j - j0) + q] = w(tag, 4j + q) = x_q of call j.
  static void normals_words(PhiloxKey key, int64_t step, uint32_t tag, int64_t j0, int64_t n,
                            float* __restrict__ out, uint32_t* __restrict__ w,
                            const Prefetch* pf = nullptr) {
    run<true, true>(key, step, tag, j0, n, out, w, pf);
  }
  static void words(PhiloxKey key, int64_t step, uint32_t tag, int64_t j0, int64_t n,
                    uint32_t* __restrict__ w, const Prefetch* pf = nullptr) {
    run<false, true>(key, step, tag, j0, n, nullptr, w, pf);
  }
};

}  // namespace cpu
}  // namespace fused_flat
