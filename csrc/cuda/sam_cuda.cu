// CUDA implementations of the SAM-family list ops sam_grad_sq_norm_list, sam_perturb_list_,
// sam_restore_and_step_list_ and sam_probe_list_ (schemas: csrc/sam_ops.cpp, the CPU
// kernels' too; Python: fused_flat/backends/cuda_sam.py). One launch per bucket per pass
// (more when a list exceeds one launch's capacity), its arguments -- pointers, sizes, bucket
// offsets, which block takes which chunk -- by value in the kernel's argument block
// (list_launch.h); the index logic inside a block and the per-element bodies live in
// sam_multi.cuh (host-emulated by tests/test_sam_cuda_emulation.py), the arithmetic in
// fused_flat/sam_elementwise.h (shared with the CPU kernels). Compiled with -fmad=false.
//
// No host synchronisation anywhere: coef_tensor (a 1-element float64 device tensor when the
// norm was computed on the device), grad_scale and found_inf are read by the kernels; the
// squared norm is reduced per block (warp shuffles, fixed order) into one float64 partial
// per block, then summed per tensor in block order by one thread per tensor: deterministic,
// capturable in a CUDA graph on the first call. Device-resident per-step scalars (lr_t
// float64 or float32, step_t int64, one element) are read by the kernels at start (nullptr:
// the scalar arguments), converted as the host path converts its doubles: bit-identical.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "fused_flat/op_args.h"
#include "list_launch.h"
#include "multi_args.cuh"
#include "sam_multi.cuh"

namespace fused_flat::cuda_impl::multi {

constexpr int kThreads = 256;

template <typename scalar_t>
using acc_of = at::opmath_type<scalar_t>;

__device__ __forceinline__ double block_sum(double v) {
  __shared__ double warp_sums[kThreads / 32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  double s = 0.0;
  if (warp == 0) {
    s = lane < kThreads / 32 ? warp_sums[lane] : 0.0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffffu, s, o);
  }
  return s;  // valid in thread 0
}

// One float64 partial per block: partial[base + blockIdx.x] (base: the blocks of the earlier
// launches), blocks in tensor order then chunk order (list_launch.h).
template <typename scalar_t, bool kAdaptive>
__global__ void __launch_bounds__(kThreads)
sam_sq_norm_kernel(const launch::ListArgs<kAdaptive ? 2 : 1> L, double* __restrict__ partial,
                   int64_t base, acc_of<scalar_t> eta) {
  using acc_t = acc_of<scalar_t>;
  const Row r = launch::row_of(L, blockIdx.x, launch::kChunk, false);
  SqNormBody<kAdaptive, acc_t> body{eta, 0.0};
  if constexpr (kAdaptive) {
    visit_row<scalar_t, 2, 0b11u, 0u>(L, r, threadIdx.x, blockDim.x, body);
  } else {
    visit_row<scalar_t, 1, 0b1u, 0u>(L, r, threadIdx.x, blockDim.x, body);
  }
  const double s = block_sum(body.sum);
  if (threadIdx.x == 0) partial[base + blockIdx.x] = s;
}

// out[s.out0 + i] = sum of partial[s.first[i], s.first[i + 1]) in order: one thread per tensor.
__global__ void __launch_bounds__(kThreads)
sam_sq_norm_segments_kernel(const launch::SegArgs s, const double* __restrict__ partial,
                            double* __restrict__ out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= s.n) return;
  double total = 0.0;
  for (int64_t b = s.first[i]; b < s.first[i + 1]; ++b) total += partial[b];
  out[s.out0 + i] = total;
}

template <typename scalar_t, bool kAdaptive>
__global__ void __launch_bounds__(kThreads)
sam_perturb_kernel(const launch::ListArgs<3> L, acc_of<scalar_t> coef,
                   const double* __restrict__ coef_ptr, acc_of<scalar_t> eta) {
  using acc_t = acc_of<scalar_t>;
  const Row r = launch::row_of(L, blockIdx.x, launch::kChunk, false);
  PerturbBody<kAdaptive, acc_t> body{coef_ptr != nullptr ? static_cast<acc_t>(*coef_ptr) : coef, eta};
  visit_row<scalar_t, 3, 0b011u, 0b101u>(L, r, threadIdx.x, blockDim.x, body);
}

// Lists (theta, backup, g[, m]). kSR: theta stochastically rounded (16-bit scalar_t only)
// with the rbits of bucket index offset + e (StepSrBody); then min 4 blocks per SM, which caps
// the registers at 64 (the Philox state and the cached rbits pushed the momentum variant to
// 72 on sm_90) without spills.
template <typename scalar_t, bool kMom, bool kSR>
__global__ void __launch_bounds__(kThreads, kSR ? 4 : 1)
sam_restore_step_kernel(const launch::ListArgs<kMom ? 4 : 3> L, SamStepArgs<acc_of<scalar_t>> a,
                        double grad_mult, const float* __restrict__ grad_scale,
                        const float* __restrict__ found_inf, PhiloxKey key, int64_t step,
                        DevScalar lr_s, const int64_t* __restrict__ step_p) {
  using acc_t = acc_of<scalar_t>;
  static_assert(!kSR || sizeof(scalar_t) == 2, "stochastic rounding: 16-bit parameters only");
  if (lr_s.p != nullptr) a.lr = static_cast<acc_t>(dev_value(lr_s, 0.0));
  const Row r = launch::row_of(L, blockIdx.x, launch::kChunk, false);
  if (found_inf != nullptr && *found_inf != 0.0f) {
    // skipped step (non-finite gradient): exact restore only, momentum untouched
    RestoreBody<acc_t> body;
    visit_row<scalar_t, 2, 0b10u, 0b01u>(L, r, threadIdx.x, blockDim.x, body);
    return;
  }
  if (grad_scale != nullptr) a.grad_mult = static_cast<acc_t>(grad_mult / static_cast<double>(*grad_scale));
  auto visit = [&](auto& body) {
    if constexpr (kMom) {
      visit_row<scalar_t, 4, 0b1110u, 0b1001u>(L, r, threadIdx.x, blockDim.x, body);
    } else {
      visit_row<scalar_t, 3, 0b110u, 0b001u>(L, r, threadIdx.x, blockDim.x, body);
    }
  };
  if constexpr (kSR) {
    StepSrBody<kMom, std::is_same_v<scalar_t, c10::BFloat16>> body{a, key, dev_step(step_p, step),
                                                                   r.offset};
    visit(body);
  } else {
    StepBody<kMom, acc_t> body{a};
    visit(body);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
sam_probe_kernel(const launch::ListArgs<2> L, PhiloxKey key, int64_t step, acc_of<scalar_t> delta,
                 const int64_t* __restrict__ step_p) {
  using acc_t = acc_of<scalar_t>;
  step = dev_step(step_p, step);
  const Row r = launch::row_of(L, blockIdx.x, launch::kChunk, false);
  ProbeBody<acc_t> body{key, step, r.offset, delta};
  visit_row<scalar_t, 2, 0b01u, 0b11u>(L, r, threadIdx.x, blockDim.x, body);
}

// The argument blocks stay within the classic 4 KB limit (list_launch.h).
static_assert(sizeof(launch::ListArgs<4>) + sizeof(SamStepArgs<double>) + sizeof(double) +
                      2 * sizeof(void*) + sizeof(PhiloxKey) + sizeof(int64_t) +
                      sizeof(DevScalar) + sizeof(void*) <= launch::kParamLimit,
              "SAM step kernel arguments fit 4 KB");

// ------------------------------------------------------------------- host side
using namespace multi_args;   // check_lists, check_offsets, the scalars, for_each_launch

// float64 [T]: entry t = the squared norm of tensor t (sam_sq_term over its elements): one
// partial per block, then one thread per tensor sums its blocks' partials in order
// (deterministic), every launch's arguments by value.
at::Tensor sam_grad_sq_norm_list_cuda(at::TensorList grads, at::TensorList params, bool adaptive,
                                      double eta, const c10::optional<at::Tensor>& layout) {
  const char* op = "sam_grad_sq_norm_list";
  std::vector<const at::TensorList*> lists{&grads};
  if (adaptive) lists.push_back(&params);
  const int64_t T = check_lists(op, lists, layout);
  TORCH_CHECK_VALUE(T > 0, "fused_flat.sam_grad_sq_norm_list: empty tensor list");
  const c10::cuda::CUDAGuard guard(grads[0].device());
  const auto opts = grads[0].options().dtype(at::kDouble);
  auto numel_of = [&](int64_t t) { return grads[t].numel(); };
  auto zero = [](int64_t) { return int64_t(0); };
  const int64_t nblocks = launch::total_blocks(T, numel_of, zero, launch::kChunk, false);
  if (nblocks == 0) return at::zeros({T}, opts);
  at::Tensor partial = at::empty({nblocks}, opts);
  at::Tensor out = at::empty({T}, opts);
  const cudaStream_t stream = stream_of(grads[0]);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[0].scalar_type(), "sam_grad_sq_norm_list", [&] {
    const acc_of<scalar_t> e = static_cast<acc_of<scalar_t>>(eta);
    int64_t base = 0;
    auto go = [&](auto kernel, const auto& L) {
      kernel<<<L.n_blocks, kThreads, 0, stream>>>(L, partial.data_ptr<double>(), base, e);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      base += L.n_blocks;
    };
    if (adaptive)
      for_each_launch<2>(lists, {}, false, [&](const launch::ListArgs<2>& L) { go(sam_sq_norm_kernel<scalar_t, true>, L); });
    else
      for_each_launch<1>(lists, {}, false, [&](const launch::ListArgs<1>& L) { go(sam_sq_norm_kernel<scalar_t, false>, L); });
  });
  launch::SegArgs seg;
  int64_t first = 0;
  for (int64_t t0 = 0; t0 < T; t0 += launch::SegArgs::kSegs) {
    seg.out0 = t0;
    seg.n = static_cast<int32_t>(std::min<int64_t>(launch::SegArgs::kSegs, T - t0));
    for (int i = 0; i < seg.n; ++i) {
      seg.first[i] = first;
      first += launch::total_blocks(1, [&](int64_t) { return grads[t0 + i].numel(); }, zero,
                                    launch::kChunk, false);
    }
    seg.first[seg.n] = first;
    sam_sq_norm_segments_kernel<<<1, kThreads, 0, stream>>>(seg, partial.data_ptr<double>(),
                                                             out.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

void sam_perturb_list_cuda(at::TensorList params, at::TensorList grads, at::TensorList backups,
                           bool adaptive, double coef, double eta,
                           const c10::optional<at::Tensor>& layout,
                           const c10::optional<at::Tensor>& coef_tensor) {
  const char* op = "sam_perturb_list_";
  const std::vector<const at::TensorList*> lists{&params, &grads, &backups};
  const int64_t T = check_lists(op, lists, layout);
  if (T == 0) return;
  check_scalar_arg(coef_tensor, params[0].device(), op, "coef_tensor", at::kDouble);
  const double* coef_ptr = coef_tensor.has_value() ? coef_tensor->data_ptr<double>() : nullptr;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = stream_of(params[0]);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "sam_perturb_list_", [&] {
    using acc_t = acc_of<scalar_t>;
    auto k = adaptive ? sam_perturb_kernel<scalar_t, true> : sam_perturb_kernel<scalar_t, false>;
    for_each_launch<3>(lists, {}, false, [&](const launch::ListArgs<3>& L) {
      k<<<L.n_blocks, kThreads, 0, stream>>>(L, static_cast<acc_t>(coef), coef_ptr, static_cast<acc_t>(eta));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

template <int K, typename scalar_t>
void launch_sam_step(const std::vector<const at::TensorList*>& lists, at::IntArrayRef offsets,
                     bool sr, const SamStepArgs<acc_of<scalar_t>>& a, double grad_mult,
                     const float* gs, const float* fi, PhiloxKey key, int64_t step,
                     DevScalar lr_s, const int64_t* step_p, cudaStream_t stream) {
  constexpr bool kMom = K == 4;
  auto k = sam_restore_step_kernel<scalar_t, kMom, false>;
  if constexpr (sizeof(scalar_t) == 2) {
    if (sr) k = sam_restore_step_kernel<scalar_t, kMom, true>;
  }
  for_each_launch<K>(lists, offsets, false, [&](const launch::ListArgs<K>& L) {
    k<<<L.n_blocks, kThreads, 0, stream>>>(L, a, grad_mult, gs, fi, key, step, lr_s, step_p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void sam_restore_and_step_list_cuda(at::TensorList params, at::TensorList backups,
                                    at::TensorList grads, at::TensorList moms,
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
  const bool mom = !moms.empty();
  std::vector<const at::TensorList*> lists{&params, &backups, &grads};
  if (mom) lists.push_back(&moms);
  const int64_t T = check_lists(op, lists, layout);
  if (T == 0) return;
  check_scalar_tensor(grad_scale, params[0], "grad_scale");
  check_scalar_tensor(found_inf, params[0], "found_inf");
  const bool sr = stochastic_rounding && (params[0].scalar_type() == at::kBFloat16 ||
                                          params[0].scalar_type() == at::kHalf);
  check_offsets(op, offsets, T, !sr);
  if (sr) {
    for (int64_t off : offsets) check_noise_args(seed, bucket_id, off, 0);
  }
  const DevScalar lr_s = float_scalar(op, lr_t, params[0], "lr_t");
  const int64_t* step_p = step_scalar(op, step_t, params[0]);
  const c10::cuda::CUDAGuard guard(params[0].device());
  const float* gs = grad_scale.has_value() ? grad_scale->data_ptr<float>() : nullptr;
  const float* fi = found_inf.has_value() ? found_inf->data_ptr<float>() : nullptr;
  const PhiloxKey key = make_key(seed, bucket_id);
  const cudaStream_t stream = stream_of(params[0]);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "sam_restore_and_step_list_", [&] {
    using acc_t = acc_of<scalar_t>;
    const SamStepArgs<acc_t> a = make_sam_step_args<acc_t>(lr, weight_decay, momentum, dampening,
                                                          grad_mult, nesterov, momentum_init);
    if (mom)
      launch_sam_step<4, scalar_t>(lists, offsets, sr, a, grad_mult, gs, fi, key, step, lr_s, step_p, stream);
    else
      launch_sam_step<3, scalar_t>(lists, offsets, sr, a, grad_mult, gs, fi, key, step, lr_s, step_p, stream);
  });
}

void sam_probe_list_cuda(at::TensorList params, at::TensorList backups, at::IntArrayRef offsets,
                         int64_t seed, int64_t bucket_id, int64_t step, double delta,
                         const c10::optional<at::Tensor>& step_t) {
  const char* op = "sam_probe_list_";
  const std::vector<const at::TensorList*> lists{&params, &backups};
  const int64_t T = check_lists(op, lists);
  check_offsets(op, offsets, T, false);
  check_noise_args(seed, bucket_id, 0, 0);
  if (T == 0) return;
  const int64_t* step_p = step_scalar(op, step_t, params[0]);
  const c10::cuda::CUDAGuard guard(params[0].device());
  const PhiloxKey key = make_key(seed, bucket_id);
  const cudaStream_t stream = stream_of(params[0]);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "sam_probe_list_", [&] {
    using acc_t = acc_of<scalar_t>;
    for_each_launch<2>(lists, offsets, false, [&](const launch::ListArgs<2>& L) {
      sam_probe_kernel<scalar_t><<<L.n_blocks, kThreads, 0, stream>>>(L, key, step, static_cast<acc_t>(delta), step_p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace fused_flat::cuda_impl::multi

TORCH_LIBRARY_IMPL(fused_flat, CUDA, m) {
  using namespace fused_flat::cuda_impl::multi;
  m.impl("sam_grad_sq_norm_list", &sam_grad_sq_norm_list_cuda);
  m.impl("sam_perturb_list_", &sam_perturb_list_cuda);
  m.impl("sam_restore_and_step_list_", &sam_restore_and_step_list_cuda);
  m.impl("sam_probe_list_", &sam_probe_list_cuda);
}
