// CUDA implementations of the Langevin list ops perturb_list_, restore_and_step_list_ and
// all_finite (schemas: csrc/bindings.cpp, the CPU kernels' too; Python: fused_flat/backends/
// cuda.py): one launch per bucket per pass (more when a list exceeds one launch's
// capacity). The launch arguments -- pointers, sizes, bucket offsets, which block takes
// which chunk -- travel by value in the kernel's argument block (list_launch.h, emulated
// on the host by tests/test_list_launch_emulation.py): no device tables, no copies, no
// host read, capturable in a CUDA graph on the first call. The index logic inside a block
// (call frame, 16-byte unit path, call path) and the per-element bodies live in
// multi_langevin.cuh (host-emulated by tests/test_multi_langevin_emulation.py), the
// arithmetic in fused_flat/elementwise.h (the CPU kernels'). Compiled with -fmad=false, so
// fp32 results equal the CPU's bit for bit.
//
// No host synchronisation: grad_scale and found_inf are read by the kernels (found_inf set:
// only the restore theta + (-sigma) eps, momentum untouched, as on the CPU). all_finite
// zeroes its float32 [1] output, and every block that sees an inf or NaN writes 1.0 to it.
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
#include "list_launch.h"
#include "multi_args.cuh"
#include "multi_langevin.cuh"

namespace fused_flat {
namespace cuda_impl {
namespace mlang {

constexpr int kThreads = 256;
// 4 resident blocks of 256 threads per SM: <= 64 registers, no spills (SASS checks). The
// fp64 restore + step kernels hold twice the data per unit: 3 blocks (<= 80 registers), which
// keeps the momentum + xi variant free of spills with its arguments in the parameter bank.
constexpr int kMinBlocks = 4;
template <typename scalar_t>
constexpr int min_blocks() {
  return sizeof(scalar_t) == 8 ? 3 : kMinBlocks;
}

template <typename scalar_t>
using acc_of = at::opmath_type<scalar_t>;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
ml_perturb_kernel(const launch::ListArgs<1> L, Noise na, acc_of<scalar_t> sigma,
                  const int64_t* __restrict__ step_p) {
  using acc_t = acc_of<scalar_t>;
  na.step = dev_step(step_p, na.step);
  const FrameRow r = frame_row(launch::row_of(L, blockIdx.x, launch::kChunk, true));
  PerturbBody<acc_t> body{sigma};
  scalar_t* p[1];
  multi::slot_ptrs(p, L, r.t);
  visit_frame<scalar_t, 1, 1u, 1u, true, false>(p, r, na, threadIdx.x, blockDim.x, body);
}

// kSR: theta stochastically rounded (16-bit scalar_t only). Lists: (theta, g[, m]).
template <typename scalar_t, bool kMom, bool kEps, bool kXi, bool kSR>
__global__ void __launch_bounds__(kThreads, min_blocks<scalar_t>())
ml_restore_step_kernel(const launch::ListArgs<kMom ? 3 : 2> L, Noise na,
                       StepArgs<acc_of<scalar_t>> a, double grad_mult,
                       const float* __restrict__ grad_scale, const float* __restrict__ found_inf,
                       StepScalars sc) {
  using acc_t = acc_of<scalar_t>;
  static_assert(!kSR || sizeof(scalar_t) == 2, "stochastic rounding: 16-bit parameters only");
  load_step_scalars(sc, na, a);
  const FrameRow r = frame_row(launch::row_of(L, blockIdx.x, launch::kChunk, true));
  if (found_inf != nullptr && *found_inf != 0.0f) {
    // skipped step (non-finite gradient): undo the perturbation only, momentum untouched
    if constexpr (kEps) {
      PerturbBody<acc_t> body{-a.sigma};
      scalar_t* p[1];
      multi::slot_ptrs(p, L, r.t);
      visit_frame<scalar_t, 1, 1u, 1u, true, false>(p, r, na, threadIdx.x, blockDim.x, body);
    }
    return;
  }
  if (grad_scale != nullptr) a.grad_mult = static_cast<acc_t>(grad_mult / static_cast<double>(*grad_scale));
  StepBody<kMom, acc_t> body{a};
  if constexpr (kMom) {
    scalar_t* p[3];
    multi::slot_ptrs(p, L, r.t);
    visit_frame<scalar_t, 3, 0b111u, 0b101u, kEps, kXi, kSR>(p, r, na, threadIdx.x, blockDim.x, body);
  } else {
    scalar_t* p[2];
    multi::slot_ptrs(p, L, r.t);
    visit_frame<scalar_t, 2, 0b11u, 0b01u, kEps, kXi, kSR>(p, r, na, threadIdx.x, blockDim.x, body);
  }
}

// found_inf: *out (zeroed before the first launch) becomes 1.0 when a block sees an inf or
// NaN; every such block writes the same value, so no atomics and no ordering are needed.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
ml_all_finite_kernel(const launch::ListArgs<1> L, float* __restrict__ out) {
  using acc_t = acc_of<scalar_t>;
  const multi::Row r = launch::row_of(L, blockIdx.x, launch::kChunk, false);
  NonFiniteBody<acc_t> body{0};
  multi::visit_row<scalar_t, 1, 1u, 0u>(L, r, threadIdx.x, blockDim.x, body);
  const int flag = __syncthreads_or(body.flag);
  if (threadIdx.x == 0 && flag) *out = 1.0f;
}

// The argument blocks stay within the classic 4 KB limit (list_launch.h).
static_assert(sizeof(launch::ListArgs<3>) + sizeof(Noise) + sizeof(StepArgs<double>) + sizeof(double) +
                      2 * sizeof(void*) + sizeof(StepScalars) <= launch::kParamLimit,
              "restore + step kernel arguments fit 4 KB");

// ------------------------------------------------------------------- host side
using namespace multi_args;   // check_lists, check_offsets, the scalars, for_each_launch

void perturb_list_cuda(at::TensorList params, at::IntArrayRef offsets, int64_t seed,
                       int64_t bucket_id, int64_t step, int64_t tag, double sigma,
                       const c10::optional<at::Tensor>& layout,
                       const c10::optional<at::Tensor>& step_t) {
  const char* op = "perturb_list_";
  const int64_t T = check_lists(op, {&params}, layout);
  check_offsets(op, offsets, T, false);
  check_noise_args(seed, bucket_id, 0, tag);
  TORCH_CHECK(tag >= 0, "fused_flat.perturb_list_: tag must be >= 0, got ", tag);
  if (T == 0) return;
  const int64_t* step_p = step_scalar(op, step_t, params[0]);
  if (sigma == 0.0) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const Noise na{make_key(seed, bucket_id), step, static_cast<uint32_t>(tag)};
  const cudaStream_t stream = stream_of(params[0]);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "perturb_list_", [&] {
    const acc_of<scalar_t> s = static_cast<acc_of<scalar_t>>(sigma);
    for_each_launch<1>({&params}, offsets, true, [&](const launch::ListArgs<1>& L) {
      ml_perturb_kernel<scalar_t><<<L.n_blocks, kThreads, 0, stream>>>(L, na, s, step_p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

struct StepLaunch {
  const float* gs;
  const float* fi;
  StepScalars sc;
  cudaStream_t stream;
};

template <typename scalar_t, bool kMom, bool kEps, bool kXi, bool kSR>
void launch_step(const std::vector<const at::TensorList*>& lists, at::IntArrayRef offsets,
                 const Noise& na, const StepArgs<acc_of<scalar_t>>& a, double grad_mult,
                 const StepLaunch& l) {
  constexpr int K = kMom ? 3 : 2;
  for_each_launch<K>(lists, offsets, true, [&](const launch::ListArgs<K>& L) {
    ml_restore_step_kernel<scalar_t, kMom, kEps, kXi, kSR><<<L.n_blocks, kThreads, 0, l.stream>>>(
        L, na, a, grad_mult, l.gs, l.fi, l.sc);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// xi: whether the pass draws the Langevin noise (noise_std != 0, or a device noise_std).
template <typename scalar_t, bool kMom, bool kSR>
void dispatch_noise(const std::vector<const at::TensorList*>& lists, at::IntArrayRef offsets,
                    const Noise& na, const StepArgs<acc_of<scalar_t>>& a, double grad_mult,
                    bool xi, const StepLaunch& l) {
  const bool eps = a.sigma != 0;
  if (eps && xi)
    launch_step<scalar_t, kMom, true, true, kSR>(lists, offsets, na, a, grad_mult, l);
  else if (eps)
    launch_step<scalar_t, kMom, true, false, kSR>(lists, offsets, na, a, grad_mult, l);
  else if (xi)
    launch_step<scalar_t, kMom, false, true, kSR>(lists, offsets, na, a, grad_mult, l);
  else
    launch_step<scalar_t, kMom, false, false, kSR>(lists, offsets, na, a, grad_mult, l);
}

void restore_and_step_list_cuda(at::TensorList params, at::TensorList grads, at::TensorList moms,
                                at::IntArrayRef offsets,
                                const c10::optional<at::Tensor>& grad_scale,
                                const c10::optional<at::Tensor>& found_inf, int64_t seed,
                                int64_t bucket_id, int64_t step, int64_t restore_tag,
                                double sigma, double lr, double weight_decay, double momentum,
                                double dampening, bool nesterov, bool momentum_init,
                                double noise_std, double grad_mult, bool stochastic_rounding,
                                const c10::optional<at::Tensor>& layout,
                                const c10::optional<at::Tensor>& step_t,
                                const c10::optional<at::Tensor>& lr_t,
                                const c10::optional<at::Tensor>& noise_std_t) {
  const char* op = "restore_and_step_list_";
  const bool mom = !moms.empty();
  std::vector<const at::TensorList*> lists{&params, &grads};
  if (mom) lists.push_back(&moms);
  const int64_t T = check_lists(op, lists, layout);
  check_offsets(op, offsets, T, false);
  check_noise_args(seed, bucket_id, 0, restore_tag);
  TORCH_CHECK(restore_tag >= 0 || sigma == 0.0,
              "fused_flat.restore_and_step_list_: restore_tag must be >= 0 when sigma != 0");
  if (T == 0) return;
  check_scalar_tensor(grad_scale, params[0], "grad_scale");
  check_scalar_tensor(found_inf, params[0], "found_inf");
  const StepScalars sc{step_scalar(op, step_t, params[0]), float_scalar(op, lr_t, params[0], "lr_t"),
                       float_scalar(op, noise_std_t, params[0], "noise_std_t")};
  const c10::cuda::CUDAGuard guard(params[0].device());
  const Noise na{make_key(seed, bucket_id), step,
                 restore_tag < 0 ? 0u : static_cast<uint32_t>(restore_tag)};
  const float* gs = grad_scale.has_value() ? grad_scale->data_ptr<float>() : nullptr;
  const float* fi = found_inf.has_value() ? found_inf->data_ptr<float>() : nullptr;
  const StepLaunch l{gs, fi, sc, stream_of(params[0])};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "restore_and_step_list_", [&] {
    using acc_t = acc_of<scalar_t>;
    // grad_mult: the kernel divides it by *grad_scale when one is given
    const StepArgs<acc_t> a = make_step_args<acc_t>(sigma, lr, weight_decay, momentum, dampening,
                                                   noise_std, grad_mult, nesterov, momentum_init);
    const bool xi = a.noise_std != 0 || sc.noise_std.p != nullptr;
    if constexpr (sizeof(scalar_t) == 2) {   // SR: 16-bit params only (ignored otherwise)
      if (stochastic_rounding) {
        if (mom)
          dispatch_noise<scalar_t, true, true>(lists, offsets, na, a, grad_mult, xi, l);
        else
          dispatch_noise<scalar_t, false, true>(lists, offsets, na, a, grad_mult, xi, l);
        return;
      }
    }
    if (mom)
      dispatch_noise<scalar_t, true, false>(lists, offsets, na, a, grad_mult, xi, l);
    else
      dispatch_noise<scalar_t, false, false>(lists, offsets, na, a, grad_mult, xi, l);
  });
}

// all_finite on CUDA: any strided floating tensors (non-contiguous ones read through a
// contiguous copy, other dtypes ignored, as on the CPU), one launch sequence per dtype into
// one zeroed float32 [1]. No host read.
at::Tensor all_finite_cuda(at::TensorList tensors) {
  TORCH_CHECK_VALUE(!tensors.empty(), "fused_flat.all_finite: empty tensor list");
  const at::Device device = tensors[0].device();
  TORCH_CHECK(device.is_cuda(), "fused_flat.all_finite: CUDA tensors expected, got ", device);
  const c10::cuda::CUDAGuard guard(device);
  at::Tensor out = at::zeros({1}, tensors[0].options().dtype(at::kFloat));
  const cudaStream_t stream = stream_of(tensors[0]);
  for (const at::ScalarType dt : {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble}) {
    std::vector<at::Tensor> flat;
    for (const at::Tensor& t : tensors) {
      TORCH_CHECK_VALUE(t.device() == device, "fused_flat.all_finite: every tensor must be on ",
                        device, ", got one on ", t.device());
      if (t.scalar_type() != dt || t.numel() == 0) continue;
      flat.push_back(t.is_contiguous() ? t.view({-1}) : t.contiguous().view({-1}));
    }
    if (flat.empty()) continue;
    const at::TensorList list(flat);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "all_finite", [&] {
      for_each_launch<1>({&list}, {}, false, [&](const launch::ListArgs<1>& L) {
        ml_all_finite_kernel<scalar_t><<<L.n_blocks, kThreads, 0, stream>>>(L, out.data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  return out;
}

}  // namespace mlang
}  // namespace cuda_impl

TORCH_LIBRARY_IMPL(fused_flat, CUDA, m) {
  m.impl("perturb_list_", &cuda_impl::mlang::perturb_list_cuda);
  m.impl("restore_and_step_list_", &cuda_impl::mlang::restore_and_step_list_cuda);
  m.impl("all_finite", &cuda_impl::mlang::all_finite_cuda);
}

}  // namespace fused_flat
