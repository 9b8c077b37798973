// CUDA implementations of the fused_flat ops perturb_ and restore_and_step_.
//
// Same semantics as csrc/cpu/kernels_cpu.cpp, and the same per-element arithmetic:
// the noise (fused_flat::call_noise / element_noise, layout 3) and the update
// (fused_flat::langevin_update) come from fused_flat/elementwise.h. Compiled with
// -fmad=false (setup.py) so the fp32 results equal the CPU kernels' bit for bit.
//
// Launch design
//   * Every element's noise is a pure function of its bucket index gi = offset + i
//     (ALGORITHMS.md §1); grid and block sizes only decide who computes it.
//   * Vector path (fp32/bf16/fp16): when param, grad and momentum share the same
//     16-byte misalignment and the first aligned element starts a Philox call (bucket
//     index a multiple of 4), the aligned body is processed in 16-byte vectors (fp32:
//     4 elements = 1 Philox call per tag; 16-bit: 8 elements = 2 calls), grid-stride with
//     int64 indices. The < 16-byte head and tail (at most 2V - 2 elements) are done one
//     element at a time (element_noise).
//   * Call path (other offsets, mismatched alignment, fp64): grid-stride over Philox
//     calls, one call per tag and 4 elements, scalar loads/stores.
//   * grad_scale and found_inf are read inside the kernel (no host synchronisation):
//     found_inf != 0 -> only the restore theta -= sigma * eps(restore_tag), momentum
//     untouched; otherwise g is multiplied by grad_mult / *grad_scale (computed in double,
//     as the CPU op does, then rounded to the compute type).
//   * Seed and step are kernel arguments; no RNG state lives on the device.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>

#include "fused_flat/elementwise.h"
#include "fused_flat/op_args.h"
#include "sweep.cuh"

namespace fused_flat {
namespace cuda_impl {

constexpr int kThreads = 256;

__device__ __forceinline__ int64_t thread_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t thread_stride() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

// theta <- theta + sigma * eps(tag)
template <typename scalar_t, int V, bool kVec>
__global__ void __launch_bounds__(kThreads)
perturb_kernel(scalar_t* __restrict__ p, Geometry geo, NoiseArgs na,
               at::opmath_type<scalar_t> sigma) {
  using acc_t = at::opmath_type<scalar_t>;
  sweep<scalar_t, V, kVec, true, false, false, false>(
      p, nullptr, nullptr, geo, na, thread_index(), thread_stride(), [sigma](acc_t& th, acc_t, acc_t&, float e, float) {
        th = th + sigma * static_cast<acc_t>(e);
      });
}

// The fused restore + decay + momentum + Langevin + SGD pass.
template <typename scalar_t, int V, bool kVec, bool kMom, bool kEps, bool kXi>
__global__ void __launch_bounds__(kThreads)
restore_and_step_kernel(scalar_t* __restrict__ p, const scalar_t* __restrict__ g,
                        scalar_t* __restrict__ m, Geometry geo, NoiseArgs na,
                        StepArgs<at::opmath_type<scalar_t>> a, double grad_mult,
                        const float* __restrict__ grad_scale, const float* __restrict__ found_inf) {
  using acc_t = at::opmath_type<scalar_t>;
  if (found_inf != nullptr && *found_inf != 0.0f) {
    // Skipped step (non-finite gradient): undo the perturbation only, as the CPU op
    // does with perturb_(-sigma); momentum untouched.
    if constexpr (kEps) {
      const acc_t neg_sigma = -a.sigma;
      sweep<scalar_t, V, kVec, true, false, false, false>(
          p, nullptr, nullptr, geo, na, thread_index(), thread_stride(), [neg_sigma](acc_t& th, acc_t, acc_t&, float e, float) {
            th = th + neg_sigma * static_cast<acc_t>(e);
          });
    }
    return;
  }
  if (grad_scale != nullptr) {
    a.grad_mult = static_cast<acc_t>(grad_mult / static_cast<double>(*grad_scale));
  }
  sweep<scalar_t, V, kVec, kEps, kXi, true, kMom>(
      p, g, m, geo, na, thread_index(), thread_stride(), [&a](acc_t& th, acc_t gg, acc_t& mm, float e, float x) {
        th = langevin_update<kMom>(th, gg, &mm, static_cast<acc_t>(e), static_cast<acc_t>(x), a);
      });
}

// The same pass with stochastic rounding of theta (16-bit scalar_t only; its own name so
// the static checks of the round-to-nearest kernels keep their counts). The skipped step's
// restore stays round-to-nearest, as on the CPU.
template <typename scalar_t, int V, bool kVec, bool kMom, bool kEps, bool kXi>
__global__ void __launch_bounds__(kThreads)
restore_and_step_sr_kernel(scalar_t* __restrict__ p, const scalar_t* __restrict__ g,
                           scalar_t* __restrict__ m, Geometry geo, NoiseArgs na,
                           StepArgs<at::opmath_type<scalar_t>> a, double grad_mult,
                           const float* __restrict__ grad_scale, const float* __restrict__ found_inf) {
  using acc_t = at::opmath_type<scalar_t>;
  static_assert(sizeof(scalar_t) == 2, "stochastic rounding: 16-bit parameters only");
  if (found_inf != nullptr && *found_inf != 0.0f) {
    if constexpr (kEps) {
      const acc_t neg_sigma = -a.sigma;
      sweep<scalar_t, V, kVec, true, false, false, false>(
          p, nullptr, nullptr, geo, na, thread_index(), thread_stride(), [neg_sigma](acc_t& th, acc_t, acc_t&, float e, float) {
            th = th + neg_sigma * static_cast<acc_t>(e);
          });
    }
    return;
  }
  if (grad_scale != nullptr) {
    a.grad_mult = static_cast<acc_t>(grad_mult / static_cast<double>(*grad_scale));
  }
  sweep<scalar_t, V, kVec, kEps, kXi, true, kMom, true>(
      p, g, m, geo, na, thread_index(), thread_stride(), [&a](acc_t& th, acc_t gg, acc_t& mm, float e, float x) {
        th = langevin_update<kMom>(th, gg, &mm, static_cast<acc_t>(e), static_cast<acc_t>(x), a);
      });
}

// param (scalar_t) <- round-to-nearest(master (fp32) + sigma * eps(tag)). Vector path: V
// params (16 bytes) per step, the master read as V floats (32 bytes for 16-bit params).
template <typename scalar_t, int V, bool kVec, bool kEps>
__global__ void __launch_bounds__(kThreads)
perturb_from_kernel(scalar_t* __restrict__ p, const float* __restrict__ ms, Geometry geo,
                    NoiseArgs na, float sigma) {
  const int64_t tid = thread_index(), stride = thread_stride();
  if constexpr (kVec) {
    using VecT = Vec<scalar_t, V>;
    using MVecT = Vec<float, 4>;
    const int64_t body_end = geo.head + geo.nvec * V;
    const int64_t edges = geo.head + (geo.n - body_end);
    for (int64_t t = tid; t < edges; t += stride) {
      const int64_t i = t < geo.head ? t : body_end + (t - geo.head);
      const float e = kEps ? element_normal(na.key, na.step, na.tag, geo.offset + i) : 0.0f;
      p[i] = static_cast<scalar_t>(ms[i] + sigma * e);
    }
    for (int64_t v = tid; v < geo.nvec; v += stride) {
      const int64_t i0 = geo.head + v * V;
      const int64_t j0 = (geo.offset + i0) >> 2;
      VecT pv;
#pragma unroll
      for (int k = 0; k < V / 4; ++k) {
        const MVecT mv = *reinterpret_cast<const MVecT*>(ms + i0 + 4 * k);
        float e[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        if constexpr (kEps) call_normals(noise_words(na.key, j0 + k, na.step, na.tag), e[0], e[1], e[2], e[3]);
#pragma unroll
        for (int h = 0; h < 4; ++h) pv.v[4 * k + h] = static_cast<scalar_t>(mv.v[h] + sigma * e[h]);
      }
      *reinterpret_cast<VecT*>(p + i0) = pv;
    }
  } else {
    const int64_t jbeg = geo.offset >> 2;
    const int64_t jend = (geo.offset + geo.n + 3) >> 2;
    for (int64_t j = jbeg + tid; j < jend; j += stride) {
      float e[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      if constexpr (kEps) call_normals(noise_words(na.key, j, na.step, na.tag), e[0], e[1], e[2], e[3]);
      const int64_t i0 = 4 * j - geo.offset;
#pragma unroll
      for (int h = 0; h < 4; ++h) {
        const int64_t i = i0 + h;
        if (i >= 0 && i < geo.n) p[i] = static_cast<scalar_t>(ms[i] + sigma * e[h]);
      }
    }
  }
}

// ------------------------------------------------------------------- host side

int sm_count(int device) {
  static int cache[64] = {0};
  if (device >= 0 && device < 64 && cache[device] > 0) return cache[device];
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  if (device >= 0 && device < 64) cache[device] = sms;
  return sms;
}

// Enough blocks to fill the GPU (resident blocks per SM from the kernel's occupancy),
// never more than the work needs. The results never depend on this number.
template <typename Kernel>
int grid_for(Kernel kernel, int64_t work_items, int device) {
  static int per_sm = 0;  // one per kernel instantiation (same on every device of a build)
  if (per_sm == 0) {
    int b = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b, kernel, kThreads, 0));
    per_sm = std::max(b, 1);
  }
  const int64_t need = (work_items + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(per_sm) * sm_count(device);
  return static_cast<int>(std::max<int64_t>(1, std::min(need, cap)));
}

template <typename scalar_t>
void launch_perturb(const at::Tensor& param, NoiseArgs na, double sigma, int64_t offset) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = 16 / sizeof(scalar_t);
  Geometry geo{param.numel(), offset, 0, 0};
  scalar_t* p = param.data_ptr<scalar_t>();
  const int device = param.get_device();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const acc_t s = static_cast<acc_t>(sigma);
  if constexpr (!std::is_same_v<scalar_t, double>) {
    if (plan_vec<scalar_t>(geo, p, nullptr, nullptr)) {
      auto k = perturb_kernel<scalar_t, V, true>;
      const int64_t work = geo.nvec + 2 * V;
      k<<<grid_for(k, work, device), kThreads, 0, stream>>>(p, geo, na, s);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  auto k = perturb_kernel<scalar_t, 4, false>;
  const int64_t work = calls_touching(offset, geo.n);
  k<<<grid_for(k, work, device), kThreads, 0, stream>>>(p, geo, na, s);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, bool kVec, bool kMom, bool kEps, bool kXi>
void launch_step_kernel(scalar_t* p, const scalar_t* g, scalar_t* m, const Geometry& geo,
                        const NoiseArgs& na, const StepArgs<at::opmath_type<scalar_t>>& a,
                        double grad_mult, const float* gs, const float* fi, int device,
                        cudaStream_t stream, bool sr) {
  constexpr int V = kVec ? 16 / sizeof(scalar_t) : 4;
  const int64_t work = kVec ? geo.nvec + 2 * V
                            : calls_touching(geo.offset, geo.n);
  if constexpr (sizeof(scalar_t) == 2) {
    if (sr) {
      auto k = restore_and_step_sr_kernel<scalar_t, V, kVec, kMom, kEps, kXi>;
      k<<<grid_for(k, work, device), kThreads, 0, stream>>>(p, g, m, geo, na, a, grad_mult, gs, fi);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  auto k = restore_and_step_kernel<scalar_t, V, kVec, kMom, kEps, kXi>;
  k<<<grid_for(k, work, device), kThreads, 0, stream>>>(p, g, m, geo, na, a, grad_mult, gs, fi);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, bool kVec, bool kMom>
void dispatch_noise(scalar_t* p, const scalar_t* g, scalar_t* m, const Geometry& geo,
                    const NoiseArgs& na, const StepArgs<at::opmath_type<scalar_t>>& a,
                    double grad_mult, const float* gs, const float* fi, int device,
                    cudaStream_t stream, bool sr) {
  const bool eps = a.sigma != 0, xi = a.noise_std != 0;
  if (eps && xi)
    launch_step_kernel<scalar_t, kVec, kMom, true, true>(p, g, m, geo, na, a, grad_mult, gs, fi, device, stream, sr);
  else if (eps)
    launch_step_kernel<scalar_t, kVec, kMom, true, false>(p, g, m, geo, na, a, grad_mult, gs, fi, device, stream, sr);
  else if (xi)
    launch_step_kernel<scalar_t, kVec, kMom, false, true>(p, g, m, geo, na, a, grad_mult, gs, fi, device, stream, sr);
  else
    launch_step_kernel<scalar_t, kVec, kMom, false, false>(p, g, m, geo, na, a, grad_mult, gs, fi, device, stream, sr);
}

template <typename scalar_t, bool kVec>
void dispatch_mom(scalar_t* p, const scalar_t* g, scalar_t* m, const Geometry& geo,
                  const NoiseArgs& na, const StepArgs<at::opmath_type<scalar_t>>& a,
                  double grad_mult, const float* gs, const float* fi, int device,
                  cudaStream_t stream, bool sr) {
  if (m != nullptr)
    dispatch_noise<scalar_t, kVec, true>(p, g, m, geo, na, a, grad_mult, gs, fi, device, stream, sr);
  else
    dispatch_noise<scalar_t, kVec, false>(p, g, m, geo, na, a, grad_mult, gs, fi, device, stream, sr);
}

void check_cuda_bucket(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "fused_flat: ", name, " must be a CUDA tensor, got ", t.device());
}

void perturb_cuda(at::Tensor& param, int64_t seed, int64_t bucket_id, int64_t step, int64_t tag,
                  double sigma, int64_t offset) {
  check_bucket(param, "param");
  check_cuda_bucket(param, "param");
  check_noise_args(seed, bucket_id, offset, tag);
  TORCH_CHECK(tag >= 0, "fused_flat.perturb_: tag must be >= 0, got ", tag);
  if (sigma == 0.0 || param.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(param.device());
  const NoiseArgs na{make_key(seed, bucket_id), step, static_cast<uint32_t>(tag)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "perturb_", [&] {
    launch_perturb<scalar_t>(param, na, sigma, offset);
  });
}

void restore_and_step_cuda(at::Tensor& param, const at::Tensor& grad,
                           const c10::optional<at::Tensor>& momentum_buffer,
                           const c10::optional<at::Tensor>& grad_scale,
                           const c10::optional<at::Tensor>& found_inf, int64_t seed,
                           int64_t bucket_id, int64_t step, int64_t offset, int64_t restore_tag,
                           double sigma, double lr, double weight_decay, double momentum,
                           double dampening, bool nesterov, bool momentum_init, double noise_std,
                           double grad_mult, bool stochastic_rounding) {
  check_bucket(param, "param");
  check_cuda_bucket(param, "param");
  check_like(param, grad, "grad");
  if (momentum_buffer.has_value()) check_like(param, *momentum_buffer, "momentum_buffer");
  check_scalar_tensor(grad_scale, param, "grad_scale");
  check_scalar_tensor(found_inf, param, "found_inf");
  check_noise_args(seed, bucket_id, offset, restore_tag);
  TORCH_CHECK(restore_tag >= 0 || sigma == 0.0,
              "fused_flat.restore_and_step_: restore_tag must be >= 0 when sigma != 0");
  if (param.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(param.device());
  const int device = param.get_device();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const NoiseArgs na{make_key(seed, bucket_id), step,
                     restore_tag < 0 ? 0u : static_cast<uint32_t>(restore_tag)};
  const float* gs = grad_scale.has_value() ? grad_scale->data_ptr<float>() : nullptr;
  const float* fi = found_inf.has_value() ? found_inf->data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "restore_and_step_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // grad_mult: the kernel divides it by *grad_scale when one is given
    const StepArgs<acc_t> a = make_step_args<acc_t>(sigma, lr, weight_decay, momentum, dampening,
                                                   noise_std, grad_mult, nesterov, momentum_init);
    scalar_t* p = param.data_ptr<scalar_t>();
    const scalar_t* g = grad.data_ptr<scalar_t>();
    scalar_t* m = momentum_buffer.has_value() ? momentum_buffer->data_ptr<scalar_t>() : nullptr;
    Geometry geo{param.numel(), offset, 0, 0};
    if constexpr (!std::is_same_v<scalar_t, double>) {
      if (plan_vec<scalar_t>(geo, p, g, m)) {
        dispatch_mom<scalar_t, true>(p, g, m, geo, na, a, grad_mult, gs, fi, device, stream,
                                     stochastic_rounding);
        return;
      }
    }
    dispatch_mom<scalar_t, false>(p, g, m, geo, na, a, grad_mult, gs, fi, device, stream,
                                  stochastic_rounding);
  });
}

template <typename scalar_t, bool kVec>
void launch_perturb_from(scalar_t* p, const float* ms, const Geometry& geo, const NoiseArgs& na,
                         float sigma, int device, cudaStream_t stream) {
  constexpr int V = kVec ? 16 / sizeof(scalar_t) : 4;
  const int64_t work = kVec ? geo.nvec + 2 * V : calls_touching(geo.offset, geo.n);
  if (sigma != 0.0f) {
    auto k = perturb_from_kernel<scalar_t, V, kVec, true>;
    k<<<grid_for(k, work, device), kThreads, 0, stream>>>(p, ms, geo, na, sigma);
  } else {
    auto k = perturb_from_kernel<scalar_t, V, kVec, false>;
    k<<<grid_for(k, work, device), kThreads, 0, stream>>>(p, ms, geo, na, sigma);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void perturb_from_cuda(at::Tensor& param, const at::Tensor& master, int64_t seed, int64_t bucket_id,
                       int64_t step, int64_t tag, double sigma, int64_t offset) {
  check_bucket(param, "param");
  check_cuda_bucket(param, "param");
  check_bucket(master, "master");
  TORCH_CHECK(master.scalar_type() == at::kFloat && master.numel() == param.numel() &&
                  master.device() == param.device(),
              "fused_flat.perturb_from_: master must be float32 with the param's numel (",
              param.numel(), ") on ", param.device(), ", got ", master.scalar_type(), " numel ",
              master.numel(), " on ", master.device());
  TORCH_CHECK(param.scalar_type() == at::kBFloat16 || param.scalar_type() == at::kHalf ||
                  param.scalar_type() == at::kFloat,
              "fused_flat.perturb_from_: param must be bf16, fp16 or fp32, got ", param.scalar_type());
  check_noise_args(seed, bucket_id, offset, tag);
  TORCH_CHECK(tag >= 0, "fused_flat.perturb_from_: tag must be >= 0, got ", tag);
  if (param.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(param.device());
  const int device = param.get_device();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const NoiseArgs na{make_key(seed, bucket_id), step, static_cast<uint32_t>(tag)};
  const float* ms = master.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "perturb_from_", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      scalar_t* p = param.data_ptr<scalar_t>();
      Geometry geo{param.numel(), offset, 0, 0};
      // the master must share the param's misalignment in elements (both buckets start
      // their 16-byte vectors at the same element): true for allocations of their own
      if (plan_vec<scalar_t>(geo, p, nullptr, nullptr) &&
          (reinterpret_cast<uintptr_t>(ms + geo.head) % 16) == 0) {
        launch_perturb_from<scalar_t, true>(p, ms, geo, na, static_cast<float>(sigma), device, stream);
      } else {
        launch_perturb_from<scalar_t, false>(p, ms, geo, na, static_cast<float>(sigma), device, stream);
      }
    }
  });
}

}  // namespace cuda_impl

TORCH_LIBRARY_IMPL(fused_flat, CUDA, m) {
  m.impl("perturb_", &cuda_impl::perturb_cuda);
  m.impl("restore_and_step_", &cuda_impl::restore_and_step_cuda);
  m.impl("perturb_from_", &cuda_impl::perturb_from_cuda);
}

}  // namespace fused_flat
