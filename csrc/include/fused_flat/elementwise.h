// fused_flat/elementwise.h -- the per-element math of every fused_flat kernel.
//
// One header, __host__ __device__: the CPU kernels (csrc/cpu) and the CUDA kernels
// (csrc/cuda) call exactly these functions, so the CPU test-suite executes the very
// arithmetic the GPU runs; only indexing and launch differ between backends.
//
// Contents (ALGORITHMS.md §1-§2):
//   make_key           the key (seed_lo, seed_hi) and bucket word (bucket_id << 8) of a bucket
//   philox4x32_10      Philox4x32-10 (Random123 constants)
//   noise_words        call j: counter (j_lo, j_hi, k_lo, tag | bucket_id << 8) under the key
//   uniform24          u(x) = ((x >> 8) + 0.5) * 2^-24, in fp32, IEEE-exact ops only
//   box_muller         r (cos t, sin t), r = sqrt(-2 ln u(a)), t = 2 pi u(b)
//   call_normals       z(tag, 4j + 0..3) of one Philox call (layout version 3)
//   element_normal     z(tag, i), element_word: w(tag, i) = x_(i & 3)
//   log_poly / sincos_poly  the polynomials of log and sincos (also the SIMD generator's)
//   sgd_update         torch.optim.SGD's decay + momentum + step (Langevin and SAM passes)
//   langevin_update    restore + sgd_update + Langevin noise
//   sr_bf16_bits / sr_fp16_bits   stochastic rounding of an fp32 result (rbits of §1)
//
// Noise stream layout version 3 (ALGORITHMS.md §1): key (seed_lo32, seed_hi32), the whole
// seed; call j = i >> 2, counter (j_lo32, j_hi32, step_lo32, tag | (bucket_id << 8)), serves
// the 4 elements 4j..4j+3 of ONE tag; element i uses the Box-Muller pair (x0, x1) when
// ((i >> 1) & 1) == 0, else (x2, x3), and takes r cos t (i even) or r sin t (i odd).
// eps of perturbation n is tag n (0..15), xi tag 32, the Rademacher probe tag 16.
// (Layout 2 keyed Philox with (seed_lo32 ^ bucket_id, seed_hi32): (seed s + 1, bucket 0)
// drew the numbers of (seed s, bucket 1).)
//
// log/sin/cos are our own branch-free polynomials (Cephes coefficients, ~1 ulp-ish,
// max abs error < 1e-6 on the N(0,1) output), built only from + - * sqrt and bit
// operations: (1) GCC vectorizes them, libm calls it does not; (2) the result is the
// same on the CPU and the GPU up to FMA contraction; (3) the angle 2*pi*u is reduced
// to a quadrant exactly in terms of u (v = 4u, q = rint(v), f = v - q), which is more
// accurate than libm's cos(2*pi*u) after rounding 2*pi*u.
#pragma once
#include <stdint.h>

#if defined(__CUDACC__)
#define FF_HD __host__ __device__ __forceinline__
#else
// static: internal linkage, so a translation unit compiled for another ISA (the AVX2
// loops) never shares an out-of-line copy with the baseline one.
#define FF_HD static inline __attribute__((always_inline))
#include <string.h>
#endif
#include <assert.h>

namespace fused_flat {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

// Tags of ALGORITHMS.md §1 (layout version 3).
constexpr uint32_t kTagEps = 0;         // eps of perturbation n is tag kTagEps + n, n < 16
constexpr uint32_t kTagRademacher = 16; // RW-SAM probe
constexpr uint32_t kTagXi = 32;         // Langevin noise xi
constexpr int kNoiseLayoutVersion = 3;
constexpr int64_t kTagLimit = int64_t(1) << 8;      // tags: the low byte of counter word 3
constexpr int64_t kBucketLimit = int64_t(1) << 24;  // bucket ids: its high 24 bits

struct Words4 {
  uint32_t x0, x1, x2, x3;
};

// What identifies a bucket's stream: the Philox key (seed_lo32, seed_hi32) and the bucket
// word bucket_id << 8, which noise_words ORs with the tag into counter word 3.
struct PhiloxKey {
  uint32_t k0, k1;
  uint32_t bucket_word;
};

// The one place keys are built. bucket_id must be in [0, 2^24): the ops check it
// (check_noise_args, a clear error) before they get here.
FF_HD PhiloxKey make_key(int64_t seed, int64_t bucket_id) {
  assert(bucket_id >= 0 && bucket_id < kBucketLimit);
  const uint64_t s = static_cast<uint64_t>(seed);
  PhiloxKey key;
  key.k0 = static_cast<uint32_t>(s);
  key.k1 = static_cast<uint32_t>(s >> 32);
  key.bucket_word = static_cast<uint32_t>(bucket_id) << 8;
  return key;
}

FF_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  lo = static_cast<uint32_t>(p);
  hi = static_cast<uint32_t>(p >> 32);
#endif
}

// Philox4x32-10 of counter c under key (k0, k1); Random123's round function.
FF_HD Words4 philox4x32_10(Words4 c, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#elif defined(__GNUC__) && !defined(__clang__)
#pragma GCC unroll 10
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kPhiloxM0, c.x0, hi0, lo0);
    mulhilo32(kPhiloxM1, c.x2, hi1, lo1);
    Words4 n;
    n.x0 = hi1 ^ c.x1 ^ k0;
    n.x1 = lo1;
    n.x2 = hi0 ^ c.x3 ^ k1;
    n.x3 = lo0;
    c = n;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return c;
}

// The four words of Philox call j, which serves elements 4j .. 4j+3 of a bucket at step k,
// tag (< 256): counter (j_lo, j_hi, k_lo, tag | bucket_id << 8).
FF_HD Words4 noise_words(PhiloxKey key, int64_t j, int64_t step, uint32_t tag) {
  const uint64_t uj = static_cast<uint64_t>(j);
  Words4 c;
  c.x0 = static_cast<uint32_t>(uj);
  c.x1 = static_cast<uint32_t>(uj >> 32);
  c.x2 = static_cast<uint32_t>(static_cast<uint64_t>(step));
  c.x3 = tag | key.bucket_word;
  return philox4x32_10(c, key.k0, key.k1);
}

// A float's IEEE bits and back (the intrinsics on the device, memcpy on the host).
#if defined(__CUDA_ARCH__)
FF_HD uint32_t float_bits(float f) { return __float_as_uint(f); }
FF_HD float bits_float(uint32_t u) { return __uint_as_float(u); }
#else
FF_HD uint32_t float_bits(float f) { uint32_t u; memcpy(&u, &f, sizeof(u)); return u; }
FF_HD float bits_float(uint32_t u) { float f; memcpy(&f, &u, sizeof(f)); return f; }
#endif

// u(x) = ((x >> 8) + 0.5) * 2^-24, evaluated as three fp32 operations (convert, add,
// multiply) that round identically on every IEEE backend. In (0, 1]: the add rounds
// to nearest-even for x >> 8 >= 2^23, so u = 1 exactly is possible (then r = 0).
FF_HD float uniform24(uint32_t x) {
  return (static_cast<float>(x >> 8) + 0.5f) * 5.9604644775390625e-08f;
}

// The polynomial parts of log_unit and sincos_2pi, written once for a float and (the SIMD
// generator, csrc/cpu/noise_simd.h) a GCC vector of floats F with int32 vector I: the same
// IEEE operations in the same order, so every lane gives the scalar's bits. A comparison is
// a 0/1 bool on scalars and a 0/-1 mask on vectors; ?: selects with either.
//
// log(1 + m) + fe ln 2 (Cephes logf) for the reduced m in [sqrt(1/2) - 1, sqrt(2) - 1).
template <typename F>
FF_HD F log_poly(F m, F fe) {
  const F z = m * m;
  F y = m * 7.0376836292e-2f - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y = y + (-2.12194440e-4f) * fe;
  y = y - 0.5f * z;
  return (m + y) + 0.693359375f * fe;
}

// c = cos, s = sin of the angle quadrant * pi/2 + a, a in [-pi/4, pi/4], quadrant in 0..3
// (Cephes minimax polynomials).
template <typename F, typename I>
FF_HD void sincos_poly(F a, I quadrant, F& c, F& s) {
  const F z = a * a;
  F sp = z * -1.9515295891e-4f + 8.3321608736e-3f;
  sp = sp * z - 1.6666654611e-1f;
  const F sa = (sp * z) * a + a;
  F cp = z * 2.443315711809948e-5f - 1.388731625493765e-3f;
  cp = cp * z + 4.166664568298827e-2f;
  const F ca = (cp * z) * z - 0.5f * z + 1.0f;
  const I odd = (quadrant & 1) != 0;
  const F c0 = odd ? sa : ca;
  const F s0 = odd ? ca : sa;
  c = ((quadrant == 1) | (quadrant == 2)) ? -c0 : c0;
  s = (quadrant >= 2) ? -s0 : s0;
}

// Natural log for u in (0, 1] (branch-free). Max rel. error ~1e-7.
FF_HD float log_unit(float x) {
  const uint32_t bits = float_bits(x);
  int32_t e = static_cast<int32_t>((bits >> 23) & 0xffu) - 126;   // x = m * 2^e, m in [0.5, 1)
  float m = bits_float((bits & 0x007fffffu) | 0x3f000000u);
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1 : e;
  m = small ? (m + m) - 1.0f : m - 1.0f;
  return log_poly(m, static_cast<float>(e));
}

// cos(2 pi u), sin(2 pi u) for u in [0, 1]: exact quadrant reduction in u, then the
// polynomials on [-pi/4, pi/4].
FF_HD void sincos_2pi(float u, float& c, float& s) {
  const float v = 4.0f * u;                                   // exact
  const int32_t q = static_cast<int32_t>(v + 0.5f);           // nearest quadrant, v >= 0
  const float a = (v - static_cast<float>(q)) * 1.57079632679489662f;  // in [-pi/4, pi/4]
  sincos_poly(a, q & 3, c, s);
}

// One Box-Muller transform of the words (a, b): c = r cos t, s = r sin t.
FF_HD void box_muller(uint32_t a, uint32_t b, float& c, float& s) {
#if defined(__CUDA_ARCH__)
  const float r = sqrtf(-2.0f * log_unit(uniform24(a)));
#else
  const float r = __builtin_sqrtf(-2.0f * log_unit(uniform24(a)));
#endif
  float ct, st;
  sincos_2pi(uniform24(b), ct, st);
  c = r * ct;
  s = r * st;
}

// z(tag, 4j + q), q = 0..3, from the words of call j: every Box-Muller output is used.
FF_HD void call_normals(Words4 w, float& z0, float& z1, float& z2, float& z3) {
  box_muller(w.x0, w.x1, z0, z1);
  box_muller(w.x2, w.x3, z2, z3);
}

// z(tag, gi) of one element (the bucket's edges; inspection).
FF_HD float element_normal(PhiloxKey key, int64_t step, uint32_t tag, int64_t gi) {
  const Words4 w = noise_words(key, gi >> 2, step, tag);
  const bool second = ((gi >> 1) & 1) != 0;
  float c, s;
  box_muller(second ? w.x2 : w.x0, second ? w.x3 : w.x1, c, s);
  return (gi & 1) ? s : c;
}

// w(tag, gi) = x_(gi & 3): the element's own word (stochastic-rounding bits, probes).
FF_HD uint32_t select_word(Words4 w, int64_t gi) {
  const int q = static_cast<int>(gi & 3);
  return q == 0 ? w.x0 : q == 1 ? w.x1 : q == 2 ? w.x2 : w.x3;
}

FF_HD uint32_t element_word(PhiloxKey key, int64_t step, uint32_t tag, int64_t gi) {
  return select_word(noise_words(key, gi >> 2, step, tag), gi);
}

// Noise of one element for a pass: eps = z(eps_tag, gi) if kEps, xi = z(32, gi) if kXi
// (0 otherwise).
template <bool kEps, bool kXi>
FF_HD void element_noise(PhiloxKey key, int64_t step, uint32_t eps_tag, int64_t gi, float& eps,
                         float& xi) {
  eps = kEps ? element_normal(key, step, eps_tag, gi) : 0.0f;
  xi = kXi ? element_normal(key, step, kTagXi, gi) : 0.0f;
}

// Noise of the 4 elements of call j for a pass (e[q], x[q] of element 4j + q).
template <bool kEps, bool kXi>
FF_HD void call_noise(PhiloxKey key, int64_t step, uint32_t eps_tag, int64_t j, float* e,
                      float* x) {
  if (kEps) {
    call_normals(noise_words(key, j, step, eps_tag), e[0], e[1], e[2], e[3]);
  } else {
    e[0] = e[1] = e[2] = e[3] = 0.0f;
  }
  if (kXi) {
    call_normals(noise_words(key, j, step, kTagXi), x[0], x[1], x[2], x[3]);
  } else {
    x[0] = x[1] = x[2] = x[3] = 0.0f;
  }
}

// Rademacher sign (+1/-1) from the top bit of a word.
FF_HD float rademacher(uint32_t word) { return (word >> 31) ? -1.0f : 1.0f; }

// ------------------------------------------------------------------ stochastic rounding
// 16-bit parameters (ALGORITHMS.md §1): the update pass of step k rounds its fp32 result
// with the element's 16 random bits
//   rbits(i) = (w(0, i) & 0xFF) | ((w(32, i) & 0xFF) << 8)
// (the low bytes of its tag-0 and tag-32 Philox words, which uniform24 discards).
//
// Definition, both formats (exact arithmetic): with ulp the spacing of the 16-bit grid at
// |x| (the binade of |x|; the subnormal spacing below the smallest normal),
//   SR(x) = sign(x) * (floor(|x| / ulp) + up) * ulp,
//   up    = 1 iff rbits + floor(2^16 * frac(|x| / ulp)) >= 2^16,
// i.e. add rbits / 2^16 ulp to |x| and truncate toward zero. P(up) = frac(|x| / ulp)
// exactly whenever the discarded part has at most 16 bits (bf16 always; fp16 down to
// |x| >= 2^-17), else frac truncated to 16 bits (bias < 2^-16 ulp). An exactly
// representable x is returned unchanged. Rounding up past the largest finite value
// gives +-inf (so |x| in (max, next binade) overflows with probability frac; fp16:
// |x| >= 65536 is always inf). inf stays inf, NaN gives a NaN (0x7FC0 / 0x7E00).
// For bf16 this is: add rbits to the fp32 bit pattern, keep the high 16 bits.
// Integer operations only: the same bits on the CPU, the GPU and in Triton.
FF_HD uint32_t sr_bits_of(uint32_t w0, uint32_t w32) {
  return (w0 & 0xFFu) | ((w32 & 0xFFu) << 8);
}

FF_HD uint16_t sr_bf16_bits(float x, uint32_t rbits) {
  const uint32_t u = float_bits(x);
  if ((u & 0x7F800000u) == 0x7F800000u) {                 // inf / NaN
    return static_cast<uint16_t>((u & 0x007FFFFFu) ? 0x7FC0u : (u >> 16));
  }
  return static_cast<uint16_t>((u + (rbits & 0xFFFFu)) >> 16);
}

FF_HD uint16_t sr_fp16_bits(float x, uint32_t rbits) {
  const uint32_t u = float_bits(x);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t m = u & 0x7FFFFFFFu;
  const uint32_t E = m >> 23;                               // fp32 biased exponent
  if (E == 0xFFu) return static_cast<uint16_t>((m & 0x007FFFFFu) ? 0x7E00u : (sign | 0x7C00u));
  // significand with the implicit bit; value = sig * 2^(max(E, 1) - 150)
  const uint64_t sig = static_cast<uint64_t>(E ? ((m & 0x007FFFFFu) | 0x00800000u) : m);
  // bits of sig below the fp16 grid: 13 in fp16's normal range (E >= 113), more below
  const uint32_t shift = E >= 113u ? 13u : (E == 0u ? 125u : 126u - E);
  const uint32_t S = shift < 40u ? shift : 40u;             // sig < 2^24: >= 40 drops all
  const uint64_t k = sig >> S;                              // truncated, in grid units
  const uint64_t d = ((sig & ((uint64_t(1) << S) - 1u)) << 16) >> S;  // floor(2^16 frac)
  const uint32_t up = static_cast<uint32_t>(((rbits & 0xFFFFu) + d) >> 16);
  uint32_t h = (E >= 113u ? ((E - 113u) << 10) : 0u) + static_cast<uint32_t>(k) + up;
  h = h < 0x7C00u ? h : 0x7C00u;                            // overflow: inf
  return static_cast<uint16_t>(sign | h);
}

// Round-to-nearest-even fp32 -> 16-bit bits (perturb_from_, copies). NaN -> 0x7FC0/0x7E00.
FF_HD uint16_t rne_bf16_bits(float x) {
  const uint32_t u = float_bits(x);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;
  return static_cast<uint16_t>((u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16);
}

// rbits of the 4 elements of call j from the words of its tag-0 and tag-32 calls.
FF_HD void call_sr_bits(Words4 w0, Words4 w32, uint32_t* rb) {
  rb[0] = sr_bits_of(w0.x0, w32.x0);
  rb[1] = sr_bits_of(w0.x1, w32.x1);
  rb[2] = sr_bits_of(w0.x2, w32.x2);
  rb[3] = sr_bits_of(w0.x3, w32.x3);
}

// rbits of one element (the bucket's edges; SAM passes): two Philox calls.
FF_HD uint32_t element_sr_bits(PhiloxKey key, int64_t step, int64_t gi) {
  return sr_bits_of(element_word(key, step, kTagEps, gi), element_word(key, step, kTagXi, gi));
}

// Noise and rbits of the 4 elements of call j for an update pass with stochastic
// rounding: the words of the eps (if eps_tag == 0) and xi calls are reused, so a pass
// that already makes both calls makes no extra Philox call; otherwise the missing
// tag-0 / tag-32 call is made for the rbits alone.
template <bool kEps, bool kXi>
FF_HD void call_noise_sr(PhiloxKey key, int64_t step, uint32_t eps_tag, int64_t j, float* e,
                         float* x, uint32_t* rb) {
  Words4 w0, w32;
  if (kEps) {
    const Words4 we = noise_words(key, j, step, eps_tag);
    call_normals(we, e[0], e[1], e[2], e[3]);
    w0 = eps_tag == kTagEps ? we : noise_words(key, j, step, kTagEps);
  } else {
    e[0] = e[1] = e[2] = e[3] = 0.0f;
    w0 = noise_words(key, j, step, kTagEps);
  }
  w32 = noise_words(key, j, step, kTagXi);
  if (kXi) {
    call_normals(w32, x[0], x[1], x[2], x[3]);
  } else {
    x[0] = x[1] = x[2] = x[3] = 0.0f;
  }
  call_sr_bits(w0, w32, rb);
}

// One element's noise and rbits (edges of a slice).
template <bool kEps, bool kXi>
FF_HD void element_noise_sr(PhiloxKey key, int64_t step, uint32_t eps_tag, int64_t gi,
                            float& eps, float& xi, uint32_t& rbits) {
  element_noise<kEps, kXi>(key, step, eps_tag, gi, eps, xi);
  rbits = element_sr_bits(key, step, gi);
}

// Hyperparameters of one update pass, in the compute type acc_t (float, or double
// for fp64 buckets). All are runtime values (an LR scheduler never recompiles).
template <typename acc_t>
struct StepArgs {
  acc_t sigma;       // restore: theta -= sigma * eps (0: nothing to restore)
  acc_t lr;
  acc_t weight_decay;
  acc_t momentum;
  acc_t dampening;
  acc_t noise_std;   // sqrt(2 lr / beta), 0 for no Langevin noise
  acc_t grad_mult;   // multiplies g: 1/n_perturbations, 1/grad_scale (AMP), -1 for maximize
  bool nesterov;
  bool momentum_init;  // first step: m <- d (torch.optim.SGD's clone)
};

// StepArgs in acc_t from an op's double arguments (the one place the host entry points of
// every backend build it).
template <typename acc_t>
inline StepArgs<acc_t> make_step_args(double sigma, double lr, double weight_decay,
                                      double momentum, double dampening, double noise_std,
                                      double grad_mult, bool nesterov, bool momentum_init) {
  const auto c = [](double v) { return static_cast<acc_t>(v); };
  return StepArgs<acc_t>{c(sigma),     c(lr),        c(weight_decay), c(momentum), c(dampening),
                         c(noise_std), c(grad_mult), nesterov,        momentum_init};
}

// torch.optim.SGD's update of theta with the gradient g (times a.grad_mult): L2 weight
// decay, then momentum m (dampening, Nesterov; m <- d on the first step), then the step.
// The one home of this arithmetic: langevin_update (StepArgs) and sam_sgd_update
// (SamStepArgs, sam_elementwise.h) call it. kMom is a template parameter so the
// momentum-free loop carries no m.
template <bool kMom, typename acc_t, typename Args>
FF_HD acc_t sgd_update(acc_t theta, acc_t g, acc_t* m, const Args& a) {
  acc_t d = g * a.grad_mult;
  d = d + a.weight_decay * theta;         // L2 decay as torch.optim.SGD
  if (kMom) {
    const acc_t buf = a.momentum_init ? d : a.momentum * (*m) + (acc_t(1) - a.dampening) * d;
    *m = buf;
    d = a.nesterov ? d + a.momentum * buf : buf;
  }
  return theta - a.lr * d;
}

// One element of the fused restore + decay + momentum + Langevin + update pass.
template <bool has_momentum, typename acc_t>
FF_HD acc_t langevin_update(acc_t theta, acc_t g, acc_t* m, acc_t eps, acc_t xi,
                            const StepArgs<acc_t>& a) {
  theta = theta - a.sigma * eps;          // restore (eps regenerated, never stored)
  return sgd_update<has_momentum>(theta, g, m, a) + a.noise_std * xi;
}

}  // namespace fused_flat
