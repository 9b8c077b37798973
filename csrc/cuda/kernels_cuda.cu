// CUDA implementation of the fused_flat op perturb_from_ (master_weights=True: 16-bit params
// from their fp32 masters plus the perturbation); the passes over tensor lists are
// multi_langevin.cu's and sam_cuda.cu's.
//
// Same semantics as csrc/cpu/kernels_cpu.cpp, and the same per-element arithmetic:
// the noise (fused_flat::call_normals / element_normal, layout 3) comes from
// fused_flat/elementwise.h. The kernel's walk and body are sweep.cuh's (__host__ __device__,
// emulated thread by thread on the host by tests/test_cuda_emulation.py). Compiled with -fmad=false (setup.py) so the fp32 results equal
// the CPU kernels' bit for bit.
//
// Launch design
//   * Every element's noise is a pure function of its bucket index gi = offset + i
//     (ALGORITHMS.md §1); grid and block sizes only decide who computes it.
//   * Vector path (fp32/bf16/fp16): when the param is 16-byte aligned at an element whose
//     bucket index starts a Philox call (and the master shares its misalignment), the
//     aligned body is processed in 16-byte vectors of params (fp32: 4 elements = 1 Philox
//     call; 16-bit: 8 elements = 2 calls), grid-stride with int64 indices. The head and
//     tail are done one element at a time (element_normal).
//   * Call path (other offsets, mismatched alignment): grid-stride over Philox calls.
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
#include "../list_args.h"
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

// param (scalar_t) <- round-to-nearest(master (fp32) + sigma * z(tag)): sweep.cuh's walk of
// the bucket (walk_bucket) with the PerturbFrom body. Vector path (kVec): V params (16 bytes)
// per vector, the master read as V floats (32 bytes for 16-bit params).
template <typename scalar_t, int V, bool kVec, bool kEps>
__global__ void __launch_bounds__(kThreads)
perturb_from_kernel(scalar_t* __restrict__ p, const float* __restrict__ ms, Geometry geo,
                    NoiseArgs na, float sigma) {
  walk_bucket<V, kVec>(geo, thread_index(), thread_stride(), PerturbFrom<scalar_t, V, kEps>{p, ms, na, sigma});
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

void check_cuda_bucket(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "fused_flat: ", name, " must be a CUDA tensor, got ", t.device());
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
  check_perturb_from_args(param, master, seed, bucket_id, tag, offset);
  check_cuda_bucket(param, "param");
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
      // vector path when param and master start their 16-byte vectors at the same element
      // (true for allocations of their own) and that element starts a Philox call
      if (plan_vec<scalar_t>(geo, p, ms)) {
        launch_perturb_from<scalar_t, true>(p, ms, geo, na, static_cast<float>(sigma), device, stream);
      } else {
        launch_perturb_from<scalar_t, false>(p, ms, geo, na, static_cast<float>(sigma), device, stream);
      }
    }
  });
}

}  // namespace cuda_impl

TORCH_LIBRARY_IMPL(fused_flat, CUDA, m) {
  m.impl("perturb_from_", &cuda_impl::perturb_from_cuda);
}

}  // namespace fused_flat
