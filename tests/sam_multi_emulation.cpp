// Host emulation of the multi-tensor SAM kernels' index logic (csrc/cuda/sam_multi.cuh):
// every block of every by-value launch (list_launch.h's plan_launches) and every thread of
// it runs sequentially, on random
// tensor lists with random 16-byte misalignments, against per-element oracles.
// Prints "cases=N vector_blocks=V failures=F" and the probe signs of two index ranges.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "sam_multi.cuh"
#include "emulation_expect.h"

using namespace fused_flat;
using namespace fused_flat::cuda_impl::multi;

static long vector_blocks = 0;

// A list's launches (list_launch.h: plan_launches, by-value ListArgs, element units).
struct Tabs {
  std::vector<int64_t> sizes, offs;
};

static Tabs build(const std::vector<int64_t>& sizes, const std::vector<int64_t>& offs, int64_t) {
  return Tabs{sizes, offs};
}

// K streams per tensor, each a view `shift` elements into its own storage (+ guard zone).
template <typename T>
struct Lists {
  std::vector<std::vector<T>> store;  // [K*Tn]
  std::vector<int64_t> ptrs;          // [K, Tn]
  std::vector<int> shift;
  T* at(int k, size_t t, size_t Tn) { return reinterpret_cast<T*>(static_cast<uintptr_t>(ptrs[k * Tn + t])); }
};

template <typename T>
Lists<T> make_lists(int K, const std::vector<int64_t>& sizes, std::mt19937_64& rng, bool aligned) {
  constexpr int V = 16 / sizeof(T);
  Lists<T> L;
  const size_t Tn = sizes.size();
  L.store.resize(K * Tn);
  L.ptrs.resize(K * Tn);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int k = 0; k < K; ++k)
    for (size_t t = 0; t < Tn; ++t) {
      auto& s = L.store[k * Tn + t];
      s.resize(sizes[t] + 2 * V + 8);
      for (auto& x : s) x = static_cast<T>(nd(rng));
      // first 16-byte aligned element of the storage, then the shift
      size_t a = 0;
      while (reinterpret_cast<uintptr_t>(s.data() + a) % 16) ++a;
      const int sh = aligned ? 0 : static_cast<int>(rng() % V);
      L.ptrs[k * Tn + t] = static_cast<int64_t>(reinterpret_cast<uintptr_t>(s.data() + a + sh));
    }
  return L;
}

template <int K, unsigned kR, unsigned kW, typename T, typename MakeBody, typename AfterThread>
void run(Lists<T>& L, const Tabs& tb, int64_t chunk, int nthreads, MakeBody make_body,
         AfterThread after) {
  const size_t Tn = tb.sizes.size();
  fused_flat::cuda_impl::launch::plan_launches<K>(
      static_cast<int64_t>(Tn), [&](int64_t t) { return tb.sizes[t]; },
      [&](int64_t t) { return tb.offs[t]; },
      [&](int k, int64_t t) { return static_cast<void*>(L.at(k, static_cast<size_t>(t), Tn)); }, chunk,
      false, [&](const fused_flat::cuda_impl::launch::ListArgs<K>& a) {
  for (int b = 0; b < a.n_blocks; ++b) {
    const Row r = fused_flat::cuda_impl::launch::row_of(a, b, chunk, false);
    T* p[K];
    slot_ptrs(p, a, r.t);
    uintptr_t mis = 0;
    for (int k = 0; k < K; ++k) mis |= reinterpret_cast<uintptr_t>(p[k] + r.start);
    if ((mis & 15) == 0 && r.end - r.start >= static_cast<int64_t>(16 / sizeof(T))) ++vector_blocks;
    for (int tid = 0; tid < nthreads; ++tid) {
      auto body = make_body(r);
      T* const(&pa)[K] = p;
      visit_chunk<T, K, kR, kW>(pa, r.start, r.end, tid, nthreads, body);
      after(body);
    }
  }
      });
}

template <typename T>
void one_case(std::mt19937_64& rng, int nthreads) {
  using acc_t = at::opmath_type<T>;
  const int nt = static_cast<int>(rng() % 7);
  std::vector<int64_t> sizes, offs;
  for (int i = 0; i < nt; ++i) {
    const int r = static_cast<int>(rng() % 10);
    sizes.push_back(r == 0 ? 0 : r == 1 ? 1 : static_cast<int64_t>(rng() % (r < 6 ? 70 : 1500)));
    offs.push_back(static_cast<int64_t>(rng() % 3 == 0 ? (int64_t(1) << 33) + (rng() % 9) : rng() % 5000));
  }
  const int64_t chunk = 16 * (1 + static_cast<int64_t>(rng() % 20));
  const Tabs tb = build(sizes, offs, chunk);
  const bool aligned = rng() % 2;
  const size_t Tn = sizes.size();

  {  // coverage: every element incremented exactly once, guard zone untouched
    auto L = make_lists<T>(1, sizes, rng, aligned);
    auto before = L.store;
    struct Inc {
      FFM_HD void operator()(acc_t* x, int64_t) { x[0] = x[0] + acc_t(1); }
    };
    run<1, 1u, 1u>(L, tb, chunk, nthreads, [](const Row&) { return Inc{}; }, [](Inc&) {});
    for (size_t t = 0; t < Tn; ++t) {
      const T* base = before[t].data();
      const T* now = L.store[t].data();
      const T* view = L.at(0, t, Tn);
      const int64_t v0 = view - now;
      for (int64_t e = 0; e < static_cast<int64_t>(before[t].size()); ++e) {
        const bool in = e >= v0 && e < v0 + sizes[t];
        const T want = in ? static_cast<T>(static_cast<acc_t>(base[e]) + acc_t(1)) : base[e];
        EXPECT(std::memcmp(&want, &now[e], sizeof(T)) == 0,
               "coverage: tensor %zu storage elem %lld (in=%d) wrong\n", t, (long long)e, (int)in);
      }
    }
  }
  {  // restore + step with momentum: streams (theta, backup, g, m) land where they belong
    auto L = make_lists<T>(4, sizes, rng, aligned);
    SamStepArgs<acc_t> a{acc_t(0.1), acc_t(1e-2), acc_t(0.9), acc_t(0.1), acc_t(0.5), false, false};
    std::vector<std::vector<T>> want_p(Tn), want_m(Tn);
    for (size_t t = 0; t < Tn; ++t) {
      for (int64_t e = 0; e < sizes[t]; ++e) {
        acc_t m = static_cast<acc_t>(L.at(3, t, Tn)[e]);
        const acc_t th = sam_sgd_update<true, acc_t>(static_cast<acc_t>(L.at(1, t, Tn)[e]),
                                                     static_cast<acc_t>(L.at(2, t, Tn)[e]), &m, a);
        want_p[t].push_back(static_cast<T>(th));
        want_m[t].push_back(static_cast<T>(m));
      }
    }
    run<4, 0b1110u, 0b1001u>(L, tb, chunk, nthreads,
                             [&](const Row&) { return StepBody<true, acc_t>{a}; },
                             [](StepBody<true, acc_t>&) {});
    for (size_t t = 0; t < Tn; ++t)
      for (int64_t e = 0; e < sizes[t]; ++e) {
        EXPECT(std::memcmp(&want_p[t][e], &L.at(0, t, Tn)[e], sizeof(T)) == 0, "step theta t=%zu e=%lld\n", t, (long long)e);
        EXPECT(std::memcmp(&want_m[t][e], &L.at(3, t, Tn)[e], sizeof(T)) == 0, "step m t=%zu e=%lld\n", t, (long long)e);
      }
  }
  {  // probe: backup = theta, theta + delta * v(offset_t + e)
    auto L = make_lists<T>(2, sizes, rng, aligned);
    const PhiloxKey key = make_key(0x1234'5678'9ABCll, 3);
    std::vector<std::vector<T>> th0(Tn);
    for (size_t t = 0; t < Tn; ++t) th0[t].assign(L.at(0, t, Tn), L.at(0, t, Tn) + sizes[t]);
    run<2, 0b01u, 0b11u>(L, tb, chunk, nthreads,
                         [&](const Row& r) { return ProbeBody<acc_t>{key, 17, r.offset, acc_t(0.01)}; },
                         [](ProbeBody<acc_t>&) {});
    for (size_t t = 0; t < Tn; ++t)
      for (int64_t e = 0; e < sizes[t]; ++e) {
        const T want = static_cast<T>(static_cast<acc_t>(th0[t][e]) +
                                      acc_t(0.01) * static_cast<acc_t>(rademacher_sign(key, 17, offs[t] + e)));
        EXPECT(std::memcmp(&want, &L.at(0, t, Tn)[e], sizeof(T)) == 0, "probe theta t=%zu e=%lld\n", t, (long long)e);
        EXPECT(std::memcmp(&th0[t][e], &L.at(1, t, Tn)[e], sizeof(T)) == 0, "probe backup t=%zu e=%lld\n", t, (long long)e);
      }
  }
  {  // ASAM squared norm: thread partials in fixed order vs a sequential double sum
    auto L = make_lists<T>(2, sizes, rng, aligned);
    double want = 0.0, got = 0.0;
    for (size_t t = 0; t < Tn; ++t)
      for (int64_t e = 0; e < sizes[t]; ++e)
        want += sam_sq_term<true, acc_t>(static_cast<acc_t>(L.at(1, t, Tn)[e]),
                                         static_cast<acc_t>(L.at(0, t, Tn)[e]), acc_t(0.01));
    run<2, 0b11u, 0u>(L, tb, chunk, nthreads,
                      [&](const Row&) { return SqNormBody<true, acc_t>{acc_t(0.01), 0.0}; },
                      [&](SqNormBody<true, acc_t>& b) { got += b.sum; });
    EXPECT(std::fabs(got - want) <= 1e-12 * std::fabs(want), "sq_norm %.17g vs %.17g\n", got, want);
  }
}

int main() {
  std::mt19937_64 rng(1234);
  long cases = 0;
  for (int it = 0; it < 400; ++it) {
    const int nthreads = it % 3 == 0 ? 256 : it % 3 == 1 ? 32 : 7;
    one_case<float>(rng, nthreads);
    one_case<c10::BFloat16>(rng, nthreads);
    one_case<c10::Half>(rng, nthreads);
    one_case<double>(rng, nthreads);
    cases += 4;
  }
  std::printf("cases=%ld vector_blocks=%ld failures=%d\n", cases, vector_blocks, failures);
  const PhiloxKey key = make_key(0x1234'5678'9ABCll, 3);
  std::printf("probe0=");
  for (int64_t i = 0; i < 64; ++i) std::printf("%c", rademacher_sign(key, 17, i) < 0 ? '-' : '+');
  std::printf("\nprobe33=");
  for (int64_t i = 0; i < 64; ++i) std::printf("%c", rademacher_sign(key, 17, (int64_t(1) << 33) - 3 + i) < 0 ? '-' : '+');
  std::printf("\n");
  return failures == 0 ? 0 : 1;
}
