// fused_flat/op_args.h -- argument checks shared by the CPU and CUDA op implementations.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "fused_flat/elementwise.h"

namespace fused_flat {

inline void check_bucket(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous(), "fused_flat: ", name,
              " must be a contiguous 1-D bucket, got shape ", t.sizes(), " strides ", t.strides());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "fused_flat: ", name,
              " must be floating point (fp32/fp64/bf16/fp16), got ", t.scalar_type());
  TORCH_CHECK(!t.is_sparse(), "fused_flat: ", name, " must be dense");
}

inline void check_like(const at::Tensor& param, const at::Tensor& other, const char* name) {
  check_bucket(other, name);
  TORCH_CHECK(other.numel() == param.numel() && other.scalar_type() == param.scalar_type() &&
                  other.device() == param.device(),
              "fused_flat: ", name, " must match the parameter bucket (numel ", param.numel(), ", ",
              param.scalar_type(), ", ", param.device(), "); got numel ", other.numel(), ", ",
              other.scalar_type(), ", ", other.device());
}

inline void check_scalar_tensor(const c10::optional<at::Tensor>& t, const at::Tensor& param,
                                const char* name) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->numel() == 1 && t->scalar_type() == at::kFloat && t->device() == param.device(),
              "fused_flat: ", name, " must be a one-element float32 tensor on ", param.device(),
              ", got ", t->numel(), " elements of ", t->scalar_type(), " on ", t->device());
}

// seed < 2^63, bucket_id < 2^24 and tag < 256 (-1: no tag) fit the noise layout (elementwise.h).
inline void check_noise_args(int64_t seed, int64_t bucket_id, int64_t offset, int64_t tag) {
  TORCH_CHECK(seed >= 0, "fused_flat: seed must be in [0, 2^63), got ", seed);
  TORCH_CHECK(bucket_id >= 0 && bucket_id < kBucketLimit,
              "fused_flat: bucket_id must be in [0, 2^24), got ", bucket_id,
              " (noise layout 3 keeps it in 24 bits of the Philox counter)");
  TORCH_CHECK(offset >= 0, "fused_flat: offset must be >= 0, got ", offset);
  TORCH_CHECK(tag >= -1 && tag < kTagLimit, "fused_flat: tag must be in [-1, 256), got ", tag);
}

}  // namespace fused_flat
