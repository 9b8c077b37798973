// CUDA kernels of the multi-tensor SAM-family ops (schemas: csrc/multi_ops.cpp; Python:
// fused_flat/backends/cuda_sam.py). One launch per bucket per pass: one block per row of the chunk
// table (fused_flat/backends/multi_tensor.py); the index logic and the per-element bodies live in
// sam_multi.cuh (host-emulated by tests/test_cuda_emulation.py), the arithmetic in
// fused_flat/sam_elementwise.h (shared with the CPU kernels). Compiled with -fmad=false.
//
// No host synchronisation anywhere: coef (a 1-element float64 device tensor when the norm
// was computed on the device), grad_scale and found_inf are read by the kernels; the
// squared norm is reduced per block (warp shuffles, fixed order) into one float64 partial
// per chunk and summed on the device by at::sum: deterministic, capturable in a CUDA graph.
// Device-resident per-step scalars (CUDA-graph capture): the optional lr_t (float64 or
// float32) and step_t (int64) one-element tensors of sam_restore_and_step_multi_ /
// sam_probe_multi_ are read by the kernels at start (nullptr: the scalar arguments),
// converted as the host path converts its doubles, so the results are bit-identical.
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

#include <limits>
#include <type_traits>
#include <vector>

#include "fused_flat/op_args.h"
#include "multi_args.cuh"
#include "sam_multi.cuh"

namespace fused_flat {
namespace cuda_impl {
namespace multi {

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

template <typename scalar_t, bool kAdaptive>
__global__ void __launch_bounds__(kThreads)
sam_sq_norm_kernel(const int64_t* __restrict__ chunks, const int64_t* __restrict__ meta,
                   const int64_t* __restrict__ ptrs, int64_t T, int64_t chunk,
                   double* __restrict__ partial, acc_of<scalar_t> eta) {
  using acc_t = acc_of<scalar_t>;
  const Row r = load_row(chunks, meta, blockIdx.x, chunk);
  SqNormBody<kAdaptive, acc_t> body{eta, 0.0};
  if constexpr (kAdaptive) {
    scalar_t* const p[2] = {table_ptr<scalar_t>(ptrs, 0, T, r.t), table_ptr<scalar_t>(ptrs, 1, T, r.t)};
    visit_chunk<scalar_t, 2, 0b11u, 0u>(p, r.start, r.end, threadIdx.x, blockDim.x, body);
  } else {
    scalar_t* const p[1] = {table_ptr<scalar_t>(ptrs, 0, T, r.t)};
    visit_chunk<scalar_t, 1, 0b1u, 0u>(p, r.start, r.end, threadIdx.x, blockDim.x, body);
  }
  const double s = block_sum(body.sum);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

template <typename scalar_t, bool kAdaptive>
__global__ void __launch_bounds__(kThreads)
sam_perturb_kernel(const int64_t* __restrict__ chunks, const int64_t* __restrict__ meta,
                   const int64_t* __restrict__ ptrs, int64_t T, int64_t chunk,
                   acc_of<scalar_t> coef, const double* __restrict__ coef_ptr,
                   acc_of<scalar_t> eta) {
  using acc_t = acc_of<scalar_t>;
  const Row r = load_row(chunks, meta, blockIdx.x, chunk);
  PerturbBody<kAdaptive, acc_t> body{coef_ptr != nullptr ? static_cast<acc_t>(*coef_ptr) : coef, eta};
  scalar_t* const p[3] = {table_ptr<scalar_t>(ptrs, 0, T, r.t), table_ptr<scalar_t>(ptrs, 1, T, r.t),
                          table_ptr<scalar_t>(ptrs, 2, T, r.t)};
  visit_chunk<scalar_t, 3, 0b011u, 0b101u>(p, r.start, r.end, threadIdx.x, blockDim.x, body);
}

template <typename scalar_t, bool kMom>
__global__ void __launch_bounds__(kThreads)
sam_restore_step_kernel(const int64_t* __restrict__ chunks, const int64_t* __restrict__ meta,
                        const int64_t* __restrict__ ptrs, int64_t T, int64_t chunk,
                        SamStepArgs<acc_of<scalar_t>> a, double grad_mult,
                        const float* __restrict__ grad_scale, const float* __restrict__ found_inf,
                        DevScalar lr_s) {
  using acc_t = acc_of<scalar_t>;
  if (lr_s.p != nullptr) a.lr = static_cast<acc_t>(dev_value(lr_s, 0.0));
  const Row r = load_row(chunks, meta, blockIdx.x, chunk);
  if (found_inf != nullptr && *found_inf != 0.0f) {
    // skipped step (non-finite gradient): exact restore only, momentum untouched
    RestoreBody<acc_t> body;
    scalar_t* const p[2] = {table_ptr<scalar_t>(ptrs, 0, T, r.t), table_ptr<scalar_t>(ptrs, 1, T, r.t)};
    visit_chunk<scalar_t, 2, 0b10u, 0b01u>(p, r.start, r.end, threadIdx.x, blockDim.x, body);
    return;
  }
  if (grad_scale != nullptr) a.grad_mult = static_cast<acc_t>(grad_mult / static_cast<double>(*grad_scale));
  StepBody<kMom, acc_t> body{a};
  if constexpr (kMom) {
    scalar_t* const p[4] = {table_ptr<scalar_t>(ptrs, 0, T, r.t), table_ptr<scalar_t>(ptrs, 1, T, r.t),
                            table_ptr<scalar_t>(ptrs, 2, T, r.t), table_ptr<scalar_t>(ptrs, 3, T, r.t)};
    visit_chunk<scalar_t, 4, 0b1110u, 0b1001u>(p, r.start, r.end, threadIdx.x, blockDim.x, body);
  } else {
    scalar_t* const p[3] = {table_ptr<scalar_t>(ptrs, 0, T, r.t), table_ptr<scalar_t>(ptrs, 1, T, r.t),
                            table_ptr<scalar_t>(ptrs, 2, T, r.t)};
    visit_chunk<scalar_t, 3, 0b110u, 0b001u>(p, r.start, r.end, threadIdx.x, blockDim.x, body);
  }
}

// sam_restore_step_kernel with stochastic rounding of theta (16-bit scalar_t only): its own
// name, so the static checks of the round-to-nearest kernels keep their counts.
// Min 4 blocks per SM: caps the registers at 64 (the Philox state and the cached rbits
// pushed the momentum variant to 72 on sm_90); no spills (tests/test_stochastic_rounding.py).
template <typename scalar_t, bool kMom>
__global__ void __launch_bounds__(kThreads, 4)
sam_restore_step_sr_kernel(const int64_t* __restrict__ chunks, const int64_t* __restrict__ meta,
                           const int64_t* __restrict__ ptrs, int64_t T, int64_t chunk,
                           SamStepArgs<float> a, double grad_mult,
                           const float* __restrict__ grad_scale, const float* __restrict__ found_inf,
                           PhiloxKey key, int64_t step, DevScalar lr_s,
                           const int64_t* __restrict__ step_p) {
  static_assert(sizeof(scalar_t) == 2, "stochastic rounding: 16-bit parameters only");
  if (lr_s.p != nullptr) a.lr = static_cast<float>(dev_value(lr_s, 0.0));
  step = dev_step(step_p, step);
  const Row r = load_row(chunks, meta, blockIdx.x, chunk);
  if (found_inf != nullptr && *found_inf != 0.0f) {
    RestoreBody<float> body;
    scalar_t* const p[2] = {table_ptr<scalar_t>(ptrs, 0, T, r.t), table_ptr<scalar_t>(ptrs, 1, T, r.t)};
    visit_chunk<scalar_t, 2, 0b10u, 0b01u>(p, r.start, r.end, threadIdx.x, blockDim.x, body);
    return;
  }
  if (grad_scale != nullptr) a.grad_mult = static_cast<float>(grad_mult / static_cast<double>(*grad_scale));
  StepSrBody<kMom, std::is_same_v<scalar_t, c10::BFloat16>> body{a, key, step, r.offset};
  if constexpr (kMom) {
    scalar_t* const p[4] = {table_ptr<scalar_t>(ptrs, 0, T, r.t), table_ptr<scalar_t>(ptrs, 1, T, r.t),
                            table_ptr<scalar_t>(ptrs, 2, T, r.t), table_ptr<scalar_t>(ptrs, 3, T, r.t)};
    visit_chunk<scalar_t, 4, 0b1110u, 0b1001u>(p, r.start, r.end, threadIdx.x, blockDim.x, body);
  } else {
    scalar_t* const p[3] = {table_ptr<scalar_t>(ptrs, 0, T, r.t), table_ptr<scalar_t>(ptrs, 1, T, r.t),
                            table_ptr<scalar_t>(ptrs, 2, T, r.t)};
    visit_chunk<scalar_t, 3, 0b110u, 0b001u>(p, r.start, r.end, threadIdx.x, blockDim.x, body);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
sam_probe_kernel(const int64_t* __restrict__ chunks, const int64_t* __restrict__ meta,
                 const int64_t* __restrict__ ptrs, int64_t T, int64_t chunk, PhiloxKey key,
                 int64_t step, acc_of<scalar_t> delta, const int64_t* __restrict__ step_p) {
  using acc_t = acc_of<scalar_t>;
  step = dev_step(step_p, step);
  const Row r = load_row(chunks, meta, blockIdx.x, chunk);
  ProbeBody<acc_t> body{key, step, r.offset, delta};
  scalar_t* const p[2] = {table_ptr<scalar_t>(ptrs, 0, T, r.t), table_ptr<scalar_t>(ptrs, 1, T, r.t)};
  visit_chunk<scalar_t, 2, 0b01u, 0b11u>(p, r.start, r.end, threadIdx.x, blockDim.x, body);
}

// ------------------------------------------------------------------- host side
using multi_args::Tables;
using multi_args::check_args;
using multi_args::float_scalar;
using multi_args::step_scalar;
using multi_args::stream_of;

at::Tensor sam_grad_sq_norm_multi_cuda(at::TensorList grads, at::TensorList params,
                                       const at::Tensor& chunks, const at::Tensor& meta,
                                       const at::Tensor& ptrs, int64_t chunk, double eta) {
  const bool adaptive = !params.empty();
  std::vector<const at::TensorList*> lists{&grads};
  if (adaptive) lists.push_back(&params);
  const Tables tb = check_args("sam_grad_sq_norm_multi", lists, chunks, meta, ptrs, chunk);
  const c10::cuda::CUDAGuard guard(grads[0].device());
  const auto opts = grads[0].options().dtype(at::kDouble);
  if (tb.n_chunks == 0) return at::zeros({}, opts);
  at::Tensor partial = at::empty({tb.n_chunks}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[0].scalar_type(), "sam_grad_sq_norm_multi", [&] {
    using acc_t = acc_of<scalar_t>;
    auto k = adaptive ? sam_sq_norm_kernel<scalar_t, true> : sam_sq_norm_kernel<scalar_t, false>;
    k<<<static_cast<int>(tb.n_chunks), kThreads, 0, stream_of(grads[0])>>>(
        tb.chunks, tb.meta, tb.ptrs, tb.T, tb.chunk, partial.data_ptr<double>(), static_cast<acc_t>(eta));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return at::sum(partial);
}

void sam_perturb_multi_cuda(at::TensorList params, at::TensorList grads, at::TensorList backups,
                            const at::Tensor& chunks, const at::Tensor& meta, const at::Tensor& ptrs,
                            int64_t chunk, bool adaptive, double coef,
                            const c10::optional<at::Tensor>& coef_tensor, double eta) {
  const Tables tb = check_args("sam_perturb_multi_", {&params, &grads, &backups}, chunks, meta, ptrs, chunk);
  const double* coef_ptr = nullptr;
  if (coef_tensor.has_value()) {
    TORCH_CHECK(coef_tensor->numel() == 1 && coef_tensor->scalar_type() == at::kDouble &&
                    coef_tensor->device() == params[0].device(),
                "fused_flat.sam_perturb_multi_: coef_tensor must be a one-element float64 tensor on ",
                params[0].device());
    coef_ptr = coef_tensor->data_ptr<double>();
  }
  if (tb.n_chunks == 0) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "sam_perturb_multi_", [&] {
    using acc_t = acc_of<scalar_t>;
    auto k = adaptive ? sam_perturb_kernel<scalar_t, true> : sam_perturb_kernel<scalar_t, false>;
    k<<<static_cast<int>(tb.n_chunks), kThreads, 0, stream_of(params[0])>>>(
        tb.chunks, tb.meta, tb.ptrs, tb.T, tb.chunk, static_cast<acc_t>(coef), coef_ptr,
        static_cast<acc_t>(eta));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// The SR launch for 16-bit scalar_t (returns false for other types: plain kernel then).
template <typename scalar_t>
bool launch_sam_step_sr(const Tables& tb, bool mom, const SamStepArgs<acc_of<scalar_t>>& a,
                        double grad_mult, const float* gs, const float* fi, PhiloxKey key,
                        int64_t step, DevScalar lr_s, const int64_t* step_p, cudaStream_t stream) {
  if constexpr (sizeof(scalar_t) == 2) {
    auto k = mom ? sam_restore_step_sr_kernel<scalar_t, true> : sam_restore_step_sr_kernel<scalar_t, false>;
    k<<<static_cast<int>(tb.n_chunks), kThreads, 0, stream>>>(tb.chunks, tb.meta, tb.ptrs, tb.T,
                                                              tb.chunk, a, grad_mult, gs, fi, key, step,
                                                              lr_s, step_p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return true;
  } else {
    return false;
  }
}

void sam_restore_and_step_multi_cuda(at::TensorList params, at::TensorList backups,
                                     at::TensorList grads, at::TensorList moms,
                                     const c10::optional<at::Tensor>& grad_scale,
                                     const c10::optional<at::Tensor>& found_inf,
                                     const at::Tensor& chunks, const at::Tensor& meta,
                                     const at::Tensor& ptrs, int64_t chunk, double lr,
                                     double weight_decay, double momentum, double dampening,
                                     bool nesterov, bool momentum_init, double grad_mult,
                                     bool stochastic_rounding, int64_t seed, int64_t bucket_id,
                                     int64_t step, const c10::optional<at::Tensor>& lr_t,
                                     const c10::optional<at::Tensor>& step_t) {
  const bool mom = !moms.empty();
  std::vector<const at::TensorList*> lists{&params, &backups, &grads};
  if (mom) lists.push_back(&moms);
  const Tables tb = check_args("sam_restore_and_step_multi_", lists, chunks, meta, ptrs, chunk);
  check_scalar_tensor(grad_scale, params[0], "grad_scale");
  check_scalar_tensor(found_inf, params[0], "found_inf");
  if (stochastic_rounding) check_noise_args(seed, bucket_id, 0, 0);
  const DevScalar lr_s = float_scalar("sam_restore_and_step_multi_", lr_t, params[0], "lr_t");
  const int64_t* step_p = step_scalar("sam_restore_and_step_multi_", step_t, params[0]);
  if (tb.n_chunks == 0) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const float* gs = grad_scale.has_value() ? grad_scale->data_ptr<float>() : nullptr;
  const float* fi = found_inf.has_value() ? found_inf->data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "sam_restore_and_step_multi_", [&] {
    using acc_t = acc_of<scalar_t>;
    const SamStepArgs<acc_t> a = make_sam_step_args<acc_t>(lr, weight_decay, momentum, dampening,
                                                          grad_mult, nesterov, momentum_init);
    if (stochastic_rounding && launch_sam_step_sr<scalar_t>(tb, mom, a, grad_mult, gs, fi,
                                                           make_key(seed, bucket_id), step, lr_s,
                                                           step_p, stream_of(params[0]))) {
      return;
    }
    auto k = mom ? sam_restore_step_kernel<scalar_t, true> : sam_restore_step_kernel<scalar_t, false>;
    k<<<static_cast<int>(tb.n_chunks), kThreads, 0, stream_of(params[0])>>>(
        tb.chunks, tb.meta, tb.ptrs, tb.T, tb.chunk, a, grad_mult, gs, fi, lr_s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void sam_probe_multi_cuda(at::TensorList params, at::TensorList backups, const at::Tensor& chunks,
                          const at::Tensor& meta, const at::Tensor& ptrs, int64_t chunk,
                          int64_t seed, int64_t bucket_id, int64_t step, double delta,
                          const c10::optional<at::Tensor>& step_t) {
  const Tables tb = check_args("sam_probe_multi_", {&params, &backups}, chunks, meta, ptrs, chunk);
  check_noise_args(seed, bucket_id, 0, 0);
  const int64_t* step_p = step_scalar("sam_probe_multi_", step_t, params[0]);
  if (tb.n_chunks == 0) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const PhiloxKey key = make_key(seed, bucket_id);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "sam_probe_multi_", [&] {
    using acc_t = acc_of<scalar_t>;
    sam_probe_kernel<scalar_t><<<static_cast<int>(tb.n_chunks), kThreads, 0, stream_of(params[0])>>>(
        tb.chunks, tb.meta, tb.ptrs, tb.T, tb.chunk, key, step, static_cast<acc_t>(delta), step_p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace multi
}  // namespace cuda_impl

TORCH_LIBRARY_IMPL(fused_flat, CUDA, m) {
  m.impl("sam_grad_sq_norm_multi", &cuda_impl::multi::sam_grad_sq_norm_multi_cuda);
  m.impl("sam_perturb_multi_", &cuda_impl::multi::sam_perturb_multi_cuda);
  m.impl("sam_restore_and_step_multi_", &cuda_impl::multi::sam_restore_and_step_multi_cuda);
  m.impl("sam_probe_multi_", &cuda_impl::multi::sam_probe_multi_cuda);
}

}  // namespace fused_flat
