// Host emulation of the by-value launch planning of the tensor-list CUDA kernels
// (csrc/cuda/list_launch.h: plan_launches, row_of), driven by tests/test_list_launch_emulation.py.
// No GPU, no data: the tensors are sizes, offsets and fake pointers, so sizes past 2^31 and
// 2^32 elements cost nothing. For every case and K (lists per launch) it checks that
//   * every launch fits: 1..kMaxBlocks blocks, 1..kTensors slots, every block's slot in use;
//   * every slot describes one real tensor (its K pointers, numel and offset);
//   * over all launches every unit of every non-empty tensor is visited exactly once, in
//     tensor order then chunk order (the blocks' global order, which the norm's partials use),
//     with the right bucket index: element e of tensor t is bucket index offsets[t] + e, and
//     in frame mode unit f is element f - (offsets[t] & 3) with bucket index
//     4 * (offsets[t] >> 2) + f (the Langevin kernels' call frame), chunks starting at a
//     multiple of 4 (no Philox call straddles two blocks);
//   * empty tensors get no slot; total_blocks equals the blocks launched.
// Prints "cases=N launches=L max_units=M failures=F".
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "list_launch.h"
#include "emulation_expect.h"

using namespace fused_flat::cuda_impl::launch;

static long long total_launches = 0;
static int64_t max_units = 0;

static void* fake_ptr(int k, int64_t t) {
  return reinterpret_cast<void*>(static_cast<uintptr_t>(((t + 1) << 8) | static_cast<uint64_t>(k)));
}

template <int K>
void check_case(const std::vector<int64_t>& numels, const std::vector<int64_t>& offsets,
                int64_t chunk, bool frame) {
  const int64_t T = static_cast<int64_t>(numels.size());
  // per tensor: the next unit expected (units arrive in order, chunk by chunk)
  std::vector<int64_t> next(T, 0);
  int64_t last_t = -1, blocks = 0;
  const int64_t launches = plan_launches<K>(
      T, [&](int64_t t) { return numels[t]; }, [&](int64_t t) { return offsets[t]; },
      [&](int k, int64_t t) { return fake_ptr(k, t); }, chunk, frame,
      [&](const ListArgs<K>& a) {
        ++total_launches;
        EXPECT(a.n_blocks >= 1 && a.n_blocks <= kMaxBlocks, "launch with %d blocks\n", a.n_blocks);
        EXPECT(a.n_tensors >= 1 && a.n_tensors <= ListArgs<K>::kTensors, "launch with %d slots\n",
               a.n_tensors);
        std::vector<int64_t> slot_t(a.n_tensors, -1);
        for (int s = 0; s < a.n_tensors; ++s) {
          const int64_t t = (static_cast<int64_t>(reinterpret_cast<uintptr_t>(a.ptr[0][s])) >> 8) - 1;
          EXPECT(t >= 0 && t < T, "slot %d: bad pointer\n", s);
          if (t < 0 || t >= T) return;
          slot_t[s] = t;
          for (int k = 0; k < K; ++k)
            EXPECT(a.ptr[k][s] == fake_ptr(k, t), "slot %d list %d: pointer of another tensor\n", s, k);
          EXPECT(a.numel[s] == numels[t] && a.offset[s] == offsets[t],
                 "slot %d: numel/offset %lld/%lld, tensor %lld has %lld/%lld\n", s,
                 (long long)a.numel[s], (long long)a.offset[s], (long long)t,
                 (long long)numels[t], (long long)offsets[t]);
          EXPECT(numels[t] > 0, "empty tensor %lld got a slot\n", (long long)t);
        }
        for (int b = 0; b < a.n_blocks; ++b) {
          ++blocks;
          EXPECT(a.block_tensor[b] < a.n_tensors, "block %d: slot %d not in use\n", b,
                 (int)a.block_tensor[b]);
          const LaunchRow r = row_of(a, b, chunk, frame);
          const int64_t t = slot_t[r.t];
          if (t < 0) return;
          EXPECT(t >= last_t, "block of tensor %lld after tensor %lld\n", (long long)t, (long long)last_t);
          last_t = t;
          const int64_t mis = frame ? (offsets[t] & 3) : 0;
          const int64_t ext = numels[t] + mis;
          EXPECT(r.start == next[t], "tensor %lld: block starts at unit %lld, expected %lld\n",
                 (long long)t, (long long)r.start, (long long)next[t]);
          EXPECT(r.end > r.start && r.end <= ext && r.end - r.start <= chunk,
                 "tensor %lld: block [%lld, %lld) of extent %lld\n", (long long)t,
                 (long long)r.start, (long long)r.end, (long long)ext);
          EXPECT(r.end == ext || r.end - r.start == chunk, "tensor %lld: short block inside\n", (long long)t);
          if (frame) EXPECT(r.start % 4 == 0, "frame block starts at %lld\n", (long long)r.start);
          next[t] = r.end;
          max_units = std::max(max_units, r.end);
          // the bucket index of the block's first and last element, as the kernels compute it
          const int64_t u0 = std::max(r.start, mis), u1 = r.end - 1;
          for (int64_t u : {u0, u1}) {
            const int64_t e = u - mis;
            const int64_t gi = frame ? 4 * (r.offset >> 2) + u : r.offset + u;
            EXPECT(e >= 0 && e < numels[t] && gi == offsets[t] + e,
                   "tensor %lld unit %lld: element %lld bucket index %lld, expected %lld\n",
                   (long long)t, (long long)u, (long long)e, (long long)gi,
                   (long long)(offsets[t] + e));
          }
        }
      });
  for (int64_t t = 0; t < T; ++t) {
    const int64_t ext = numels[t] == 0 ? 0 : numels[t] + (frame ? (offsets[t] & 3) : 0);
    EXPECT(next[t] == ext, "tensor %lld: covered %lld of %lld units\n", (long long)t,
           (long long)next[t], (long long)ext);
  }
  const int64_t want = total_blocks(
      T, [&](int64_t t) { return numels[t]; }, [&](int64_t t) { return offsets[t]; }, chunk, frame);
  EXPECT(blocks == want, "%lld blocks launched, total_blocks says %lld\n", (long long)blocks,
         (long long)want);
  EXPECT(launches >= (blocks + kMaxBlocks - 1) / kMaxBlocks, "too few launches\n");
}

template <int K>
void check_both(const std::vector<int64_t>& n, const std::vector<int64_t>& o, int64_t chunk) {
  check_case<K>(n, o, chunk, false);
  check_case<K>(n, o, chunk, true);
}

int main() {
  std::mt19937_64 rng(20);
  int cases = 0;
  std::printf("sizeof ListArgs<1..4> = %zu %zu %zu %zu, slots %d %d %d %d\n", sizeof(ListArgs<1>),
              sizeof(ListArgs<2>), sizeof(ListArgs<3>), sizeof(ListArgs<4>), ListArgs<1>::kTensors,
              ListArgs<2>::kTensors, ListArgs<3>::kTensors, ListArgs<4>::kTensors);
  // random lists: counts past one launch's slots, empty and tiny tensors, odd offsets
  for (int i = 0; i < 600; ++i) {
    const int64_t T = static_cast<int64_t>(rng() % 200);
    std::vector<int64_t> n(T), o(T);
    int64_t off = static_cast<int64_t>(rng() % 7);
    for (int64_t t = 0; t < T; ++t) {
      const int kind = static_cast<int>(rng() % 5);
      n[t] = kind == 0 ? 0 : kind == 1 ? static_cast<int64_t>(rng() % 5)
                                       : static_cast<int64_t>(rng() % (kind == 4 ? 20000 : 300));
      o[t] = rng() % 3 == 0 ? static_cast<int64_t>(rng() % (int64_t(1) << 34)) : off;
      off += n[t] + (rng() % 4 == 0 ? static_cast<int64_t>(rng() % 5) : 0);
    }
    const int64_t chunk = 16 * (1 + static_cast<int64_t>(rng() % 4));
    switch (i % 4) {
      case 0: check_both<1>(n, o, chunk); break;
      case 1: check_both<2>(n, o, chunk); break;
      case 2: check_both<3>(n, o, chunk); break;
      default: check_both<4>(n, o, chunk); break;
    }
    ++cases;
  }
  // exactly full launches: kTensors tensors of one chunk; kMaxBlocks chunks of one tensor
  for (int extra = -1; extra <= 1; ++extra) {
    std::vector<int64_t> n(ListArgs<1>::kTensors + extra, 16), o(n.size(), 3);
    check_both<1>(n, o, 16);
    std::vector<int64_t> n4(ListArgs<4>::kTensors + extra, 5), o4(n4.size(), 1);
    check_both<4>(n4, o4, 16);
    std::vector<int64_t> big{16 * (kMaxBlocks + extra)}, ob{0};
    check_both<2>(big, ob, 16);
    cases += 3;
  }
  // sizes past 2^31 and 2^32 elements (index arithmetic only), with the real chunk
  {
    const int64_t g = int64_t(1) << 31;
    std::vector<int64_t> n{g + 5, 0, 3, (int64_t(1) << 32) + 7, 1, g - 1};
    std::vector<int64_t> o{1, 0, g + 6, (int64_t(1) << 33) + 2, 3, (int64_t(1) << 40) + 1};
    check_both<1>(n, o, kChunk);
    check_both<4>(n, o, kChunk);
    cases += 2;
  }
  // no tensors, only empty tensors
  check_both<3>({}, {}, 16);
  check_both<3>({0, 0, 0}, {1, 2, 3}, 16);
  cases += 2;
  std::printf("cases=%d launches=%lld max_units=%lld failures=%d\n", cases, total_launches,
              (long long)max_units, failures);
  return failures == 0 ? 0 : 1;
}
