// fused_flat CUDA: the index logic and per-element bodies of the multi-tensor Langevin
// kernels (csrc/cuda/multi_langevin.cu), __host__ __device__ so that
// tests/multi_langevin_emulation.cpp runs them on the host, thread by thread, against a
// per-element oracle. No CUDA API here. The arithmetic is fused_flat/elementwise.h's
// (call_noise, langevin_update), as in the CPU kernels.
//
// Call frame (noise layout 3, ALGORITHMS.md §1). Tensor t with bucket offset off_t and
// numel n_t is visited in frame positions f = e + mis_t, mis_t = off_t & 3: position f has
// bucket index 4 * (off_t >> 2) + f, so 4 consecutive positions starting at a multiple of 4
// are exactly one Philox call. The launches (list_launch.h, by-value arguments, frame = true)
// chunk the frame extents n_t + mis_t: block b covers frame positions [s, min(s + chunk,
// n_t + mis_t)) of one tensor, s a multiple of the chunk, a multiple of 16, so no Philox call
// straddles two blocks. Positions f < mis_t (before element 0) are never touched.
//
// Block b takes its row (frame_row of list_launch.h's row_of), then:
//   * unit path, when the frame-0 address of every stream (data - mis elements) is
//     16-byte aligned: units of U = max(V, 4) positions (V = 16 / sizeof(T): fp32 4,
//     16-bit 8, fp64 4 = two 16-byte vectors), each U / 4 whole Philox calls per tag, loaded
//     and stored with 16-byte accesses (LDG.E.128 / STG.E.128). The tensor's first unit is
//     skipped when mis > 0 (it holds positions before element 0), and the < U tail;
//   * call path for everything else (those edges, or every call of the row when a stream is
//     misaligned): one thread per Philox call, its (up to) 4 elements one by one.
// The choice is per block and uniform inside it. Results never depend on it, nor on the
// number of threads.
//
// Stochastic rounding (kSR, 16-bit scalar_t): stream 0 (theta) is stored as
// store_theta<scalar_t, true> (sweep.cuh: sr_bf16_bits / sr_fp16_bits of elementwise.h) with
// the element's rbits from call_noise_sr (the words of its tag-0 and tag-32 calls, reused
// from the eps / xi calls where the pass makes them), exactly as the CPU kernels; every
// other stream round-to-nearest.
//
// Device-resident scalars (StepScalars): the step counter, lr and noise_std may be read from
// device memory at kernel start (load_step_scalars) instead of the kernel arguments.
#pragma once
#include <ATen/OpMathType.h>
#include <stdint.h>
#include <string.h>

#include "fused_flat/elementwise.h"
#include "list_launch.h"   // LaunchRow: a block's tensor and units
#include "sam_multi.cuh"   // MVec, load16, store16, DevScalar (the SAM multi kernels')
#include "sweep.cuh"       // store_theta: the (stochastic) store of theta

namespace fused_flat {
namespace cuda_impl {
namespace mlang {

using multi::load16;
using multi::MVec;
using multi::store16;
using multi::DevScalar;
using multi::dev_step;
using multi::dev_value;

struct FrameRow {
  int32_t t;     // tensor (slot) index
  int64_t fs;    // first frame position of the row (a multiple of the chunk)
  int64_t fe;    // one past its last frame position
  int64_t n;     // numel of tensor t
  int64_t mis;   // offset & 3: frame position of element 0
  int64_t jb;    // offset >> 2: Philox call of frame positions 0..3
};

// The frame row of a block (launch::row_of with frame = true: units are frame positions).
FFM_HD FrameRow frame_row(const launch::LaunchRow& lr) {
  FrameRow r;
  r.t = lr.t;
  r.fs = lr.start;
  r.fe = lr.end;
  r.n = lr.numel;
  r.mis = lr.offset & 3;
  r.jb = lr.offset >> 2;
  return r;
}

struct Noise {
  PhiloxKey key;
  int64_t step;
  uint32_t tag;  // eps tag (perturb: the perturbation's; step: restore_tag)
};

// The per-step values a restore + step kernel may read from device memory (nullptr: the
// host values in Noise / StepArgs stand). A tensor noise_std is launched with kXi = true.
struct StepScalars {
  const int64_t* step;
  DevScalar lr;
  DevScalar noise_std;
};

// Kernel start: the device values over the host ones, converted as the host path converts
// its doubles (static_cast<acc_t>).
template <typename acc_t>
FFM_HD void load_step_scalars(const StepScalars& s, Noise& na, StepArgs<acc_t>& a) {
  na.step = dev_step(s.step, na.step);
  if (s.lr.p != nullptr) a.lr = static_cast<acc_t>(dev_value(s.lr, 0.0));
  if (s.noise_std.p != nullptr) a.noise_std = static_cast<acc_t>(dev_value(s.noise_std, 0.0));
}

// The stored value of stream k: theta (k == 0) stochastically rounded with rbits when kSR,
// everything else round-to-nearest.
template <typename scalar_t, bool kSR, typename acc_t>
FFM_HD scalar_t store_stream(acc_t x, int k, uint32_t rbits) {
  if constexpr (kSR) {
    if (k == 0) return store_theta<scalar_t, true>(x, rbits);
  }
  (void)k;
  (void)rbits;
  return static_cast<scalar_t>(x);
}

// Visits the elements of one row. p[k]: tensor t's data pointer of stream k (element 0).
// kRead / kWrite: bit k set when stream k is read / written. body(x, e, xi): x[K] the
// elements in acc_t (0 for unread streams), e / xi the element's eps (tag na.tag, if kEps)
// and xi (tag 32, if kXi) noise, 0 otherwise; the body updates x in place. kSR: stream 0
// is stored stochastically rounded (file comment).
// Inside the row everything is relative to its first frame position fs (32-bit: a row is
// at most one chunk): row position q is element fs + q - mis, whose pointer is pb[k] + q
// (pb = p + fs - mis, which for the first row of a tensor with mis > 0 lies before element
// 0; positions q < lo are never accessed), and lies in Philox call jrow + q / 4.
template <typename scalar_t, int K, unsigned kRead, unsigned kWrite, bool kEps, bool kXi,
          bool kSR = false, typename Body>
FFM_HD void visit_frame(scalar_t* const (&p)[K], const FrameRow& r, const Noise& na, int64_t tid,
                        int64_t nthreads, Body& body) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = 16 / static_cast<int>(sizeof(scalar_t));
  constexpr int U = V >= 4 ? V : 4;   // positions per unit: whole calls, whole vectors
  constexpr int NV = U / V;           // 16-byte vectors per unit and stream
  static_assert(U % 4 == 0 && U % V == 0, "units of whole Philox calls and whole vectors");
  static_assert(!kSR || sizeof(scalar_t) == 2, "stochastic rounding: 16-bit parameters only");

  const int32_t len = static_cast<int32_t>(r.fe - r.fs);
  const int32_t lo = (r.fs == 0) ? static_cast<int32_t>(r.mis) : 0;   // first valid position
  const int64_t jrow = r.jb + (r.fs >> 2);
  scalar_t* pb[K];
  uintptr_t mis_addr = 0;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    pb[k] = reinterpret_cast<scalar_t*>(reinterpret_cast<uintptr_t>(p[k]) +
                                        static_cast<uintptr_t>((r.fs - r.mis) * static_cast<int64_t>(sizeof(scalar_t))));
    mis_addr |= reinterpret_cast<uintptr_t>(pb[k]);
  }
  int32_t us = lo > 0 ? U : 0;        // the tensor's first unit holds positions before element 0
  const bool units = (mis_addr & 15u) == 0 && us < len;
  if (!units) us = 0;
  const int32_t ue = units ? us + (len - us) / U * U : 0;
  const int32_t t0 = static_cast<int32_t>(tid), nt = static_cast<int32_t>(nthreads);

  // unit path: [us, ue). The unit's noise first, then its loads: fewer values live while
  // Philox runs (<= 64 registers, no spills; tests/test_cuda_multi_static.py).
  for (int32_t q0 = us + t0 * U; q0 < ue; q0 += nt * U) {
    float ez[U], xz[U];
    uint32_t rb[U];
#pragma unroll
    for (int c = 0; c < U / 4; ++c) {
      if constexpr (kSR) {
        call_noise_sr<kEps, kXi>(na.key, na.step, na.tag, jrow + (q0 >> 2) + c, ez + 4 * c,
                                 xz + 4 * c, rb + 4 * c);
      } else {
        call_noise<kEps, kXi>(na.key, na.step, na.tag, jrow + (q0 >> 2) + c, ez + 4 * c, xz + 4 * c);
#pragma unroll
        for (int h = 0; h < 4; ++h) rb[4 * c + h] = 0u;
      }
    }
    MVec<scalar_t, V> v[K][NV];
#pragma unroll
    for (int k = 0; k < K; ++k)
#pragma unroll
      for (int h = 0; h < NV; ++h)
        if ((kRead >> k) & 1u)
          v[k][h] = load16(reinterpret_cast<const MVec<scalar_t, V>*>(pb[k] + q0) + h);
#pragma unroll
    for (int q = 0; q < U; ++q) {
      acc_t x[K];
#pragma unroll
      for (int k = 0; k < K; ++k)
        x[k] = ((kRead >> k) & 1u) ? static_cast<acc_t>(v[k][q / V].v[q % V]) : acc_t(0);
      body(x, ez[q], xz[q]);
#pragma unroll
      for (int k = 0; k < K; ++k)
        if ((kWrite >> k) & 1u) v[k][q / V].v[q % V] = store_stream<scalar_t, kSR>(x[k], k, rb[q]);
    }
#pragma unroll
    for (int k = 0; k < K; ++k)
#pragma unroll
      for (int h = 0; h < NV; ++h)
        if ((kWrite >> k) & 1u)
          store16(reinterpret_cast<MVec<scalar_t, V>*>(pb[k] + q0) + h, v[k][h]);
  }

  // call path: the calls of [0, us) and [ue, len)
  const int32_t head_calls = us >> 2;
  const int32_t n_calls = head_calls + (((len + 3) >> 2) - (ue >> 2));
  for (int32_t w = t0; w < n_calls; w += nt) {
    const int32_t qc = w < head_calls ? 4 * w : ue + 4 * (w - head_calls);
    float ez[4], xz[4];
    uint32_t rb[4] = {0u, 0u, 0u, 0u};
    if constexpr (kSR) call_noise_sr<kEps, kXi>(na.key, na.step, na.tag, jrow + (qc >> 2), ez, xz, rb);
    else call_noise<kEps, kXi>(na.key, na.step, na.tag, jrow + (qc >> 2), ez, xz);
#pragma unroll
    for (int q4 = 0; q4 < 4; ++q4) {
      const int32_t q = qc + q4;
      if (q < lo || q >= len) continue;
      acc_t x[K];
#pragma unroll
      for (int k = 0; k < K; ++k) x[k] = ((kRead >> k) & 1u) ? static_cast<acc_t>(pb[k][q]) : acc_t(0);
      body(x, ez[q4], xz[q4]);
#pragma unroll
      for (int k = 0; k < K; ++k)
        if ((kWrite >> k) & 1u) pb[k][q] = store_stream<scalar_t, kSR>(x[k], k, rb[q4]);
    }
  }
}

// Whether the row takes the unit path for at least one unit (the emulation's statistics).
template <typename scalar_t, int K>
FFM_HD bool row_uses_units(scalar_t* const (&p)[K], const FrameRow& r) {
  constexpr int V = 16 / static_cast<int>(sizeof(scalar_t));
  constexpr int U = V >= 4 ? V : 4;
  uintptr_t mis_addr = 0;
  for (int k = 0; k < K; ++k)
    mis_addr |= reinterpret_cast<uintptr_t>(p[k]) +
                static_cast<uintptr_t>((r.fs - r.mis) * static_cast<int64_t>(sizeof(scalar_t)));
  const int64_t us = (r.fs == 0 && r.mis > 0) ? U : 0;
  return (mis_addr & 15u) == 0 && us + U <= r.fe - r.fs;
}

// ------------------------------------------------------------------ bodies
// Streams: (theta); read 0b1, write 0b1. theta <- theta + sigma * eps (the skipped step's
// restore uses sigma = -sigma, as the per-tensor kernels do).
template <typename acc_t>
struct PerturbBody {
  acc_t sigma;
  FFM_HD void operator()(acc_t* x, float e, float) { x[0] = x[0] + sigma * static_cast<acc_t>(e); }
};

// Streams: (theta, g[, m]); read 0b011 / 0b111, write 0b001 / 0b101.
template <bool kMom, typename acc_t>
struct StepBody {
  StepArgs<acc_t> a;
  FFM_HD void operator()(acc_t* x, float e, float xi) {
    acc_t m = kMom ? x[2] : acc_t(0);
    x[0] = langevin_update<kMom>(x[0], x[1], &m, static_cast<acc_t>(e), static_cast<acc_t>(xi), a);
    if (kMom) x[2] = m;
  }
};

// ------------------------------------------------------------------ all_finite
FFM_HD bool nonfinite_bits(float x) { return (float_bits(x) & 0x7fffffffu) >= 0x7f800000u; }
FFM_HD bool nonfinite_bits(double x) {
  uint64_t u;
  memcpy(&u, &x, sizeof(u));
  return (u & 0x7fffffffffffffffull) >= 0x7ff0000000000000ull;
}

// Streams: (t); read only (multi::visit_chunk over plain element rows).
template <typename acc_t>
struct NonFiniteBody {
  int flag;
  FFM_HD void operator()(acc_t* x, int64_t) { flag |= nonfinite_bits(x[0]) ? 1 : 0; }
};

}  // namespace mlang
}  // namespace cuda_impl
}  // namespace fused_flat
