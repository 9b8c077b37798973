"""The GPU / build compatibility check (fused_flat/backends/cuda_arch.py), as a pure function."""
import pytest

from fused_flat.backends.cuda_arch import check_capability, parse_arch_list

DEFAULT = "8.0;9.0+PTX"


def test_parse():
    a = parse_arch_list("8.0;9.0+PTX")
    assert [(x.major, x.minor, x.ptx, x.specific) for x in a] == [(8, 0, False, False), (9, 0, True, False)]
    assert parse_arch_list("7.5 8.6,9.0a")[2].specific
    assert parse_arch_list("") == []
    with pytest.raises(ValueError):
        parse_arch_list("ampere")


@pytest.mark.parametrize("cap,how", [((8, 0), "sass"), ((8, 6), "sass"), ((8, 9), "sass"),
                                     ((9, 0), "sass"), ((10, 0), "ptx"), ((12, 0), "ptx")])
def test_default_build_runs(cap, how):
    assert check_capability(cap, DEFAULT) == how


@pytest.mark.parametrize("cap", [(7, 0), (7, 5), (6, 1)])
def test_default_build_refuses_older(cap):
    with pytest.raises(RuntimeError, match=rf"compute capability {cap[0]}\.{cap[1]}.*TORCH_CUDA_ARCH_LIST=\"{cap[0]}\.{cap[1]}\""):
        check_capability(cap, DEFAULT)


def test_without_ptx_newer_gpu_fails():
    with pytest.raises(RuntimeError, match="sm_80, sm_90"):
        check_capability((10, 0), "8.0;9.0")
    assert check_capability((9, 0), "8.0;9.0") == "sass"


def test_arch_specific_exact_only():
    assert check_capability((9, 0), "9.0a") == "sass"
    with pytest.raises(RuntimeError):
        check_capability((10, 0), "9.0a")


def test_empty_list():
    with pytest.raises(RuntimeError, match="no CUDA architecture"):
        check_capability((9, 0), "")


def test_cuda_sam_refuses_cpu_tensors():
    from fused_flat.backends import cuda_sam
    a = [torch_zeros(3)]
    with pytest.raises(ValueError, match="CUDA tensors only"):
        cuda_sam.sam_perturb_(a, [torch_zeros(3)], [torch_zeros(3)], False, 0.1, 0.0)
    assert float(cuda_sam.sam_grad_sq_norm([], None, 0.0)) == 0.0


def torch_zeros(n):
    import torch
    return torch.zeros(n)
