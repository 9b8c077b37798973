"""fused_flat.diagnostics against references: known Hessians, dense autograd Hessians, and
hand-made predictions with hand-computed metrics."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fused_flat import diagnostics as D

pytest.importorskip("scipy")
pytest.importorskip("sklearn")
pytest.importorskip("torchmetrics")


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- quadratic
class Quadratic(nn.Module):
    """loss(theta) = 0.5 theta^T A theta + b^T theta: Hessian A, whatever the batch."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.theta = nn.Parameter(torch.randn(a.shape[0], dtype=torch.float64))
        self.register_buffer("a", a)

    def forward(self, x):
        return self.theta

    def loss(self, out, y):
        return 0.5 * out @ (self.a @ out) + out.sum()


def _spd(d: int, eigs: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return (q * eigs) @ q.T


def _quadratic(d=40, seed=1):
    eigs = torch.cat([torch.tensor([50.0, 30.0, 20.0, 12.0, 9.0], dtype=torch.float64),
                      torch.linspace(-1.0, 4.0, d - 5, dtype=torch.float64)])
    a = _spd(d, eigs, seed)
    m = Quadratic(a)
    data = (torch.zeros(3, 1), torch.zeros(3))
    return m, data, a, eigs


def test_hvp_quadratic_is_exact():
    m, data, a, _ = _quadratic()
    v = torch.randn(a.shape[0], dtype=torch.float64)
    hv = D.hessian_vector_product(m, m.loss, data, v)
    torch.testing.assert_close(hv, a @ v, rtol=1e-12, atol=1e-12)
    op = D.HessianOperator(m, m.loss, data)
    torch.testing.assert_close(op.dense(), a, rtol=1e-12, atol=1e-12)


def test_trace_quadratic_within_three_standard_errors():
    m, data, a, eigs = _quadratic()
    tr = D.hessian_trace(m, m.loss, data, n_probes=200, seed=3)
    truth = float(eigs.sum())
    # Rademacher: Var(v^T A v) = 2 sum_{i != j} A_ij^2; the sample SE estimates its sqrt / sqrt(m)
    se_true = math.sqrt(2 * float((a ** 2).sum() - (a.diag() ** 2).sum()) / 200)
    assert tr.stderr == pytest.approx(se_true, rel=0.25)
    assert abs(tr.estimate - truth) < 3 * tr.stderr, (tr.estimate, truth, tr.stderr)
    est, se = tr                                    # unpacks as (estimate, stderr)
    assert (est, se) == (tr.estimate, tr.stderr) and len(tr.samples) == 200
    # same seed -> same probes -> same estimate
    assert D.hessian_trace(m, m.loss, data, n_probes=200, seed=3).estimate == tr.estimate


def test_trace_of_diagonal_hessian_is_exact():
    # Rademacher probes have v_i^2 = 1, so v^T A v = tr A exactly when A is diagonal: SE 0
    d = torch.linspace(0.5, 7.0, 30, dtype=torch.float64)
    m = Quadratic(torch.diag(d))
    tr = D.hessian_trace(m, m.loss, (torch.zeros(1), torch.zeros(1)), n_probes=10)
    assert tr.estimate == pytest.approx(float(d.sum()), rel=1e-12) and tr.stderr < 1e-10


def test_eigenvalues_quadratic_top_k():
    m, data, a, eigs = _quadratic()
    top = D.hessian_eigenvalues(m, m.loss, data, k=8, tol=1e-3, maxiter=500)
    ref = torch.sort(eigs, descending=True).values[:8]
    assert torch.all(top[:-1] >= top[1:])           # sorted descending
    torch.testing.assert_close(top, ref, rtol=1e-4, atol=0)
    lam = D.hessian_lambda_max(m, m.loss, data, iters=500, tol=1e-12)
    assert lam == pytest.approx(50.0, rel=1e-4)
    with pytest.raises(ValueError):
        D.hessian_eigenvalues(m, m.loss, data, k=a.shape[0])


# ----------------------------------------------------------------------------- small MLP vs dense
def _mlp_problem(bn: bool = False):
    torch.manual_seed(0)
    layers = [nn.Linear(4, 6)] + ([nn.BatchNorm1d(6)] if bn else []) + [nn.Tanh(), nn.Linear(6, 3)]
    model = nn.Sequential(*layers).double()
    x = torch.randn(23, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (23,))
    return model, x, y


def _dense_hessian(model, x, y, train: bool):
    """torch.autograd.functional.hessian of the full-data mean loss over the flat parameters."""
    names = [n for n, p in model.named_parameters()]
    params = [p.detach().clone() for p in model.parameters()]
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    def f(flat):
        ps = {n: t.view(s) for n, t, s in zip(names, flat.split(sizes), shapes)}
        out = torch.func.functional_call(model, {**ps, **buffers}, (x,))
        return F.cross_entropy(out, y)

    model.train(train)
    h = torch.autograd.functional.hessian(f, torch.cat([p.reshape(-1) for p in params]))
    model.eval()
    return h


def test_mlp_matches_dense_hessian_across_batches():
    model, x, y = _mlp_problem()
    h_ref = _dense_hessian(model, x, y, train=False)
    # uneven batches (10, 10, 3): the batch-size-weighted mean is the full-data Hessian
    loader = [(x[i:i + 10], y[i:i + 10]) for i in range(0, 23, 10)]
    op = D.HessianOperator(model, F.cross_entropy, loader)
    h = op.dense()
    torch.testing.assert_close(h, h_ref, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(h, h.T, rtol=1e-9, atol=1e-11)
    ref_eigs = torch.linalg.eigvalsh(h_ref).flip(0)
    top = D.hessian_eigenvalues(op, k=5, tol=0)
    torch.testing.assert_close(top, ref_eigs[:5], rtol=1e-6, atol=1e-9)
    # the trace estimate is unbiased: within 4 of its standard errors of the dense trace
    tr = D.hessian_trace(op, n_probes=400, seed=0)
    assert abs(tr.estimate - float(h_ref.trace())) < 4 * tr.stderr
    # cached graph gives the same products
    cached = D.HessianOperator(model, F.cross_entropy, (x, y), cache_graph=True)
    v = torch.randn(cached.dim, dtype=torch.float64)
    torch.testing.assert_close(cached.matvec(v), h_ref @ v, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(cached.matvec(2 * v), h_ref @ (2 * v), rtol=1e-9, atol=1e-11)


def test_batchnorm_train_mode_and_modes_restored():
    model, x, y = _mlp_problem(bn=True)
    model.train()
    bn = model[1]
    bn.running_mean.fill_(0.3)
    before = {n: b.clone() for n, b in model.named_buffers()}
    h_ref_train = _dense_hessian(model, x, y, train=True)
    h_ref_eval = _dense_hessian(model, x, y, train=False)
    model.train()
    op_train = D.HessianOperator(model, F.cross_entropy, (x, y), train_mode=True)
    torch.testing.assert_close(op_train.dense(), h_ref_train, rtol=1e-9, atol=1e-11)
    op_eval = D.HessianOperator(model, F.cross_entropy, (x, y))
    torch.testing.assert_close(op_eval.dense(), h_ref_eval, rtol=1e-9, atol=1e-11)
    assert model.training and bn.training                       # mode restored
    for n, b in model.named_buffers():                          # running stats untouched
        assert torch.equal(b, before[n]), n


# ----------------------------------------------------------------------------- metrics
# Hand-made predictions: 6 samples, 3 classes.
P = torch.tensor([[0.90, 0.05, 0.05],    # y 0, correct, conf .90
                  [0.10, 0.80, 0.10],    # y 1, correct, conf .80
                  [0.20, 0.70, 0.10],    # y 0, wrong,   conf .70
                  [0.30, 0.30, 0.40],    # y 2, correct, conf .40
                  [0.55, 0.25, 0.20],    # y 1, wrong,   conf .55
                  [0.02, 0.03, 0.95]],   # y 2, correct, conf .95
                 dtype=torch.float64)
Y = torch.tensor([0, 1, 0, 2, 1, 2])


def test_nll_brier_accuracy_by_hand():
    p_true = [0.90, 0.80, 0.20, 0.40, 0.25, 0.95]
    assert D.nll(P, Y) == pytest.approx(-sum(math.log(p) for p in p_true) / 6, rel=1e-12)
    brier = sum((P[i] ** 2).sum().item() - 2 * p_true[i] + 1 for i in range(6)) / 6
    assert D.brier_score(P, Y) == pytest.approx(brier, rel=1e-12)
    assert D.accuracy(P, Y) == pytest.approx(4 / 6)


def test_ece_by_hand():
    # 15 equal-width bins of width 1/15: conf .40 -> bin 6, .55 -> bin 8, .70 -> bin 10,
    # .80 -> bin 12, .90 -> bin 13, .95 -> bin 14; every sample alone in its bin, so
    # ECE = 1/6 sum_i |1[correct_i] - conf_i|.
    ece = (abs(1 - .90) + abs(1 - .80) + abs(0 - .70) + abs(1 - .40) + abs(0 - .55) + abs(1 - .95)) / 6
    assert D.expected_calibration_error(P, Y) == pytest.approx(ece, abs=1e-6)   # torchmetrics bins in float32
    # 2 bins: [0, .5] holds conf .40 (correct); (.5, 1] the other five (3 correct, mean conf .78)
    ece2 = 1 / 6 * abs(1 - .40) + 5 / 6 * abs(3 / 5 - (.90 + .80 + .70 + .55 + .95) / 5)
    assert D.expected_calibration_error(P, Y, n_bins=2) == pytest.approx(ece2, abs=1e-6)


def test_ece_matches_direct_binning_on_random_predictions():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(3 * torch.randn(2000, 10, generator=g, dtype=torch.float64), -1)
    y = torch.randint(0, 10, (2000,), generator=g)
    conf, pred = p.max(-1)
    correct = (pred == y).double()
    edges = torch.linspace(0, 1, 16, dtype=torch.float64)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.double().mean() * abs(correct[m].mean() - conf[m].mean())
    assert D.expected_calibration_error(p, y) == pytest.approx(float(ece), abs=1e-6)


def test_ood_auroc_aupr_by_hand():
    # entropies: in-distribution low, OOD high, with one inversion
    p_in = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.6, 0.4]], dtype=torch.float64)
    p_out = torch.tensor([[0.5, 0.5], [0.7, 0.3]], dtype=torch.float64)
    h = D.predictive_entropy(torch.cat([p_in, p_out]))
    assert h[0] == 0.0 and h[3] == pytest.approx(math.log(2))
    # scores: in {0, H(.9), H(.6)}, out {H(.5), H(.7)}; H(.6) > H(.7): pairs (out > in) = 5 of 6
    r = D.ood_metrics(p_in, p_out)
    assert r["auroc"] == pytest.approx(5 / 6)
    # ranking by score: out(.5), in(.6), out(.7), in, in -> AP = (1/1 + 2/3) / 2
    assert r["aupr"] == pytest.approx((1 + 2 / 3) / 2)


# ----------------------------------------------------------------------------- BMA
def test_snapshot_averager_equals_mean_of_stored_predictions():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 4))
    x = torch.randn(37, 5)
    loader = [(x[:20], None), (x[20:], None)]
    bma = D.SnapshotAverager(model, loader, burn_in=3, every=2)
    stored = []
    model.train()
    for call in range(1, 12):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))
        collected = bma.step()
        assert collected == (call > 3 and (call - 4) % 2 == 0)
        if collected:
            with torch.no_grad():
                model.eval()
                stored.append(torch.softmax(model(x).double(), -1))
                model.train()
        assert model.training                     # eval mode only during collection
    assert bma.n_snapshots == len(stored) == 4    # calls 4, 6, 8, 10
    torch.testing.assert_close(bma.probs(), torch.stack(stored).mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bma.probs().sum(-1), torch.ones(37, dtype=torch.float64))
    one = D.SnapshotAverager(model, x)
    with pytest.raises(RuntimeError):
        one.probs()
    first = one.collect()
    torch.testing.assert_close(one.probs(), first)


# ----------------------------------------------------------------------------- BMA: example order
def _perfect_classifier(n=40, d=6, c=4):
    """A model and (x, y) with y = the model's own argmax: accuracy 1 when rows line up."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, c))
    x = torch.randn(n, d)
    with torch.no_grad():
        y = model(x).argmax(-1)
    assert len(set(y.tolist())) > 1                 # several classes: a shuffle changes labels
    return model, x, y


def _loaders_that_may_shuffle(ds):
    from torch.utils.data import (BatchSampler, DataLoader, DistributedSampler, RandomSampler,
                                  SubsetRandomSampler, WeightedRandomSampler)
    n = len(ds)
    return {
        "shuffle=True": DataLoader(ds, batch_size=8, shuffle=True),
        "WeightedRandomSampler": DataLoader(ds, batch_size=8, sampler=WeightedRandomSampler([1.0] * n, n)),
        "SubsetRandomSampler": DataLoader(ds, batch_size=8, sampler=SubsetRandomSampler(range(n))),
        "DistributedSampler(shuffle=True)": DataLoader(
            ds, batch_size=8, sampler=DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True)),
        "BatchSampler(RandomSampler)": DataLoader(
            ds, batch_sampler=BatchSampler(RandomSampler(ds), 8, drop_last=False)),
        "batch_size=None, RandomSampler": DataLoader(ds, batch_size=None, sampler=RandomSampler(ds)),
    }


def test_shuffled_loader_is_refused_not_a_wrong_accuracy():
    from torch.utils.data import TensorDataset
    model, x, y = _perfect_classifier()
    ds = TensorDataset(x, y)
    for name, loader in _loaders_that_may_shuffle(ds).items():
        with pytest.raises(ValueError, match="shuffle=False"):
            D.predict_proba(model, loader)
        with pytest.raises(ValueError, match="shuffle=False"):
            D.SnapshotAverager(model, loader)


def test_fixed_order_loaders_give_the_right_predictions():
    from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, SequentialSampler, TensorDataset
    model, x, y = _perfect_classifier()
    ds = TensorDataset(x, y)
    with torch.no_grad():
        want = torch.softmax(model(x).double(), -1)
    for loader in (DataLoader(ds, batch_size=8),
                   DataLoader(ds, batch_size=8, sampler=DistributedSampler(ds, num_replicas=1, rank=0,
                                                                            shuffle=False)),
                   DataLoader(ds, batch_sampler=BatchSampler(SequentialSampler(ds), 7, drop_last=False)),
                   DataLoader(ds, batch_size=8, sampler=list(range(len(ds))))):
        p = D.predict_proba(model, loader)
        torch.testing.assert_close(p, want, rtol=1e-6, atol=1e-9)
        assert D.accuracy(p, y) == 1.0


def test_snapshot_averager_plain_loader_is_mean_of_softmaxes():
    from torch.utils.data import DataLoader, TensorDataset
    model, x, y = _perfect_classifier()
    loader = DataLoader(TensorDataset(x, y), batch_size=7, shuffle=False)
    bma = D.SnapshotAverager(model, loader)
    gen = torch.Generator().manual_seed(3)
    stored = []
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
            stored.append(torch.softmax(model(x).double(), -1))
        bma.collect()
    assert bma.n_snapshots == 3
    torch.testing.assert_close(bma.probs(), sum(stored) / 3, rtol=1e-6, atol=1e-9)


class _ReorderingEachPass:
    """A generic iterable (not a DataLoader) that visits the examples in a new order each pass."""

    def __init__(self, x, y=None, batch=8):
        self.x, self.y, self.batch, self.passes = x, y, batch, 0

    def __iter__(self):
        g = torch.Generator().manual_seed(self.passes)
        self.passes += 1
        idx = torch.randperm(len(self.x), generator=g)
        for i in range(0, len(idx), self.batch):
            j = idx[i:i + self.batch]
            yield self.x[j] if self.y is None else (self.x[j], self.y[j])


@pytest.mark.parametrize("labeled", [True, False])
def test_snapshot_averager_refuses_an_iterable_that_reorders(labeled):
    model, x, y = _perfect_classifier()
    data = _ReorderingEachPass(x, y if labeled else None)
    bma = D.SnapshotAverager(model, data)
    first = bma.collect()
    with pytest.raises(ValueError, match="labels differ" if labeled else "inputs differ"):
        bma.collect()
    assert bma.n_snapshots == 1                     # the failed collection changed nothing
    torch.testing.assert_close(bma.probs(), first, rtol=0, atol=0)


def test_snapshot_averager_checks_row_count_and_allows_labeled_augmentation():
    model, x, y = _perfect_classifier()

    class Shrinking:                                # one example fewer at each pass
        def __init__(self):
            self.n = len(x)

        def __iter__(self):
            self.n -= 1
            yield x[:self.n], y[:self.n]

    bma = D.SnapshotAverager(model, Shrinking())
    bma.collect()
    with pytest.raises(ValueError, match="shape"):
        bma.collect()

    class Augmented:                                # same labels, fresh input noise each pass
        def __iter__(self):
            yield x + 1e-3 * torch.randn_like(x), y

    bma = D.SnapshotAverager(model, Augmented())
    bma.collect()
    bma.collect()                                   # labels are compared, not inputs
    assert bma.n_snapshots == 2

    class AugmentedUnlabeled:                       # no labels: the inputs are compared
        def __iter__(self):
            yield x + 1e-3 * torch.randn_like(x)

    bma = D.SnapshotAverager(model, AugmentedUnlabeled())
    bma.collect()
    with pytest.raises(ValueError, match="yield \\(x, y\\) batches"):
        bma.collect()


def test_snapshot_averager_one_shot_iterator_and_empty_data():
    model, x, y = _perfect_classifier()
    bma = D.SnapshotAverager(model, ((x[i:i + 8], y[i:i + 8]) for i in range(0, len(x), 8)))
    bma.collect()
    bma.collect()                                   # the generator was read into a list once
    with torch.no_grad():
        torch.testing.assert_close(bma.probs(), torch.softmax(model(x).double(), -1), rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="no batch"):
        D.predict_proba(model, [])
