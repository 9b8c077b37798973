// fused_flat CUDA: the index logic and per-element bodies of the multi-tensor SAM kernels
// (csrc/cuda/sam_cuda.cu), __host__ __device__ so that tests/sam_multi_emulation.cpp runs
// them on the host, thread by thread, against a per-element oracle. No CUDA API here.
//
// Launches (list_launch.h, arguments by value): block b takes its row (row_of: tensor
// slot t, its bucket offset) and the K data pointers of slot t, then visits
// elements [start, min(start + chunk, numel_t)) of tensor t: in 16-byte vectors (LDG.E.128 /
// STG.E.128) when all K pointers are 16-byte aligned (start is a multiple of the chunk, a
// multiple of every V), then the < V tail element by element; element by element when a
// pointer is misaligned (a view into another storage). The choice is per block and
// uniform inside it.
#pragma once
#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <stdint.h>
#include <string.h>

#include "fused_flat/sam_elementwise.h"
#include "list_launch.h"

#if defined(__CUDACC__)
#define FFM_HD __host__ __device__ __forceinline__
#else
#define FFM_HD inline
#endif

namespace fused_flat {
namespace cuda_impl {
namespace multi {

// A block's row: tensor slot t, elements [start, end) of it, its bucket offset
// (launch::row_of with frame = false).
using Row = launch::LaunchRow;

// The data pointers of slot t in the first K of a launch's N lists.
template <typename scalar_t, int K, int N>
FFM_HD void slot_ptrs(scalar_t* (&p)[K], const launch::ListArgs<N>& a, int t) {
  static_assert(K <= N, "streams of the launch's lists");
#pragma unroll
  for (int k = 0; k < K; ++k) p[k] = static_cast<scalar_t*>(a.ptr[k][t]);
}

template <typename scalar_t, int V>
struct alignas(16) MVec {
  scalar_t v[V];
};

// 16-byte global loads / stores. The pointers come from the kernel's argument block (untyped
// void*), so the compiler cannot prove they are global and would emit generic
// LD.E.128 / ST.E.128; explicit ld.global.v4 / st.global.v4 give LDG.E.128 / STG.E.128.
template <typename VecT>
FFM_HD VecT load16(const VecT* p) {
  static_assert(sizeof(VecT) == 16, "16-byte vectors");
#if defined(__CUDA_ARCH__)
  uint4 u;
  asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(u.x), "=r"(u.y), "=r"(u.z), "=r"(u.w)
               : "l"(p));
  VecT v;
  memcpy(&v, &u, 16);
  return v;
#else
  return *p;
#endif
}

template <typename VecT>
FFM_HD void store16(VecT* p, const VecT& v) {
#if defined(__CUDA_ARCH__)
  uint4 u;
  memcpy(&u, &v, 16);
  asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};"
               :
               : "l"(p), "r"(u.x), "r"(u.y), "r"(u.z), "r"(u.w)
               : "memory");
#else
  *p = v;
#endif
}

// ------------------------------------------------------------------ device-resident scalars
// A per-step scalar that the kernel reads from device memory instead of its arguments (CUDA
// graph capture: the value changes between replays, the captured arguments do not). Read
// once per thread at kernel start; p == nullptr: absent, the host value is used (the scalar
// path). Floats come from a one-element float64 (f64) or float32 tensor and are read as a
// double, so the value the kernel computes with is the host path's static_cast of the same
// number (a Python float of a float32 tensor is that float, widened): bit-identical results.
struct DevScalar {
  const void* p;
  bool f64;
};

FFM_HD double dev_value(const DevScalar& s, double host) {
  if (s.p == nullptr) return host;
  return s.f64 ? *static_cast<const double*>(s.p)
               : static_cast<double>(*static_cast<const float*>(s.p));
}

// The step counter: an int64 on the device (only its low 32 bits enter the Philox counter,
// as on the host path), or the host value.
FFM_HD int64_t dev_step(const int64_t* p, int64_t host) { return p == nullptr ? host : *p; }

// Visits elements [start, end) of K streams p[0..K). kRead / kWrite: bit k set when stream
// k is read / written. body(x, i): x[K] the elements in acc_t (0 for unread streams), i the
// element index in the tensor; the body updates x in place.
template <typename scalar_t, int K, unsigned kRead, unsigned kWrite, typename Body>
FFM_HD void visit_chunk(scalar_t* const (&p)[K], int64_t start, int64_t end, int64_t tid,
                        int64_t nthreads, Body& body) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = 16 / static_cast<int>(sizeof(scalar_t));
  uintptr_t mis = 0;
#pragma unroll
  for (int k = 0; k < K; ++k) mis |= reinterpret_cast<uintptr_t>(p[k] + start);
  const int64_t vend = (mis & 15u) == 0 ? start + (end - start) / V * V : start;
  for (int64_t i = start + tid * V; i < vend; i += nthreads * V) {
    MVec<scalar_t, V> v[K];
#pragma unroll
    for (int k = 0; k < K; ++k)
      if ((kRead >> k) & 1u) v[k] = load16(reinterpret_cast<const MVec<scalar_t, V>*>(p[k] + i));
#pragma unroll
    for (int q = 0; q < V; ++q) {
      acc_t x[K];
#pragma unroll
      for (int k = 0; k < K; ++k)
        x[k] = ((kRead >> k) & 1u) ? static_cast<acc_t>(v[k].v[q]) : acc_t(0);
      body(x, i + q);
#pragma unroll
      for (int k = 0; k < K; ++k)
        if ((kWrite >> k) & 1u) v[k].v[q] = static_cast<scalar_t>(x[k]);
    }
#pragma unroll
    for (int k = 0; k < K; ++k)
      if ((kWrite >> k) & 1u) store16(reinterpret_cast<MVec<scalar_t, V>*>(p[k] + i), v[k]);
  }
  for (int64_t i = vend + tid; i < end; i += nthreads) {
    acc_t x[K];
#pragma unroll
    for (int k = 0; k < K; ++k) x[k] = ((kRead >> k) & 1u) ? static_cast<acc_t>(p[k][i]) : acc_t(0);
    body(x, i);
#pragma unroll
    for (int k = 0; k < K; ++k)
      if ((kWrite >> k) & 1u) p[k][i] = static_cast<scalar_t>(x[k]);
  }
}

// visit_chunk over a block's row of the first K lists of launch L (their slot r.t).
template <typename scalar_t, int K, unsigned kRead, unsigned kWrite, int N, typename Body>
FFM_HD void visit_row(const launch::ListArgs<N>& L, const Row& r, int64_t tid, int64_t nthreads,
                      Body& body) {
  scalar_t* p[K];
  slot_ptrs(p, L, r.t);
  visit_chunk<scalar_t, K, kRead, kWrite>(p, r.start, r.end, tid, nthreads, body);
}

// ------------------------------------------------------------------ bodies
// Streams: (g[, theta]); read only.
template <bool kAdaptive, typename acc_t>
struct SqNormBody {
  acc_t eta;
  double sum;
  FFM_HD void operator()(acc_t* x, int64_t) {
    sum += sam_sq_term<kAdaptive, acc_t>(kAdaptive ? x[1] : acc_t(0), x[0], eta);
  }
};

// Streams: (theta, g, backup); read 0b011, write 0b101.
template <bool kAdaptive, typename acc_t>
struct PerturbBody {
  acc_t coef, eta;
  FFM_HD void operator()(acc_t* x, int64_t) {
    x[2] = x[0];
    x[0] = sam_perturbed<kAdaptive, acc_t>(x[0], x[1], coef, eta);
  }
};

// Streams: (theta, backup, g[, m]); read 0b1110 / 0b0110, write 0b1001 / 0b0001.
template <bool kMom, typename acc_t>
struct StepBody {
  SamStepArgs<acc_t> a;
  FFM_HD void operator()(acc_t* x, int64_t) {
    acc_t m = kMom ? x[3] : acc_t(0);
    x[0] = sam_sgd_update<kMom, acc_t>(x[1], x[2], &m, a);
    if (kMom) x[3] = m;
  }
};

// StepBody with stochastic rounding of theta (16-bit scalar_t): rbits from the tag-0 and
// tag-32 words of the element's Philox call (bucket index offset + i), cached per call (the
// elements of a thread come in call order). x[0] receives the SR result as a float: it is
// exactly representable in scalar_t, so visit_chunk's round-to-nearest store is exact.
template <bool kMom, bool kBf16>
struct StepSrBody {
  SamStepArgs<float> a;
  PhiloxKey key;
  int64_t step;
  int64_t offset;  // bucket index of the tensor's element 0
  int64_t cj = -1;
  uint32_t r0 = 0, r1 = 0, r2 = 0, r3 = 0;
  FFM_HD void operator()(float* x, int64_t i) {
    float m = kMom ? x[3] : 0.0f;
    const float th = sam_sgd_update<kMom, float>(x[1], x[2], &m, a);
    if (kMom) x[3] = m;
    const int64_t gi = offset + i;
    const int64_t j = gi >> 2;
    if (j != cj) {
      cj = j;
      const Words4 w0 = noise_words(key, j, step, kTagEps);
      const Words4 w32 = noise_words(key, j, step, kTagXi);
      r0 = sr_bits_of(w0.x0, w32.x0);
      r1 = sr_bits_of(w0.x1, w32.x1);
      r2 = sr_bits_of(w0.x2, w32.x2);
      r3 = sr_bits_of(w0.x3, w32.x3);
    }
    const int q = static_cast<int>(gi & 3);
    const uint32_t rb = q == 0 ? r0 : q == 1 ? r1 : q == 2 ? r2 : r3;
    if constexpr (kBf16) {
      x[0] = static_cast<float>(c10::BFloat16(sr_bf16_bits(th, rb), c10::BFloat16::from_bits()));
    } else {
      x[0] = static_cast<float>(c10::Half(sr_fp16_bits(th, rb), c10::Half::from_bits()));
    }
  }
};

// Streams: (theta, backup); read 0b10, write 0b01: the skipped step's exact restore.
template <typename acc_t>
struct RestoreBody {
  FFM_HD void operator()(acc_t* x, int64_t) { x[0] = x[1]; }
};

// Streams: (theta, backup); read 0b01, write 0b11.
template <typename acc_t>
struct ProbeBody {
  PhiloxKey key;
  int64_t step;
  int64_t offset;  // bucket index of the tensor's element 0
  acc_t delta;
  FFM_HD void operator()(acc_t* x, int64_t i) {
    x[1] = x[0];
    x[0] = x[0] + delta * static_cast<acc_t>(rademacher_sign(key, step, offset + i));
  }
};

}  // namespace multi
}  // namespace cuda_impl
}  // namespace fused_flat
