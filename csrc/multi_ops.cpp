// Op schemas of the multi-tensor (tensor-list) ops: one launch per bucket per pass.
// A fragment of the fused_flat library. Kernels: csrc/cuda/sam_cuda.cu and
// csrc/cuda/multi_langevin.cu (CUDA dispatch key only); Python entry points with list
// signatures: fused_flat/backends/cuda_sam.py and fused_flat/backends/cuda.py, which build the launch
// tables with fused_flat.backends.multi_tensor:
//   chunks  int64 [n_chunks, 2]  rows (tensor index, first element); one block per row
//   meta    int64 [T, 2]         rows (numel, bucket offset of element 0)
//   ptrs    int64 [K, T]         data_ptr() of each tensor of each of the K list arguments
//   chunk   elements per row (a positive multiple of 16)
// Every list holds 1-D contiguous tensors of one floating dtype on one device; the lists
// of one call have equal lengths and numels. An empty optional list (params of the norm,
// moms of the step) means "absent".
// Device-resident per-step scalars (CUDA-graph capture; the trailing Tensor? arguments):
// step_t a one-element int64 tensor, lr_t / noise_std_t one-element float64 (or float32)
// tensors, on the lists' device. When given, the kernel reads the value from device memory
// (no host read) and ignores the scalar argument of the same name; the value is converted
// as the scalar path converts its double (step: its low 32 bits), so results are identical.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fused_flat, m) {
  // sum of t_i^2 over all elements of all tensors, float64 0-dim on the device; t = g, or
  // (|theta| + eta) g when params is non-empty (ASAM). Deterministic: fixed per-chunk
  // partials, summed on the device.
  m.def("sam_grad_sq_norm_multi(Tensor[] grads, Tensor[] params, Tensor chunks, Tensor meta, "
        "Tensor ptrs, int chunk, float eta) -> Tensor");
  // backup <- theta ; theta <- theta + (c * s) * g, s = (|theta| + eta)^2 if adaptive else 1;
  // c = coef_tensor (1-element float64, read on the device) if given, else coef.
  m.def("sam_perturb_multi_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] backups, "
        "Tensor chunks, Tensor meta, Tensor ptrs, int chunk, bool adaptive, float coef, "
        "Tensor? coef_tensor, float eta) -> ()");
  // theta <- backup, then torch.optim.SGD's step with g * grad_mult [/ grad_scale]; a set
  // found_inf only restores (momentum untouched). Both scalars are read on the device.
  // stochastic_rounding (bf16/fp16; ignored otherwise): theta stored as SR(theta), rbits of
  // tags 0 and 32 of (seed, bucket_id, step) at bucket index meta[t].offset + e.
  m.def("sam_restore_and_step_multi_(Tensor(a!)[] params, Tensor[] backups, Tensor[] grads, "
        "Tensor(b!)[] moms, Tensor? grad_scale, Tensor? found_inf, Tensor chunks, Tensor meta, "
        "Tensor ptrs, int chunk, float lr, float weight_decay, float momentum, float dampening, "
        "bool nesterov, bool momentum_init, float grad_mult, bool stochastic_rounding=False, "
        "int seed=0, int bucket_id=0, int step=0, Tensor? lr_t=None, Tensor? step_t=None) -> ()");
  // RW-SAM probe: backup <- theta ; theta <- theta + delta * v_i, v the Rademacher sign of
  // bucket index i = meta[t].offset + e (tag 16, noise layout 3: top bit of x_(i & 3) of
  // Philox call i >> 2).
  m.def("sam_probe_multi_(Tensor(a!)[] params, Tensor(b!)[] backups, Tensor chunks, "
        "Tensor meta, Tensor ptrs, int chunk, int seed, int bucket_id, int step, float delta, "
        "Tensor? step_t=None) -> ()");

  // ---- Langevin passes (issue 12). Their tables are built for the call frame
  // (fused_flat.backends.multi_tensor.frame_plan): meta row t = (numel_t + (offset_t & 3), offset_t),
  // chunk rows over those frame sizes (csrc/cuda/multi_langevin.cuh). Noise layout 3.
  // theta <- theta + sigma * eps(tag) at bucket indices offset_t + e.
  m.def("perturb_multi_(Tensor(a!)[] params, Tensor chunks, Tensor meta, Tensor ptrs, int chunk, "
        "int seed, int bucket_id, int step, int tag, float sigma, Tensor? step_t=None) -> ()");
  // The fused restore + decay + momentum + Langevin + update pass (fused_flat.backends.reference's
  // restore_and_step_ per tensor); an empty moms list: no momentum. grad_scale / found_inf
  // are read on the device; a set found_inf only restores (momentum untouched).
  // stochastic_rounding (bf16/fp16; ignored otherwise): theta stored as SR(theta) with the
  // rbits of tags 0 and 32 of (seed, bucket_id, step) at bucket index offset_t + e (the
  // per-tensor restore_and_step_'s). A noise_std_t always draws xi (pass noise_std = 0.0).
  m.def("restore_and_step_multi_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] moms, "
        "Tensor? grad_scale, Tensor? found_inf, Tensor chunks, Tensor meta, Tensor ptrs, "
        "int chunk, int seed, int bucket_id, int step, int restore_tag, float sigma, float lr, "
        "float weight_decay, float momentum, float dampening, bool nesterov, bool momentum_init, "
        "float noise_std, float grad_mult, bool stochastic_rounding=False, Tensor? step_t=None, "
        "Tensor? lr_t=None, Tensor? noise_std_t=None) -> ()");
  // float32 [1]: 1.0 if any element of any tensor is inf or NaN. Plain (element) tables.
  // scratch: a zeroed int32 [2] (flag, blocks done), left zeroed; one per device and stream.
  m.def("all_finite_multi(Tensor[] tensors, Tensor chunks, Tensor meta, Tensor ptrs, int chunk, "
        "Tensor(a!) scratch) -> Tensor");
}
