// Host emulation of perturb_from_kernel (csrc/cuda/kernels_cuda.cu), built and run by
// tests/test_cuda_emulation.py. The kernel's whole body is sweep.cuh's
// walk_bucket<V, kVec>(geo, tid, stride, PerturbFrom<scalar_t, V, kEps>{...}); this program
// runs that call for every "thread" tid in [0, stride) of several grid sizes, sequentially,
// with the path the launcher picks (vector path when plan_vec agrees, the Philox-call path
// otherwise; kEps = sigma != 0), for fp32 / bf16 / fp16 params over fp32 masters: sizes 1..5000
// and a few of ~1-3M elements, odd bucket offsets up to 2^40 + 3, every 16-byte misalignment
// of the param, masters sharing it or not.
//
// The body is wrapped (Counted) so every element's writes are counted. A case passes when
// every element of [0, n) is written exactly once, no body call reaches outside [0, n), every
// vector access is 16-byte aligned, the guard zones around the param are untouched, and each
// param equals, bit for bit, the per-element oracle round(master + sigma * z(tag, offset + i))
// with z = element_normal of fused_flat/elementwise.h (the noise of the normal_noise op; the
// Python test compares the values printed by `z` lines with fused_flat.noise and the op).
// Prints one summary line; exit status 1 on any failure.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <type_traits>
#include <vector>

#include "sweep.cuh"

using namespace fused_flat;
using namespace fused_flat::cuda_impl;

constexpr int kThreads = 256;  // kernels_cuda.cu's block size
constexpr int kGuard = 16;     // guard elements on each side of the param

static long g_cases = 0, g_vec_cases = 0, g_fail = 0, g_printed = 0;

template <typename T>
static const char* tname() {
  if (std::is_same_v<T, float>) return "fp32";
  if (std::is_same_v<T, c10::BFloat16>) return "bf16";
  return "fp16";
}

// z(tag, offset + i), i < n, of the noise below (element_normal, one element at a time).
static const NoiseArgs kNoise{make_key(0x123456789abLL, 3), 7, 2};

static const float* ztable(int64_t offset, int64_t n) {
  static std::map<int64_t, std::vector<float>> cache;
  std::vector<float>& z = cache[offset];
  for (int64_t i = static_cast<int64_t>(z.size()); i < n; ++i)
    z.push_back(element_normal(kNoise.key, kNoise.step, kNoise.tag, offset + i));
  return z.data();
}

// A 64-byte aligned region; element 0 of the returned span sits `shift` elements past
// kGuard elements (so its 16-byte misalignment is shift * sizeof(T) mod 16).
template <typename T>
struct Buf {
  std::vector<unsigned char> raw;
  T* base;
  T* p;
  Buf(int64_t n, int shift) : raw(sizeof(T) * (n + shift + 2 * kGuard) + 64, 0xFF) {
    uintptr_t a = reinterpret_cast<uintptr_t>(raw.data());
    base = reinterpret_cast<T*>((a + 63) / 64 * 64);
    p = base + kGuard + shift;
  }
};

// The kernel's body with every write counted; a call outside [0, n) or a misaligned vector
// is recorded and not run.
template <typename Body, int V>
struct Counted {
  Body body;
  int64_t n;
  int32_t* count;
  long* bad;

  bool in(int64_t lo, int64_t hi) const {  // [lo, hi) inside [0, n)?
    if (lo >= 0 && hi <= n && lo <= hi) return true;
    ++*bad;
    return false;
  }
  void element(int64_t i, int64_t gi) const {
    if (!in(i, i + 1)) return;
    ++count[i];
    body.element(i, gi);
  }
  void vector(int64_t i0, int64_t j0) const {
    if (!in(i0, i0 + V)) return;
    if (reinterpret_cast<uintptr_t>(body.p + i0) % 16 != 0 ||
        reinterpret_cast<uintptr_t>(body.ms + i0) % 16 != 0) {
      ++*bad;
      return;
    }
    for (int q = 0; q < V; ++q) ++count[i0 + q];
    body.vector(i0, j0);
  }
  void call(int64_t j, int64_t i0, int lo, int hi) const {
    if (lo < 0 || hi > 4 || !in(i0 + lo, i0 + hi)) return;
    for (int h = lo; h < hi; ++h) ++count[i0 + h];
    body.call(j, i0, lo, hi);
  }
};

// Every thread of a grid of `stride` threads runs the kernel's body (walk_bucket + PerturbFrom),
// on the path the launcher takes (vec).
template <typename T, bool kVec, bool kEps>
static long run_grid(T* p, const float* ms, const Geometry& geo, float sigma, int64_t stride,
                     int32_t* count) {
  constexpr int V = kVec ? 16 / sizeof(T) : 4;  // as launch_perturb_from
  long bad = 0;
  const Counted<PerturbFrom<T, V, kEps>, V> body{{p, ms, kNoise, sigma}, geo.n, count, &bad};
  for (int64_t tid = 0; tid < stride; ++tid) walk_bucket<V, kVec>(geo, tid, stride, body);
  return bad;
}

// Grid sizes (threads): fixed ones, and the launcher's uncapped grid for this geometry.
static int64_t launcher_threads(const Geometry& geo, bool vec, int V) {
  const int64_t work = vec ? geo.nvec + 2 * V : calls_touching(geo.offset, geo.n);
  return (work + kThreads - 1) / kThreads * kThreads;
}

template <typename T>
static void perturb_case(int64_t n, int64_t offset, int pshift, int mshift, int64_t stride,
                         float sigma) {
  constexpr int V = 16 / sizeof(T);
  Buf<T> pb(n, pshift);
  Buf<float> mb(n, mshift);
  float* ms = mb.p;
  uint32_t s = static_cast<uint32_t>(n * 2654435761u + offset * 40503u + pshift * 977u + mshift);
  for (int64_t i = 0; i < n; ++i) {
    s = s * 1664525u + 1013904223u;
    ms[i] = static_cast<float>(((s >> 8) * (1.0 / 16777216.0)) * 4.0 - 1.5);
  }
  Geometry geo{n, offset, 0, 0};
  const bool vec = plan_vec<T>(geo, pb.p, ms);
  if (stride == 0) stride = launcher_threads(geo, vec, V);
  std::vector<int32_t> count(n, 0);
  long bad;
  if (vec) {
    bad = sigma != 0.0f ? run_grid<T, true, true>(pb.p, ms, geo, sigma, stride, count.data())
                        : run_grid<T, true, false>(pb.p, ms, geo, sigma, stride, count.data());
  } else {
    bad = sigma != 0.0f ? run_grid<T, false, true>(pb.p, ms, geo, sigma, stride, count.data())
                        : run_grid<T, false, false>(pb.p, ms, geo, sigma, stride, count.data());
  }
  const float* z = ztable(offset, n);
  int64_t wrong = 0, missed = 0, doubled = 0, first = -1;
  for (int64_t i = 0; i < n; ++i) {
    const T want = static_cast<T>(ms[i] + sigma * z[i]);
    const bool ok_val = std::memcmp(&want, pb.p + i, sizeof(T)) == 0;
    wrong += !ok_val;
    missed += count[i] == 0;
    doubled += count[i] > 1;
    if ((!ok_val || count[i] != 1) && first < 0) first = i;
  }
  int64_t guard = 0;  // bytes of the guard zones that changed
  const unsigned char* lo = reinterpret_cast<const unsigned char*>(pb.base);
  const unsigned char* hi = reinterpret_cast<const unsigned char*>(pb.p + n);
  for (size_t b = 0; b < sizeof(T) * (kGuard + pshift); ++b) guard += lo[b] != 0xFF;
  for (size_t b = 0; b < sizeof(T) * kGuard; ++b) guard += hi[b] != 0xFF;
  ++g_cases;
  g_vec_cases += vec;
  if (wrong || missed || doubled || bad || guard) {
    ++g_fail;
    if (g_printed++ < 20)
      std::printf("FAIL %s n=%ld offset=%ld pshift=%d mshift=%d stride=%ld sigma=%g vec=%d: "
                  "wrong=%ld missed=%ld doubled=%ld out_of_range_or_misaligned=%ld guard=%ld "
                  "first_bad=%ld\n",
                  tname<T>(), (long)n, (long)offset, pshift, mshift, (long)stride, sigma, (int)vec,
                  (long)wrong, (long)missed, (long)doubled, bad, (long)guard, (long)first);
  }
}

static const int64_t kOffsets[] = {0, 1, 2, 3, 4, 5, 6, 7, (int64_t(1) << 33) + 1,
                                   (int64_t(1) << 33) + 2, (int64_t(1) << 33) + 4,
                                   (int64_t(1) << 40) + 3};
static const int64_t kStrides[] = {1, 3, 64, 256, 0 /* the launcher's */, 4096};
constexpr int kNumOffsets = sizeof(kOffsets) / sizeof(kOffsets[0]);
constexpr int kNumStrides = sizeof(kStrides) / sizeof(kStrides[0]);

// The master misalignment (floats) that lets param element `head` and master element `head`
// both be 16-byte aligned: the vector path's, given the param's shift.
template <typename T>
static int matched_mshift(int pshift) {
  const int head = static_cast<int>(((16 - (pshift * sizeof(T)) % 16) % 16) / sizeof(T));
  return (4 - head % 4) % 4;
}

template <typename T>
static void all_cases() {
  constexpr int V = 16 / sizeof(T);
  // n = 1..64: every offset, param misalignment, master (mis)match, grid; sigma 0 on a subset
  for (int64_t n = 1; n <= 64; ++n)
    for (int64_t off : kOffsets)
      for (int ps = 0; ps < V; ++ps)
        for (int ms : {matched_mshift<T>(ps), (matched_mshift<T>(ps) + 1) % 4}) {
          for (int64_t st : kStrides) perturb_case<T>(n, off, ps, ms, st, 0.05f);
          perturb_case<T>(n, off, ps, ms, 3, 0.0f);
        }
  // n = 65..5000: four geometries each, drawn from the same sets
  uint32_t r = 12345u;
  auto draw = [&r](int k) {
    r = r * 1664525u + 1013904223u;
    return static_cast<int>((r >> 8) % static_cast<uint32_t>(k));
  };
  for (int64_t n = 65; n <= 5000; ++n)
    for (int c = 0; c < 4; ++c) {
      const int ps = draw(V);
      const int ms = c < 3 ? matched_mshift<T>(ps) : draw(4);
      perturb_case<T>(n, kOffsets[draw(kNumOffsets)], ps, ms, kStrides[draw(kNumStrides)],
                      c == 3 && (n & 1) ? 0.0f : 0.05f);
    }
  // a few large buckets; grids of 4096 threads and of an H100's resident capacity
  for (int64_t n : {int64_t(1) << 20, (int64_t(3) << 20) + 5})
    for (int64_t off : {int64_t(0), (int64_t(1) << 33) + 1, (int64_t(1) << 40) + 3}) {
      perturb_case<T>(n, off, 1, matched_mshift<T>(1), 4096, 0.05f);
      perturb_case<T>(n, off, 0, matched_mshift<T>(0), int64_t(kThreads) * 4 * 132, 0.05f);
    }
}

int main() {
  all_cases<float>();
  all_cases<c10::BFloat16>();
  all_cases<c10::Half>();
  // z(tag, offset + i) of the oracle, for tests/test_cuda_emulation.py to compare with
  // fused_flat.noise and the normal_noise op
  for (int64_t off : {int64_t(5), (int64_t(1) << 33) + 1}) {
    const float* z = ztable(off, 8);
    std::printf("z@%ld=", (long)off);
    for (int i = 0; i < 8; ++i) {
      uint32_t u;
      std::memcpy(&u, z + i, 4);
      std::printf(i ? ",%08x" : "%08x", u);
    }
    std::printf("\n");
  }
  std::printf("noise seed=%lld bucket=%d step=%ld tag=%u\n", 0x123456789abLL, 3, (long)kNoise.step,
              kNoise.tag);
  std::printf("cases=%ld vector_path=%ld failures=%ld\n", g_cases, g_vec_cases, g_fail);
  return g_fail == 0 && g_vec_cases > 0 && g_vec_cases < g_cases ? 0 : 1;
}
