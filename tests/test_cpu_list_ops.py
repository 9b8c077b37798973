"""The CPU list ops (perturb_list_, restore_and_step_list_): every tensor of a bucket in one
parallel loop. Bitwise equal to the per-tensor ops at the same offsets, over random lists of
tensor sizes (1-element tensors, sizes and offsets not a multiple of 4), every dtype, every
update variant, every CPU ISA and thread count; clear errors for bad lists."""
import random

import pytest
import torch

from fused_flat import ops

pytestmark = pytest.mark.skipif(not ops.has_list_ops(), reason="needs the compiled CPU list ops")
ISAS = ("baseline", "avx2", "avx512")


def _isas():
    out = []
    for isa in ISAS:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("FUSED_FLAT_CPU_ISA", isa)
            try:
                ops.perturb_(torch.zeros(8), 1, 0, 0, 0, 1.0, 0)
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
                ops.perturb_(p, 12345, 3, 7 + case, 5, 0.01, off)
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
                    ops.restore_and_step_(p, gr[t], mb[t] if mb else None, scale, None,
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
    assert "fused_flat::perturb_" not in names and "fused_flat::restore_and_step_" not in names
