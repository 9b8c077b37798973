r"""SAM, ASAM, USAM, m-SAM and RW-SAM on flat parameter buckets (ALGORITHMS.md §3).

With :math:`g_1` the gradient at :math:`\theta` and :math:`g_2` the gradient at the
perturbed point:

.. math::

    \text{SAM:}\; e &= \rho\, g_1 / (\lVert g_1 \rVert_2 + 10^{-12}) \qquad
    \text{ASAM:}\; e = \rho\, T^2 g_1 / (\lVert T g_1 \rVert_2 + 10^{-12}),\; T = |\theta| + \eta_a \qquad
    \text{USAM:}\; e = \rho\, g_1 \\
    \tilde\theta &= \theta + e;\quad g_2 = \nabla L(\tilde\theta);\quad
    \theta \leftarrow \text{backup};\quad \text{base optimizer step with } g_2

The norm is ONE global norm over every parameter of the optimizer (as davda54/sam).
The API is davda54/sam's (``first_step``, ``second_step``, ``step(closure)``,
``adaptive=True``), with its known gaps closed: the base optimizer's state (momentum) is in
``state_dict`` (#73), ``torch.amp.GradScaler`` works (#97), parameters never change storage
(they live in flat buckets, fused_flat.buckets), BatchNorm statistics are updated once per
step (#17, #80; fused_flat.bn), and the SAM object *is* the optimizer whose param_groups the
base optimizer uses, so LR schedulers attach to it directly.

Passes per step when the base optimizer is ``torch.optim.SGD`` (the fused path):
one reduction for the global norm, one pass writing backup and :math:`\theta + e`, one pass
restoring from the backup and applying SGD's update (weight decay, momentum, dampening,
nesterov, maximize; same math as torch.optim.SGD). Any other base optimizer: the fused
restore, then ``base_optimizer.step()`` (one warning at construction).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch.optim import Optimizer

from fused_flat import _native, backends, sam_reference
from fused_flat.bn import running_stats_frozen
from fused_flat.buckets import build_buckets
from fused_flat.langevin import _number, _runs, default_seed

_STATE_FORMAT = 1
NORM_EPS = 1e-12
RHO_DEFAULT = 0.05
RHO_DEFAULT_ADAPTIVE = 2.0


# ---------------------------------------------------------------------------- backends
@dataclass(frozen=True)
class SamBackend:
    name: str
    sam_grad_sq_norm: Callable
    sam_perturb_: Callable
    sam_restore_and_step_: Callable
    sam_probe_: Callable


_REFERENCE = SamBackend("reference", sam_reference.sam_grad_sq_norm, sam_reference.sam_perturb_,
                        sam_reference.sam_restore_and_step_, sam_reference.sam_probe_)


def _cpp() -> SamBackend | None:
    if not _native.available():
        return None
    from fused_flat import sam_ops

    if not hasattr(torch.ops.fused_flat, "sam_perturb_"):
        return None
    return SamBackend("cpp", sam_ops.sam_grad_sq_norm, sam_ops.sam_perturb_,
                      sam_ops.sam_restore_and_step_, sam_ops.sam_probe_)


def resolve_backend(name: str, t: torch.Tensor) -> SamBackend:
    """The SAM backend that runs bucket ``t`` when the user asked for ``name`` ('auto': the
    C++ kernels for CPU tensors when the extension is built, else the reference; CUDA
    tensors run the reference until CUDA/Triton SAM kernels exist)."""
    backends.check_name(name)
    if name == "reference":
        return _REFERENCE
    if name in ("cuda", "triton"):
        raise ValueError(f"fused_flat SAM: there are no '{name}' SAM kernels yet; use backend='auto' "
                         f"(CUDA tensors run the 'reference' backend) or backend='reference'")
    cpp = _cpp()
    if name == "cpp":
        if cpp is None:
            raise ValueError(f"fused_flat SAM: backend 'cpp' is not available (compiled extension: "
                             f"{_native.load_error or 'built without the SAM ops'}); "
                             f"{_native.BUILD_HINT}, or use backend='auto'")
        if t.device.type != "cpu":
            raise ValueError(f"fused_flat SAM: backend 'cpp' runs CPU tensors, but a parameter bucket "
                             f"is on {t.device}; use backend='auto'")
        return cpp
    if t.device.type == "cpu":
        if cpp is not None:
            return cpp
        if _native.available():
            _warn_stale_extension()
        else:
            _native.warn_fallback(f"the SAM {t.dtype} bucket")
    return _REFERENCE


_warned_stale = False


def _warn_stale_extension() -> None:
    global _warned_stale
    if not _warned_stale:
        _warned_stale = True
        warnings.warn(f"fused_flat: the compiled extension has no SAM ops (built from older "
                      f"sources); SAM runs on the pure-torch reference backend. Rebuild: "
                      f"{_native.BUILD_HINT}.", RuntimeWarning, stacklevel=4)


_warned_unfused = False


def _warn_unfused(base_cls: type) -> None:
    global _warned_unfused
    if not _warned_unfused:
        _warned_unfused = True
        warnings.warn(
            f"fused_flat SAM: the fused update is SGD-only; with base optimizer "
            f"{base_cls.__name__} the norm, the perturbation and the restore are fused and "
            f"{base_cls.__name__}.step() then runs as usual.", UserWarning, stacklevel=3)


# ---------------------------------------------------------------------------- SAM
class SAM(Optimizer):
    r"""Sharpness-aware minimization (Foret et al.), ASAM (``adaptive=True``) and USAM
    (``normalize=False``) around a base optimizer.

    Args:
        params: iterable of parameters or param-group dicts (``rho``, ``adaptive``,
            ``normalize`` and the base optimizer's hyperparameters may be set per group).
        base_optimizer: the base optimizer *class* (default ``torch.optim.SGD``, the fused
            path); it is built on this optimizer's param_groups with ``**base_kwargs``.
        rho (float | None): perturbation radius (>= 0). ``None``: 0.05 for SAM and USAM,
            2.0 for ASAM (Kwon et al.'s default).
        adaptive (bool): ASAM, ``e = rho T^2 g / ||T g||`` with ``T = |theta| + adaptive_eta``.
        adaptive_eta (float): ASAM's offset eta_a (>= 0, default 0 as davda54/sam); Kwon et
            al. add it for biases: put them in their own param group with ``adaptive_eta=0.01``.
        normalize (bool): ``False`` is USAM, ``e = rho g`` (not allowed with adaptive).
        backend (str): 'auto', 'cpp' (CPU kernels) or 'reference' (pure torch).
        check_finite (bool): skip the update (parameters restored exactly from the backup,
            momentum untouched) when g1 or g2 holds inf/NaN. Under GradScaler the scaler's
            ``found_inf`` decides instead. ``skipped_steps`` counts skips.
        freeze_bn (bool): ``step(closure)`` runs the closure (the perturbed pass) with the
            running statistics of every BatchNorm that runs in it frozen
            (fused_flat.bn.running_stats_frozen), so they are updated once per step, by the
            first pass, exactly as with the base optimizer alone. In the two-call form use
            ``with running_stats_frozen(model):`` around the second forward yourself.
        **base_kwargs: the base optimizer's hyperparameters (``lr``, ``momentum``, ...).

    Usage (davda54/sam's)::

        loss_fn(model(x), y).backward()          # g1 (the first pass updates BN stats)
        opt.step(lambda: loss_fn(model(x), y).backward() or ...)   # closure: g2

        # or the two-call form
        loss_fn(model(x), y).backward();  opt.first_step(zero_grad=True)
        with running_stats_frozen(model):
            loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)

    ``step()`` without a closure is only valid after ``first_step()`` (it is then
    ``second_step()``; this is how ``GradScaler.step(opt)`` finishes a step).

    AMP recipe (see SAM_README_SECTION.md)::

        with torch.autocast(dev, dtype):  loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()
        opt.first_step(zero_grad=True, grad_scaler=scaler)   # unscales g1 for e
        with torch.autocast(dev, dtype), running_stats_frozen(model):
            loss2 = loss_fn(model(x), y)
        scaler.scale(loss2).backward()
        scaler.unscale_(opt); clip_grad_norm_(model.parameters(), c)   # optional: clips g2
        scaler.step(opt); scaler.update(); opt.zero_grad()

    Gradient accumulation: call ``backward()`` several times before ``first_step`` (g1) and
    before ``second_step`` (g2); the flat gradient buffer accumulates as usual.
    """

    _step_supports_amp_scaling = True  # GradScaler.step sets grad_scale / found_inf

    def __init__(self, params, base_optimizer: type = torch.optim.SGD, rho: float | None = None,
                 adaptive: bool = False, normalize: bool = True, *, adaptive_eta: float = 0.0,
                 backend: str = "auto", check_finite: bool = True, freeze_bn: bool = True,
                 **base_kwargs):
        name = type(self).__name__
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer)):
            raise TypeError(f"{name}: base_optimizer must be a torch.optim.Optimizer class (e.g. "
                            f"torch.optim.SGD) and its hyperparameters keyword arguments of {name}, "
                            f"got {base_optimizer!r}")
        if issubclass(base_optimizer, SAM):
            raise TypeError(f"{name}: base_optimizer cannot itself be a SAM optimizer")
        backends.check_name(backend)
        self.backend = backend
        self.check_finite = bool(check_finite)
        self.freeze_bn = bool(freeze_bn)
        defaults = dict(rho=rho, adaptive=adaptive, normalize=normalize, adaptive_eta=adaptive_eta,
                        **base_kwargs)
        super().__init__(params, defaults)
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups   # the same dicts: schedulers see them
        self.state = self.base_optimizer.state
        self.defaults.update(self.base_optimizer.defaults)
        self._fused_sgd = type(self.base_optimizer) is torch.optim.SGD and not any(
            g.get("differentiable", False) for g in self.param_groups)
        if not self._fused_sgd:
            _warn_unfused(base_optimizer)
        self._buckets = build_buckets(self.param_groups)
        self._backends = [resolve_backend(backend, b.data) for b in self._buckets]
        self._backup = [torch.empty_like(b.data) for b in self._buckets]
        self._momentum: list[torch.Tensor | None] = [None] * len(self._buckets)
        self._mom_ready = [[False] * len(b.params) for b in self._buckets]
        self._perturbed = False
        self._first_nonfinite = False
        self._k = 0
        self.skipped_steps = 0
        self.seed: int | None = None

    # ----------------------------------------------------------------- setup
    def _validate_group(self, g: dict) -> None:
        name = type(self).__name__
        for key in ("adaptive", "normalize"):
            if not isinstance(g[key], bool):
                raise ValueError(f"{name}: {key} must be True or False, got {g[key]!r}")
        if g["adaptive"] and not g["normalize"]:
            raise ValueError(f"{name}: adaptive=True (ASAM) needs normalize=True; normalize=False "
                             f"is USAM, e = rho * g")
        if g["rho"] is None:
            g["rho"] = RHO_DEFAULT_ADAPTIVE if g["adaptive"] else RHO_DEFAULT
        g["rho"] = _number("rho", g["rho"], name)
        if not 0.0 <= g["rho"] < math.inf:
            raise ValueError(f"{name}: invalid rho={g['rho']} (the perturbation radius must be finite "
                             f"and >= 0; rho=0 gives the base optimizer)")
        g["adaptive_eta"] = _number("adaptive_eta", g["adaptive_eta"], name)
        if not 0.0 <= g["adaptive_eta"] < math.inf:
            raise ValueError(f"{name}: invalid adaptive_eta={g['adaptive_eta']} (ASAM's offset in "
                             f"T = |theta| + eta must be finite and >= 0)")

    def add_param_group(self, param_group: dict) -> None:
        if hasattr(self, "_buckets"):
            raise RuntimeError(f"{type(self).__name__}.add_param_group: parameter groups cannot be "
                               f"added after construction (the flat buffers are fixed); build the "
                               f"optimizer with every group")
        super().add_param_group(param_group)
        self._validate_group(self.param_groups[-1])

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the flat gradient buffers (gradients stay views into them; ``set_to_none`` is
        accepted for compatibility, a parameter without a gradient since the last zero_grad is
        still skipped as torch.optim skips ``grad is None``)."""
        for b in self._buckets:
            b.zero_grad()

    @property
    def step_count(self) -> int:
        """Completed steps (second_step calls, skipped ones included)."""
        return self._k

    # ----------------------------------------------------------------- the two halves
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, grad_scaler=None) -> None:
        """theta <- theta + e(g1); the unperturbed weights are kept in a backup.

        ``grad_scaler``: the ``torch.amp.GradScaler`` that scaled the first loss; g1 is read
        as g / scale (needed by USAM; SAM/ASAM are scale-free up to the 1e-12). A non-finite
        g1 leaves the weights unperturbed and makes the step a skipped one.
        """
        if self._perturbed:
            raise RuntimeError(f"{type(self).__name__}.first_step(): the weights are already "
                               f"perturbed; call second_step() (or step()) first")
        inv = 1.0
        if grad_scaler is not None and grad_scaler.is_enabled():
            inv = 1.0 / float(grad_scaler.get_scale())
        for b in self._buckets:
            b.sync()
        sq = 0.0
        for i, b in enumerate(self._buckets):
            g = self.param_groups[b.group_index]
            sq += float(self._backends[i].sam_grad_sq_norm(b.grad, b.data if g["adaptive"] else None,
                                                           g["adaptive_eta"]))
        norm = math.sqrt(sq) * inv
        self._first_nonfinite = not math.isfinite(norm)
        for i, b in enumerate(self._buckets):
            g = self.param_groups[b.group_index]
            if self._first_nonfinite:
                self._backup[i].copy_(b.data)
                continue
            coef = g["rho"] * inv / (norm + NORM_EPS) if g["normalize"] else g["rho"] * inv
            self._backends[i].sam_perturb_(b.data, b.grad, self._backup[i], g["adaptive"], coef,
                                           g["adaptive_eta"])
        self._perturbed = True
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """theta <- backup (exact), then the base optimizer's step with g2 (the current
        gradient). Skipped, with the weights restored, on a non-finite g1/g2."""
        if not self._perturbed:
            raise RuntimeError(f"{type(self).__name__}.second_step(): no perturbation to undo; call "
                               f"first_step() after the first backward pass")
        for b in self._buckets:
            b.sync()
        found_inf = self._found_inf()
        skip = found_inf is not None and bool(found_inf.item())
        grad_scale = getattr(self, "grad_scale", None)
        if self._fused_sgd:
            self._fused_update(found_inf, grad_scale, skip)
        else:
            for i, b in enumerate(self._buckets):
                b.data.copy_(self._backup[i])
            if not skip:
                if grad_scale is not None:
                    for b in self._buckets:
                        b.grad.div_(grad_scale.to(device=b.device, dtype=b.dtype))
                self.base_optimizer.step()
        self._perturbed = False
        self._first_nonfinite = False
        self._k += 1
        self._opt_called = True   # what torch's LR schedulers check: no "scheduler before step" warning
        if skip:
            self.skipped_steps += 1
            warnings.warn(f"{type(self).__name__}: non-finite gradient at step {self._k - 1}; the "
                          f"update was skipped and the parameters restored", RuntimeWarning,
                          stacklevel=3)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def restore(self) -> None:
        """Undo an active perturbation without updating (no-op when none is active)."""
        if self._perturbed:
            for i, b in enumerate(self._buckets):
                b.data.copy_(self._backup[i])
            self._perturbed = False
            self._first_nonfinite = False

    def _found_inf(self) -> torch.Tensor | None:
        if self._first_nonfinite:
            return torch.ones(1)
        scaler_found = getattr(self, "found_inf", None)   # set by torch.amp.GradScaler.step
        if scaler_found is not None:
            return scaler_found.float().reshape(1)
        if not self.check_finite or not self._buckets:
            return None
        worst = max(float(torch.linalg.vector_norm(b.grad, float("inf"))) for b in self._buckets)
        return torch.tensor([0.0 if math.isfinite(worst) else 1.0])

    def _fused_update(self, found_inf, grad_scale, skip: bool) -> None:
        for i, b in enumerate(self._buckets):
            has = [b.received[j] for j in range(len(b.params))]
            g = self.param_groups[b.group_index]
            mu = g["momentum"]
            if mu > 0 and self._momentum[i] is None:
                self._momentum[i] = torch.zeros_like(b.data)
            mom = self._momentum[i] if mu > 0 else None
            ready = self._mom_ready[i]
            fi = found_inf.to(b.device) if found_inf is not None else None
            gs = grad_scale.float().to(b.device).reshape(1) if grad_scale is not None else None
            mult = -1.0 if g.get("maximize", False) else 1.0
            backup = self._backup[i]
            for start, stop, with_grad, init in _runs(has, ready, mom is not None):
                off = b.offsets[start]
                sl = slice(off, b.offsets[stop - 1] + b.numels[stop - 1])
                if with_grad:
                    self._backends[i].sam_restore_and_step_(
                        b.data[sl], backup[sl], b.grad[sl], mom[sl] if mom is not None else None,
                        gs, fi, g["lr"], g["weight_decay"], mu, g["dampening"], g["nesterov"],
                        init, mult)
                else:
                    b.data[sl].copy_(backup[sl])
            if mom is not None and not skip:
                for j, h in enumerate(has):
                    if h and not ready[j]:
                        ready[j] = True
                        self.state[b.params[j]]["momentum_buffer"] = b.slice(mom, j).view_as(b.params[j])

    # ----------------------------------------------------------------- step
    def _has_gradients(self) -> bool:
        for b in self._buckets:
            b.sync()
        return any(any(b.received) for b in self._buckets)

    def _bn_context(self):
        return running_stats_frozen() if self.freeze_bn else contextlib.nullcontext()

    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """One SAM step, davda54/sam's convention: the first backward (g1) has been done by
        the caller; ``closure`` runs the second forward/backward (g2) at the perturbed point
        (with BatchNorm running statistics frozen, see ``freeze_bn``). Returns its loss.

        Without a closure, only after ``first_step()``: same as ``second_step()``.
        """
        name = type(self).__name__
        if closure is None:
            if self._perturbed:
                self.second_step()
                return None
            raise RuntimeError(
                f"{name}.step() needs a closure that recomputes the loss and calls backward() "
                f"(SAM takes two gradients per step): do the first forward/backward, then "
                f"{name}.step(closure); or use first_step() / second_step()")
        if self._perturbed:
            raise RuntimeError(f"{name}.step(closure) called after first_step(); call second_step()")
        if not self._has_gradients():
            raise RuntimeError(
                f"{name}.step(closure): no parameter has a gradient. Compute the first loss and "
                f"call backward() before step(closure); the closure computes the second "
                f"(perturbed) pass, as in davda54/sam")
        self.first_step(zero_grad=True)
        try:
            with torch.enable_grad(), self._bn_context():
                loss = closure()
        except BaseException:
            self.restore()
            raise
        self.second_step()
        return loss

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """The base optimizer's state_dict (its per-parameter state, e.g. SGD's
        'momentum_buffer', and the param_groups with rho/adaptive/normalize) plus a
        'fused_flat' entry (step counter, skipped steps, RW-SAM's seed)."""
        if self._perturbed:
            raise RuntimeError(f"{type(self).__name__}.state_dict(): the weights are perturbed; "
                               f"call second_step() or restore() first")
        sd = self.base_optimizer.state_dict()
        sd["fused_flat"] = {"format": _STATE_FORMAT, "kind": type(self).__name__, "step": self._k,
                            "skipped_steps": self.skipped_steps, "seed": self.seed}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        name = type(self).__name__
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("fused_flat"), dict):
            raise ValueError(f"{name}.load_state_dict: not a fused_flat SAM state_dict (no "
                             f"'fused_flat' entry); it must come from {name}.state_dict()")
        meta = state_dict["fused_flat"]
        if meta.get("format") != _STATE_FORMAT:
            raise ValueError(f"{name}.load_state_dict: unknown format {meta.get('format')!r} "
                             f"(this version reads format {_STATE_FORMAT})")
        k, seed = meta.get("step"), meta.get("seed")
        if not isinstance(k, int) or k < 0 or (seed is not None and not (
                isinstance(seed, int) and 0 <= seed < 2 ** 63)):
            raise ValueError(f"{name}.load_state_dict: corrupted 'fused_flat' entry "
                             f"(step={k!r}, seed={seed!r})")
        self.restore()
        base_sd = {key: v for key, v in state_dict.items() if key != "fused_flat"}
        self.base_optimizer.load_state_dict(base_sd)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        for g in self.param_groups:
            self._validate_group(g)
        self._k = k
        self.skipped_steps = int(meta.get("skipped_steps", 0))
        if seed is not None:
            self.seed = seed
        if self._fused_sgd:
            with torch.no_grad():
                for i, b in enumerate(self._buckets):
                    ready = [("momentum_buffer" in self.state.get(p, {})
                              and self.state[p]["momentum_buffer"] is not None) for p in b.params]
                    self._mom_ready[i] = ready
                    if not any(ready):
                        continue
                    if self._momentum[i] is None:
                        self._momentum[i] = torch.zeros_like(b.data)
                    for j, p in enumerate(b.params):
                        if ready[j]:
                            view = b.slice(self._momentum[i], j)
                            view.copy_(self.state[p]["momentum_buffer"].reshape(-1))
                            self.state[p]["momentum_buffer"] = view.view_as(p)


# ---------------------------------------------------------------------------- m-SAM
def _split_batch(batch, m: int) -> list[tuple[object, int]]:
    if isinstance(batch, torch.Tensor):
        return [(t, t.shape[0]) for t in torch.split(batch, m)]
    if isinstance(batch, (tuple, list)) and batch and all(isinstance(t, torch.Tensor) for t in batch):
        n = batch[0].shape[0]
        if any(t.shape[0] != n for t in batch):
            raise ValueError(f"MSAM: the batch tensors have different sizes along dim 0 "
                             f"({[t.shape[0] for t in batch]}); they must split together")
        parts = [torch.split(t, m) for t in batch]
        return [(type(batch)(p), p[0].shape[0]) for p in zip(*parts)]
    raise TypeError(f"MSAM.step: batch must be a tensor or a tuple/list of tensors (split along "
                    f"dim 0), got {type(batch).__name__}")


class MSAM(SAM):
    r"""m-SAM: the batch is split into micro-batches of ``micro_batch_size`` samples; each
    micro-batch i gets its own :math:`e_i` from its own :math:`g_{1,i}` and its own
    :math:`g_{2,i}` at :math:`\theta + e_i`; the update uses the mean of the :math:`g_{2,i}`
    (weighted by micro-batch size when the last one is smaller, so it is the plain mean
    whenever m divides the batch).

    Under DDP, SAM's per-rank perturbation (each rank perturbs with its local gradient, the
    g2 are all-reduced) is exactly m-SAM with m = the per-device batch size.

    ``step(closure, batch)``: ``closure(micro_batch)`` computes the mean loss of the
    micro-batch (same structure as ``batch``: a tensor or a tuple/list of tensors, split
    along dim 0) and calls ``backward()``; it is called twice per micro-batch. Gradients are
    zeroed by the step. BatchNorm: the first pass of each micro-batch updates the running
    statistics (as training on that micro-batch would), the perturbed pass does not
    (``freeze_bn``). Memory: one gradient-sized accumulator beyond SAM. AMP: MSAM.step
    takes no GradScaler (the backward passes are the closure's); use bf16 autocast.
    """

    def __init__(self, params, base_optimizer: type = torch.optim.SGD, rho: float | None = None,
                 adaptive: bool = False, normalize: bool = True, *, micro_batch_size: int,
                 **kwargs):
        if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int) or micro_batch_size < 1:
            raise ValueError(f"MSAM: micro_batch_size must be an integer >= 1, got {micro_batch_size!r}")
        self.micro_batch_size = micro_batch_size
        super().__init__(params, base_optimizer, rho, adaptive, normalize, **kwargs)
        self._acc: list[torch.Tensor] | None = None

    def step(self, closure=None, batch=None):
        """One m-SAM step over ``batch``; returns the size-weighted mean of the first-pass
        micro-batch losses (detached)."""
        if closure is None or batch is None:
            if closure is None and batch is None and self._perturbed:
                self.second_step()
                return None
            raise RuntimeError("MSAM.step(closure, batch): closure(micro_batch) computes the "
                               "micro-batch's loss and calls backward(); batch is a tensor or a "
                               "tuple of tensors split along dim 0")
        if self._perturbed:
            raise RuntimeError("MSAM.step(closure, batch) called after first_step()")
        parts = _split_batch(batch, self.micro_batch_size)
        total = sum(n for _, n in parts)
        if self._acc is None:
            self._acc = [torch.zeros_like(b.grad) for b in self._buckets]
        received = [[False] * len(b.params) for b in self._buckets]
        nonfinite = False
        loss_sum = 0.0
        try:
            for mb, n in parts:
                w = n / total
                self.zero_grad()
                with torch.enable_grad():
                    loss = closure(mb)
                loss_sum = loss_sum + w * loss.detach() if isinstance(loss, torch.Tensor) else loss_sum
                self.first_step(zero_grad=True)
                nonfinite = nonfinite or self._first_nonfinite
                with torch.enable_grad(), self._bn_context():
                    closure(mb)
                with torch.no_grad():
                    for i, b in enumerate(self._buckets):
                        b.sync()
                        self._acc[i].add_(b.grad, alpha=w)
                        received[i] = [r or s for r, s in zip(received[i], b.received)]
                self.restore()
        except BaseException:
            self.restore()
            for a in self._acc:
                a.zero_()
            raise
        with torch.no_grad():
            for i, b in enumerate(self._buckets):
                b.grad.copy_(self._acc[i])
                self._acc[i].zero_()
                b.received = received[i]
                self._backup[i].copy_(b.data)
        self._perturbed = True            # the weights equal the backup: second_step updates
        self._first_nonfinite = nonfinite
        self.second_step()
        return loss_sum


# ---------------------------------------------------------------------------- RW-SAM
class RWSAM(SAM):
    r"""Reweighted SAM (papers/rw-sam-paper.txt, sec. 4; ALGORITHMS.md §3).

    Per step k, with ``closure()`` returning the vector of per-sample losses :math:`\ell_i`
    (with the autograd graph):

    1. :math:`\ell_i(\theta)` (first forward; updates BatchNorm running statistics);
    2. one extra forward at :math:`\theta + \delta v`, v Rademacher from the noise stream
       (``seed``, bucket, k, tag 16), without autograd and with BatchNorm statistics frozen;
       :math:`\hat g_i^2 = ((\ell_i(\theta + \delta v) - \ell_i(\theta)) / \delta)^2`
       estimates :math:`\lVert\nabla \ell_i\rVert^2`;
    3. normalization (the paper normalizes before the exponential; our choice): divide by
       the batch mean, :math:`n_i = \hat g_i^2 / \mathrm{mean}_j \hat g_j^2` (scale-free, so
       ``lam`` means the same for every model and loss scale);
    4. :math:`p = \mathrm{softmax}(\lambda n)` (detached), :math:`g_1 = \nabla \sum_i p_i \ell_i`;
    5. SAM (ASAM/USAM per ``adaptive``/``normalize``) with :math:`g_2` from the ordinary mean
       loss :math:`\mathrm{mean}_i \ell_i` at :math:`\theta + e` (BatchNorm frozen).

    ``lam = 0`` gives uniform weights: exactly SAM. ``delta`` (required) is the probe size;
    pick it with :func:`choose_delta` before training. ``seed`` (in [0, 2^63)) defaults to a
    draw from torch's default generator and is saved in ``state_dict``. ``last_weights``
    holds the last step's p. The closure is called three times per step; it must not call
    backward() itself. AMP: not supported by RWSAM.step (the first backward is internal).
    """

    def __init__(self, params, base_optimizer: type = torch.optim.SGD, rho: float | None = None,
                 adaptive: bool = False, normalize: bool = True, *, delta: float, lam: float = 0.5,
                 seed: int | None = None, **kwargs):
        delta = _number("delta", delta, "RWSAM")
        if not 0.0 < delta < math.inf:
            raise ValueError(f"RWSAM: invalid delta={delta} (the probe size must be finite and > 0; "
                             f"fused_flat.sam.choose_delta picks one)")
        lam = _number("lam", lam, "RWSAM")
        if not math.isfinite(lam):
            raise ValueError(f"RWSAM: invalid lam={lam} (must be finite; 0 gives SAM)")
        if seed is None:
            seed = default_seed()
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
            raise ValueError(f"RWSAM: seed must be an integer in [0, 2^63), got {seed!r}")
        super().__init__(params, base_optimizer, rho, adaptive, normalize, **kwargs)
        self.delta, self.lam, self.seed = delta, lam, seed
        self.last_weights: torch.Tensor | None = None

    def _per_sample(self, closure) -> torch.Tensor:
        losses = closure()
        if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
            raise ValueError("RWSAM.step(closure): closure() must return the 1-D tensor of "
                             "per-sample losses (e.g. cross_entropy(..., reduction='none')), got "
                             f"{type(losses).__name__}"
                             f"{tuple(losses.shape) if isinstance(losses, torch.Tensor) else ''}")
        return losses

    def sample_weights(self, losses: torch.Tensor, probed: torch.Tensor) -> torch.Tensor:
        """p = softmax(lam * ghat^2 / mean(ghat^2)) from the losses at theta and theta + delta v."""
        dt = torch.promote_types(losses.dtype, torch.float32)
        ghat2 = ((probed.detach().to(dt) - losses.detach().to(dt)) / self.delta) ** 2
        normalized = ghat2 / ghat2.mean().clamp_min(torch.finfo(dt).tiny)
        return torch.softmax(self.lam * normalized, dim=0)

    def step(self, closure=None):
        """One RW-SAM step; ``closure()`` returns the per-sample losses. Returns their mean
        at theta (detached)."""
        if closure is None:
            if self._perturbed:
                self.second_step()
                return None
            raise RuntimeError("RWSAM.step(closure): closure() must return the per-sample losses "
                               "(1-D, with the autograd graph); RW-SAM computes both gradients")
        if self._perturbed:
            raise RuntimeError("RWSAM.step(closure) called after first_step(); call second_step()")
        for b in self._buckets:
            b.sync()
        self.zero_grad()
        with torch.enable_grad():
            losses = self._per_sample(closure)
        with torch.no_grad():
            for i, b in enumerate(self._buckets):
                self._backends[i].sam_probe_(b.data, self._backup[i], self.seed, b.bucket_id,
                                             self._k, self.delta, 0)
            try:
                with self._bn_context():
                    probed = self._per_sample(closure)
            finally:
                for i, b in enumerate(self._buckets):
                    b.data.copy_(self._backup[i])
            if probed.shape != losses.shape:
                raise ValueError(f"RWSAM.step: closure() returned {tuple(probed.shape)} losses at "
                                 f"the probe point but {tuple(losses.shape)} at theta")
            p = self.sample_weights(losses, probed).to(losses.dtype)
        with torch.enable_grad():
            (p * losses).sum().backward()
        self.last_weights = p
        self.first_step(zero_grad=True)
        try:
            with torch.enable_grad(), self._bn_context():
                self._per_sample(closure).mean().backward()
        except BaseException:
            self.restore()
            raise
        self.second_step()
        return losses.detach().mean()


def choose_delta(model: torch.nn.Module, per_sample_loss_fn: Callable[[], torch.Tensor],
                 candidates: Sequence[float] = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5),
                 seed: int = 0) -> tuple[float, dict[float, float]]:
    r"""Pick RW-SAM's probe size delta before training, as the paper does.

    For a Rademacher direction v (noise stream, ``seed``, tag 16) the exact per-sample
    directional derivatives :math:`\nabla\ell_i \cdot v` come from autograd (double
    backward, works with BatchNorm in train mode); for each candidate the finite difference
    :math:`(\ell_i(\theta + \delta v) - \ell_i(\theta))/\delta` is compared with them. Returns
    the delta of smallest relative error :math:`\lVert fd - dd\rVert / \lVert dd\rVert` and
    all errors. BatchNorm running statistics are frozen throughout; the parameters are
    restored exactly.
    """
    from fused_flat import noise

    if not candidates or any(not (isinstance(c, (int, float)) and 0 < c < math.inf) for c in candidates):
        raise ValueError(f"choose_delta: candidates must be positive finite numbers, got {candidates!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("choose_delta: the model has no parameter with requires_grad=True")
    vs, off = [], 0
    for p in params:
        vs.append(noise.rademacher(seed, 0, 0, off, p.numel(), p.device).to(p.dtype).view_as(p))
        off += p.numel()
    with running_stats_frozen(model):
        with torch.enable_grad():
            losses = per_sample_loss_fn()
            if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
                raise ValueError("choose_delta: per_sample_loss_fn() must return the 1-D tensor of "
                                 "per-sample losses")
            w = torch.ones_like(losses, requires_grad=True)
            grads = torch.autograd.grad((w * losses).sum(), params, create_graph=True, allow_unused=True)
            dot = sum((g * v).sum() for g, v in zip(grads, vs) if g is not None)
            exact = torch.autograd.grad(dot, w)[0].detach().double()
        base = losses.detach().double()
        saved = [p.detach().clone() for p in params]
        errors = {}
        with torch.no_grad():
            for d in candidates:
                for p, v in zip(params, vs):
                    p.add_(v, alpha=d)
                try:
                    fd = (per_sample_loss_fn().detach().double() - base) / d
                finally:
                    for p, s in zip(params, saved):
                        p.copy_(s)
                errors[float(d)] = float(torch.linalg.vector_norm(fd - exact)
                                         / torch.linalg.vector_norm(exact).clamp_min(1e-300))
    best = min(errors, key=errors.get)
    return best, errors
