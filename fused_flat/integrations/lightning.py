"""Lightning integration: :class:`FusedFlatCallback`.

Lightning's automatic optimization calls ``optimizer.step(closure)`` once per optimizer
step; with ``accumulate_grad_batches = n > 1`` it runs the closures (training_step +
backward) of the first n - 1 micro-batches *directly* and passes only the last one to
``step``. Without help, fSGLD would then take micro-batches 1..n-1 at the unperturbed
weights and the last one at the perturbed point, and SAM would take g1 from one
micro-batch and g2 from another. Neither fails: the result is silently wrong. Attach the
callback::

    from fused_flat.integrations.lightning import FusedFlatCallback
    trainer = L.Trainer(accumulate_grad_batches=4, callbacks=[FusedFlatCallback()])

What it does (automatic optimization; with manual optimization it does nothing: your
``training_step`` drives the optimizer):

- fSGLD / RWP (a Langevin-family optimizer with sigma > 0): every micro-batch of an
  accumulation cycle is computed at the *same* perturbed point theta + sigma * eps_k, one
  perturbation per optimizer step. The callback perturbs (``optimizer.perturb()``) before
  each micro-batch that only accumulates and restores (``optimizer.restore()``) after it;
  the last micro-batch runs inside ``optimizer.step(closure)``, which perturbs with the same
  eps_k (the noise is a function of the seed and the step counter, which only ``step``
  advances), then restores and updates. Under ``precision='16-mixed'`` (Lightning runs the
  closure, then ``GradScaler.step(optimizer)`` calls ``step()`` without it) the callback also
  perturbs before the last micro-batch and ``step()`` is the restore + update. Between
  micro-batches no perturbation is active, so validation, checkpoints and every
  ``on_train_batch_end`` hook of the LightningModule see the unperturbed weights; the
  callback also restores before validation / test / predict, when a checkpoint is
  assembled (``trainer.save_checkpoint`` from a hook that runs before this callback's
  ``on_train_batch_end`` included; not with ``weights_only=True``, which calls no callback),
  at the end of an epoch and on an exception. The extra restore/perturb pair per
  accumulating micro-batch restores within 1 ulp (``exact_restore=True``: bit-exactly).
  Under ``precision='16-mixed'`` the callback is needed even without accumulation (without
  it ``step()`` raises: no closure and no perturbation).
  ``n_perturbations > 1`` needs ``step(closure)`` to run all closures, so it is refused with
  accumulation or 16-mixed.
- SGLD (sigma = 0): nothing to do (accumulation is already correct).
- SAM / ASAM / USAM: with ``accumulate_grad_batches > 1`` a clear error at fit start (and
  at any epoch where a GradientAccumulationScheduler raises it): Lightning cannot give SAM
  g1 and g2 over the same micro-batches. With accumulation 1 no callback is needed:
  ``SAM.step(closure)`` (torch.optim's closure contract) runs the closure for g1 and again
  at the perturbed point for g2. Refused with ``precision='16-mixed'`` (Lightning's AMP
  plugin calls the closure once, then ``step()`` without it) and for MSAM / RWSAM, whose
  ``step`` contracts Lightning cannot meet: use manual optimization for those.

Works with the ``lightning`` package (``lightning.pytorch``) and with ``pytorch_lightning``
(Lightning calls callback hooks by name, so one class serves both trainers). Tested on one
CPU process (tests/test_integrations.py, '16-mixed' through a CPU GradScaler included);
DDP, FSDP and DeepSpeed runs have not been tried.
"""
from __future__ import annotations

from fused_flat.integrations import (is_langevin, is_sam, perturbs, restore_all,
                                     sam_variant_error, unwrap_optimizer)


def _callback_base() -> type:
    errors = []
    try:
        from lightning.pytorch import Callback
        return Callback
    except ImportError as e:
        errors.append(e)
    try:
        from pytorch_lightning import Callback
        return Callback
    except ImportError as e:
        errors.append(e)
    raise ImportError(
        "fused_flat.integrations.lightning needs Lightning: pip install lightning "
        "(or pip install pytorch-lightning)") from errors[0]


_Callback = _callback_base()

_ACC_ALTERNATIVES = (
    "Use one of: (1) accumulate_grad_batches=1 with one larger batch (SAM on the whole batch, "
    "exact); (2) manual optimization (self.automatic_optimization = False): accumulate g1 over "
    "the micro-batches, opt.first_step(zero_grad=True), accumulate g2 over the same "
    "micro-batches, opt.second_step(zero_grad=True); (3) fused_flat.MSAM (one perturbation per "
    "micro-batch, m-SAM) in manual optimization.")


class FusedFlatCallback(_Callback):
    """Makes fused_flat optimizers exact under Lightning's automatic optimization (see the
    module docstring): one fSGLD/RWP perturbation per optimizer step, shared by every
    micro-batch of an accumulation cycle; unperturbed weights for validation, testing,
    prediction and checkpoints; a clear error where the SAM family cannot be made exact.
    Harmless for optimizers it does not concern (torch.optim, SGLD)."""

    def __init__(self) -> None:
        super().__init__()
        self._langevin: list = []
        self._sam: list = []
        self._active = False

    # ----------------------------------------------------------------- helpers
    @staticmethod
    def _optimizers(trainer) -> list:
        return [unwrap_optimizer(o) for o in getattr(trainer, "optimizers", None) or []]

    @staticmethod
    def _amp_scaler(trainer) -> bool:
        """Whether the precision plugin runs the closure itself, then calls ``step()``
        without it (MixedPrecision / FSDPPrecision with a GradScaler: '16-mixed')."""
        plugin = getattr(trainer, "precision_plugin", None)
        return getattr(plugin, "scaler", None) is not None

    @staticmethod
    def _accumulates(trainer, batch_idx: int) -> bool:
        """Whether this micro-batch only accumulates (Lightning calls ``step`` after the
        last micro-batch of a cycle and after the last batch of an epoch)."""
        loop = getattr(trainer, "fit_loop", None)
        fn = getattr(loop, "_should_accumulate", None)
        if callable(fn):
            return bool(fn())
        n = trainer.num_training_batches
        return (batch_idx + 1) % trainer.accumulate_grad_batches != 0 and batch_idx + 1 != n

    def _check(self, trainer) -> None:
        acc = int(trainer.accumulate_grad_batches)
        amp = self._amp_scaler(trainer)
        for opt in self._sam:
            name = type(opt).__name__
            reason = sam_variant_error(opt, "Lightning automatic optimization",
                                       "Use manual optimization (self.automatic_optimization = "
                                       "False) and call its step yourself.")
            if reason:
                raise ValueError(f"FusedFlatCallback: {reason}")
            if acc > 1:
                raise ValueError(
                    f"FusedFlatCallback: {name} with accumulate_grad_batches={acc} is not exact "
                    f"under Lightning's automatic optimization: Lightning runs every "
                    f"micro-batch of a cycle but the last outside optimizer.step(closure), so SAM "
                    f"would take g1 and g2 from different micro-batches. {_ACC_ALTERNATIVES}")
            if amp:
                raise ValueError(
                    f"FusedFlatCallback: {name} with precision='16-mixed' under automatic "
                    f"optimization: Lightning's AMP plugin runs the closure once and then calls "
                    f"step() without it, so SAM gets no second gradient. Use "
                    f"precision='bf16-mixed' (no GradScaler), or manual optimization with "
                    f"opt.first_step(zero_grad=True, grad_scaler=scaler) / scaler.step(opt).")
        for opt in self._langevin:
            if not perturbs(opt):
                continue
            name = type(opt).__name__
            if opt.n_perturbations > 1 and (acc > 1 or amp):
                what = f"accumulate_grad_batches={acc}" if acc > 1 else "precision='16-mixed'"
                raise ValueError(
                    f"FusedFlatCallback: {name}(n_perturbations={opt.n_perturbations}) needs "
                    f"step(closure) to run all its closures, which Lightning does not do with "
                    f"{what}. Use n_perturbations=1, or accumulate_grad_batches=1 without "
                    f"16-mixed.")
            if acc > 1 and getattr(trainer.strategy, "handles_gradient_accumulation", False):
                raise ValueError(
                    f"FusedFlatCallback: {name} with accumulate_grad_batches={acc} and a strategy "
                    f"that accumulates gradients itself ({type(trainer.strategy).__name__}, e.g. "
                    f"DeepSpeed) is not supported: the perturbation cannot follow its cycles. Set "
                    f"the accumulation to 1 (a larger batch) or use another strategy.")

    # ----------------------------------------------------------------- fit
    def on_fit_start(self, trainer, pl_module) -> None:
        self._active = bool(getattr(pl_module, "automatic_optimization", True))
        opts = self._optimizers(trainer)
        self._langevin = [o for o in opts if is_langevin(o)]
        self._sam = [o for o in opts if is_sam(o)]
        if self._active:
            self._check(trainer)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self._active:   # a GradientAccumulationScheduler may have changed the accumulation
            self._check(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self._active:
            return
        if self._sam and int(trainer.accumulate_grad_batches) > 1:
            self._check(trainer)
        moving = [o for o in self._langevin if perturbs(o)]
        if not moving:
            return
        # The last micro-batch runs inside step(closure), which perturbs by itself; under a
        # GradScaler Lightning runs the closure first and step() only restores + updates.
        if self._amp_scaler(trainer) or self._accumulates(trainer, batch_idx):
            for opt in moving:
                opt.restore()
                opt.perturb()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._active:
            restore_all(self._langevin)

    # ----------------------------------------------------------------- unperturbed elsewhere
    def _restore(self) -> None:
        if self._active:
            restore_all(self._langevin)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._restore()

    def on_test_start(self, trainer, pl_module) -> None:
        self._restore()

    def on_predict_start(self, trainer, pl_module) -> None:
        self._restore()

    def state_dict(self) -> dict:
        # Lightning calls this while it assembles a checkpoint: after the model's state_dict
        # (whose tensors share the parameters' storage, so they are written restored) and
        # before the optimizers' states. Nothing to save.
        self._restore()
        return {}

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._restore()

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()


__all__ = ["FusedFlatCallback"]
