"""Flatness and Bayesian diagnostics: the fSGLD paper's evaluation tools (ALGORITHMS.md sec. 4).

Curvature (any model, any loss, over a data loader)::

    H = HessianOperator(model, F.cross_entropy, loader)   # eval mode by default
    Hv = H.matvec(v)                                      # flat float64 vector, batch-size weighted
    tr = hessian_trace(model, F.cross_entropy, loader, n_probes=100, seed=0)
    tr.estimate, tr.stderr                                # Hutchinson, Rademacher probes
    lams = hessian_eigenvalues(model, F.cross_entropy, loader, k=50)   # eigsh, descending
    lam1 = hessian_lambda_max(model, F.cross_entropy, loader)         # power iteration

Bayesian model averaging and predictive metrics::

    bma = SnapshotAverager(model, test_loader, burn_in=50, every=5)   # loader: shuffle=False
    for epoch ...: train ...; bma.step()          # collects when past burn_in, every `every` calls
    p = bma.probs()                               # (N, C) mean of softmax over snapshots
    classification_metrics(p, y)                  # accuracy, nll, ece, brier
    ood_metrics(p_in, p_out)                      # AUROC / AUPR, OOD = positive, score = entropy

Hessian-vector products use double backward (``torch.autograd.grad`` with
``create_graph=True``), which also works for BatchNorm in training mode. The loss over a
loader is the sample-weighted mean of the per-batch mean losses, sum_b n_b L_b / N, so its
Hessian is sum_b n_b H_b / N; products are taken in the parameters' dtype and accumulated in
float64. The top-k eigenvalues come from ``scipy.sparse.linalg.eigsh`` (ARPACK's implicitly
restarted Lanczos) on a ``LinearOperator`` of HVPs, as the paper does (top 50, tol 1e-3, 500
iterations). Metrics: NLL and Brier in torch, ECE by torchmetrics
(``multiclass_calibration_error``, L1 norm, 15 bins), AUROC/AUPR by scikit-learn
(``roc_auc_score``, ``average_precision_score``). scipy, scikit-learn and torchmetrics are
imported only by the functions that need them.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

__all__ = ["HessianOperator", "hessian_vector_product", "hessian_trace", "hessian_eigenvalues",
           "hessian_lambda_max", "TraceEstimate", "SnapshotAverager", "predict_proba", "nll",
           "brier_score", "expected_calibration_error", "accuracy", "predictive_entropy",
           "classification_metrics", "ood_metrics"]

Batch = Sequence[torch.Tensor]


# ----------------------------------------------------------------------------- helpers
def _as_batches(data) -> Callable[[], Iterator[Batch]]:
    """A re-iterable source of (inputs, targets) batches: one (x, y) pair of tensors, or any
    iterable of such pairs (a DataLoader, a list). Iterated anew at every use."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return lambda: iter([tuple(data)])
    if isinstance(data, Iterator):
        data = list(data)   # a one-shot iterator would be empty on the second pass
    return lambda: iter(data)


def _batch_size(batch: Batch) -> int:
    x = batch[0]
    return int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() > 0 else 1


def _inputs(batch):
    """The model's input of a batch: x of (x, y); a bare tensor is the input itself."""
    if isinstance(batch, torch.Tensor):
        return batch
    return batch[0]


@contextlib.contextmanager
def _mode(model: nn.Module, train: bool):
    """Set train/eval on every submodule for the block, then restore each one's own mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.train(train)
    try:
        yield
    finally:
        for m, t in modes:
            m.training = t


def _trainable(model: nn.Module, params) -> list[torch.Tensor]:
    ps = list(model.parameters()) if params is None else list(params)
    ps = [p for p in ps if p.requires_grad]
    if not ps:
        raise ValueError("fused_flat.diagnostics: no parameter requires a gradient")
    return ps


# ----------------------------------------------------------------------------- Hessian
class HessianOperator:
    """The Hessian of ``loss_fn(model(x), y)`` averaged over ``data`` w.r.t. ``params``.

    Args:
        model: any ``nn.Module``.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``, a mean over the batch (as
            ``F.cross_entropy``); batches are weighted by their size.
        data: one ``(x, y)`` pair or an iterable of them (a DataLoader; it is iterated once
            per product, so it should not shuffle if exact repeatability matters).
        params: the parameters (default: every ``model`` parameter with requires_grad).
        train_mode: evaluate the model in training mode (BatchNorm batch statistics,
            dropout on). Default False: eval mode, the deterministic Hessian. BatchNorm
            running statistics are never updated by the products.
        cache_graph: keep each batch's gradient graph (``create_graph=True``) after the first
            product and reuse it (one backward per batch per product instead of a forward
            and two backwards). Memory: the autograd graph of every batch; use with a single
            batch or a few small ones.

    ``matvec(v)`` takes a flat vector (torch or numpy, any float dtype) of length ``dim``
    (parameters concatenated in order, ``p.reshape(-1)``) and returns a float64 torch vector
    on the CPU. ``n_products`` counts the products.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, data, params=None, *,
                 train_mode: bool = False, cache_graph: bool = False):
        self.model = model
        self.loss_fn = loss_fn
        self.params = _trainable(model, params)
        self._batches = _as_batches(data)
        self.train_mode = bool(train_mode)
        self.cache_graph = bool(cache_graph)
        self._cache: list[tuple[int, tuple[torch.Tensor, ...]]] | None = None
        self.dim = sum(p.numel() for p in self.params)
        self.n_products = 0

    # flat <-> per-parameter
    def _split(self, v: torch.Tensor) -> list[torch.Tensor]:
        out, i = [], 0
        for p in self.params:
            n = p.numel()
            out.append(v[i:i + n].view_as(p).to(device=p.device, dtype=p.dtype))
            i += n
        return out

    def _grads(self) -> Iterator[tuple[int, tuple[torch.Tensor, ...]]]:
        if self._cache is not None:
            yield from self._cache
            return
        from fused_flat.nn.bn import running_stats_frozen

        keep = [] if self.cache_graph else None
        with _mode(self.model, self.train_mode), running_stats_frozen(self.model):
            for batch in self._batches():
                n = _batch_size(batch)
                loss = self.loss_fn(self.model(batch[0]), batch[1])
                g = torch.autograd.grad(loss, self.params, create_graph=True)
                if keep is not None:
                    keep.append((n, g))
                yield n, g
        if keep is not None:
            self._cache = keep

    def matvec(self, v) -> torch.Tensor:
        v = torch.as_tensor(v).reshape(-1)
        if v.numel() != self.dim:
            raise ValueError(f"HessianOperator: vector of length {v.numel()}, expected {self.dim}")
        vs = self._split(v)
        total = torch.zeros(self.dim, dtype=torch.float64)
        count = 0
        for n, g in self._grads():
            dot = sum((gi * vi).sum() for gi, vi in zip(g, vs))
            hv = torch.autograd.grad(dot, self.params, retain_graph=self.cache_graph, allow_unused=True)
            flat = torch.cat([(h if h is not None else torch.zeros_like(p)).reshape(-1).double().cpu()
                              for h, p in zip(hv, self.params)])
            total.add_(flat, alpha=float(n))
            count += n
        if count == 0:
            raise ValueError("HessianOperator: the data yielded no batch")
        self.n_products += 1
        return total / count

    __call__ = matvec

    def dense(self) -> torch.Tensor:
        """The full (dim, dim) float64 Hessian, one product per column (small models only)."""
        eye = torch.eye(self.dim, dtype=torch.float64)
        return torch.stack([self.matvec(eye[i]) for i in range(self.dim)], dim=1)

    def as_linear_operator(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64, symmetric) of the products."""
        from scipy.sparse.linalg import LinearOperator

        def mv(x):
            return self.matvec(torch.from_numpy(x.reshape(-1).copy())).numpy()

        return LinearOperator((self.dim, self.dim), matvec=mv, rmatvec=mv, dtype="float64")


def hessian_vector_product(model, loss_fn, data, v, params=None, *, train_mode: bool = False) -> torch.Tensor:
    """H v for the loss over ``data`` (see HessianOperator); ``v`` flat or a list shaped like
    the parameters. Returns the flat float64 product."""
    op = HessianOperator(model, loss_fn, data, params, train_mode=train_mode)
    if isinstance(v, (list, tuple)):
        v = torch.cat([t.reshape(-1).double() for t in v])
    return op.matvec(v)


@dataclass
class TraceEstimate:
    """Hutchinson's estimate: ``estimate`` = mean of v^T H v over ``n_probes`` Rademacher
    probes, ``stderr`` = sample std (ddof 1) / sqrt(n_probes). Unpacks as (estimate, stderr)."""
    estimate: float
    stderr: float
    n_probes: int
    samples: list[float] = field(repr=False, default_factory=list)

    def __iter__(self):
        return iter((self.estimate, self.stderr))


def _operator(model_or_op, loss_fn, data, params, train_mode, cache_graph) -> HessianOperator:
    if isinstance(model_or_op, HessianOperator):
        return model_or_op
    return HessianOperator(model_or_op, loss_fn, data, params, train_mode=train_mode, cache_graph=cache_graph)


def hessian_trace(model, loss_fn=None, data=None, params=None, *, n_probes: int = 100, seed: int = 0,
                  train_mode: bool = False, cache_graph: bool = False) -> TraceEstimate:
    """Hutchinson's estimator tr H ~ (1/m) sum_i v_i^T H v_i with Rademacher v_i (m = n_probes,
    drawn from ``torch.Generator().manual_seed(seed)``). ``model`` may be a HessianOperator."""
    if n_probes < 2:
        raise ValueError("hessian_trace: n_probes must be >= 2 (for the standard error)")
    op = _operator(model, loss_fn, data, params, train_mode, cache_graph)
    gen = torch.Generator().manual_seed(int(seed))
    samples = []
    for _ in range(n_probes):
        v = torch.randint(0, 2, (op.dim,), generator=gen, dtype=torch.int8).double().mul_(2).sub_(1)
        samples.append(float(v @ op.matvec(v)))
    s = torch.tensor(samples, dtype=torch.float64)
    return TraceEstimate(float(s.mean()), float(s.std(unbiased=True) / math.sqrt(n_probes)), n_probes, samples)


def hessian_eigenvalues(model, loss_fn=None, data=None, params=None, *, k: int = 50, tol: float = 1e-3,
                        maxiter: int = 500, seed: int = 0, which: str = "LA", train_mode: bool = False,
                        cache_graph: bool = False) -> torch.Tensor:
    """The top-``k`` Hessian eigenvalues (algebraically largest, ``which='LA'``), sorted
    descending, by ``scipy.sparse.linalg.eigsh`` on a LinearOperator of HVPs. Defaults are the
    paper's (k 50, tol 1e-3, maxiter 500); the start vector is seeded. Needs k < dim."""
    import numpy as np
    from scipy.sparse.linalg import eigsh

    op = _operator(model, loss_fn, data, params, train_mode, cache_graph)
    if not 1 <= k < op.dim:
        raise ValueError(f"hessian_eigenvalues: need 1 <= k < dim = {op.dim}, got k={k}")
    v0 = np.random.default_rng(seed).standard_normal(op.dim)
    vals = eigsh(op.as_linear_operator(), k=k, which=which, tol=tol, maxiter=maxiter, v0=v0,
                 return_eigenvectors=False)
    return torch.from_numpy(np.sort(vals)[::-1].copy())


def hessian_lambda_max(model, loss_fn=None, data=None, params=None, *, iters: int = 100, tol: float = 1e-4,
                       seed: int = 0, train_mode: bool = False, cache_graph: bool = False) -> float:
    """The dominant eigenvalue by power iteration (Rayleigh quotient; stops when it changes by
    less than ``tol`` relative, or after ``iters`` products). Power iteration finds the
    eigenvalue of largest *magnitude*; near a minimum that is lambda_max. Cheaper than eigsh
    when the top eigenvalue is well separated; use hessian_eigenvalues(k=1) otherwise."""
    op = _operator(model, loss_fn, data, params, train_mode, cache_graph)
    gen = torch.Generator().manual_seed(int(seed))
    v = torch.randn(op.dim, generator=gen, dtype=torch.float64)
    v /= v.norm()
    lam = 0.0
    for _ in range(iters):
        hv = op.matvec(v)
        new = float(v @ hv)
        nrm = hv.norm()
        if nrm == 0:
            return 0.0
        v = hv / nrm
        if abs(new - lam) <= tol * abs(new):
            return new
        lam = new
    return lam


# ----------------------------------------------------------------------------- predictions
def _order_problem(loader) -> str | None:
    """Why a DataLoader may not visit its examples in one fixed order (None: it does).

    Accepted: SequentialSampler (``shuffle=False``), DistributedSampler with
    ``shuffle=False``, a list/tuple/range of indices, a plain BatchSampler over one of these, a
    list of index lists as ``batch_sampler``, and an IterableDataset (its own order; see the
    fingerprint check of SnapshotAverager). Anything else is refused: a random sampler, or a
    sampler whose order fused_flat cannot verify."""
    from torch.utils.data import BatchSampler, DistributedSampler, IterableDataset, SequentialSampler

    if isinstance(loader.dataset, IterableDataset):
        return None

    def sampler_problem(s, what: str) -> str | None:
        if type(s) is SequentialSampler or isinstance(s, (range, list, tuple)):
            return None
        if isinstance(s, DistributedSampler):
            return None if not s.shuffle else f"its {what} is a DistributedSampler with shuffle=True"
        return f"its {what} is a {type(s).__name__}"

    bs = loader.batch_sampler
    if bs is None:                                   # batch_size=None: the sampler gives items
        return sampler_problem(loader.sampler, "sampler")
    if type(bs) is BatchSampler:
        return sampler_problem(bs.sampler, "sampler")
    if isinstance(bs, (list, tuple)):
        return None
    return f"its batch_sampler is a {type(bs).__name__}"


def _check_fixed_order(data, who: str) -> None:
    """Refuse a DataLoader that may visit the examples in a different order at each pass
    (shuffle=True, a random sampler, or one whose order cannot be verified)."""
    from torch.utils.data import DataLoader

    if not isinstance(data, DataLoader):
        return
    problem = _order_problem(data)
    if problem is not None:
        raise ValueError(
            f"{who}: the DataLoader may not visit the examples in a fixed order ({problem}), so "
            f"the rows of the probabilities would not line up with the labels, and snapshots "
            f"would average predictions for different examples. Pass an evaluation loader built "
            f"with shuffle=False (SequentialSampler, or DistributedSampler(..., shuffle=False)), "
            f"or the data as tensors or as a list of batches (e.g. batches = list(loader), used "
            f"for the labels too)")


def _row_fingerprint(t) -> torch.Tensor | None:
    """(n, 2) float64 on the CPU: per example, the sum and the sum of squares of its values."""
    if not isinstance(t, torch.Tensor):
        return None
    rows = t.detach().reshape(t.shape[0] if t.dim() > 0 else 1, -1).double()
    return torch.stack([rows.sum(1), (rows * rows).sum(1)], dim=1).cpu()


def _labels(batch):
    if isinstance(batch, torch.Tensor) or not isinstance(batch, (tuple, list)) or len(batch) < 2:
        return None
    return batch[1] if isinstance(batch[1], torch.Tensor) else None


def _fixed_batches(data) -> Iterable:
    if isinstance(data, torch.Tensor):
        return [data]
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return [data]
    return data


@torch.no_grad()
def _predict(model: nn.Module, data, who: str, fingerprint: bool):
    """Probabilities, and (if asked) a fingerprint of the examples visited: ("labels", fp)
    when every batch carries tensor labels, else ("inputs", fp) when every input is a tensor,
    else None."""
    _check_fixed_order(data, who)
    out, labels, inputs = [], [], []
    with _mode(model, False):
        for b in _fixed_batches(data):
            x = _inputs(b)
            out.append(torch.softmax(model(x).double(), dim=-1).cpu())
            if fingerprint:
                labels.append(_row_fingerprint(_labels(b)))
                inputs.append(_row_fingerprint(x))
    if not out:
        raise ValueError(f"{who}: the data yielded no batch (an empty loader, or a one-shot "
                         f"iterator that was already consumed?)")
    fp = None
    if fingerprint:
        if all(f is not None for f in labels):
            fp = ("labels", torch.cat(labels))
        elif all(f is not None for f in inputs):
            fp = ("inputs", torch.cat(inputs))
    return torch.cat(out), fp


def predict_proba(model: nn.Module, data) -> torch.Tensor:
    """Softmax probabilities of ``model`` (eval mode, restored after) on ``data``: an input
    tensor, an (x, y) pair, or an iterable of batches (x or (x, y)). Float64, on the CPU; row
    i belongs to the i-th example visited.

    A DataLoader must visit the examples in a fixed order, or row i would not belong to
    label i: one with ``shuffle=True``, a RandomSampler, WeightedRandomSampler,
    SubsetRandomSampler, DistributedSampler(shuffle=True), or any sampler or batch_sampler
    whose order cannot be verified, is refused with a ValueError. Build the evaluation loader
    with ``shuffle=False``, or pass a list of batches. Other iterables are taken in the order
    they yield."""
    return _predict(model, data, "predict_proba", fingerprint=False)[0]


class RunningAverage:
    """The snapshot bookkeeping shared by :class:`SnapshotAverager` and
    ``fused_flat.chains.ChainAverager``: burn-in and thinning of ``step()`` calls, and the
    running mean of what ``collect()`` adds (``_add``)."""

    def _init_average(self, burn_in: int, every: int) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1 \
                or isinstance(burn_in, bool) or not isinstance(burn_in, int) or burn_in < 0:
            raise ValueError(f"{type(self).__name__}: need integers every >= 1 and burn_in >= 0")
        self.burn_in, self.every = burn_in, every
        self.n_snapshots = 0
        self.n_calls = 0
        self._mean: torch.Tensor | None = None

    def collect(self) -> torch.Tensor:
        raise NotImplementedError

    def step(self) -> bool:
        """Count a call; collect if past burn-in and on the thinning grid. True if collected."""
        self.n_calls += 1
        j = self.n_calls - self.burn_in - 1
        if j >= 0 and j % self.every == 0:
            self.collect()
            return True
        return False

    def _add(self, p: torch.Tensor) -> None:
        self.n_snapshots += 1
        if self._mean is None:
            self._mean = p.clone()
        else:
            self._mean += (p - self._mean) / self.n_snapshots

    def _average(self) -> torch.Tensor:
        if self._mean is None:
            raise RuntimeError(f"{type(self).__name__}: no snapshot collected yet")
        return self._mean.clone()


class SnapshotAverager(RunningAverage):
    """Bayesian model averaging over parameter snapshots: p(y|x) = mean_s softmax(f(x; theta_s)).

    Stores the running mean of the predictive probabilities on the evaluation set (memory
    O(N C), float64), never the weights.

    Args:
        model: the model being trained (its current weights are the snapshot).
        data: evaluation inputs (a tensor, an (x, y) pair, a list of batches, or a loader;
            see predict_proba). A one-shot iterator is read into a list once.
        burn_in: ``step()`` calls to skip before the first snapshot.
        every: thinning; after burn-in, ``step()`` collects every ``every``-th call
            (calls burn_in + 1, burn_in + 1 + every, ...).

    ``collect()`` adds a snapshot unconditionally; ``step()`` applies burn-in and thinning;
    ``probs()`` returns the BMA predictive (N, C); ``n_snapshots`` counts snapshots.

    Every collection must see the same examples in the same order, or the mean would mix
    different examples' predictions. Two guards, both raising ValueError:

    * a DataLoader that may shuffle is refused at construction (see predict_proba);
    * each collection is compared with the first: the same number of rows, and, when every
      batch is an (x, y, ...) tuple with tensor labels, the same labels in the same order;
      otherwise (unlabeled batches), the same inputs (a per-example sum and sum of squares,
      to within rounding). Labels are preferred so that random test-time augmentation is
      allowed; with unlabeled inputs, random augmentation is refused (yield (x, y) batches).
      A failed collection leaves the average unchanged.
    """

    def __init__(self, model: nn.Module, data, *, burn_in: int = 0, every: int = 1):
        self._init_average(burn_in, every)
        if isinstance(data, Iterator):
            data = list(data)   # a one-shot iterator would be empty at the second collection
        _check_fixed_order(data, "SnapshotAverager")
        self.model, self.data = model, data
        self._fingerprint = None

    def _check_same_examples(self, p: torch.Tensor, fp) -> None:
        n = self.n_snapshots + 1
        if self._mean is None:
            return
        if p.shape != self._mean.shape:
            raise ValueError(
                f"SnapshotAverager: snapshot {n} has probabilities of shape {tuple(p.shape)}, the "
                f"first had {tuple(self._mean.shape)}: the data must yield the same examples at "
                f"every collection (drop_last with shuffling? a changing dataset?)")
        ref = self._fingerprint
        if ref is None and fp is None:
            return
        same = (ref is not None and fp is not None and ref[0] == fp[0]
                and ref[1].shape == fp[1].shape
                and (torch.equal(ref[1], fp[1]) if ref[0] == "labels" else
                     torch.allclose(ref[1], fp[1], rtol=1e-6, atol=1e-9, equal_nan=True)))
        if not same:
            what = ref[0] if ref is not None else fp[0]
            raise ValueError(
                f"SnapshotAverager: snapshot {n} did not visit the same examples in the same "
                f"order as the first (its {what} differ), so averaging would mix different "
                f"examples' predictions. Evaluate on data that yields the same batches in the "
                f"same order every time: a DataLoader with shuffle=False, tensors, or a list of "
                f"batches" + ("" if what == "labels" else
                             "; if the inputs are randomly augmented, yield (x, y) batches so that "
                             "the labels are compared instead"))

    def collect(self) -> torch.Tensor:
        """Add the current weights' probabilities to the running mean; returns them."""
        p, fp = _predict(self.model, self.data, "SnapshotAverager", fingerprint=True)
        self._check_same_examples(p, fp)
        if self._mean is None:
            self._fingerprint = fp
        self._add(p)
        return p

    def probs(self) -> torch.Tensor:
        return self._average()

    def reset(self) -> None:
        self._mean, self.n_snapshots, self.n_calls, self._fingerprint = None, 0, 0, None


# ----------------------------------------------------------------------------- metrics
def _check(probs: torch.Tensor, labels: torch.Tensor | None = None):
    probs = torch.as_tensor(probs)
    if probs.dim() != 2:
        raise ValueError(f"expected (N, C) probabilities, got shape {tuple(probs.shape)}")
    if labels is not None:
        labels = torch.as_tensor(labels).reshape(-1).long().to(probs.device)
        if labels.numel() != probs.shape[0]:
            raise ValueError("probabilities and labels differ in length")
    return probs, labels


def accuracy(probs, labels) -> float:
    probs, labels = _check(probs, labels)
    return float((probs.argmax(-1) == labels).double().mean())


def nll(probs, labels, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood -1/N sum log p_i[y_i] (probabilities clamped at eps)."""
    probs, labels = _check(probs, labels)
    return float(-probs.double().gather(1, labels[:, None]).clamp_min(eps).log().mean())


def brier_score(probs, labels) -> float:
    """Mean over samples of sum_c (p_c - 1[y = c])^2 (the multiclass Brier score, in [0, 2])."""
    probs, labels = _check(probs, labels)
    onehot = torch.nn.functional.one_hot(labels, probs.shape[1]).double()
    return float(((probs.double() - onehot) ** 2).sum(1).mean())


def expected_calibration_error(probs, labels, n_bins: int = 15) -> float:
    """Top-label ECE with ``n_bins`` equal-width confidence bins, L1 norm (torchmetrics'
    ``multiclass_calibration_error``): sum_b |B_b|/N |acc(B_b) - conf(B_b)|."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    probs, labels = _check(probs, labels)
    return float(multiclass_calibration_error(probs.double(), labels, num_classes=probs.shape[1],
                                              n_bins=n_bins, norm="l1"))


def predictive_entropy(probs) -> torch.Tensor:
    """H[p] = -sum_c p_c log p_c per row (nats; 0 log 0 = 0)."""
    probs, _ = _check(probs)
    p = probs.double()
    return -(torch.special.xlogy(p, p)).sum(-1)


def classification_metrics(probs, labels, n_bins: int = 15) -> dict:
    return {"accuracy": accuracy(probs, labels), "nll": nll(probs, labels),
            "ece": expected_calibration_error(probs, labels, n_bins), "brier": brier_score(probs, labels)}


def ood_metrics(probs_in, probs_out) -> dict:
    """OOD detection by predictive entropy, OOD = positive class: AUROC
    (sklearn ``roc_auc_score``) and AUPR (``average_precision_score``)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    s_in, s_out = predictive_entropy(probs_in), predictive_entropy(probs_out)
    scores = torch.cat([s_in, s_out]).numpy()
    is_ood = torch.cat([torch.zeros(len(s_in)), torch.ones(len(s_out))]).numpy()
    return {"auroc": float(roc_auc_score(is_ood, scores)), "aupr": float(average_precision_score(is_ood, scores))}
