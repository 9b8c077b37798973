// Op schemas (the one place they are declared) and the small pybind11 module that
// reports how the extension was built. Kernels live in csrc/cpu and csrc/cuda.
#include <pybind11/pybind11.h>
#include <string>
#include <torch/library.h>

TORCH_LIBRARY(fused_flat, m) {
  // The Langevin passes over a list of tensors (a bucket) in one parallel loop (CPU) or one
  // launch (CUDA): tensor t's element 0 is bucket index offsets[t]; one dtype per call; moms
  // empty = no momentum. perturb_list_: theta <- theta + sigma * eps(tag). restore_and_step_list_:
  // the fused restore + weight decay + momentum + Langevin noise + SGD update (ALGORITHMS.md
  // §2); stochastic_rounding: bf16/fp16 params get the SR of the fp32 result (ALGORITHMS.md
  // §1, rbits from tags 0 and 32); ignored for fp32/fp64. Without `layout` every tensor is
  // a contiguous 1-D view (a flat bucket); with it (plan_layout's record of params: a step
  // plan, fused_flat.optim.core.StepPlan) the tensors are the user's own, of any shape, dense,
  // walked in memory order: params must match the record, each gradient its parameter
  // (strided, same shape, dtype and device; one laid out otherwise is read through a copy in
  // the parameter's order), each momentum buffer its parameter's shape, dtype and layout.
  // Both devices (CPU: csrc/cpu/kernels_cpu.cpp; CUDA: csrc/cuda/multi_langevin.cu, one
  // launch per bucket and pass, its launch arguments passed by value: csrc/cuda/list_launch.h).
  // `layout` is CPU-only. Per-step scalars as one-element tensors (torch.compile, CUDA-graph
  // capture): step_t int64, lr_t / noise_std_t float64 or float32, on the lists' device;
  // given, they replace the number of the same name (CUDA: read by the kernel, no host read;
  // CPU: read when the op runs), converted as the number is (step: its low 32 bits enter the
  // counter), so results are identical. On CUDA a noise_std_t always draws xi.
  m.def("perturb_list_(Tensor(a!)[] params, int[] offsets, int seed, int bucket_id, int step, "
        "int tag, float sigma, Tensor? layout=None, Tensor? step_t=None) -> ()");
  m.def("restore_and_step_list_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] moms, "
        "int[] offsets, Tensor? grad_scale, Tensor? found_inf, int seed, int bucket_id, "
        "int step, int restore_tag, float sigma, float lr, float weight_decay, float momentum, "
        "float dampening, bool nesterov, bool momentum_init, float noise_std, float grad_mult, "
        "bool stochastic_rounding=False, Tensor? layout=None, Tensor? step_t=None, "
        "Tensor? lr_t=None, Tensor? noise_std_t=None) -> ()");
  // The restore half of a checked step (fp32, CPU): params[t] <- params[t] + sigma * eps(tag)
  // (sigma = minus the perturbation's) and, in the same loop, found_inf (float32 [1]) = 1.0
  // if any element of any grads[t] is inf/NaN. The update then runs with sigma 0. `layout`:
  // as above.
  m.def("restore_check_list_(Tensor(a!)[] params, Tensor[] grads, int[] offsets, int seed, "
        "int bucket_id, int step, int tag, float sigma, Tensor? layout=None) -> Tensor");
  // Step plans (CPU). plan_layout: the record (int64) of a list of dense CPU tensors of one
  // floating dtype -- per tensor requires_grad, shape and strides -- that the list ops take
  // as `layout`. check_step_list: the first pass of a planned step over a bucket, which
  // writes nothing: params (all of the bucket's) against their record and, when grads are
  // given (one per param, None where there is none), each gradient against its parameter
  // (strided, same shape, dtype and device; else ValueError) and present exactly where
  // has_grad (bool [T], the plan's) says. Returns found_inf, float32 [1]: 1.0 if `finite` and
  // any element of a gradient is inf or nan. A list that no longer matches its record is a
  // stale plan (ValueError): the optimizer then takes its general path and builds a new plan.
  m.def("plan_layout(Tensor[] tensors) -> Tensor");
  m.def("check_step_list(Tensor[] params, Tensor layout, Tensor?[] grads, Tensor? has_grad, "
        "bool finite) -> Tensor");
  // param (16-bit) <- round-to-nearest(master + sigma * eps(tag)), fp32 math (master fp32 or
  // fp64; param any floating dtype), elements [offset, offset + numel) of the bucket.
  m.def("perturb_from_(Tensor(a!) param, Tensor master, int seed, int bucket_id, int step, "
        "int tag, float sigma, int offset=0) -> ()");
  // Inspection of the noise stream, layout version 3 (tests, cross-backend checks):
  // Philox words of calls [first_call, first_call + n_calls) as int64 [n_calls, 4] (call j
  // serves elements 4j..4j+3); z(tag, i) of elements [offset, offset + n), float32;
  // w(tag, i) = x_(i & 3) of those elements, int64; and (z(tag, i), z(32, i)) = the
  // (eps, xi) a pass with restore tag `tag` uses.
  m.def("philox_words(int seed, int bucket_id, int step, int tag, int first_call, int n_calls) -> Tensor");
  m.def("normal_noise(int seed, int bucket_id, int step, int tag, int offset, int n) -> Tensor");
  m.def("element_words(int seed, int bucket_id, int step, int tag, int offset, int n) -> Tensor");
  m.def("gaussian_noise(int seed, int bucket_id, int step, int tag, int offset, int n) -> (Tensor, Tensor)");
  // Noise roofline (bench micro): z of n elements for each tag, generated by the CPU's
  // fastest generator into L1 buffers, no parameter traffic; returns a checksum.
  m.def("noise_roofline(int seed, int bucket_id, int step, int[] tags, int n) -> Tensor");
  // The ISA of the CPU loops now: "baseline" | "avx2" | "avx512" (FUSED_FLAT_CPU_ISA
  // forces one; asking for an unsupported one raises).
  m.def("cpu_isa() -> str");
  // found_inf of the gradients: float32 [1] on the tensors' device, 1.0 if any element of
  // any tensor is inf or nan, else 0.0. One read of each tensor, no host sync on CUDA.
  m.def("all_finite(Tensor[] tensors) -> Tensor");
}

#ifndef FUSED_FLAT_WITH_CUDA
#define FUSED_FLAT_WITH_CUDA 0
#endif
#ifndef FUSED_FLAT_CUDA_ARCHS
#define FUSED_FLAT_CUDA_ARCHS ""
#endif

PYBIND11_MODULE(_C, module) {
  module.doc() = "fused_flat native ops (registered under torch.ops.fused_flat)";
  module.def("build_info", [] {
    pybind11::dict info;
    info["with_cuda"] = static_cast<bool>(FUSED_FLAT_WITH_CUDA);
    info["cuda_archs"] = std::string(FUSED_FLAT_CUDA_ARCHS);
#ifdef _OPENMP
    info["openmp"] = true;
#else
    info["openmp"] = false;
#endif
    return info;
  });
}
