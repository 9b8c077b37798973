// fused_flat/cuda/multi_args.cuh -- host side of the tensor-list CUDA ops (multi_langevin.cu,
// sam_cuda.cu): the list checks, the device-resident scalars and the launches, whose
// arguments list_launch.h builds by value (no device tables, no host->device copy).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <vector>

#include "../list_args.h"
#include "fused_flat/op_args.h"
#include "list_launch.h"
#include "sam_multi.cuh"   // multi::DevScalar

namespace fused_flat {
namespace cuda_impl {
namespace multi_args {

// The lists of one call: same length, 1-D contiguous, one floating dtype, one CUDA device,
// equal numels across lists; `layout` (a CPU step plan) refused. Returns the list length.
inline int64_t check_lists(const char* op, const std::vector<const at::TensorList*>& lists,
                           const c10::optional<at::Tensor>& layout = c10::nullopt) {
  TORCH_CHECK_VALUE(!layout.has_value(), "fused_flat.", op, ": layout= (a step plan) is CPU-only; "
                    "on CUDA the list ops take 1-D contiguous tensors (flat views), without a layout");
  const at::TensorList& ref = *lists[0];
  const int64_t T = static_cast<int64_t>(ref.size());
  if (T == 0) return 0;
  const at::Tensor& t0 = ref[0];
  TORCH_CHECK(t0.is_cuda(), "fused_flat.", op, ": tensors must be on a CUDA device, got ", t0.device());
  for (size_t k = 0; k < lists.size(); ++k) {
    const at::TensorList& l = *lists[k];
    TORCH_CHECK_VALUE(static_cast<int64_t>(l.size()) == T, "fused_flat.", op, ": tensor list ", k,
                      " has ", l.size(), " tensors, expected ", T, " (one per param)");
    for (int64_t t = 0; t < T; ++t) {
      check_bucket(l[t], op);
      TORCH_CHECK_VALUE(l[t].scalar_type() == t0.scalar_type() && l[t].device() == t0.device() &&
                            l[t].numel() == ref[t].numel(),
                        "fused_flat.", op, ": list ", k, " tensor ", t, " must be ", t0.scalar_type(),
                        " on ", t0.device(), " with ", ref[t].numel(), " elements; got ",
                        l[t].scalar_type(), " on ", l[t].device(), " with ", l[t].numel());
    }
  }
  return T;
}

// offsets: one per tensor, >= 0 (empty allowed where `optional`: every offset 0).
inline void check_offsets(const char* op, at::IntArrayRef offsets, int64_t T, bool optional) {
  TORCH_CHECK_VALUE(static_cast<int64_t>(offsets.size()) == T || (optional && offsets.empty()),
                    "fused_flat.", op, ": ", T, " tensors but ", offsets.size(), " offsets");
  for (int64_t o : offsets)
    TORCH_CHECK_VALUE(o >= 0, "fused_flat.", op, ": offsets must be >= 0, got ", o);
}

// Device-resident per-step scalars (CUDA-graph capture): an optional one-element tensor on
// the lists' device (list_args.h's check); nullptr when absent (the kernels then use their
// scalar arguments).
inline const int64_t* step_scalar(const char* op, const c10::optional<at::Tensor>& t,
                                  const at::Tensor& ref) {
  check_step_arg(t, ref.device(), op);
  return t.has_value() ? t->data_ptr<int64_t>() : nullptr;
}

inline multi::DevScalar float_scalar(const char* op, const c10::optional<at::Tensor>& t,
                                     const at::Tensor& ref, const char* name) {
  check_float_arg(t, ref.device(), op, name);
  if (!t.has_value()) return multi::DevScalar{nullptr, false};
  return multi::DevScalar{t->data_ptr(), t->scalar_type() == at::kDouble};
}

inline cudaStream_t stream_of(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.get_device()).stream();
}

// Plans the launches of K lists (list_launch.h) and calls launch(const ListArgs<K>&) for
// each: tensor t's bucket offset offsets[t] (0 when offsets is empty), units frame
// positions when `frame` (the Langevin kernels) else elements.
template <int K, typename Launch>
int64_t for_each_launch(const std::vector<const at::TensorList*>& lists, at::IntArrayRef offsets,
                        bool frame, const Launch& launch) {
  TORCH_INTERNAL_ASSERT(static_cast<int>(lists.size()) == K);
  const at::TensorList& ref = *lists[0];
  return launch::plan_launches<K>(
      static_cast<int64_t>(ref.size()), [&](int64_t t) { return ref[t].numel(); },
      [&](int64_t t) { return offsets.empty() ? int64_t(0) : offsets[t]; },
      [&](int k, int64_t t) { return (*lists[k])[t].data_ptr(); }, launch::kChunk, frame, launch);
}

}  // namespace multi_args
}  // namespace cuda_impl
}  // namespace fused_flat
