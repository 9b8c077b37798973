// fused_flat/cuda/multi_args.cuh -- host-side argument checks of the multi-tensor CUDA ops
// (sam_cuda.cu, multi_langevin.cu): one place for the list and table contract.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <limits>
#include <vector>

#include "fused_flat/op_args.h"
#include "sam_multi.cuh"   // multi::DevScalar

namespace fused_flat {
namespace cuda_impl {
namespace multi_args {

struct Tables {
  const int64_t* chunks;
  const int64_t* meta;
  const int64_t* ptrs;
  int64_t T;
  int64_t n_chunks;
  int64_t chunk;
};

// The lists: same length, 1-D contiguous, one floating dtype, one CUDA device, equal numels
// across lists. The tables: int64 on that device, shapes [n_chunks, 2], [T, 2], [K, T].
// Their contents are trusted (fused_flat.backends.multi_tensor builds them from these very lists).
inline Tables check_args(const char* op, const std::vector<const at::TensorList*>& lists,
                  const at::Tensor& chunks, const at::Tensor& meta, const at::Tensor& ptrs,
                  int64_t chunk) {
  const at::TensorList& ref = *lists[0];
  const int64_t T = static_cast<int64_t>(ref.size());
  TORCH_CHECK(T > 0, "fused_flat.", op, ": empty tensor list");
  const at::Tensor& t0 = ref[0];
  TORCH_CHECK(t0.is_cuda(), "fused_flat.", op, ": tensors must be on a CUDA device, got ", t0.device());
  for (size_t k = 0; k < lists.size(); ++k) {
    const at::TensorList& l = *lists[k];
    TORCH_CHECK(static_cast<int64_t>(l.size()) == T, "fused_flat.", op, ": tensor list ", k,
                " has ", l.size(), " tensors, expected ", T);
    for (int64_t t = 0; t < T; ++t) {
      check_bucket(l[t], op);
      TORCH_CHECK(l[t].scalar_type() == t0.scalar_type() && l[t].device() == t0.device() &&
                      l[t].numel() == ref[t].numel(),
                  "fused_flat.", op, ": list ", k, " tensor ", t, " must be ", t0.scalar_type(),
                  " on ", t0.device(), " with ", ref[t].numel(), " elements; got ",
                  l[t].scalar_type(), " on ", l[t].device(), " with ", l[t].numel());
    }
  }
  auto table_ok = [&](const at::Tensor& x, int64_t rows, int64_t cols, const char* name) {
    TORCH_CHECK(x.scalar_type() == at::kLong && x.device() == t0.device() && x.is_contiguous() &&
                    x.dim() == 2 && (rows < 0 || x.size(0) == rows) && x.size(1) == cols,
                "fused_flat.", op, ": ", name, " must be a contiguous int64 [", rows, ", ", cols,
                "] tensor on ", t0.device(), ", got ", x.scalar_type(), " ", x.sizes(), " on ",
                x.device(), " (build it with fused_flat.backends.multi_tensor)");
  };
  table_ok(chunks, -1, 2, "chunks");
  table_ok(meta, T, 2, "meta");
  table_ok(ptrs, static_cast<int64_t>(lists.size()), T, "ptrs");
  TORCH_CHECK(chunk > 0 && chunk % 16 == 0, "fused_flat.", op, ": chunk must be a positive multiple of 16, got ", chunk);
  TORCH_CHECK(chunks.size(0) <= std::numeric_limits<int>::max(), "fused_flat.", op, ": too many chunks");
  return Tables{chunks.data_ptr<int64_t>(), meta.data_ptr<int64_t>(), ptrs.data_ptr<int64_t>(), T,
                chunks.size(0), chunk};
}

// Device-resident per-step scalars (CUDA-graph capture): an optional one-element tensor on
// the lists' device; nullptr when absent (the kernels then use their scalar arguments).
inline const int64_t* step_scalar(const char* op, const c10::optional<at::Tensor>& t,
                                  const at::Tensor& ref) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->numel() == 1 && t->scalar_type() == at::kLong && t->device() == ref.device(),
              "fused_flat.", op, ": step_t must be a one-element int64 tensor on ", ref.device(),
              ", got ", t->numel(), " elements of ", t->scalar_type(), " on ", t->device());
  return t->data_ptr<int64_t>();
}

inline multi::DevScalar float_scalar(const char* op, const c10::optional<at::Tensor>& t,
                                     const at::Tensor& ref, const char* name) {
  if (!t.has_value()) return multi::DevScalar{nullptr, false};
  TORCH_CHECK(t->numel() == 1 &&
                  (t->scalar_type() == at::kDouble || t->scalar_type() == at::kFloat) &&
                  t->device() == ref.device(),
              "fused_flat.", op, ": ", name, " must be a one-element float64 (or float32) tensor on ",
              ref.device(), ", got ", t->numel(), " elements of ", t->scalar_type(), " on ",
              t->device());
  return multi::DevScalar{t->data_ptr(), t->scalar_type() == at::kDouble};
}

inline cudaStream_t stream_of(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.get_device()).stream();
}

}  // namespace multi_args
}  // namespace cuda_impl
}  // namespace fused_flat
