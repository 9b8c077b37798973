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
import warnings
from typing import Callable, Iterable

import torch
from torch.optim import Optimizer

from fused_flat import backends
from fused_flat.buckets import build_buckets
from fused_flat.noise import TAG_PAIR

_STATE_FORMAT = 1


def _number(name: str, value, cls_name: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{cls_name}: {name} must be a number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{cls_name}: {name} must be a number, got {value!r}")
    if math.isnan(value):
        raise ValueError(f"{cls_name}: {name} must not be NaN")
    return float(value)


def default_seed() -> int:
    """A seed in [0, 2^63) drawn from torch's default generator (torch.manual_seed governs it)."""
    return int(torch.empty((), dtype=torch.int64).random_().item())


class LangevinOptimizer(Optimizer):
    r"""The SGLD / fSGLD / RWP family on flat buckets (use the subclasses).

    Args:
        params: iterable of parameters or of param-group dicts (per-group hyperparameters).
        lr (float): learning rate (>= 0); the Langevin noise follows the *current* lr, so LR
            schedulers work as with torch.optim.SGD.
        beta (float): inverse temperature (> 0; ``math.inf`` for no Langevin noise).
        eta (float): coupling exponent (> 0), sigma = beta ** (-(1 + eta) / 4).
        sigma (float | None): perturbation scale; None couples it to beta and eta (fSGLD),
            a number decouples it (the paper's sec. 4.4 ablation; RWP).
        momentum, dampening, weight_decay, nesterov, maximize: as torch.optim.SGD.
        n_perturbations (int): closures per step at theta + sigma * eps^(t), t < n; gradients
            are averaged. The closure must not zero gradients after the first call (an
            ``optimizer.zero_grad()`` inside the closure is ignored for t >= 1).
        exact_restore (bool): keep a backup copy (parameter-sized) and restore bit-exactly
            instead of regenerating eps (which restores to within 1 ulp).
        seed (int | None): noise seed in [0, 2^63); default: drawn from torch's default
            generator. Under torch.distributed, rank 0's seed is broadcast to all ranks.
        backend (str): 'auto', 'cpp', 'reference' (and 'triton', 'cuda' where built).
        check_finite (bool): skip the update, restoring the parameters, when any gradient
            is inf/NaN (one extra read of the gradients). ``last_step_skipped`` reports it.

    The two-call form, for code that cannot pass a closure::

        opt.perturb()                 # theta + sigma * eps
        loss_fn(model(x), y).backward()
        opt.step()                    # restore + update

    Counters: the noise of step k depends on (seed, bucket, k); k counts step() calls,
    skipped ones included, and is saved in ``state_dict`` with the seed and the momentum,
    so a resumed run continues bit-identically.
    """

    _step_supports_amp_scaling = True  # torch.amp.GradScaler passes grad_scale / found_inf

    def __init__(self, params, lr: float = 1e-3, beta: float = 1e8, eta: float = 0.01,
                 sigma: float | None = None, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, maximize: bool = False, *,
                 n_perturbations: int = 1, exact_restore: bool = False, seed: int | None = None,
                 backend: str = "auto", check_finite: bool = True):
        name = type(self).__name__
        if isinstance(n_perturbations, bool) or not isinstance(n_perturbations, int) or n_perturbations < 1:
            raise ValueError(f"{name}: n_perturbations must be an integer >= 1, got {n_perturbations!r}")
        backends.check_name(backend)
        if seed is None:
            seed = default_seed()
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
            raise ValueError(f"{name}: seed must be an integer in [0, 2^63), got {seed!r}")
        defaults = dict(lr=lr, beta=beta, eta=eta, sigma=sigma, momentum=momentum,
                        dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        maximize=maximize)
        self.n_perturbations = n_perturbations
        self.exact_restore = bool(exact_restore)
        self.backend = backend
        self.check_finite = bool(check_finite)
        super().__init__(params, defaults)
        self.seed = self._broadcast_seed(seed)
        self._k = 0
        self._buckets = build_buckets(self.param_groups)
        self._init_bucket_state(0)
        self._perturbed: int | None = None   # tag of the active perturbation
        self._closure_call: int | None = None
        self._last_found_inf: torch.Tensor | None = None
        self.skipped_steps = 0

    # ----------------------------------------------------------------- setup
    def _init_bucket_state(self, start: int) -> None:
        if start == 0:
            self._backends, self._momentum, self._mom_ready, self._backup = [], [], [], []
        for b in self._buckets[start:]:
            self._backends.append(backends.resolve(self.backend, b.data))
            self._momentum.append(None)
            self._mom_ready.append([False] * len(b.params))
            self._backup.append(torch.empty_like(b.data) if self.exact_restore else None)

    def _validate_group(self, g: dict) -> None:
        name = type(self).__name__
        for key in ("lr", "beta", "eta", "momentum", "dampening", "weight_decay"):
            g[key] = _number(key, g[key], name)
        if g["lr"] < 0:
            raise ValueError(f"{name}: invalid lr={g['lr']} (must be >= 0)")
        if not g["beta"] > 0:
            raise ValueError(f"{name}: invalid beta={g['beta']} (inverse temperature, must be > 0; "
                             f"math.inf disables the Langevin noise)")
        if not g["eta"] > 0:
            raise ValueError(f"{name}: invalid eta={g['eta']} (must be > 0)")
        if g["sigma"] is not None:
            g["sigma"] = _number("sigma", g["sigma"], name)
            if not 0 <= g["sigma"] < math.inf:
                raise ValueError(f"{name}: invalid sigma={g['sigma']} (must be finite and >= 0)")
        if not 0 <= g["momentum"] < 1:
            raise ValueError(f"{name}: invalid momentum={g['momentum']} (must be in [0, 1))")
        if not 0 <= g["dampening"] <= 1:
            raise ValueError(f"{name}: invalid dampening={g['dampening']} (must be in [0, 1])")
        if g["weight_decay"] < 0:
            raise ValueError(f"{name}: invalid weight_decay={g['weight_decay']} (must be >= 0)")
        if g["nesterov"] and (g["momentum"] <= 0 or g["dampening"] != 0):
            raise ValueError(f"{name}: nesterov=True requires momentum > 0 and dampening = 0")

    def add_param_group(self, param_group: dict) -> None:
        for p in param_group["params"] if not isinstance(param_group["params"], torch.Tensor) else [param_group["params"]]:
            if isinstance(p, torch.Tensor) and p.is_sparse:
                raise ValueError(f"{type(self).__name__}: sparse parameters are not supported")
        super().add_param_group(param_group)
        self._validate_group(self.param_groups[-1])
        if hasattr(self, "_buckets"):
            start = len(self._buckets)
            self._buckets += build_buckets([self.param_groups[-1]], first_id=start,
                                           group_offset=len(self.param_groups) - 1)
            self._init_bucket_state(start)

    @staticmethod
    def _broadcast_seed(seed: int) -> int:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
            t = torch.tensor([seed], dtype=torch.int64, device=dev)
            dist.broadcast(t, src=0)
            seed = int(t.item())
        return seed

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
        return 0.0 if math.isinf(g["beta"]) else math.sqrt(2.0 * g["lr"] / g["beta"])

    def _sigma(self, bucket) -> float:
        return self.group_sigma(self.param_groups[bucket.group_index])

    # ----------------------------------------------------------------- perturbation
    @torch.no_grad()
    def perturb(self) -> None:
        """Move the weights to theta + sigma * eps_k (the first half of the two-call form)."""
        if self._perturbed is not None:
            raise RuntimeError(f"{type(self).__name__}.perturb(): the weights are already "
                               f"perturbed; call step() (or restore()) first")
        if self.n_perturbations > 1:
            raise RuntimeError(f"{type(self).__name__}: n_perturbations > 1 needs step(closure)")
        for b in self._buckets:
            b.sync()
        self._move(0)

    @torch.no_grad()
    def restore(self) -> None:
        """Undo the active perturbation without updating (no-op when none is active)."""
        if self._perturbed is None:
            return
        tag = self._perturbed
        for i, b in enumerate(self._buckets):
            sigma = self._sigma(b)
            if sigma == 0.0:
                continue
            if self.exact_restore:
                b.data.copy_(self._backup[i])
            else:
                self._backends[i].perturb_(b.data, self.seed, b.bucket_id, self._k, tag, -sigma, 0)
        self._perturbed = None

    def _move(self, tag: int) -> None:
        """Restore the active perturbation (if any), then perturb with eps of ``tag``."""
        self.restore()
        for i, b in enumerate(self._buckets):
            sigma = self._sigma(b)
            if sigma == 0.0:
                continue
            if self.exact_restore:
                self._backup[i].copy_(b.data)
            self._backends[i].perturb_(b.data, self.seed, b.bucket_id, self._k, tag, sigma, 0)
        self._perturbed = tag

    def _needs_perturbation(self) -> bool:
        return any(self._sigma(b) != 0.0 for b in self._buckets)

    # ----------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """One step. With a closure: perturb, call it (n_perturbations times), restore and
        update. Without: restore the perturbation made by ``perturb()`` and update.

        Returns the closure's loss (the mean over perturbations when n_perturbations > 1).
        An exception in the closure restores the weights before it propagates.
        """
        if closure is None:
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
        for b in self._buckets:
            b.sync()
        try:
            for t in range(n):
                self._closure_call = t
                self._move(t) if self._needs_perturbation() else None
                with torch.enable_grad():
                    losses.append(closure())
        except BaseException:
            self.restore()
            raise
        finally:
            self._closure_call = None
        self._update(1.0 / n)
        return losses[0] if n == 1 else sum(losses) / n

    def _found_inf(self) -> torch.Tensor | None:
        scaler_found = getattr(self, "found_inf", None)   # set by torch.amp.GradScaler.step
        if scaler_found is not None:
            return scaler_found.float()
        if not self.check_finite or not self._buckets:
            return None
        dev = self._buckets[0].device
        norms = [torch.linalg.vector_norm(b.grad, float("inf")).float().to(dev) for b in self._buckets]
        worst = norms[0] if len(norms) == 1 else torch.stack(norms).max()
        return (~torch.isfinite(worst)).float().reshape(1)

    def _update(self, grad_mult: float) -> None:
        restore_tag = self._perturbed
        if restore_tag is not None and self.exact_restore:
            self.restore()      # bit-exact from the backup; the update pass restores nothing
            restore_tag = None
        found_inf = self._found_inf()
        grad_scale = getattr(self, "grad_scale", None)
        known_skip = found_inf is not None and found_inf.device.type == "cpu" and bool(found_inf.item())
        for i, b in enumerate(self._buckets):
            has = b.sync()
            g = self.param_groups[b.group_index]
            backend = self._backends[i]
            sigma_r = self._sigma(b) if restore_tag is not None else 0.0
            mu = g["momentum"]
            if mu > 0 and self._momentum[i] is None:
                self._momentum[i] = torch.zeros_like(b.data)
            mom = self._momentum[i] if mu > 0 else None
            ready = self._mom_ready[i]
            fi = found_inf.to(b.device) if found_inf is not None else None
            gs = grad_scale.float().to(b.device).reshape(1) if grad_scale is not None else None
            mult = -grad_mult if g["maximize"] else grad_mult
            for start, stop, with_grad, init in _runs(has, ready, mom is not None):
                off = b.offsets[start]
                length = b.offsets[stop - 1] + b.numels[stop - 1] - off
                sl = slice(off, off + length)
                if with_grad:
                    backend.restore_and_step_(
                        b.data[sl], b.grad[sl], mom[sl] if mom is not None else None, gs, fi,
                        self.seed, b.bucket_id, self._k, off, restore_tag or 0, sigma_r,
                        g["lr"], g["weight_decay"], mu, g["dampening"], g["nesterov"], init,
                        self.group_noise_std(g), mult)
                elif sigma_r != 0.0:
                    backend.perturb_(b.data[sl], self.seed, b.bucket_id, self._k, restore_tag,
                                     -sigma_r, off)
            if mom is not None and not known_skip:
                for j, h in enumerate(has):
                    ready[j] = ready[j] or h
        self._perturbed = None
        self._k += 1
        self._last_found_inf = found_inf
        if known_skip:
            self.skipped_steps += 1
            warnings.warn(f"{type(self).__name__}: non-finite gradient at step {self._k - 1}; the "
                          f"update was skipped and the parameters restored", RuntimeWarning, stacklevel=3)

    @property
    def last_step_skipped(self) -> bool:
        """Whether the last step was skipped for a non-finite gradient (syncs on CUDA)."""
        return self._last_found_inf is not None and bool(self._last_found_inf.item())

    @property
    def step_count(self) -> int:
        """k, the number of step() calls so far (the noise stream's step index)."""
        return self._k

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the flat gradient buffers; ``.grad`` stays a view into them. With set_to_none
        (the default) a parameter that then receives no gradient before step() is skipped,
        as torch.optim skips ``grad is None``; with set_to_none=False it is updated with a
        zero gradient, as torch.optim does."""
        if self._closure_call:   # t >= 1 of n_perturbations: keep accumulating
            return
        for b in self._buckets:
            b.zero_grad(set_to_none)

    # ----------------------------------------------------------------- checkpoints
    def _publish_state(self) -> None:
        for i, b in enumerate(self._buckets):
            mom = self._momentum[i]
            for j, p in enumerate(b.params):
                if mom is not None and self._mom_ready[i][j]:
                    self.state[p]["momentum_buffer"] = b.slice(mom, j).view_as(p)
                else:
                    self.state[p].pop("momentum_buffer", None)
                    if not self.state[p]:
                        del self.state[p]

    def state_dict(self) -> dict:
        """torch.optim's format (per-parameter 'momentum_buffer', like SGD) plus a
        'fused_flat' entry with the seed and the step counter."""
        if self._perturbed is not None:
            raise RuntimeError(f"{type(self).__name__}.state_dict(): the weights are perturbed; "
                               f"call step() or restore() first")
        self._publish_state()
        sd = super().state_dict()
        sd["fused_flat"] = {"format": _STATE_FORMAT, "seed": self.seed, "step": self._k,
                            "skipped_steps": self.skipped_steps}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        name = type(self).__name__
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("fused_flat"), dict):
            raise ValueError(f"{name}.load_state_dict: not a fused_flat optimizer state_dict "
                             f"(no 'fused_flat' entry with the seed and step counter)")
        meta = state_dict["fused_flat"]
        if meta.get("format") != _STATE_FORMAT:
            raise ValueError(f"{name}.load_state_dict: unknown format {meta.get('format')!r} "
                             f"(this version reads format {_STATE_FORMAT})")
        seed, k = meta.get("seed"), meta.get("step")
        if not isinstance(seed, int) or not 0 <= seed < 2 ** 63 or not isinstance(k, int) or k < 0:
            raise ValueError(f"{name}.load_state_dict: corrupted 'fused_flat' entry "
                             f"(seed={seed!r}, step={k!r})")
        saved_groups = state_dict.get("param_groups")
        if not isinstance(saved_groups, list) or len(saved_groups) != len(self.param_groups):
            raise ValueError(f"{name}.load_state_dict: the state_dict has "
                             f"{len(saved_groups) if isinstance(saved_groups, list) else 'no'} param "
                             f"groups, this optimizer has {len(self.param_groups)}: it comes from a "
                             f"different model or optimizer")
        params = [p for g in self.param_groups for p in g["params"]]
        ids = [i for g in saved_groups for i in g.get("params", [])]
        if len(ids) != len(params):
            raise ValueError(f"{name}.load_state_dict: the state_dict covers {len(ids)} parameters, "
                             f"this optimizer has {len(params)}: it comes from a different model")
        by_id = dict(zip(ids, params))
        for pid, st in state_dict.get("state", {}).items():
            buf = st.get("momentum_buffer") if isinstance(st, dict) else None
            if pid not in by_id:
                raise ValueError(f"{name}.load_state_dict: state for unknown parameter id {pid}")
            if buf is not None and tuple(buf.shape) != tuple(by_id[pid].shape):
                raise ValueError(f"{name}.load_state_dict: momentum_buffer of parameter {pid} has "
                                 f"shape {tuple(buf.shape)}, the parameter has "
                                 f"{tuple(by_id[pid].shape)}: the state_dict comes from a different model")
        self.restore()
        super().load_state_dict(state_dict)
        for g in self.param_groups:
            self._validate_group(g)
        self.seed, self._k = seed, k
        self.skipped_steps = int(meta.get("skipped_steps", 0))
        with torch.no_grad():
            for i, b in enumerate(self._buckets):
                ready = [("momentum_buffer" in self.state.get(p, {})) for p in b.params]
                self._mom_ready[i] = ready
                if any(ready):
                    if self._momentum[i] is None:
                        self._momentum[i] = torch.zeros_like(b.data)
                    for j, p in enumerate(b.params):
                        if ready[j]:
                            b.slice(self._momentum[i], j).copy_(self.state[p]["momentum_buffer"].reshape(-1))
        self._publish_state()


def _runs(has: list[bool], ready: list[bool], with_momentum: bool):
    """Maximal runs of consecutive parameters sharing (has gradient, momentum init)."""
    out = []
    start = 0
    key = lambda j: (has[j], with_momentum and not ready[j])  # noqa: E731
    for j in range(1, len(has) + 1):
        if j == len(has) or key(j) != key(start):
            out.append((start, j, *key(start)))
            start = j
    return out


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
