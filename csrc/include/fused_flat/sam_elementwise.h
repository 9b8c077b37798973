// fused_flat/sam_elementwise.h -- the per-element math of the SAM-family kernels.
//
// __host__ __device__ (FF_HD) so the CPU kernels (csrc/cpu/sam_cpu.cpp) and later CUDA /
// Triton ports run the very same arithmetic (ALGORITHMS.md §3):
//   sam_sq_term        one element's contribution to ||g||^2 (SAM/USAM) or ||T g||^2 (ASAM,
//                      T = |theta| + eta), always in double so the global norm never overflows
//   sam_perturbed      theta + e, e = (coef * s) * g with s = T^2 (ASAM) or 1
//   sam_sgd_update     restore from the backup, then torch.optim.SGD's update with g2
//                      (elementwise.h sgd_update, shared with the Langevin passes)
//   rademacher_sign    RW-SAM probe v_i (tag 16) from the element's Philox words
#pragma once
#include "fused_flat/elementwise.h"

namespace fused_flat {

constexpr int64_t kSamReduceBlock = int64_t(1) << 14;  // fixed blocks: deterministic sums

// ASAM's T = |theta| + eta (eta: Kwon et al.'s offset, 0 unless asked).
template <typename acc_t>
FF_HD acc_t asam_t(acc_t theta, acc_t eta) {
  return (theta < acc_t(0) ? -theta : theta) + eta;
}

template <bool kAdaptive, typename acc_t>
FF_HD double sam_sq_term(acc_t theta, acc_t g, acc_t eta) {
  const double t = kAdaptive ? static_cast<double>(asam_t(theta, eta)) * static_cast<double>(g)
                             : static_cast<double>(g);
  return t * t;
}

// coef = rho / (||g|| + 1e-12) (SAM, ASAM) or rho (USAM), times 1/grad_scale under AMP.
template <bool kAdaptive, typename acc_t>
FF_HD acc_t sam_perturbed(acc_t theta, acc_t g, acc_t coef, acc_t eta) {
  const acc_t t = kAdaptive ? asam_t(theta, eta) : acc_t(1);
  const acc_t s = t * t;
  return theta + (coef * s) * g;
}

template <typename acc_t>
struct SamStepArgs {
  acc_t lr;
  acc_t weight_decay;
  acc_t momentum;
  acc_t dampening;
  acc_t grad_mult;     // 1/grad_scale (AMP), -1 for maximize, 1/n_micro ...
  bool nesterov;
  bool momentum_init;  // first step: m <- d (torch.optim.SGD's clone)
};

// SamStepArgs in acc_t from an op's double arguments (the host entry points' one builder).
template <typename acc_t>
inline SamStepArgs<acc_t> make_sam_step_args(double lr, double weight_decay, double momentum,
                                             double dampening, double grad_mult, bool nesterov,
                                             bool momentum_init) {
  const auto c = [](double v) { return static_cast<acc_t>(v); };
  return SamStepArgs<acc_t>{c(lr),        c(weight_decay), c(momentum), c(dampening),
                            c(grad_mult), nesterov,        momentum_init};
}

// theta is the backup (the unperturbed weights); g is g2, the gradient at theta + e:
// torch.optim.SGD's update (elementwise.h sgd_update).
template <bool kMom, typename acc_t>
FF_HD acc_t sam_sgd_update(acc_t theta, acc_t g, acc_t* m, const SamStepArgs<acc_t>& a) {
  return sgd_update<kMom>(theta, g, m, a);
}

// v_i in {+1, -1}: -1 where the top bit of w(16, i) is set (layout version 3).
FF_HD float rademacher_sign(PhiloxKey key, int64_t step, int64_t gi) {
  return rademacher(element_word(key, step, kTagRademacher, gi));
}

}  // namespace fused_flat
