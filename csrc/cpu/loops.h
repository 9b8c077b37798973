// The CPU inner loops over whole Philox calls [j0, j1) of a bucket slice (noise layout
// version 3: call j serves elements 4j .. 4j+3 of one tag), templated on the storage type
// and on the noise generator.
//
// Each loop works in chunks of kChunkCalls calls: the generator writes the chunk's
// normals z(tag, 4j + q) into a small stack buffer in element order (L1-resident), then
// a plain element loop applies the pass. The generator is either the portable one below
// (elementwise.h, one call at a time) or a SIMD one (noise_simd.h, 8 or 16 calls per
// vector, compiled for AVX2 / AVX-512 in their own translation units and picked at run
// time). Both perform the same IEEE operations in the same order (-ffp-contract=off), so
// every ISA gives the same bits. No torch headers here: a TU built for another ISA must
// not emit torch's inline functions (16-bit types are the layout-compatible bf16_t /
// the caller's c10 types, converted by to_acc / from_acc).
#pragma once
#include <stdint.h>
#include <string.h>

#include "fused_flat/elementwise.h"

namespace fused_flat {
namespace cpu {

constexpr int64_t kChunkCalls = 64;                 // 256 elements per chunk
constexpr int64_t kChunkElems = 4 * kChunkCalls;

// bfloat16 storage, layout-compatible with c10::BFloat16; conversions exactly as c10's
// (exact widening; round-to-nearest-even narrowing, NaN -> 0x7FC0).
struct bf16_t {
  uint16_t x;
};

template <typename acc_t, typename scalar_t>
static inline __attribute__((always_inline)) acc_t to_acc(scalar_t v) {
  return static_cast<acc_t>(v);
}
template <typename scalar_t, typename acc_t>
static inline __attribute__((always_inline)) scalar_t from_acc(acc_t v) {
  return static_cast<scalar_t>(v);
}
template <>
inline __attribute__((always_inline)) float to_acc<float, bf16_t>(bf16_t v) {
  return bits_float(static_cast<uint32_t>(v.x) << 16);
}
template <>
inline __attribute__((always_inline)) bf16_t from_acc<bf16_t, float>(float v) {
  const uint32_t u = float_bits(v);
  const uint32_t r = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
  bf16_t b;
  b.x = static_cast<uint16_t>(v != v ? 0x7FC0u : r);
  return b;
}

// Format of a 16-bit storage type for stochastic rounding: 1 bf16, 2 fp16, 0 other
// (c10::BFloat16 / c10::Half are specialized in kernels_cpu.cpp, the only TU that sees them).
template <typename T>
struct Fmt16 {
  static constexpr int kind = 0;
};
template <>
struct Fmt16<bf16_t> {
  static constexpr int kind = 1;
};

// The stored value of an fp32/fp64 result: stochastically rounded with rbits (elementwise.h
// sr_bf16_bits / sr_fp16_bits) for a 16-bit type when kSR, else round-to-nearest.
template <typename scalar_t, typename acc_t, bool kSR>
static inline __attribute__((always_inline)) scalar_t store_rounded(acc_t v, uint32_t rbits) {
  if constexpr (kSR && Fmt16<scalar_t>::kind != 0) {
    const uint16_t h = Fmt16<scalar_t>::kind == 1 ? sr_bf16_bits(static_cast<float>(v), rbits)
                                                  : sr_fp16_bits(static_cast<float>(v), rbits);
    scalar_t out;
    memcpy(&out, &h, sizeof(h));
    return out;
  } else {
    (void)rbits;
    return from_acc<scalar_t, acc_t>(v);
  }
}

// Anonymous namespace: each ISA translation unit gets its own copies of the inline code
// below (no COMDAT sharing between a baseline and an AVX-512 build of one function).
namespace {

// The next chunk's cache lines (up to 3 streams of one element type), prefetched while
// this chunk's noise is generated: the generation is compute-bound and makes no memory
// accesses, so the hardware prefetchers see no stream to follow during it. A SIMD
// generator spreads the lines over its Philox rounds (a burst of them at the chunk's start
// fills the core's line-fill buffers, and the compute behind the waiting prefetches
// stalls: measured 1.5 ms of 11 on the 16M restore + check pass); the portable one issues
// them all first. Prefetches never fault and change no result.
struct Prefetch {
  const char* w[2] = {nullptr, nullptr};   // streams written (the parameter, the momentum)
  const char* r = nullptr;                 // the stream read (the gradient)
  int nw = 0;
  int lines = 0;   // cache lines per stream
  template <typename T>
  inline __attribute__((always_inline)) void add_written(const T* q) {
    w[nw++] = reinterpret_cast<const char*>(q);
    lines = static_cast<int>(kChunkElems * static_cast<int64_t>(sizeof(T)) / 64);
  }
  template <typename T>
  inline __attribute__((always_inline)) void add_read(const T* q) {
    r = reinterpret_cast<const char*>(q);
    lines = static_cast<int>(kChunkElems * static_cast<int64_t>(sizeof(T)) / 64);
  }
  // Lines [l0, l1) of every stream.
  inline __attribute__((always_inline)) void issue(int l0, int l1) const {
    for (int l = l0; l < l1; ++l) {
      if (nw > 0) __builtin_prefetch(w[0] + 64 * l, 1, 3);
      if (nw > 1) __builtin_prefetch(w[1] + 64 * l, 1, 3);
      if (r) __builtin_prefetch(r + 64 * l, 0, 3);
    }
  }
};

// The portable generator: out[4 (j - j0) + q] = z(tag, 4j + q) for j in [j0, j0 + n)
// (kNormals) and / or the words w[4 (j - j0) + q] = w(tag, 4j + q) = x_q of call j (kWords),
// one call at a time.
struct PortableNoise {
  template <bool kNormals, bool kWords>
  FF_HD void run(PhiloxKey key, int64_t step, uint32_t tag, int64_t j0, int64_t n,
                 float* __restrict__ out, uint32_t* __restrict__ w, const Prefetch* pf) {
    if (pf) pf->issue(0, pf->lines);
    for (int64_t k = 0; k < n; ++k) {
      const Words4 x = noise_words(key, j0 + k, step, tag);
      if (kNormals) call_normals(x, out[4 * k], out[4 * k + 1], out[4 * k + 2], out[4 * k + 3]);
      if (kWords) memcpy(w + 4 * k, &x, sizeof(x));   // x0 .. x3 in order
    }
  }
  static inline __attribute__((always_inline)) void normals(PhiloxKey key, int64_t step,
                                                            uint32_t tag, int64_t j0, int64_t n,
                                                            float* __restrict__ out,
                                                            const Prefetch* pf = nullptr) {
    run<true, false>(key, step, tag, j0, n, out, nullptr, pf);
  }
  static inline __attribute__((always_inline)) void normals_words(
      PhiloxKey key, int64_t step, uint32_t tag, int64_t j0, int64_t n, float* __restrict__ out,
      uint32_t* __restrict__ w, const Prefetch* pf = nullptr) {
    run<true, true>(key, step, tag, j0, n, out, w, pf);
  }
  static inline __attribute__((always_inline)) void words(PhiloxKey key, int64_t step,
                                                          uint32_t tag, int64_t j0, int64_t n,
                                                          uint32_t* __restrict__ w,
                                                          const Prefetch* pf = nullptr) {
    run<false, true>(key, step, tag, j0, n, nullptr, w, pf);
  }
};

// The walk of every loop below: the calls [j0, j1) of a slice in chunks of kChunkCalls.
// Chunk at jc: calls [jc, jc + nc), slice elements [base, base + 4 nc); when another chunk
// follows, it starts at slice element next (its lines are prefetched during this chunk's
// noise generation).
struct Chunk {
  int64_t nc, base, next;
  bool has_next;
};
static inline __attribute__((always_inline)) Chunk chunk_at(int64_t jc, int64_t j1,
                                                            int64_t offset) {
  const bool more = jc + kChunkCalls < j1;
  return Chunk{more ? kChunkCalls : j1 - jc, 4 * jc - offset, 4 * (jc + kChunkCalls) - offset,
               more};
}

// theta <- theta + sigma * z(tag) over the whole calls [j0, j1); p is element 0 of the
// slice, whose bucket index is offset.
// kCheck (the restore half of a checked step, sigma = minus the perturbation's): also
// returns whether any word of gbits (the gradient's bit patterns, the same elements; fp32)
// is inf/NaN. The gradient read overlaps the noise generation, so the finiteness check
// costs no pass of its own.
template <typename scalar_t, typename acc_t, typename Gen, bool kCheck = false>
static bool perturb_calls(scalar_t* __restrict__ p, int64_t j0, int64_t j1, int64_t offset,
                          PhiloxKey key, int64_t step, uint32_t tag, acc_t sigma,
                          const uint32_t* __restrict__ gbits = nullptr) {
  static_assert(!kCheck || sizeof(scalar_t) == 4, "the finiteness check reads fp32 words");
  alignas(64) float z[kChunkElems];
  uint32_t bad = 0;
  for (int64_t jc = j0; jc < j1; jc += kChunkCalls) {
    const Chunk c = chunk_at(jc, j1, offset);
    Prefetch pf;
    if (c.has_next) pf.add_written(p + c.next);
    if (kCheck && c.has_next) pf.add_read(gbits + c.next);
    Gen::normals(key, step, tag, jc, c.nc, z, &pf);
    scalar_t* __restrict__ q = p + c.base;
    const uint32_t* __restrict__ gb = kCheck ? gbits + c.base : gbits;
    for (int64_t e = 0; e < 4 * c.nc; ++e) {
      q[e] = from_acc<scalar_t, acc_t>(to_acc<acc_t>(q[e]) + sigma * static_cast<acc_t>(z[e]));
      if (kCheck) bad |= static_cast<uint32_t>((gb[e] & 0x7F800000u) == 0x7F800000u);
    }
  }
  return bad != 0;
}

template <typename scalar_t, typename acc_t, bool kMom, bool kSR = false>
static inline __attribute__((always_inline)) void update_one(
    scalar_t* __restrict__ p, const scalar_t* __restrict__ g, scalar_t* __restrict__ m,
    int64_t i, float e, float x, const StepArgs<acc_t>& a, uint32_t rbits = 0) {
  acc_t mm = kMom ? to_acc<acc_t>(m[i]) : acc_t(0);
  const acc_t th = langevin_update<kMom>(to_acc<acc_t>(p[i]), to_acc<acc_t>(g[i]), &mm,
                                         static_cast<acc_t>(e), static_cast<acc_t>(x), a);
  p[i] = store_rounded<scalar_t, acc_t, kSR>(th, rbits);
  if (kMom) m[i] = from_acc<scalar_t, acc_t>(mm);
}

template <typename scalar_t, typename acc_t, typename Gen, bool kMom, bool kEps, bool kXi,
          bool kNesterov, bool kInit, bool kSR>
static void update_calls_fixed(scalar_t* __restrict__ p, const scalar_t* __restrict__ g,
                               scalar_t* __restrict__ m, int64_t j0, int64_t j1, int64_t offset,
                               PhiloxKey key, int64_t step, uint32_t restore_tag,
                               const StepArgs<acc_t>& args) {
  // A local copy whose flags are compile-time constants: the branches of langevin_update
  // fold away and the element loop vectorizes.
  StepArgs<acc_t> a = args;
  a.nesterov = kNesterov;
  a.momentum_init = kInit;
  alignas(64) float e[kChunkElems];
  alignas(64) float x[kChunkElems];
  // Stochastic rounding: the words of tag 0 and tag 32 (reused from the eps / xi calls
  // when the pass makes them; otherwise generated for the rbits alone).
  alignas(64) uint32_t w0[kSR ? kChunkElems : 1];
  alignas(64) uint32_t w32[kSR ? kChunkElems : 1];
  for (int64_t jc = j0; jc < j1; jc += kChunkCalls) {
    const Chunk c = chunk_at(jc, j1, offset);
    const int64_t nc = c.nc;
    Prefetch pf;
    if (c.has_next) {
      pf.add_written(p + c.next);
      pf.add_read(g + c.next);
      if (kMom) pf.add_written(m + c.next);
    }
    // the lines go with the chunk's first generator call
    if constexpr (kSR) {
      if (kEps && restore_tag == kTagEps) {
        Gen::normals_words(key, step, restore_tag, jc, nc, e, w0, &pf);
      } else {
        if (kEps) Gen::normals(key, step, restore_tag, jc, nc, e, &pf);
        Gen::words(key, step, kTagEps, jc, nc, w0, kEps ? nullptr : &pf);
      }
      if (kXi) Gen::normals_words(key, step, kTagXi, jc, nc, x, w32);
      else Gen::words(key, step, kTagXi, jc, nc, w32);
    } else {
      if (kEps) Gen::normals(key, step, restore_tag, jc, nc, e, &pf);
      if (kXi) Gen::normals(key, step, kTagXi, jc, nc, x, kEps ? nullptr : &pf);
      if (!kEps && !kXi) pf.issue(0, pf.lines);
    }
    const int64_t base = c.base;
    const int64_t ne = 4 * nc;
    for (int64_t k = 0; k < ne; ++k) {
      const uint32_t rb = kSR ? sr_bits_of(w0[kSR ? k : 0], w32[kSR ? k : 0]) : 0u;
      update_one<scalar_t, acc_t, kMom, kSR>(p + base, g + base, kMom ? m + base : m, k,
                                             kEps ? e[k] : 0.0f, kXi ? x[k] : 0.0f, a, rb);
    }
  }
}

template <typename scalar_t, typename acc_t, typename Gen, bool kMom, bool kEps, bool kXi,
          bool kSR>
static void update_calls(scalar_t* __restrict__ p, const scalar_t* __restrict__ g,
                         scalar_t* __restrict__ m, int64_t j0, int64_t j1, int64_t offset,
                         PhiloxKey key, int64_t step, uint32_t restore_tag,
                         const StepArgs<acc_t>& a) {
#define FF_FIXED(NEST, INIT)                                                                 \
  update_calls_fixed<scalar_t, acc_t, Gen, kMom, kEps, kXi, NEST, INIT, kSR>(                \
      p, g, m, j0, j1, offset, key, step, restore_tag, a)
  if (!kMom) {
    FF_FIXED(false, false);
  } else if (a.momentum_init) {
    if (a.nesterov) FF_FIXED(true, true);
    else FF_FIXED(false, true);
  } else {
    if (a.nesterov) FF_FIXED(true, false);
    else FF_FIXED(false, false);
  }
#undef FF_FIXED
}

// Variant index of update_calls: bit 0 momentum, bit 1 eps, bit 2 xi, bit 3 stochastic
// rounding (16-bit storage only; ignored for fp32/fp64).
template <typename scalar_t, typename acc_t, typename Gen>
static void update_calls_dispatch(int variant, scalar_t* p, const scalar_t* g, scalar_t* m,
                                  int64_t j0, int64_t j1, int64_t offset, PhiloxKey key,
                                  int64_t step, uint32_t restore_tag, const StepArgs<acc_t>& a) {
  constexpr bool kCanSR = Fmt16<scalar_t>::kind != 0;
  if (!kCanSR) variant &= 7;
#define FF_CASE(V, MOM, EPS, XI, SR)                                                         \
  case V:                                                                                    \
    update_calls<scalar_t, acc_t, Gen, MOM, EPS, XI, SR && kCanSR>(p, g, m, j0, j1, offset,  \
                                                                  key, step, restore_tag, a); \
    break;
  switch (variant) {
    FF_CASE(0, false, false, false, false)
    FF_CASE(1, true, false, false, false)
    FF_CASE(2, false, true, false, false)
    FF_CASE(3, true, true, false, false)
    FF_CASE(4, false, false, true, false)
    FF_CASE(5, true, false, true, false)
    FF_CASE(6, false, true, true, false)
    FF_CASE(7, true, true, true, false)
    FF_CASE(8, false, false, false, true)
    FF_CASE(9, true, false, false, true)
    FF_CASE(10, false, true, false, true)
    FF_CASE(11, true, true, false, true)
    FF_CASE(12, false, false, true, true)
    FF_CASE(13, true, false, true, true)
    FF_CASE(14, false, true, true, true)
    FF_CASE(15, true, true, true, true)
  }
#undef FF_CASE
}

}  // namespace

// Noise roofline: generates z(tag_t, .) of calls [j0, j1) for each of n_tags tags into an
// L1-resident buffer, no parameter traffic; returns a checksum so nothing is elided.
template <typename Gen>
static float noise_only_calls(int64_t j0, int64_t j1, PhiloxKey key, int64_t step,
                              const uint32_t* tags, int n_tags) {
  alignas(64) float z[kChunkElems];
  float acc = 0.0f;
  for (int64_t jc = j0; jc < j1; jc += kChunkCalls) {
    const int64_t nc = chunk_at(jc, j1, 0).nc;
    for (int t = 0; t < n_tags; ++t) {
      Gen::normals(key, step, tags[t], jc, nc, z);
      acc += z[0];
    }
  }
  return acc;
}

// Whether any element is inf/nan: its exponent bits (mask) all set. Fixed blocks, each a
// branch-free OR-reduction the compiler vectorizes; stops after the first bad block.
template <typename word_t>
static bool any_nonfinite_words(const word_t* __restrict__ p, int64_t n, word_t mask) {
  constexpr int64_t kBlock = 8192;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = n - b < kBlock ? n : b + kBlock;
    word_t acc = 0;
    for (int64_t i = b; i < e; ++i) acc |= static_cast<word_t>((p[i] & mask) == mask);
    if (acc) return true;
  }
  return false;
}

// The entry points of one ISA's loops (fp32, fp64, bf16; fp16 stays on the baseline).
struct IsaLoops {
  void (*normals)(PhiloxKey key, int64_t step, uint32_t tag, int64_t j0, int64_t n, float* out);
  void (*perturb_f32)(float* p, int64_t j0, int64_t j1, int64_t offset, PhiloxKey key,
                      int64_t step, uint32_t tag, float sigma);
  void (*perturb_bf16)(bf16_t* p, int64_t j0, int64_t j1, int64_t offset, PhiloxKey key,
                       int64_t step, uint32_t tag, float sigma);
  void (*update_f32)(int variant, float* p, const float* g, float* m, int64_t j0, int64_t j1,
                     int64_t offset, PhiloxKey key, int64_t step, uint32_t restore_tag,
                     const StepArgs<float>& a);
  void (*update_bf16)(int variant, bf16_t* p, const bf16_t* g, bf16_t* m, int64_t j0,
                      int64_t j1, int64_t offset, PhiloxKey key, int64_t step,
                      uint32_t restore_tag, const StepArgs<float>& a);
  float (*noise_only)(int64_t j0, int64_t j1, PhiloxKey key, int64_t step, const uint32_t* tags,
                      int n_tags);
  bool (*any_nonfinite32)(const uint32_t* p, int64_t n, uint32_t mask);
  bool (*any_nonfinite16)(const uint16_t* p, int64_t n, uint32_t mask);
  bool (*any_nonfinite64)(const uint64_t* p, int64_t n);
  bool (*perturb_check_f32)(float* p, const uint32_t* gbits, int64_t j0, int64_t j1,
                            int64_t offset, PhiloxKey key, int64_t step, uint32_t tag, float sigma);
};

namespace {
// Defines the IsaLoops of a generator (used once per ISA translation unit).
template <typename Gen>
struct IsaLoopsOf {
  static void normals(PhiloxKey key, int64_t step, uint32_t tag, int64_t j0, int64_t n,
                      float* out) {
    // Whole chunks through the generator (its tail handling covers any n).
    Gen::normals(key, step, tag, j0, n, out);
  }
  static void perturb_f32(float* p, int64_t j0, int64_t j1, int64_t offset, PhiloxKey key,
                          int64_t step, uint32_t tag, float sigma) {
    perturb_calls<float, float, Gen>(p, j0, j1, offset, key, step, tag, sigma);
  }
  static void perturb_bf16(bf16_t* p, int64_t j0, int64_t j1, int64_t offset, PhiloxKey key,
                           int64_t step, uint32_t tag, float sigma) {
    perturb_calls<bf16_t, float, Gen>(p, j0, j1, offset, key, step, tag, sigma);
  }
  static void update_f32(int variant, float* p, const float* g, float* m, int64_t j0,
                         int64_t j1, int64_t offset, PhiloxKey key, int64_t step,
                         uint32_t restore_tag, const StepArgs<float>& a) {
    update_calls_dispatch<float, float, Gen>(variant, p, g, m, j0, j1, offset, key, step,
                                             restore_tag, a);
  }
  static void update_bf16(int variant, bf16_t* p, const bf16_t* g, bf16_t* m, int64_t j0,
                          int64_t j1, int64_t offset, PhiloxKey key, int64_t step,
                          uint32_t restore_tag, const StepArgs<float>& a) {
    update_calls_dispatch<bf16_t, float, Gen>(variant, p, g, m, j0, j1, offset, key, step,
                                              restore_tag, a);
  }
  static float noise_only(int64_t j0, int64_t j1, PhiloxKey key, int64_t step,
                          const uint32_t* tags, int n_tags) {
    return noise_only_calls<Gen>(j0, j1, key, step, tags, n_tags);
  }
  static bool nonfinite32(const uint32_t* p, int64_t n, uint32_t mask) {
    return any_nonfinite_words<uint32_t>(p, n, mask);
  }
  static bool nonfinite16(const uint16_t* p, int64_t n, uint32_t mask) {
    return any_nonfinite_words<uint16_t>(p, n, static_cast<uint16_t>(mask));
  }
  static bool nonfinite64(const uint64_t* p, int64_t n) {
    return any_nonfinite_words<uint64_t>(p, n, uint64_t(0x7FF0000000000000ull));
  }
  static bool perturb_check_f32(float* p, const uint32_t* gbits, int64_t j0, int64_t j1,
                                int64_t offset, PhiloxKey key, int64_t step, uint32_t tag,
                                float sigma) {
    return perturb_calls<float, float, Gen, true>(p, j0, j1, offset, key, step, tag, sigma, gbits);
  }
  static IsaLoops table() {
    return IsaLoops{&normals, &perturb_f32, &perturb_bf16, &update_f32, &update_bf16,
                    &noise_only, &nonfinite32, &nonfinite16, &nonfinite64, &perturb_check_f32};
  }
};
}  // namespace

// The loops of each ISA (nullptr-free: an ISA absent from the build reports false in
// isa_compiled()).
IsaLoops loops_baseline();
IsaLoops loops_avx2();
IsaLoops loops_avx512();
bool avx2_compiled();
bool avx512_compiled();

}  // namespace cpu
}  // namespace fused_flat
