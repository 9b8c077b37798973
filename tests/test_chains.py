"""fused_flat.chains: N chains as one module, against references.

- noise off (RWP sigma=0, SGLD beta=inf): chain c == model c trained alone by torch.optim.SGD;
- noise on: chain c's Langevin noise is the stream's z(32, offset_t + c*numel_t + e); increments
  of different chains are uncorrelated; each chain's stationary law is the Gibbs law of its
  own quadratic (W1 to the closed form);
- per-chain SAM == N separate SAMs; SAM over a Chains == one SAM with the global norm;
- BMA / per-chain metrics == the extracted models' predictions; split-R-hat == a hand
  computation; round trips; refusals.
"""
from __future__ import annotations

import copy
import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_flat
from fused_flat import diagnostics as D
from fused_flat import noise
from fused_flat.optim.buckets import round_up4
from fused_flat.chains import (ChainAverager, Chains, ChainSAM, bma_probs, chain_loss,
                               chain_predict_proba, per_chain_hessian_lambda_max,
                               per_chain_hessian_trace, per_chain_metrics, split_rhat)

N = 4


pytestmark = pytest.mark.usefixtures("one_thread")


def small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5)).double()


def models(n=N, seed=0):
    out = []
    for c in range(n):
        torch.manual_seed(seed + c)
        out.append(small_cnn())
    return out


def data(steps, batch=8, seed=123):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 1, 6, 6, generator=g, dtype=torch.float64),
             torch.randint(0, 5, (batch,), generator=g)) for _ in range(steps)]


class Quad(nn.Module):
    """Per element loss 0.5 * a * theta^2 (Hessian a I); a is a buffer (per chain once stacked)."""

    def __init__(self, p: int, a: float = 1.0):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(p, dtype=torch.float64))
        self.register_buffer("a", torch.tensor(float(a), dtype=torch.float64))

    def forward(self, x=None):
        return 0.5 * self.a * self.theta ** 2


def total(out, _target=None):
    return out.sum()


def max_diff(chains: Chains, refs) -> float:
    return max((p_c - p_r).abs().max().item()
               for c, ref in enumerate(refs)
               for p_c, p_r in zip(chains.extract(c).parameters(), ref.parameters()))


# ----------------------------------------------------------------------------- forward
def test_forward_shared_and_per_chain_inputs_match_the_models():
    ms = models()
    chains = Chains(ms)
    x = torch.randn(7, 1, 6, 6, dtype=torch.float64)
    out = chains(x)
    assert out.shape == (N, 7, 5)
    for c in range(N):
        torch.testing.assert_close(out[c], ms[c](x), rtol=0, atol=1e-12)
    xs = torch.randn(N, 7, 1, 6, 6, dtype=torch.float64)
    out = chains(xs, per_chain=True)
    for c in range(N):
        torch.testing.assert_close(out[c], ms[c](xs[c]), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="leading chain dimension"):
        chains(x, per_chain=True)


def test_chain_loss_gives_each_chain_its_own_gradient():
    ms = models()
    chains = Chains(ms)
    x, y = data(1)[0]
    loss = chain_loss(chains(x), y, F.cross_entropy)
    loss.backward()
    per = chain_loss(chains(x), y, F.cross_entropy, reduction="none")
    for c, m in enumerate(ms):
        lc = F.cross_entropy(m(x), y)
        lc.backward()
        torch.testing.assert_close(per[c], lc, rtol=0, atol=1e-12)
        for p_s, p_m in zip(chains.parameters(), m.parameters()):
            torch.testing.assert_close(p_s.grad[c], p_m.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(loss, per.sum())
    ys = torch.randint(0, 5, (N, 8))
    per_t = chain_loss(chains(x), ys, F.cross_entropy, per_chain_target=True, reduction="none")
    for c, m in enumerate(ms):
        torch.testing.assert_close(per_t[c], F.cross_entropy(m(x), ys[c]), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- noise off == SGD
@pytest.mark.parametrize("per_chain", [False, True])
@pytest.mark.parametrize("make_opt", [
    lambda ps: fused_flat.RWP(ps, lr=0.05, sigma=0.0, momentum=0.9, weight_decay=5e-4, seed=1),
    lambda ps: fused_flat.SGLD(ps, lr=0.05, beta=math.inf, momentum=0.9, weight_decay=5e-4, seed=1),
], ids=["RWP-sigma0", "SGLD-beta-inf"])
def test_noise_off_equals_sgd_per_model(make_opt, per_chain):
    ms = models()
    inits = [torch.cat([p.detach().reshape(-1) for p in m.parameters()]) for m in ms]
    assert min((inits[a] - inits[b]).abs().max() for a in range(N) for b in range(a)) > 0.1
    chains = Chains(ms)
    refs = [copy.deepcopy(m) for m in ms]
    opt = make_opt(chains.parameters())
    sgds = [torch.optim.SGD(r.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4) for r in refs]
    batches = data(12 * N)
    for k in range(12):
        if per_chain:   # chain c trains on its own stream of batches
            bs = batches[k * N:(k + 1) * N]
            x, y = torch.stack([b[0] for b in bs]), torch.stack([b[1] for b in bs])
        else:
            x, y = batches[k]

        def closure():
            opt.zero_grad()
            loss = chain_loss(chains(x, per_chain=per_chain), y, F.cross_entropy, per_chain_target=per_chain)
            loss.backward()
            return loss

        opt.step(closure)
        for c, (r, o) in enumerate(zip(refs, sgds)):
            o.zero_grad()
            F.cross_entropy(r(x[c] if per_chain else x), y[c] if per_chain else y).backward()
            o.step()
    moved = max_diff(Chains(ms), refs)
    assert moved > 1e-2   # the runs did train
    diff = max_diff(chains, refs)
    print(f"max |chain - SGD| = {diff:.3e}")
    assert diff < 1e-6


# ----------------------------------------------------------------------------- noise on
def test_langevin_noise_index_of_chain_c():
    """Chain c's element e of stacked parameter t gets z(32, offset_t + c * numel_t + e)."""
    torch.manual_seed(3)
    ms = [nn.Linear(5, 3).double() for _ in range(N)]
    chains = Chains(ms)
    before = [p.detach().clone() for p in chains.parameters()]
    lr, beta, seed = 0.01, 10.0, 77
    opt = fused_flat.SGLD(chains.parameters(), lr=lr, beta=beta, seed=seed, backend="reference")
    for p in chains.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    std = math.sqrt(2 * lr / beta)
    offset = 0
    for p, p0 in zip(chains.parameters(), before):
        numel_t = p[0].numel()
        for c in range(N):
            z = noise.normal_noise(seed, 0, 0, noise.TAG_XI, offset + c * numel_t, numel_t).double()
            inc = (p[c] - p0[c]).reshape(-1) / std
            assert (inc - z).abs().max() < 1e-6
        offset += round_up4(p.numel())


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


@pytest.mark.parametrize("name", ["SGLD", "FSGLD"])
def test_increments_of_chains_are_uncorrelated(name):
    """Identical chains (same start, same loss) differ only by their noise. Under independence
    the sample correlation of P pairs is ~ N(0, 1/P): with P = 3 steps x 10,000 elements, its
    sd is 0.0058 and 0.05 is 8.7 sd (two-sided p ~ 1e-17 per pair, 6 pairs)."""
    p, steps = 10_000, 3
    chains = Chains.from_model(Quad(p, a=1.0), N, reinit=False)
    cls = fused_flat.SGLD if name == "SGLD" else fused_flat.FSGLD
    opt = cls(chains.parameters(), lr=0.01, beta=100.0, seed=5)
    theta = chains.stacked.theta
    incs = []
    for _ in range(steps):
        prev = theta.detach().clone()

        def closure():
            opt.zero_grad()
            loss = chain_loss(chains(), None, total)
            loss.backward()
            return loss

        opt.step(closure)
        incs.append(theta.detach() - prev)
    inc = torch.cat(incs, dim=1)                     # [N, steps * p]
    # the noise is there: inc ~ -lr a sigma eps + sqrt(2 lr / beta) xi (theta stays ~1e-2, lr a theta ~1e-4)
    sigma = 0.0 if name == "SGLD" else 100.0 ** (-(1 + 0.01) / 4)
    expected = math.sqrt(2 * 0.01 / 100.0 + (0.01 * sigma) ** 2)
    assert abs(inc.std().item() / expected - 1) < 0.05
    rs = [abs(_pearson(inc[a], inc[b])) for a in range(N) for b in range(a)]
    print(f"{name}: max |r| over chain pairs = {max(rs):.4f} (P = {inc.shape[1]})")
    assert max(rs) < 0.05
    # control: the statistic does see shared noise (two optimizers with one seed: r = 1)
    twins = [Quad(p) for _ in range(2)]
    opts = [fused_flat.SGLD(t.parameters(), lr=0.01, beta=100.0, seed=5) for t in twins]
    for t, o in zip(twins, opts):
        t.theta.grad = torch.zeros_like(t.theta)
        o.step()
    assert _pearson(twins[0].theta.detach(), twins[1].theta.detach()) > 0.99


@pytest.mark.parametrize("name", ["SGLD", "FSGLD"])
def test_each_chain_samples_its_gibbs_law(name):
    """Chain c's loss is sum_e 0.5 a_c theta_e^2 (a_c = c + 1, a per-chain buffer); at inverse
    temperature beta its Gibbs law is N(0, 1/(a_c beta)) per element (fSGLD's smoothed Gibbs
    law of a quadratic is the same Gaussian). The chain's P elements after 1500 steps (> 7
    relaxation times 1/(lr a)) are P independent draws of the discrete chain's stationary
    law: theta' = (1 - lr a) theta - lr a sigma eps + sqrt(2 lr / beta) xi is N(0, v),
    v = (2 lr / beta + (lr a sigma)^2) / (1 - (1 - lr a)^2) (sigma = 0 for SGLD).

    Statistical tolerance: 3 E[W1 of P draws], with E W1 <= K sd / sqrt(P),
    K = int sqrt(Phi (1 - Phi)) dz = 1.61 (Bobkov & Ledoux 2019, Thm 3.2). Checked: W1 to
    N(0, v) < tol; W1 to the Gibbs law < tol + W1(N(0, v), Gibbs) = tol + sqrt(2/pi)|sd_v - sd|
    (the discretization: 0.1-0.5% of sd for SGLD, 1-19% for fSGLD (a = 1..4), whose
    perturbation adds (lr a sigma)^2 per step); control: W1 to N(0, 2v), twice the
    temperature, > tol."""
    from scipy.integrate import quad
    from scipy.stats import norm, wasserstein_distance

    p, lr, beta, steps = 4000, 0.005, 100.0, 1500
    ms = [Quad(p, a=c + 1.0) for c in range(N)]
    chains = Chains(ms)
    cls = fused_flat.SGLD if name == "SGLD" else fused_flat.FSGLD
    opt = cls(chains.parameters(), lr=lr, beta=beta, seed=11)
    sigma = 0.0 if name == "SGLD" else beta ** (-(1 + 0.01) / 4)
    for _ in range(steps):
        def closure():
            opt.zero_grad()
            loss = chain_loss(chains(), None, total)
            loss.backward()
            return loss
        opt.step(closure)
    k_const = quad(lambda z: math.sqrt(norm.cdf(z) * norm.sf(z)), -math.inf, math.inf)[0]
    # a law is represented by its quantiles at (i + 0.5) / P (discretization error O(log P / P))
    grid = norm.ppf((torch.arange(p, dtype=torch.float64).numpy() + 0.5) / p)
    for c in range(N):
        a = c + 1.0
        sd = 1 / math.sqrt(a * beta)
        sd_v = math.sqrt((2 * lr / beta + (lr * a * sigma) ** 2) / (1 - (1 - lr * a) ** 2))
        tol = 3 * k_const * sd_v / math.sqrt(p)
        bias = math.sqrt(2 / math.pi) * abs(sd_v - sd)
        x = chains.stacked.theta[c].detach().numpy()
        w1_exact = wasserstein_distance(x, sd_v * grid)
        w1_gibbs = wasserstein_distance(x, sd * grid)
        w1_hot = wasserstein_distance(x, sd_v * math.sqrt(2) * grid)
        print(f"{name} chain {c}: a={a:g} W1(stationary)={w1_exact:.2e} W1(Gibbs)={w1_gibbs:.2e} "
              f"tol={tol:.2e} bias={bias:.2e} W1(2x temperature)={w1_hot:.2e}")
        assert w1_exact < tol
        assert w1_gibbs < tol + bias
        assert w1_hot > tol


# ----------------------------------------------------------------------------- SAM
def _sam_run(opt_factory, step_models, batches, steps):
    """Train with a SAM-like optimizer; ``step_models(x)`` returns the loss."""
    opt = opt_factory()
    for k in range(steps):
        x, y = batches[k]
        opt.zero_grad()
        step_models(x, y).backward()
        opt.step(lambda: step_models(x, y).backward())
    return opt


@pytest.mark.parametrize("adaptive", [False, True])
def test_chain_sam_equals_separate_sam_runs(adaptive):
    ms = models()
    chains = Chains(ms)
    refs = [copy.deepcopy(m) for m in ms]
    batches = data(6)
    kw = dict(rho=0.1 if not adaptive else 0.5, adaptive=adaptive, lr=0.05, momentum=0.9, weight_decay=5e-4)
    _sam_run(lambda: ChainSAM(chains, N, **kw),
             lambda x, y: chain_loss(chains(x), y, F.cross_entropy), batches, 6)
    for r in refs:
        _sam_run(lambda: fused_flat.SAM(r.parameters(), **kw),
                 lambda x, y: F.cross_entropy(r(x), y), batches, 6)
    diff = max_diff(chains, refs)
    print(f"ChainSAM(adaptive={adaptive}) vs N separate SAMs: {diff:.2e}")
    assert diff < 1e-10
    # plain SAM over the Chains is NOT per chain (one norm over all chains) ...
    coupled = Chains(ms)
    _sam_run(lambda: fused_flat.SAM(coupled.parameters(), **kw),
             lambda x, y: chain_loss(coupled(x), y, F.cross_entropy), batches, 6)
    assert max_diff(coupled, refs) > 1e-4
    # ... it is exactly one SAM over all N models' parameters together (the global norm)
    joint = [copy.deepcopy(m) for m in ms]
    _sam_run(lambda: fused_flat.SAM([p for m in joint for p in m.parameters()], **kw),
             lambda x, y: sum(F.cross_entropy(m(x), y) for m in joint), batches, 6)
    assert max_diff(coupled, joint) < 1e-10


def test_chain_sam_grad_scaler_and_nonfinite_g1():
    """Under torch.amp.GradScaler (scale 2^8, exact in float64) ChainSAM equals the unscaled
    run; an inf in one chain's g1 skips the step for every chain."""
    batches = data(3)
    a, b = Chains(models()), Chains(models())
    kw = dict(rho=0.1, lr=0.05, momentum=0.9)
    opt_a, opt_b = ChainSAM(a, N, **kw), ChainSAM(b, N, **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=1000)
    for x, y in batches:
        scaler.scale(chain_loss(a(x), y, F.cross_entropy)).backward()
        opt_a.first_step(zero_grad=True, grad_scaler=scaler)
        scaler.scale(chain_loss(a(x), y, F.cross_entropy)).backward()
        scaler.step(opt_a)
        scaler.update()
        opt_a.zero_grad()
        opt_b.zero_grad()
        chain_loss(b(x), y, F.cross_entropy).backward()
        opt_b.step(lambda: chain_loss(b(x), y, F.cross_entropy).backward())
    assert max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters())) < 1e-12
    before = [p.detach().clone() for p in b.parameters()]
    x, y = batches[0]
    opt_b.zero_grad()
    chain_loss(b(x), y, F.cross_entropy).backward()
    next(b.parameters()).grad[2].view(-1)[0] = math.inf
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt_b.step(lambda: chain_loss(b(x), y, F.cross_entropy).backward())
    assert all(torch.equal(p, q) for p, q in zip(b.parameters(), before))


def test_chain_sam_first_step_keeps_g1_without_zero_grad_and_checks_shapes():
    chains = Chains(models())
    opt = ChainSAM(chains.parameters(), N, rho=0.05, lr=0.1)
    x, y = data(1)[0]
    chain_loss(chains(x), y, F.cross_entropy).backward()
    g1 = [p.grad.clone() for p in chains.parameters()]
    opt.first_step(zero_grad=False)
    for p, g in zip(chains.parameters(), g1):
        assert torch.equal(p.grad, g)
    assert all(g["normalize"] is True and g["adaptive"] is False for g in opt.param_groups)
    opt.restore()
    with pytest.raises(ValueError, match="leading chain dimension"):
        ChainSAM([nn.Parameter(torch.zeros(3, 2))], N)
    with pytest.raises(ValueError, match="USAM"):
        ChainSAM(chains.parameters(), N, normalize=False)


def test_chain_sam_perturbation_has_norm_rho_per_chain():
    chains = Chains(models())
    rho = 0.07
    opt = ChainSAM(chains.parameters(), N, rho=rho, lr=0.1)
    x, y = data(1)[0]
    chain_loss(chains(x), y, F.cross_entropy).backward()
    before = [p.detach().clone() for p in chains.parameters()]
    opt.first_step(zero_grad=True)
    e = torch.cat([(p.detach() - b).reshape(N, -1) for p, b in zip(chains.parameters(), before)], dim=1)
    torch.testing.assert_close(e.norm(dim=1), torch.full((N,), rho, dtype=torch.float64), rtol=1e-10, atol=0)
    opt.restore()


# ----------------------------------------------------------------------------- round trips
def test_extract_unstack_set_chain_and_state_dict_round_trips():
    ms = models()
    chains = Chains(ms)
    for c, m in enumerate(chains.unstack()):
        assert type(m) is type(ms[c])
        for (n1, a), (n2, b) in zip(m.state_dict().items(), ms[c].state_dict().items()):
            assert n1 == n2 and torch.equal(a, b)
    e = chains.extract(-1)
    with torch.no_grad():
        e[0].weight.add_(1.0)                        # a copy: the chains are untouched
    assert torch.equal(chains.extract(3)[0].weight, ms[3][0].weight)
    chains.set_chain(3, e)
    assert torch.equal(chains.extract(3)[0].weight, e[0].weight)
    assert torch.equal(chains.extract(2)[0].weight, ms[2][0].weight)
    again = Chains(chains.unstack())
    for a, b in zip(again.state_dict().values(), chains.state_dict().values()):
        assert torch.equal(a, b)
    sd = chains.state_dict()
    assert sd["stacked.0.weight"].shape == (N, 3, 1, 3, 3)
    other = Chains(models(seed=50))
    other.load_state_dict(sd)
    x = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    assert torch.equal(other(x), chains(x))
    with pytest.raises(IndexError):
        chains.extract(N)
    with pytest.raises(ValueError, match="architecture"):
        chains.set_chain(0, nn.Linear(2, 2))


def test_tied_weights_stay_tied():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    ms = [Tied() for _ in range(N)]
    chains = Chains(ms)
    assert chains.stacked.a.weight is chains.stacked.b.weight
    assert len(list(chains.parameters())) == 3
    x = torch.randn(3, 4)
    for c in range(N):
        torch.testing.assert_close(chains(x)[c], ms[c](x))
    e = chains.extract(1)
    assert e.a.weight is e.b.weight


def test_from_model_seeds():
    before = torch.get_rng_state()
    chains = Chains.from_model(small_cnn, N, seeds=[10, 11, 12, 13])
    assert torch.equal(torch.get_rng_state(), before)
    for c in range(N):
        torch.manual_seed(10 + c)
        ref = small_cnn()
        for a, b in zip(chains.extract(c).parameters(), ref.parameters()):
            assert torch.equal(a, b)
    base = small_cnn()
    re = Chains.from_model(base, N, seeds=[10, 11, 12, 13])   # reset_parameters under the seeds
    for c in range(N):
        torch.manual_seed(10 + c)
        ref = copy.deepcopy(base)
        for mod in ref.modules():
            if hasattr(mod, "reset_parameters"):
                mod.reset_parameters()
        for a, b in zip(re.extract(c).parameters(), ref.parameters()):
            assert torch.equal(a, b)
    same = Chains.from_model(base, N, reinit=False)
    assert all(torch.equal(p[c], p[0]) for p in same.parameters() for c in range(N))
    with pytest.raises(ValueError, match="reset_parameters"):
        Chains.from_model(Quad(3), N)
    with pytest.raises(ValueError, match="seeds"):
        Chains.from_model(small_cnn, N, seeds=[1, 2])


# ----------------------------------------------------------------------------- refusals, norms, dropout
def test_batchnorm_with_running_stats_is_refused():
    bn = [nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)) for _ in range(2)]
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm1d\) keeps running statistics"):
        Chains(bn)
    with pytest.raises(ValueError, match="running statistics"):
        Chains([nn.InstanceNorm1d(4, track_running_stats=True)] * 2)
    with pytest.raises(ValueError, match="one architecture"):
        Chains([nn.Linear(3, 4), nn.Linear(3, 5)])
    with pytest.raises(ValueError, match="at least one"):
        Chains([])


def test_batchnorm_without_running_stats_uses_batch_statistics_per_chain():
    torch.manual_seed(1)
    ms = [nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False)) for _ in range(N)]
    chains = Chains(ms)
    xs = torch.randn(N, 6, 3) * torch.arange(1, N + 1).reshape(N, 1, 1)
    out = chains(xs, per_chain=True)
    for c in range(N):
        torch.testing.assert_close(out[c], ms[c](xs[c]))


def test_dropout_masks_independent_per_chain_by_default():
    base = nn.Sequential(nn.Linear(20, 50), nn.Dropout(0.5))
    x = torch.randn(8, 20)
    diff = Chains.from_model(base, N, reinit=False)
    out = diff(x)
    zeros = out == 0
    assert not torch.equal(zeros[0], zeros[1])
    # independent masks: the chains' dropped positions agree on about half of the entries
    agree = (zeros[0] == zeros[1]).double().mean().item()
    assert abs(agree - 0.5) < 5 * 0.5 / math.sqrt(zeros[0].numel())
    same = Chains.from_model(base, N, reinit=False, randomness="same")
    out = same(x)
    assert all(torch.equal(out[0], out[c]) for c in range(N))
    diff.eval()
    out = diff(x)
    assert all(torch.equal(out[0], out[c]) for c in range(N))
    with pytest.raises(ValueError, match="randomness"):
        Chains([base], randomness="sometimes")


# ----------------------------------------------------------------------------- BMA, metrics
def test_bma_and_per_chain_metrics_match_the_extracted_models():
    chains = Chains(models())
    x, y = data(1, batch=40)[0]
    probs = chain_predict_proba(chains, (x, y))
    assert probs.shape == (N, 40, 5) and probs.dtype == torch.float64
    for c in range(N):
        torch.testing.assert_close(probs[c], D.predict_proba(chains.extract(c), x))
    torch.testing.assert_close(bma_probs(probs), probs.mean(0))
    batched = chain_predict_proba(chains, [(x[:15], y[:15]), (x[15:], y[15:])])
    torch.testing.assert_close(batched, probs)
    m = per_chain_metrics(probs, y, ("accuracy", "nll", "brier"))
    for c in range(N):
        pc = D.predict_proba(chains.extract(c), x)
        assert m["accuracy"][c] == D.accuracy(pc, y)
        assert m["nll"][c] == pytest.approx(D.nll(pc, y), rel=1e-12)
        assert m["brier"][c] == pytest.approx(D.brier_score(pc, y), rel=1e-12)


def test_chain_averager_mean_over_chains_and_snapshots():
    chains = Chains(models())
    x, y = data(1, batch=30)[0]
    avg = ChainAverager(chains, (x, y), burn_in=1, every=2)
    opt = fused_flat.SGLD(chains.parameters(), lr=0.05, beta=1e3, seed=0)
    snaps = []
    for k in range(9):
        opt.zero_grad()
        chain_loss(chains(x), y, F.cross_entropy).backward()
        opt.step()
        if avg.step():
            snaps.append([D.predict_proba(chains.extract(c), x) for c in range(N)])
    assert avg.n_snapshots == len(snaps) == 4                     # calls 2, 4, 6, 8
    ref = torch.stack([torch.stack(s) for s in snaps])            # [S, N, M, C]
    torch.testing.assert_close(avg.chain_probs(), ref.mean(0))
    torch.testing.assert_close(avg.probs(), ref.mean((0, 1)))
    nll = avg.trace("nll")
    assert nll.shape == (N, 4)
    for s in range(4):
        for c in range(N):
            assert nll[c, s].item() == pytest.approx(D.nll(ref[s, c], y), rel=1e-12)
    assert avg.rhat("nll") == pytest.approx(split_rhat(nll))


def test_chain_averager_refuses_shuffled_or_reordered_data():
    chains = Chains(models())
    x, y = data(1, batch=30)[0]
    ds = torch.utils.data.TensorDataset(x, y)
    with pytest.raises(ValueError, match="shuffle"):
        ChainAverager(chains, torch.utils.data.DataLoader(ds, batch_size=10, shuffle=True))

    class Reorder:
        def __init__(self):
            self.k = 0

        def __iter__(self):
            self.k += 1
            perm = torch.randperm(30, generator=torch.Generator().manual_seed(self.k))
            return iter([(x[perm], y[perm])])

    avg = ChainAverager(chains, Reorder())
    avg.collect()
    with pytest.raises(ValueError, match="different order"):
        avg.collect()


# ----------------------------------------------------------------------------- Hessians
def test_per_chain_hessian_diagnostics_of_known_quadratics():
    """Chain c: loss sum_e 0.5 a_c theta_e^2, Hessian a_c I: trace a_c P (Hutchinson with
    Rademacher probes is exact on a diagonal Hessian), lambda_max a_c."""
    p = 12
    chains = Chains([Quad(p, a=c + 1.5) for c in range(N)])
    batch = (torch.zeros(2, 1), torch.zeros(2))
    tr = per_chain_hessian_trace(chains, total, batch, n_probes=4)
    lam = per_chain_hessian_lambda_max(chains, total, batch)
    for c in range(N):
        assert tr[c].estimate == pytest.approx((c + 1.5) * p, rel=1e-12)
        assert lam[c] == pytest.approx(c + 1.5, rel=1e-8)


# ----------------------------------------------------------------------------- split-R-hat
def _rhat_by_hand(chains):
    """BDA3 sec. 11.4, written out with the statistics module."""
    n_half = len(chains[0]) // 2
    halves = []
    for ch in chains:
        halves.append(ch[:n_half])
        halves.append(ch[len(ch) - n_half:])
    means = [statistics.fmean(h) for h in halves]
    w = statistics.fmean([statistics.variance(h) for h in halves])
    b = n_half * statistics.variance(means)
    return math.sqrt(((n_half - 1) / n_half * w + b / n_half) / w)


def test_split_rhat_against_a_hand_computation():
    draws = [[1.0, 2.0, 0.5, 3.0, 2.5, 1.5, 0.0], [2.0, 4.0, 3.5, 2.5, 5.0, 3.0, 4.5]]   # odd: middle dropped
    assert split_rhat(draws) == pytest.approx(_rhat_by_hand(draws), rel=1e-12)
    # the same numbers worked through: halves [1,2,.5] [2.5,1.5,0] [2,4,3.5] [5,3,4.5]
    means = [3.5 / 3, 4 / 3, 9.5 / 3, 12.5 / 3]
    variances = [0.5833333333333334, 1.5833333333333333, 1.0833333333333333, 1.0833333333333333]
    w, b = sum(variances) / 4, 3 * statistics.variance(means)
    assert split_rhat(draws) == pytest.approx(math.sqrt((2 / 3 * w + b / 3) / w), rel=1e-12)
    with pytest.raises(ValueError, match=">= 4 draws"):
        split_rhat([[1.0, 2.0, 3.0]])
    with pytest.raises(ValueError, match="finite"):
        split_rhat([[1.0, 2.0, math.nan, 3.0]])
    assert math.isnan(split_rhat(torch.ones(2, 6)))


@pytest.mark.parametrize("rank_normalize", [False, True])
def test_split_rhat_iid_near_one_and_shifted_means_large(rank_normalize):
    """iid chains: with m = 8 halves of n = 500 draws, B/W ~ chi2_7 / 7 (sd sqrt(2/7)), and
    R-hat^2 = (n-1)/n + B/(W n), so R-hat - 1 < sqrt(1 + 5 sd / n) - 1 at 5 sd."""
    g = torch.Generator().manual_seed(0)
    m, n = N, 1000
    iid = torch.randn(m, n, generator=g, dtype=torch.float64)
    bound = math.sqrt(1 + 5 * math.sqrt(2 / (2 * m - 1)) / (n // 2)) - 1
    r = split_rhat(iid, rank_normalize=rank_normalize)
    assert math.sqrt((n // 2 - 1) / (n // 2)) - 1e-12 <= r < 1 + bound
    shifted = iid + torch.arange(m, dtype=torch.float64)[:, None]
    assert split_rhat(shifted, rank_normalize=rank_normalize) > 1.1
    # a chain that drifts within itself: split-R-hat sees it even with equal chain means
    drift = iid + torch.linspace(-2, 2, n, dtype=torch.float64)
    assert split_rhat(drift, rank_normalize=rank_normalize) > 1.1


def test_rank_normalized_rhat_sees_different_scales():
    """Same means, scales 1 and 3: the bulk R-hat stays ~1, the folded (tail) one does not
    (Vehtari et al. 2021, sec. 4.2); the rank version is their maximum."""
    from scipy.special import ndtri
    from scipy.stats import rankdata

    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 1000, generator=g, dtype=torch.float64) * torch.tensor([1.0, 1.0, 3.0, 3.0])[:, None]
    assert split_rhat(x) < 1.01
    r = split_rhat(x, rank_normalize=True)
    assert r > 1.01

    def scores(v):
        rk = rankdata(v.reshape(-1).numpy())
        return torch.from_numpy(ndtri((rk - 0.375) / (v.numel() + 0.25))).reshape(v.shape)

    folded = (x - x.reshape(-1).median()).abs()
    assert r == pytest.approx(max(split_rhat(scores(x)), split_rhat(scores(folded))), rel=1e-12)
