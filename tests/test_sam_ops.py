"""The compiled SAM ops (csrc/cpu/sam_cpu.cpp) against the pure-torch reference
(fused_flat/backends/sam_reference.py) on odd sizes, plus torch.library.opcheck."""
import pytest
import torch

from fused_flat import noise
from fused_flat.backends import sam_reference as ref
from tests.conftest import cpu_backends

pytestmark = [pytest.mark.skipif("cpp" not in cpu_backends(), reason="compiled extension not built"),
              pytest.mark.usefixtures("one_thread")]

SIZES = [1, 7, 1001, (1 << 14) * 3 + 5]   # odd sizes, more than one reduction block
TOL = {torch.float32: dict(rtol=1e-6, atol=1e-7), torch.float64: dict(rtol=1e-13, atol=1e-15),
       torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}


def ops():
    """The compiled SAM ops with per-tensor signatures (one-tensor lists of the list ops)."""
    from tests import cpp_per_tensor
    return cpp_per_tensor


def _data(n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g, dtype=torch.float64).to(dtype),
            torch.randn(n, generator=g, dtype=torch.float64).to(dtype))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("adaptive,eta", [(False, 0.0), (True, 0.0), (True, 0.01)])
def test_sq_norm(n, dtype, adaptive, eta):
    p, g = _data(n, dtype)
    got = ops().sam_grad_sq_norm(g, p if adaptive else None, eta)
    want = ref.sam_grad_sq_norm(g, p if adaptive else None, eta)
    acc = torch.float64 if dtype == torch.float64 else torch.float32   # T = |theta| + eta in acc
    exact = (((p.to(acc).abs() + eta).double() if adaptive else 1.0) * g.double()).pow(2).sum()
    assert got.dtype == torch.float64 and got.dim() == 0
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(got, exact, rtol=1e-12, atol=0)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("adaptive,eta", [(False, 0.0), (True, 0.0), (True, 0.01)])
def test_perturb(n, dtype, adaptive, eta):
    p, g = _data(n, dtype)
    p1, p2 = p.clone(), p.clone()
    b1, b2 = torch.full_like(p, 7.0), torch.full_like(p, 7.0)
    ops().sam_perturb_(p1, g, b1, adaptive, 0.037, eta)
    ref.sam_perturb_(p2, g, b2, adaptive, 0.037, eta)
    assert torch.equal(b1, p) and torch.equal(b2, p)          # backup is the exact theta
    torch.testing.assert_close(p1, p2, **TOL[dtype])
    want = p.double() + 0.037 * ((p.double().abs() + eta) ** 2 if adaptive else 1.0) * g.double()
    torch.testing.assert_close(p1.double(), want, **TOL[dtype])


@pytest.mark.parametrize("n", SIZES[:3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cfg", [dict(momentum=0.0, init=False), dict(momentum=0.9, init=True),
                                 dict(momentum=0.9, init=False, nesterov=True),
                                 dict(momentum=0.8, init=False, dampening=0.3)])
@pytest.mark.parametrize("scaled", [False, True])
def test_restore_and_step(n, dtype, cfg, scaled):
    p, g = _data(n, dtype)
    backup, m0 = _data(n, dtype, seed=1)
    mu = cfg["momentum"]
    outs = []
    for impl in (ops(), ref):
        pp, mm = p.clone(), (m0.clone() if mu > 0 else None)
        gs = torch.tensor([4.0]) if scaled else None
        impl.sam_restore_and_step_(pp, backup, g * (4 if scaled else 1), mm, gs, None, 0.1, 5e-4, mu,
                                   cfg.get("dampening", 0.0), cfg.get("nesterov", False), cfg["init"], 1.0)
        outs.append((pp, mm))
    torch.testing.assert_close(outs[0][0], outs[1][0], **TOL[dtype])
    if mu > 0:
        torch.testing.assert_close(outs[0][1], outs[1][1], **TOL[dtype])
    # against torch.optim.SGD itself
    q = torch.nn.Parameter(backup.clone())
    q.grad = g.clone()
    sgd = torch.optim.SGD([q], lr=0.1, weight_decay=5e-4, momentum=mu, dampening=cfg.get("dampening", 0.0),
                          nesterov=cfg.get("nesterov", False))
    if mu > 0 and not cfg["init"]:
        sgd.state[q]["momentum_buffer"] = m0.clone()
    sgd.step()
    torch.testing.assert_close(outs[0][0], q.detach(), **TOL[dtype])


@pytest.mark.parametrize("impl_name", ["cpp", "reference"])
def test_restore_and_step_found_inf_restores_only(impl_name):
    impl = ops() if impl_name == "cpp" else ref
    p, g = _data(11, torch.float32)
    backup, m = _data(11, torch.float32, seed=2)
    m0 = m.clone()
    impl.sam_restore_and_step_(p, backup, g, m, None, torch.ones(1), 0.1, 0.0, 0.9, 0.0, False, False, 1.0)
    assert torch.equal(p, backup) and torch.equal(m, m0)


@pytest.mark.parametrize("n", [1, 6, 1001])
@pytest.mark.parametrize("offset", [0, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_probe(n, offset, dtype):
    p, _ = _data(n, dtype)
    p1, p2, b1, b2 = p.clone(), p.clone(), torch.empty_like(p), torch.empty_like(p)
    ops().sam_probe_(p1, b1, 12345678901, 3, 7, 1e-3, offset)
    ref.sam_probe_(p2, b2, 12345678901, 3, 7, 1e-3, offset)
    v = noise.rademacher(12345678901, 3, 7, offset, n)
    assert torch.equal(b1, p) and torch.equal(b2, p)
    assert torch.equal(p1, p2)
    assert torch.equal(p1, (p.to(torch.float64 if dtype == torch.float64 else torch.float32)
                            + 1e-3 * v.to(p1.dtype)).to(dtype))
    assert set(v.unique().tolist()) <= {-1.0, 1.0}


def test_opcheck():
    p, g = _data(9, torch.float32)
    b, m = torch.zeros_like(p), torch.zeros_like(p)
    ff = torch.ops.fused_flat
    torch.library.opcheck(ff.sam_grad_sq_norm_list, ([g], [p], True, 0.0))
    torch.library.opcheck(ff.sam_perturb_list_, ([p.clone()], [g], [b], True, 0.1, 0.0))
    torch.library.opcheck(ff.sam_restore_and_step_list_,
                          ([p.clone()], [b], [g], [m], None, None, 0.1, 0.0, 0.9, 0.0, False, True,
                           1.0))
    torch.library.opcheck(ff.sam_probe_list_, ([p.clone()], [b], [0], 1, 0, 0, 1e-3))


def test_bad_input_errors():
    p, g = _data(9, torch.float32)
    with pytest.raises(RuntimeError, match="backup must match"):
        ops().sam_perturb_(p, g, torch.zeros(8), False, 0.1)
    with pytest.raises(RuntimeError, match="contiguous 1-D"):
        ops().sam_grad_sq_norm(torch.zeros(3, 3))


def test_results_do_not_depend_on_thread_count():
    p, g = _data((1 << 14) * 5 + 3, torch.float32)
    outs = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        q, b = p.clone(), torch.empty_like(p)
        ops().sam_perturb_(q, g, b, True, 0.01)
        outs.append((ops().sam_grad_sq_norm(g, p), q))
    for norm, q in outs[1:]:
        assert torch.equal(norm, outs[0][0]) and torch.equal(q, outs[0][1])
