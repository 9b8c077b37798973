// CPU implementations of the fused_flat ops: one pass over a flat bucket per op,
// parallel over Philox pairs with at::parallel_for (OpenMP). Every element's value is
// a function of its bucket index alone (ALGORITHMS.md §1), never of the thread split,
// and the per-element math is fused_flat/elementwise.h, shared with the CUDA kernels.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>

#include "fused_flat/elementwise.h"
#include "fused_flat/op_args.h"
#include "loops.h"

namespace fused_flat {
namespace {

constexpr int64_t kGrainPairs = int64_t(1) << 14;

// The AVX2 fp32 loops run when the CPU has AVX2+FMA, unless FUSED_FLAT_CPU_ISA=baseline
// (used by the tests to check that both paths give identical bits).
bool use_avx2() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  const char* isa = std::getenv("FUSED_FLAT_CPU_ISA");
  if (isa != nullptr && std::strcmp(isa, "baseline") == 0) return false;
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

// Splits the slice [offset, offset + n) into its edge elements (a half-used Philox pair at
// either end, done serially by edge(local_index, global_index)) and whole pairs, returned
// as [j_begin, j_end) for the parallel loops.
template <typename Edge>
std::pair<int64_t, int64_t> split_edges(int64_t offset, int64_t n, const Edge& edge) {
  int64_t g0 = offset, g1 = offset + n;
  if (n <= 0) return {0, 0};
  if (g0 & 1) {
    edge(int64_t(0), g0);
    ++g0;
  }
  if (g0 < g1 && (g1 & 1)) {
    edge(g1 - 1 - offset, g1 - 1);
    --g1;
  }
  return {g0 >> 1, g1 >> 1};
}

template <typename scalar_t>
void perturb_typed(scalar_t* __restrict__ p, int64_t n, PhiloxKey key, int64_t step, uint32_t tag,
                   double sigma_d, int64_t offset) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t sigma = static_cast<acc_t>(sigma_d);
  const auto range = split_edges(offset, n, [&](int64_t i, int64_t gi) {
    float e, x;
    element_noise<true, false>(key, step, tag, gi, e, x);
    p[i] = static_cast<scalar_t>(static_cast<acc_t>(p[i]) + sigma * static_cast<acc_t>(e));
  });
  const bool avx2 = std::is_same<scalar_t, float>::value && use_avx2();
  at::parallel_for(range.first, range.second, kGrainPairs, [&](int64_t j0, int64_t j1) {
    if constexpr (std::is_same<scalar_t, float>::value) {
      if (avx2) return cpu::perturb_pairs_f32_avx2(p, j0, j1, offset, key, step, tag, sigma);
    }
    cpu::perturb_pairs<scalar_t, acc_t>(p, j0, j1, offset, key, step, tag, sigma);
  });
}

template <bool kMom, bool kEps, bool kXi, typename scalar_t, typename acc_t>
void update_element(scalar_t* p, const scalar_t* g, scalar_t* m, int64_t i, int64_t gi,
                    PhiloxKey key, int64_t step, uint32_t tag, const StepArgs<acc_t>& a) {
  float e, x;
  element_noise<kEps, kXi>(key, step, tag, gi, e, x);
  cpu::update_one<scalar_t, acc_t, kMom>(p, g, m, i, e, x, a);
}

template <typename scalar_t>
void restore_and_step_typed(scalar_t* __restrict__ p, const scalar_t* __restrict__ g,
                            scalar_t* __restrict__ m, int64_t n, PhiloxKey key, int64_t step,
                            uint32_t tag, int64_t offset,
                            const StepArgs<at::opmath_type<scalar_t>>& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const int variant = (m != nullptr ? 1 : 0) | (a.sigma != 0 ? 2 : 0) | (a.noise_std != 0 ? 4 : 0);
  const auto range = split_edges(offset, n, [&](int64_t i, int64_t gi) {
    switch (variant) {
      case 0: return update_element<false, false, false>(p, g, m, i, gi, key, step, tag, a);
      case 1: return update_element<true, false, false>(p, g, m, i, gi, key, step, tag, a);
      case 2: return update_element<false, true, false>(p, g, m, i, gi, key, step, tag, a);
      case 3: return update_element<true, true, false>(p, g, m, i, gi, key, step, tag, a);
      case 4: return update_element<false, false, true>(p, g, m, i, gi, key, step, tag, a);
      case 5: return update_element<true, false, true>(p, g, m, i, gi, key, step, tag, a);
      case 6: return update_element<false, true, true>(p, g, m, i, gi, key, step, tag, a);
      default: return update_element<true, true, true>(p, g, m, i, gi, key, step, tag, a);
    }
  });
  const bool avx2 = std::is_same<scalar_t, float>::value && use_avx2();
  at::parallel_for(range.first, range.second, kGrainPairs, [&](int64_t j0, int64_t j1) {
    if constexpr (std::is_same<scalar_t, float>::value) {
      if (avx2) return cpu::update_pairs_f32_avx2(variant, p, g, m, j0, j1, offset, key, step, tag, a);
    }
    cpu::update_pairs_dispatch<scalar_t, acc_t>(variant, p, g, m, j0, j1, offset, key, step, tag, a);
  });
}

void perturb_cpu(at::Tensor& param, int64_t seed, int64_t bucket_id, int64_t step, int64_t tag,
                 double sigma, int64_t offset) {
  check_bucket(param, "param");
  check_noise_args(seed, offset, tag);
  TORCH_CHECK(tag >= 0, "fused_flat.perturb_: tag must be >= 0, got ", tag);
  if (sigma == 0.0) return;
  const PhiloxKey key = make_key(seed, bucket_id);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "perturb_", [&] {
    perturb_typed<scalar_t>(param.data_ptr<scalar_t>(), param.numel(), key, step,
                            static_cast<uint32_t>(tag), sigma, offset);
  });
}

void restore_and_step_cpu(at::Tensor& param, const at::Tensor& grad,
                          const c10::optional<at::Tensor>& momentum_buffer,
                          const c10::optional<at::Tensor>& grad_scale,
                          const c10::optional<at::Tensor>& found_inf, int64_t seed,
                          int64_t bucket_id, int64_t step, int64_t offset, int64_t restore_tag,
                          double sigma, double lr, double weight_decay, double momentum,
                          double dampening, bool nesterov, bool momentum_init, double noise_std,
                          double grad_mult) {
  check_bucket(param, "param");
  check_like(param, grad, "grad");
  if (momentum_buffer.has_value()) check_like(param, *momentum_buffer, "momentum_buffer");
  check_scalar_tensor(grad_scale, param, "grad_scale");
  check_scalar_tensor(found_inf, param, "found_inf");
  check_noise_args(seed, offset, restore_tag);
  TORCH_CHECK(restore_tag >= 0 || sigma == 0.0,
              "fused_flat.restore_and_step_: restore_tag must be >= 0 when sigma != 0");
  if (found_inf.has_value() && found_inf->item<float>() != 0.0f) {
    // Skipped step (non-finite gradient): undo the perturbation only; m untouched.
    if (sigma != 0.0) perturb_cpu(param, seed, bucket_id, step, restore_tag, -sigma, offset);
    return;
  }
  double mult = grad_mult;
  if (grad_scale.has_value()) mult /= static_cast<double>(grad_scale->item<float>());
  const PhiloxKey key = make_key(seed, bucket_id);
  const uint32_t rtag = restore_tag < 0 ? 0u : static_cast<uint32_t>(restore_tag);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "restore_and_step_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    StepArgs<acc_t> a;
    a.sigma = static_cast<acc_t>(sigma);
    a.lr = static_cast<acc_t>(lr);
    a.weight_decay = static_cast<acc_t>(weight_decay);
    a.momentum = static_cast<acc_t>(momentum);
    a.dampening = static_cast<acc_t>(dampening);
    a.noise_std = static_cast<acc_t>(noise_std);
    a.grad_mult = static_cast<acc_t>(mult);
    a.nesterov = nesterov;
    a.momentum_init = momentum_init;
    scalar_t* p = param.data_ptr<scalar_t>();
    const scalar_t* g = grad.data_ptr<scalar_t>();
    scalar_t* m = momentum_buffer.has_value() ? momentum_buffer->data_ptr<scalar_t>() : nullptr;
    restore_and_step_typed<scalar_t>(p, g, m, param.numel(), key, step, rtag, offset, a);
  });
}

at::Tensor philox_words_cpu(int64_t seed, int64_t bucket_id, int64_t step, int64_t tag,
                            int64_t first_pair, int64_t n_pairs) {
  // first_pair is taken as the bit pattern of a uint64 (so Random123's test vectors,
  // whose counters have the top bit set, can be checked).
  check_noise_args(seed, 0, tag);
  TORCH_CHECK(n_pairs >= 0, "fused_flat.philox_words: n_pairs must be >= 0");
  at::Tensor out = at::empty({n_pairs, 4}, at::TensorOptions().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  const PhiloxKey key = make_key(seed, bucket_id);
  at::parallel_for(0, n_pairs, kGrainPairs, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const Words4 w = noise_words(key, first_pair + r, step, static_cast<uint32_t>(tag));
      o[4 * r + 0] = w.x0;
      o[4 * r + 1] = w.x1;
      o[4 * r + 2] = w.x2;
      o[4 * r + 3] = w.x3;
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gaussian_noise_cpu(int64_t seed, int64_t bucket_id, int64_t step,
                                                      int64_t tag, int64_t offset, int64_t n) {
  check_noise_args(seed, offset, tag);
  TORCH_CHECK(n >= 0, "fused_flat.gaussian_noise: n must be >= 0");
  at::Tensor eps = at::empty({n}, at::TensorOptions().dtype(at::kFloat));
  at::Tensor xi = at::empty({n}, at::TensorOptions().dtype(at::kFloat));
  float* pe = eps.data_ptr<float>();
  float* px = xi.data_ptr<float>();
  const PhiloxKey key = make_key(seed, bucket_id);
  const uint32_t t = static_cast<uint32_t>(tag);
  at::parallel_for(0, n, kGrainPairs, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t gi = offset + i;
      const Words4 w = noise_words(key, gi >> 1, step, t);
      const bool odd = (gi & 1) != 0;
      box_muller(odd ? w.x2 : w.x0, odd ? w.x3 : w.x1, pe[i], px[i]);
    }
  });
  return {eps, xi};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_flat, CPU, m) {
  m.impl("perturb_", &perturb_cpu);
  m.impl("restore_and_step_", &restore_and_step_cpu);
}

// Noise inspection ops take no tensor, so they are registered for the
// CompositeExplicitAutograd key (device-free) and always run on the CPU.
TORCH_LIBRARY_IMPL(fused_flat, CompositeExplicitAutograd, m) {
  m.impl("philox_words", &philox_words_cpu);
  m.impl("gaussian_noise", &gaussian_noise_cpu);
}

}  // namespace fused_flat
