"""`python -m fused_flat science --quick` runs (one seed, a few steps) and writes its files."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not (ROOT / "benchmarks" / "science.py").is_file(),
                                reason="benchmarks/ not in this checkout")
for mod in ("scipy", "sklearn", "torchmetrics", "matplotlib"):
    pytest.importorskip(mod)


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    import torch

    monkeypatch.setenv("FUSED_FLAT_BENCH_NO_PROGRESS", "1")
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_science_quick_writes_json_csv_png(tmp_path, capsys):
    from fused_flat import cli

    assert cli.main(["science", "--quick", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| noise | optimizer |" in printed

    payload = json.loads((tmp_path / "science.json").read_text())
    expected = {"SGD", "SGLD", "FSGLD", "FSGLD-sigma-x0.5", "FSGLD-sigma-x2", "RWP", "SAM"}
    assert set(payload["optimizers"]) == expected
    assert payload["quick"] and payload["seeds"] == [0]
    assert len(payload["runs"]) == 7 * 3 and len(payload["summary"]) == 7 * 3
    cfg = payload["config"]
    assert cfg["coupled_sigma"] == pytest.approx(cfg["beta"] ** (-(1 + cfg["eta"]) / 4))
    for r in payload["runs"]:
        assert 0.0 <= r["test_accuracy"] <= 1.0 and 0.0 <= r["bma_accuracy"] <= 1.0
        assert 0.0 <= r["ood_auroc_bma"] <= 1.0 and r["test_nll"] > 0 and 0 <= r["test_ece"] <= 1
        assert math.isfinite(r["hessian_trace"]) and r["hessian_trace_se"] >= 0
        assert r["top_eigenvalues"] == sorted(r["top_eigenvalues"], reverse=True)
        assert r["lambda_max"] == r["top_eigenvalues"][0] and r["sec_per_epoch"] > 0
        assert r["bma_snapshots"] == 1            # 2 epochs, burn-in 1, one snapshot per epoch

    with open(tmp_path / "science_runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 21 and {r["optimizer"] for r in rows} == expected
    with open(tmp_path / "science_summary.csv") as f:
        assert len(list(csv.DictReader(f))) == 21
    md = (tmp_path / "science.md").read_text()
    assert md.count("\n| ") >= 21
    for png in ("accuracy_vs_noise.png", "flatness.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
