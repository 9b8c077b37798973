"""Builds fused_flat._C: the C++ CPU kernels always, the CUDA kernels when nvcc is usable.

Environment:
  FUSED_FLAT_NO_EXTENSION=1   build no extension at all (pure-torch reference backend only)
  FORCE_CUDA=1                build the CUDA sources even if torch sees no GPU (the default
                              whenever nvcc is found); FORCE_CUDA=0 never builds them
  TORCH_CUDA_ARCH_LIST        CUDA architectures (default "8.0;9.0+PTX": SASS for A100 and
                              H100, plus PTX that newer GPUs JIT-compile at load)
  CUDA_HOME                   CUDA toolkit (default /usr/local/cuda when nvcc lives there)
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0+PTX"


def _cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.exists(os.path.join(home, "include", "cuda.h")):
            return home
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    return None


def _extensions():
    if os.environ.get("FUSED_FLAT_NO_EXTENSION", "0") == "1":
        return [], {}
    force = os.environ.get("FORCE_CUDA")
    cuda_home = _cuda_home()
    with_cuda = cuda_home is not None if force is None else force == "1"
    if with_cuda:
        # torch reads CUDA_HOME at import; set it before importing cpp_extension.
        if cuda_home:
            os.environ.setdefault("CUDA_HOME", cuda_home)
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    from torch.utils import cpp_extension

    if with_cuda and cpp_extension.CUDA_HOME is None:
        raise RuntimeError(
            "fused_flat: CUDA build requested but torch found no CUDA toolkit "
            "(CUDA_HOME unset, or a CPU-only torch). Set CUDA_HOME, or FORCE_CUDA=0."
        )
    include = [os.path.join(ROOT, "csrc", "include")]
    cxx = ["-O3", "-g0", "-fopenmp", "-ffp-contract=off",
           "-fno-math-errno", "-fno-trapping-math", "-Wall", "-Wno-unknown-pragmas"]
    sources = sorted(glob.glob("csrc/*.cpp"))
    sources += sorted(glob.glob("csrc/cpu/*.cpp"))
    macros = []
    extra = {"cxx": cxx}
    if with_cuda:
        # csrc/cuda/*.cu: the CUDA implementations of the list ops (multi_langevin.cu: the
        # Langevin passes and all_finite; sam_cuda.cu: the SAM family) and perturb_from_
        # (kernels_cuda.cu); the schemas are the CPU kernels' (csrc/*.cpp)
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        macros += [("FUSED_FLAT_WITH_CUDA", "1"), ("FUSED_FLAT_CUDA_ARCHS", '"%s"' % archs)]
        extra["nvcc"] = ["-O3", "-Xcompiler=-g0", "-lineinfo", "--expt-relaxed-constexpr",
                         "-Xptxas=-v", "-fmad=false"]
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension
    ext = ext_cls(
        name="fused_flat._C",
        sources=sources,
        include_dirs=include,
        define_macros=macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="fused_flat",
    packages=find_packages(include=["fused_flat", "fused_flat.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["fused-flat=fused_flat.cli:main"]},
)
