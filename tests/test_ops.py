"""The registered ops: schemas, fake implementations (torch.compile), argument checks."""
import pytest
import torch

from tests.conftest import cpu_backends

pytestmark = pytest.mark.skipif("cpp" not in cpu_backends(), reason="C++ extension not built")


def test_opcheck_perturb():
    p = torch.randn(1001)
    torch.library.opcheck(torch.ops.fused_flat.perturb_list_.default, ([p], [5], 1, 0, 3, 0, 0.1),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("with_momentum", [False, True])
def test_opcheck_restore_and_step(with_momentum):
    p, g = torch.randn(777), torch.randn(777)
    m = torch.randn(777) if with_momentum else None
    found, scale = torch.zeros(1), torch.full((1,), 4.0)
    args = ([p], [g], [] if m is None else [m], [2], scale, found, 1, 0, 3, 0, 0.1, 0.01, 1e-4,
            0.9 if with_momentum else 0.0, 0.0, False, False, 1e-3, 1.0)
    torch.library.opcheck(torch.ops.fused_flat.restore_and_step_list_.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_grad_scale_and_found_inf_tensors():
    from fused_flat.backends import reference
    from tests import cpp_per_tensor as ops
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
    (lambda: torch.ops.fused_flat.perturb_list_([torch.randn(4, 4).t()], [0], 1, 0, 0, 0, 0.1), "contiguous 1-D"),
    (lambda: torch.ops.fused_flat.perturb_list_([torch.arange(4)], [0], 1, 0, 0, 0, 0.1), "floating point"),
    (lambda: torch.ops.fused_flat.perturb_list_([torch.randn(4)], [0], -1, 0, 0, 0, 0.1), "seed"),
    (lambda: torch.ops.fused_flat.restore_and_step_list_([torch.randn(4)], [torch.randn(5)], [], [0], None, None,
                                                         1, 0, 0, 0, 0.0, 0.1, 0.0, 0.0, 0.0, False, False, 0.0,
                                                         1.0), "grad"),
    (lambda: torch.ops.fused_flat.restore_and_step_list_([torch.randn(4)], [torch.randn(4)], [], [0], None,
                                                         torch.zeros(2), 1, 0, 0, 0, 0.0, 0.1, 0.0, 0.0, 0.0, False,
                                                         False, 0.0, 1.0), "found_inf"),
])
def test_op_argument_errors(bad, match):
    with pytest.raises(RuntimeError, match=match):
        bad()


def test_large_offset_uses_64bit_indices():
    """An element past 2^32 in a bucket gets the noise of its true index (j_hi word used)."""
    from fused_flat import noise
    from fused_flat.backends import cpp as ops
    off = (1 << 34) + 3   # j = i >> 2 has a nonzero high word
    e = ops.normal_noise(5, 0, 1, 0, off, 64)
    er = noise.normal_noise(5, 0, 1, 0, off, 64)
    assert (e - er).abs().max() <= 1e-5
    e_lo = ops.normal_noise(5, 0, 1, 0, off - (1 << 34), 64)   # same low 32 bits of j = i >> 2
    assert not torch.equal(e, e_lo)
    p = torch.zeros(64)
    ops.perturb_list_([p], [off], 5, 0, 1, 0, 1.0)
    assert (p - er).abs().max() <= 1e-5


def test_opcheck_noise_ops():
    for op, args in ((torch.ops.fused_flat.normal_noise.default, (1, 0, 3, 0, 5, 101)),
                     (torch.ops.fused_flat.element_words.default, (1, 0, 3, 16, 5, 101)),
                     (torch.ops.fused_flat.philox_words.default, (1, 0, 3, 16, 5, 11)),
                     (torch.ops.fused_flat.all_finite.default, ([torch.randn(100), torch.randn(7)],))):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("bad", [None, float("inf"), float("-inf"), float("nan")])
def test_all_finite(dtype, bad):
    from fused_flat.backends import cpp as ops
    from fused_flat.backends import reference
    ts = [torch.randn(n).to(dtype) for n in (1, 100_003, 0, 257)]
    if bad is not None:
        ts[1][77_777] = bad
    want = 0.0 if bad is None else 1.0
    for mod in (ops, reference):
        found = mod.all_finite(ts)
        assert found.dtype == torch.float32 and found.shape == (1,) and found.item() == want
    # the largest finite values are finite
    big = torch.full((1000,), torch.finfo(dtype).max, dtype=dtype)
    assert ops.all_finite([big, -big]).item() == 0.0


def test_all_finite_every_isa_and_noncontiguous(monkeypatch):
    from fused_flat.backends import cpp as ops
    from tests.test_noise import ISAS
    t = torch.randn(300, 301)
    t[299, 3] = float("nan")
    for isa in ISAS:
        monkeypatch.setenv("FUSED_FLAT_CPU_ISA", isa)
        assert ops.all_finite([t.t()]).item() == 1.0
        assert ops.all_finite([t[:299]]).item() == 0.0
