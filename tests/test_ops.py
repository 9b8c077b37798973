"""The registered ops: schemas, fake implementations (torch.compile), argument checks."""
import pytest
import torch

from tests.conftest import cpu_backends

pytestmark = pytest.mark.skipif("cpp" not in cpu_backends(), reason="C++ extension not built")


def test_opcheck_perturb():
    p = torch.randn(1001)
    torch.library.opcheck(torch.ops.fused_flat.perturb_.default, (p, 1, 0, 3, 0, 0.1, 5),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("with_momentum", [False, True])
def test_opcheck_restore_and_step(with_momentum):
    p, g = torch.randn(777), torch.randn(777)
    m = torch.randn(777) if with_momentum else None
    found, scale = torch.zeros(1), torch.full((1,), 4.0)
    args = (p, g, m, scale, found, 1, 0, 3, 2, 0, 0.1, 0.01, 1e-4, 0.9 if with_momentum else 0.0,
            0.0, False, False, 1e-3, 1.0)
    torch.library.opcheck(torch.ops.fused_flat.restore_and_step_.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_grad_scale_and_found_inf_tensors():
    from fused_flat import ops, reference
    p0, g = torch.randn(1001), torch.randn(1001)
    for mod in (ops, reference):
        # grad_scale divides the gradient
        p = p0.clone()
        mod.restore_and_step_(p, g * 8, None, torch.full((1,), 8.0), torch.zeros(1), 1, 0, 0, 0, 0, 0.0,
                              0.1, 0.0, 0.0, 0.0, False, False, 0.0, 1.0)
        torch.testing.assert_close(p, p0 - 0.1 * g)
        # found_inf: only the restore happens
        p = p0.clone()
        mod.perturb_(p, 1, 0, 0, 0, 0.3, 0)
        mod.restore_and_step_(p, g, None, None, torch.ones(1), 1, 0, 0, 0, 0, 0.3, 0.1, 0.0, 0.0, 0.0,
                              False, False, 0.01, 1.0)
        torch.testing.assert_close(p, p0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bad,match", [
    (lambda: torch.ops.fused_flat.perturb_(torch.randn(4, 4).t(), 1, 0, 0, 0, 0.1, 0), "contiguous 1-D"),
    (lambda: torch.ops.fused_flat.perturb_(torch.arange(4), 1, 0, 0, 0, 0.1, 0), "floating point"),
    (lambda: torch.ops.fused_flat.perturb_(torch.randn(4), -1, 0, 0, 0, 0.1, 0), "seed"),
    (lambda: torch.ops.fused_flat.restore_and_step_(torch.randn(4), torch.randn(5), None, None, None, 1, 0, 0,
                                                    0, 0, 0.0, 0.1, 0.0, 0.0, 0.0, False, False, 0.0, 1.0), "grad"),
    (lambda: torch.ops.fused_flat.restore_and_step_(torch.randn(4), torch.randn(4), None, None, torch.zeros(2),
                                                    1, 0, 0, 0, 0, 0.0, 0.1, 0.0, 0.0, 0.0, False, False, 0.0, 1.0),
     "found_inf"),
])
def test_op_argument_errors(bad, match):
    with pytest.raises(RuntimeError, match=match):
        bad()


def test_large_offset_uses_64bit_indices():
    """An element past 2^32 in a bucket gets the noise of its true index (j_hi word used)."""
    from fused_flat import noise, ops
    off = (1 << 33) + 3
    e, x = ops.gaussian_noise(5, 0, 1, 0, off, 64)
    er, xr = noise.gaussian_noise(5, 0, 1, 0, off, 64)
    assert (e - er).abs().max() <= 1e-5
    e_lo, _ = ops.gaussian_noise(5, 0, 1, 0, off - (1 << 33), 64)   # same low 32 bits of j
    assert not torch.equal(e, e_lo)
    p = torch.zeros(64)
    ops.perturb_(p, 5, 0, 1, 0, 1.0, off)
    assert (p - er).abs().max() <= 1e-5
