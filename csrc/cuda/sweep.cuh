// fused_flat CUDA: the index logic of one-bucket kernels (which thread handles which
// elements, 16-byte vector path vs Philox-call path), separated from the launch so that it
// is __host__ __device__: tests/test_cuda_emulation.py compiles it with the host compiler
// and runs every "thread" of several grid sizes sequentially against a per-element
// oracle. No CUDA API is used here; tid / stride come from the caller.
//
// Users: perturb_from_kernel (kernels_cuda.cu: NoiseArgs, Geometry, Vec, plan_vec,
// calls_touching) and the list kernels' stochastic store (multi_langevin.cuh: store_theta).
// do_element / sweep_vec / sweep_calls / sweep were the per-tensor perturb_ and
// restore_and_step_ kernels' loops; those kernels are gone (the 'cuda' backend runs the list
// ops), so only tests/cuda_emulation.cpp reaches them now.
#pragma once
#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <stdint.h>

#include <type_traits>

#include "fused_flat/elementwise.h"

#if defined(__CUDACC__)
#define FFC_HD __host__ __device__ __forceinline__
#else
#define FFC_HD inline
#endif

namespace fused_flat {
namespace cuda_impl {

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

// The stored value of theta: stochastically rounded with rbits (elementwise.h) for a 16-bit
// scalar_t when kSR, else the round-to-nearest conversion.
template <typename scalar_t, bool kSR, typename acc_t>
FFC_HD scalar_t store_theta(acc_t th, uint32_t rbits) {
  if constexpr (kSR && std::is_same_v<scalar_t, c10::BFloat16>) {
    return c10::BFloat16(sr_bf16_bits(static_cast<float>(th), rbits), c10::BFloat16::from_bits());
  } else if constexpr (kSR && std::is_same_v<scalar_t, c10::Half>) {
    return c10::Half(sr_fp16_bits(static_cast<float>(th), rbits), c10::Half::from_bits());
  } else {
    (void)rbits;
    return static_cast<scalar_t>(th);
  }
}

template <typename scalar_t, int V>
struct alignas(16) Vec {
  scalar_t v[V];
};

// Per-element body: body(theta, g, m, eps, xi) updates theta (and m) in acc_t.
// kG / kM: whether g and m are read (and m written).
// kSR: theta is stored stochastically rounded with rbits.
template <typename scalar_t, bool kG, bool kM, typename Body, bool kSR = false>
FFC_HD void do_element(scalar_t* __restrict__ p, const scalar_t* __restrict__ g,
                                           scalar_t* __restrict__ m, int64_t i, float e, float x,
                                           const Body& body, uint32_t rbits = 0) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t th = static_cast<acc_t>(p[i]);
  const acc_t gg = kG ? static_cast<acc_t>(g[i]) : acc_t(0);
  acc_t mm = kM ? static_cast<acc_t>(m[i]) : acc_t(0);
  body(th, gg, mm, e, x);
  p[i] = store_theta<scalar_t, kSR>(th, rbits);
  if constexpr (kM) m[i] = static_cast<scalar_t>(mm);
}

// Vector path over one slice; see the file comment. Noise layout 3: a 16-byte vector
// holds whole Philox calls (fp32: 1 call = 4 elements; 16-bit: 2 calls).
template <typename scalar_t, int V, bool kEps, bool kXi, bool kG, bool kM, bool kSR, typename Body>
FFC_HD void sweep_vec(scalar_t* __restrict__ p, const scalar_t* __restrict__ g,
                                          scalar_t* __restrict__ m, const Geometry& geo,
                                          const NoiseArgs& na, int64_t tid, int64_t stride,
    const Body& body) {
  using acc_t = at::opmath_type<scalar_t>;
  using VecT = Vec<scalar_t, V>;
  static_assert(V % 4 == 0 && sizeof(VecT) == 16, "16-byte vectors of whole Philox calls");
  const int64_t body_end = geo.head + geo.nvec * V;
  const int64_t edges = geo.head + (geo.n - body_end);
  for (int64_t t = tid; t < edges; t += stride) {
    const int64_t i = t < geo.head ? t : body_end + (t - geo.head);
    float e, x;
    uint32_t rb = 0;
    if constexpr (kSR) element_noise_sr<kEps, kXi>(na.key, na.step, na.tag, geo.offset + i, e, x, rb);
    else element_noise<kEps, kXi>(na.key, na.step, na.tag, geo.offset + i, e, x);
    do_element<scalar_t, kG, kM, Body, kSR>(p, g, m, i, e, x, body, rb);
  }
  for (int64_t v = tid; v < geo.nvec; v += stride) {
    const int64_t i0 = geo.head + v * V;
    VecT pv = *reinterpret_cast<const VecT*>(p + i0);
    VecT gv, mv;
    if constexpr (kG) gv = *reinterpret_cast<const VecT*>(g + i0);
    if constexpr (kM) mv = *reinterpret_cast<const VecT*>(m + i0);
    const int64_t j0 = (geo.offset + i0) >> 2;  // a multiple of 4 by construction
#pragma unroll
    for (int k = 0; k < V / 4; ++k) {
      float e[4], x[4];
      uint32_t rb[4] = {0u, 0u, 0u, 0u};
      if constexpr (kSR) call_noise_sr<kEps, kXi>(na.key, na.step, na.tag, j0 + k, e, x, rb);
      else call_noise<kEps, kXi>(na.key, na.step, na.tag, j0 + k, e, x);
#pragma unroll
      for (int h = 0; h < 4; ++h) {
        const int q = 4 * k + h;
        acc_t th = static_cast<acc_t>(pv.v[q]);
        const acc_t gg = kG ? static_cast<acc_t>(gv.v[q]) : acc_t(0);
        acc_t mm = kM ? static_cast<acc_t>(mv.v[q]) : acc_t(0);
        body(th, gg, mm, e[h], x[h]);
        pv.v[q] = store_theta<scalar_t, kSR>(th, rb[h]);
        if constexpr (kM) mv.v[q] = static_cast<scalar_t>(mm);
      }
    }
    *reinterpret_cast<VecT*>(p + i0) = pv;
    if constexpr (kM) *reinterpret_cast<VecT*>(m + i0) = mv;
  }
}

// Call path: grid-stride over the Philox calls that touch [offset, offset + n), each
// serving its (up to) 4 elements.
template <typename scalar_t, bool kEps, bool kXi, bool kG, bool kM, bool kSR, typename Body>
FFC_HD void sweep_calls(scalar_t* __restrict__ p, const scalar_t* __restrict__ g,
                                            scalar_t* __restrict__ m, const Geometry& geo,
                                            const NoiseArgs& na, int64_t tid, int64_t stride,
    const Body& body) {
  const int64_t jbeg = geo.offset >> 2;
  const int64_t jend = (geo.offset + geo.n + 3) >> 2;
  for (int64_t j = jbeg + tid; j < jend; j += stride) {
    float e[4], x[4];
    uint32_t rb[4] = {0u, 0u, 0u, 0u};
    if constexpr (kSR) call_noise_sr<kEps, kXi>(na.key, na.step, na.tag, j, e, x, rb);
    else call_noise<kEps, kXi>(na.key, na.step, na.tag, j, e, x);
    const int64_t i0 = 4 * j - geo.offset;
#pragma unroll
    for (int h = 0; h < 4; ++h) {
      const int64_t i = i0 + h;
      if (i >= 0 && i < geo.n) do_element<scalar_t, kG, kM, Body, kSR>(p, g, m, i, e[h], x[h], body, rb[h]);
    }
  }
}

// Calls (work items of the call path) that touch [offset, offset + n).
FFC_HD int64_t calls_touching(int64_t offset, int64_t n) {
  return ((offset + n + 3) >> 2) - (offset >> 2);
}

// kSR (16-bit scalar_t): theta stored stochastically rounded, rbits from the words of
// tags 0 and 32 (elementwise.h call_noise_sr / element_noise_sr: no extra Philox call when
// the pass makes both, i.e. eps of tag 0 and xi).
template <typename scalar_t, int V, bool kVec, bool kEps, bool kXi, bool kG, bool kM,
          bool kSR = false, typename Body>
FFC_HD void sweep(scalar_t* __restrict__ p, const scalar_t* __restrict__ g,
                                      scalar_t* __restrict__ m, const Geometry& geo,
                                      const NoiseArgs& na, int64_t tid, int64_t stride,
    const Body& body) {
  if constexpr (kVec) {
    sweep_vec<scalar_t, V, kEps, kXi, kG, kM, kSR>(p, g, m, geo, na, tid, stride, body);
  } else {
    sweep_calls<scalar_t, kEps, kXi, kG, kM, kSR>(p, g, m, geo, na, tid, stride, body);
  }
}

// Decides the vector path for buckets of scalar_t: all pointers share one 16-byte
// misalignment, the first aligned element starts a Philox call (bucket index a multiple
// of 4), and at least one
// whole vector fits. Fills geo.head / geo.nvec.
template <typename scalar_t>
inline bool plan_vec(Geometry& geo, const void* p, const void* g, const void* m) {
  constexpr int V = 16 / sizeof(scalar_t);
  const uintptr_t ap = reinterpret_cast<uintptr_t>(p) % 16;
  if (g != nullptr && reinterpret_cast<uintptr_t>(g) % 16 != ap) return false;
  if (m != nullptr && reinterpret_cast<uintptr_t>(m) % 16 != ap) return false;
  if (ap % sizeof(scalar_t) != 0) return false;
  const int64_t head = static_cast<int64_t>((16 - ap) % 16) / static_cast<int64_t>(sizeof(scalar_t));
  if (head > geo.n || ((geo.offset + head) & 3) != 0) return false;
  const int64_t nvec = (geo.n - head) / V;
  if (nvec == 0) return false;
  geo.head = head;
  geo.nvec = nvec;
  return true;
}

}  // namespace cuda_impl
}  // namespace fused_flat
