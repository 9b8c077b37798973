r"""SGLD, fSGLD and RWP: one-gradient optimizers over flat parameter buckets.

One class family (ALGORITHMS.md §2). Per step k, for every bucket:

.. math::

    \sigma &= \beta^{-(1+\eta)/4} \quad (\text{fSGLD; } 0 \text{ for SGLD; given for RWP}) \\
    \text{perturb:}\; \theta &\leftarrow \theta + \sigma\,\varepsilon_k
        \qquad\text{(then the closure computes } g \text{ at the perturbed point)} \\
    \text{update:}\; \theta &\leftarrow \theta - \sigma\,\varepsilon_k
        \qquad\text{(restore; } \varepsilon_k \text{ regenerated, never stored)} \\
    d &\leftarrow g + \lambda\,\theta, \quad
    m \leftarrow \mu m + (1-\tau) d,\; d \leftarrow m \;(\text{or } d + \mu m) \\
    \theta &\leftarrow \theta - \mathrm{lr}\,d + \sqrt{2\,\mathrm{lr}/\beta}\;\xi_k

with :math:`(\varepsilon_k, \xi_k)` the Gaussian pair of the noise stream (fused_flat.noise).
The restore and the update are one pass over memory; nothing of parameter size is
allocated beyond what ``torch.optim.SGD`` with the same momentum allocates (the momentum
buffer), except with ``exact_restore=True`` (one backup copy).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from fused_flat import backends
from fused_flat.optim.buckets import flat, local_copy_
from fused_flat.optim.core import (LOW_PRECISION, FlatOptimizer, default_seed, number,
                             refuse_dcp_state_init)

# Kept for code that imported them from here.
_number = number
__all__ = ["LangevinOptimizer", "SGLD", "FSGLD", "RWP", "default_seed"]

class LangevinOptimizer(FlatOptimizer):
    r"""The SGLD / fSGLD / RWP family over tensor-list buckets (use the subclasses).

    Args:
        params: iterable of parameters or of param-group dicts (per-group hyperparameters).
        lr (float): learning rate (>= 0); the Langevin noise follows the *current* lr, so LR
            schedulers work as with torch.optim.SGD.
        beta (float): inverse temperature (> 0; ``math.inf`` for no Langevin noise).
        eta (float): coupling exponent (> 0), sigma = beta ** (-(1 + eta) / 4).
        sigma (float | None): perturbation scale; None couples it to beta and eta (fSGLD),
            a number decouples it (the paper's sec. 4.4 ablation; RWP).
        momentum, dampening, weight_decay, nesterov, maximize: as torch.optim.SGD; the
            momentum lives in ``state[p]["momentum_buffer"]`` exactly as SGD keeps it.
        n_perturbations (int): closures per step at theta + sigma * eps^(t), t < n; the update
            uses the mean of the n gradients, whatever the closure zeroes. Before closure
            t >= 1 the gradients are set aside (one gradient-sized buffer per parameter, the
            only extra memory of this mode) and zeroed in place; after the step ``p.grad``
            holds the sum of the n gradients.
        exact_restore (bool | None): keep a backup copy (parameter-sized, in the parameter's
            dtype) and restore bit-exactly instead of regenerating eps (which restores to
            within 1 ulp in fp32 but drifts in 16 bits). None (default): True for bf16/fp16
            parameters (a 2-byte backup), False for fp32/fp64.
        stochastic_rounding (bool | None): round the update written into bf16/fp16
            parameters stochastically, with 16 bits of the noise stream (ALGORITHMS.md §1),
            so updates smaller than half an ulp survive in the mean. None (default): on for
            16-bit parameters. It fixes stalling, not the sampling temperature: the rounding
            noise, of order sqrt(ulp * |update|), is far above the Langevin noise at large beta.
        master_weights (bool): keep an fp32 master copy of every bf16/fp16 parameter in
            ``state[p]["master_weight"]``: the perturbation writes round(master + sigma eps)
            into the 16-bit weight, the update runs on the master (fp32 momentum too) and
            writes round(master) back, so perturbation, restore and Langevin noise are exact:
            the mode for sampling at the intended temperature. 4 bytes per 16-bit parameter
            (+4 with momentum), saved in ``state_dict``.
        seed (int | None): noise seed in [0, 2^63); default: drawn from torch's default
            generator. Under torch.distributed, rank 0's seed is used on every rank.
        process_group: which ranks share the seed, broadcast once at construction. None
            (default): the default group when torch.distributed is initialized (every rank
            must then build this optimizer, in the same order); a ProcessGroup: only its
            ranks take part and they use the seed of its first rank
            (``dist.get_global_rank(group, 0)``), e.g. the data-parallel group of one
            pipeline stage; False: no collective, the caller guarantees replicas use one
            seed (pass ``seed=``). Not kept (nor pickled) after construction.
        backend (str): 'auto', 'cpp', 'reference' (and 'triton', 'cuda' where built).
        check_finite (bool): skip the update, restoring the parameters, when any gradient
            the update uses is inf/NaN. ``last_step_skipped`` reports it.
        capturable (bool): keep the step counter on the parameters' device and let the
            kernels read it there, and a tensor ``lr`` (on that device) too, so that a whole
            training step can be captured in a CUDA graph and replayed (no host sync, no
            per-step value baked into the graph). A float ``lr`` is a constant of the
            captured graph; give ``lr=torch.tensor(lr, device=...)`` to schedule it (the
            scheduler updates it in place). Needs the 'triton' or 'cuda' kernels on CUDA
            ('auto' picks them); not with ``master_weights=True`` on CUDA yet. On CPU the
            same code path runs (nothing to capture).

    torch.optim semantics: a parameter is updated iff ``p.grad is not None`` at ``step()``
    (whoever wrote it: autograd, DDP, user code); it is perturbed iff it ``requires_grad``
    when the perturbation is made, and the restore undoes exactly that. Parameters,
    gradients and state stay the user's own tensors: a bucket is an index space over them
    (fused_flat.optim.buckets); the noise index of an element follows its parameter's memory
    order (a channels_last weight is perturbed in channels_last order).

    The two-call form, for code that cannot pass a closure::

        opt.perturb()                 # theta + sigma * eps
        loss_fn(model(x), y).backward()
        opt.step()                    # restore + update

    Counters: the noise of step k depends on (seed, bucket, k); k counts step() calls,
    skipped ones included, and is saved in ``state_dict`` with the seed, so a resumed run
    continues bit-identically.

    torch.compile (CPU, backends 'cpp' and 'reference'): ``torch.compile(opt.step)``
    compiles once for every step counter and learning rate when ``lr`` is a CPU tensor
    (``lr=torch.tensor(0.1)``; an LR scheduler then updates it in place): the counter (a
    0-dim int64 tensor) and the lr are graph inputs, not guards, and the state the first step creates (momentum buffers,
    backups) is made before that step is traced (``_init_group``, as for torch.optim.Adam),
    so no later step recompiles. A float ``lr`` compiles as torch.optim.SGD's does: its
    first value is a constant of the graph, the scheduler's first change recompiles once
    with the lr as a graph input (``param_groups`` keeps the float). Compile ``opt.step``
    before creating the scheduler (its wrapper of ``opt.step`` is in a file dynamo skips)
    and call ``zero_grad`` outside the compiled function; the two-call form (``perturb()``
    eager, compiled ``step()``) and SAM's ``first_step`` / ``second_step`` then trace with
    ``fullgraph=True``; a closure's ``backward()`` splits the graph. Under compile a
    non-finite gradient still skips the update (on the device, as on CUDA), but
    ``skipped_steps`` is not counted and no warning is given; the momentum buffers (with
    dampening 0) are made as zeros before the first step, so a skipped first step leaves
    a zero buffer where torch.optim.SGD has none yet (the next momentum is the same).

    Skipped steps: a step whose gradients are not finite (``check_finite``, or a
    ``torch.amp.GradScaler``'s ``found_inf``) restores the weights and updates nothing: the
    momentum is untouched and, on the first steps, no momentum buffer is created, as when
    torch.optim.SGD's step is not taken. Where the verdict lives on the device (CUDA) it
    is read by the kernels, with no host sync; the host reads it once only on a step that
    would create momentum buffers with dampening != 0 (where the first momentum, m = d,
    depends on it). ``skipped_steps`` counts device-side skips on the device and adds them
    in when read or saved.

    ``copy.deepcopy(opt)``, ``pickle`` and ``torch.save(opt)`` keep the whole optimizer
    (seed, step counter, state, options), not only what torch.optim.Optimizer pickles; not
    while the weights are perturbed (between ``perturb()`` and ``step()``).
    """

    def __init__(self, params, lr: float = 1e-3, beta: float = 1e8, eta: float = 0.01,
                 sigma: float | None = None, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, maximize: bool = False, *,
                 n_perturbations: int = 1, exact_restore: bool | None = None,
                 stochastic_rounding: bool | None = None, master_weights: bool = False,
                 seed: int | None = None, backend: str = "auto", check_finite: bool = True,
                 capturable: bool = False, process_group=None):
        name = type(self).__name__
        defaults = dict(lr=lr, beta=beta, eta=eta, sigma=sigma, momentum=momentum,
                        dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        maximize=maximize)
        self._validate_group(dict(defaults))   # before params, as torch.optim.SGD
        if isinstance(n_perturbations, bool) or not isinstance(n_perturbations, int) or n_perturbations < 1:
            raise ValueError(f"{name}: n_perturbations must be an integer >= 1, got {n_perturbations!r}")
        backends.check_name(backend)
        self.n_perturbations = n_perturbations
        if exact_restore is not None and not isinstance(exact_restore, bool):
            raise ValueError(f"{name}: exact_restore must be True, False or None, got {exact_restore!r}")
        self.exact_restore = exact_restore
        self._init_low_precision(stochastic_rounding, master_weights)
        self._perturbed = None   # (tag, [(indices, sigma) or None per bucket]) while perturbed
        self._backups: dict = {}
        super().__init__(params, defaults)
        self._init_core(seed=seed, backend=backend, check_finite=check_finite,
                        capturable=capturable, process_group=process_group)

    def _validate_group(self, g: dict) -> None:
        """Check (and normalize) a param group's hyperparameters; also run on the defaults
        before the parameters are looked at. torch.optim.SGD's checks come first, in its
        order and with its exceptions and messages; then this family's own."""
        name = type(self).__name__
        lr = g["lr"]
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        # a tensor lr on a device (capturable=True) is checked without a host read
        on_device = isinstance(lr, torch.Tensor) and lr.device.type != "cpu"
        if on_device and not lr.is_floating_point():
            raise ValueError(f"{name}: a tensor lr must be a floating-point tensor, got {lr.dtype}")
        given = dict(g)   # torch's messages show the values as given
        for key in (() if on_device else ("lr",)) + ("momentum", "weight_decay", "dampening",
                                                      "beta", "eta"):
            g[key] = number(key, g[key], name)
        if not on_device and g["lr"] < 0:
            raise ValueError(f"Invalid learning rate: {given['lr']}")
        if g["momentum"] < 0:
            raise ValueError(f"Invalid momentum value: {given['momentum']}")
        if g["weight_decay"] < 0:
            raise ValueError(f"Invalid weight_decay value: {given['weight_decay']}")
        if g["nesterov"] and (g["momentum"] <= 0 or g["dampening"] != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        if isinstance(lr, torch.Tensor):   # kept: schedulers update it in place (torch.compile,
            g["lr"] = lr                   # capturable=True)
        if not g["beta"] > 0:
            raise ValueError(f"{name}: invalid beta={g['beta']} (inverse temperature, must be > 0; "
                             f"math.inf disables the Langevin noise)")
        if not g["eta"] > 0:
            raise ValueError(f"{name}: invalid eta={g['eta']} (must be > 0)")
        if g["sigma"] is not None:
            g["sigma"] = number("sigma", g["sigma"], name)
            if not 0 <= g["sigma"] < math.inf:
                raise ValueError(f"{name}: invalid sigma={g['sigma']} (must be finite and >= 0)")
        if not g["momentum"] < 1:
            raise ValueError(f"{name}: invalid momentum={g['momentum']} (must be in [0, 1))")
        if not 0 <= g["dampening"] <= 1:
            raise ValueError(f"{name}: invalid dampening={g['dampening']} (must be in [0, 1])")

    # ----------------------------------------------------------------- hyperparameters
    @staticmethod
    def group_sigma(g: dict) -> float:
        """The perturbation scale of a group: g['sigma'], or beta ** (-(1 + eta) / 4)."""
        if g["sigma"] is not None:
            return g["sigma"]
        return 0.0 if math.isinf(g["beta"]) else g["beta"] ** (-(1.0 + g["eta"]) / 4.0)

    @staticmethod
    def group_noise_std(g: dict) -> float:
        """sqrt(2 lr / beta), the Langevin noise scale at the group's current lr."""
        return 0.0 if math.isinf(g["beta"]) else math.sqrt(2.0 * float(g["lr"]) / g["beta"])

    def _sigma(self, bucket) -> float:
        return self.group_sigma(self._groups[bucket.group_index])   # compiled: no guard on the lr

    def _is_perturbed(self) -> bool:
        return self._perturbed is not None

    # ----------------------------------------------------------------- perturbation
    @torch.no_grad()
    def perturb(self) -> None:
        """Move the weights to theta + sigma * eps_k (the first half of the two-call form)."""
        if self._perturbed is not None:
            raise RuntimeError(f"{type(self).__name__}.perturb(): the weights are already "
                               f"perturbed; call step() (or restore()) first")
        if self.n_perturbations > 1:
            raise RuntimeError(f"{type(self).__name__}: n_perturbations > 1 needs step(closure)")
        self._move(0)

    def _restore_mode(self, b) -> str:
        """How a bucket's perturbation is undone: from the fp32 masters, from a backup copy,
        or by regenerating eps."""
        if self._masters(b):
            return "master"
        exact = self.exact_restore
        if exact is None:
            exact = b.dtype in LOW_PRECISION
        return "backup" if exact else "regen"

    @torch.no_grad()
    def restore(self) -> None:
        """Undo the active perturbation without updating (no-op when none is active)."""
        if self._perturbed is None:
            return
        tag, made = self._perturbed
        for bi, entry in enumerate(made):
            if entry is not None:
                self._restore_bucket(bi, entry, tag)
        self._perturbed = None

    def _restore_bucket(self, bi: int, entry, tag: int) -> None:
        idx, sigma, mode = entry
        b = self._buckets[bi]
        plans = self._plans
        if plans is not None and plans.ok and plans[bi].pert is not None \
                and plans[bi].pert.idx is idx and not torch.compiler.is_compiling():   # the plan's
            P = plans[bi]
            if mode == "backup":
                torch._foreach_copy_(P.pert.params, P.backups)
            else:
                P.backend.perturb_(P.pert.params, P.pert.offsets, self.seed, b.bucket_id, self._k,
                                   tag, -sigma, layout=P.pert.layout)
            return
        params = [b.params[j] for j in idx]
        if mode == "master":
            for p in params:
                p.copy_(self.state[p]["master_weight"])
        elif mode == "backup":
            local_copy_(params, [self._backups[p] for p in params])
        else:
            self._backends[bi].perturb_([flat(p) for p in params], [b.index(j) for j in idx],
                                        self.seed, b.bucket_id,
                                        self._step_arg(self._backends[bi]), tag, -sigma)

    def _move(self, tag: int) -> None:
        """Restore the active perturbation (if any), then perturb with eps of ``tag`` every
        parameter that requires grad now."""
        if torch.compiler.is_compiling() and any(self._restore_mode(b) == "backup"
                                                 for b in self._buckets):
            self._compile_init("perturb")   # the backups, made before the trace
        self.restore()
        # (compiled: the general path, traced in this frame)
        if torch.compiler.is_compiling() or not self._move_planned(tag):
            self._move_general(tag)
            self._drop_plans()

    def _init_family(self, part: str) -> None:
        """Compiled perturbation ('perturb'): the backups of the buckets restored from one
        (FlatOptimizer._init_group). A compiled step(closure) then compiles its perturbation
        once more at the second step (dynamo's _init_group guards on which parameters have a
        gradient, none before the first closure); the two-call form perturbs eagerly."""
        if part != "perturb":
            return
        for b in self.buckets():
            if self._sigma(b) != 0.0 and self._restore_mode(b) == "backup":
                for p in b.params:
                    if p.requires_grad and p.numel() > 0:
                        self._backup_of(p)

    def _plan_family(self, P) -> None:
        """The perturbation's lists: the parameters that require grad (and are not empty),
        their offsets and record, the restore mode and (mode 'backup') their backups."""
        b = P.bucket
        P.pert = self._plan_part(P, None, [j for j, p in enumerate(b.params)
                                           if p.requires_grad and p.numel() > 0], moms=False)
        P.mode = self._restore_mode(b)
        P.backups = ([self._backup_of(p) for p in P.pert.params]
                     if P.mode == "backup" and P.pert is not None else None)

    def _plan_grads_family(self, P, U) -> None:
        """A bucket restored by regenerating eps: the parameters perturbed with a gradient
        (restored in the update pass), those with a gradient not perturbed, those perturbed
        without one (restored only), as _update_general splits them."""
        if P.mode != "regen" or P.pert is None:
            U.both = U.only_grad = U.only_pert = None
            return
        pert, grad = set(P.pert.idx), set(U.idx)
        if pert == grad:
            U.both, U.only_grad, U.only_pert = U.upd, None, None
            return
        U.both = self._plan_part(P, U, [j for j in U.idx if j in pert], moms=True)
        U.only_grad = self._plan_part(P, U, [j for j in U.idx if j not in pert], moms=True)
        U.only_pert = self._plan_part(P, U, [j for j in P.pert.idx if j not in grad], moms=False)

    def _move_planned(self, tag: int) -> bool:
        """_move_general's perturbation through the step plans; False: not taken (nothing
        written)."""
        plans = self._step_plans()
        if plans is None:
            return False
        own = self._checks_itself(plans, plans[0].pert) and plans[0].mode == "regen"
        if not own and self._planned_check(plans, [[]] * len(plans), False) is None:
            return False
        k, seed = self._k, self.seed
        made = []
        for P in plans:
            sigma = self._sigma(P.bucket)
            if sigma == 0.0 or P.pert is None:
                made.append(None)
                continue
            if P.mode == "backup":
                torch._foreach_copy_(P.backups, P.pert.params)
            try:
                P.backend.perturb_(P.pert.params, P.pert.offsets, seed, P.bucket.bucket_id, k, tag,
                                   sigma, layout=P.pert.layout)
            except Exception:
                if own:   # the first pass: nothing written
                    return False
                raise
            made.append((P.pert.idx, sigma, P.mode))
        self._perturbed = (tag, made)
        return True

    def _move_general(self, tag: int) -> None:
        made = []
        for bi, b in enumerate(self.buckets()):
            sigma = self._sigma(b)
            idx = [j for j, p in enumerate(b.params) if p.requires_grad and p.numel() > 0]
            if sigma == 0.0 or not idx:
                made.append(None)
                continue
            params = [b.params[j] for j in idx]
            mode = self._restore_mode(b)
            offsets = [b.index(j) for j in idx]
            if mode == "master":
                self._backends[bi].perturb_from_([flat(p) for p in params],
                                                 [flat(self._master(p)) for p in params], offsets,
                                                 self.seed, b.bucket_id,
                                                 self._step_arg(self._backends[bi]), tag, sigma)
            else:
                if mode == "backup":
                    local_copy_([self._backup_of(p) for p in params], params)
                self._backends[bi].perturb_([flat(p) for p in params], offsets, self.seed,
                                            b.bucket_id, self._step_arg(self._backends[bi]), tag,
                                            sigma)
            made.append((idx, sigma, mode))
        self._perturbed = (tag, made)

    def _needs_perturbation(self) -> bool:
        """Whether some bucket has sigma != 0 (every group with parameters has a bucket)."""
        return any(self.group_sigma(g) != 0.0 for g in self._groups if g["params"])

    # ----------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """One step. With a closure: perturb, call it (n_perturbations times), restore and
        update. Without: restore the perturbation made by ``perturb()`` and update.

        Returns the closure's loss (the mean over perturbations when n_perturbations > 1).
        An exception in the closure restores the weights before it propagates.
        """
        if closure is None:
            refuse_dcp_state_init(type(self).__name__)
            if self._perturbed is None and self._needs_perturbation():
                raise RuntimeError(
                    f"{type(self).__name__}.step() needs a closure (step(closure)), or call "
                    f"perturb() before the forward/backward pass and step() after it")
            self._update(1.0)
            return None
        if self._perturbed is not None:
            raise RuntimeError(f"{type(self).__name__}.step(closure) called after perturb(); "
                               f"call step() without a closure to finish the two-call form")
        n = self.n_perturbations
        losses = []
        needs = self._needs_perturbation()
        params = [p for g in self._groups for p in g["params"]]   # (FlatOptimizer._groups)
        set_aside: dict = {}
        try:
            for t in range(n):
                if t > 0:
                    _set_aside(params, set_aside)
                if needs:
                    self._move(t)
                with torch.enable_grad():
                    losses.append(closure())
            for p, acc in set_aside.items():
                if p.grad is None:
                    p.grad = acc
                else:
                    p.grad.add_(acc)
            self._update(1.0 / n)
        except BaseException:
            self.restore()
            raise
        return losses[0] if n == 1 else sum(losses) / n

    def _checked_restore_applies(self, buckets, made) -> bool:
        """Whether this step's restore and finiteness check can run as one pass per bucket
        (``Backend.restore_check_``): the eager C++ path for fp32 buckets restored by
        regeneration, with the check on and no GradScaler, sharding or device counter."""
        if (not self.check_finite or self._scaler_decides()
                or self._shard_keys or self._k_dev is not None
                or torch.compiler.is_compiling()):
            return False
        for bi, b in enumerate(buckets):
            if self._backends[bi].restore_check_ is None or b.dtype != torch.float32 \
                    or self._masters(b):
                return False
            entry = made[bi]
            if entry is not None and (entry[2] != "regen" or entry[1] == 0.0):
                return False
        return True

    def _restore_and_check(self, buckets, made, with_grad, flat_grads, tag) -> torch.Tensor:
        """Undo the perturbation of every bucket and compute found_inf over every gradient
        the update uses, in one pass per bucket where a parameter is both perturbed and has a
        gradient; ``made`` is cleared (the update pass then restores nothing)."""
        found = torch.zeros(1)
        k = self._k
        for bi, b in enumerate(buckets):
            backend = self._backends[bi]
            idx = with_grad[bi]
            gpos = {j: q for q, j in enumerate(idx)}
            entry = made[bi]
            pert, sigma = (entry[0], entry[1]) if entry is not None else ([], 0.0)
            pset = set(pert)
            both = [j for j in idx if j in pset and flat_grads[bi][gpos[j]].numel()]
            checked = set(both)
            if both:
                f = backend.restore_check_([flat(b.params[j]) for j in both],
                                           [flat_grads[bi][gpos[j]] for j in both],
                                           [b.index(j) for j in both], self.seed, b.bucket_id,
                                           k, tag, -sigma)
                found = torch.maximum(found, f)
            rest = [j for j in pert if j not in checked]   # perturbed, no gradient
            if rest:
                backend.perturb_([flat(b.params[j]) for j in rest], [b.index(j) for j in rest],
                                 self.seed, b.bucket_id, k, tag, -sigma)
            unchecked = [flat_grads[bi][gpos[j]] for j in idx
                         if j not in checked and flat_grads[bi][gpos[j]].numel()]
            if unchecked:
                found = torch.maximum(found, backend.all_finite(unchecked))
            made[bi] = None
        return found

    def _update(self, grad_mult: float) -> None:
        self._compile_init("update")   # compiled: the momentum buffers, made before the trace
        if torch.compiler.is_compiling() or not self._update_planned(grad_mult):
            self._update_general(grad_mult)
            self._drop_plans()

    def _update_planned(self, grad_mult: float) -> bool:
        """_update_general through the step plans, with its bits; False: not taken (nothing
        written; the general path then runs). The passes per bucket: the check
        (Backend.check_step: the plan and the gradients, found_inf when no restore pass
        computes it), the restore from a backup or the checked restore (restore_check_) where
        _update_general makes them, the update."""
        tag, made = self._perturbed if self._perturbed is not None else (0, None)
        plans = self._step_plans(build=made is None)
        if plans is None:
            return False
        if made is not None and any(e is not None and (P.pert is None or e[0] is not P.pert.idx)
                                    for P, e in zip(plans, made)):
            return False   # perturbed by the general path
        grads = self._planned_grads(plans)
        if grads is None:
            return False
        entries = made if made is not None else [None] * len(plans)
        use_rc = made is not None and self._checked_restore_applies(self._buckets, made)
        finite = self.check_finite and not self._scaler_decides()
        # found_inf in the first pass, except where the checked restore computes it (for the
        # gradients of parameters that were not perturbed, the first pass still does); a
        # checked restore over every parameter of the only bucket is itself the first pass
        own = use_rc and entries[0] is not None and self._checks_itself(plans, plans[0].grads.both)
        checks = [None] if own else self._planned_check(plans, grads, [
            finite and not (use_rc and e is not None and P.grads.only_grad is None)
            for P, e in zip(plans, entries)])
        if checks is None:
            return False
        k, seed = self._k, self.seed
        if use_rc:   # as _restore_and_check: the restore with the check, one pass per bucket
            found = torch.zeros(1)
            for P, gl, e, f in zip(plans, grads, entries, checks):
                U, bid = P.grads, P.bucket.bucket_id
                if e is not None:
                    if U.both is not None:
                        try:
                            f_both = P.backend.restore_check_(
                                U.both.params, U.both.grads(gl), U.both.offsets, seed, bid, k, tag,
                                -e[1], U.both.layout)
                        except Exception:
                            if own:   # the first pass: nothing written
                                return False
                            raise
                        found = torch.maximum(found, f_both)
                    if U.only_pert is not None:
                        P.backend.perturb_(U.only_pert.params, U.only_pert.offsets, seed, bid, k,
                                           tag, -e[1], layout=U.only_pert.layout)
                    if U.only_grad is not None:
                        found = torch.maximum(found, f)
                elif U.nonempty:
                    found = torch.maximum(found, f)
            entries = [None] * len(plans)
        else:
            found = self._planned_found(plans, checks)
        known_skip = self._known_skip(found)
        groups = self.param_groups
        for P, gl, e in zip(plans, grads, entries):
            b, U = P.bucket, P.grads
            if e is not None and e[2] == "backup":   # exact restore, then an update without one
                torch._foreach_copy_(P.pert.params, P.backups)
                e = None
            g = groups[b.group_index]
            sigma = e[1] if e is not None else 0.0
            parts = ((U.upd, 0.0),) if e is None else ((U.both, sigma), (U.only_grad, 0.0))
            for part, sigma_r in parts:
                if part is None:
                    continue
                P.backend.restore_and_step_(
                    part.params, part.grads(gl), part.moms if g["momentum"] != 0 else None,
                    part.offsets, self._grad_scale(b.device), found, seed, b.bucket_id, k, tag,
                    sigma_r, self._lr_arg(g, P.backend), g["weight_decay"], g["momentum"],
                    g["dampening"], g["nesterov"], False, self.group_noise_std(g),
                    -grad_mult if g["maximize"] else grad_mult, P.sr, layout=part.layout)
            if e is not None and U.only_pert is not None:   # perturbed, no gradient: restored
                P.backend.perturb_(U.only_pert.params, U.only_pert.offsets, seed, b.bucket_id, k,
                                   tag, -sigma, layout=U.only_pert.layout)
        self._perturbed = None
        self._finish_step(found, known_skip)
        return True

    def _update_general(self, grad_mult: float) -> None:
        tag, made = self._perturbed if self._perturbed is not None else (0, None)
        buckets = self._buckets if made is not None else self.buckets()
        try:
            with_grad = [self._grads(b) for b in buckets]
        except Exception:
            self.restore()
            raise
        if made is not None:   # buckets restored from a copy: now, exactly; the update pass
            for bi, entry in enumerate(made):   # then restores nothing
                if entry is not None and entry[2] != "regen":
                    self._restore_bucket(bi, entry, tag)
                    made[bi] = None
        flat_grads = [[self._flat_grad(b.params[j]) for j in idx] for b, idx in zip(buckets, with_grad)]
        if made is not None and self._checked_restore_applies(buckets, made):
            # restore and finiteness check in one pass (the gradient read overlaps the noise
            # generation); the update below then restores nothing: same bits as the fused pass
            found_inf = self._restore_and_check(buckets, made, with_grad, flat_grads, tag)
        else:
            found_inf = self._found_inf(flat_grads)
        known_skip = self._known_skip(found_inf)
        for bi, b in enumerate(buckets):
            g = self.param_groups[b.group_index]
            backend = self._backends[bi]
            idx = with_grad[bi]
            pert, sigma_r = (set(made[bi][0]), made[bi][1]) if made is not None and made[bi] else (set(), 0.0)
            fi = found_inf.to(b.device) if found_inf is not None else None
            gs = self._grad_scale(b.device)
            mult = -grad_mult if g["maximize"] else grad_mult
            gpos = {j: k for k, j in enumerate(idx)}
            masters = self._masters(b)
            sr = self._sr(b, backend)
            grads = flat_grads[bi]
            k = self._step_arg(backend)
            lr = self._lr_arg(g, backend)
            if isinstance(lr, torch.Tensor):   # compiled or capturable, tensor lr: sqrt(2 lr / beta)
                noise_std = (0.0 if math.isinf(g["beta"])   # on its device (graph / kernel input)
                             else (2.0 * lr.to(torch.float64) / g["beta"]).sqrt())
            else:
                noise_std = self.group_noise_std(g)
            if masters:   # the update runs on the fp32 masters (fp32 gradients, transient)
                grads = [t.float() for t in grads]
            for js, moms, init in self._momentum_lists(b, idx, g, create=not known_skip):
                for restoring in (True, False):
                    sel = [k for k, j in enumerate(js) if (j in pert) == restoring]
                    if not sel:
                        continue
                    sub = [js[k] for k in sel]
                    targets = [flat(self._master(b.params[j]) if masters else b.params[j]) for j in sub]
                    backend.restore_and_step_(
                        targets, [grads[gpos[j]] for j in sub],
                        [moms[k] for k in sel] if moms is not None else None,
                        [b.index(j) for j in sub], gs, fi, self.seed, b.bucket_id, k,
                        tag, sigma_r if restoring else 0.0, lr, g["weight_decay"],
                        g["momentum"], g["dampening"], g["nesterov"], init,
                        noise_std, mult, sr)
            if masters:
                for j in idx:
                    b.params[j].copy_(self.state[b.params[j]]["master_weight"])
            no_grad = sorted(pert - set(idx))
            if no_grad:
                backend.perturb_([flat(b.params[j]) for j in no_grad], [b.index(j) for j in no_grad],
                                 self.seed, b.bucket_id, k, tag, -sigma_r)
        self._perturbed = None
        self._finish_step(found_inf, known_skip)


def _set_aside(params, acc: dict) -> None:
    """n_perturbations: add the last closure's gradients to ``acc`` and zero them in place,
    so the next closure's backward yields its own gradient whatever the closure zeroes."""
    for p in params:
        if p.grad is None:
            continue
        if p in acc:
            acc[p].add_(p.grad)
        else:
            acc[p] = p.grad.clone()
        p.grad.zero_()


class SGLD(LangevinOptimizer):
    r"""Stochastic gradient Langevin dynamics: :math:`\theta \leftarrow \theta - \mathrm{lr}\,d +
    \sqrt{2\,\mathrm{lr}/\beta}\,\xi_k` with d the SGD direction (momentum, weight decay as
    torch.optim.SGD). No perturbation (sigma = 0). See LangevinOptimizer for the arguments."""

    def __init__(self, params, lr: float = 1e-3, beta: float = 1e8, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
                 maximize: bool = False, **kwargs):
        super().__init__(params, lr=lr, beta=beta, sigma=0.0, momentum=momentum,
                         dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                         maximize=maximize, **kwargs)


class FSGLD(LangevinOptimizer):
    r"""Flatness-aware SGLD (arXiv 2510.02174, eq. 4-5): the gradient is taken at
    :math:`\theta + \sigma\varepsilon_k`, :math:`\sigma = \beta^{-(1+\eta)/4}`, then the SGLD
    update. Defaults: beta = 1e8, eta = 0.01, momentum 0, weight decay 0 (the paper's code
    uses weight_decay=5e-4 and lr=0.1). ``sigma=`` decouples the scale (sec. 4.4 ablation).
    See LangevinOptimizer for the arguments and the two-call form."""

    def __init__(self, params, lr: float = 1e-3, beta: float = 1e8, eta: float = 0.01,
                 sigma: float | None = None, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, maximize: bool = False,
                 **kwargs):
        super().__init__(params, lr=lr, beta=beta, eta=eta, sigma=sigma, momentum=momentum,
                         dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                         maximize=maximize, **kwargs)


class RWP(LangevinOptimizer):
    r"""Random weight perturbation: the gradient at :math:`\theta + \sigma\varepsilon_k`, then a
    plain SGD update (no Langevin noise, beta = inf). See LangevinOptimizer for the arguments."""

    def __init__(self, params, lr: float = 1e-3, sigma: float = 0.01, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
                 maximize: bool = False, **kwargs):
        super().__init__(params, lr=lr, beta=math.inf, sigma=sigma, momentum=momentum,
                         dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                         maximize=maximize, **kwargs)
