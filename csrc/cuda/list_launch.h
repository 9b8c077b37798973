// fused_flat CUDA: the launch arguments of the tensor-list kernels (multi_langevin.cu,
// sam_cuda.cu), passed BY VALUE in the kernel's argument block -- PyTorch's
// MultiTensorApply.cuh is the model. No device tables, no host->device copy, nothing cached
// by address: a launch reads only its own arguments, so CUDA-graph capture works on the
// first call and no call ever waits for the host.
//
// A list op over T tensors (K parallel lists: params, grads, ...) runs as one or more
// launches. Each launch gets a ListArgs<K>: up to kTensors tensors (their K data pointers,
// numel and bucket offset) and up to kMaxBlocks blocks, block b handling chunk
// block_chunk[b] of tensor block_tensor[b]. Chunk c of a tensor covers the units
// [c * chunk, min((c + 1) * chunk, extent)), where a unit is an element (plain kernels,
// extent = numel) or a call-frame position (the Langevin kernels, extent = numel +
// (offset & 3): frame position f is element f - (offset & 3), multi_langevin.cuh).
// Empty tensors get no slot and no block. A tensor whose chunks do not fit the current
// launch continues in the next one, as its slot 0.
//
// plan_launches (host) and row_of (host and device) are all of the logic: plain C++ that
// tests/list_launch_emulation.cpp runs on the host (every unit of every tensor visited
// exactly once with the right bucket index, launch splitting, empty tensors, offsets not a
// multiple of 4, sizes past 2^31 and 2^32 elements).
//
// Size: ListArgs<K> <= 3.5 KB for K <= 4, leaving the rest of the classic 4 KB kernel
// parameter limit (which every toolkit accepts) to the kernel's other arguments.
#pragma once
#include <stdint.h>

#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#define FFL_HD __host__ __device__ __forceinline__
#else
#define FFL_HD inline
#endif

namespace fused_flat {
namespace cuda_impl {
namespace launch {

constexpr int kMaxBlocks = 320;          // blocks per launch
constexpr int kTensorBytes = 1920;       // bytes of per-tensor slots per launch
constexpr int64_t kChunk = int64_t(1) << 14;   // units per block: 16 x (256 threads x 4 fp32)
constexpr int kParamLimit = 4096;        // the classic kernel parameter limit (bytes)

// Tensor slots per launch for K lists: K pointers, numel and offset per slot.
template <int K>
constexpr int max_tensors() {
  return kTensorBytes / (8 * K + 16);
}

template <int K>
struct ListArgs {
  static constexpr int kTensors = max_tensors<K>();
  void* ptr[K][kTensors];          // data pointer of slot s in list k (element 0)
  int64_t numel[kTensors];
  int64_t offset[kTensors];        // bucket index of the slot's element 0
  int32_t block_chunk[kMaxBlocks]; // chunk index of block b within its tensor
  uint8_t block_tensor[kMaxBlocks];// slot of block b
  int32_t n_tensors;               // slots in use
  int32_t n_blocks;                // blocks of this launch (the grid size)
};

static_assert(ListArgs<1>::kTensors >= 32 && ListArgs<4>::kTensors >= 32, "enough slots");
static_assert(ListArgs<1>::kTensors <= 255, "block_tensor is a uint8_t");
static_assert(sizeof(ListArgs<1>) <= 3584 && sizeof(ListArgs<2>) <= 3584 &&
                  sizeof(ListArgs<3>) <= 3584 && sizeof(ListArgs<4>) <= 3584,
              "ListArgs leaves >= 512 bytes of the 4 KB parameter block to the other arguments");

// The units of block b of a launch: slot t, units [start, end) of that tensor, its numel
// and bucket offset. frame: units are call-frame positions (extent numel + (offset & 3)).
struct LaunchRow {
  int32_t t;
  int64_t start;
  int64_t end;
  int64_t numel;
  int64_t offset;
};

FFL_HD int64_t extent_of(int64_t numel, int64_t offset, bool frame) {
  return numel + (frame ? (offset & 3) : 0);
}

template <int K>
FFL_HD LaunchRow row_of(const ListArgs<K>& a, int b, int64_t chunk, bool frame) {
  LaunchRow r;
  r.t = a.block_tensor[b];
  r.numel = a.numel[r.t];
  r.offset = a.offset[r.t];
  r.start = static_cast<int64_t>(a.block_chunk[b]) * chunk;
  const int64_t ext = extent_of(r.numel, r.offset, frame);
  r.end = r.start + chunk < ext ? r.start + chunk : ext;
  return r;
}

// Splits T tensors into launches and calls launch(const ListArgs<K>&) for each, in order.
// numel_of(t), offset_of(t), ptr_of(k, t) describe tensor t. Returns the number of
// launches. Blocks come in tensor order and chunk order, so the g-th block over all
// launches is a fixed function of the numels (sam_cuda.cu's norm partials rely on it).
// Throws std::length_error for a tensor of more than 2^31 - 1 chunks.
template <int K, typename NumelOf, typename OffsetOf, typename PtrOf, typename Launch>
int64_t plan_launches(int64_t T, const NumelOf& numel_of, const OffsetOf& offset_of,
                      const PtrOf& ptr_of, int64_t chunk, bool frame, const Launch& launch) {
  using Args = ListArgs<K>;
  Args a;
  a.n_tensors = 0;
  a.n_blocks = 0;
  int64_t launches = 0;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t n = numel_of(t);
    if (n == 0) continue;
    const int64_t off = offset_of(t);
    const int64_t nchunks = (extent_of(n, off, frame) + chunk - 1) / chunk;
    if (nchunks > int64_t(0x7fffffff))
      throw std::length_error("fused_flat: tensor " + std::to_string(t) + " of " +
                              std::to_string(n) + " elements has more than 2^31 - 1 chunks");
    const int s = a.n_tensors++;
    for (int k = 0; k < K; ++k) a.ptr[k][s] = ptr_of(k, t);
    a.numel[s] = n;
    a.offset[s] = off;
    for (int64_t c = 0; c < nchunks; ++c) {
      a.block_tensor[a.n_blocks] = static_cast<uint8_t>(a.n_tensors - 1);
      a.block_chunk[a.n_blocks] = static_cast<int32_t>(c);
      ++a.n_blocks;
      const bool last = c == nchunks - 1;
      if (a.n_blocks == kMaxBlocks || (last && a.n_tensors == Args::kTensors)) {
        launch(static_cast<const Args&>(a));
        ++launches;
        a.n_blocks = 0;
        if (last) {
          a.n_tensors = 0;
        } else {   // the tensor goes on in the next launch, as its slot 0
          const int cur = a.n_tensors - 1;
          for (int k = 0; k < K; ++k) a.ptr[k][0] = a.ptr[k][cur];
          a.numel[0] = a.numel[cur];
          a.offset[0] = a.offset[cur];
          a.n_tensors = 1;
        }
      }
    }
  }
  if (a.n_blocks > 0) {
    launch(static_cast<const Args&>(a));
    ++launches;
  }
  return launches;
}

// The blocks a tensor list takes over all its launches (the norm's partial count).
template <typename NumelOf, typename OffsetOf>
int64_t total_blocks(int64_t T, const NumelOf& numel_of, const OffsetOf& offset_of,
                     int64_t chunk, bool frame) {
  int64_t n = 0;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t e = numel_of(t);
    if (e > 0) n += (extent_of(e, offset_of(t), frame) + chunk - 1) / chunk;
  }
  return n;
}

// Per-tensor segments of a sequence of per-block values (the squared norm's partials):
// output entry out0 + i is the sum of partial[first[i], first[i + 1]), i < n. By value too.
struct SegArgs {
  static constexpr int kSegs = 256;
  int64_t first[kSegs + 1];
  int64_t out0;
  int32_t n;
};
static_assert(sizeof(SegArgs) <= 3584, "SegArgs fits the parameter block");

}  // namespace launch
}  // namespace cuda_impl
}  // namespace fused_flat
