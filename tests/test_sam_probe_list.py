"""The list form of the RW-SAM probe, fused_flat::sam_probe_list_ (CPU kernel; its CUDA kernel
is checked on a GPU by tests/test_cuda_sam_gpu.py through fused_flat.backends.cuda_sam):
tensor by tensor the op over that tensor alone at its bucket offset, bit for bit (no value
depends on the list or the thread split), and the pure-torch reference; its argument checks say what is wrong."""
from __future__ import annotations

import pytest
import torch

from fused_flat.backends import _native, sam_reference

pytestmark = pytest.mark.skipif(not _native.available(), reason="needs the compiled extension")

SIZES = [5, 0, 4097, 3, 1]
OFFSETS = [1, 9, 10, (1 << 33) + 2, 4107]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_probe_list_matches_one_tensor_lists_and_reference(dtype):
    from fused_flat.backends import cpp_sam

    gen = torch.Generator().manual_seed(4)
    base = [torch.randn(n, generator=gen, dtype=torch.float64).to(dtype) for n in SIZES]
    ps, bs = [p.clone() for p in base], [torch.empty_like(p) for p in base]
    cpp_sam.sam_probe_list_(ps, bs, OFFSETS, 77, 3, 9, 1e-2)
    for t, off in enumerate(OFFSETS):
        q, qb = base[t].clone(), torch.empty_like(base[t])
        cpp_sam.sam_probe_list_([q], [qb], [off], 77, 3, 9, 1e-2)   # the tensor alone
        assert torch.equal(ps[t], q) and torch.equal(bs[t], base[t]), (t, dtype)
        r, rb = base[t].clone(), torch.empty_like(base[t])
        sam_reference.sam_probe_(r, rb, 77, 3, 9, 1e-2, off)
        torch.testing.assert_close(ps[t], r, rtol=0, atol=0)
    assert any(not torch.equal(p, b) for p, b in zip(ps, base) if p.numel())


def test_probe_list_argument_checks():
    ps = [torch.zeros(4), torch.zeros(3)]
    bs = [torch.zeros(4), torch.zeros(3)]
    with pytest.raises(RuntimeError, match="2 params, 2 backups and 1 offsets"):
        torch.ops.fused_flat.sam_probe_list_(ps, bs, [0], 1, 0, 0, 1e-3)
    with pytest.raises(RuntimeError, match="one dtype"):
        torch.ops.fused_flat.sam_probe_list_([ps[0], ps[1].double()], [bs[0], bs[1].double()],
                                             [0, 4], 1, 0, 0, 1e-3)
    with pytest.raises(ValueError, match="step_t must be a one-element Long tensor on cpu"):
        torch.ops.fused_flat.sam_probe_list_(ps, bs, [0, 4], 1, 0, 0, 1e-3, torch.tensor([1.0]))
