// CPU kernels of the SAM-family ops (schemas in csrc/sam_ops.cpp): one pass over a flat
// bucket per op, at::parallel_for over elements; per-element math in sam_elementwise.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "fused_flat/op_args.h"
#include "fused_flat/sam_elementwise.h"

namespace fused_flat {
namespace {

constexpr int64_t kGrain = int64_t(1) << 15;

template <typename scalar_t, bool kAdaptive>
double sq_norm_typed(const scalar_t* g, const scalar_t* p, int64_t n, double eta_d) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t eta = static_cast<acc_t>(eta_d);
  const int64_t nblocks = (n + kSamReduceBlock - 1) / kSamReduceBlock;
  std::vector<double> partial(static_cast<size_t>(nblocks), 0.0);
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t lo = b * kSamReduceBlock;
      const int64_t hi = lo + kSamReduceBlock < n ? lo + kSamReduceBlock : n;
      // kLanes independent partial sums (element i goes to lane i % kLanes), added in a
      // fixed order: vectorizable, and still independent of the thread count.
      constexpr int kLanes = 8;
      double acc[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t i = lo;
      for (; i + kLanes <= hi; i += kLanes) {
        for (int k = 0; k < kLanes; ++k) {
          const acc_t th = kAdaptive ? static_cast<acc_t>(p[i + k]) : acc_t(0);
          acc[k] += sam_sq_term<kAdaptive, acc_t>(th, static_cast<acc_t>(g[i + k]), eta);
        }
      }
      for (int k = 0; i < hi; ++i, ++k) {
        const acc_t th = kAdaptive ? static_cast<acc_t>(p[i]) : acc_t(0);
        acc[k] += sam_sq_term<kAdaptive, acc_t>(th, static_cast<acc_t>(g[i]), eta);
      }
      const double s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
      partial[static_cast<size_t>(b)] = s;
    }
  });
  double total = 0.0;
  for (double s : partial) total += s;
  return total;
}

at::Tensor sam_grad_sq_norm_cpu(const at::Tensor& grad, const c10::optional<at::Tensor>& param,
                                double eta) {
  check_bucket(grad, "grad");
  if (param.has_value()) check_like(grad, *param, "param");
  double total = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "sam_grad_sq_norm", [&] {
    const scalar_t* g = grad.data_ptr<scalar_t>();
    total = param.has_value() ? sq_norm_typed<scalar_t, true>(g, param->data_ptr<scalar_t>(), grad.numel(), eta)
                              : sq_norm_typed<scalar_t, false>(g, nullptr, grad.numel(), eta);
  });
  return at::scalar_tensor(total, at::TensorOptions().dtype(at::kDouble));
}

void sam_perturb_cpu(at::Tensor& param, const at::Tensor& grad, at::Tensor& backup, bool adaptive,
                     double coef, double eta_d) {
  check_bucket(param, "param");
  check_like(param, grad, "grad");
  check_like(param, backup, "backup");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "sam_perturb_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* p = param.data_ptr<scalar_t>();
    scalar_t* bk = backup.data_ptr<scalar_t>();
    const scalar_t* g = grad.data_ptr<scalar_t>();
    const acc_t c = static_cast<acc_t>(coef), eta = static_cast<acc_t>(eta_d);
    auto run = [&](auto adaptive_c) {
      constexpr bool kAd = decltype(adaptive_c)::value;
      at::parallel_for(0, param.numel(), kGrain, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const scalar_t th = p[i];
          bk[i] = th;
          p[i] = static_cast<scalar_t>(
              sam_perturbed<kAd, acc_t>(static_cast<acc_t>(th), static_cast<acc_t>(g[i]), c, eta));
        }
      });
    };
    if (adaptive) run(std::true_type{});
    else run(std::false_type{});
  });
}

// SR(theta) as scalar_t (16-bit types; others: plain conversion, never called with SR).
template <typename scalar_t, typename acc_t>
scalar_t sr_store(acc_t th, uint32_t rbits) {
  if constexpr (std::is_same<scalar_t, at::BFloat16>::value) {
    return at::BFloat16(sr_bf16_bits(static_cast<float>(th), rbits), at::BFloat16::from_bits());
  } else if constexpr (std::is_same<scalar_t, at::Half>::value) {
    return at::Half(sr_fp16_bits(static_cast<float>(th), rbits), at::Half::from_bits());
  } else {
    return static_cast<scalar_t>(th);
  }
}

// The SR variant: one tag-0 and one tag-32 Philox call per 4 elements (bucket index
// offset + i), as sam_probe_ walks its calls.
template <typename scalar_t, bool kMom>
void restore_step_sr_typed(scalar_t* p, const scalar_t* bk, const scalar_t* g, scalar_t* m,
                           int64_t n, const SamStepArgs<at::opmath_type<scalar_t>>& a,
                           PhiloxKey key, int64_t step, int64_t offset) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, n, kGrain, [&](int64_t i0, int64_t i1) {
    int64_t i = i0;
    while (i < i1) {
      const int64_t gi = offset + i;
      uint32_t rb[4];
      call_sr_bits(noise_words(key, gi >> 2, step, kTagEps), noise_words(key, gi >> 2, step, kTagXi), rb);
      const int64_t stop = std::min(i1, i + (4 - (gi & 3)));
      for (; i < stop; ++i) {
        acc_t mm = kMom ? static_cast<acc_t>(m[i]) : acc_t(0);
        const acc_t th = sam_sgd_update<kMom, acc_t>(static_cast<acc_t>(bk[i]), static_cast<acc_t>(g[i]), &mm, a);
        p[i] = sr_store<scalar_t, acc_t>(th, rb[(offset + i) & 3]);
        if (kMom) m[i] = static_cast<scalar_t>(mm);
      }
    }
  });
}

template <typename scalar_t, bool kMom>
void restore_step_typed(scalar_t* p, const scalar_t* bk, const scalar_t* g, scalar_t* m, int64_t n,
                        const SamStepArgs<at::opmath_type<scalar_t>>& a) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, n, kGrain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      acc_t mm = kMom ? static_cast<acc_t>(m[i]) : acc_t(0);
      p[i] = static_cast<scalar_t>(sam_sgd_update<kMom, acc_t>(static_cast<acc_t>(bk[i]),
                                                               static_cast<acc_t>(g[i]), &mm, a));
      if (kMom) m[i] = static_cast<scalar_t>(mm);
    }
  });
}

void sam_restore_and_step_cpu(at::Tensor& param, const at::Tensor& backup, const at::Tensor& grad,
                              const c10::optional<at::Tensor>& momentum_buffer,
                              const c10::optional<at::Tensor>& grad_scale,
                              const c10::optional<at::Tensor>& found_inf, double lr,
                              double weight_decay, double momentum, double dampening,
                              bool nesterov, bool momentum_init, double grad_mult,
                              bool stochastic_rounding, int64_t seed, int64_t bucket_id,
                              int64_t step, int64_t offset) {
  check_bucket(param, "param");
  check_like(param, backup, "backup");
  check_like(param, grad, "grad");
  if (momentum_buffer.has_value()) check_like(param, *momentum_buffer, "momentum_buffer");
  check_scalar_tensor(grad_scale, param, "grad_scale");
  check_scalar_tensor(found_inf, param, "found_inf");
  if (stochastic_rounding) check_noise_args(seed, bucket_id, offset, 0);
  if (found_inf.has_value() && found_inf->item<float>() != 0.0f) {
    param.copy_(backup);  // skipped step: exact restore only, momentum untouched
    return;
  }
  double mult = grad_mult;
  if (grad_scale.has_value()) mult /= static_cast<double>(grad_scale->item<float>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "sam_restore_and_step_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const SamStepArgs<acc_t> a = make_sam_step_args<acc_t>(lr, weight_decay, momentum, dampening,
                                                          mult, nesterov, momentum_init);
    scalar_t* p = param.data_ptr<scalar_t>();
    const scalar_t* bk = backup.data_ptr<scalar_t>();
    const scalar_t* g = grad.data_ptr<scalar_t>();
    if constexpr (sizeof(scalar_t) == 2) {
      if (stochastic_rounding) {
        const PhiloxKey key = make_key(seed, bucket_id);
        if (momentum_buffer.has_value()) {
          restore_step_sr_typed<scalar_t, true>(p, bk, g, momentum_buffer->data_ptr<scalar_t>(),
                                                param.numel(), a, key, step, offset);
        } else {
          restore_step_sr_typed<scalar_t, false>(p, bk, g, nullptr, param.numel(), a, key, step, offset);
        }
        return;
      }
    }
    if (momentum_buffer.has_value()) {
      restore_step_typed<scalar_t, true>(p, bk, g, momentum_buffer->data_ptr<scalar_t>(), param.numel(), a);
    } else {
      restore_step_typed<scalar_t, false>(p, bk, g, nullptr, param.numel(), a);
    }
  });
}

void sam_probe_cpu(at::Tensor& param, at::Tensor& backup, int64_t seed, int64_t bucket_id,
                   int64_t step, double delta, int64_t offset) {
  check_bucket(param, "param");
  check_like(param, backup, "backup");
  check_noise_args(seed, bucket_id, offset, 0);
  const PhiloxKey key = make_key(seed, bucket_id);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "sam_probe_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* p = param.data_ptr<scalar_t>();
    scalar_t* bk = backup.data_ptr<scalar_t>();
    const acc_t d = static_cast<acc_t>(delta);
    // One Philox call per 4 elements (layout 3: v_i from w(16, i) = x_(i & 3)).
    at::parallel_for(0, param.numel(), kGrain, [&](int64_t i0, int64_t i1) {
      int64_t i = i0;
      while (i < i1) {
        const int64_t gi = offset + i;
        const Words4 w = noise_words(key, gi >> 2, step, kTagRademacher);
        const int64_t stop = std::min(i1, i + (4 - (gi & 3)));
        for (; i < stop; ++i) {
          const scalar_t th = p[i];
          bk[i] = th;
          const acc_t v = static_cast<acc_t>(rademacher(select_word(w, offset + i)));
          p[i] = static_cast<scalar_t>(static_cast<acc_t>(th) + d * v);
        }
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_flat, CPU, m) {
  m.impl("sam_grad_sq_norm", &sam_grad_sq_norm_cpu);
  m.impl("sam_perturb_", &sam_perturb_cpu);
  m.impl("sam_restore_and_step_", &sam_restore_and_step_cpu);
  m.impl("sam_probe_", &sam_probe_cpu);
}

}  // namespace fused_flat
