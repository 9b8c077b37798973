// Host emulation of the CUDA kernels' index logic (csrc/cuda/sweep.cuh), built and run by
// tests/test_cuda_emulation.py. For many bucket geometries (sizes, bucket offsets, pointer
// misalignments, mismatched grad/momentum alignment) and grid sizes, every "thread"
// tid in [0, stride) runs the very sweep the kernel runs, sequentially; the result must
// equal, bit for bit, a per-element oracle that uses element_noise on the element's bucket
// index. A missed element, a doubly processed one, or noise taken from the wrong index
// fails. Prints one summary line; exit status 1 on any mismatch.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "sweep.cuh"

using namespace fused_flat;
using namespace fused_flat::cuda_impl;

static long g_cases = 0, g_vec_cases = 0, g_fail = 0;

template <typename T>
static T val(double x) {
  return static_cast<T>(static_cast<at::opmath_type<T>>(x));
}

// A buffer whose element 0 sits `shift` elements past a 64-byte boundary.
template <typename T>
struct Buf {
  std::vector<unsigned char> raw;
  T* p;
  Buf(int64_t n, int shift, unsigned seed) : raw(sizeof(T) * (n + shift) + 128) {
    uintptr_t a = reinterpret_cast<uintptr_t>(raw.data());
    a = (a + 63) / 64 * 64;
    p = reinterpret_cast<T*>(a) + shift;
    uint32_t s = seed * 2654435761u + 12345u;
    for (int64_t i = 0; i < n; ++i) {
      s = s * 1664525u + 1013904223u;
      p[i] = val<T>(((s >> 8) * (1.0 / 16777216.0)) * 4.0 - 1.5);
    }
  }
};

template <typename T>
static bool same(const T* a, const T* b, int64_t n) {
  return std::memcmp(a, b, sizeof(T) * n) == 0;
}

template <typename T>
static const char* tname() {
  if (std::is_same_v<T, float>) return "fp32";
  if (std::is_same_v<T, double>) return "fp64";
  if (std::is_same_v<T, c10::BFloat16>) return "bf16";
  return "fp16";
}

// Runs the sweep exactly as the launcher would: vector path when plan_vec agrees (never
// for fp64), call path otherwise; all threads of a grid of `stride` threads.
template <typename T, bool kEps, bool kXi, bool kG, bool kM, typename Body>
static bool emulate(T* p, const T* g, T* m, int64_t n, int64_t offset, const NoiseArgs& na,
                    int64_t stride, const Body& body) {
  Geometry geo{n, offset, 0, 0};
  bool vec = false;
  if constexpr (!std::is_same_v<T, double>) vec = plan_vec<T>(geo, p, kG ? g : nullptr, kM ? m : nullptr);
  for (int64_t tid = 0; tid < stride; ++tid) {
    if (vec) {
      if constexpr (!std::is_same_v<T, double>)  // fp64 never takes the vector path
        sweep<T, 16 / sizeof(T), true, kEps, kXi, kG, kM>(p, g, m, geo, na, tid, stride, body);
    } else {
      sweep<T, 4, false, kEps, kXi, kG, kM>(p, g, m, geo, na, tid, stride, body);
    }
  }
  return vec;
}

template <typename T>
static void perturb_case(int64_t n, int64_t offset, int shift, int64_t stride) {
  using acc_t = at::opmath_type<T>;
  const NoiseArgs na{make_key(0x123456789abLL, 3), 7, 2};
  const acc_t sigma = static_cast<acc_t>(0.05);
  Buf<T> a(n, shift, static_cast<unsigned>(n + offset));
  std::vector<T> want(a.p, a.p + n);
  for (int64_t i = 0; i < n; ++i) {
    float e, x;
    element_noise<true, false>(na.key, na.step, na.tag, offset + i, e, x);
    want[i] = static_cast<T>(static_cast<acc_t>(want[i]) + sigma * static_cast<acc_t>(e));
  }
  const bool vec = emulate<T, true, false, false, false>(
      a.p, nullptr, nullptr, n, offset, na, stride,
      [sigma](acc_t& th, acc_t, acc_t&, float e, float) { th = th + sigma * static_cast<acc_t>(e); });
  ++g_cases;
  g_vec_cases += vec;
  if (!same(a.p, want.data(), n)) {
    ++g_fail;
    std::printf("MISMATCH perturb %s n=%ld offset=%ld shift=%d stride=%ld vec=%d\n", tname<T>(),
                (long)n, (long)offset, shift, (long)stride, (int)vec);
  }
}

template <typename T, bool kMom, bool kEps, bool kXi>
static void step_case(int64_t n, int64_t offset, int shift, int gshift, int64_t stride) {
  using acc_t = at::opmath_type<T>;
  const NoiseArgs na{make_key(0x5eedLL << 20, 1), 9, 1};
  StepArgs<acc_t> sa;
  sa.sigma = kEps ? acc_t(0.03) : acc_t(0);
  sa.lr = acc_t(0.1);
  sa.weight_decay = acc_t(5e-4);
  sa.momentum = acc_t(0.9);
  sa.dampening = acc_t(0.1);
  sa.noise_std = kXi ? acc_t(0.02) : acc_t(0);
  sa.grad_mult = acc_t(0.5);
  sa.nesterov = (n & 1) != 0;
  sa.momentum_init = false;
  Buf<T> p(n, shift, 1 + static_cast<unsigned>(n)), g(n, gshift, 2 + static_cast<unsigned>(n)),
      m(n, shift, 3 + static_cast<unsigned>(n));
  std::vector<T> wp(p.p, p.p + n), wm(m.p, m.p + n);
  for (int64_t i = 0; i < n; ++i) {
    float e, x;
    element_noise<kEps, kXi>(na.key, na.step, na.tag, offset + i, e, x);
    acc_t mm = static_cast<acc_t>(wm[i]);
    const acc_t th = langevin_update<kMom>(static_cast<acc_t>(wp[i]), static_cast<acc_t>(g.p[i]), &mm,
                                           static_cast<acc_t>(e), static_cast<acc_t>(x), sa);
    wp[i] = static_cast<T>(th);
    if (kMom) wm[i] = static_cast<T>(mm);
  }
  const bool vec = emulate<T, kEps, kXi, true, kMom>(
      p.p, g.p, kMom ? m.p : nullptr, n, offset, na, stride,
      [&sa](acc_t& th, acc_t gg, acc_t& mm, float e, float x) {
        th = langevin_update<kMom>(th, gg, &mm, static_cast<acc_t>(e), static_cast<acc_t>(x), sa);
      });
  ++g_cases;
  g_vec_cases += vec;
  if (!same(p.p, wp.data(), n) || !same(m.p, wm.data(), n)) {
    ++g_fail;
    std::printf("MISMATCH step %s mom=%d eps=%d xi=%d n=%ld offset=%ld shift=%d gshift=%d "
                "stride=%ld vec=%d\n", tname<T>(), (int)kMom, (int)kEps, (int)kXi, (long)n,
                (long)offset, shift, gshift, (long)stride, (int)vec);
  }
}

static const int64_t kSizes[] = {1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 33, 100, 1027};
static const int64_t kOffsets[] = {0, 1, 2, 3, 4, 6, 8, (int64_t(1) << 33) + 1, (int64_t(1) << 33) + 4};
static const int64_t kStrides[] = {1, 3, 64, 4096};

template <typename T>
static void all_perturb() {
  for (int64_t n : kSizes)
    for (int64_t off : kOffsets)
      for (int shift = 0; shift < 8; ++shift)
        for (int64_t st : kStrides) perturb_case<T>(n, off, shift, st);
}

template <typename T, bool kMom, bool kEps, bool kXi>
static void all_step() {
  for (int64_t n : kSizes)
    for (int64_t off : kOffsets)
      for (int shift = 0; shift < 8; shift += 3)
        for (int gshift : {shift, (shift + 4) % 8})
          for (int64_t st : {int64_t(1), int64_t(5), int64_t(256)})
            step_case<T, kMom, kEps, kXi>(n, off, shift, gshift, st);
}

template <typename T>
static void all_types_step() {
  all_step<T, true, true, true>();
  all_step<T, true, true, false>();
  all_step<T, false, false, true>();
  all_step<T, false, false, false>();
}

int main() {
  all_perturb<float>();
  all_perturb<c10::BFloat16>();
  all_perturb<c10::Half>();
  all_perturb<double>();
  all_types_step<float>();
  all_types_step<c10::BFloat16>();
  all_types_step<c10::Half>();
  all_types_step<double>();
  std::printf("cases=%ld vector_path=%ld failures=%ld\n", g_cases, g_vec_cases, g_fail);
  return g_fail == 0 && g_vec_cases > 0 && g_vec_cases < g_cases ? 0 : 1;
}
