"""Device-resident per-step scalars of the Triton list ops (the contract that the
optimizers' ``capturable=True`` builds on; module docstrings of fused_flat/backends/triton/multi.py
and fused_flat/backends/triton/sam.py):

* ``step``: an int or a one-element int64 tensor on the params' device (low 32 bits used);
* ``lr`` / ``noise_std``: a float or a one-element float64 / float32 tensor (rounded to fp32
  in the kernel, as the launcher rounds a Python float).

Checked here, under the interpreter: the tensor path is bit for bit the scalar path (fp32,
bf16 and fp16 with and without stochastic rounding, with momentum, several steps with the
tensors updated in place as a replayed graph would, steps >= 2^31 and >= 2^32 for the
low-32-bit rule); no host read of the tensors (a dispatch mode that fails on
``aten._local_scalar_dense`` of them, i.e. ``.item()``, ``int()``, ``float()``, ``bool()``,
during real runs; the wrappers under FakeTensorMode, where each pass is one registered op
whose fake runs, the scalars in its tensor arguments; and the ops' real implementations on
CPU tensors with the launches recorded, the scalars handed to the kernels as pointers);
malformed tensors raise ValueError. That per-step scalars never recompile is checked by
tests/test_triton_list_aot.py (Triton's binder, no GPU needed).
"""
from __future__ import annotations

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 (set by conftest) or a GPU", allow_module_level=True)
pytest.importorskip("triton")

from fused_flat.backends.triton import multi as tm  # noqa: E402
from fused_flat.backends.triton import sam as tsam  # noqa: E402
from tests.helpers import RecordOps  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SEED, BUCKET = 0x2545F4914F6CDD1D, 3
# step counters: small, >= 2^31 (int32 overflow), >= 2^32 (only the low 32 bits count)
STEPS = [1, 16, 2 ** 31 + 3, 2 ** 32 + 5, 2 ** 40 + 2 ** 32 - 1]
SIZES = [1, 33, 96, 70, 5]
OFFSETS = [0, 3, 2 ** 33 + 1, 101, 7]
SIZES4 = [4, 33, 96]
OFFSETS4 = [0, 4, 40]          # all multiples of 4 (the SAM kernel's OFF4 path)


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    monkeypatch.setattr(tm, "BLOCK", 32)
    monkeypatch.setattr(tm, "CHUNK", 96)
    monkeypatch.setattr(tsam, "BLOCK", 32)
    monkeypatch.setattr(tsam, "CHUNK", 96)


class NoHostRead(TorchDispatchMode):
    """Fails on any host read (aten._local_scalar_dense: item / int / float / bool) of the
    watched tensors; everything else runs (each call's launch tables are built from host
    values, the tensors' sizes and data pointers, never from a device scalar)."""

    def __init__(self, *watched):
        super().__init__()
        self.storages = {t.untyped_storage().data_ptr() for t in watched}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and \
                args[0].untyped_storage().data_ptr() in self.storages:
            raise AssertionError(f"host read of a device scalar: {func}")
        return func(*args, **(kwargs or {}))


def _lists(sizes, dtype, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=gen, dtype=torch.float64) * scale).to(dtype).to(DEVICE)
            for n in sizes]


def _clone(ts):
    return None if ts is None else [t.clone() for t in ts]


def _bits_equal(got, want, what):
    for i, (a, b) in enumerate(zip(got, want)):
        if a.dtype.itemsize == 2:
            a, b = a.view(torch.int16), b.view(torch.int16)
        else:
            a, b = a.view(torch.int32), b.view(torch.int32)
        assert torch.equal(a, b), f"{what}[{i}]: {int((a != b).sum())} of {a.numel()} differ"


def _i64(k, shape=()):
    return torch.tensor(k, dtype=torch.int64, device=DEVICE).reshape(shape)


def _f(x, dtype=torch.float64, shape=()):
    return torch.tensor(x, dtype=dtype, device=DEVICE).reshape(shape)


def _lr(k):
    """Per-step values whose fp64 -> fp32 rounding is not a truncation (0.1 rounds up)."""
    return [0.1, 1.0 / 3, 0.05, 0.7, 2.0 / 3][k % 5]


# ------------------------------------------------------------------ perturb
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(), (1,)])
def test_perturb_tensor_step_is_the_int_step(dtype, shape):
    want = _lists(SIZES, dtype, 1)
    got = _clone(want)
    step_t = _i64(0, shape)
    for k in STEPS:
        tm.perturb_(want, OFFSETS, SEED, BUCKET, k, 5, 0.3)
        step_t.fill_(k)                            # updated in place, as a graph replay
        with NoHostRead(step_t):
            tm.perturb_(got, OFFSETS, SEED, BUCKET, step_t, 5, 0.3)
        _bits_equal(got, want, f"perturb step {k}")


def test_perturb_step_uses_the_low_32_bits():
    a, b = _lists([70], torch.float32, 2), _lists([70], torch.float32, 2)
    tm.perturb_(a, [1], SEED, BUCKET, _i64(2 ** 32 + 7), 0, 1.0)
    tm.perturb_(b, [1], SEED, BUCKET, 7, 0, 1.0)
    _bits_equal(a, b, "step 2^32 + 7 is step 7")


# ------------------------------------------------------------------ restore + update
RS_CASES = {
    # name: (dtype, stochastic_rounding, momentum, nesterov, restore_tag)
    "fp32": (torch.float32, False, 0.0, False, 7),
    "fp32_mom": (torch.float32, False, 0.9, True, 7),
    "bf16_mom": (torch.bfloat16, False, 0.9, False, 0),
    "bf16_sr": (torch.bfloat16, True, 0.0, False, 0),
    "bf16_sr_mom_tag5": (torch.bfloat16, True, 0.9, True, 5),
    "fp16_sr_mom": (torch.float16, True, 0.9, False, 0),
}


def _rs_steps(params, grads, moms, step_arg, lr_arg, ns_arg, sr, mu, nest, tag, found_inf,
              before_step=None):
    """Several steps (perturb, then restore + update) with per-step step / lr / noise_std."""
    for k in STEPS:
        if before_step is not None:
            before_step(k)
        sigma = 0.05
        tm.perturb_(params, OFFSETS, SEED, BUCKET, step_arg(k), tag, sigma)
        tm.restore_and_step_(params, grads, moms, OFFSETS, None, found_inf, SEED, BUCKET,
                             step_arg(k), tag, sigma, lr_arg(k), 1e-3, mu, 0.1, nest, k == 1,
                             ns_arg(k), 0.5, stochastic_rounding=sr)


@pytest.mark.parametrize("name,scalar_dtype",
                         [(n, torch.float64) for n in RS_CASES]
                         + [(n, torch.float32) for n in ("fp32_mom", "bf16_sr")])
def test_restore_and_step_device_scalars_are_the_scalar_path(name, scalar_dtype):
    dtype, sr, mu, nest, tag = RS_CASES[name]
    params, grads = _lists(SIZES, dtype, 3, 4.0), _lists(SIZES, dtype, 4)
    moms = _lists(SIZES, dtype, 5, 0.1) if mu else None
    fi = torch.zeros(1, dtype=torch.float32, device=DEVICE)
    want = (_clone(params), _clone(moms))
    # the scalar path: what a float32 tensor holds is the fp32 rounding of the value
    cast = (lambda x: x) if scalar_dtype == torch.float64 else \
        (lambda x: float(torch.tensor(x, dtype=torch.float32)))
    _rs_steps(want[0], grads, want[1], lambda k: k, lambda k: cast(_lr(k)),
              lambda k: cast(1e-3 * _lr(k)), sr, mu, nest, tag, fi)
    step_t, lr_t = _i64(0, (1,)), _f(0.0, scalar_dtype)
    ns_t = _f(0.0, scalar_dtype, (1,))

    def fill(k):
        step_t.fill_(k)
        lr_t.fill_(_lr(k))
        ns_t.fill_(1e-3 * _lr(k))

    got = (_clone(params), _clone(moms))
    with NoHostRead(step_t, lr_t, ns_t, fi):
        _rs_steps(got[0], grads, got[1], lambda k: step_t, lambda k: lr_t, lambda k: ns_t, sr,
                  mu, nest, tag, fi, before_step=fill)
    _bits_equal(got[0], want[0], f"{name} theta")
    if moms is not None:
        _bits_equal(got[1], want[1], f"{name} momentum")


@pytest.mark.parametrize("dtype,sr", [(torch.float32, False), (torch.bfloat16, True)])
def test_restore_and_step_each_tensor_alone(dtype, sr):
    """Only one of step / lr / noise_std a tensor at a time (each constexpr on its own)."""
    params, grads = _lists(SIZES, dtype, 6, 4.0), _lists(SIZES, dtype, 7)
    k, lr, ns = 2 ** 32 + 9, 0.1, 3e-3
    args = dict(step=k, lr=lr, noise_std=ns)
    tensors = dict(step=_i64(k), lr=_f(lr), noise_std=_f(ns, shape=(1,)))

    def run(p, a):
        tm.restore_and_step_(p, grads, None, OFFSETS, None, None, SEED, BUCKET, a["step"], 0,
                             0.05, a["lr"], 1e-3, 0.0, 0.0, False, False, a["noise_std"], 1.0,
                             stochastic_rounding=sr)

    want = _clone(params)
    run(want, args)
    for name, t in tensors.items():
        got = _clone(params)
        with NoHostRead(t):
            run(got, dict(args, **{name: t}))
        _bits_equal(got, want, f"tensor {name}")


def test_noise_std_tensor_zero_draws_xi_and_adds_nothing():
    """A tensor noise_std always draws xi (its value is not known on the host); at 0.0 the
    result is the noiseless step's."""
    params, grads = _lists(SIZES, torch.float32, 8), _lists(SIZES, torch.float32, 9)
    want, got = _clone(params), _clone(params)
    common = (None, None, SEED, BUCKET, 4, 0, 0.0, 0.1, 0.0, 0.0, 0.0, False, False)
    tm.restore_and_step_(want, grads, None, OFFSETS, *common, 0.0, 1.0)
    tm.restore_and_step_(got, grads, None, OFFSETS, *common, _f(0.0), 1.0)
    _bits_equal(got, want, "noise_std tensor 0.0")


def test_fp64_lists_are_refused_with_device_scalars_too():
    """fp64 lists are not the kernels' (fused_flat.backends.resolve gives fp64 buckets to
    another backend): refused with a ValueError, never read on the host nor handed on."""
    params, grads = _lists([5, 9], torch.float64, 10), _lists([5, 9], torch.float64, 11)
    before = _clone(params)
    k = 2 ** 32 + 3
    with pytest.raises(ValueError, match="float64 tensors are not supported"):
        tm.perturb_(params, [1, 6], SEED, BUCKET, _i64(k), 0, 0.05)
    with pytest.raises(ValueError, match="float64 tensors are not supported"):
        tm.restore_and_step_(params, grads, None, [1, 6], None, None, SEED, BUCKET, _i64(k), 0,
                             0.05, _f(0.1), 0.0, 0.0, 0.0, False, False, _f(1e-3), 1.0)
    _bits_equal(params, before, "fp64 untouched")


# ------------------------------------------------------------------ SAM
SAM_CASES = {
    # name: (dtype, stochastic_rounding, momentum, sizes, offsets)
    "fp32_mom": (torch.float32, False, 0.9, SIZES, OFFSETS),
    "bf16_sr": (torch.bfloat16, True, 0.0, SIZES, OFFSETS),
    "bf16_sr_mom_off4": (torch.bfloat16, True, 0.9, SIZES4, OFFSETS4),
    "fp16_sr_mom": (torch.float16, True, 0.9, SIZES, OFFSETS),
    "bf16_mom": (torch.bfloat16, False, 0.9, SIZES, OFFSETS),
}


@pytest.mark.parametrize("name,lr_dtype",
                         [(n, torch.float64) for n in SAM_CASES]
                         + [(n, torch.float32) for n in ("fp32_mom", "bf16_sr")])
def test_sam_restore_and_step_device_scalars_are_the_scalar_path(name, lr_dtype):
    dtype, sr, mu, sizes, offsets = SAM_CASES[name]
    backups, grads = _lists(sizes, dtype, 12, 4.0), _lists(sizes, dtype, 13)
    moms = _lists(sizes, dtype, 14, 0.1) if mu else None
    params = [torch.empty_like(b) for b in backups]
    cast = (lambda x: x) if lr_dtype == torch.float64 else \
        (lambda x: float(torch.tensor(x, dtype=torch.float32)))
    step_t, lr_t = _i64(0), _f(0.0, lr_dtype, (1,))
    want, got = _clone(moms), _clone(moms)
    wp, gp = _clone(params), _clone(params)
    for k in STEPS:
        tsam.sam_restore_and_step_(wp, backups, grads, want, None, None, cast(_lr(k)), 1e-3, mu,
                                   0.0, False, k == 1, 1.0, sr, SEED, BUCKET, k, offsets)
        step_t.fill_(k)
        lr_t.fill_(_lr(k))
        with NoHostRead(step_t, lr_t):
            tsam.sam_restore_and_step_(gp, backups, grads, got, None, None, lr_t, 1e-3, mu, 0.0,
                                       False, k == 1, 1.0, sr, SEED, BUCKET, step_t, offsets)
        _bits_equal(gp, wp, f"{name} theta step {k}")
        if moms is not None:
            _bits_equal(got, want, f"{name} momentum step {k}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sam_probe_tensor_step_is_the_int_step(dtype):
    params = _lists(SIZES, dtype, 15)
    step_t = _i64(0, (1,))
    for k in STEPS:
        want, got = _clone(params), _clone(params)
        bw, bg = [torch.empty_like(p) for p in params], [torch.empty_like(p) for p in params]
        tsam.sam_probe_(want, bw, OFFSETS, SEED, BUCKET, k, 1e-2)
        step_t.fill_(k)
        with NoHostRead(step_t):
            tsam.sam_probe_(got, bg, OFFSETS, SEED, BUCKET, step_t, 1e-2)
        _bits_equal(got, want, f"probe step {k}")
        _bits_equal(bg, params, "probe backup")


def test_sam_perturb_coef_tensor_no_host_read():
    params, grads = _lists(SIZES, torch.float32, 16), _lists(SIZES, torch.float32, 17)
    want, got = _clone(params), _clone(params)
    coef = _f(0.25, torch.float32, (1,))
    tsam.sam_perturb_(want, grads, [torch.empty_like(p) for p in params], False, 0.25, 0.0)
    with NoHostRead(coef):
        tsam.sam_perturb_(got, grads, [torch.empty_like(p) for p in params], False, coef, 0.0)
    _bits_equal(got, want, "sam_perturb_ coef tensor")


# ------------------------------------------------------------------ bad tensors
def _bad_scalars():
    other = "meta"   # a device that is not the params'
    return {
        "step": [torch.tensor(3, dtype=torch.int32, device=DEVICE),
                 torch.tensor(3.0, dtype=torch.float64, device=DEVICE),
                 torch.tensor([3, 4], dtype=torch.int64, device=DEVICE),
                 torch.tensor(3, dtype=torch.int64, device=other)],
        "float": [torch.tensor(0.1, dtype=torch.bfloat16, device=DEVICE),
                  torch.tensor(1, dtype=torch.int64, device=DEVICE),
                  torch.zeros(2, dtype=torch.float64, device=DEVICE),
                  torch.zeros((), dtype=torch.float64, device=other)],
    }


def test_malformed_device_scalars_raise():
    p, g = _lists([5], torch.bfloat16, 18), _lists([5], torch.bfloat16, 19)
    bad = _bad_scalars()
    rs = (None, None, SEED, BUCKET)
    for s in bad["step"]:
        with pytest.raises(ValueError, match="step must be an int or a one-element torch.int64"):
            tm.perturb_(p, [0], SEED, BUCKET, s, 0, 0.1)
        with pytest.raises(ValueError, match="step must be"):
            tm.restore_and_step_(p, g, None, [0], *rs, s, 0, 0.1, 0.1, 0.0, 0.0, 0.0, False,
                                 False, 1e-3, 1.0)
        with pytest.raises(ValueError, match="step must be"):
            tsam.sam_restore_and_step_(p, _clone(p), g, None, None, None, 0.1, 0.0, 0.0, 0.0,
                                       False, False, 1.0, True, SEED, BUCKET, s, [0])
        with pytest.raises(ValueError, match="step must be"):
            tsam.sam_probe_(p, _clone(p), [0], SEED, BUCKET, s, 1e-3)
    for x in bad["float"]:
        for name, i in (("lr", 0), ("noise_std", 1)):
            lr, ns = (x, 1e-3) if i == 0 else (0.1, x)
            with pytest.raises(ValueError, match=f"{name} must be a float or a one-element "
                                                 f"torch.float64"):
                tm.restore_and_step_(p, g, None, [0], *rs, 1, 0, 0.1, lr, 0.0, 0.0, 0.0, False,
                                     False, ns, 1.0)
        with pytest.raises(ValueError, match="lr must be a float or a one-element"):
            tsam.sam_restore_and_step_(p, _clone(p), g, None, None, None, x, 0.0, 0.0, 0.0,
                                       False, False, 1.0)


# ------------------------------------------------------------------ FakeTensorMode
class _Record:
    """Stands in for a @triton.jit kernel: records the launch instead of running it (a
    Triton kernel cannot run on fake tensors)."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.calls.append((args, kw))
        return launch


def test_wrappers_make_no_host_read_under_fake_tensor_mode():
    """The wrappers on fake CUDA tensors (FakeTensorMode raises on any host read of a
    tensor's value): argument checks on metadata only, then ONE registered op per pass, whose
    fake implementation runs, with the device scalars in its tensor arguments and 0 in the
    number ones. The op's real implementation (tables, launch) cannot run on fake tensors:
    test_ops_hand_device_scalars_to_the_kernels below runs it on CPU tensors, and
    tests/test_gpu_sync.py on a GPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        dev = "cuda"
        p = [torch.empty(n, dtype=torch.bfloat16, device=dev) for n in (5, 70)]
        g = [torch.empty_like(t) for t in p]
        m = [torch.empty_like(t) for t in p]
        b = [torch.empty_like(t) for t in p]
        step = torch.zeros((), dtype=torch.int64, device=dev)
        lr = torch.zeros((), dtype=torch.float64, device=dev)
        ns = torch.zeros(1, dtype=torch.float64, device=dev)
        coef = torch.zeros(1, dtype=torch.float32, device=dev)
        fi = torch.zeros(1, dtype=torch.float32, device=dev)
        with pytest.raises(Exception):   # the mode does catch host reads
            int(step)
        with RecordOps("fused_flat_triton") as rec:
            tm.perturb_(p, [0, 5], SEED, BUCKET, step, 0, 0.1)
            tm.restore_and_step_(p, g, m, [0, 5], None, fi, SEED, BUCKET, step, 0, 0.1, lr, 0.0,
                                 0.9, 0.0, True, False, ns, 1.0, stochastic_rounding=True)
            tsam.sam_restore_and_step_(p, b, g, m, None, fi, lr, 0.0, 0.9, 0.0, False, False,
                                       1.0, True, SEED, BUCKET, step, [0, 5])
            tsam.sam_probe_(p, b, [0, 5], SEED, BUCKET, step, 1e-3)
            tsam.sam_perturb_(p, g, b, False, coef, 0.0)
            norm = tsam.sam_grad_sq_norm(g, p, 0.0)
            found = tm.all_finite(g)
    assert norm.shape == () and norm.dtype == torch.float64 and norm.device.type == "cuda"
    assert found.shape == (1,) and found.dtype == torch.float32 and found.device.type == "cuda"
    calls = dict(rec.calls)
    assert [c[0] for c in rec.calls] == [
        "perturb_list_", "restore_and_step_list_", "sam_restore_and_step_list_",
        "sam_probe_list_", "sam_perturb_list_", "sam_grad_sq_norm_list", "all_finite_list"]
    per = calls["perturb_list_"]
    assert per["step_t"] is step and per["step"] == 0 and per["offsets"] == [0, 5]
    rs = calls["restore_and_step_list_"]
    assert rs["step_t"] is step and rs["lr_t"] is lr and rs["noise_std_t"] is ns
    assert rs["lr"] == 0.0 and rs["noise_std"] == 0.0 and rs["found_inf"] is fi
    assert rs["stochastic_rounding"] is True and rs["moms"][1] is m[1]
    srs = calls["sam_restore_and_step_list_"]
    assert srs["lr_t"] is lr and srs["step_t"] is step and srs["stochastic_rounding"] is True
    assert srs["offsets"] == [0, 5]
    assert calls["sam_probe_list_"]["step_t"] is step
    sp = calls["sam_perturb_list_"]
    assert sp["coef_t"] is not None and sp["coef_t"].numel() == 1 and sp["coef"] == 0.0


def test_ops_hand_device_scalars_to_the_kernels(monkeypatch):
    """The ops' real implementations (CPU tensors, the kernels recorded instead of run):
    every device scalar reaches its kernel as a pointer (its *_PTR constexpr on), with the
    launch tables of this very call."""
    rec = {k: _Record() for k in ("perturb", "rs", "sam_rs", "probe", "sam_perturb")}
    monkeypatch.setattr(tm, "perturb_kernel", rec["perturb"])
    monkeypatch.setattr(tm, "restore_and_step_kernel", rec["rs"])
    monkeypatch.setattr(tsam, "restore_and_step_kernel", rec["sam_rs"])
    monkeypatch.setattr(tsam, "probe_kernel", rec["probe"])
    monkeypatch.setattr(tsam, "perturb_kernel", rec["sam_perturb"])
    p, g = _lists([5, 70], torch.bfloat16, 20), _lists([5, 70], torch.bfloat16, 21)
    m, b = _clone(g), _clone(p)
    step, lr, ns = _i64(7), _f(0.1), _f(1e-3, shape=(1,))
    coef = _f(0.5, torch.float32, (1,))
    tm.perturb_(p, [0, 5], SEED, BUCKET, step, 0, 0.1)
    tm.restore_and_step_(p, g, m, [0, 5], None, None, SEED, BUCKET, step, 0, 0.1, lr, 0.0,
                         0.9, 0.0, True, False, ns, 1.0, stochastic_rounding=True)
    tsam.sam_restore_and_step_(p, b, g, m, None, None, lr, 0.0, 0.9, 0.0, False, False, 1.0,
                               True, SEED, BUCKET, step, [0, 5])
    tsam.sam_probe_(p, b, [0, 5], SEED, BUCKET, step, 1e-3)
    tsam.sam_perturb_(p, g, b, False, coef, 0.0)
    (args, kw), = rec["perturb"].calls
    assert kw["STEP_PTR"] and args[5] is step
    assert args[2].tolist() == [[t.data_ptr() for t in p]]          # this call's pointers
    (args, kw), = rec["rs"].calls
    assert kw["STEP_PTR"] and kw["LR_PTR"] and kw["NOISE_STD_PTR"] and kw["NEED_XI"] and kw["SR"]
    assert args[7] is step and args[8] is lr and args[9] is ns
    assert args[2].tolist() == [[t.data_ptr() for t in lst] for lst in (p, g, m)]
    (args, kw), = rec["sam_rs"].calls
    assert kw["LR_PTR"] and kw["STEP_PTR"] and args[7] is lr and args[8] is step
    (args, kw), = rec["probe"].calls
    assert kw["STEP_PTR"] and args[5] is step
    (args, kw), = rec["sam_perturb"].calls
    assert kw["COEF_PTR"] and float(args[5]) == 0.5


def test_scalar_path_passes_no_pointers(monkeypatch):
    """Python scalars keep the scalar arguments: every *_PTR constexpr off."""
    rec = {k: _Record() for k in ("perturb", "rs", "sam_rs", "probe")}
    monkeypatch.setattr(tm, "perturb_kernel", rec["perturb"])
    monkeypatch.setattr(tm, "restore_and_step_kernel", rec["rs"])
    monkeypatch.setattr(tsam, "restore_and_step_kernel", rec["sam_rs"])
    monkeypatch.setattr(tsam, "probe_kernel", rec["probe"])
    p, g = _lists([5, 70], torch.bfloat16, 20), _lists([5, 70], torch.bfloat16, 21)
    k = 2 ** 32 + 5
    tm.perturb_(p, [0, 5], SEED, BUCKET, k, 0, 0.1)
    tm.restore_and_step_(p, g, None, [0, 5], None, None, SEED, BUCKET, k, 0, 0.1, 0.1, 0.0,
                         0.0, 0.0, False, False, 0.0, 1.0, stochastic_rounding=True)
    tsam.sam_restore_and_step_(p, _clone(p), g, None, None, None, 0.1, 0.0, 0.0, 0.0, False,
                               False, 1.0, True, SEED, BUCKET, k, [0, 5])
    tsam.sam_probe_(p, _clone(p), [0, 5], SEED, BUCKET, k, 1e-3)
    for name, r in rec.items():
        (args, kw), = r.calls
        assert not any(kw.get(c, False) for c in ("STEP_PTR", "LR_PTR", "NOISE_STD_PTR")), name
    (args, kw), = rec["rs"].calls
    assert not kw["NEED_XI"] and args[12] == 5 and args[15] == 0.1   # step & MASK32, lr
    assert tuple(args[10:12]) == (SEED, BUCKET << 8)   # layout 3: key = seed, bucket word
    (args, kw), = rec["perturb"].calls
    assert args[8] == 5 and tuple(args[6:8]) == (SEED, BUCKET << 8)
