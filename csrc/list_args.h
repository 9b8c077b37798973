// csrc/list_args.h -- argument checks that the CPU and CUDA implementations of one op share
// (beyond fused_flat/op_args.h): the per-step scalar tensors of the list ops (step_t, lr_t,
// noise_std_t, coef_tensor; schemas: bindings.cpp, sam_ops.cpp), one contract for both
// devices -- an optional one-element tensor on the lists' device, int64 for a step, float64
// (or float32 where allowed) for a float; the CPU kernels read its value when the op runs
// (host_value), the CUDA kernels get its pointer and read it on the device -- and the
// arguments of perturb_from_.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include "fused_flat/op_args.h"

namespace fused_flat {

// A present scalar tensor must be one element of `dtype` (or, with also_float, float32 too)
// on `device`; else a ValueError that says what was given and what to pass.
inline void check_scalar_arg(const c10::optional<at::Tensor>& t, const c10::Device& device,
                             const char* op, const char* name, at::ScalarType dtype,
                             bool also_float = false) {
  if (!t.has_value()) return;
  const bool dtype_ok = t->scalar_type() == dtype || (also_float && t->scalar_type() == at::kFloat);
  TORCH_CHECK_VALUE(t->numel() == 1 && dtype_ok && t->device() == device, "fused_flat.", op, ": ",
                    name, " must be a one-element ", dtype, also_float ? " (or Float)" : "",
                    " tensor on ", device, " (the lists' device), got ", t->numel(),
                    " elements of ", t->scalar_type(), " on ", t->device());
}

inline void check_step_arg(const c10::optional<at::Tensor>& t, const c10::Device& device,
                           const char* op) {
  check_scalar_arg(t, device, op, "step_t", at::kLong);
}

inline void check_float_arg(const c10::optional<at::Tensor>& t, const c10::Device& device,
                            const char* op, const char* name) {
  check_scalar_arg(t, device, op, name, at::kDouble, /*also_float=*/true);
}

// CPU: the value a scalar tensor holds (converted as the number argument would be), or the
// number itself when the tensor is absent.
inline int64_t host_value(int64_t number, const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->item<int64_t>() : number;
}

inline double host_value(double number, const c10::optional<at::Tensor>& t) {
  if (!t.has_value()) return number;
  return t->scalar_type() == at::kDouble ? t->item<double>() : static_cast<double>(t->item<float>());
}

// perturb_from_: param (bf16 / fp16 / fp32) and its float32 master, 1-D buckets of one numel
// on one device; the noise arguments of layout 3 with a real tag.
inline void check_perturb_from_args(const at::Tensor& param, const at::Tensor& master,
                                    int64_t seed, int64_t bucket_id, int64_t tag, int64_t offset) {
  check_bucket(param, "param");
  check_bucket(master, "master");
  TORCH_CHECK(master.scalar_type() == at::kFloat && master.numel() == param.numel() &&
                  master.device() == param.device(),
              "fused_flat.perturb_from_: master must be float32 with the param's numel (",
              param.numel(), ") on ", param.device(), ", got ", master.scalar_type(), " numel ",
              master.numel(), " on ", master.device());
  TORCH_CHECK(param.scalar_type() == at::kBFloat16 || param.scalar_type() == at::kHalf ||
                  param.scalar_type() == at::kFloat,
              "fused_flat.perturb_from_: param must be bf16, fp16 or fp32, got ", param.scalar_type());
  check_noise_args(seed, bucket_id, offset, tag);
  TORCH_CHECK(tag >= 0, "fused_flat.perturb_from_: tag must be >= 0, got ", tag);
}

}  // namespace fused_flat
