r"""Parallel chains: N copies of one architecture trained (sampled) as one module.

::

    chains = Chains.from_model(make_model, n=4, seeds=range(4))   # or Chains([m0, m1, m2, m3])
    opt = fused_flat.SGLD(chains.parameters(), lr=1e-3, beta=1e5)  # any optimizer, as is
    out = chains(x)                                   # [N, batch, ...]: every chain sees x
    loss = chain_loss(out, y, F.cross_entropy)        # sum over chains of each chain's mean loss
    loss.backward(); opt.step()

    probs = chain_predict_proba(chains, x_test)       # [N, M, C]; probs.mean(0) is the BMA
    per_chain_metrics(probs, y_test)                  # {"accuracy": [...], "nll": [...]}
    avg = ChainAverager(chains, (x_test, y_test), burn_in=50)   # BMA over chains and snapshots
    avg.step(); ...; avg.probs(); avg.rhat("nll")     # split-R-hat of the per-chain NLL traces
    model_2 = chains.extract(2)                       # an ordinary nn.Module (a copy)

**Layout.** Every parameter (and buffer) of the architecture is one tensor of shape
``[N, *shape]`` (contiguous, chain dimension first), an ``nn.Parameter`` of the Chains module
(``chains.stacked`` holds them, with the architecture's names: ``stacked.0.weight``), so any
optimizer sees N chains as ordinary parameters. The forward pass is
``torch.func.vmap`` over ``torch.func.functional_call`` of the architecture (what
``torch.func.stack_module_state`` is for): chain c runs with the slices ``[c]``.

**Inputs.** ``chains(x)``: the same input for every chain (``in_dims=None``), outputs
``[N, batch, ...]``. ``chains(xs, per_chain=True)``: every positional tensor argument has a
leading chain dimension ``[N, batch, ...]`` and chain c gets ``xs[c]`` (independent mini-batches
per chain). Keyword arguments are passed unbatched to every chain.

**Losses.** :func:`chain_loss` sums each chain's own mean loss, so the gradient reaching chain
c's slice is exactly the gradient of its own mean loss (chains do not interact).

**Noise (fused_flat optimizers).** Chain c's element e of a stacked parameter t sits at memory
position ``c * numel_t + e`` of that tensor (``numel_t`` the per-chain numel), so its noise
index in the bucket is ``offset_t + c * numel_t + e`` (ALGORITHMS.md §1). Distinct chains
have distinct indices, hence independent noise, from one optimizer with one seed.

**SAM.** ``fused_flat.SAM`` over a Chains uses ONE norm over all its parameters, i.e. over all
chains together (ALGORITHMS.md §3): the chains are coupled through ``||g_1||``.
:class:`ChainSAM` is SAM/ASAM with one norm per chain: chain c's perturbation is
``rho g_1,c / (||g_1,c|| + 1e-12)``, the same as N independent SAM optimizers.

**Randomness.** Dropout and other random ops run under ``vmap(randomness=...)``:
``"different"`` (default) draws independent masks per chain, ``"same"`` one mask shared by
all chains, ``"error"`` refuses random ops.

**BatchNorm.** Modules with running statistics (BatchNorm/InstanceNorm with
``track_running_stats=True``) are refused: they update buffers in place inside the forward,
which vmap cannot do per chain. Norm layers without running statistics (GroupNorm,
LayerNorm, or BatchNorm with ``track_running_stats=False``, e.g. after
``torch.func.replace_all_batch_norm_modules_``) work.

**R-hat.** :func:`split_rhat` is the split-R-hat of Gelman et al. (BDA3, sec. 11.4) and, with
``rank_normalize=True``, the rank-normalized, folded split-R-hat of Vehtari et al. (2021).
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.func import functional_call, vmap

from fused_flat.diagnostics import RunningAverage
from fused_flat.optim.sam import NORM_EPS, SAM

__all__ = ["Chains", "chain_loss", "ChainSAM", "chain_predict_proba", "bma_probs",
           "per_chain_metrics", "ChainAverager", "split_rhat", "per_chain_hessian_trace",
           "per_chain_hessian_lambda_max"]

_RANDOMNESS = ("different", "same", "error")


# ----------------------------------------------------------------------------- the module
def _refuse_running_stats(model: nn.Module, where: str) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
            raise ValueError(
                f"{where}: module {name or '<root>'!r} ({type(m).__name__}) keeps running "
                f"statistics, which it updates in place during the forward pass; torch.func.vmap "
                f"cannot do that per chain, so Chains does not support it. Use GroupNorm or "
                f"LayerNorm, or BatchNorm with track_running_stats=False (batch statistics only, "
                f"e.g. torch.func.replace_all_batch_norm_modules_(model)).")


def _signature(model: nn.Module):
    return ([(n, type(m)) for n, m in model.named_modules()],
            [(n, tuple(p.shape), p.dtype, p.device, p.requires_grad)
             for n, p in model.named_parameters(remove_duplicate=False)],
            [(n, tuple(b.shape), b.dtype, b.device) for n, b in model.named_buffers(remove_duplicate=False)])


class Chains(nn.Module):
    """N chains of one architecture as one module (see the module docstring).

    Args:
        models: N >= 1 modules of the same architecture (same module types, parameter and
            buffer names, shapes, dtypes, devices, requires_grad). Their values are copied
            into the stacked parameters; the models themselves are not used afterwards.
        randomness: vmap's ``randomness`` ("different", "same" or "error"), see Dropout above.

    Attributes: ``n_chains``; ``stacked`` (the architecture holding the stacked tensors; do
    not call it directly).
    """

    def __init__(self, models: Sequence[nn.Module], *, randomness: str = "different"):
        super().__init__()
        models = list(models)
        if not models:
            raise ValueError("Chains: need at least one model")
        for i, m in enumerate(models):
            if not isinstance(m, nn.Module):
                raise TypeError(f"Chains: models[{i}] is a {type(m).__name__}, not an nn.Module")
            _refuse_running_stats(m, "Chains")
        if randomness not in _RANDOMNESS:
            raise ValueError(f"Chains: randomness must be one of {_RANDOMNESS}, got {randomness!r}")
        sig = _signature(models[0])
        for i, m in enumerate(models[1:], 1):
            if _signature(m) != sig:
                raise ValueError(f"Chains: models[{i}] differs from models[0] in its modules, or in "
                                 f"its parameters' or buffers' names, shapes, dtypes, devices or "
                                 f"requires_grad; chains must share one architecture")
        if not sig[1]:
            raise ValueError("Chains: the model has no parameters")
        self.randomness = randomness
        self.n_chains = len(models)
        # The architecture, holding [N, ...] tensors in place of its own. deepcopy's memo maps
        # every parameter / buffer object to its stacked replacement, so tied weights stay tied
        # and nothing of model size is copied twice.
        memo: dict = {}
        first = models[0]
        with torch.no_grad():
            for name, p in first.named_parameters():
                stacked = torch.stack([m.get_parameter(name).detach() for m in models]).contiguous()
                memo[id(p)] = nn.Parameter(stacked, requires_grad=p.requires_grad)
            for name, b in first.named_buffers():
                memo[id(b)] = torch.stack([m.get_buffer(name).detach() for m in models]).contiguous()
        self.stacked = copy.deepcopy(first, memo)   # keeps every submodule's train/eval mode
        self.training = first.training

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(cls, model_or_fn, n: int, seeds: Iterable[int] | None = None, *,
                   reinit: bool = True, randomness: str = "different") -> "Chains":
        """N chains from a factory or from one model.

        ``model_or_fn`` a callable returning a module: called N times, chain c under
        ``torch.manual_seed(seeds[c])`` (torch's global RNG state is restored afterwards), or,
        with ``seeds=None``, in sequence from the current global RNG (as
        ``[fn() for _ in range(n)]``). An ``nn.Module``: N deep copies, each re-initialized by
        the ``reset_parameters()`` of its submodules under the same seeding rule; a parameter
        that no ``reset_parameters`` covers raises (pass a factory instead). ``reinit=False``:
        N identical copies (different chains then differ only by their noise).
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"Chains.from_model: n must be an integer >= 1, got {n!r}")
        if seeds is not None:
            seeds = list(seeds)
            if len(seeds) != n or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
                raise ValueError(f"Chains.from_model: seeds must be {n} integers, got {seeds!r}")
        if isinstance(model_or_fn, nn.Module):
            if reinit:
                _check_resettable(model_or_fn)

            def make():
                m = copy.deepcopy(model_or_fn)
                if reinit:
                    with torch.no_grad():
                        for sub in m.modules():
                            for attr in ("reset_parameters", "_reset_parameters"):
                                fn = getattr(sub, attr, None)
                                if callable(fn):
                                    fn()
                                    break
                return m
        elif callable(model_or_fn):
            def make():
                m = model_or_fn()
                if not isinstance(m, nn.Module):
                    raise TypeError(f"Chains.from_model: the factory returned a {type(m).__name__}, "
                                    f"not an nn.Module")
                return m
        else:
            raise TypeError("Chains.from_model: pass an nn.Module or a function returning one")
        models = []
        for c in range(n):
            if seeds is None:
                models.append(make())
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seeds[c])
                    models.append(make())
        return cls(models, randomness=randomness)

    # ------------------------------------------------------------------ forward
    def _state(self) -> dict:
        state = dict(self.stacked.named_parameters())
        state.update(self.stacked.named_buffers())
        return state

    def forward(self, *args, per_chain: bool = False, **kwargs):
        """Per-chain outputs ``[N, ...]``. ``per_chain=False``: every chain gets ``args``;
        ``per_chain=True``: every positional tensor has a leading chain dimension of size N and
        chain c gets its slice ``[c]``. ``kwargs`` go unbatched to every chain."""
        n = self.n_chains
        if per_chain:
            for i, a in enumerate(args):
                if isinstance(a, torch.Tensor) and (a.dim() == 0 or a.shape[0] != n):
                    raise ValueError(f"Chains: per_chain=True needs a leading chain dimension of size "
                                     f"{n} on every tensor argument; argument {i} has shape "
                                     f"{tuple(a.shape)}")
        in_dims = (0,) + tuple(0 if per_chain and isinstance(a, torch.Tensor) else None for a in args)
        module = self.stacked

        def one(state, *a):
            return functional_call(module, state, a, kwargs)

        return vmap(one, in_dims=in_dims, randomness=self.randomness)(self._state(), *args)

    # ------------------------------------------------------------------ chains as models
    def _check_c(self, c: int) -> int:
        if isinstance(c, bool) or not isinstance(c, int) or not -self.n_chains <= c < self.n_chains:
            raise IndexError(f"Chains: chain index {c!r} out of range for {self.n_chains} chains")
        return c % self.n_chains

    def extract(self, c: int) -> nn.Module:
        """Chain c as an ordinary module (a copy: parameters, buffers, train/eval mode)."""
        c = self._check_c(c)
        memo: dict = {}
        with torch.no_grad():
            for p in self.stacked.parameters():
                memo[id(p)] = nn.Parameter(p[c].clone(), requires_grad=p.requires_grad)
            for b in self.stacked.buffers():
                memo[id(b)] = b[c].clone()
        return copy.deepcopy(self.stacked, memo)

    def unstack(self) -> list[nn.Module]:
        """The N chains as N ordinary modules (copies)."""
        return [self.extract(c) for c in range(self.n_chains)]

    @torch.no_grad()
    def set_chain(self, c: int, model: nn.Module) -> None:
        """Copy ``model``'s parameters and buffers (same architecture) into chain c."""
        c = self._check_c(c)
        sig, own = _signature(model), _signature(self.extract(c))
        if sig[:1] != own[:1] or [s[:3] for s in sig[1]] != [s[:3] for s in own[1]] or \
                [s[:3] for s in sig[2]] != [s[:3] for s in own[2]]:
            raise ValueError("Chains.set_chain: the model's architecture differs from the chains'")
        for name, p in self.stacked.named_parameters():
            p[c].copy_(model.get_parameter(name))
        for name, b in self.stacked.named_buffers():
            b[c].copy_(model.get_buffer(name))

    def numel_per_chain(self) -> int:
        return sum(p[0].numel() for p in self.stacked.parameters())

    def extra_repr(self) -> str:
        return f"n_chains={self.n_chains}, randomness={self.randomness!r}"


def _check_resettable(model: nn.Module) -> None:
    for mname, m in model.named_modules():
        own = list(m.named_parameters(recurse=False))
        if own and not (callable(getattr(m, "reset_parameters", None))
                        or callable(getattr(m, "_reset_parameters", None))):
            raise ValueError(
                f"Chains.from_model: module {mname or '<root>'!r} ({type(m).__name__}) owns "
                f"parameter {own[0][0]!r} but has no reset_parameters(), so copies of the model "
                f"cannot be re-initialized; pass a function that builds the model, or reinit=False")


# ----------------------------------------------------------------------------- losses
def chain_loss(outputs: torch.Tensor, target, loss_fn: Callable, *, per_chain_target: bool = False,
               reduction: str = "sum") -> torch.Tensor:
    """Sum over chains of each chain's loss ``loss_fn(outputs[c], target)`` (a mean over the
    batch for the usual losses), so each chain receives the gradient of its own loss.

    ``target`` is shared by every chain, or, with ``per_chain_target=True``, has a leading
    chain dimension (chain c uses ``target[c]``). ``reduction='none'`` returns the [N]
    vector of per-chain losses instead of their sum.
    """
    if not isinstance(outputs, torch.Tensor) or outputs.dim() < 1:
        raise ValueError("chain_loss: outputs must be a tensor with a leading chain dimension")
    if reduction not in ("sum", "none"):
        raise ValueError(f"chain_loss: reduction must be 'sum' or 'none', got {reduction!r}")
    n = outputs.shape[0]
    if per_chain_target and (not isinstance(target, torch.Tensor) or target.dim() == 0
                             or target.shape[0] != n):
        raise ValueError(f"chain_loss: per_chain_target=True needs a target with a leading chain "
                         f"dimension of size {n}")
    losses = [loss_fn(outputs[c], target[c] if per_chain_target else target) for c in range(n)]
    for c, l in enumerate(losses):
        if not isinstance(l, torch.Tensor) or l.dim() != 0:
            raise ValueError(f"chain_loss: loss_fn must return a scalar tensor (chain {c} gave "
                             f"{getattr(l, 'shape', type(l))}); use a mean-reduced loss")
    stacked = torch.stack(losses)
    return stacked.sum() if reduction == "sum" else stacked


# ----------------------------------------------------------------------------- per-chain SAM
class ChainSAM(SAM):
    r"""SAM / ASAM with one norm per chain, over parameters that all carry a leading chain
    dimension of size ``n_chains`` (a :class:`Chains`' parameters).

    Chain c's perturbation is :math:`e_c = \rho\, g_{1,c} / (\lVert g_{1,c}\rVert + 10^{-12})`
    (ASAM: :math:`\rho\, T_c^2 g_{1,c} / (\lVert T_c g_{1,c}\rVert + 10^{-12})`), the norm over
    chain c's slices of every parameter of the optimizer: the same as N independent
    ``fused_flat.SAM`` optimizers, one per chain, with the same param groups. The rest of the
    step (exact restore, base update, checkpoints, GradScaler, ``step(closure)``) is
    ``fused_flat.SAM``'s.

    How: ``first_step`` rescales g1 in place per chain to the direction above and runs SAM's
    own first step in its unnormalized (USAM, ``e = rho g``) form; g1 is put back afterwards
    when ``zero_grad=False``. A non-finite g1 or g2 in any chain skips the step for all
    chains (one optimizer). ``param_groups`` keep ``normalize=True`` and the user's
    ``adaptive``. USAM needs no per-chain variant: ``SAM(normalize=False)`` has no norm.
    """

    def __init__(self, params, n_chains: int, base_optimizer: type = torch.optim.SGD,
                 rho: float | None = None, adaptive: bool = False, **kwargs):
        if isinstance(params, Chains):
            if n_chains != params.n_chains:
                raise ValueError(f"ChainSAM: n_chains={n_chains} but the Chains has {params.n_chains}")
            params = params.parameters()
        if isinstance(n_chains, bool) or not isinstance(n_chains, int) or n_chains < 1:
            raise ValueError(f"ChainSAM: n_chains must be an integer >= 1, got {n_chains!r}")
        if kwargs.get("normalize", True) is not True:
            raise ValueError("ChainSAM: normalize=False is USAM, e = rho g, which has no norm and so "
                             "is already per chain; use fused_flat.SAM(normalize=False)")
        self.n_chains = n_chains
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, **kwargs)
        for g in self.param_groups:
            self._check_group(g)

    def _check_group(self, g: dict) -> None:
        if g.get("normalize", True) is not True:
            raise ValueError("ChainSAM: every param group must have normalize=True")
        for p in g["params"]:
            if p.dim() == 0 or p.shape[0] != self.n_chains:
                raise ValueError(f"ChainSAM: every parameter needs a leading chain dimension of size "
                                 f"{self.n_chains}; got shape {tuple(p.shape)}")

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "n_chains"):
            self._check_group(self.param_groups[-1])

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, grad_scaler=None) -> None:
        if self._perturbed is not None:
            return super().first_step(zero_grad, grad_scaler)   # SAM's own error
        n = self.n_chains
        live = [(g, p) for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not live:
            return super().first_step(zero_grad, grad_scaler)
        dev = live[0][1].grad.device
        sq = torch.zeros(n, dtype=torch.float64, device=dev)
        dirs = []
        for g, p in live:
            gr = p.grad.reshape(n, -1).to(torch.float64)
            if g["adaptive"]:
                t = p.detach().reshape(n, -1).abs().to(torch.float64) + g["adaptive_eta"]
                sq += (t * gr).square().sum(1).to(dev)
                dirs.append(t * t * gr)
            else:
                sq += gr.square().sum(1).to(dev)
                dirs.append(gr)
        norm = sq.sqrt()
        scaled = grad_scaler is not None and grad_scaler.is_enabled()
        # SAM's unnormalized form divides rho * g by the loss scale: pre-multiply by it
        mult = float(grad_scaler.get_scale()) if scaled else 1.0
        saved = None if zero_grad else [p.grad.clone() for _, p in live]
        for (g, p), d in zip(live, dirs):
            p.grad.copy_((d * (mult / (norm + NORM_EPS)).to(d.device)[:, None]).reshape(p.grad.shape))
        flags = [(g["adaptive"], g["normalize"]) for g in self.param_groups]
        try:
            for g in self.param_groups:
                g["adaptive"], g["normalize"] = False, False
            super().first_step(zero_grad=zero_grad, grad_scaler=grad_scaler)
        finally:
            for g, (a, nz) in zip(self.param_groups, flags):
                g["adaptive"], g["normalize"] = a, nz
            if saved is not None:
                for (_, p), s in zip(live, saved):
                    if p.grad is not None:
                        p.grad.copy_(s)


# ----------------------------------------------------------------------------- predictions
def _batches(data):
    """(inputs, labels or None) batches of: a tensor, an (x, y) pair, or an iterable of batches
    (each a tensor x or an (x, y) pair). Refuses a shuffling DataLoader."""
    if isinstance(data, torch.Tensor):
        return [(data, None)]
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return [(data[0], data[1])]
    sampler = getattr(data, "sampler", None)
    if isinstance(sampler, torch.utils.data.RandomSampler):
        raise ValueError("fused_flat.chains: the DataLoader shuffles (RandomSampler); predictions "
                         "over snapshots are averaged example by example, so evaluation data must "
                         "come in a fixed order (shuffle=False)")
    out = []
    for b in data:
        if isinstance(b, torch.Tensor):
            out.append((b, None))
        else:
            out.append((b[0], b[1] if len(b) > 1 else None))
    return out


@contextlib.contextmanager
def _eval(model: nn.Module):
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, t in modes:
            m.training = t


def _predict(chains: Chains, data) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not isinstance(chains, Chains):
        raise TypeError(f"fused_flat.chains: expected a Chains, got {type(chains).__name__}")
    probs, labels = [], []
    with torch.no_grad(), _eval(chains):
        for x, y in _batches(data):
            probs.append(torch.softmax(chains(x).double(), dim=-1).cpu())
            labels.append(None if y is None else y.reshape(-1).cpu())
    if not probs:
        raise ValueError("fused_flat.chains: the data yielded no batch")
    lab = None if any(l is None for l in labels) else torch.cat(labels)
    return torch.cat(probs, dim=1), lab


def chain_predict_proba(chains: Chains, data) -> torch.Tensor:
    """Softmax probabilities of every chain (eval mode, restored after), ``[N, M, C]`` float64
    on the CPU. ``data``: inputs, an (x, y) pair, or an unshuffled iterable of batches."""
    return _predict(chains, data)[0]


def bma_probs(probs: torch.Tensor) -> torch.Tensor:
    """Bayesian model average over chains: the mean over the chain dimension of ``[N, M, C]``."""
    probs = torch.as_tensor(probs)
    if probs.dim() != 3:
        raise ValueError(f"bma_probs: expected [N, M, C] per-chain probabilities, got {tuple(probs.shape)}")
    return probs.mean(0)


_METRICS = ("accuracy", "nll", "ece", "brier")


def per_chain_metrics(probs: torch.Tensor, labels, metrics: Sequence[str] = ("accuracy", "nll")) -> dict:
    """``{metric: [value of chain 0, ..., chain N-1]}`` from ``[N, M, C]`` probabilities, by
    fused_flat.diagnostics' metric functions (accuracy, nll, ece, brier)."""
    from fused_flat import diagnostics as D

    fns = {"accuracy": D.accuracy, "nll": D.nll, "ece": D.expected_calibration_error,
           "brier": D.brier_score}
    probs = torch.as_tensor(probs)
    if probs.dim() != 3:
        raise ValueError(f"per_chain_metrics: expected [N, M, C] probabilities, got {tuple(probs.shape)}")
    for m in metrics:
        if m not in fns:
            raise ValueError(f"per_chain_metrics: unknown metric {m!r}; choose from {_METRICS}")
    return {m: [fns[m](probs[c], labels) for c in range(probs.shape[0])] for m in metrics}


class ChainAverager(RunningAverage):
    """Bayesian model averaging over chains and snapshots, with per-chain traces for R-hat.

    Args:
        chains: the Chains being trained.
        data: evaluation data: an input tensor, an (x, y) pair, or an unshuffled iterable of
            batches (a shuffling DataLoader is refused; the labels of every pass are checked
            against the first pass's, so a change of order is caught when labels are given).
        labels: the evaluation labels when ``data`` has none (for the traces).
        burn_in: as diagnostics.SnapshotAverager: ``step()`` skips ``burn_in`` calls.
        every: thinning: after burn-in, ``step()`` collects every ``every``-th call.
        metrics: per-chain metrics recorded at every snapshot (needs labels).

    ``probs()``: ``[M, C]``, mean over chains and snapshots; ``chain_probs()``: ``[N, M, C]``,
    each chain's own snapshot average; ``trace(name)``: ``[N, n_snapshots]`` float64, the
    metric of each chain's *current* weights at each snapshot; ``rhat(name)``: split-R-hat of
    that trace. Memory O(N M C), never the weights.
    """

    def __init__(self, chains: Chains, data, labels=None, *, burn_in: int = 0, every: int = 1,
                 metrics: Sequence[str] = ("accuracy", "nll")):
        if not isinstance(chains, Chains):
            raise TypeError(f"ChainAverager: expected a Chains, got {type(chains).__name__}")
        self._init_average(burn_in, every)
        for m in metrics:
            if m not in _METRICS:
                raise ValueError(f"ChainAverager: unknown metric {m!r}; choose from {_METRICS}")
        _batches(data)   # refuses a shuffling loader now
        self.chains, self.data = chains, data
        self.labels = None if labels is None else torch.as_tensor(labels).reshape(-1).cpu()
        self.metrics = tuple(metrics)
        self._first_labels: torch.Tensor | None = None
        self._traces: dict = {m: [] for m in self.metrics}

    def collect(self) -> torch.Tensor:
        """Add the current weights of every chain; returns their ``[N, M, C]`` probabilities."""
        p, lab = _predict(self.chains, self.data)
        if lab is not None:
            if self._first_labels is None:
                self._first_labels = lab
            elif not torch.equal(lab, self._first_labels):
                raise ValueError("ChainAverager: the evaluation data came in a different order than "
                                 "at the first snapshot; averaging needs a fixed order")
        labels = self.labels if self.labels is not None else lab
        if labels is not None and labels.numel() != p.shape[1]:
            raise ValueError(f"ChainAverager: {labels.numel()} labels for {p.shape[1]} examples")
        if self.metrics and labels is not None:
            vals = per_chain_metrics(p, labels, self.metrics)
            for m in self.metrics:
                self._traces[m].append(vals[m])
        self._add(p)
        return p

    def chain_probs(self) -> torch.Tensor:
        return self._average()

    def probs(self) -> torch.Tensor:
        return self.chain_probs().mean(0)

    def trace(self, name: str = "nll") -> torch.Tensor:
        if name not in self._traces:
            raise ValueError(f"ChainAverager: no trace {name!r}; recorded: {self.metrics}")
        if not self._traces[name]:
            raise RuntimeError("ChainAverager: no trace recorded yet (no snapshot, or no labels)")
        return torch.tensor(self._traces[name], dtype=torch.float64).T.contiguous()

    def rhat(self, name: str = "nll", *, rank_normalize: bool = False) -> float:
        return split_rhat(self.trace(name), rank_normalize=rank_normalize)


# ----------------------------------------------------------------------------- R-hat
def _rhat_basic(x: torch.Tensor) -> float:
    """Split-R-hat of [m, n] float64 draws (BDA3 sec. 11.4 / Vehtari et al. 2021 eq. 1-4)."""
    n = x.shape[1] // 2
    halves = torch.cat([x[:, :n], x[:, x.shape[1] - n:]])   # odd n: the middle draw is dropped
    w = halves.var(dim=1, unbiased=True).mean()             # W: mean within-chain variance
    b = n * halves.mean(dim=1).var(unbiased=True)           # B: n * variance of the chain means
    var_plus = (n - 1) / n * w + b / n
    if w == 0:
        return math.nan if b == 0 else math.inf
    return float(torch.sqrt(var_plus / w))


def split_rhat(draws, *, rank_normalize: bool = False) -> float:
    r"""Split-R-hat of a scalar over chains, ``draws`` of shape ``[n_chains, n_draws]``.

    Each chain is split in two halves (the middle draw dropped when n_draws is odd), giving
    2m chains of n draws; with :math:`\bar x_j, s_j^2` the mean and variance (ddof 1) of half
    j: :math:`W = \mathrm{mean}_j s_j^2`, :math:`B = n\,\mathrm{var}_j(\bar x_j)` (ddof 1),
    :math:`\widehat{\mathrm{var}}^+ = \frac{n-1}{n} W + \frac{B}{n}`,
    :math:`\hat R = \sqrt{\widehat{\mathrm{var}}^+ / W}` (Gelman et al., BDA3 sec. 11.4).

    ``rank_normalize=True``: Vehtari et al. (2021) sec. 4.2: R-hat of the normal scores
    :math:`\Phi^{-1}((r - 3/8) / (S + 1/4))` of the pooled ranks r (average ranks for ties,
    S the total number of draws), and of the same for the folded draws
    :math:`|x - \mathrm{median}(x)|`; the larger of the two (bulk and tail).

    Needs >= 4 draws per chain and >= 1 chain (with one chain R-hat compares its halves);
    NaN when every half is constant and all halves agree, inf when the halves are constant
    but differ.
    """
    x = torch.as_tensor(draws, dtype=torch.float64)
    if x.dim() != 2:
        raise ValueError(f"split_rhat: expected draws of shape [n_chains, n_draws], got {tuple(x.shape)}")
    if x.shape[0] < 1 or x.shape[1] < 4:
        raise ValueError(f"split_rhat: need >= 1 chain and >= 4 draws per chain, got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("split_rhat: draws must be finite")
    if not rank_normalize:
        return _rhat_basic(x)
    from scipy.special import ndtri
    from scipy.stats import rankdata

    def z(v: torch.Tensor) -> torch.Tensor:
        r = rankdata(v.reshape(-1).numpy(), method="average")
        s = v.numel()
        return torch.from_numpy(ndtri((r - 0.375) / (s + 0.25))).reshape(v.shape)

    bulk = _rhat_basic(z(x))
    tail = _rhat_basic(z((x - x.reshape(-1).median()).abs()))
    return max(bulk, tail)


# ----------------------------------------------------------------------------- Hessians
def per_chain_hessian_trace(chains: Chains, loss_fn: Callable, data, **kwargs) -> list:
    """``[diagnostics.hessian_trace(chains.extract(c), loss_fn, data, **kwargs) for c]``: one
    TraceEstimate per chain (each chain's own loss surface, same probes)."""
    from fused_flat.diagnostics import hessian_trace

    return [hessian_trace(chains.extract(c), loss_fn, data, **kwargs) for c in range(chains.n_chains)]


def per_chain_hessian_lambda_max(chains: Chains, loss_fn: Callable, data, **kwargs) -> list[float]:
    """``diagnostics.hessian_lambda_max`` of every chain (power iteration on chain c alone)."""
    from fused_flat.diagnostics import hessian_lambda_max

    return [hessian_lambda_max(chains.extract(c), loss_fn, data, **kwargs) for c in range(chains.n_chains)]
