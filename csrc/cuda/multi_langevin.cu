// CUDA kernels of the multi-tensor Langevin ops (schemas: csrc/multi_ops.cpp; Python:
// fused_flat/backends/cuda.py): perturb, restore + update, and the finiteness check, one launch
// per bucket per pass (issue 12). One block per row of the chunk table; the index logic
// (call frame, 16-byte unit path, call path) and the per-element bodies live in
// multi_langevin.cuh (host-emulated by tests/test_multi_langevin_emulation.py), the
// arithmetic in fused_flat/elementwise.h (the per-tensor kernels' and the CPU kernels').
// Compiled with -fmad=false, like kernels_cuda.cu, so fp32 results equal theirs bit for bit.
//
// No host synchronisation: grad_scale and found_inf are read by the kernels (found_inf set:
// only the restore theta + (-sigma) eps, momentum untouched, as the per-tensor kernel).
// all_finite is one launch: each block folds its flag into a persistent int32 scratch pair
// (flag, blocks done) with atomics; the last block writes the output and resets the pair
// (the threadFenceReduction pattern). One scratch per (device, stream), owned by Python.
//
// stochastic_rounding (bf16/fp16): ml_restore_step_kernel<..., kSR = true>, theta stored with
// the rbits of ALGORITHMS.md §1 (visit_frame's kSR, the per-tensor SR kernel's math); the
// skipped step's restore and the momentum buffer stay round-to-nearest, as there.
//
// Device-resident per-step scalars (CUDA-graph capture, fused_flat/backends/cuda.py): the
// optional step_t (int64), lr_t and noise_std_t (float64 or float32) one-element tensors are
// passed as pointers (nullptr when absent) and read once per thread at kernel start
// (load_step_scalars), converted as the host path converts its doubles: bit-identical
// results, and the scalar path keeps its code (one predicated load more).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <limits>
#include <vector>

#include "fused_flat/op_args.h"
#include "multi_args.cuh"
#include "multi_langevin.cuh"

namespace fused_flat {
namespace cuda_impl {
namespace mlang {

constexpr int kThreads = 256;
// 4 resident blocks of 256 threads per SM: <= 64 registers (tests/test_cuda_static.py).
constexpr int kMinBlocks = 4;

template <typename scalar_t>
using acc_of = at::opmath_type<scalar_t>;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
ml_perturb_kernel(const int64_t* __restrict__ chunks, const int64_t* __restrict__ meta,
                  const int64_t* __restrict__ ptrs, int64_t T, int64_t chunk, Noise na,
                  acc_of<scalar_t> sigma, const int64_t* __restrict__ step_p) {
  using acc_t = acc_of<scalar_t>;
  na.step = dev_step(step_p, na.step);
  const FrameRow r = load_frame_row(chunks, meta, blockIdx.x, chunk);
  PerturbBody<acc_t> body{sigma};
  scalar_t* const p[1] = {table_ptr<scalar_t>(ptrs, 0, T, r.t)};
  visit_frame<scalar_t, 1, 1u, 1u, true, false>(p, r, na, threadIdx.x, blockDim.x, body);
}

// kSR: theta stochastically rounded (16-bit scalar_t only).
template <typename scalar_t, bool kMom, bool kEps, bool kXi, bool kSR>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
ml_restore_step_kernel(const int64_t* __restrict__ chunks, const int64_t* __restrict__ meta,
                       const int64_t* __restrict__ ptrs, int64_t T, int64_t chunk, Noise na,
                       StepArgs<acc_of<scalar_t>> a, double grad_mult,
                       const float* __restrict__ grad_scale, const float* __restrict__ found_inf,
                       StepScalars sc) {
  using acc_t = acc_of<scalar_t>;
  static_assert(!kSR || sizeof(scalar_t) == 2, "stochastic rounding: 16-bit parameters only");
  load_step_scalars(sc, na, a);
  const FrameRow r = load_frame_row(chunks, meta, blockIdx.x, chunk);
  if (found_inf != nullptr && *found_inf != 0.0f) {
    // skipped step (non-finite gradient): undo the perturbation only, momentum untouched
    if constexpr (kEps) {
      PerturbBody<acc_t> body{-a.sigma};
      scalar_t* const p[1] = {table_ptr<scalar_t>(ptrs, 0, T, r.t)};
      visit_frame<scalar_t, 1, 1u, 1u, true, false>(p, r, na, threadIdx.x, blockDim.x, body);
    }
    return;
  }
  if (grad_scale != nullptr) a.grad_mult = static_cast<acc_t>(grad_mult / static_cast<double>(*grad_scale));
  StepBody<kMom, acc_t> body{a};
  if constexpr (kMom) {
    scalar_t* const p[3] = {table_ptr<scalar_t>(ptrs, 0, T, r.t), table_ptr<scalar_t>(ptrs, 1, T, r.t),
                            table_ptr<scalar_t>(ptrs, 2, T, r.t)};
    visit_frame<scalar_t, 3, 0b111u, 0b101u, kEps, kXi, kSR>(p, r, na, threadIdx.x, blockDim.x, body);
  } else {
    scalar_t* const p[2] = {table_ptr<scalar_t>(ptrs, 0, T, r.t), table_ptr<scalar_t>(ptrs, 1, T, r.t)};
    visit_frame<scalar_t, 2, 0b11u, 0b01u, kEps, kXi, kSR>(p, r, na, threadIdx.x, blockDim.x, body);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
ml_all_finite_kernel(const int64_t* __restrict__ chunks, const int64_t* __restrict__ meta,
                     const int64_t* __restrict__ ptrs, int64_t T, int64_t chunk,
                     int* __restrict__ scratch, float* __restrict__ out) {
  using acc_t = acc_of<scalar_t>;
  const multi::Row r = multi::load_row(chunks, meta, blockIdx.x, chunk);
  NonFiniteBody<acc_t> body{0};
  scalar_t* const p[1] = {table_ptr<scalar_t>(ptrs, 0, T, r.t)};
  multi::visit_chunk<scalar_t, 1, 1u, 0u>(p, r.start, r.end, threadIdx.x, blockDim.x, body);
  const int flag = __syncthreads_or(body.flag);
  if (threadIdx.x == 0) {
    if (flag) atomicOr(scratch, 1);
    __threadfence();                                   // the flag before the count
    const unsigned done = atomicAdd(reinterpret_cast<unsigned*>(scratch + 1), 1u);
    if (done == gridDim.x - 1) {                       // the last block: publish, reset
      __threadfence();
      const int any = atomicExch(scratch, 0);
      out[0] = any ? 1.0f : 0.0f;
      atomicExch(scratch + 1, 0);
    }
  }
}

// ------------------------------------------------------------------- host side
using multi_args::Tables;
using multi_args::check_args;
using multi_args::float_scalar;
using multi_args::step_scalar;
using multi_args::stream_of;

void perturb_multi_cuda(at::TensorList params, const at::Tensor& chunks, const at::Tensor& meta,
                        const at::Tensor& ptrs, int64_t chunk, int64_t seed, int64_t bucket_id,
                        int64_t step, int64_t tag, double sigma,
                        const c10::optional<at::Tensor>& step_t) {
  const Tables tb = check_args("perturb_multi_", {&params}, chunks, meta, ptrs, chunk);
  check_noise_args(seed, bucket_id, 0, tag);
  TORCH_CHECK(tag >= 0, "fused_flat.perturb_multi_: tag must be >= 0, got ", tag);
  const int64_t* step_p = step_scalar("perturb_multi_", step_t, params[0]);
  if (sigma == 0.0 || tb.n_chunks == 0) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const Noise na{make_key(seed, bucket_id), step, static_cast<uint32_t>(tag)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "perturb_multi_", [&] {
    using acc_t = acc_of<scalar_t>;
    ml_perturb_kernel<scalar_t><<<static_cast<int>(tb.n_chunks), kThreads, 0, stream_of(params[0])>>>(
        tb.chunks, tb.meta, tb.ptrs, tb.T, tb.chunk, na, static_cast<acc_t>(sigma), step_p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

struct StepLaunch {
  const float* gs;
  const float* fi;
  StepScalars sc;
  cudaStream_t stream;
};

template <typename scalar_t, bool kMom, bool kEps, bool kXi, bool kSR>
void launch_step(const Tables& tb, const Noise& na, const StepArgs<acc_of<scalar_t>>& a,
                 double grad_mult, const StepLaunch& l) {
  ml_restore_step_kernel<scalar_t, kMom, kEps, kXi, kSR><<<static_cast<int>(tb.n_chunks), kThreads, 0, l.stream>>>(
      tb.chunks, tb.meta, tb.ptrs, tb.T, tb.chunk, na, a, grad_mult, l.gs, l.fi, l.sc);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// xi: whether the pass draws the Langevin noise (noise_std != 0, or a device noise_std).
template <typename scalar_t, bool kMom, bool kSR>
void dispatch_noise(const Tables& tb, const Noise& na, const StepArgs<acc_of<scalar_t>>& a,
                    double grad_mult, bool xi, const StepLaunch& l) {
  const bool eps = a.sigma != 0;
  if (eps && xi)
    launch_step<scalar_t, kMom, true, true, kSR>(tb, na, a, grad_mult, l);
  else if (eps)
    launch_step<scalar_t, kMom, true, false, kSR>(tb, na, a, grad_mult, l);
  else if (xi)
    launch_step<scalar_t, kMom, false, true, kSR>(tb, na, a, grad_mult, l);
  else
    launch_step<scalar_t, kMom, false, false, kSR>(tb, na, a, grad_mult, l);
}

void restore_and_step_multi_cuda(at::TensorList params, at::TensorList grads, at::TensorList moms,
                                 const c10::optional<at::Tensor>& grad_scale,
                                 const c10::optional<at::Tensor>& found_inf,
                                 const at::Tensor& chunks, const at::Tensor& meta,
                                 const at::Tensor& ptrs, int64_t chunk, int64_t seed,
                                 int64_t bucket_id, int64_t step, int64_t restore_tag,
                                 double sigma, double lr, double weight_decay, double momentum,
                                 double dampening, bool nesterov, bool momentum_init,
                                 double noise_std, double grad_mult, bool stochastic_rounding,
                                 const c10::optional<at::Tensor>& step_t,
                                 const c10::optional<at::Tensor>& lr_t,
                                 const c10::optional<at::Tensor>& noise_std_t) {
  const bool mom = !moms.empty();
  std::vector<const at::TensorList*> lists{&params, &grads};
  if (mom) lists.push_back(&moms);
  const Tables tb = check_args("restore_and_step_multi_", lists, chunks, meta, ptrs, chunk);
  check_scalar_tensor(grad_scale, params[0], "grad_scale");
  check_scalar_tensor(found_inf, params[0], "found_inf");
  check_noise_args(seed, bucket_id, 0, restore_tag);
  TORCH_CHECK(restore_tag >= 0 || sigma == 0.0,
              "fused_flat.restore_and_step_multi_: restore_tag must be >= 0 when sigma != 0");
  const StepScalars sc{step_scalar("restore_and_step_multi_", step_t, params[0]),
                       float_scalar("restore_and_step_multi_", lr_t, params[0], "lr_t"),
                       float_scalar("restore_and_step_multi_", noise_std_t, params[0], "noise_std_t")};
  if (tb.n_chunks == 0) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const Noise na{make_key(seed, bucket_id), step,
                 restore_tag < 0 ? 0u : static_cast<uint32_t>(restore_tag)};
  const float* gs = grad_scale.has_value() ? grad_scale->data_ptr<float>() : nullptr;
  const float* fi = found_inf.has_value() ? found_inf->data_ptr<float>() : nullptr;
  const StepLaunch l{gs, fi, sc, stream_of(params[0])};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "restore_and_step_multi_", [&] {
    using acc_t = acc_of<scalar_t>;
    // grad_mult: the kernel divides it by *grad_scale when one is given
    const StepArgs<acc_t> a = make_step_args<acc_t>(sigma, lr, weight_decay, momentum, dampening,
                                                   noise_std, grad_mult, nesterov, momentum_init);
    const bool xi = a.noise_std != 0 || sc.noise_std.p != nullptr;
    if constexpr (sizeof(scalar_t) == 2) {   // SR: 16-bit params only (ignored otherwise)
      if (stochastic_rounding) {
        if (mom)
          dispatch_noise<scalar_t, true, true>(tb, na, a, grad_mult, xi, l);
        else
          dispatch_noise<scalar_t, false, true>(tb, na, a, grad_mult, xi, l);
        return;
      }
    }
    if (mom)
      dispatch_noise<scalar_t, true, false>(tb, na, a, grad_mult, xi, l);
    else
      dispatch_noise<scalar_t, false, false>(tb, na, a, grad_mult, xi, l);
  });
}

at::Tensor all_finite_multi_cuda(at::TensorList tensors, const at::Tensor& chunks,
                                 const at::Tensor& meta, const at::Tensor& ptrs, int64_t chunk,
                                 at::Tensor& scratch) {
  const Tables tb = check_args("all_finite_multi", {&tensors}, chunks, meta, ptrs, chunk);
  TORCH_CHECK(scratch.scalar_type() == at::kInt && scratch.numel() == 2 && scratch.is_contiguous() &&
                  scratch.device() == tensors[0].device(),
              "fused_flat.all_finite_multi: scratch must be a zeroed int32 [2] tensor on ",
              tensors[0].device());
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const auto opts = tensors[0].options().dtype(at::kFloat);
  if (tb.n_chunks == 0) return at::zeros({1}, opts);
  at::Tensor out = at::empty({1}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "all_finite_multi", [&] {
    ml_all_finite_kernel<scalar_t><<<static_cast<int>(tb.n_chunks), kThreads, 0, stream_of(tensors[0])>>>(
        tb.chunks, tb.meta, tb.ptrs, tb.T, tb.chunk, scratch.data_ptr<int>(), out.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace mlang
}  // namespace cuda_impl

TORCH_LIBRARY_IMPL(fused_flat, CUDA, m) {
  m.impl("perturb_multi_", &cuda_impl::mlang::perturb_multi_cuda);
  m.impl("restore_and_step_multi_", &cuda_impl::mlang::restore_and_step_multi_cuda);
  m.impl("all_finite_multi", &cuda_impl::mlang::all_finite_multi_cuda);
}

}  // namespace fused_flat
