// csrc/cpu/plan_args.h -- the argument checks of the CPU list ops when they run a step plan
// (fused_flat.optim.core.StepPlan) over the user's own tensors: any shape, dense (non-overlapping,
// any memory format), each element taken in memory order.
//
// A plan records every list it hands to an op once, with plan_layout (the record below);
// the ops check the list against it before they touch anything, so a parameter that changed
// dtype, shape, memory format or requires_grad since the plan was built is refused (a stale
// plan: the optimizer then runs its general path, which rebuilds the buckets). Gradients
// are checked against their parameter (strided, same shape, dtype and device: the meaning of
// the optimizer's own messages); one laid out otherwise is copied into the parameter's
// memory order, as fused_flat.optim.buckets.flat_like does. State tensors (momentum buffers,
// backups) must already share the parameter's layout.
//
// Only the CPU translation units include this header (no CUDA TU depends on it).
#pragma once
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <sstream>
#include <string>
#include <vector>

namespace fused_flat {
namespace plan {

// Record: int64 [3 + sum_t (2 + 2 * dim_t)] =
//   kMagic, T, dtype, then per tensor: flags (bit 0: requires_grad), dim, sizes..., strides...
constexpr int64_t kMagic = 0x46465031;  // "FFP1"
constexpr int64_t kRequiresGrad = 1;

inline std::string shape_str(at::IntArrayRef s) {
  std::ostringstream o;
  o << "(";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << (s.size() == 1 ? ",)" : ")");
  return o.str();
}

inline std::string dtype_str(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    default: return std::string("torch.") + c10::toString(t);
  }
}

inline std::string layout_str(c10::Layout l) {
  switch (l) {
    case c10::kStrided: return "torch.strided";
    case c10::kSparse: return "torch.sparse_coo";
    case c10::kSparseCsr: return "torch.sparse_csr";
    case c10::kSparseCsc: return "torch.sparse_csc";
    case c10::kSparseBsr: return "torch.sparse_bsr";
    case c10::kSparseBsc: return "torch.sparse_bsc";
    case c10::kJagged: return "torch.jagged";
    default: {
      std::ostringstream o;
      o << l;
      return o.str();
    }
  }
}

// Whether element e in memory order is the same logical element of a and b (same shape):
// fused_flat.optim.buckets.same_layout.
inline bool same_order(const at::Tensor& a, const at::Tensor& b) {
  if (a.is_contiguous() && b.is_contiguous()) return true;
  const auto sa = a.strides(), sb = b.strides(), n = a.sizes();
  for (size_t d = 0; d < n.size(); ++d) {
    if (n[d] != 1 && sa[d] != sb[d]) return false;
  }
  return true;
}

// A tensor a plan may hand to the kernels: CPU, strided, floating point, dense.
inline void check_plan_tensor(const at::Tensor& t, const char* op) {
  TORCH_CHECK_VALUE(t.layout() == c10::kStrided, "fused_flat.", op, ": a tensor with layout ",
                    layout_str(t.layout()), "; the list ops need dense (torch.strided) tensors");
  TORCH_CHECK_VALUE(t.device().is_cpu(), "fused_flat.", op, ": CPU tensors expected, got ", t.device());
  TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()), "fused_flat.", op,
                    ": tensors must be floating point (fp32/fp64/bf16/fp16), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.is_non_overlapping_and_dense(), "fused_flat.", op, ": a tensor of shape ",
                    shape_str(t.sizes()), " with strides ", t.strides(),
                    " is not dense (a strided view of a larger tensor)");
}

// The record of a list (every tensor checked with check_plan_tensor; one dtype).
inline at::Tensor make_layout(at::TensorList ts) {
  std::vector<int64_t> r{kMagic, static_cast<int64_t>(ts.size()),
                         ts.empty() ? int64_t(-1) : static_cast<int64_t>(ts[0].scalar_type())};
  for (const at::Tensor& t : ts) {
    check_plan_tensor(t, "plan_layout");
    TORCH_CHECK_VALUE(t.scalar_type() == ts[0].scalar_type(),
                      "fused_flat.plan_layout: every tensor of a list must have one dtype, got ",
                      ts[0].scalar_type(), " and ", t.scalar_type());
    r.push_back(t.requires_grad() ? kRequiresGrad : 0);
    r.push_back(t.dim());
    for (int64_t s : t.sizes()) r.push_back(s);
    for (int64_t s : t.strides()) r.push_back(s);
  }
  at::Tensor out = at::empty({static_cast<int64_t>(r.size())}, at::TensorOptions().dtype(at::kLong));
  std::copy(r.begin(), r.end(), out.data_ptr<int64_t>());
  return out;
}

[[noreturn]] inline void stale(const char* op, size_t t, const std::string& what) {
  TORCH_CHECK_VALUE(false, "fused_flat.", op, ": stale step plan: tensor ", t, " ", what,
                    " since plan_layout recorded the list; build the plan again");
  __builtin_unreachable();
}

// ts against its record: the same tensors' metadata (count, dtype, requires_grad, shape,
// strides) and still dense CPU tensors. Reads metadata only.
inline void check_layout(at::TensorList ts, const at::Tensor& layout, const char* op) {
  TORCH_CHECK_VALUE(layout.scalar_type() == at::kLong && layout.dim() == 1 &&
                        layout.is_contiguous() && layout.device().is_cpu() && layout.numel() >= 3,
                    "fused_flat.", op, ": layout must be the int64 record made by plan_layout");
  const int64_t* r = layout.data_ptr<int64_t>();
  const int64_t n = layout.numel();
  TORCH_CHECK_VALUE(r[0] == kMagic, "fused_flat.", op, ": layout must be the int64 record made by plan_layout");
  TORCH_CHECK_VALUE(r[1] == static_cast<int64_t>(ts.size()), "fused_flat.", op, ": stale step plan: ",
                    ts.size(), " tensors given, ", r[1], " recorded");
  int64_t pos = 3;
  for (size_t t = 0; t < ts.size(); ++t) {
    const at::Tensor& x = ts[t];
    if (!x.defined() || x.layout() != c10::kStrided || !x.device().is_cpu()) {
      check_plan_tensor(x, op);   // raises with the reason
    }
    if (static_cast<int64_t>(x.scalar_type()) != r[2]) stale(op, t, "changed dtype");
    const int64_t dim = x.dim();
    TORCH_CHECK_VALUE(pos + 2 + 2 * dim <= n, "fused_flat.", op, ": stale step plan: tensor ", t,
                      " changed shape since plan_layout recorded the list; build the plan again");
    if (r[pos] != (x.requires_grad() ? kRequiresGrad : 0)) stale(op, t, "changed requires_grad");
    if (r[pos + 1] != dim) stale(op, t, "changed shape");
    const auto sz = x.sizes(), st = x.strides();
    for (int64_t d = 0; d < dim; ++d) {
      if (r[pos + 2 + d] != sz[d]) stale(op, t, "changed shape");
      if (r[pos + 2 + dim + d] != st[d]) stale(op, t, "changed memory layout");
    }
    pos += 2 + 2 * dim;
  }
  TORCH_CHECK_VALUE(pos == n, "fused_flat.", op, ": stale step plan: the record does not match the list");
}

// The checks the optimizers make of p.grad (fused_flat.optim.core.FlatOptimizer._grads): strided,
// same shape, dtype and device as its parameter. ValueError, as there.
inline void check_grad(const at::Tensor& p, const at::Tensor& g) {
  TORCH_CHECK_VALUE(g.layout() == c10::kStrided, "fused_flat: a gradient with layout ",
                    layout_str(g.layout()), " (of a parameter of shape ", shape_str(p.sizes()),
                    "): sparse gradients are not supported, the fused kernels need dense "
                    "(torch.strided) ones. Use a dense embedding (nn.Embedding(..., sparse=False)), "
                    "or densify the gradient before step(): p.grad = p.grad.to_dense()");
  TORCH_CHECK_VALUE(g.sizes() == p.sizes() && g.scalar_type() == p.scalar_type() &&
                        g.device() == p.device(),
                    "fused_flat: a gradient of ", shape_str(g.sizes()), " ", dtype_str(g.scalar_type()),
                    " on ", g.device(), " does not match its parameter (", shape_str(p.sizes()), " ",
                    dtype_str(p.scalar_type()), " on ", p.device(), ")");
}

// g (checked) as the kernels read it: in p's memory order; a gradient laid out otherwise
// (or not dense) is copied into p's layout (fused_flat.optim.buckets.flat_like).
inline at::Tensor grad_in_order(const at::Tensor& p, const at::Tensor& g) {
  check_grad(p, g);
  if (g.is_non_overlapping_and_dense() && same_order(g, p)) return g;
  at::Tensor out = at::empty_like(p);
  out.copy_(g);
  return out;
}

// A state tensor (momentum buffer, backup) of p: its shape, dtype, device and memory order.
inline void check_state(const at::Tensor& p, const at::Tensor& s, const char* name, const char* op) {
  TORCH_CHECK_VALUE(s.layout() == c10::kStrided && s.sizes() == p.sizes() &&
                        s.scalar_type() == p.scalar_type() && s.device() == p.device() &&
                        s.is_non_overlapping_and_dense() && same_order(s, p),
                    "fused_flat.", op, ": ", name, " must match its parameter (shape ",
                    shape_str(p.sizes()), ", strides ", p.strides(), ", ", p.scalar_type(), ", ",
                    p.device(), "); got shape ", shape_str(s.sizes()), ", ", s.scalar_type(), ", ",
                    s.device());
}

}  // namespace plan
}  // namespace fused_flat
