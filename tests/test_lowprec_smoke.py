"""`python -m fused_flat bench lowprec --quick` runs in seconds, writes its files, and its key
numbers are sane (the master weights walk at the intended variance, round-to-nearest loses
most of it, the bytes per parameter are those the docstrings state)."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not (ROOT / "benchmarks" / "lowprec.py").is_file(),
                                reason="benchmarks/ not in this checkout")


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    import torch

    monkeypatch.setenv("FUSED_FLAT_BENCH_NO_PROGRESS", "1")
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    from fused_flat import cli

    out = tmp_path_factory.mktemp("lowprec")
    assert cli.main(["bench", "lowprec", "--quick", "--out", str(out)]) == 0
    return out, json.loads((out / "lowprec.json").read_text())


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_files(quick):
    out, payload = quick
    for name in ("lowprec.md", "walk.csv", "double_well.csv", "gpt_curves.csv", "gpt_final.csv", "memory.csv"):
        assert (out / name).stat().st_size > 100, name
    pytest.importorskip("matplotlib")
    for png in ("double_well.png", "gpt_loss.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert payload["quick"] and set(payload["parts"]) == {"walk", "double_well", "gpt", "memory"}
    md = (out / "lowprec.md").read_text()
    assert "var / (2 lr K / β)" in md and "W1 to exp(-β u_σ)" in md
    if not payload["sr_kernels"]:
        assert "pending SR kernels" in md


def test_walk_numbers(quick):
    out, payload = quick
    rows = {(r["mode"], r["measured_on"]): r for r in payload["parts"]["walk"]["rows"]}
    assert len(_csv(out / "walk.csv")) == len(rows)
    master, fp32 = rows[("bf16 master", "fp32 master")], rows[("fp32", "weights")]
    for r in (master, fp32):     # n = 2000: s.e. 0.032
        assert abs(r["ratio"] - 1) < 5 * r["ratio_se"] and r["frac_unmoved"] == 0
    # the bf16 copy of the master adds its rounding error (ulp^2 / 12 per weight) at most
    assert abs(rows[("bf16 master", "weights")]["ratio"] - 1) < 0.25
    assert rows[("bf16 nearest", "weights")]["ratio"] < 0.5           # stalls
    assert rows[("SR emulated", "weights")]["ratio"] > 2               # rounding noise >> Langevin noise
    if not payload["sr_kernels"]:   # the default then rounds to nearest, with the same noise
        assert rows[("bf16 default", "weights")]["pending_sr"]
        assert rows[("bf16 default", "weights")]["ratio"] == rows[("bf16 nearest", "weights")]["ratio"]


def test_double_well_numbers(quick):
    _, payload = quick
    dw = payload["parts"]["double_well"]
    info, rows = dw["info"], dw["rows"]
    assert info["beta"] == pytest.approx(info["sigma"] ** (-4 / 1.01))
    assert info["target_right_mass"] == pytest.approx(0.5, abs=1e-4)
    assert 0 < info["sampling_floor_w1"] < info["bf16_lattice_floor_w1"] < info["unsmoothed_vs_smoothed_w1"]
    by = {(r["mode"], r["measured_on"]): r for r in rows}
    for r in rows:
        assert math.isfinite(r["w1"]) and r["w1"] > 0 and 0 <= r["right_mass"] <= 1
    # the masters run the fp32 chain (up to the gradient taken at the bf16 weights)
    assert by[("bf16 master", "fp32 master")]["w1"] == pytest.approx(by[("fp32", "weights")]["w1"], rel=0.1)


def test_gpt_and_memory_numbers(quick):
    out, payload = quick
    finals = payload["parts"]["gpt"]["final"]
    assert [f["mode"] for f in finals] == ["fp32", "bf16 master", "bf16 default", "bf16 nearest"]
    for f in finals:
        assert math.isfinite(f["final_heldout_loss"]) and 0 < f["final_heldout_loss"] < 10
    assert len(_csv(out / "gpt_curves.csv")) == 4 * payload["parts"]["gpt"]["info"]["steps"]
    mem = {r["mode"]: r for r in payload["parts"]["memory"]["rows"]}
    expect = {   # (no momentum, momentum) bytes per parameter held by the optimizer
        "fp32 default": (0, 4), "fp32 exact_restore=True": (4, 8), "bf16 default": (2, 4),
        "bf16 stochastic_rounding=False": (2, 4), "bf16 exact_restore=False": (0, 2),
        "bf16 master_weights=True": (4, 8)}
    for name, (b0, b1) in expect.items():
        assert mem[name]["bytes_per_param_no_momentum"] == b0, name
        assert mem[name]["bytes_per_param_momentum"] == b1, name
