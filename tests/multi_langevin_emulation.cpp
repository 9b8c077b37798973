// Host emulation of the multi-tensor Langevin kernels' index logic
// (csrc/cuda/multi_langevin.cuh): every block of every by-value launch (list_launch.h's
// plan_launches, call-frame rows) and every thread of it runs sequentially, on random tensor lists (empty and 1-element tensors, odd
// bucket offsets up to 2^33 + 8, random 16-byte misalignments), against per-element oracles
// built from elementwise.h (element_noise, langevin_update): the same functions, so the
// results must be bit-identical. Also the all_finite body over plain (element) rows, the
// stochastic-rounding variant of the step (kSR, bf16/fp16: oracle element_sr_bits +
// sr_bf16_bits / sr_fp16_bits, four noise combinations and restore tags 0..2) and the
// kernels' device-scalar loads (load_step_scalars).
// Prints "cases=N unit_blocks=U failures=F", eps of two index ranges (checked in Python
// against fused_flat.noise) and "srref ..." lines: inputs and outputs (bit patterns) of a
// fixed SR list, which Python replays through fused_flat.backends.reference.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <type_traits>
#include <vector>

#include "multi_langevin.cuh"
#include "emulation_expect.h"

using namespace fused_flat;
using namespace fused_flat::cuda_impl;
using namespace fused_flat::cuda_impl::mlang;

static long unit_blocks = 0;

// A list's launches (list_launch.h: plan_launches, by-value ListArgs): the tensors' sizes
// and bucket offsets, units call-frame positions (frame) or elements.
struct Tabs {
  std::vector<int64_t> sizes, offs;
  bool frame;
};

static Tabs build_frame(const std::vector<int64_t>& sizes, const std::vector<int64_t>& offs, int64_t) {
  return Tabs{sizes, offs, true};
}

static Tabs build_plain(const std::vector<int64_t>& sizes, int64_t) {
  return Tabs{sizes, std::vector<int64_t>(sizes.size(), 0), false};
}

// K streams per tensor, each a view `shift` elements into its own storage (+ guard zones).
template <typename T>
struct Lists {
  std::vector<std::vector<T>> store;  // [K*Tn]
  std::vector<int64_t> ptrs;          // [K, Tn]
  T* at(int k, size_t t, size_t Tn) { return reinterpret_cast<T*>(static_cast<uintptr_t>(ptrs[k * Tn + t])); }
};

// aligned: the frame-0 address (data - (offset & 3)) is 16-byte aligned for every stream
// (the unit path); otherwise a random shift.
template <typename T>
Lists<T> make_lists(int K, const std::vector<int64_t>& sizes, const std::vector<int64_t>& offs,
                    std::mt19937_64& rng, bool aligned) {
  constexpr int V = 16 / sizeof(T);
  Lists<T> L;
  const size_t Tn = sizes.size();
  L.store.resize(K * Tn);
  L.ptrs.resize(K * Tn);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int k = 0; k < K; ++k)
    for (size_t t = 0; t < Tn; ++t) {
      auto& s = L.store[k * Tn + t];
      s.resize(sizes[t] + 4 * V + 16);
      for (auto& x : s) x = static_cast<T>(nd(rng));
      size_t a = 8;   // guard zone before the view
      while (reinterpret_cast<uintptr_t>(s.data() + a) % 16) ++a;
      const int sh = aligned ? static_cast<int>(offs[t] & 3) : static_cast<int>(rng() % V);
      L.ptrs[k * Tn + t] = static_cast<int64_t>(reinterpret_cast<uintptr_t>(s.data() + a + sh));
    }
  return L;
}

// Every block of every launch of the list: visit(row, slot pointers of the K lists).
template <int K, typename T, typename Visit>
void for_blocks(Lists<T>& L, const Tabs& tb, int64_t chunk, const Visit& visit) {
  const size_t Tn = tb.sizes.size();
  launch::plan_launches<K>(
      static_cast<int64_t>(Tn), [&](int64_t t) { return tb.sizes[t]; },
      [&](int64_t t) { return tb.offs[t]; },
      [&](int k, int64_t t) { return static_cast<void*>(L.at(k, static_cast<size_t>(t), Tn)); }, chunk,
      tb.frame, [&](const launch::ListArgs<K>& a) {
        for (int b = 0; b < a.n_blocks; ++b) {
          const launch::LaunchRow lr = launch::row_of(a, b, chunk, tb.frame);
          T* p[K];
          multi::slot_ptrs(p, a, lr.t);
          visit(lr, p);
        }
      });
}

template <int K, unsigned kR, unsigned kW, bool kEps, bool kXi, bool kSR = false, typename T,
          typename Body>
void run(Lists<T>& L, const Tabs& tb, int64_t chunk, int nthreads, const Noise& na, Body body) {
  for_blocks<K>(L, tb, chunk, [&](const launch::LaunchRow& lr, T* (&p)[K]) {
    const FrameRow r = frame_row(lr);
    T* const(&pa)[K] = p;
    if (row_uses_units<T, K>(pa, r)) ++unit_blocks;
    for (int tid = 0; tid < nthreads; ++tid)
      visit_frame<T, K, kR, kW, kEps, kXi, kSR>(pa, r, na, tid, nthreads, body);
  });
}

template <typename T>
bool same(const T& a, const T& b) { return std::memcmp(&a, &b, sizeof(T)) == 0; }

// The SR oracle: theta's fp32 result stochastically rounded with the element's rbits, each
// from its own two Philox calls (element_sr_bits), independent of the kernel's word reuse.
template <typename T>
T sr_oracle(float th, PhiloxKey key, int64_t step, int64_t gi) {
  const uint32_t rb = element_sr_bits(key, step, gi);
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return T(sr_bf16_bits(th, rb), T::from_bits());
  } else {
    return T(sr_fp16_bits(th, rb), T::from_bits());
  }
}

// restore + step with stochastic rounding of theta (momentum: (theta, g, m), else (theta, g))
template <typename T, bool kMom, bool kEps, bool kXi>
void sr_case(std::mt19937_64& rng, int nthreads, const std::vector<int64_t>& sizes,
             const std::vector<int64_t>& offs, const Tabs& tb, int64_t chunk, bool aligned,
             const Noise& na) {
  constexpr int K = kMom ? 3 : 2;
  const size_t Tn = sizes.size();
  auto L = make_lists<T>(K, sizes, offs, rng, aligned);
  StepArgs<float> a{kEps ? 0.05f : 0.0f, 0.1f, 1e-2f, kMom ? 0.9f : 0.0f, 0.1f, kXi ? 1e-3f : 0.0f,
                    0.5f, (rng() % 2) == 0, kMom && (rng() % 2) == 0};
  std::vector<std::vector<T>> want_p(Tn), want_m(Tn);
  for (size_t t = 0; t < Tn; ++t)
    for (int64_t e = 0; e < sizes[t]; ++e) {
      float eps, xi;
      element_noise<kEps, kXi>(na.key, na.step, na.tag, offs[t] + e, eps, xi);
      float m = kMom ? static_cast<float>(L.at(2, t, Tn)[e]) : 0.0f;
      const float th = langevin_update<kMom>(static_cast<float>(L.at(0, t, Tn)[e]),
                                             static_cast<float>(L.at(1, t, Tn)[e]), &m, eps, xi, a);
      want_p[t].push_back(sr_oracle<T>(th, na.key, na.step, offs[t] + e));
      want_m[t].push_back(static_cast<T>(m));
    }
  if constexpr (kMom)
    run<3, 0b111u, 0b101u, kEps, kXi, true>(L, tb, chunk, nthreads, na, StepBody<true, float>{a});
  else
    run<2, 0b11u, 0b01u, kEps, kXi, true>(L, tb, chunk, nthreads, na, StepBody<false, float>{a});
  for (size_t t = 0; t < Tn; ++t)
    for (int64_t e = 0; e < sizes[t]; ++e) {
      EXPECT(same(want_p[t][e], L.at(0, t, Tn)[e]), "sr step theta mom=%d eps=%d xi=%d t=%zu e=%lld\n",
             (int)kMom, (int)kEps, (int)kXi, t, (long long)e);
      if (kMom)
        EXPECT(same(want_m[t][e], L.at(2, t, Tn)[e]), "sr step m t=%zu e=%lld\n", t, (long long)e);
    }
}

template <typename T>
void one_case(std::mt19937_64& rng, int nthreads) {
  using acc_t = at::opmath_type<T>;
  const int nt = 1 + static_cast<int>(rng() % 6);
  std::vector<int64_t> sizes, offs;
  for (int i = 0; i < nt; ++i) {
    const int r = static_cast<int>(rng() % 10);
    sizes.push_back(r == 0 ? 0 : r == 1 ? 1 : static_cast<int64_t>(rng() % (r < 6 ? 70 : 1500)));
    offs.push_back(static_cast<int64_t>(rng() % 3 == 0 ? (int64_t(1) << 33) + (rng() % 9) : rng() % 5000));
  }
  const int64_t chunk = 16 * (1 + static_cast<int64_t>(rng() % 20));
  const Tabs tb = build_frame(sizes, offs, chunk);
  const bool aligned = rng() % 3 != 0;
  const size_t Tn = sizes.size();
  const Noise na{make_key(0x2545F4914F6CDD1Dll, 3), 11, static_cast<uint32_t>(rng() % 3)};

  {  // perturb: theta + sigma * eps(offset + e); every element once, guard zones untouched
    auto L = make_lists<T>(1, sizes, offs, rng, aligned);
    auto before = L.store;
    const acc_t sigma = acc_t(0.25);
    run<1, 1u, 1u, true, false>(L, tb, chunk, nthreads, na, PerturbBody<acc_t>{sigma});
    for (size_t t = 0; t < Tn; ++t) {
      const T* view = L.at(0, t, Tn);
      const int64_t v0 = view - L.store[t].data();
      for (int64_t e = 0; e < static_cast<int64_t>(before[t].size()); ++e) {
        const bool in = e >= v0 && e < v0 + sizes[t];
        T want = before[t][e];
        if (in) {
          float eps, xi;
          element_noise<true, false>(na.key, na.step, na.tag, offs[t] + (e - v0), eps, xi);
          want = static_cast<T>(static_cast<acc_t>(before[t][e]) + sigma * static_cast<acc_t>(eps));
        }
        EXPECT(same(want, L.store[t][e]), "perturb: tensor %zu (n=%lld off=%lld) storage elem %lld (in=%d)\n",
               t, (long long)sizes[t], (long long)offs[t], (long long)e, (int)in);
      }
    }
  }
  {  // restore + step with momentum, both noises: (theta, g, m)
    auto L = make_lists<T>(3, sizes, offs, rng, aligned);
    StepArgs<acc_t> a{acc_t(0.05), acc_t(0.1), acc_t(1e-2), acc_t(0.9), acc_t(0.1), acc_t(1e-3),
                      acc_t(0.5), (rng() % 2) == 0, (rng() % 2) == 0};
    std::vector<std::vector<T>> want_p(Tn), want_m(Tn);
    for (size_t t = 0; t < Tn; ++t)
      for (int64_t e = 0; e < sizes[t]; ++e) {
        float eps, xi;
        element_noise<true, true>(na.key, na.step, na.tag, offs[t] + e, eps, xi);
        acc_t m = static_cast<acc_t>(L.at(2, t, Tn)[e]);
        const acc_t th = langevin_update<true>(static_cast<acc_t>(L.at(0, t, Tn)[e]),
                                               static_cast<acc_t>(L.at(1, t, Tn)[e]), &m,
                                               static_cast<acc_t>(eps), static_cast<acc_t>(xi), a);
        want_p[t].push_back(static_cast<T>(th));
        want_m[t].push_back(static_cast<T>(m));
      }
    run<3, 0b111u, 0b101u, true, true>(L, tb, chunk, nthreads, na, StepBody<true, acc_t>{a});
    for (size_t t = 0; t < Tn; ++t)
      for (int64_t e = 0; e < sizes[t]; ++e) {
        EXPECT(same(want_p[t][e], L.at(0, t, Tn)[e]), "step theta t=%zu e=%lld\n", t, (long long)e);
        EXPECT(same(want_m[t][e], L.at(2, t, Tn)[e]), "step m t=%zu e=%lld\n", t, (long long)e);
      }
  }
  {  // restore + step, no momentum, xi only: (theta, g)
    auto L = make_lists<T>(2, sizes, offs, rng, aligned);
    StepArgs<acc_t> a{acc_t(0), acc_t(0.1), acc_t(0), acc_t(0), acc_t(0), acc_t(1e-3), acc_t(1), false, false};
    std::vector<std::vector<T>> want_p(Tn);
    for (size_t t = 0; t < Tn; ++t)
      for (int64_t e = 0; e < sizes[t]; ++e) {
        float eps, xi;
        element_noise<false, true>(na.key, na.step, na.tag, offs[t] + e, eps, xi);
        acc_t m = 0;
        want_p[t].push_back(static_cast<T>(langevin_update<false>(
            static_cast<acc_t>(L.at(0, t, Tn)[e]), static_cast<acc_t>(L.at(1, t, Tn)[e]), &m,
            acc_t(0), static_cast<acc_t>(xi), a)));
      }
    run<2, 0b11u, 0b01u, false, true>(L, tb, chunk, nthreads, na, StepBody<false, acc_t>{a});
    for (size_t t = 0; t < Tn; ++t)
      for (int64_t e = 0; e < sizes[t]; ++e)
        EXPECT(same(want_p[t][e], L.at(0, t, Tn)[e]), "sgld theta t=%zu e=%lld\n", t, (long long)e);
  }
  if constexpr (sizeof(T) == 2) {  // stochastic rounding of theta, every noise combination
    sr_case<T, true, true, true>(rng, nthreads, sizes, offs, tb, chunk, aligned, na);
    sr_case<T, false, true, false>(rng, nthreads, sizes, offs, tb, chunk, aligned, na);
    sr_case<T, true, false, true>(rng, nthreads, sizes, offs, tb, chunk, aligned, na);
    sr_case<T, false, false, false>(rng, nthreads, sizes, offs, tb, chunk, aligned, na);
  }
  {  // all_finite body over the plain tables: one non-finite value somewhere (or none)
    std::vector<int64_t> zero(Tn, 0);
    auto L = make_lists<T>(1, sizes, zero, rng, aligned);
    const Tabs pt = build_plain(sizes, chunk);
    int64_t total = 0;
    for (auto s : sizes) total += s;
    const bool put = total > 0 && rng() % 2;
    if (put) {
      int64_t k = static_cast<int64_t>(rng() % total);
      for (size_t t = 0; t < Tn; ++t) {
        if (k < sizes[t]) {
          L.at(0, t, Tn)[k] = static_cast<T>(rng() % 2 ? std::numeric_limits<float>::infinity()
                                                       : std::numeric_limits<float>::quiet_NaN());
          break;
        }
        k -= sizes[t];
      }
    }
    int flag = 0;
    for_blocks<1>(L, pt, chunk, [&](const launch::LaunchRow& lr, T* (&p)[1]) {
      const multi::Row r = lr;
      for (int tid = 0; tid < nthreads; ++tid) {
        NonFiniteBody<acc_t> body{0};
        multi::visit_chunk<T, 1, 1u, 0u>(p, r.start, r.end, tid, nthreads, body);
        flag |= body.flag;
      }
    });
    EXPECT(flag == (put ? 1 : 0), "all_finite: flag %d, expected %d\n", flag, (int)put);
  }
}

// The kernels' device-scalar loads: the value they compute with equals the host path's
// static_cast of the same Python number (float64 tensors as is, float32 ones widened).
static void check_step_scalars() {
  const double lr_d = 0.1, ns_d = 3.7e-3;
  const float lr_f = 0.1f;
  const int64_t step = (int64_t(1) << 40) + 7;
  {  // float64 tensors, fp32 acc
    Noise na{make_key(1, 2), 0, 0};
    StepArgs<float> a{};
    const StepScalars sc{&step, DevScalar{&lr_d, true}, DevScalar{&ns_d, true}};
    load_step_scalars(sc, na, a);
    EXPECT(na.step == step && same(a.lr, static_cast<float>(lr_d)) &&
               same(a.noise_std, static_cast<float>(ns_d)), "device scalars (f64 -> float)\n");
  }
  {  // a float32 lr tensor, fp64 acc: float(t) in Python is the float widened
    Noise na{make_key(1, 2), 5, 0};
    StepArgs<double> a{};
    a.noise_std = 0.25;
    const StepScalars sc{nullptr, DevScalar{&lr_f, false}, DevScalar{nullptr, false}};
    load_step_scalars(sc, na, a);
    EXPECT(na.step == 5 && same(a.lr, static_cast<double>(lr_f)) && a.noise_std == 0.25,
           "device scalars (f32 -> double; absent ones keep the host values)\n");
  }
  // only the low 32 bits of the step enter the counter, on both paths
  const Words4 w1 = noise_words(make_key(1, 2), 9, step, 32), w2 = noise_words(make_key(1, 2), 9, 7, 32);
  EXPECT(w1.x0 == w2.x0 && w1.x3 == w2.x3, "step low 32 bits\n");
}

// A fixed SR list (bf16 / fp16; momentum, both noises or none), printed as bit patterns:
// "srref <dtype> <noisy> <t> <offset> theta=.. g=.. m=.. out=.. mout=..". Exact binary
// hyperparameters, so the reference's double scalars round to the same floats.
template <typename T>
void print_sr_reference(const char* name, bool noisy) {
  const std::vector<int64_t> sizes{1, 13, 37, 70, 300}, offs{0, 5, (int64_t(1) << 33) + 3, 1001, 6};
  const int64_t chunk = 64;
  const Tabs tb = build_frame(sizes, offs, chunk);
  std::mt19937_64 rng(noisy ? 77 : 78);
  auto L = make_lists<T>(3, sizes, offs, rng, true);
  const size_t Tn = sizes.size();
  std::vector<std::vector<T>> in(3 * Tn);
  for (int k = 0; k < 3; ++k)
    for (size_t t = 0; t < Tn; ++t) in[k * Tn + t].assign(L.at(k, t, Tn), L.at(k, t, Tn) + sizes[t]);
  const Noise na{make_key(0x2545F4914F6CDD1Dll, 3), 11, 1};
  const StepArgs<float> a{noisy ? 0.0625f : 0.0f, 0.125f, 0.0078125f, 0.875f, 0.25f,
                          noisy ? 0.0009765625f : 0.0f, 0.5f, false, false};
  if (noisy)
    run<3, 0b111u, 0b101u, true, true, true>(L, tb, chunk, 7, na, StepBody<true, float>{a});
  else
    run<3, 0b111u, 0b101u, false, false, true>(L, tb, chunk, 7, na, StepBody<true, float>{a});
  auto dump = [](const char* key, const T* x, int64_t n) {
    std::printf(" %s=", key);
    for (int64_t e = 0; e < n; ++e) {
      uint16_t b;
      std::memcpy(&b, x + e, 2);
      std::printf("%x%s", b, e + 1 < n ? "," : "");
    }
  };
  for (size_t t = 0; t < Tn; ++t) {
    std::printf("srref %s %d %zu %lld", name, (int)noisy, t, (long long)offs[t]);
    dump("theta", in[t].data(), sizes[t]);
    dump("g", in[Tn + t].data(), sizes[t]);
    dump("m", in[2 * Tn + t].data(), sizes[t]);
    dump("out", L.at(0, t, Tn), sizes[t]);
    dump("mout", L.at(2, t, Tn), sizes[t]);
    std::printf("\n");
  }
}

int main() {
  std::mt19937_64 rng(4321);
  long cases = 0;
  for (int it = 0; it < 300; ++it) {
    const int nthreads = it % 3 == 0 ? 256 : it % 3 == 1 ? 32 : 7;
    one_case<float>(rng, nthreads);
    one_case<c10::BFloat16>(rng, nthreads);
    one_case<c10::Half>(rng, nthreads);
    one_case<double>(rng, nthreads);
    cases += 4;
  }
  EXPECT(nonfinite_bits(std::numeric_limits<double>::infinity()) && !nonfinite_bits(1e300) &&
             nonfinite_bits(std::numeric_limits<double>::quiet_NaN()) && !nonfinite_bits(-3.0f) &&
             nonfinite_bits(-std::numeric_limits<float>::infinity()),
         "nonfinite_bits\n");
  check_step_scalars();
  const long units_before_ref = unit_blocks;
  for (bool noisy : {false, true}) {
    print_sr_reference<c10::BFloat16>("bf16", noisy);
    print_sr_reference<c10::Half>("fp16", noisy);
  }
  unit_blocks = units_before_ref;
  std::printf("cases=%ld unit_blocks=%ld failures=%d\n", cases, unit_blocks, failures);
  // eps (tag 0) of 8 elements at two bucket offsets, as the perturb kernel sees them
  for (int64_t first : {int64_t(5), (int64_t(1) << 33) + 3}) {
    std::printf("eps@%lld=", (long long)first);
    for (int64_t i = 0; i < 8; ++i) {
      float e, x;
      element_noise<true, false>(make_key(0x2545F4914F6CDD1Dll, 3), 11, 0, first + i, e, x);
      std::printf("%.9g%s", e, i < 7 ? "," : "\n");
    }
  }
  return failures == 0 ? 0 : 1;
}
