// CUDA implementations of the fused_flat ops perturb_ and restore_and_step_.
//
// Same semantics as csrc/cpu/kernels_cpu.cpp, and the same per-element arithmetic:
// the noise (fused_flat::pair_noise / element_noise) and the update
// (fused_flat::langevin_update) come from fused_flat/elementwise.h. Compiled with
// -fmad=false (setup.py) so the fp32 results equal the CPU kernels' bit for bit.
//
// Launch design
//   * Every element's noise is a pure function of its bucket index gi = offset + i
//     (ALGORITHMS.md §1); grid and block sizes only decide who computes it.
//   * Vector path (fp32/bf16/fp16): when param, grad and momentum share the same
//     16-byte misalignment and the first aligned element has an even bucket index, the
//     aligned body is processed in 16-byte vectors (fp32: 4 elements = 2 Philox pairs;
//     16-bit: 8 elements = 4 pairs), grid-stride with int64 indices. The < 16-byte head
//     and tail (at most 2V - 2 elements) are done one element at a time (element_noise).
//   * Pair path (odd parity, mismatched alignment, fp64): grid-stride over Philox pairs,
//     one Philox call per two elements, scalar loads/stores.
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

namespace fused_flat {
namespace cuda_impl {

constexpr int kThreads = 256;

struct NoiseArgs {
  PhiloxKey key;
  int64_t step;
  uint32_t tag;
};

// Where the 16-byte vectors of a bucket slice lie: elements [head, head + nvec * V).
struct Geometry {
  int64_t n;       // elements in the slice
  int64_t offset;  // bucket index of element 0
  int64_t head;    // elements before the first aligned vector (vector path only)
  int64_t nvec;    // number of aligned vectors (vector path only)
};

template <typename scalar_t, int V>
struct alignas(16) Vec {
  scalar_t v[V];
};

// Per-element body: body(theta, g, m, eps, xi) updates theta (and m) in acc_t.
// kG / kM: whether g and m are read (and m written).
template <typename scalar_t, bool kG, bool kM, typename Body>
__device__ __forceinline__ void do_element(scalar_t* __restrict__ p, const scalar_t* __restrict__ g,
                                           scalar_t* __restrict__ m, int64_t i, float e, float x,
                                           const Body& body) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t th = static_cast<acc_t>(p[i]);
  const acc_t gg = kG ? static_cast<acc_t>(g[i]) : acc_t(0);
  acc_t mm = kM ? static_cast<acc_t>(m[i]) : acc_t(0);
  body(th, gg, mm, e, x);
  p[i] = static_cast<scalar_t>(th);
  if constexpr (kM) m[i] = static_cast<scalar_t>(mm);
}

// Vector path over one slice; see the file comment.
template <typename scalar_t, int V, bool kEps, bool kXi, bool kG, bool kM, typename Body>
__device__ __forceinline__ void sweep_vec(scalar_t* __restrict__ p, const scalar_t* __restrict__ g,
                                          scalar_t* __restrict__ m, const Geometry& geo,
                                          const NoiseArgs& na, const Body& body) {
  using acc_t = at::opmath_type<scalar_t>;
  using VecT = Vec<scalar_t, V>;
  static_assert(V % 2 == 0 && sizeof(VecT) == 16, "16-byte vectors of whole Philox pairs");
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t body_end = geo.head + geo.nvec * V;
  const int64_t edges = geo.head + (geo.n - body_end);
  for (int64_t t = tid; t < edges; t += stride) {
    const int64_t i = t < geo.head ? t : body_end + (t - geo.head);
    float e, x;
    element_noise<kEps, kXi>(na.key, na.step, na.tag, geo.offset + i, e, x);
    do_element<scalar_t, kG, kM>(p, g, m, i, e, x, body);
  }
  for (int64_t v = tid; v < geo.nvec; v += stride) {
    const int64_t i0 = geo.head + v * V;
    VecT pv = *reinterpret_cast<const VecT*>(p + i0);
    VecT gv, mv;
    if constexpr (kG) gv = *reinterpret_cast<const VecT*>(g + i0);
    if constexpr (kM) mv = *reinterpret_cast<const VecT*>(m + i0);
    const int64_t j0 = (geo.offset + i0) >> 1;  // even by construction
#pragma unroll
    for (int k = 0; k < V / 2; ++k) {
      float e0, x0, e1, x1;
      pair_noise<kEps, kXi>(na.key, na.step, na.tag, j0 + k, e0, x0, e1, x1);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int q = 2 * k + h;
        acc_t th = static_cast<acc_t>(pv.v[q]);
        const acc_t gg = kG ? static_cast<acc_t>(gv.v[q]) : acc_t(0);
        acc_t mm = kM ? static_cast<acc_t>(mv.v[q]) : acc_t(0);
        body(th, gg, mm, h ? e1 : e0, h ? x1 : x0);
        pv.v[q] = static_cast<scalar_t>(th);
        if constexpr (kM) mv.v[q] = static_cast<scalar_t>(mm);
      }
    }
    *reinterpret_cast<VecT*>(p + i0) = pv;
    if constexpr (kM) *reinterpret_cast<VecT*>(m + i0) = mv;
  }
}

// Pair path: grid-stride over the Philox pairs that touch [offset, offset + n).
template <typename scalar_t, bool kEps, bool kXi, bool kG, bool kM, typename Body>
__device__ __forceinline__ void sweep_pairs(scalar_t* __restrict__ p, const scalar_t* __restrict__ g,
                                            scalar_t* __restrict__ m, const Geometry& geo,
                                            const NoiseArgs& na, const Body& body) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t jbeg = geo.offset >> 1;
  const int64_t jend = (geo.offset + geo.n + 1) >> 1;
  for (int64_t j = jbeg + tid; j < jend; j += stride) {
    float e0, x0, e1, x1;
    pair_noise<kEps, kXi>(na.key, na.step, na.tag, j, e0, x0, e1, x1);
    const int64_t i0 = 2 * j - geo.offset;
    if (i0 >= 0) do_element<scalar_t, kG, kM>(p, g, m, i0, e0, x0, body);
    if (i0 + 1 < geo.n) do_element<scalar_t, kG, kM>(p, g, m, i0 + 1, e1, x1, body);
  }
}

template <typename scalar_t, int V, bool kVec, bool kEps, bool kXi, bool kG, bool kM, typename Body>
__device__ __forceinline__ void sweep(scalar_t* __restrict__ p, const scalar_t* __restrict__ g,
                                      scalar_t* __restrict__ m, const Geometry& geo,
                                      const NoiseArgs& na, const Body& body) {
  if constexpr (kVec) {
    sweep_vec<scalar_t, V, kEps, kXi, kG, kM>(p, g, m, geo, na, body);
  } else {
    sweep_pairs<scalar_t, kEps, kXi, kG, kM>(p, g, m, geo, na, body);
  }
}

// theta <- theta + sigma * eps(tag)
template <typename scalar_t, int V, bool kVec>
__global__ void __launch_bounds__(kThreads)
perturb_kernel(scalar_t* __restrict__ p, Geometry geo, NoiseArgs na,
               at::opmath_type<scalar_t> sigma) {
  using acc_t = at::opmath_type<scalar_t>;
  sweep<scalar_t, V, kVec, true, false, false, false>(
      p, nullptr, nullptr, geo, na, [sigma](acc_t& th, acc_t, acc_t&, float e, float) {
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
          p, nullptr, nullptr, geo, na, [neg_sigma](acc_t& th, acc_t, acc_t&, float e, float) {
            th = th + neg_sigma * static_cast<acc_t>(e);
          });
    }
    return;
  }
  if (grad_scale != nullptr) {
    a.grad_mult = static_cast<acc_t>(grad_mult / static_cast<double>(*grad_scale));
  }
  sweep<scalar_t, V, kVec, kEps, kXi, true, kMom>(
      p, g, m, geo, na, [&a](acc_t& th, acc_t gg, acc_t& mm, float e, float x) {
        th = langevin_update<kMom>(th, gg, &mm, static_cast<acc_t>(e), static_cast<acc_t>(x), a);
      });
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

// Decides the vector path for buckets of scalar_t: all pointers share one 16-byte
// misalignment, the first aligned element has an even bucket index, and at least one
// whole vector fits. Fills geo.head / geo.nvec.
template <typename scalar_t>
bool plan_vec(Geometry& geo, const void* p, const void* g, const void* m) {
  constexpr int V = 16 / sizeof(scalar_t);
  const uintptr_t ap = reinterpret_cast<uintptr_t>(p) % 16;
  if (g != nullptr && reinterpret_cast<uintptr_t>(g) % 16 != ap) return false;
  if (m != nullptr && reinterpret_cast<uintptr_t>(m) % 16 != ap) return false;
  if (ap % sizeof(scalar_t) != 0) return false;
  const int64_t head = static_cast<int64_t>((16 - ap) % 16) / static_cast<int64_t>(sizeof(scalar_t));
  if (head > geo.n || ((geo.offset + head) & 1) != 0) return false;
  const int64_t nvec = (geo.n - head) / V;
  if (nvec == 0) return false;
  geo.head = head;
  geo.nvec = nvec;
  return true;
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
  auto k = perturb_kernel<scalar_t, 2, false>;
  const int64_t work = ((offset + geo.n + 1) >> 1) - (offset >> 1);
  k<<<grid_for(k, work, device), kThreads, 0, stream>>>(p, geo, na, s);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, bool kVec, bool kMom, bool kEps, bool kXi>
void launch_step_kernel(scalar_t* p, const scalar_t* g, scalar_t* m, const Geometry& geo,
                        const NoiseArgs& na, const StepArgs<at::opmath_type<scalar_t>>& a,
                        double grad_mult, const float* gs, const float* fi, int device,
                        cudaStream_t stream) {
  constexpr int V = kVec ? 16 / sizeof(scalar_t) : 2;
  auto k = restore_and_step_kernel<scalar_t, V, kVec, kMom, kEps, kXi>;
  const int64_t work = kVec ? geo.nvec + 2 * V
                            : ((geo.offset + geo.n + 1) >> 1) - (geo.offset >> 1);
  k<<<grid_for(k, work, device), kThreads, 0, stream>>>(p, g, m, geo, na, a, grad_mult, gs, fi);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, bool kVec, bool kMom>
void dispatch_noise(scalar_t* p, const scalar_t* g, scalar_t* m, const Geometry& geo,
                    const NoiseArgs& na, const StepArgs<at::opmath_type<scalar_t>>& a,
                    double grad_mult, const float* gs, const float* fi, int device,
                    cudaStream_t stream) {
  const bool eps = a.sigma != 0, xi = a.noise_std != 0;
  if (eps && xi)
    launch_step_kernel<scalar_t, kVec, kMom, true, true>(p, g, m, geo, na, a, grad_mult, gs, fi, device, stream);
  else if (eps)
    launch_step_kernel<scalar_t, kVec, kMom, true, false>(p, g, m, geo, na, a, grad_mult, gs, fi, device, stream);
  else if (xi)
    launch_step_kernel<scalar_t, kVec, kMom, false, true>(p, g, m, geo, na, a, grad_mult, gs, fi, device, stream);
  else
    launch_step_kernel<scalar_t, kVec, kMom, false, false>(p, g, m, geo, na, a, grad_mult, gs, fi, device, stream);
}

template <typename scalar_t, bool kVec>
void dispatch_mom(scalar_t* p, const scalar_t* g, scalar_t* m, const Geometry& geo,
                  const NoiseArgs& na, const StepArgs<at::opmath_type<scalar_t>>& a,
                  double grad_mult, const float* gs, const float* fi, int device,
                  cudaStream_t stream) {
  if (m != nullptr)
    dispatch_noise<scalar_t, kVec, true>(p, g, m, geo, na, a, grad_mult, gs, fi, device, stream);
  else
    dispatch_noise<scalar_t, kVec, false>(p, g, m, geo, na, a, grad_mult, gs, fi, device, stream);
}

void check_cuda_bucket(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "fused_flat: ", name, " must be a CUDA tensor, got ", t.device());
}

void perturb_cuda(at::Tensor& param, int64_t seed, int64_t bucket_id, int64_t step, int64_t tag,
                  double sigma, int64_t offset) {
  check_bucket(param, "param");
  check_cuda_bucket(param, "param");
  check_noise_args(seed, offset, tag);
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
                           double grad_mult) {
  check_bucket(param, "param");
  check_cuda_bucket(param, "param");
  check_like(param, grad, "grad");
  if (momentum_buffer.has_value()) check_like(param, *momentum_buffer, "momentum_buffer");
  check_scalar_tensor(grad_scale, param, "grad_scale");
  check_scalar_tensor(found_inf, param, "found_inf");
  check_noise_args(seed, offset, restore_tag);
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
    StepArgs<acc_t> a;
    a.sigma = static_cast<acc_t>(sigma);
    a.lr = static_cast<acc_t>(lr);
    a.weight_decay = static_cast<acc_t>(weight_decay);
    a.momentum = static_cast<acc_t>(momentum);
    a.dampening = static_cast<acc_t>(dampening);
    a.noise_std = static_cast<acc_t>(noise_std);
    a.grad_mult = static_cast<acc_t>(grad_mult);  // replaced in-kernel when grad_scale is given
    a.nesterov = nesterov;
    a.momentum_init = momentum_init;
    scalar_t* p = param.data_ptr<scalar_t>();
    const scalar_t* g = grad.data_ptr<scalar_t>();
    scalar_t* m = momentum_buffer.has_value() ? momentum_buffer->data_ptr<scalar_t>() : nullptr;
    Geometry geo{param.numel(), offset, 0, 0};
    if constexpr (!std::is_same_v<scalar_t, double>) {
      if (plan_vec<scalar_t>(geo, p, g, m)) {
        dispatch_mom<scalar_t, true>(p, g, m, geo, na, a, grad_mult, gs, fi, device, stream);
        return;
      }
    }
    dispatch_mom<scalar_t, false>(p, g, m, geo, na, a, grad_mult, gs, fi, device, stream);
  });
}

}  // namespace cuda_impl

TORCH_LIBRARY_IMPL(fused_flat, CUDA, m) {
  m.impl("perturb_", &cuda_impl::perturb_cuda);
  m.impl("restore_and_step_", &cuda_impl::restore_and_step_cuda);
}

}  // namespace fused_flat
