"""The CPU list ops (perturb_list_, restore_and_step_list_): every tensor of a bucket in one
parallel loop. Bitwise equal to the same ops over each tensor alone (a one-tensor list,
tests/cpp_per_tensor.py) at the same offsets, over random lists of
tensor sizes (1-element tensors, sizes and offsets not a multiple of 4), every dtype, every
update variant, every CPU ISA and thread count; clear errors for bad lists."""
import random

import pytest
import torch

from fused_flat.backends import cpp as ops
from tests import cpp_per_tensor as cpt

pytestmark = pytest.mark.skipif(not ops.has_list_ops(), reason="needs the compiled CPU list ops")
ISAS = ("baseline", "avx2", "avx512")


def _isas():
    out = []
    for isa in ISAS:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("FUSED_FLAT_CPU_ISA", isa)
            try:
                cpt.perturb_(torch.zeros(8), 1, 0, 0, 0, 1.0, 0)
            except RuntimeError:
                continue
        out.append(isa)
    return out


def _sizes(rng, k):
    return [rng.choice([1, 2, 3, 5, 7, 64, 1000, 4097, 20_000, 70_001]) for _ in range(k)]


def _offsets(sizes, start):
    offs, o = [], start
    for n in sizes:   # the bucket rule (round up to 4) or, for shards, any odd start
        offs.append(o)
        o += n + (n % 3)
    return offs


def _lists(sizes, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g).to(dtype) for n in sizes]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("case", range(6))
def test_perturb_list_equals_per_tensor(dtype, case):
    rng = random.Random(case)
    sizes = _sizes(rng, rng.randint(1, 12))
    offs = _offsets(sizes, rng.choice([0, 1, 3, 4 * (2 ** 32 - 40) + 2]))
    for isa in _isas():
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("FUSED_FLAT_CPU_ISA", isa)
            a, b = _lists(sizes, dtype, case), _lists(sizes, dtype, case)
            ops.perturb_list_(a, offs, 12345, 3, 7 + case, 5, 0.01)
            for p, off in zip(b, offs):
                cpt.perturb_(p, 12345, 3, 7 + case, 5, 0.01, off)
            for x, y in zip(a, b):
                assert torch.equal(x, y), (isa, dtype, x.numel())


VARIANTS = [
    dict(momentum=0.0, sigma=0.01, noise_std=1e-3),
    dict(momentum=0.9, sigma=0.01, noise_std=1e-3, nesterov=True),
    dict(momentum=0.9, sigma=0.0, noise_std=1e-3, momentum_init=True),
    dict(momentum=0.0, sigma=0.01, noise_std=0.0),
    dict(momentum=0.5, sigma=0.0, noise_std=0.0, dampening=0.1),
    dict(momentum=0.0, sigma=0.01, noise_std=1e-3, sr=True),
    dict(momentum=0.9, sigma=0.01, noise_std=1e-3, scale=True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("vi", range(len(VARIANTS)))
def test_restore_and_step_list_equals_per_tensor(dtype, vi):
    v = VARIANTS[vi]
    rng = random.Random(100 + vi)
    sizes = _sizes(rng, rng.randint(1, 10))
    offs = _offsets(sizes, rng.choice([0, 2, 5]))
    scale = torch.tensor([4.0]) if v.get("scale") else None
    args = dict(seed=99, bucket_id=1, step=11, restore_tag=0, sigma=v["sigma"], lr=0.05,
                weight_decay=1e-3, momentum=v["momentum"], dampening=v.get("dampening", 0.0),
                nesterov=v.get("nesterov", False), momentum_init=v.get("momentum_init", False),
                noise_std=v["noise_std"], grad_mult=0.5)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for isa in _isas():
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("FUSED_FLAT_CPU_ISA", isa)
                pa, pb = _lists(sizes, dtype, 1), _lists(sizes, dtype, 1)
                gr = _lists(sizes, dtype, 2)
                ma = _lists(sizes, dtype, 3) if v["momentum"] else None
                mb = _lists(sizes, dtype, 3) if v["momentum"] else None
                ops.restore_and_step_list_(pa, gr, ma, offs, scale, None,
                                           stochastic_rounding=v.get("sr", False), **args)
                for t, (p, off) in enumerate(zip(pb, offs)):
                    cpt.restore_and_step_(p, gr[t], mb[t] if mb else None, scale, None,
                                          args["seed"], args["bucket_id"], args["step"], off,
                                          args["restore_tag"], args["sigma"], args["lr"],
                                          args["weight_decay"], args["momentum"],
                                          args["dampening"], args["nesterov"],
                                          args["momentum_init"], args["noise_std"],
                                          args["grad_mult"], v.get("sr", False))
                for x, y in zip(pa, pb):
                    assert torch.equal(x, y), (isa, threads, dtype, x.numel())
                if ma:
                    for x, y in zip(ma, mb):
                        assert torch.equal(x, y)
    torch.set_num_threads(2)


def test_restore_list_skipped_step_only_restores():
    sizes = [5, 300, 1]
    offs = _offsets(sizes, 0)
    orig = _lists(sizes, torch.float32, 4)
    ps = [p.clone() for p in orig]
    moms = _lists(sizes, torch.float32, 5)
    moms0 = [m.clone() for m in moms]
    ops.perturb_list_(ps, offs, 7, 0, 3, 0, 0.02)
    ops.restore_and_step_list_(ps, _lists(sizes, torch.float32, 6), moms, offs, None,
                               torch.ones(1), 7, 0, 3, 0, 0.02, 0.1, 0.0, 0.9, 0.0, False, False,
                               1e-3, 1.0)
    for p, o in zip(ps, orig):
        torch.testing.assert_close(p, o, rtol=0, atol=1e-6)   # regenerated eps: within 1 ulp
    for m, m0 in zip(moms, moms0):
        assert torch.equal(m, m0)


def test_list_errors():
    a, b = torch.zeros(4), torch.zeros(4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="one dtype"):
        ops.perturb_list_([a, b], [0, 4], 1, 0, 0, 0, 1.0)
    with pytest.raises(RuntimeError, match="offsets"):
        ops.perturb_list_([a], [0, 4], 1, 0, 0, 0, 1.0)
    with pytest.raises(RuntimeError, match="moms"):
        ops.restore_and_step_list_([a], [a.clone()], [a.clone(), a.clone()], [0], None, None, 1, 0,
                                   0, 0, 0.1, 0.1, 0.0, 0.9, 0.0, False, False, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="grad"):
        ops.restore_and_step_list_([a], [torch.zeros(5)], None, [0], None, None, 1, 0, 0, 0, 0.1,
                                   0.1, 0.0, 0.0, 0.0, False, False, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="contiguous 1-D"):
        ops.perturb_list_([torch.zeros(4, 4)], [0], 1, 0, 0, 0, 1.0)


def test_optimizer_uses_one_call_per_pass():
    """The 'cpp' backend's eager step calls the list ops once per bucket and pass."""
    import fused_flat
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = fused_flat.FSGLD(m.parameters(), lr=0.1, beta=1e4, seed=1, backend="cpp")

    def closure():
        opt.zero_grad()
        loss = m(torch.randn(3, 4)).square().mean()
        loss.backward()
        return loss

    with torch.profiler.profile() as prof:
        opt.step(closure)
    names = [e.name for e in prof.events()]
    assert names.count("fused_flat::perturb_list_") == 1
    assert names.count("fused_flat::restore_and_step_list_") == 1
    called = {n for n in names if n.startswith("fused_flat::")}
    assert called <= {"fused_flat::perturb_list_", "fused_flat::restore_and_step_list_",
                      "fused_flat::all_finite", "fused_flat::restore_check_list_",
                      "fused_flat::check_step_list", "fused_flat::plan_layout"}, called


# ---------------------------------------------------------------- checked restore (cpp, fp32)
def _run_fsgld(checked_path: bool, nan_at=None, n_perturbations=1):
    """FSGLD on the cpp backend, check_finite on; ``checked_path`` False forces the separate
    all_finite + fused restore_and_step_ path by removing Backend.restore_check_."""
    import dataclasses

    import fused_flat
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3),
                            torch.nn.Linear(3, 3))
    last = m[3]
    opt = fused_flat.FSGLD(m.parameters(), lr=0.05, beta=1e4, momentum=0.9, weight_decay=1e-3,
                           seed=4, backend="cpp", n_perturbations=n_perturbations)
    opt.buckets()
    if not checked_path:
        opt._backends = [dataclasses.replace(b, restore_check_=None) for b in opt._backends]
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
    snaps = []
    for s in range(5):
        def closure():
            opt.zero_grad()
            out = m[2](m[1](m[0](x)))
            if s % 2 == 0:            # the last layer is perturbed but gets no gradient
                out = last(out)       # every other step
            loss = (out - y).square().mean()
            loss.backward()
            if nan_at == s:
                m[0].weight.grad[1, 2] = float("nan")
            return loss
        before = [p.detach().clone() for p in m.parameters()]
        moms = {p: opt.state[p]["momentum_buffer"].clone() for p in m.parameters()
                if p in opt.state and "momentum_buffer" in opt.state[p]}
        with torch.profiler.profile() as prof:
            opt.step(closure)
        names = [e.name for e in prof.events()]
        snaps.append(([p.detach().clone() for p in m.parameters()], before, moms,
                      "fused_flat::restore_check_list_" in names))
    return opt, m, snaps


@pytest.mark.parametrize("nan_at", [None, 2])
@pytest.mark.parametrize("n_perturbations", [1, 2])
def test_checked_restore_equals_separate_check(nan_at, n_perturbations):
    """The one-pass restore + check gives the bits of all_finite + the fused restore pass,
    skipped step included; parameters without a gradient are restored too."""
    with pytest.warns(RuntimeWarning, match="non-finite") if nan_at is not None else _nullcontext():
        opt_a, m_a, snaps_a = _run_fsgld(True, nan_at, n_perturbations)
    with pytest.warns(RuntimeWarning, match="non-finite") if nan_at is not None else _nullcontext():
        opt_b, m_b, snaps_b = _run_fsgld(False, nan_at, n_perturbations)
    assert all(s[3] for s in snaps_a) and not any(s[3] for s in snaps_b)
    for (pa, _, _, _), (pb, _, _, _) in zip(snaps_a, snaps_b):
        for x, y in zip(pa, pb):
            assert torch.equal(x, y)
    assert opt_a.skipped_steps == opt_b.skipped_steps == (0 if nan_at is None else 1)
    if nan_at is not None:   # the skipped step: weights back (regenerated eps), momentum untouched
        after, before, moms, _ = snaps_a[nan_at]
        for x, y in zip(after, before):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
        moms_after = snaps_a[nan_at + 1][2]   # read before the next step
        assert moms and moms_after.keys() == moms.keys()
        for p, mb in moms.items():
            assert torch.equal(moms_after[p], mb)


def _nullcontext():
    import contextlib
    return contextlib.nullcontext()


def test_restore_check_list_matches_fused_pass_and_detects_nonfinite():
    sizes = [1, 3, 4097, 70_001, 2]
    offs = _offsets(sizes, 1)
    ps = _lists(sizes, torch.float32, 1)
    gs = _lists(sizes, torch.float32, 2)
    a, b = [p.clone() for p in ps], [p.clone() for p in ps]
    ops.perturb_list_(a, offs, 5, 2, 9, 0, 0.01)
    ops.perturb_list_(b, offs, 5, 2, 9, 0, 0.01)
    ops.restore_and_step_list_(a, gs, None, offs, None, None, 5, 2, 9, 0, 0.01, 0.1, 1e-3, 0.0,
                               0.0, False, False, 1e-3, 1.0)
    assert ops.restore_check_list_(b, gs, offs, 5, 2, 9, 0, -0.01).item() == 0.0
    ops.restore_and_step_list_(b, gs, None, offs, None, None, 5, 2, 9, 0, 0.0, 0.1, 1e-3, 0.0,
                               0.0, False, False, 1e-3, 1.0)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    for t, pos in ((0, 0), (1, 2), (2, 4096), (3, 35_000), (4, 1)):   # edges and whole calls
        for bad in (float("inf"), float("-inf"), float("nan")):
            g2 = [g.clone() for g in gs]
            g2[t][pos] = bad
            assert ops.restore_check_list_([p.clone() for p in ps], g2, offs, 5, 2, 9, 0,
                                           -0.01).item() == 1.0
