// Op schemas (the one place they are declared) and the small pybind11 module that
// reports how the extension was built. Kernels live in csrc/cpu and csrc/cuda.
#include <pybind11/pybind11.h>
#include <string>
#include <torch/library.h>

TORCH_LIBRARY(fused_flat, m) {
  // theta <- theta + sigma * eps(tag), elements [offset, offset + numel) of the bucket.
  m.def("perturb_(Tensor(a!) param, int seed, int bucket_id, int step, int tag, float sigma, "
        "int offset=0) -> ()");
  // Fused restore + weight decay + momentum + Langevin noise + SGD update (ALGORITHMS.md §2).
  m.def("restore_and_step_(Tensor(a!) param, Tensor grad, Tensor(b!)? momentum_buffer, "
        "Tensor? grad_scale, Tensor? found_inf, int seed, int bucket_id, int step, int offset, "
        "int restore_tag, float sigma, float lr, float weight_decay, float momentum, "
        "float dampening, bool nesterov, bool momentum_init, float noise_std, "
        "float grad_mult) -> ()");
  // Inspection of the noise stream (tests, cross-backend checks): Philox words of pairs
  // [first_pair, first_pair + n_pairs) as int64 [n_pairs, 4], and (eps, xi) of elements
  // [offset, offset + n) from one tag, float32.
  m.def("philox_words(int seed, int bucket_id, int step, int tag, int first_pair, int n_pairs) -> Tensor");
  m.def("gaussian_noise(int seed, int bucket_id, int step, int tag, int offset, int n) -> (Tensor, Tensor)");
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
