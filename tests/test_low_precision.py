"""16-bit parameters: no restore drift, small updates that survive (stochastic rounding),
fp32 master weights that sample what the paper analyses."""
import math

import pytest
import torch
from torch import nn

from fused_flat import FSGLD, SAM, SGLD, backends
from tests.conftest import cpu_backends

BACKENDS = cpu_backends()
LOW = [torch.bfloat16, torch.float16]


def _sr_backend(name):
    if not backends.get(name).stochastic_rounding:
        pytest.skip(f"backend {name} has no stochastic-rounding kernels in this build")


def tiny(dtype, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 2)).to(dtype)


def run(model, opt, steps, lr_zero_check=False):
    g = torch.Generator().manual_seed(3)
    for i in range(steps):
        x = torch.randn(6, 5, generator=g).to(next(model.parameters()).dtype)

        def closure():
            opt.zero_grad()
            loss = model(x).float().square().mean()
            loss.backward()
            return loss

        opt.step(closure)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("mode", [dict(), dict(master_weights=True)])
def test_lr_zero_leaves_16_bit_parameters_bitwise_unchanged(backend, dtype, mode):
    """lr = 0, 200 steps of perturb + restore: the default (16-bit backup) and the master
    weights give back the very same bits (regeneration drifted by rms 5.9e-4 in bf16)."""
    model = tiny(dtype)
    before = [p.detach().clone() for p in model.parameters()]
    opt = FSGLD(model.parameters(), lr=0.0, beta=1e4, momentum=0.9, seed=1, backend=backend, **mode)
    run(model, opt, 200)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)


def test_regeneration_drifts_in_bf16_and_the_default_does_not_allocate_fp32():
    """What the default protects against, measured: exact_restore=False drifts."""
    model = tiny(torch.bfloat16)
    before = [p.detach().clone() for p in model.parameters()]
    opt = FSGLD(model.parameters(), lr=0.0, beta=1e4, seed=1, exact_restore=False)
    run(model, opt, 50)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
    d = FSGLD(tiny(torch.bfloat16).parameters(), lr=0.0, beta=1e4, seed=1)
    m = tiny(torch.bfloat16)
    d = FSGLD(m.parameters(), lr=0.0, beta=1e4, seed=1)
    run(m, d, 1)
    assert all(t.dtype == torch.bfloat16 for t in d._backups.values())   # 2 bytes per parameter


def _constant_gradient_walk(dtype, steps, **kw):
    ulp = 2.0 ** -8   # spacing of bf16 just below 1.0
    lr, grad = 0.1, 0.1 * ulp / 0.1   # lr * g = 0.1 ulp
    w = nn.Parameter(torch.ones(4096, dtype=dtype))
    opt = SGLD([w], lr=lr, beta=math.inf, seed=5, **kw)
    for _ in range(steps):
        w.grad = torch.full_like(w, grad)
        opt.step()
    return w, lr * grad


def test_small_updates_round_away_to_nearest():
    w, _ = _constant_gradient_walk(torch.bfloat16, 100, stochastic_rounding=False)
    assert torch.equal(w.detach(), torch.ones_like(w))      # stalled


def test_small_updates_land_exactly_with_master_weights():
    w, step = _constant_gradient_walk(torch.bfloat16, 100, master_weights=True)
    expected = torch.tensor(1.0 - 100 * step, dtype=torch.float64).to(torch.bfloat16)
    assert torch.equal(w.detach(), torch.full_like(w, expected.item()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_updates_survive_in_the_mean_with_stochastic_rounding(backend):
    _sr_backend(backend)
    w, step = _constant_gradient_walk(torch.bfloat16, 100, backend=backend)
    moved = 1.0 - w.detach().double()
    # each of 100 roundings adds independent noise of variance <= ulp^2 / 4 around the mean
    se = math.sqrt(100 * (2.0 ** -8) ** 2 / 4 / w.numel())
    assert abs(moved.mean().item() - 100 * step) < 3 * se


def test_master_weights_sample_at_the_intended_temperature():
    """The paper's regime: beta = 1e8, lr = 0.1, bf16 weights ~0.05, zero gradient: the walk
    of the master weights has variance 2 lr K / beta; round-to-nearest loses it entirely."""
    beta, lr, K = 1e8, 0.1, 200
    results = {}
    for name, kw in (("master", dict(master_weights=True)), ("nearest", dict(stochastic_rounding=False))):
        w = nn.Parameter(torch.full((20000,), 0.05, dtype=torch.bfloat16))
        opt = SGLD([w], lr=lr, beta=beta, seed=7, **kw)
        start = w.detach().double().clone()
        for _ in range(K):
            w.grad = torch.zeros_like(w)
            opt.step()
        walk = (opt.state[w]["master_weight"].double() if name == "master" else w.detach().double()) - start
        results[name] = walk.var().item()
    target = 2 * lr * K / beta
    n = 20000
    assert abs(results["master"] - target) < 4 * target * math.sqrt(2 / (n - 1))
    # round-to-nearest keeps only the rare steps whose noise exceeds half an ulp (1.2e-4 against
    # a noise scale of 4.5e-5): a distorted walk of a fraction of the target variance
    assert results["nearest"] < 0.5 * target


@pytest.mark.parametrize("dtype", LOW)
def test_master_weights_resume_bitwise(dtype, tmp_path):
    def fresh():
        m = tiny(dtype)
        return m, FSGLD(m.parameters(), lr=0.05, beta=1e4, momentum=0.9, seed=3, master_weights=True)

    m1, o1 = fresh()
    run(m1, o1, 6)
    m2, o2 = fresh()
    run(m2, o2, 3)
    torch.save({"m": m2.state_dict(), "o": o2.state_dict()}, tmp_path / "ck.pt")
    m3, o3 = fresh()
    ck = torch.load(tmp_path / "ck.pt")
    m3.load_state_dict(ck["m"])
    o3.load_state_dict(ck["o"])
    assert all(s["master_weight"].dtype == torch.float32 and s["momentum_buffer"].dtype == torch.float32
               for s in o3.state.values())
    g = torch.Generator().manual_seed(3)
    for _ in range(3):   # the batches run() used for steps 0..2
        torch.randn(6, 5, generator=g)
    for i in range(3):
        x = torch.randn(6, 5, generator=g).to(dtype)

        def closure():
            o3.zero_grad()
            loss = m3(x).float().square().mean()
            loss.backward()
            return loss

        o3.step(closure)
    for p, q in zip(m1.parameters(), m3.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(m1.parameters(), m3.parameters()):
        assert torch.equal(o1.state[p]["master_weight"], o3.state[q]["master_weight"])


def test_master_weights_equal_an_fp32_run_on_the_masters():
    """With master weights the fp32 chain is the one an fp32 model would run, up to the
    gradient being taken at the 16-bit weights."""
    m16 = tiny(torch.bfloat16)
    opt = SGLD(m16.parameters(), lr=0.1, beta=1e6, seed=2, master_weights=True)
    masters = None
    for i in range(3):
        for p in m16.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    masters = [opt.state[p]["master_weight"] for p in m16.parameters()]
    m32 = [nn.Parameter(p.detach().float().clone()) for p in tiny(torch.bfloat16).parameters()]
    ref = SGLD(m32, lr=0.1, beta=1e6, seed=2)
    for i in range(3):
        for p in m32:
            p.grad = torch.zeros_like(p)
        ref.step()
    for a, b in zip(masters, m32):
        assert torch.equal(a, b.detach())
    for p, m in zip(m16.parameters(), masters):
        assert torch.equal(p.detach(), m.to(torch.bfloat16))


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("mode", [dict(), dict(master_weights=True), dict(stochastic_rounding=False)])
def test_sam_lr_zero_leaves_16_bit_parameters_unchanged(dtype, mode):
    """The ascent step restores exactly from its backup in every mode."""
    model = tiny(dtype)
    before = [p.detach().clone() for p in model.parameters()]
    opt = SAM(model.parameters(), lr=0.0, momentum=0.9, rho=0.5, seed=1, **mode)
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        x = torch.randn(6, 5, generator=g).to(dtype)
        opt.zero_grad()
        model(x).float().square().mean().backward()
        opt.step(lambda: model(x).float().square().mean().backward())
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)


def test_sam_small_updates_land_exactly_with_master_weights():
    ulp = 2.0 ** -8
    w = nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    opt = SAM([w], lr=0.1, rho=0.05, master_weights=True, seed=2)
    for _ in range(100):
        w.grad = torch.full_like(w, ulp)      # lr * g = 0.1 ulp
        opt.first_step(zero_grad=True)
        w.grad = torch.full_like(w, ulp)
        opt.second_step(zero_grad=True)
    expected = torch.tensor(1.0 - 100 * 0.1 * ulp, dtype=torch.float64).to(torch.bfloat16)
    assert torch.equal(w.detach(), torch.full_like(w, expected.item()))
    assert opt.state[w]["master_weight"].dtype == torch.float32
