"""fused_flat.integrations: Lightning's FusedFlatCallback, transformers' FusedFlatCallback and
FusedFlatTrainer. Each framework run is compared with the same run written as a plain
PyTorch loop (same model init, batches, optimizer seed): fSGLD with gradient accumulation
perturbs once per optimizer step, SAM takes g1 and g2 over the same examples, and
validation, evaluation and checkpoints hold the unperturbed weights. Tiny models, CPU,
no downloads."""
from __future__ import annotations

import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import fused_flat  # noqa: E402
from fused_flat import running_stats_frozen  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.filterwarnings(   # the frameworks' own notices about these tiny runs
    "ignore:You defined a `validation_step` but have no `val_dataloader`",
    "ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")
N, BS = 16, 4   # 4 micro-batches per epoch


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, 5, generator=g), torch.randn(N, 1, generator=g)


def make_net(bn: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(5, 8)] + ([nn.BatchNorm1d(8)] if bn else []) + [nn.Tanh(), nn.Linear(8, 1)]
    return nn.Sequential(*layers)


def snapshot(module: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in module.state_dict().values()]


def assert_same(a, b, exact: bool = True, atol: float = 1e-6) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if exact:
            assert torch.equal(x, y), (x - y).abs().max()
        else:
            torch.testing.assert_close(x, y, atol=atol, rtol=0)


def fsgld(params, **kw):
    # beta = 1e4: sigma ~ 0.1, so a wrong perturbation shows far above float tolerance
    return fused_flat.FSGLD(params, lr=0.1, beta=1e4, momentum=0.5, seed=7, **kw)


def cycles_of(epochs, acc: int) -> list[list]:
    """Accumulation cycles as both frameworks form them: ``acc`` micro-batches, the last
    cycle of an epoch shorter when ``acc`` does not divide it."""
    return [batches[c:c + acc] for batches in epochs for c in range(0, len(batches), acc)]


def plain_fsgld(cycles, divisor: int | None = None, **kw):
    """The reference: per cycle perturb once, backward of every micro-batch's loss / divisor
    (Lightning: accumulate_grad_batches always; the Trainer: the cycle's length), step.
    Returns the weights after each step (hist[k]: after k steps)."""
    net = make_net()
    opt = fsgld(net.parameters(), **kw)
    hist = [snapshot(net)]
    for cycle in cycles:
        opt.perturb()
        for x, y in cycle:
            (nn.functional.mse_loss(net(x), y) / (divisor or len(cycle))).backward()
        opt.step()
        opt.zero_grad()
        hist.append(snapshot(net))
    return hist


def steps_done(cycles) -> list[int]:
    """For micro-batch n = 1, 2, ...: the optimizer steps taken once it has run."""
    out = []
    for k, cycle in enumerate(cycles):
        out += [k] * (len(cycle) - 1) + [k + 1]
    return out


def plain_sam(cycles, bf16: bool = False, **kw):
    """davda54/sam's loop over accumulation cycles: g1 over the cycle's micro-batches at
    theta, first_step, g2 over the same micro-batches (BatchNorm frozen), second_step."""
    net = make_net(bn=True)
    opt = fused_flat.SAM(net.parameters(), **kw)

    def backward(x, y, n):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = nn.functional.mse_loss(net(x), y)
        (loss / n).backward()

    for cycle in cycles:
        for x, y in cycle:
            backward(x, y, len(cycle))
        opt.first_step(zero_grad=True)
        with running_stats_frozen(net):
            for x, y in cycle:
                backward(x, y, len(cycle))
        opt.second_step(zero_grad=True)
    return snapshot(net)


SAM_KW = dict(lr=0.1, momentum=0.9, rho=0.05)


# ===================================================================== Lightning
def lightning_parts(pl):
    """A LightningModule class and the loader for the lightning.pytorch or the
    pytorch_lightning package ``pl``."""
    X, Y = data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=BS,
                                         shuffle=False)

    class Module(pl.LightningModule):
        def __init__(self, opt_fn, bn: bool = False):
            super().__init__()
            self.net = make_net(bn)
            self.opt_fn = opt_fn
            self.n_micro = 0        # training_step calls so far
            self.val_seen = []      # (n_micro, weights) at each validation run

        def training_step(self, batch, batch_idx):
            self.n_micro += 1
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def validation_step(self, batch, batch_idx):
            if batch_idx == 0:
                self.val_seen.append((self.n_micro, snapshot(self.net)))

        def configure_optimizers(self):
            return self.opt_fn(self.net.parameters())

    return Module, loader


def lightning_trainer(pl, callbacks, tmp_path, **kw):
    kw = dict(dict(max_epochs=2, accelerator="cpu", devices=1, enable_progress_bar=False,
                   logger=False, enable_checkpointing=False, enable_model_summary=False,
                   num_sanity_val_steps=0, default_root_dir=str(tmp_path)), **kw)
    return pl.Trainer(callbacks=callbacks, **kw)


@pytest.fixture(scope="module")
def L():
    return pytest.importorskip("lightning.pytorch")


@pytest.mark.parametrize("exact_restore,acc", [(True, 2), (False, 2), (True, 3)],
                         ids=["exact_restore", "regen_restore", "acc3_partial_cycle"])
def test_lightning_fsgld_accumulation_equals_plain_loop(L, tmp_path, exact_restore, acc):
    from fused_flat.integrations.lightning import FusedFlatCallback

    Module, loader = lightning_parts(L)

    class Recording(Module):
        def on_train_batch_end(self, outputs, batch, batch_idx):   # runs after the callbacks'
            self.batch_end_seen.append((self.n_micro, snapshot(self.net)))

    opt_fn = lambda ps: fsgld(ps, exact_restore=exact_restore)  # noqa: E731
    model = Recording(opt_fn)
    model.batch_end_seen = []
    trainer = lightning_trainer(L, [FusedFlatCallback()], tmp_path, accumulate_grad_batches=acc,
                                val_check_interval=1)
    trainer.fit(model, loader, loader)
    cycles = cycles_of([list(loader)] * 2, acc)   # acc=3: cycles of 3 and 1 micro-batches
    hist = plain_fsgld(cycles, divisor=acc, exact_restore=exact_restore)
    assert trainer.global_step == len(hist) - 1 == len(cycles)
    assert_same(snapshot(model.net), hist[-1], exact=exact_restore)
    # after every micro-batch, mid-cycle included (the module's hook, then a validation
    # run): the unperturbed weights of the last step
    done = steps_done(cycles)
    for seen in (model.batch_end_seen, model.val_seen):
        assert [n for n, _ in seen] == list(range(1, 9))
        for n, weights in seen:
            assert_same(weights, hist[done[n - 1]], exact=exact_restore)

    if exact_restore and acc == 2:   # the silent error the callback removes: Lightning alone
        plain = Module(opt_fn)
        lightning_trainer(L, [], tmp_path, accumulate_grad_batches=2).fit(plain, loader)
        off = max((a - b).abs().max().item() for a, b in zip(snapshot(plain.net), hist[-1]))
        assert off > 1e-3


def test_lightning_checkpoint_mid_cycle_unperturbed(L, tmp_path):
    """trainer.save_checkpoint from a callback listed before FusedFlatCallback, whose
    on_train_batch_end runs while the cycle's perturbation is still active."""
    from fused_flat.integrations.lightning import FusedFlatCallback

    Module, loader = lightning_parts(L)
    ckpts = tmp_path / "ckpt"

    class SaveEveryMicroBatch(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            trainer.save_checkpoint(ckpts / f"{pl_module.n_micro}.ckpt")

    model = Module(lambda ps: fsgld(ps, exact_restore=True))
    lightning_trainer(L, [SaveEveryMicroBatch(), FusedFlatCallback()], tmp_path,
                      accumulate_grad_batches=2).fit(model, loader)
    cycles = cycles_of([list(loader)] * 2, 2)
    hist = plain_fsgld(cycles, divisor=2, exact_restore=True)
    assert_same(snapshot(model.net), hist[-1])
    done = steps_done(cycles)
    for n in range(1, 9):
        sd = torch.load(ckpts / f"{n}.ckpt", weights_only=False)["state_dict"]
        assert_same(list(sd.values()), hist[done[n - 1]])


def test_lightning_fsgld_amp_gradscaler_path(L, tmp_path):
    """precision '16-mixed' (a GradScaler): Lightning runs the closure, then scaler.step(opt)
    calls step() without it; the callback perturbs before every micro-batch."""
    from lightning.pytorch.plugins import MixedPrecision

    from fused_flat.integrations.lightning import FusedFlatCallback

    Module, loader = lightning_parts(L)

    class AmpModule(Module):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x).float(), y)

    opt_fn = lambda ps: fsgld(ps, exact_restore=True)  # noqa: E731
    model = AmpModule(opt_fn)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))
    lightning_trainer(L, [FusedFlatCallback()], tmp_path, accumulate_grad_batches=2,
                      plugins=[plugin]).fit(model, loader)

    net = make_net()
    opt = opt_fn(net.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    batches = list(loader)
    for _ in range(2):
        for c in range(0, len(batches), 2):
            opt.perturb()
            for x, y in batches[c:c + 2]:
                with torch.autocast("cpu", dtype=torch.float16):
                    loss = nn.functional.mse_loss(net(x).float(), y)
                scaler.scale(loss / 2).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
    assert opt.step_count == 4
    assert_same(snapshot(model.net), snapshot(net))


def test_lightning_sgld_with_callback_unchanged(L, tmp_path):
    """SGLD has no perturbation: the callback leaves it alone (plain accumulation)."""
    from fused_flat.integrations.lightning import FusedFlatCallback

    Module, loader = lightning_parts(L)
    opt_fn = lambda ps: fused_flat.SGLD(ps, lr=0.1, beta=1e4, seed=3)  # noqa: E731
    model = Module(opt_fn)
    lightning_trainer(L, [FusedFlatCallback()], tmp_path, accumulate_grad_batches=2).fit(model, loader)
    net = make_net()
    opt = opt_fn(net.parameters())
    batches = list(loader)
    for _ in range(2):
        for c in range(0, len(batches), 2):
            for x, y in batches[c:c + 2]:
                (nn.functional.mse_loss(net(x), y) / 2).backward()
            opt.step()
            opt.zero_grad()
    assert_same(snapshot(model.net), snapshot(net))


@pytest.mark.parametrize("with_callback", [False, True], ids=["no_callback", "callback"])
def test_lightning_sam_equals_davda54_loop(L, tmp_path, with_callback):
    """SAM through automatic optimization (accumulation 1): SAM.step(closure) computes g1
    and g2 itself; BatchNorm statistics updated once per step, as in the plain loop."""
    from fused_flat.integrations.lightning import FusedFlatCallback

    Module, loader = lightning_parts(L)
    model = Module(lambda ps: fused_flat.SAM(ps, **SAM_KW), bn=True)
    callbacks = [FusedFlatCallback()] if with_callback else []
    lightning_trainer(L, callbacks, tmp_path).fit(model, loader)
    assert model.n_micro == 2 * 8   # the closure runs twice per step
    want = plain_sam([[b] for b in list(loader) * 2], **SAM_KW)
    assert_same(snapshot(model.net), want)


def test_lightning_sam_accumulation_refused(L, tmp_path):
    from fused_flat.integrations.lightning import FusedFlatCallback

    Module, loader = lightning_parts(L)
    model = Module(lambda ps: fused_flat.SAM(ps, **SAM_KW))
    before = snapshot(model.net)
    trainer = lightning_trainer(L, [FusedFlatCallback()], tmp_path, accumulate_grad_batches=2)
    with pytest.raises(ValueError) as e:
        trainer.fit(model, loader)
    msg = str(e.value)
    for words in ("accumulate_grad_batches=2", "larger batch", "manual optimization", "MSAM"):
        assert words in msg
    assert model.n_micro == 0
    assert_same(snapshot(model.net), before)


@pytest.mark.parametrize("case", ["msam", "rwsam", "n_perturbations", "sam_16_mixed"])
def test_lightning_unsupported_refused(L, tmp_path, case):
    from lightning.pytorch.plugins import MixedPrecision

    from fused_flat.integrations.lightning import FusedFlatCallback

    Module, loader = lightning_parts(L)
    plugins = []
    if case == "sam_16_mixed":
        opt_fn, acc, words = (lambda ps: fused_flat.SAM(ps, **SAM_KW)), 1, "bf16-mixed"
        plugins = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]
    elif case == "msam":
        opt_fn, acc, words = (lambda ps: fused_flat.MSAM(ps, micro_batch_size=2, **SAM_KW)), 1, \
            "manual optimization"
    elif case == "rwsam":
        opt_fn, acc, words = (lambda ps: fused_flat.RWSAM(ps, delta=1e-3, **SAM_KW)), 1, \
            "per-sample losses"
    else:
        opt_fn, acc, words = (lambda ps: fsgld(ps, n_perturbations=2)), 2, "n_perturbations=1"
    model = Module(opt_fn)
    trainer = lightning_trainer(L, [FusedFlatCallback()], tmp_path, accumulate_grad_batches=acc,
                                plugins=plugins)
    with pytest.raises(ValueError, match=words):
        trainer.fit(model, loader)
    assert model.n_micro == 0


def test_pytorch_lightning_package(tmp_path):
    """The same callback class in a pytorch_lightning.Trainer (hooks are called by name)."""
    pl = pytest.importorskip("pytorch_lightning")
    from fused_flat.integrations.lightning import FusedFlatCallback

    Module, loader = lightning_parts(pl)
    model = Module(lambda ps: fsgld(ps, exact_restore=True))
    lightning_trainer(pl, [FusedFlatCallback()], tmp_path, accumulate_grad_batches=2).fit(model, loader)
    want = plain_fsgld(cycles_of([list(loader)] * 2, 2), divisor=2, exact_restore=True)[-1]
    assert_same(snapshot(model.net), want)


# ===================================================================== transformers
class HFNet(nn.Module):
    """A model as transformers.Trainer expects one: forward(**batch) -> {"loss", "logits"}.
    Records what it sees: training inputs, and the weights at each evaluation."""

    def __init__(self, bn: bool = False):
        super().__init__()
        self.net = make_net(bn)
        self.train_inputs: list = []
        self.eval_weights: list = []

    def forward(self, x, labels=None):
        if self.training:
            self.train_inputs.append((x.detach().clone(), labels.detach().clone()))
        elif not self.eval_weights or self.eval_weights[-1][0] != self._eval_mark:
            self.eval_weights.append((self._eval_mark, snapshot(self.net)))
        out = self.net(x)
        return {"loss": nn.functional.mse_loss(out, labels), "logits": out}

    _eval_mark = None


class DictData(torch.utils.data.Dataset):
    def __init__(self):
        self.x, self.y = data()

    def __len__(self):
        return N

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


@pytest.fixture(scope="module")
def hf():
    return pytest.importorskip("transformers")


def hf_args(hf, tmp_path, gas: int, **kw):
    base = dict(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, seed=0,
                per_device_train_batch_size=BS, per_device_eval_batch_size=N,
                gradient_accumulation_steps=gas, num_train_epochs=2, max_grad_norm=0.0,
                lr_scheduler_type="constant", learning_rate=0.1, logging_strategy="no",
                save_strategy="no", disable_tqdm=True)
    base.update(kw)
    return hf.TrainingArguments(**base)


class MarkEval:
    """A TrainerCallback (built per test) that tags each evaluation with the global step."""

    @staticmethod
    def make(hf, model):
        class _Mark(hf.TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                model._eval_mark = state.global_step

        return _Mark()


@pytest.mark.parametrize("gas,trainer_name", [(1, "Trainer"), (2, "Trainer"), (3, "Trainer"),
                                               (2, "FusedFlatTrainer")])
def test_transformers_fsgld_callback_equals_plain_loop(hf, tmp_path, gas, trainer_name):
    from safetensors.torch import load_file

    from fused_flat.integrations.transformers import FusedFlatCallback, FusedFlatTrainer

    model = HFNet()
    opt = fsgld(model.parameters())
    cls = FusedFlatTrainer if trainer_name == "FusedFlatTrainer" else hf.Trainer
    callbacks = [MarkEval.make(hf, model)] + ([FusedFlatCallback()] if cls is hf.Trainer else [])
    args = hf_args(hf, tmp_path, gas, eval_strategy="steps", eval_steps=1, save_strategy="steps",
                   save_steps=1)
    trainer = cls(model=model, args=args, train_dataset=DictData(), eval_dataset=DictData(),
                  optimizers=(opt, None), callbacks=callbacks)
    trainer.train()
    assert type(trainer.optimizer).__name__ == "AcceleratedOptimizer"   # the unwrap path

    seen = model.train_inputs   # the Trainer's (shuffled) batches, in order
    per_epoch = N // BS
    assert len(seen) == 2 * per_epoch
    cycles = cycles_of([seen[:per_epoch], seen[per_epoch:]], gas)   # gas=3: 3 + 1 per epoch
    steps = len(cycles)
    assert trainer.state.global_step == opt.step_count == steps
    hist = plain_fsgld(cycles)
    assert_same(snapshot(model.net), hist[-1])
    # evaluation and checkpoints after step k: the unperturbed weights of step k
    assert [k for k, _ in model.eval_weights] == list(range(1, steps + 1))
    for k, weights in model.eval_weights:
        assert_same(weights, hist[k])
    for k in range(1, steps + 1):
        saved = load_file(str(tmp_path / "out" / f"checkpoint-{k}" / "model.safetensors"))
        assert_same([saved[f"net.{name}"] for name in model.net.state_dict()], hist[k])


@pytest.mark.parametrize("gas,bf16", [(1, False), (2, False), (3, False), (2, True)],
                         ids=["gas1", "gas2", "gas3", "gas2_bf16_autocast"])
def test_transformers_sam_trainer_equals_davda54_loop(hf, tmp_path, gas, bf16):
    from fused_flat.integrations.transformers import FusedFlatTrainer

    model = HFNet(bn=True)
    opt = fused_flat.SAM(model.parameters(), **SAM_KW)
    trainer = FusedFlatTrainer(model=model, args=hf_args(hf, tmp_path, gas, bf16=bf16),
                               train_dataset=DictData(), optimizers=(opt, None))
    trainer.train()
    per_epoch = N // BS
    sizes = [len(c) for c in cycles_of([range(per_epoch)] * 2, gas)]   # gas=3: 3, 1, 3, 1
    assert trainer.state.global_step == opt.step_count == len(sizes)
    seen = model.train_inputs   # per step: the cycle's g1 passes, then its g2 passes
    assert len(seen) == 2 * sum(sizes)
    cycles, pos = [], 0
    for size in sizes:
        g1, g2 = seen[pos:pos + size], seen[pos + size:pos + 2 * size]
        for (x1, y1), (x2, y2) in zip(g1, g2):   # g2 over the same examples as g1
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
        cycles.append(g1)
        pos += 2 * size
    assert_same(snapshot(model.net), plain_sam(cycles, bf16=bf16, **SAM_KW))


def test_transformers_sgld_plain_trainer(hf, tmp_path):
    model = HFNet()
    opt = fused_flat.SGLD(model.parameters(), lr=0.1, beta=1e4, seed=3)
    hf.Trainer(model=model, args=hf_args(hf, tmp_path, 2), train_dataset=DictData(),
               optimizers=(opt, None)).train()
    net = make_net()
    ref = fused_flat.SGLD(net.parameters(), lr=0.1, beta=1e4, seed=3)
    batches = model.train_inputs
    for c in range(0, len(batches), 2):
        for x, y in batches[c:c + 2]:
            (nn.functional.mse_loss(net(x), y) / 2).backward()
        ref.step()
        ref.zero_grad()
    assert ref.step_count == 4
    assert_same(snapshot(model.net), snapshot(net))


def test_transformers_callback_hooks_unwrap_and_restore(hf):
    """The callback's hooks on a bare optimizer and on a wrapper with ``.optimizer`` (as
    accelerate's): on_step_begin perturbs, a closure-less step() restores + updates, and
    on_epoch_end undoes a perturbation an early stop left behind."""
    from fused_flat.integrations.transformers import FusedFlatCallback

    X, Y = data()
    net = make_net()
    opt = fsgld(net.parameters(), exact_restore=True)

    class Wrapper:
        def __init__(self, optimizer):
            self.optimizer = optimizer

    cb = FusedFlatCallback()
    theta = snapshot(net)
    for wrapped in (opt, Wrapper(opt)):
        cb.on_train_begin(None, None, None, optimizer=wrapped)
        cb.on_step_begin(None, None, None, optimizer=wrapped)
        moved = max((a - b).abs().max().item() for a, b in zip(snapshot(net), theta))
        assert moved > 1e-3   # sigma ~ 0.1
        cb.on_epoch_end(None, None, None, optimizer=wrapped)   # cut short: restored, no update
        assert_same(snapshot(net), theta)
    cb.on_step_begin(None, None, None, optimizer=Wrapper(opt))
    nn.functional.mse_loss(net(X), Y).backward()
    opt.step()
    assert opt.step_count == 1
    want = plain_fsgld([[(X, Y)]], exact_restore=True)[-1]
    assert_same(snapshot(net), want)


@pytest.mark.parametrize("case", ["sam_plain_trainer", "msam", "rwsam", "n_perturbations"])
def test_transformers_unsupported_refused(hf, tmp_path, case):
    from fused_flat.integrations.transformers import FusedFlatCallback, FusedFlatTrainer

    model = HFNet()
    ps = model.parameters()
    if case == "sam_plain_trainer":
        opt, cls, err, words = fused_flat.SAM(ps, **SAM_KW), hf.Trainer, TypeError, "FusedFlatTrainer"
    elif case == "msam":
        opt, cls, err, words = fused_flat.MSAM(ps, micro_batch_size=2, **SAM_KW), FusedFlatTrainer, \
            TypeError, "custom training loop"
    elif case == "rwsam":
        opt, cls, err, words = fused_flat.RWSAM(ps, delta=1e-3, **SAM_KW), FusedFlatTrainer, \
            TypeError, "per-sample losses"
    else:
        opt, cls, err, words = fsgld(ps, n_perturbations=2), hf.Trainer, ValueError, "n_perturbations=1"
    before = snapshot(model.net)
    trainer = cls(model=model, args=hf_args(hf, tmp_path, 1), train_dataset=DictData(),
                  optimizers=(opt, None), callbacks=[FusedFlatCallback()])
    with pytest.raises(err, match=words):
        trainer.train()
    assert_same(snapshot(model.net), before)


# ===================================================================== imports
# (the examples' smoke runs: tests/test_examples.py)
def test_import_is_lazy_and_missing_frameworks_are_named():
    code = r"""
import sys, importlib
import fused_flat, fused_flat.integrations
heavy = [m for m in ("lightning", "pytorch_lightning", "transformers", "accelerate") if m in sys.modules]
assert not heavy, heavy
for blocked, module, words in [
        (("lightning", "lightning.pytorch", "pytorch_lightning"), "fused_flat.integrations.lightning",
         "pip install lightning"),
        (("transformers",), "fused_flat.integrations.transformers", "pip install transformers")]:
    saved = {m: sys.modules.get(m) for m in blocked}
    sys.modules.update({m: None for m in blocked})   # as if not installed
    try:
        importlib.import_module(module)
    except ImportError as e:
        assert words in str(e), str(e)
    else:
        raise AssertionError(module + " imported without its framework")
    for m, v in saved.items():
        if v is None:
            del sys.modules[m]
        else:
            sys.modules[m] = v
print("ok")
"""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
