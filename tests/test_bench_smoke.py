"""Smoke tests of the command line and the benchmarks: each runs once on tiny inputs.

No timing assertions: only that the commands run, write their result files, and that the
files parse and name the expected optimizers / backends.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not (ROOT / "benchmarks").is_dir(), reason="benchmarks/ not in this checkout")


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    """No progress bars; one torch thread (on a shared 2-core machine, 2 threads can be 100x
    slower from barrier contention); the thread count is restored afterwards."""
    import torch

    monkeypatch.setenv("FUSED_FLAT_BENCH_NO_PROGRESS", "1")
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _cli(*argv: str) -> int:
    from fused_flat import cli

    return cli.main(list(argv))


def test_info_subprocess_and_json(capsys):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "fused_flat", "info"], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    for word in ("torch", "reference", "cpp", "compiled extension"):
        assert word in r.stdout
    assert _cli("info", "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backends"]["reference"]["ok"] is True
    assert set(info["backends"]) >= {"reference", "cpp", "cuda", "triton"}
    for name, b in info["backends"].items():
        assert b["ok"] or b["reason"], name
    assert info["benchmarks_dir"] is not None


def test_bench_micro_quick(tmp_path):
    from fused_flat import backends

    _cli("bench", "micro", "--quick", "--sizes", "4096", "--dtypes", "float32,bfloat16", "--step-size", "4096",
         "--stream-size", "64K", "--sgd-tensors", "4", "--reps", "1", "--threads", "1", "--host-rounds", "5",
         "--out", str(tmp_path))
    data = json.loads((tmp_path / "micro.json").read_text())
    assert data["meta"]["torch"] and data["meta"]["date"] and data["meta"]["cpu_model"]
    assert data["stream"]["triad_GBps"] > 0
    rows = data["rows"]
    impls = {r["impl"] for r in rows}
    expected = {"reference"} | ({"cpp"} if backends.available_backends()["cpp"] == "ok" else set())
    assert expected <= impls
    assert {"torch.optim.SGD for-loop", "torch.optim.SGD foreach", "torch.optim.SGD fused"} <= impls
    ops = {(r["impl"], r["op"], r["dtype"]) for r in rows if "median_s" in r}
    for b in expected:
        for dt in ("float32", "bfloat16"):
            assert (b, "perturb", dt) in ops and (b, "restore_step", dt) in ops
    if "cpp" in expected:   # check_finite's cost, pass by pass (fp32 cpp), and its reading
        for op in ("all_finite (gradient read)", "checked step, pass 1: restore + check",
                   "checked step, pass 2: update, no restore"):
            assert ("cpp", op, "float32") in ops and ("cpp", op, "bfloat16") not in ops
        assert "- check_finite (cpp, 4K float32): restore + check" in (tmp_path / "micro.md").read_text()
    steps = {r["impl"] for r in rows if r["kind"] == "step" and "median_s" in r}
    assert any(s.startswith("FSGLD fused") for s in steps)
    # host overhead: each case against torch.optim.SGD(fused=True)'s step, with its reading
    host = {r["impl"]: r for r in rows if r["kind"] == "host"}
    assert set(host) == {"SGLD step", "FSGLD perturb + step", "SAM first + second step"}
    for r in host.values():
        assert {"median_us", "sgd_median_us", "x_sgd", "target", "verdict"} <= set(r)
    md = (tmp_path / "micro.md").read_text()
    assert "## Host overhead per step" in md and "- host overhead (500 x 64 fp32" in md
    assert any(s.startswith("fSGLD paper-style") for s in steps)
    assert any(s.startswith("FSGLD reference") for s in steps)
    with open(tmp_path / "micro.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert "STREAM" in (tmp_path / "micro.md").read_text()
    assert (tmp_path / "micro_bandwidth.png").stat().st_size > 0


def test_bench_e2e_quick(tmp_path):
    _cli("bench", "e2e", "--quick", "--models", "gpt", "--steps", "1", "--warmup", "1", "--batches", "1",
         "--threads", "1", "--out", str(tmp_path))
    data = json.loads((tmp_path / "e2e.json").read_text())
    assert data["synthetic_data"] is True
    assert data["meta"]["torch"] and data["meta"]["date"]
    names = {r["optimizer"] for r in data["rows"]}
    assert {"SGD", "SGLD", "FSGLD", "FSGLD-paper", "RWP", "SAM-davda54"} <= names
    try:
        import fused_flat.optim.sam  # noqa: F401
    except ImportError:
        assert any("fused_flat.optim.sam" in n for n in data["notes"])
    for r in data["rows"]:
        assert r["median_s"] > 0 and r["x_sgd"] > 0 and r["state_MiB"] > 0
    with open(tmp_path / "e2e.csv") as f:
        assert {r["optimizer"] for r in csv.DictReader(f)} == names
    assert "Synthetic" in (tmp_path / "e2e.md").read_text()
    assert (tmp_path / "e2e_step_time.png").stat().st_size > 0


def test_bench_stream_and_missing_dir(tmp_path, monkeypatch):
    _cli("bench", "stream", "--size", "64K", "--reps", "2", "--out", str(tmp_path))
    assert json.loads((tmp_path / "stream.json").read_text())["stream"]["copy_GBps"] > 0
    from fused_flat import cli

    monkeypatch.setattr(cli, "benchmarks_dir", lambda: tmp_path / "nowhere")
    with pytest.raises(SystemExit, match="not part of an installed wheel"):
        cli.load_benchmark("micro")


def test_peers_reduce_to_sgd():
    """The speed peers are the algorithms they claim: with no noise / rho = 0 they are SGD."""
    import copy
    import math

    import torch

    from fused_flat import cli

    baselines = cli.load_benchmark("baselines")   # puts the checkout's benchmarks/ on sys.path

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    copies = [copy.deepcopy(model) for _ in range(3)]
    opts = [torch.optim.SGD(copies[0].parameters(), lr=0.1, weight_decay=5e-4),
            baselines.PaperFSGLD(copies[1].parameters(), lr=0.1, beta=math.inf, weight_decay=5e-4),
            baselines.DavdaSAM(copies[2].parameters(), torch.optim.SGD, rho=0.0, lr=0.1, weight_decay=5e-4)]
    for _ in range(3):
        for m, opt in zip(copies, opts):
            def closure(m=m):
                loss = torch.nn.functional.cross_entropy(m(x), y)
                loss.backward()
                return loss
            if isinstance(opt, torch.optim.SGD):
                opt.zero_grad()
                closure()
                opt.step()
            else:
                opt.zero_grad()
                opt.step(closure)
    for m in copies[1:]:
        for a, b in zip(copies[0].parameters(), m.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
