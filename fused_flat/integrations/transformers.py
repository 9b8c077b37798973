"""Hugging Face ``transformers.Trainer`` integration.

``Trainer`` calls ``optimizer.step()`` without a closure (through accelerate's
``AcceleratedOptimizer``), so fSGLD / RWP (which need the gradient at the perturbed point)
and SAM (which needs two gradients) cannot run under it unaided; SGLD and torch.optim
optimizers can.

- :class:`FusedFlatCallback` (fSGLD, RWP, SGLD): ``Trainer(..., optimizers=(opt, None),
  callbacks=[FusedFlatCallback()])``. At ``on_step_begin`` (the first micro-batch of each
  optimizer step) it calls ``opt.perturb()``; every micro-batch of the
  ``gradient_accumulation_steps`` cycle is then computed at the same point
  theta + sigma * eps_k, and the Trainer's ``optimizer.step()`` is the restore + update of
  the two-call form: exactly ``perturb(); backward() x n; step()``. Evaluation, saving and
  logging run after the step (or after ``on_epoch_end``, where the callback restores a
  perturbation that an early stop left active), on unperturbed weights. SGLD needs no
  callback (the callback is harmless with it and with torch.optim optimizers).
  ``n_perturbations > 1`` needs ``step(closure)`` and is refused.
- :class:`FusedFlatTrainer` (SAM, ASAM, USAM; also any optimizer the callback serves, whose
  callback it adds itself): a ``Trainer`` whose ``training_step`` takes SAM's two
  forward/backward passes. Each micro-batch's first pass (g1, at theta, BatchNorm statistics
  updated) runs as ``Trainer.training_step`` runs it (same loss scaling, autocast and
  ``accelerator.backward``: bf16 autocast is tested on CPU; fp16 with accelerate's
  GradScaler, where ``first_step`` reads g1 unscaled and ``GradScaler.step`` runs
  ``second_step``, has not run on a GPU yet); after the last micro-batch of the
  accumulation cycle, ``first_step`` perturbs with the accumulated g1 and the second passes
  (g2) of all the cycle's micro-batches run at the perturbed point with BatchNorm running
  statistics frozen (``freeze_bn``); the Trainer's ``optimizer.step()`` is then SAM's
  ``second_step``. With ``gradient_accumulation_steps = n`` this is exactly SAM on the
  union of the n micro-batches (g1 and g2 both over all of them), as a plain loop
  accumulating g1, ``first_step``, accumulating g2, ``second_step`` computes it; the cost is
  keeping the cycle's n input batches until its last micro-batch. ``max_grad_norm`` clips
  g2. MSAM and RWSAM (their own ``step`` contracts) are refused.

Tested on one CPU process (tests/test_integrations.py); DeepSpeed, FSDP and multi-GPU runs
of these classes have not been tried.
"""
from __future__ import annotations

import contextlib

from fused_flat.nn.bn import running_stats_frozen
from fused_flat.integrations import (is_langevin, is_sam, perturbs, restore_all,
                                     sam_variant_error, unwrap_optimizer)

try:
    from transformers import Trainer, TrainerCallback
except ImportError as e:   # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError("fused_flat.integrations.transformers needs Hugging Face transformers "
                      "(and accelerate): pip install transformers accelerate") from e


class FusedFlatCallback(TrainerCallback):
    """One fSGLD / RWP perturbation per ``transformers.Trainer`` optimizer step (see the
    module docstring). Works whether the Trainer's optimizer is the fused_flat optimizer or
    accelerate's ``AcceleratedOptimizer`` around it."""

    def __init__(self) -> None:
        super().__init__()
        self._sam_handled = False   # set by FusedFlatTrainer, which runs SAM's two passes

    def _check(self, opt) -> None:
        name = type(opt).__name__
        if is_sam(opt) and not self._sam_handled:
            raise TypeError(
                f"FusedFlatCallback: {name} needs two forward/backward passes per step, which "
                f"transformers.Trainer does not run; train with "
                f"fused_flat.integrations.transformers.FusedFlatTrainer instead of Trainer (same "
                f"arguments; it runs SAM's two passes and adds this callback itself).")
        if perturbs(opt) and opt.n_perturbations > 1:
            raise ValueError(
                f"FusedFlatCallback: {name}(n_perturbations={opt.n_perturbations}) needs "
                f"step(closure) to run its closures, which transformers.Trainer does not call; "
                f"use n_perturbations=1 under the Trainer.")

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self._check(unwrap_optimizer(optimizer))

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        opt = unwrap_optimizer(optimizer)
        if perturbs(opt):
            self._check(opt)
            opt.restore()    # a cycle an early stop cut short left nothing behind
            opt.perturb()    # every micro-batch of this step at theta + sigma * eps_k

    def _restore(self, optimizer) -> None:
        opt = unwrap_optimizer(optimizer)
        if is_langevin(opt):
            restore_all([opt])

    # The Trainer evaluates and saves after optimizer.step() (restored already) or after
    # on_epoch_end; these restore a perturbation left by a cycle that was cut short.
    def on_epoch_end(self, args, state, control, optimizer=None, **kwargs):
        self._restore(optimizer)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self._restore(optimizer)

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        self._restore(optimizer)


class FusedFlatTrainer(Trainer):
    """``transformers.Trainer`` for the SAM family (SAM, ASAM, USAM): two forward/backward
    passes per optimizer step, exact under gradient accumulation and AMP (see the module
    docstring). Any other optimizer trains as with ``Trainer``; a :class:`FusedFlatCallback`
    is added unless one is given, so fSGLD / RWP work too.

    Pass the optimizer as with ``Trainer``: ``optimizers=(fused_flat.SAM(model.parameters(),
    lr=0.1, rho=0.05), None)``, or ``optimizer_cls_and_kwargs=(fused_flat.SAM, {...})``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        callbacks = [cb for cb in self.callback_handler.callbacks if isinstance(cb, FusedFlatCallback)]
        if not callbacks:
            callback = FusedFlatCallback()
            self.add_callback(callback)
            callbacks = [callback]
        for cb in callbacks:
            cb._sam_handled = True
        self._sam_pending: list = []   # this cycle's micro-batches: (inputs, num_items_in_batch)

    def train(self, *args, **kwargs):
        self._sam_pending = []   # the Trainer zeroes the gradients at the start of training
        return super().train(*args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        opt = unwrap_optimizer(self.optimizer)
        if not is_sam(opt):
            return super().training_step(model, inputs, num_items_in_batch)
        reason = sam_variant_error(opt, "FusedFlatTrainer",
                                   "Use fused_flat.SAM (adaptive=True for ASAM, normalize=False "
                                   "for USAM) or a custom training loop.")
        if reason:
            raise TypeError(reason)
        # g1: Trainer's own step (loss scaling for accumulation, autocast, scaled backward).
        # A cycle an early stop cut short stays pending, as its g1 stays in p.grad.
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._sam_pending.append((inputs, num_items_in_batch))
        if not self.accelerator.sync_gradients:   # more micro-batches of this cycle to come
            return loss
        pending, self._sam_pending = self._sam_pending, []
        scaler = getattr(self.accelerator, "scaler", None)
        opt.first_step(zero_grad=True, grad_scaler=scaler)
        frozen = running_stats_frozen(model) if opt.freeze_bn else contextlib.nullcontext()
        try:
            with frozen:   # the perturbed passes leave BatchNorm running statistics alone
                for i, (mb, n) in enumerate(pending):
                    last = i == len(pending) - 1
                    sync = contextlib.nullcontext() if last else self.accelerator.no_sync(model)
                    with sync:
                        super().training_step(model, mb, n)   # g2 at the perturbed point
        except BaseException:
            opt.restore()
            raise
        return loss   # the Trainer's optimizer.step() is SAM's second_step


__all__ = ["FusedFlatCallback", "FusedFlatTrainer"]
