// fused_flat CUDA: the index logic of the one-bucket kernel perturb_from_kernel
// (kernels_cuda.cu): which thread handles which elements, 16-byte vector path vs
// Philox-call path (plan_vec, walk_bucket), and its per-element body (PerturbFrom). It is
// __host__ __device__ with no CUDA API, tid / stride coming from the caller, so that
// tests/test_cuda_emulation.py compiles it with the host compiler and runs every "thread"
// of several grid sizes sequentially against a per-element oracle.
//
// Also used by the list kernels: store_theta (multi_langevin.cuh's stochastic store).
#pragma once
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

// Calls (work items of the call path) that touch [offset, offset + n).
FFC_HD int64_t calls_touching(int64_t offset, int64_t n) {
  return ((offset + n + 3) >> 2) - (offset >> 2);
}

// The walk of one bucket slice by thread tid of stride threads (grid-stride, int64 indices;
// which thread takes which element never changes a result):
//   * kVec (plan_vec agreed; V elements = 16 bytes): the head [0, head)
//     and the tail [head + nvec * V, n) one element at a time, body.element(i, gi), then the
//     aligned vectors, body.vector(i0, j0): elements i0 .. i0 + V - 1, 16-byte aligned, which
//     are exactly the Philox calls j0 .. j0 + V / 4 - 1 (noise layout 3);
//   * else: the Philox calls j touching [offset, offset + n), body.call(j, i0, lo, hi): the
//     elements i0 + h, h in [lo, hi), of call j (i0 = 4 j - offset; lo > 0 only for the
//     first call, hi < 4 only for the last).
// Every element of [0, n) is given to exactly one body call (tests/cuda_emulation.cpp).
template <int V, bool kVec, typename Body>
FFC_HD void walk_bucket(const Geometry& geo, int64_t tid, int64_t stride, const Body& body) {
  if constexpr (kVec) {
    static_assert(V % 4 == 0, "a vector holds whole Philox calls");
    const int64_t body_end = geo.head + geo.nvec * V;
    const int64_t edges = geo.head + (geo.n - body_end);
    for (int64_t t = tid; t < edges; t += stride) {
      const int64_t i = t < geo.head ? t : body_end + (t - geo.head);
      body.element(i, geo.offset + i);
    }
    for (int64_t v = tid; v < geo.nvec; v += stride) {
      const int64_t i0 = geo.head + v * V;
      body.vector(i0, (geo.offset + i0) >> 2);  // offset + head is a multiple of 4
    }
  } else {
    const int64_t jbeg = geo.offset >> 2;
    const int64_t jend = (geo.offset + geo.n + 3) >> 2;
    for (int64_t j = jbeg + tid; j < jend; j += stride) {
      const int64_t i0 = 4 * j - geo.offset;
      const int lo = i0 < 0 ? static_cast<int>(-i0) : 0;
      const int hi = geo.n - i0 < 4 ? static_cast<int>(geo.n - i0) : 4;
      body.call(j, i0, lo, hi);
    }
  }
}

// perturb_from_'s body (perturb_from_kernel of kernels_cuda.cu walks it with walk_bucket):
// param (scalar_t) <- round-to-nearest(master (fp32) + sigma * z(tag, gi)), z = 0 unless
// kEps. A vector is V params (16 bytes) and V masters (V / 4 16-byte loads).
template <typename scalar_t, int V, bool kEps>
struct PerturbFrom {
  scalar_t* p;
  const float* ms;
  NoiseArgs na;
  float sigma;

  FFC_HD scalar_t value(float m, float e) const { return static_cast<scalar_t>(m + sigma * e); }

  // z(tag, 4j + 0..3), or zeros
  FFC_HD void normals(int64_t j, float (&e)[4]) const {
    e[0] = e[1] = e[2] = e[3] = 0.0f;
    if constexpr (kEps) call_normals(noise_words(na.key, j, na.step, na.tag), e[0], e[1], e[2], e[3]);
  }

  FFC_HD void element(int64_t i, int64_t gi) const {
    const float e = kEps ? element_normal(na.key, na.step, na.tag, gi) : 0.0f;
    p[i] = value(ms[i], e);
  }

  FFC_HD void vector(int64_t i0, int64_t j0) const {
    static_assert(sizeof(Vec<scalar_t, V>) == 16 && V % 4 == 0, "16-byte vectors of whole calls");
    Vec<scalar_t, V> pv;
#pragma unroll
    for (int k = 0; k < V / 4; ++k) {
      const Vec<float, 4> mv = *reinterpret_cast<const Vec<float, 4>*>(ms + i0 + 4 * k);
      float e[4];
      normals(j0 + k, e);
#pragma unroll
      for (int h = 0; h < 4; ++h) pv.v[4 * k + h] = value(mv.v[h], e[h]);
    }
    *reinterpret_cast<Vec<scalar_t, V>*>(p + i0) = pv;
  }

  FFC_HD void call(int64_t j, int64_t i0, int lo, int hi) const {
    float e[4];
    normals(j, e);
#pragma unroll
    for (int h = 0; h < 4; ++h) {
      if (h >= lo && h < hi) p[i0 + h] = value(ms[i0 + h], e[h]);
    }
  }
};

// Decides the vector path of perturb_from_ for a param of scalar_t and its fp32 master:
// both are 16-byte aligned at one element, head, whose bucket index offset + head starts a
// Philox call (a multiple of 4), and at least one whole vector of V = 16 / sizeof(scalar_t)
// params fits. Fills geo.head / geo.nvec. Host code (the launcher; tests/cuda_emulation.cpp).
template <typename scalar_t>
inline bool plan_vec(Geometry& geo, const scalar_t* p, const float* ms) {
  constexpr int V = 16 / sizeof(scalar_t);
  const uintptr_t ap = reinterpret_cast<uintptr_t>(p) % 16;
  if (ap % sizeof(scalar_t) != 0) return false;
  const int64_t head = static_cast<int64_t>((16 - ap) % 16) / static_cast<int64_t>(sizeof(scalar_t));
  if (head > geo.n || ((geo.offset + head) & 3) != 0) return false;
  if (reinterpret_cast<uintptr_t>(ms + head) % 16 != 0) return false;
  const int64_t nvec = (geo.n - head) / V;
  if (nvec == 0) return false;
  geo.head = head;
  geo.nvec = nvec;
  return true;
}

}  // namespace cuda_impl
}  // namespace fused_flat
