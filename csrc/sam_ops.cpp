// Op schemas of the SAM family (ALGORITHMS.md §3). A fragment of the fused_flat library:
// the core ops are declared in bindings.cpp. Kernels: csrc/cpu/sam_cpu.cpp and
// csrc/cuda/sam_cuda.cu (every op has both).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fused_flat, m) {
  // The SAM passes over a list of tensors (a bucket) in one parallel loop (CPU) or one
  // launch (CUDA), one dtype per call. Without `layout` every tensor is a contiguous 1-D
  // view (a flat bucket); with it (fused_flat::plan_layout's record of params: a step plan,
  // CPU only) they are the user's own, of any shape, dense, walked in memory order: params
  // must match the record, each gradient its parameter (read in the parameter's order),
  // each backup / momentum buffer its parameter's shape, dtype and layout.
  // sam_grad_sq_norm_list: float64 [T], entry t = sum_i s_i^2, s = g (SAM/USAM) or
  // (|theta| + eta) g (ASAM: adaptive, params[t]); fixed-size blocks summed in order,
  // independent of the thread count (params may be empty when not adaptive and without a
  // layout).
  m.def("sam_grad_sq_norm_list(Tensor[] grads, Tensor[] params, bool adaptive, float eta, "
        "Tensor? layout=None) -> Tensor");
  // sam_perturb_list_: backup <- theta ; theta <- theta + (coef * s) * g, s = (|theta| + eta)^2
  // if adaptive else 1.
  m.def("sam_perturb_list_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] backups, "
        "bool adaptive, float coef, float eta, Tensor? layout=None, Tensor? coef_tensor=None) -> ()");
  // coef_tensor: a one-element float64 tensor on the lists' device that replaces coef (on
  // CUDA read by the kernel: the global norm never leaves the GPU). lr_t / step_t below: as
  // the Langevin list ops' (bindings.cpp).
  // sam_restore_and_step_list_: theta <- backup, then torch.optim.SGD's step with
  // g2 * grad_mult [/ grad_scale] (weight decay, momentum, dampening, nesterov); a set
  // found_inf restores only. stochastic_rounding: bf16/fp16 params get SR(theta)
  // (ALGORITHMS.md §1) with the rbits of tags 0 and 32 of (seed, bucket_id, step) at bucket
  // index offsets[t] + e. offsets: each tensor's bucket offset (needed with
  // stochastic_rounding; may be empty else).
  m.def("sam_restore_and_step_list_(Tensor(a!)[] params, Tensor[] backups, Tensor[] grads, "
        "Tensor(b!)[] moms, Tensor? grad_scale, Tensor? found_inf, float lr, float weight_decay, "
        "float momentum, float dampening, bool nesterov, bool momentum_init, float grad_mult, "
        "bool stochastic_rounding=False, int seed=0, int bucket_id=0, int step=0, "
        "int[] offsets=[], Tensor? layout=None, Tensor? lr_t=None, Tensor? step_t=None) -> ()");
  // RW-SAM probe: backup <- theta ; theta <- theta + delta * v, v Rademacher (tag 16) of
  // bucket element offsets[t] + e.
  m.def("sam_probe_list_(Tensor(a!)[] params, Tensor(b!)[] backups, int[] offsets, int seed, "
        "int bucket_id, int step, float delta, Tensor? step_t=None) -> ()");
}
