// CPU kernels of the SAM-family ops (schemas in csrc/sam_ops.cpp): one pass over a bucket
// (a list of tensors) per op, at::parallel_for over elements; per-element math in
// sam_elementwise.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "fused_flat/op_args.h"
#include "fused_flat/sam_elementwise.h"
#include "../list_args.h"
#include "plan_args.h"

namespace fused_flat {
namespace {

constexpr int64_t kGrain = int64_t(1) << 15;

// The sum of squares of elements [lo, hi) of one tensor (one reduction block): kLanes
// independent partial sums (element i goes to lane i % kLanes), added in a fixed order:
// vectorizable, and independent of the thread count.
template <typename scalar_t, bool kAdaptive>
double block_sq(const scalar_t* g, const scalar_t* p, int64_t lo, int64_t hi,
                at::opmath_type<scalar_t> eta) {
  using acc_t = at::opmath_type<scalar_t>;
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
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

template <typename scalar_t, bool kAd>
void perturb_range(scalar_t* p, const scalar_t* g, scalar_t* bk, int64_t i0, int64_t i1,
                   at::opmath_type<scalar_t> c, at::opmath_type<scalar_t> eta) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = i0; i < i1; ++i) {
    const scalar_t th = p[i];
    bk[i] = th;
    p[i] = static_cast<scalar_t>(
        sam_perturbed<kAd, acc_t>(static_cast<acc_t>(th), static_cast<acc_t>(g[i]), c, eta));
  }
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

// The SR variant over elements [i0, i1): one tag-0 and one tag-32 Philox call per 4
// elements (bucket index offset + i), as sam_probe_list_ walks its calls.
template <typename scalar_t, bool kMom>
void restore_step_sr_range(scalar_t* p, const scalar_t* bk, const scalar_t* g, scalar_t* m,
                           int64_t i0, int64_t i1, const SamStepArgs<at::opmath_type<scalar_t>>& a,
                           PhiloxKey key, int64_t step, int64_t offset) {
  using acc_t = at::opmath_type<scalar_t>;
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
}

template <typename scalar_t, bool kMom>
void restore_step_range(scalar_t* p, const scalar_t* bk, const scalar_t* g, scalar_t* m, int64_t i0,
                        int64_t i1, const SamStepArgs<at::opmath_type<scalar_t>>& a) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = i0; i < i1; ++i) {
    acc_t mm = kMom ? static_cast<acc_t>(m[i]) : acc_t(0);
    p[i] = static_cast<scalar_t>(sam_sgd_update<kMom, acc_t>(static_cast<acc_t>(bk[i]),
                                                             static_cast<acc_t>(g[i]), &mm, a));
    if (kMom) m[i] = static_cast<scalar_t>(mm);
  }
}

// Elements [i0, i1) of one tensor: the plain or the stochastically rounded update.
template <typename scalar_t>
void restore_step_piece(scalar_t* p, const scalar_t* bk, const scalar_t* g, scalar_t* m, int64_t i0,
                        int64_t i1, const SamStepArgs<at::opmath_type<scalar_t>>& a, bool sr,
                        PhiloxKey key, int64_t step, int64_t offset) {
  if constexpr (sizeof(scalar_t) == 2) {
    if (sr) {
      if (m != nullptr) restore_step_sr_range<scalar_t, true>(p, bk, g, m, i0, i1, a, key, step, offset);
      else restore_step_sr_range<scalar_t, false>(p, bk, g, m, i0, i1, a, key, step, offset);
      return;
    }
  }
  if (m != nullptr) restore_step_range<scalar_t, true>(p, bk, g, m, i0, i1, a);
  else restore_step_range<scalar_t, false>(p, bk, g, m, i0, i1, a);
}

// backup <- theta ; theta <- theta + d * v over elements [i0, i1) of a tensor whose element 0
// is bucket index offset: one Philox call per 4 elements (layout 3: v_i from w(16, i) = x_(i & 3)).
template <typename scalar_t, typename acc_t>
void probe_range(scalar_t* p, scalar_t* bk, int64_t i0, int64_t i1, PhiloxKey key, int64_t step,
                 int64_t offset, acc_t d) {
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
}

// ---- the ops: every tensor of a bucket in one parallel loop (the optimizers' passes call
// them, fused_flat.backends.base.from_list_ops). Without `layout` the tensors are 1-D contiguous buckets;
// with it (plan_layout's record of params: a step plan, csrc/cpu/plan_args.h) they are the
// user's own, of any shape, dense, walked in memory order; gradients are then read in their
// parameter's order and state tensors (backups, momentum buffers) must share its layout.
// Each element's value is a function of its tensor's values (and, for the noise, its bucket
// index) only, never of the list or the thread split.

// One parallel loop over the elements of a list: body(t, i0, i1) runs a piece of tensor t.
template <typename Body>
void for_list_elems(const std::vector<int64_t>& numels, const Body& body) {
  const size_t T = numels.size();
  std::vector<int64_t> start(T + 1, 0);
  for (size_t t = 0; t < T; ++t) start[t + 1] = start[t] + numels[t];
  if (start[T] == 0) return;
  at::parallel_for(0, start[T], kGrain, [&](int64_t b, int64_t e) {
    size_t t = static_cast<size_t>(std::upper_bound(start.begin(), start.end(), b) - start.begin()) - 1;
    while (b < e) {
      const int64_t piece_end = std::min(e, start[t + 1]);
      if (piece_end > b) body(t, b - start[t], piece_end - start[t]);
      b = piece_end;
      ++t;
    }
  });
}

// params (with a layout: against the record; else 1-D buckets of one dtype) and their
// companions: the gradients as the kernels read them (in the parameter's order), the state
// tensors checked.
std::vector<at::Tensor> sam_list_args(at::TensorList params, at::TensorList grads,
                                      std::initializer_list<std::pair<at::TensorList, const char*>> states,
                                      const c10::optional<at::Tensor>& layout, const char* op) {
  if (layout.has_value()) plan::check_layout(params, *layout, op);
  TORCH_CHECK(grads.size() == params.size(), "fused_flat.", op, ": ", params.size(), " params but ",
              grads.size(), " grads");
  std::vector<at::Tensor> out;
  out.reserve(grads.size());
  for (size_t t = 0; t < params.size(); ++t) {
    if (layout.has_value()) {
      out.push_back(plan::grad_in_order(params[t], grads[t]));
    } else {
      check_bucket(params[t], "param");
      TORCH_CHECK(params[t].scalar_type() == params[0].scalar_type() && params[t].device().is_cpu(),
                  "fused_flat.", op, ": every tensor of a list must be a CPU tensor of one dtype, got ",
                  params[0].scalar_type(), " and ", params[t].scalar_type(), " on ", params[t].device());
      check_like(params[t], grads[t], "grad");
      out.push_back(grads[t]);
    }
  }
  for (const auto& st : states) {
    if (st.first.empty()) continue;
    TORCH_CHECK(st.first.size() == params.size(), "fused_flat.", op, ": ", params.size(),
                " params but ", st.first.size(), " ", st.second, "s");
    for (size_t t = 0; t < params.size(); ++t) {
      if (layout.has_value()) plan::check_state(params[t], st.first[t], st.second, op);
      else check_like(params[t], st.first[t], st.second);
    }
  }
  return out;
}

// Per tensor t: sum_i s_i^2, s = g (SAM) or (|theta| + eta) g (ASAM: adaptive, params[t]),
// float64 [T]; params may be empty when not adaptive and without a layout. Fixed-size blocks
// (kSamReduceBlock) of every tensor in one loop, each tensor's summed in order: the same
// total for any thread count.
at::Tensor sam_grad_sq_norm_list_cpu(at::TensorList grads_in, at::TensorList params, bool adaptive,
                                     double eta_d, const c10::optional<at::Tensor>& layout) {
  const char* op = "sam_grad_sq_norm_list";
  std::vector<at::Tensor> grads;
  if (layout.has_value() || adaptive) {
    grads = sam_list_args(params, grads_in, {}, layout, op);
  } else {
    for (const at::Tensor& g : grads_in) {
      check_bucket(g, "grad");
      TORCH_CHECK(g.scalar_type() == grads_in[0].scalar_type() && g.device().is_cpu(), "fused_flat.",
                  op, ": every tensor of a list must be a CPU tensor of one dtype");
      grads.push_back(g);
    }
  }
  const size_t T = grads.size();
  at::Tensor out = at::zeros({static_cast<int64_t>(T)}, at::TensorOptions().dtype(at::kDouble));
  if (T == 0) return out;
  double* o = out.data_ptr<double>();
  std::vector<int64_t> bstart(T + 1, 0);
  for (size_t t = 0; t < T; ++t) {
    bstart[t + 1] = bstart[t] + (grads[t].numel() + kSamReduceBlock - 1) / kSamReduceBlock;
  }
  std::vector<double> partial(static_cast<size_t>(bstart[T]), 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[0].scalar_type(), "sam_grad_sq_norm_list", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t eta = static_cast<acc_t>(eta_d);
    at::parallel_for(0, bstart[T], 1, [&](int64_t b0, int64_t b1) {
      size_t t = static_cast<size_t>(std::upper_bound(bstart.begin(), bstart.end(), b0) - bstart.begin()) - 1;
      for (int64_t b = b0; b < b1; ++b) {
        while (b >= bstart[t + 1]) ++t;
        const int64_t n = grads[t].numel();
        const int64_t lo = (b - bstart[t]) * kSamReduceBlock;
        const int64_t hi = lo + kSamReduceBlock < n ? lo + kSamReduceBlock : n;
        const scalar_t* g = grads[t].data_ptr<scalar_t>();
        partial[static_cast<size_t>(b)] =
            adaptive ? block_sq<scalar_t, true>(g, params[t].data_ptr<scalar_t>(), lo, hi, eta)
                     : block_sq<scalar_t, false>(g, nullptr, lo, hi, eta);
      }
    });
  });
  for (size_t t = 0; t < T; ++t) {
    double total = 0.0;
    for (int64_t b = bstart[t]; b < bstart[t + 1]; ++b) total += partial[static_cast<size_t>(b)];
    o[t] = total;
  }
  return out;
}

void sam_perturb_list_cpu(at::TensorList params, at::TensorList grads_in, at::TensorList backups,
                          bool adaptive, double coef, double eta_d,
                          const c10::optional<at::Tensor>& layout,
                          const c10::optional<at::Tensor>& coef_tensor) {
  const std::vector<at::Tensor> grads =
      sam_list_args(params, grads_in, {{backups, "backup"}}, layout, "sam_perturb_list_");
  check_scalar_arg(coef_tensor, at::kCPU, "sam_perturb_list_", "coef_tensor", at::kDouble);
  coef = host_value(coef, coef_tensor);
  TORCH_CHECK(backups.size() == params.size(), "fused_flat.sam_perturb_list_: ", params.size(),
              " params but ", backups.size(), " backups");
  if (params.empty()) return;
  std::vector<int64_t> numels;
  for (const at::Tensor& p : params) numels.push_back(p.numel());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "sam_perturb_list_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t c = static_cast<acc_t>(coef), eta = static_cast<acc_t>(eta_d);
    for_list_elems(numels, [&](size_t t, int64_t i0, int64_t i1) {
      scalar_t* p = params[t].data_ptr<scalar_t>();
      scalar_t* bk = backups[t].data_ptr<scalar_t>();
      const scalar_t* g = grads[t].data_ptr<scalar_t>();
      if (adaptive) perturb_range<scalar_t, true>(p, g, bk, i0, i1, c, eta);
      else perturb_range<scalar_t, false>(p, g, bk, i0, i1, c, eta);
    });
  });
}

void sam_restore_and_step_list_cpu(at::TensorList params, at::TensorList backups,
                                   at::TensorList grads_in, at::TensorList moms,
                                   const c10::optional<at::Tensor>& grad_scale,
                                   const c10::optional<at::Tensor>& found_inf, double lr,
                                   double weight_decay, double momentum, double dampening,
                                   bool nesterov, bool momentum_init, double grad_mult,
                                   bool stochastic_rounding, int64_t seed, int64_t bucket_id,
                                   int64_t step, at::IntArrayRef offsets,
                                   const c10::optional<at::Tensor>& layout,
                                   const c10::optional<at::Tensor>& lr_t,
                                   const c10::optional<at::Tensor>& step_t) {
  const char* op = "sam_restore_and_step_list_";
  check_float_arg(lr_t, at::kCPU, op, "lr_t");
  check_step_arg(step_t, at::kCPU, op);
  lr = host_value(lr, lr_t);
  step = host_value(step, step_t);
  const std::vector<at::Tensor> grads = sam_list_args(
      params, grads_in, {{backups, "backup"}, {moms, "momentum_buffer"}}, layout, op);
  TORCH_CHECK(backups.size() == params.size(), "fused_flat.", op, ": ", params.size(),
              " params but ", backups.size(), " backups");
  if (params.empty()) return;
  check_scalar_tensor(grad_scale, params[0], "grad_scale");
  check_scalar_tensor(found_inf, params[0], "found_inf");
  if (stochastic_rounding) {
    TORCH_CHECK(offsets.size() == params.size(), "fused_flat.", op, ": ", params.size(),
                " params but ", offsets.size(), " offsets (stochastic rounding needs them)");
    for (int64_t off : offsets) check_noise_args(seed, bucket_id, off, 0);
  }
  if (found_inf.has_value() && found_inf->item<float>() != 0.0f) {
    for (size_t t = 0; t < params.size(); ++t) {
      at::Tensor p = params[t];
      p.copy_(backups[t]);  // skipped step: exact restore only, momentum untouched
    }
    return;
  }
  double mult = grad_mult;
  if (grad_scale.has_value()) mult /= static_cast<double>(grad_scale->item<float>());
  std::vector<int64_t> numels;
  for (const at::Tensor& p : params) numels.push_back(p.numel());
  const PhiloxKey key = make_key(seed, bucket_id);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "sam_restore_and_step_list_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const SamStepArgs<acc_t> a = make_sam_step_args<acc_t>(lr, weight_decay, momentum, dampening,
                                                          mult, nesterov, momentum_init);
    for_list_elems(numels, [&](size_t t, int64_t i0, int64_t i1) {
      restore_step_piece<scalar_t>(params[t].data_ptr<scalar_t>(), backups[t].data_ptr<scalar_t>(),
                                   grads[t].data_ptr<scalar_t>(),
                                   moms.empty() ? nullptr : moms[t].data_ptr<scalar_t>(), i0, i1, a,
                                   stochastic_rounding, key, step,
                                   stochastic_rounding ? offsets[t] : 0);
    });
  });
}

// sam_probe_ over a list (1-D buckets of one dtype), every tensor in one parallel loop.
void sam_probe_list_cpu(at::TensorList params, at::TensorList backups, at::IntArrayRef offsets,
                        int64_t seed, int64_t bucket_id, int64_t step, double delta,
                        const c10::optional<at::Tensor>& step_t) {
  const char* op = "sam_probe_list_";
  TORCH_CHECK(backups.size() == params.size() && offsets.size() == params.size(), "fused_flat.",
              op, ": ", params.size(), " params, ", backups.size(), " backups and ",
              offsets.size(), " offsets (one of each per param)");
  for (size_t t = 0; t < params.size(); ++t) {
    check_bucket(params[t], "param");
    TORCH_CHECK(params[t].scalar_type() == params[0].scalar_type() && params[t].device().is_cpu(),
                "fused_flat.", op, ": every tensor of a list must be a CPU tensor of one dtype, got ",
                params[0].scalar_type(), " and ", params[t].scalar_type(), " on ", params[t].device());
    check_like(params[t], backups[t], "backup");
    check_noise_args(seed, bucket_id, offsets[t], 0);
  }
  check_step_arg(step_t, at::kCPU, op);
  step = host_value(step, step_t);
  if (params.empty()) return;
  std::vector<int64_t> numels;
  for (const at::Tensor& p : params) numels.push_back(p.numel());
  const PhiloxKey key = make_key(seed, bucket_id);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "sam_probe_list_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t d = static_cast<acc_t>(delta);
    for_list_elems(numels, [&](size_t t, int64_t i0, int64_t i1) {
      probe_range(params[t].data_ptr<scalar_t>(), backups[t].data_ptr<scalar_t>(), i0, i1, key,
                  step, offsets[t], d);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_flat, CPU, m) {
  m.impl("sam_grad_sq_norm_list", &sam_grad_sq_norm_list_cpu);
  m.impl("sam_perturb_list_", &sam_perturb_list_cpu);
  m.impl("sam_restore_and_step_list_", &sam_restore_and_step_list_cpu);
  m.impl("sam_probe_list_", &sam_probe_list_cpu);
}

}  // namespace fused_flat
