// The CPU inner loops over whole Philox pairs [j0, j1) of a bucket slice, templated on
// the storage type. Included by kernels_cpu.cpp (baseline ISA, every dtype) and by
// loops_avx2.cpp (fp32, compiled for AVX2 and dispatched at run time). With
// -ffp-contract=off both give bit-identical results. No torch headers here: a TU built
// for another ISA must not emit torch's inline functions.
#pragma once
#include <stdint.h>

#include "fused_flat/elementwise.h"

namespace fused_flat {
namespace cpu {

template <typename scalar_t, typename acc_t>
static void perturb_pairs(scalar_t* __restrict__ p, int64_t j0, int64_t j1, int64_t offset,
                          PhiloxKey key, int64_t step, uint32_t tag, acc_t sigma) {
  for (int64_t j = j0; j < j1; ++j) {
    float e0, x0, e1, x1;
    pair_noise<true, false>(key, step, tag, j, e0, x0, e1, x1);
    const int64_t i = 2 * j - offset;
    p[i] = static_cast<scalar_t>(static_cast<acc_t>(p[i]) + sigma * static_cast<acc_t>(e0));
    p[i + 1] = static_cast<scalar_t>(static_cast<acc_t>(p[i + 1]) + sigma * static_cast<acc_t>(e1));
  }
}

template <typename scalar_t, typename acc_t, bool kMom>
static inline __attribute__((always_inline)) void update_one(
    scalar_t* __restrict__ p, const scalar_t* __restrict__ g, scalar_t* __restrict__ m,
    int64_t i, float e, float x, const StepArgs<acc_t>& a) {
  acc_t mm = kMom ? static_cast<acc_t>(m[i]) : acc_t(0);
  const acc_t th = langevin_update<kMom>(static_cast<acc_t>(p[i]), static_cast<acc_t>(g[i]), &mm,
                                         static_cast<acc_t>(e), static_cast<acc_t>(x), a);
  p[i] = static_cast<scalar_t>(th);
  if (kMom) m[i] = static_cast<scalar_t>(mm);
}

template <typename scalar_t, typename acc_t, bool kMom, bool kEps, bool kXi, bool kNesterov,
          bool kInit>
static void update_pairs_fixed(scalar_t* __restrict__ p, const scalar_t* __restrict__ g,
                               scalar_t* __restrict__ m, int64_t j0, int64_t j1, int64_t offset,
                               PhiloxKey key, int64_t step, uint32_t restore_tag,
                               const StepArgs<acc_t>& args) {
  // A local copy whose flags are compile-time constants: the branches of langevin_update
  // fold away and the loop vectorizes.
  StepArgs<acc_t> a = args;
  a.nesterov = kNesterov;
  a.momentum_init = kInit;
  // eps and xi from the same tag 0: one Philox call and no branch in the loop (the
  // restore of a tag != 0 perturbation, n_perturbations > 1, takes the general path).
  if (kEps && kXi && restore_tag == kTagPair) {
    for (int64_t j = j0; j < j1; ++j) {
      float e0, x0, e1, x1;
      pair_noise<false, true>(key, step, kTagPair, j, e0, x0, e1, x1);
      const int64_t i = 2 * j - offset;
      update_one<scalar_t, acc_t, kMom>(p, g, m, i, e0, x0, a);
      update_one<scalar_t, acc_t, kMom>(p, g, m, i + 1, e1, x1, a);
    }
    return;
  }
  for (int64_t j = j0; j < j1; ++j) {
    float e0, x0, e1, x1;
    pair_noise<kEps, kXi>(key, step, restore_tag, j, e0, x0, e1, x1);
    const int64_t i = 2 * j - offset;
    update_one<scalar_t, acc_t, kMom>(p, g, m, i, e0, x0, a);
    update_one<scalar_t, acc_t, kMom>(p, g, m, i + 1, e1, x1, a);
  }
}

template <typename scalar_t, typename acc_t, bool kMom, bool kEps, bool kXi>
static void update_pairs(scalar_t* __restrict__ p, const scalar_t* __restrict__ g,
                         scalar_t* __restrict__ m, int64_t j0, int64_t j1, int64_t offset,
                         PhiloxKey key, int64_t step, uint32_t restore_tag,
                         const StepArgs<acc_t>& a) {
  if (!kMom) {
    update_pairs_fixed<scalar_t, acc_t, kMom, kEps, kXi, false, false>(p, g, m, j0, j1, offset, key, step, restore_tag, a);
  } else if (a.momentum_init) {
    if (a.nesterov) update_pairs_fixed<scalar_t, acc_t, kMom, kEps, kXi, true, true>(p, g, m, j0, j1, offset, key, step, restore_tag, a);
    else update_pairs_fixed<scalar_t, acc_t, kMom, kEps, kXi, false, true>(p, g, m, j0, j1, offset, key, step, restore_tag, a);
  } else {
    if (a.nesterov) update_pairs_fixed<scalar_t, acc_t, kMom, kEps, kXi, true, false>(p, g, m, j0, j1, offset, key, step, restore_tag, a);
    else update_pairs_fixed<scalar_t, acc_t, kMom, kEps, kXi, false, false>(p, g, m, j0, j1, offset, key, step, restore_tag, a);
  }
}

// Variant index of update_pairs: bit 0 momentum, bit 1 eps, bit 2 xi.
template <typename scalar_t, typename acc_t>
static void update_pairs_dispatch(int variant, scalar_t* p, const scalar_t* g, scalar_t* m,
                                  int64_t j0, int64_t j1, int64_t offset, PhiloxKey key,
                                  int64_t step, uint32_t restore_tag, const StepArgs<acc_t>& a) {
#define FF_CASE(V, MOM, EPS, XI)                                                             \
  case V:                                                                                    \
    update_pairs<scalar_t, acc_t, MOM, EPS, XI>(p, g, m, j0, j1, offset, key, step,          \
                                                restore_tag, a);                             \
    break;
  switch (variant) {
    FF_CASE(0, false, false, false)
    FF_CASE(1, true, false, false)
    FF_CASE(2, false, true, false)
    FF_CASE(3, true, true, false)
    FF_CASE(4, false, false, true)
    FF_CASE(5, true, false, true)
    FF_CASE(6, false, true, true)
    FF_CASE(7, true, true, true)
  }
#undef FF_CASE
}

// fp32 loops compiled for AVX2+FMA (loops_avx2.cpp); callers check avx2_supported().
void perturb_pairs_f32_avx2(float* p, int64_t j0, int64_t j1, int64_t offset, PhiloxKey key,
                            int64_t step, uint32_t tag, float sigma);
void update_pairs_f32_avx2(int variant, float* p, const float* g, float* m, int64_t j0,
                           int64_t j1, int64_t offset, PhiloxKey key, int64_t step,
                           uint32_t restore_tag, const StepArgs<float>& a);

}  // namespace cpu
}  // namespace fused_flat
