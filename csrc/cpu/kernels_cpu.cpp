// CPU implementations of the fused_flat ops: one pass over a bucket (a list of tensors) per op,
// parallel over Philox calls (4 elements each, noise layout 3) with at::parallel_for
// (OpenMP); the loops are loops.h with the noise generator of the best ISA (baseline,
// AVX2, AVX-512; FUSED_FLAT_CPU_ISA forces one). Every element's value is
// a function of its bucket index alone (ALGORITHMS.md §1), never of the thread split,
// and the per-element math is fused_flat/elementwise.h, shared with the CUDA kernels.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>
#include <cstdlib>
#include <string>
#include <cstring>
#include <type_traits>
#include <utility>

#include "fused_flat/elementwise.h"
#include "fused_flat/op_args.h"
#include "loops.h"
#include "../list_args.h"
#include "plan_args.h"

namespace fused_flat {

namespace cpu {
IsaLoops loops_baseline() { return IsaLoopsOf<PortableNoise>::table(); }
// Stochastic-rounding formats of the c10 16-bit types (loops.h).
template <>
struct Fmt16<at::BFloat16> {
  static constexpr int kind = 1;
};
template <>
struct Fmt16<at::Half> {
  static constexpr int kind = 2;
};
}  // namespace cpu

namespace {

using cpu::bf16_t;
using cpu::IsaLoops;

constexpr int64_t kGrainCalls = int64_t(1) << 12;   // 16K elements per task at least

enum class Isa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

bool cpu_has(Isa isa) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  switch (isa) {
    case Isa::kBaseline: return true;
    case Isa::kAvx2: return cpu::avx2_compiled() && __builtin_cpu_supports("avx2");
    case Isa::kAvx512:
      return cpu::avx512_compiled() && __builtin_cpu_supports("avx512f") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl");
  }
  return false;
#else
  return isa == Isa::kBaseline;
#endif
}

const char* isa_name(Isa isa) {
  return isa == Isa::kAvx512 ? "avx512" : isa == Isa::kAvx2 ? "avx2" : "baseline";
}

// The ISA of the CPU loops: the best the CPU supports, or FUSED_FLAT_CPU_ISA
// (baseline | avx2 | avx512 | auto), read at every call so tests can force each path.
// Asking for an ISA the CPU (or the build) lacks is an error, never a silent fallback.
Isa current_isa() {
  static const Isa best = cpu_has(Isa::kAvx512) ? Isa::kAvx512
                          : cpu_has(Isa::kAvx2) ? Isa::kAvx2
                                                : Isa::kBaseline;
  const char* env = std::getenv("FUSED_FLAT_CPU_ISA");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "auto") == 0) return best;
  Isa want;
  if (std::strcmp(env, "baseline") == 0) want = Isa::kBaseline;
  else if (std::strcmp(env, "avx2") == 0) want = Isa::kAvx2;
  else if (std::strcmp(env, "avx512") == 0) want = Isa::kAvx512;
  else TORCH_CHECK(false, "fused_flat: FUSED_FLAT_CPU_ISA must be baseline, avx2, avx512 or auto, got '", env, "'");
  TORCH_CHECK(cpu_has(want), "fused_flat: FUSED_FLAT_CPU_ISA=", env,
              " but this CPU (or this build) does not support it");
  return want;
}

const IsaLoops& loops() {
  static const IsaLoops tables[3] = {cpu::loops_baseline(), cpu::loops_avx2(), cpu::loops_avx512()};
  return tables[static_cast<int>(current_isa())];
}

// Splits the slice [offset, offset + n) into its edge elements (a partly covered Philox
// call at either end, done serially by edge(local_index, global_index)) and whole calls,
// returned as [j_begin, j_end) for the parallel loops.
template <typename Edge>
std::pair<int64_t, int64_t> split_edges(int64_t offset, int64_t n, const Edge& edge) {
  if (n <= 0) return {0, 0};
  const int64_t g1 = offset + n;
  int64_t a = (offset + 3) & ~int64_t(3);   // first element of a whole call
  int64_t b = g1 & ~int64_t(3);             // end of the last whole call
  if (a >= b) {                              // no whole call
    for (int64_t gi = offset; gi < g1; ++gi) edge(gi - offset, gi);
    return {0, 0};
  }
  for (int64_t gi = offset; gi < a; ++gi) edge(gi - offset, gi);
  for (int64_t gi = b; gi < g1; ++gi) edge(gi - offset, gi);
  return {a >> 2, b >> 2};
}

// The edge elements of perturb over [offset, offset + n) (done here, serially); returns the
// range of whole Philox calls left for perturb_calls_typed.
template <typename scalar_t>
std::pair<int64_t, int64_t> perturb_edges(scalar_t* __restrict__ p, int64_t n, PhiloxKey key,
                                          int64_t step, uint32_t tag, double sigma_d,
                                          int64_t offset) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t sigma = static_cast<acc_t>(sigma_d);
  return split_edges(offset, n, [&](int64_t i, int64_t gi) {
    const float e = element_normal(key, step, tag, gi);
    p[i] = static_cast<scalar_t>(static_cast<acc_t>(p[i]) + sigma * static_cast<acc_t>(e));
  });
}

// Whole calls [j0, j1) of perturb (p: the tensor whose element 0 is bucket index offset).
template <typename scalar_t>
void perturb_calls_typed(const IsaLoops& L, scalar_t* __restrict__ p, int64_t j0, int64_t j1,
                         PhiloxKey key, int64_t step, uint32_t tag, double sigma_d,
                         int64_t offset) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t sigma = static_cast<acc_t>(sigma_d);
  if constexpr (std::is_same<scalar_t, float>::value) {
    L.perturb_f32(p, j0, j1, offset, key, step, tag, sigma);
  } else if constexpr (std::is_same<scalar_t, at::BFloat16>::value) {
    L.perturb_bf16(reinterpret_cast<bf16_t*>(p), j0, j1, offset, key, step, tag, sigma);
  } else {
    cpu::perturb_calls<scalar_t, acc_t, cpu::PortableNoise>(p, j0, j1, offset, key, step, tag, sigma);
  }
}

// One parallel loop over the whole calls of a list of tensors: ranges[t] = [j0, j1) of
// tensor t (after its edges); body(t, j0, j1) runs a piece of one tensor. The split into
// tasks depends on the thread count; the values never do (each element is a function of
// its bucket index).
template <typename Body>
void for_list_calls(const std::vector<std::pair<int64_t, int64_t>>& ranges, const Body& body) {
  const size_t T = ranges.size();
  std::vector<int64_t> start(T + 1, 0);
  for (size_t t = 0; t < T; ++t) start[t + 1] = start[t] + (ranges[t].second - ranges[t].first);
  if (start[T] == 0) return;
  at::parallel_for(0, start[T], kGrainCalls, [&](int64_t b, int64_t e) {
    size_t t = static_cast<size_t>(std::upper_bound(start.begin(), start.end(), b) - start.begin()) - 1;
    while (b < e) {
      const int64_t piece_end = std::min(e, start[t + 1]);
      if (piece_end > b) {
        body(t, ranges[t].first + (b - start[t]), ranges[t].first + (piece_end - start[t]));
      }
      b = piece_end;
      ++t;
    }
  });
}

template <bool kMom, bool kEps, bool kXi, typename scalar_t, typename acc_t>
void update_element(scalar_t* p, const scalar_t* g, scalar_t* m, int64_t i, int64_t gi,
                    PhiloxKey key, int64_t step, uint32_t tag, const StepArgs<acc_t>& a,
                    bool sr) {
  float e, x;
  element_noise<kEps, kXi>(key, step, tag, gi, e, x);
  if (sr) {
    cpu::update_one<scalar_t, acc_t, kMom, true>(p, g, m, i, e, x, a, element_sr_bits(key, step, gi));
  } else {
    cpu::update_one<scalar_t, acc_t, kMom>(p, g, m, i, e, x, a);
  }
}

template <typename scalar_t>
int restore_variant(bool has_momentum, const StepArgs<at::opmath_type<scalar_t>>& a, bool sr) {
  return (has_momentum ? 1 : 0) | (a.sigma != 0 ? 2 : 0) | (a.noise_std != 0 ? 4 : 0) | (sr ? 8 : 0);
}

template <typename scalar_t>
std::pair<int64_t, int64_t> restore_edges(scalar_t* __restrict__ p, const scalar_t* __restrict__ g,
                                          scalar_t* __restrict__ m, int64_t n, PhiloxKey key,
                                          int64_t step, uint32_t tag, int64_t offset,
                                          const StepArgs<at::opmath_type<scalar_t>>& a, bool sr) {
  const int base_variant = restore_variant<scalar_t>(m != nullptr, a, false);
  return split_edges(offset, n, [&](int64_t i, int64_t gi) {
    switch (base_variant) {
      case 0: return update_element<false, false, false>(p, g, m, i, gi, key, step, tag, a, sr);
      case 1: return update_element<true, false, false>(p, g, m, i, gi, key, step, tag, a, sr);
      case 2: return update_element<false, true, false>(p, g, m, i, gi, key, step, tag, a, sr);
      case 3: return update_element<true, true, false>(p, g, m, i, gi, key, step, tag, a, sr);
      case 4: return update_element<false, false, true>(p, g, m, i, gi, key, step, tag, a, sr);
      case 5: return update_element<true, false, true>(p, g, m, i, gi, key, step, tag, a, sr);
      case 6: return update_element<false, true, true>(p, g, m, i, gi, key, step, tag, a, sr);
      default: return update_element<true, true, true>(p, g, m, i, gi, key, step, tag, a, sr);
    }
  });
}

template <typename scalar_t>
void restore_calls_typed(const IsaLoops& L, int variant, scalar_t* __restrict__ p,
                         const scalar_t* __restrict__ g, scalar_t* __restrict__ m, int64_t j0,
                         int64_t j1, int64_t offset, PhiloxKey key, int64_t step, uint32_t tag,
                         const StepArgs<at::opmath_type<scalar_t>>& a) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (std::is_same<scalar_t, float>::value) {
    L.update_f32(variant, p, g, m, j0, j1, offset, key, step, tag, a);
  } else if constexpr (std::is_same<scalar_t, at::BFloat16>::value) {
    L.update_bf16(variant, reinterpret_cast<bf16_t*>(p), reinterpret_cast<const bf16_t*>(g),
                  reinterpret_cast<bf16_t*>(m), j0, j1, offset, key, step, tag, a);
  } else {
    cpu::update_calls_dispatch<scalar_t, acc_t, cpu::PortableNoise>(variant, p, g, m, j0, j1, offset,
                                                                    key, step, tag, a);
  }
}

// ---- list forms: every tensor of a bucket in one parallel loop (one OpenMP region per
// pass). Tensor t's element 0 is at bucket index offsets[t]; all tensors of one call share a
// dtype; each element's value is a function of its bucket index only. Without a layout
// the tensors are 1-D contiguous buckets (flat views); with one (plan_layout's record of
// params, a step plan: plan_args.h) they are the user's own tensors of any shape, dense,
// walked in memory order, and the gradients are checked against their parameters.
void check_list(at::TensorList params, at::IntArrayRef offsets, const char* op,
                const c10::optional<at::Tensor>& layout) {
  TORCH_CHECK(offsets.size() == params.size(), "fused_flat.", op, ": ", params.size(),
              " params but ", offsets.size(), " offsets");
  if (layout.has_value()) plan::check_layout(params, *layout, op);
  for (size_t t = 0; t < params.size(); ++t) {
    if (!layout.has_value()) {
      check_bucket(params[t], "param");
      TORCH_CHECK(params[t].device().is_cpu(), "fused_flat.", op, ": CPU tensors expected, got ",
                  params[t].device());
      TORCH_CHECK(params[t].scalar_type() == params[0].scalar_type(), "fused_flat.", op,
                  ": every tensor of a list must have one dtype, got ", params[0].scalar_type(),
                  " and ", params[t].scalar_type());
    }
    TORCH_CHECK(offsets[t] >= 0, "fused_flat.", op, ": offsets must be >= 0, got ", offsets[t]);
  }
}

// The gradients of a list op as its kernels read them: checked against their parameters,
// in the parameter's memory order (copied when laid out otherwise) with a layout; the 1-D
// bucket checks without.
std::vector<at::Tensor> list_grads(at::TensorList params, at::TensorList grads, const char* op,
                                   bool planned) {
  TORCH_CHECK(grads.size() == params.size(), "fused_flat.", op, ": ", params.size(),
              " params but ", grads.size(), " grads");
  std::vector<at::Tensor> out;
  out.reserve(grads.size());
  for (size_t t = 0; t < params.size(); ++t) {
    if (planned) {
      out.push_back(plan::grad_in_order(params[t], grads[t]));
    } else {
      check_like(params[t], grads[t], "grad");
      out.push_back(grads[t]);
    }
  }
  return out;
}

void perturb_list_cpu(at::TensorList params, at::IntArrayRef offsets, int64_t seed,
                      int64_t bucket_id, int64_t step, int64_t tag, double sigma,
                      const c10::optional<at::Tensor>& layout,
                      const c10::optional<at::Tensor>& step_t) {
  check_list(params, offsets, "perturb_list_", layout);
  check_step_arg(step_t, at::kCPU, "perturb_list_");
  step = host_value(step, step_t);
  check_noise_args(seed, bucket_id, 0, tag);
  TORCH_CHECK(tag >= 0, "fused_flat.perturb_list_: tag must be >= 0, got ", tag);
  if (sigma == 0.0 || params.empty()) return;
  const PhiloxKey key = make_key(seed, bucket_id);
  const uint32_t t32 = static_cast<uint32_t>(tag);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "perturb_list_", [&] {
    std::vector<scalar_t*> ps(params.size());
    std::vector<std::pair<int64_t, int64_t>> ranges(params.size());
    for (size_t t = 0; t < params.size(); ++t) {
      ps[t] = params[t].data_ptr<scalar_t>();
      ranges[t] = perturb_edges(ps[t], params[t].numel(), key, step, t32, sigma, offsets[t]);
    }
    const IsaLoops& L = loops();
    for_list_calls(ranges, [&](size_t t, int64_t j0, int64_t j1) {
      perturb_calls_typed(L, ps[t], j0, j1, key, step, t32, sigma, offsets[t]);
    });
  });
}

void restore_and_step_list_cpu(at::TensorList params, at::TensorList grads_in, at::TensorList moms,
                               at::IntArrayRef offsets, const c10::optional<at::Tensor>& grad_scale,
                               const c10::optional<at::Tensor>& found_inf, int64_t seed,
                               int64_t bucket_id, int64_t step, int64_t restore_tag, double sigma,
                               double lr, double weight_decay, double momentum, double dampening,
                               bool nesterov, bool momentum_init, double noise_std, double grad_mult,
                               bool stochastic_rounding, const c10::optional<at::Tensor>& layout,
                               const c10::optional<at::Tensor>& step_t,
                               const c10::optional<at::Tensor>& lr_t,
                               const c10::optional<at::Tensor>& noise_std_t) {
  check_list(params, offsets, "restore_and_step_list_", layout);
  check_step_arg(step_t, at::kCPU, "restore_and_step_list_");
  check_float_arg(lr_t, at::kCPU, "restore_and_step_list_", "lr_t");
  check_float_arg(noise_std_t, at::kCPU, "restore_and_step_list_", "noise_std_t");
  step = host_value(step, step_t);
  lr = host_value(lr, lr_t);
  noise_std = host_value(noise_std, noise_std_t);
  TORCH_CHECK(grads_in.size() == params.size() && (moms.empty() || moms.size() == params.size()),
              "fused_flat.restore_and_step_list_: ", params.size(), " params, ", grads_in.size(),
              " grads, ", moms.size(), " moms (moms: one per param, or none)");
  const std::vector<at::Tensor> grads =
      list_grads(params, grads_in, "restore_and_step_list_", layout.has_value());
  for (size_t t = 0; t < params.size() && !moms.empty(); ++t) {
    if (layout.has_value()) plan::check_state(params[t], moms[t], "momentum_buffer", "restore_and_step_list_");
    else check_like(params[t], moms[t], "momentum_buffer");
  }
  if (params.empty()) return;
  check_scalar_tensor(grad_scale, params[0], "grad_scale");
  check_scalar_tensor(found_inf, params[0], "found_inf");
  check_noise_args(seed, bucket_id, 0, restore_tag);
  TORCH_CHECK(restore_tag >= 0 || sigma == 0.0,
              "fused_flat.restore_and_step_list_: restore_tag must be >= 0 when sigma != 0");
  if (found_inf.has_value() && found_inf->item<float>() != 0.0f) {
    // Skipped step (non-finite gradient): undo the perturbation only; m untouched.
    if (sigma != 0.0)
      perturb_list_cpu(params, offsets, seed, bucket_id, step, restore_tag, -sigma, layout, c10::nullopt);
    return;
  }
  double mult = grad_mult;
  if (grad_scale.has_value()) mult /= static_cast<double>(grad_scale->item<float>());
  const PhiloxKey key = make_key(seed, bucket_id);
  const uint32_t rtag = restore_tag < 0 ? 0u : static_cast<uint32_t>(restore_tag);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "restore_and_step_list_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const StepArgs<acc_t> a = make_step_args<acc_t>(sigma, lr, weight_decay, momentum, dampening,
                                                   noise_std, mult, nesterov, momentum_init);
    const bool sr = stochastic_rounding && cpu::Fmt16<scalar_t>::kind != 0;
    const size_t T = params.size();
    std::vector<scalar_t*> ps(T), ms(T, nullptr);
    std::vector<const scalar_t*> gs(T);
    std::vector<std::pair<int64_t, int64_t>> ranges(T);
    for (size_t t = 0; t < T; ++t) {
      ps[t] = params[t].data_ptr<scalar_t>();
      gs[t] = grads[t].data_ptr<scalar_t>();
      if (!moms.empty()) ms[t] = moms[t].data_ptr<scalar_t>();
      ranges[t] = restore_edges(ps[t], gs[t], ms[t], params[t].numel(), key, step, rtag,
                                offsets[t], a, sr);
    }
    // from the list, not from ms[0]: an empty first tensor has no data pointer
    const int variant = restore_variant<scalar_t>(!moms.empty(), a, sr);
    const IsaLoops& L = loops();
    for_list_calls(ranges, [&](size_t t, int64_t j0, int64_t j1) {
      restore_calls_typed(L, variant, ps[t], gs[t], ms[t], j0, j1, offsets[t], key, step, rtag, a);
    });
  });
}

// The restore half of a checked step, fp32 buckets (LangevinOptimizer with check_finite on
// the cpp backend): params[t] <- params[t] + sigma * z(tag) (sigma: minus the perturbation's)
// and found_inf = 1.0 if any element of any grads[t] is inf/NaN, in one parallel loop whose
// gradient reads overlap the noise generation. The update then runs without a restore
// (sigma 0) when found_inf is 0; on a skip the parameters are already restored. Same values
// as the fused restore_and_step_list_ (theta - sigma * eps is rounded to fp32 there too).
at::Tensor restore_check_list_cpu(at::TensorList params, at::TensorList grads_in,
                                  at::IntArrayRef offsets, int64_t seed, int64_t bucket_id,
                                  int64_t step, int64_t tag, double sigma,
                                  const c10::optional<at::Tensor>& layout) {
  check_list(params, offsets, "restore_check_list_", layout);
  const std::vector<at::Tensor> grads =
      list_grads(params, grads_in, "restore_check_list_", layout.has_value());
  for (size_t t = 0; t < params.size(); ++t) {
    TORCH_CHECK(params[t].scalar_type() == at::kFloat,
                "fused_flat.restore_check_list_: float32 buckets only, got ", params[t].scalar_type());
  }
  check_noise_args(seed, bucket_id, 0, tag);
  TORCH_CHECK(tag >= 0, "fused_flat.restore_check_list_: tag must be >= 0, got ", tag);
  at::Tensor found = at::zeros({1}, at::TensorOptions().dtype(at::kFloat));
  if (params.empty()) return found;
  const PhiloxKey key = make_key(seed, bucket_id);
  const uint32_t t32 = static_cast<uint32_t>(tag);
  const float s = static_cast<float>(sigma);
  const size_t T = params.size();
  std::vector<float*> ps(T);
  std::vector<const uint32_t*> gs(T);
  std::vector<std::pair<int64_t, int64_t>> ranges(T);
  bool edge_bad = false;
  for (size_t t = 0; t < T; ++t) {
    ps[t] = params[t].data_ptr<float>();
    gs[t] = static_cast<const uint32_t*>(grads[t].data_ptr());
    const int64_t n = params[t].numel();
    ranges[t] = perturb_edges(ps[t], n, key, step, t32, sigma, offsets[t]);
    // the gradient elements outside the whole calls (the edges), checked here
    const int64_t a = ranges[t].second > ranges[t].first ? 4 * ranges[t].first - offsets[t] : n;
    const int64_t b = ranges[t].second > ranges[t].first ? 4 * ranges[t].second - offsets[t] : n;
    for (int64_t i = 0; i < a; ++i) edge_bad |= (gs[t][i] & 0x7F800000u) == 0x7F800000u;
    for (int64_t i = b; i < n; ++i) edge_bad |= (gs[t][i] & 0x7F800000u) == 0x7F800000u;
  }
  std::atomic<bool> bad{edge_bad};
  const IsaLoops& L = loops();
  for_list_calls(ranges, [&](size_t t, int64_t j0, int64_t j1) {
    if (L.perturb_check_f32(ps[t], gs[t], j0, j1, offsets[t], key, step, t32, s)) {
      bad.store(true, std::memory_order_relaxed);
    }
  });
  if (bad.load()) found.fill_(1.0f);
  return found;
}

// param <- round-to-nearest(master + sigma * z(tag)): master fp32, param bf16/fp16/fp32.
// The normals come from the ISA's generator (loops().normals) in L1 chunks.
template <typename scalar_t>
void perturb_from_typed(scalar_t* __restrict__ p, const float* __restrict__ ms, int64_t n,
                        PhiloxKey key, int64_t step, uint32_t tag, float sigma, int64_t offset) {
  const auto range = split_edges(offset, n, [&](int64_t i, int64_t gi) {
    const float e = sigma != 0.0f ? element_normal(key, step, tag, gi) : 0.0f;
    p[i] = static_cast<scalar_t>(ms[i] + sigma * e);
  });
  const IsaLoops& L = loops();
  at::parallel_for(range.first, range.second, kGrainCalls, [&](int64_t j0, int64_t j1) {
    alignas(64) float z[cpu::kChunkElems];
    for (int64_t jc = j0; jc < j1; jc += cpu::kChunkCalls) {
      const int64_t nc = j1 - jc < cpu::kChunkCalls ? j1 - jc : cpu::kChunkCalls;
      const int64_t base = 4 * jc - offset;
      const int64_t ne = 4 * nc;
      if (sigma != 0.0f) {
        L.normals(key, step, tag, jc, nc, z);
        for (int64_t k = 0; k < ne; ++k) p[base + k] = static_cast<scalar_t>(ms[base + k] + sigma * z[k]);
      } else {
        for (int64_t k = 0; k < ne; ++k) p[base + k] = static_cast<scalar_t>(ms[base + k]);
      }
    }
  });
}

void perturb_from_cpu(at::Tensor& param, const at::Tensor& master, int64_t seed, int64_t bucket_id,
                      int64_t step, int64_t tag, double sigma, int64_t offset) {
  check_perturb_from_args(param, master, seed, bucket_id, tag, offset);
  const PhiloxKey key = make_key(seed, bucket_id);
  const float* ms = master.data_ptr<float>();
  const float s = static_cast<float>(sigma);
  const uint32_t t = static_cast<uint32_t>(tag);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "perturb_from_", [&] {
    if constexpr (!std::is_same<scalar_t, double>::value) {
      perturb_from_typed<scalar_t>(param.data_ptr<scalar_t>(), ms, param.numel(), key, step, t, s, offset);
    }
  });
}

at::Tensor philox_words_cpu(int64_t seed, int64_t bucket_id, int64_t step, int64_t tag,
                            int64_t first_call, int64_t n_calls) {
  // first_call is taken as the bit pattern of a uint64 (so Random123's test vectors,
  // whose counters have the top bit set, can be checked). Call j serves elements 4j..4j+3.
  check_noise_args(seed, bucket_id, 0, tag);
  TORCH_CHECK(n_calls >= 0, "fused_flat.philox_words: n_calls must be >= 0");
  at::Tensor out = at::empty({n_calls, 4}, at::TensorOptions().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  const PhiloxKey key = make_key(seed, bucket_id);
  at::parallel_for(0, n_calls, kGrainCalls, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const Words4 w = noise_words(key, first_call + r, step, static_cast<uint32_t>(tag));
      o[4 * r + 0] = w.x0;
      o[4 * r + 1] = w.x1;
      o[4 * r + 2] = w.x2;
      o[4 * r + 3] = w.x3;
    }
  });
  return out;
}

// w(tag, i) = x_(i & 3) of elements [offset, offset + n), int64 in [0, 2^32).
at::Tensor element_words_cpu(int64_t seed, int64_t bucket_id, int64_t step, int64_t tag,
                             int64_t offset, int64_t n) {
  check_noise_args(seed, bucket_id, offset, tag);
  TORCH_CHECK(n >= 0, "fused_flat.element_words: n must be >= 0");
  at::Tensor out = at::empty({n}, at::TensorOptions().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  const PhiloxKey key = make_key(seed, bucket_id);
  at::parallel_for(0, n, 4 * kGrainCalls, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) o[i] = element_word(key, step, static_cast<uint32_t>(tag), offset + i);
  });
  return out;
}

// z(tag, i) of elements [offset, offset + n), float32, through the CPU's noise generator.
at::Tensor normal_noise_cpu(int64_t seed, int64_t bucket_id, int64_t step, int64_t tag,
                            int64_t offset, int64_t n) {
  check_noise_args(seed, bucket_id, offset, tag);
  TORCH_CHECK(tag >= 0, "fused_flat.normal_noise: tag must be >= 0, got ", tag);
  TORCH_CHECK(n >= 0, "fused_flat.normal_noise: n must be >= 0");
  at::Tensor out = at::empty({n}, at::TensorOptions().dtype(at::kFloat));
  float* z = out.data_ptr<float>();
  const PhiloxKey key = make_key(seed, bucket_id);
  const uint32_t t = static_cast<uint32_t>(tag);
  const auto range = split_edges(offset, n, [&](int64_t i, int64_t gi) {
    z[i] = element_normal(key, step, t, gi);
  });
  const IsaLoops& L = loops();
  at::parallel_for(range.first, range.second, kGrainCalls, [&](int64_t j0, int64_t j1) {
    L.normals(key, step, t, j0, j1 - j0, z + (4 * j0 - offset));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gaussian_noise_cpu(int64_t seed, int64_t bucket_id, int64_t step,
                                                      int64_t tag, int64_t offset, int64_t n) {
  return {normal_noise_cpu(seed, bucket_id, step, tag, offset, n),
          normal_noise_cpu(seed, bucket_id, step, kTagXi, offset, n)};
}

// The noise roofline: z of n elements (whole calls from 0) for each tag, generated into
// per-thread L1 buffers with no parameter traffic. Returns a float32 checksum.
at::Tensor noise_roofline_cpu(int64_t seed, int64_t bucket_id, int64_t step, at::IntArrayRef tags,
                              int64_t n) {
  check_noise_args(seed, bucket_id, 0, 0);
  TORCH_CHECK(n >= 0 && tags.size() <= 8, "fused_flat.noise_roofline: n >= 0 and at most 8 tags");
  uint32_t t[8];
  for (size_t k = 0; k < tags.size(); ++k) {
    check_noise_args(seed, bucket_id, 0, tags[k]);
    t[k] = static_cast<uint32_t>(tags[k]);
  }
  const int nt = static_cast<int>(tags.size());
  const PhiloxKey key = make_key(seed, bucket_id);
  const IsaLoops& L = loops();
  const int64_t calls = (n + 3) >> 2;
  std::atomic<uint32_t> sink{0};
  at::parallel_for(0, calls, kGrainCalls, [&](int64_t j0, int64_t j1) {
    const float s = L.noise_only(j0, j1, key, step, t, nt);
    sink.fetch_xor(float_bits(s));
  });
  return at::scalar_tensor(bits_float(sink.load()), at::TensorOptions().dtype(at::kFloat));
}

std::string cpu_isa_op() { return isa_name(current_isa()); }

// Whether any element of the (floating point, CPU, strided) tensors is inf or nan: one
// parallel loop over the elements of all tensors (pieces of one tensor per task). A dense
// tensor is read in memory order where it lies; any other is made contiguous first.
bool any_nonfinite(const std::vector<at::Tensor>& tensors) {
  const IsaLoops& L = loops();
  std::vector<at::Tensor> ts;
  std::vector<int64_t> start(1, 0);
  for (const at::Tensor& t0 : tensors) {
    if (t0.numel() == 0 || !at::isFloatingType(t0.scalar_type())) continue;
    ts.push_back(t0.is_non_overlapping_and_dense() ? t0 : t0.contiguous());
    start.push_back(start.back() + t0.numel());
  }
  std::atomic<bool> any{false};
  auto piece = [&](size_t t, int64_t b, int64_t e) -> bool {
    const at::Tensor& x = ts[t];
    const size_t es = x.element_size();
    const void* base = x.data_ptr();
    if (es == 4) return L.any_nonfinite32(static_cast<const uint32_t*>(base) + b, e - b, 0x7F800000u);
    if (es == 2) return L.any_nonfinite16(static_cast<const uint16_t*>(base) + b, e - b,
                                          x.scalar_type() == at::kHalf ? 0x7C00u : 0x7F80u);
    return L.any_nonfinite64(static_cast<const uint64_t*>(base) + b, e - b);
  };
  if (!ts.empty()) {
    at::parallel_for(0, start.back(), int64_t(1) << 16, [&](int64_t b, int64_t e) {
      size_t t = static_cast<size_t>(std::upper_bound(start.begin(), start.end(), b) - start.begin()) - 1;
      while (b < e && !any.load(std::memory_order_relaxed)) {
        const int64_t pe = std::min(e, start[t + 1]);
        if (pe > b && piece(t, b - start[t], pe - start[t])) any.store(true, std::memory_order_relaxed);
        b = pe;
        ++t;
      }
    });
  }
  return any.load();
}

// found_inf of a list of tensors: 1.0 if any element is inf or nan (float32, shape [1]).
at::Tensor all_finite_cpu(at::TensorList tensors) {
  at::Tensor found = at::zeros({1}, at::TensorOptions().dtype(at::kFloat));
  std::vector<at::Tensor> ts;
  ts.reserve(tensors.size());
  for (const at::Tensor& t0 : tensors) {
    TORCH_CHECK(t0.device().is_cpu(), "fused_flat.all_finite: CPU tensors expected, got ", t0.device());
    ts.push_back(t0);
  }
  if (any_nonfinite(ts)) found.fill_(1.0f);
  return found;
}

// ---- step plans (fused_flat.optim.core.StepPlan; checks: plan_args.h)
// The record of a list that a plan hands to the ops (their `layout` argument).
at::Tensor plan_layout_cpu(at::TensorList tensors) { return plan::make_layout(tensors); }

// The first pass of a planned step over one bucket, before anything is written: params (all
// of the bucket's) against their record; with grads (one per param, None where it has no
// gradient), each present one checked against its parameter and, with has_grad (bool [T],
// the plan's), present exactly where the plan says. Returns found_inf (float32 [1]): 1.0 if
// `finite` and any element of a gradient is inf or nan. Registered for the sparse keys too,
// so that a sparse gradient gets the optimizers' message, not a dispatch error.
at::Tensor check_step_list_cpu(at::TensorList params, const at::Tensor& layout,
                               const c10::List<c10::optional<at::Tensor>>& grads,
                               const c10::optional<at::Tensor>& has_grad, bool finite) {
  plan::check_layout(params, layout, "check_step_list");
  at::Tensor found = at::zeros({1}, at::TensorOptions().dtype(at::kFloat));
  if (grads.empty()) return found;
  const size_t T = params.size();
  TORCH_CHECK_VALUE(grads.size() == T, "fused_flat.check_step_list: ", T, " params but ",
                    grads.size(), " grads");
  const bool* mask = nullptr;
  if (has_grad.has_value()) {
    TORCH_CHECK_VALUE(has_grad->scalar_type() == at::kBool && has_grad->numel() == static_cast<int64_t>(T) &&
                          has_grad->is_contiguous() && has_grad->device().is_cpu(),
                      "fused_flat.check_step_list: has_grad must be a CPU bool tensor of ", T, " elements");
    mask = has_grad->data_ptr<bool>();
  }
  std::vector<at::Tensor> present;
  present.reserve(T);
  for (size_t t = 0; t < T; ++t) {
    const c10::optional<at::Tensor> g = grads.get(t);
    const bool has = g.has_value() && g->defined();
    if (mask != nullptr && mask[t] != has) {
      TORCH_CHECK_VALUE(false, "fused_flat.check_step_list: stale step plan: parameter ", t,
                        has ? " has a gradient" : " has no gradient", " now, not when the plan was built");
    }
    if (!has) continue;
    plan::check_grad(params[t], *g);
    if (finite) present.push_back(*g);
  }
  if (finite && any_nonfinite(present)) found.fill_(1.0f);
  return found;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_flat, CPU, m) {
  m.impl("perturb_list_", &perturb_list_cpu);
  m.impl("restore_and_step_list_", &restore_and_step_list_cpu);
  m.impl("restore_check_list_", &restore_check_list_cpu);
  m.impl("perturb_from_", &perturb_from_cpu);
  m.impl("all_finite", &all_finite_cpu);
  m.impl("check_step_list", &check_step_list_cpu);
}

// A sparse gradient makes the dispatcher pick these keys: the checks then say what is wrong.
TORCH_LIBRARY_IMPL(fused_flat, SparseCPU, m) { m.impl("check_step_list", &check_step_list_cpu); }
TORCH_LIBRARY_IMPL(fused_flat, SparseCsrCPU, m) { m.impl("check_step_list", &check_step_list_cpu); }

// Noise inspection ops take no tensor, so they are registered for the
// CompositeExplicitAutograd key (device-free) and always run on the CPU.
TORCH_LIBRARY_IMPL(fused_flat, CompositeExplicitAutograd, m) {
  m.impl("philox_words", &philox_words_cpu);
  m.impl("gaussian_noise", &gaussian_noise_cpu);
  m.impl("normal_noise", &normal_noise_cpu);
  m.impl("element_words", &element_words_cpu);
  m.impl("noise_roofline", &noise_roofline_cpu);
  m.impl("cpu_isa", &cpu_isa_op);
  m.impl("plan_layout", &plan_layout_cpu);
}

}  // namespace fused_flat
