r"""SAM, ASAM and USAM on tensor-list buckets (ALGORITHMS.md §3); m-SAM: fused_flat.optim.msam,
RW-SAM: fused_flat.optim.rwsam.

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
``state_dict`` (#73), ``torch.amp.GradScaler`` works (#97), parameters, gradients and state stay
torch's own tensors (a bucket is an index space over them, fused_flat.optim.buckets), BatchNorm statistics are updated once per
step (#17, #80; fused_flat.nn.bn), and the SAM object *is* the optimizer whose param_groups the
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
import weakref
from typing import Callable

import torch
from torch.optim import Optimizer

from fused_flat.nn.bn import running_stats_frozen
from fused_flat.optim.buckets import flat, local_copy_
from fused_flat.optim.core import FlatOptimizer, _runtime_attr, number, refuse_dcp_state_init

NORM_EPS = 1e-12
RHO_DEFAULT = 0.05
RHO_DEFAULT_ADAPTIVE = 2.0

_warned_unfused = False


def _warn_unfused(base_cls: type) -> None:
    global _warned_unfused
    if not _warned_unfused:
        _warned_unfused = True
        warnings.warn(
            f"fused_flat SAM: the fused update is SGD-only; with base optimizer "
            f"{base_cls.__name__} the norm, the perturbation and the restore are fused and "
            f"{base_cls.__name__}.step() then runs as usual.", UserWarning, stacklevel=3)


class SAM(FlatOptimizer):
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
            ``found_inf`` decides for g2 and g1 is still checked (an overflowed scaled g1).
            ``False`` without a GradScaler: no check at all, a non-finite gradient goes
            through the arithmetic as in davda54/sam. ``skipped_steps`` counts skips.
        freeze_bn (bool): ``step(closure)`` runs the closure (the perturbed pass) with the
            running statistics of every BatchNorm that runs in it frozen
            (fused_flat.nn.bn.running_stats_frozen), so they are updated once per step, by the
            first pass, exactly as with the base optimizer alone. In the two-call form use
            ``with running_stats_frozen(model):`` around the second forward yourself.
        seed (int | None): the noise seed (RW-SAM's probe, the stochastic-rounding bits);
            default drawn from torch's generator, rank 0's under torch.distributed.
        stochastic_rounding (bool | None), master_weights (bool): bf16/fp16 parameters, as in
            the Langevin family (fused path only): the ascent step always restores exactly
            from its backup; the base update rounds stochastically into the 16-bit weights
            (default), or runs on fp32 masters (``state[p]["master_weight"]``, fp32 momentum)
            and writes round(master) back.
        capturable (bool): as in the Langevin family: the step counter (SR bits, RW-SAM's
            probe) and a tensor ``lr`` stay on the parameters' device and the kernels read
            them, so ``first_step`` + ``second_step`` can be captured in a CUDA graph. Needs
            base_optimizer=torch.optim.SGD (the fused update).
        **base_kwargs: the base optimizer's hyperparameters (``lr``, ``momentum``, ...).

    Usage (davda54/sam's)::

        loss_fn(model(x), y).backward()          # g1 (the first pass updates BN stats)
        opt.step(lambda: loss_fn(model(x), y).backward() or ...)   # closure: g2

        # or torch.optim's closure form (LBFGS-style loops, Lightning): no backward before
        # the step, the closure is called for g1 and again for g2; returns the first loss
        def closure():
            opt.zero_grad(); loss = loss_fn(model(x), y); loss.backward(); return loss
        loss = opt.step(closure)

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
    before ``second_step`` (g2); ``p.grad`` accumulates as usual. A parameter is perturbed
    iff it has g1 and updated iff it has g2 (``p.grad is not None``); the momentum lives in
    ``state[p]["momentum_buffer"]``, torch.optim.SGD's own state.

    torch.compile (CPU, backends 'cpp' and 'reference'): as for the Langevin family
    (LangevinOptimizer): compiled ``first_step`` and ``second_step`` compile once each for
    every step counter and tensor ``lr`` (the backups and momentum buffers are made before
    the first ``first_step`` is traced); with a float ``lr``, ``first_step`` (which reads no
    lr, nor guards on it) still compiles once and ``second_step`` once more when a
    scheduler first changes the lr, as torch.optim.SGD's step; a compiled
    ``step(closure)`` splits at the closure's ``backward()``.
    """

    _sam_family = True
    _grads_left = _runtime_attr("_grads_left")   # _GradMarks of the last step(closure)

    def __init__(self, params, base_optimizer: type = torch.optim.SGD, rho: float | None = None,
                 adaptive: bool = False, normalize: bool = True, *, adaptive_eta: float = 0.0,
                 backend: str = "auto", check_finite: bool = True, freeze_bn: bool = True,
                 seed: int | None = None, stochastic_rounding: bool | None = None,
                 master_weights: bool = False, capturable: bool = False, process_group=None,
                 **base_kwargs):
        name = type(self).__name__
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer)):
            raise TypeError(f"{name}: base_optimizer must be a torch.optim.Optimizer class (e.g. "
                            f"torch.optim.SGD) and its hyperparameters keyword arguments of {name}, "
                            f"got {base_optimizer!r}")
        if issubclass(base_optimizer, SAM):
            raise TypeError(f"{name}: base_optimizer cannot itself be a SAM optimizer")
        # torch.optim validates the hyperparameters before it looks at the parameters: so
        # does the base optimizer here, on a stand-in (``SAM(None, lr=-1)``: ValueError)
        base_optimizer([torch.nn.Parameter(torch.zeros(1))], **base_kwargs)
        self.freeze_bn = bool(freeze_bn)
        self._perturbed: list[list[int]] | None = None   # per bucket: indices perturbed by first_step
        self._first_nonfinite = False
        self._first_found: torch.Tensor | None = None   # g1 non-finite, on the device (CUDA)
        self._backups: dict = {}
        defaults = dict(rho=rho, adaptive=adaptive, normalize=normalize, adaptive_eta=adaptive_eta,
                        **base_kwargs)
        super().__init__(params, defaults)
        with warnings.catch_warnings():   # torch.optim warned once already, on this object
            warnings.filterwarnings("ignore", message="optimizer contains a parameter group with "
                                    "duplicate parameters")
            self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups   # the same dicts: schedulers see them
        self.state = self.base_optimizer.state
        self.defaults.update(self.base_optimizer.defaults)
        self._fused_sgd = type(self.base_optimizer) is torch.optim.SGD and not any(
            g.get("differentiable", False) for g in self.param_groups)
        if not self._fused_sgd:
            _warn_unfused(base_optimizer)
        self._init_low_precision(stochastic_rounding, master_weights)
        if capturable and not self._fused_sgd:
            raise ValueError(f"{name}: capturable=True needs the fused update, i.e. "
                             f"base_optimizer=torch.optim.SGD (not differentiable); "
                             f"{base_optimizer.__name__}'s step runs after a host read of the "
                             f"skip flag")
        self._init_core(seed=seed, backend=backend, check_finite=check_finite,
                        capturable=capturable, process_group=process_group)

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
        g["rho"] = number("rho", g["rho"], name)
        if not 0.0 <= g["rho"] < math.inf:
            raise ValueError(f"{name}: invalid rho={g['rho']} (the perturbation radius must be finite "
                             f"and >= 0; rho=0 gives the base optimizer)")
        g["adaptive_eta"] = number("adaptive_eta", g["adaptive_eta"], name)
        if not 0.0 <= g["adaptive_eta"] < math.inf:
            raise ValueError(f"{name}: invalid adaptive_eta={g['adaptive_eta']} (ASAM's offset in "
                             f"T = |theta| + eta must be finite and >= 0)")

    def add_param_group(self, param_group: dict) -> None:
        if not hasattr(self, "base_optimizer"):
            return super().add_param_group(param_group)
        for key in ("rho", "adaptive", "normalize", "adaptive_eta"):
            param_group.setdefault(key, self.defaults[key])
        self._materialize_group(param_group)
        self.base_optimizer.add_param_group(param_group)
        self._validate_group(self.param_groups[-1])

    def _is_perturbed(self) -> bool:
        return self._perturbed is not None

    @staticmethod
    def _norm_on_host(buckets) -> bool:
        """Whether first_step reads g1's norm on the host (CPU tensors, eager: it costs
        nothing) or keeps it, the coefficient and g1's verdict (``_first_found``) on the
        device (CUDA; compiled steps): no host synchronization."""
        return all(b.device.type == "cpu" for b in buckets) and not torch.compiler.is_compiling()

    # ----------------------------------------------------------------- the two halves
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, grad_scaler=None) -> None:
        """theta <- theta + e(g1) for every parameter with a gradient; their unperturbed
        values are kept in a backup.

        ``grad_scaler``: the ``torch.amp.GradScaler`` that scaled the first loss; g1 is read
        as g / scale (needed by USAM; SAM/ASAM are scale-free up to the 1e-12). A non-finite
        g1 leaves the weights unperturbed and makes the step a skipped one.
        """
        if self._perturbed is not None:
            raise RuntimeError(f"{type(self).__name__}.first_step(): the weights are already "
                               f"perturbed; call second_step() (or step()) first")
        self._compile_init("first")   # compiled: backups, momentum buffers, made before the trace
        if torch.compiler.is_compiling() or not self._first_step_planned(grad_scaler):
            self._first_step_general(grad_scaler)
            self._drop_plans()
        if zero_grad:
            self.zero_grad()

    def _first_norm(self, sq, grad_scaler, buckets) -> tuple:
        """(norm, inv) of g1 from its sum of squares ``sq`` (None: no gradient), and g1's
        verdict (``_first_nonfinite`` on the host, ``_first_found`` on the device)."""
        scaled = grad_scaler is not None and grad_scaler.is_enabled()
        # g1's verdict: only when asked (check_finite) or under a GradScaler (an overflowed
        # scaled g1); with check_finite=False a non-finite g1 goes through the arithmetic
        check = self.check_finite or scaled
        if self._norm_on_host(buckets):
            inv = 1.0 / float(grad_scaler.get_scale()) if scaled else 1.0
            norm = math.sqrt(float(sq)) * inv if sq is not None else 0.0
            self._first_nonfinite = check and not math.isfinite(norm)
        else:   # device tensors throughout: no host synchronization
            dev = buckets[0].device
            sq = sq.to(dev) if sq is not None else torch.zeros((), dtype=torch.float64, device=dev)
            inv = (1.0 / grad_scaler._get_scale_async().to(dev, torch.float64).reshape(())) if scaled else 1.0
            norm = sq.sqrt() * inv
            self._first_found = (~torch.isfinite(norm)).float().reshape(1) if check else None
            self._first_nonfinite = False
        return norm, inv

    def _first_step_planned(self, grad_scaler) -> bool:
        """_first_step_general through the step plans, with its bits; False: not taken
        (nothing written). Passes per bucket: the check (Backend.check_step), the norm, the
        perturbation."""
        plans = self._step_plans()
        if plans is None:
            return False
        grads = self._planned_grads(plans)
        if grads is None:
            return False
        # the norm over every parameter of the only bucket is the first pass (it writes nothing)
        own = self._checks_itself(plans, plans[0].grads.upd)
        if not own and self._planned_check(plans, grads, False) is None:
            return False
        groups = self.param_groups
        sq = None
        for P, gl in zip(plans, grads):
            part = P.grads.upd
            if part is not None:
                g = groups[P.bucket.group_index]
                try:
                    sq_b = P.backend.sam_grad_sq_norm(part.grads(gl), part.params, g["adaptive_eta"],
                                                      adaptive=g["adaptive"], layout=part.layout)
                except Exception:
                    if own:
                        return False
                    raise
                sq_b = sq_b.to(torch.float64)
                sq = sq_b if sq is None else sq + sq_b
        norm, inv = self._first_norm(sq, grad_scaler, self._buckets)
        made = []
        for P, gl in zip(plans, grads):
            U = P.grads
            made.append([] if self._first_nonfinite else U.idx)
            if self._first_nonfinite or U.upd is None:
                continue
            g = groups[P.bucket.group_index]
            coef = g["rho"] * inv / (norm + NORM_EPS) if g["normalize"] else g["rho"] * inv
            P.backend.sam_perturb_(U.upd.params, U.upd.grads(gl), U.backups, g["adaptive"], coef,
                                   g["adaptive_eta"], layout=U.upd.layout)
        self._perturbed = made
        return True

    def _init_group(self, part: str) -> None:
        """FlatOptimizer._init_group, for a compiled first_step ('first') and second_step
        ('update'): the backups of the parameters with a gradient and, with the fused SGD
        update (another base optimizer makes its own state), their momentum buffers. Both
        are made at first_step, from g1: a compiled first_step that saw the state before
        second_step made the buffers would compile again (it guards on the state), so
        second_step only adds those of parameters with g2 but no g1."""
        if self._fused_sgd:
            self._init_momentum()
        self._init_family(part)

    def _init_family(self, part: str) -> None:
        """The backups of the parameters with a gradient (_init_group)."""
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    self._backup_of(p)

    def _plans_possible(self, buckets) -> bool:
        return self._fused_sgd and super()._plans_possible(buckets)   # the fused update only

    def _plan_grads_family(self, P, U) -> None:
        U.backups = [self._backup_of(p) for p in U.upd.params] if U.upd else None   # first_step's

    def _first_step_general(self, grad_scaler) -> None:
        buckets = self.buckets()
        with_grad = [self._grads(b) for b in buckets]
        grads = [[self._flat_grad(b.params[j]) for j in idx] for b, idx in zip(buckets, with_grad)]
        parts: dict = {}   # {shard key: partial sum of squares}; sharded ones are reduced over the mesh
        groups = self._groups   # compiled: guards on rho & co, not the lr (FlatOptimizer._groups)
        for bi, b in enumerate(buckets):
            g = groups[b.group_index]
            idx = with_grad[bi]
            for key, ks in self._split_sharded(b, idx).items():
                ps = [flat(b.params[idx[k]]) for k in ks] if g["adaptive"] else None
                part = self._backends[bi].sam_grad_sq_norm([grads[bi][k] for k in ks], ps,
                                                           g["adaptive_eta"]).to(torch.float64)
                parts[key] = part if key not in parts else parts[key] + part.to(parts[key].device)
        sq = self._sum_sharded(parts)
        norm, inv = self._first_norm(sq, grad_scaler, buckets)
        made = []
        for bi, b in enumerate(buckets):
            g = groups[b.group_index]
            idx = [] if self._first_nonfinite else with_grad[bi]
            made.append(idx)
            if not idx:
                continue
            if self._masters(b):   # the masters hold the unperturbed weights from the start
                for j in idx:
                    self._master(b.params[j])
            coef = g["rho"] * inv / (norm + NORM_EPS) if g["normalize"] else g["rho"] * inv
            self._backends[bi].sam_perturb_(
                [flat(b.params[j]) for j in idx], grads[bi],
                [flat(self._backup_of(b.params[j])) for j in idx], g["adaptive"], coef,
                g["adaptive_eta"])
        self._perturbed = made

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """theta <- backup (exact), then the base optimizer's step with g2 (the current
        gradient). Skipped, with the weights restored, on a non-finite g1/g2."""
        if self._perturbed is None:
            raise RuntimeError(f"{type(self).__name__}.second_step(): no perturbation to undo; call "
                               f"first_step() after the first backward pass")
        self._compile_init("update")   # compiled: the momentum buffers, made before the trace
        if torch.compiler.is_compiling() or not self._second_step_planned():
            self._second_step_general()
            self._drop_plans()
        self._opt_called = True   # what torch's LR schedulers check: no "scheduler before step" warning
        if zero_grad:
            self.zero_grad()

    def _second_step_planned(self) -> bool:
        """_second_step_general through the step plans (fused SGD update), with its bits;
        False: not taken (nothing written). Passes per bucket: the check (found_inf), the
        restore + update."""
        if not self._fused_sgd or self._first_nonfinite or self._first_found is not None:
            return False
        plans = self._step_plans(build=False)
        if plans is None or any(P.grads is None or idx is not P.grads.idx
                                for P, idx in zip(plans, self._perturbed)):
            return False   # not perturbed by these plans (or g2's parameters differ from g1's)
        grads = self._planned_grads(plans)
        if grads is None:
            return False
        finite = self.check_finite and not self._scaler_decides()
        checks = self._planned_check(plans, grads, finite)
        if checks is None:
            return False
        found = self._planned_found(plans, checks)
        known_skip = self._known_skip(found)
        groups = self.param_groups
        for P, gl in zip(plans, grads):
            b, U = P.bucket, P.grads
            part = U.upd
            if part is None:
                continue
            g = groups[b.group_index]
            P.backend.sam_restore_and_step_(
                part.params, U.backups, part.grads(gl), part.moms if g["momentum"] != 0 else None,
                self._grad_scale(b.device), found, self._lr_arg(g, P.backend), g["weight_decay"],
                g["momentum"], g["dampening"], g["nesterov"], False,
                -1.0 if g.get("maximize", False) else 1.0, P.sr, self.seed, b.bucket_id, self._k,
                part.offsets, layout=part.layout)
        self._perturbed = None
        self._first_nonfinite = False
        self._first_found = None
        self._finish_step(found, known_skip)
        return True

    def _second_step_general(self) -> None:
        buckets = self._buckets
        try:
            with_grad = [self._grads(b) for b in buckets]
        except Exception:
            self.restore()
            raise
        grads = [[self._flat_grad(b.params[j]) for j in idx] for b, idx in zip(buckets, with_grad)]
        found_inf = torch.ones(1) if self._first_nonfinite else self._found_inf(grads)
        if self._first_found is not None:   # g1's verdict, kept on the device
            first = self._first_found
            found_inf = first if found_inf is None else torch.maximum(found_inf.to(first.device), first)
        if self._fused_sgd:
            known_skip = self._known_skip(found_inf)
            self._fused_update(buckets, with_grad, grads, found_inf, known_skip)
        else:
            self.restore()
            known_skip = found_inf is not None and bool(found_inf.item())
            if not known_skip:
                grad_scale = getattr(self, "grad_scale", None)
                if grad_scale is not None:
                    for b, idx in zip(buckets, with_grad):
                        for j in idx:
                            b.params[j].grad.div_(grad_scale.to(device=b.device, dtype=b.dtype))
                self.base_optimizer.step()
        self._perturbed = None
        self._first_nonfinite = False
        self._first_found = None
        self._finish_step(found_inf, known_skip)

    def _fused_update(self, buckets, with_grad, grads, found_inf, known_skip: bool) -> None:
        for bi, b in enumerate(buckets):
            g = self.param_groups[b.group_index]
            backend = self._backends[bi]
            idx = with_grad[bi]
            pert = set(self._perturbed[bi])
            fi = found_inf.to(b.device) if found_inf is not None else None
            gs = self._grad_scale(b.device)
            mult = -1.0 if g.get("maximize", False) else 1.0
            gpos = {j: k for k, j in enumerate(idx)}
            masters = self._masters(b)
            sr = self._sr(b, backend)
            gl = grads[bi]
            if masters:   # the ascent is undone by writing round(master) back below
                targets = {j: self._master(b.params[j]) for j in idx}
                sources = targets
                gl = [t.float() for t in gl]
            else:
                fresh = [b.params[j] for j in idx if j not in pert]   # g2 without g1: not perturbed
                if fresh:
                    local_copy_([self._backup_of(p) for p in fresh], fresh)
                targets = {j: b.params[j] for j in idx}
                sources = {j: self._backups[b.params[j]] for j in idx}
            for js, moms, init in self._momentum_lists(b, idx, g, create=not known_skip):
                backend.sam_restore_and_step_(
                    [flat(targets[j]) for j in js], [flat(sources[j]) for j in js],
                    [gl[gpos[j]] for j in js], moms, gs, fi, self._lr_arg(g, backend),
                    g["weight_decay"], g["momentum"], g["dampening"], g["nesterov"], init, mult,
                    *((True, self.seed, b.bucket_id, self._step_arg(backend),
                       [b.index(j) for j in js]) if sr else ()))
            if masters:
                for j in set(idx) | pert:
                    b.params[j].copy_(self._master(b.params[j]))
                continue
            lone = [b.params[j] for j in sorted(pert - set(idx))]   # g1 without g2: restore only
            if lone:
                local_copy_(lone, [self._backups[p] for p in lone])

    @torch.no_grad()
    def restore(self) -> None:
        """Undo an active perturbation without updating (no-op when none is active)."""
        if self._perturbed is None:
            return
        for b, idx in zip(self._buckets, self._perturbed):
            ps = [b.params[j] for j in idx]
            if ps:
                local_copy_(ps, [self._backups[p] for p in ps])
        self._perturbed = None
        self._first_nonfinite = False
        self._first_found = None

    # ----------------------------------------------------------------- step
    @torch._disable_dynamo   # a host check (compiled step(closure): no guard on param_groups)
    def _has_gradients(self) -> bool:
        return any(p.grad is not None for g in self.param_groups for p in g["params"])

    def _bn_context(self):
        return running_stats_frozen() if self.freeze_bn else contextlib.nullcontext()

    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """One SAM step with a ``closure`` that computes the loss and calls ``backward()``
        (zeroing the gradients itself or not: the step zeroes them before each call).
        Two forms, told apart by whether a backward has written a gradient since the last
        step:

        * davda54/sam's: the caller has done the first backward (g1); ``closure`` runs the
          second forward/backward (g2) at the perturbed point. Returns the closure's loss.
        * torch.optim's (LBFGS-style loops, Lightning): no backward since the last step (no
          gradient, or only the ones the last step left); ``closure`` is called for g1 (at
          theta, BatchNorm statistics updated), then again for g2. Returns the first loss.

        The perturbed pass runs with BatchNorm running statistics frozen (``freeze_bn``).
        Without a closure, only after ``first_step()``: same as ``second_step()``.
        """
        name = type(self).__name__
        if closure is None:
            refuse_dcp_state_init(type(self).__name__)
            if self._perturbed is not None:
                self.second_step()
                return None
            raise RuntimeError(
                f"{name}.step() needs a closure that recomputes the loss and calls backward() "
                f"(SAM takes two gradients per step): {name}.step(closure), or the first "
                f"backward then {name}.step(closure) (davda54/sam), or first_step() / "
                f"second_step()")
        if self._perturbed is not None:
            raise RuntimeError(f"{name}.step(closure) called after first_step(); call second_step()")
        first_loss = None
        if not self._new_gradients():   # torch.optim's form: the closure computes g1 too
            self.zero_grad()             # what the last step left is no g1
            with torch.enable_grad():
                first_loss = closure()
            if not self._has_gradients():
                raise RuntimeError(f"{name}.step(closure): closure() computed no gradient; it "
                                   f"must compute the loss and call backward() on it")
        self.first_step(zero_grad=True)
        try:
            with torch.enable_grad(), self._bn_context():
                loss = closure()
        except BaseException:
            self.restore()
            raise
        self.second_step()
        self._mark_grads_left()   # no g1 for the next step(closure)
        return loss if first_loss is None else first_loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch.optim's. Gradients it zeroes in place (``set_to_none=False``) hold no
        backward's result, so they are no g1 for ``step(closure)``'s choice of form: after
        ``opt.zero_grad(set_to_none=False)``, ``opt.step(closure)`` is torch.optim's form.
        (``model.zero_grad(set_to_none=False)`` cannot be told from a backward: there, zero
        with ``set_to_none=True`` or through the optimizer.)"""
        super().zero_grad(set_to_none)
        if not set_to_none:
            self._mark_grads_left()

    # Host bookkeeping of weak references and version counters, which torch.compile cannot
    # trace: run as they are under a compiled step(closure) (a graph break, no frame of
    # their own compiled per parameter). torch._disable_dynamo is torch.compiler.disable
    # that imports dynamo at the first call, not when this module is imported (as
    # torch.optim.Optimizer.zero_grad uses it).
    @torch._disable_dynamo
    def _mark_grads_left(self) -> None:
        """Remember the gradients now present as left by this step (no g1)."""
        self._grads_left = _GradMarks(self.param_groups)

    @torch._disable_dynamo
    def _new_gradients(self) -> bool:
        """Whether some parameter has a gradient that a backward wrote (or accumulated
        into) after the last ``step(closure)``, i.e. a g1 computed by the caller."""
        marks = self._grads_left
        return any(p.grad is not None and (marks is None or not marks.left(p))
                   for g in self.param_groups for p in g["params"])

    # ----------------------------------------------------------------- checkpoints
    def _torch_state_dict(self) -> dict:
        """The base optimizer's state_dict (its per-parameter state, e.g. SGD's
        'momentum_buffer', and the param_groups with rho/adaptive/normalize)."""
        return self.base_optimizer.state_dict()

    def _torch_load_state_dict(self, sd: dict) -> None:
        self.base_optimizer.load_state_dict(sd)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state


class _GradMarks:
    """The gradients a step left behind (a weak reference and the version counter of each
    ``p.grad``): one that is still there, unmodified, was written by no later backward.
    Holds no tensor alive; a copy or pickle of the optimizer starts without marks."""

    def __init__(self, param_groups) -> None:
        self._marks = {id(p): (weakref.ref(p.grad), p.grad._version)
                       for g in param_groups for p in g["params"] if p.grad is not None}

    def left(self, p: torch.Tensor) -> bool:
        mark = self._marks.get(id(p))
        return mark is not None and mark[0]() is p.grad and p.grad._version == mark[1]

    def __reduce__(self):
        return _GradMarks, ([],)


# Kept importable from here (the families now live in their own modules).

__all__ = ["SAM"]
