"""Distributed training (issue 10): DDP and FSDP2 give the same run as one process.

Two CPU processes over gloo. Each job spawns 2 ranks once and runs many configurations
(tests/dist_cases.py); the tests compare the ranks with each other (bitwise) and with a
single-process run on the concatenated batch (computed here). A job that does not finish
within its timeout is killed and fails the tests (a deadlock never hangs the suite)."""
from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import time

import pytest
import torch

from tests import dist_cases as dc

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not available")
JOB_TIMEOUT = 60.0
REL_TOL = 1e-6
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(job: str, tmpdir: str, timeout: float = JOB_TIMEOUT, worker=None) -> list[dict]:
    """Run ``worker(rank, job, store, tmpdir)`` (default dist_cases.worker) on 2 spawned
    processes with a FileStore; kill them and fail after ``timeout`` seconds; return each
    rank's results."""
    ctx = mp.get_context("spawn")
    store = os.path.join(tmpdir, "store")
    procs = [ctx.Process(target=worker or dc.worker, args=(r, job, store, tmpdir), daemon=True)
             for r in range(dc.WORLD)]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(max(0.0, timeout - (time.monotonic() - t0)))
        alive = [p for p in procs if p.is_alive()]
        if alive:
            pytest.fail(f"distributed job {job!r} did not finish in {timeout:.0f} s (deadlock?)")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    codes = [p.exitcode for p in procs]
    if any(c != 0 for c in codes):
        pytest.fail(f"distributed job {job!r} failed: exit codes {codes} (worker tracebacks on stderr)")
    return [torch.load(os.path.join(tmpdir, f"rank{r}.pt"), weights_only=False) for r in range(dc.WORLD)]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    return launch("ddp", str(tmp_path_factory.mktemp("ddp")))


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    return launch("fsdp2", str(tmp_path_factory.mktemp("fsdp2")))


_refs: dict = {}


def ref(name: str, **kw):
    key = (name, tuple(sorted(kw.items())))
    if key not in _refs:
        _refs[key] = dc.reference(name, **kw)
    return _refs[key]


def assert_ranks_identical(per_rank: list[list[torch.Tensor]]):
    for r in range(1, len(per_rank)):
        for a, b in zip(per_rank[0], per_rank[r]):
            assert torch.equal(a, b), f"rank {r} differs from rank 0 by {(a - b).abs().max():.3g}"


def assert_matches(got: list[torch.Tensor], want: list[torch.Tensor], tol: float = REL_TOL):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape
        err = dc.rel_err(a, b)
        assert err <= tol, f"parameter {i}: relative error {err:.3g} > {tol}"


def params(results, key):
    return [r[key]["params"] for r in results]


# --------------------------------------------------------------------------- DDP
@pytest.mark.parametrize("opt_name", dc.COMPARED)
@pytest.mark.parametrize("cfg", list(dc.DDP_CONFIGS))
def test_ddp_matches_single_process(ddp_results, cfg, opt_name):
    per_rank = params(ddp_results, f"{cfg}/{opt_name}")
    assert_ranks_identical(per_rank)
    assert_matches(per_rank[0], ref(opt_name))
    # the parameters moved (the comparison is not trivially between initial values)
    assert dc.rel_err(per_rank[0][0], dc.mlp().state_dict()["0.weight"]) > 1e-3


def test_ddp_gradient_as_bucket_view_no_warnings(ddp_results):
    for opt_name in dc.COMPARED:
        for r in ddp_results:
            assert r[f"bucket_view/{opt_name}"]["warnings"] == []
            assert r[f"bucket_view/{opt_name}"]["no_copy"]


@pytest.mark.parametrize("opt_name", [o for o in dc.ALL_OPTS if o not in dc.COMPARED])
def test_ddp_every_optimizer_keeps_replicas_identical(ddp_results, opt_name):
    per_rank = params(ddp_results, f"after/{opt_name}")
    assert_ranks_identical(per_rank)
    if opt_name in ("sgld", "asam"):   # defined by the global gradient: the one-process run
        assert_matches(per_rank[0], ref(opt_name))


@pytest.mark.parametrize("opt_name", ["fsgld", "sam"])
def test_ddp_branch_unused_on_one_rank_keeps_replicas_identical(ddp_results, opt_name):
    assert_ranks_identical(params(ddp_results, f"unused_branch/{opt_name}"))


def test_ddp_local_first_gradient_is_msam(ddp_results):
    """SAM with the first backward under no_sync (g1 from the rank's own batch, no
    all-reduce) is m-SAM with m = the per-rank batch."""
    per_rank = params(ddp_results, "local_sam/sam")
    assert_ranks_identical(per_rank)
    assert_matches(per_rank[0], ref("sam", msam_micro=dc.BATCH // dc.WORLD))
    # and it is not SAM on the global gradient
    assert dc.rel_err(per_rank[0][0], ref("sam")[0]) > 1e-5


def test_seed_is_rank0s_everywhere(ddp_results):
    r0, r1 = ddp_results
    assert r0["seeds"]["seeds"] == r1["seeds"]["seeds"] == [100, 200]
    assert r0["seeds"]["warnings"] == []
    assert len(r1["seeds"]["warnings"]) == 2


# --------------------------------------------------------------------------- FSDP2
@pytest.mark.parametrize("opt_name", dc.COMPARED + ("asam", "sgld"))
def test_fsdp2_uneven_shards_match_single_process(fsdp_results, opt_name):
    key = f"fsdp2/{opt_name}"
    # uneven: 7 rows of Linear(6, 7) are split 4 + 3
    assert [r[key]["local"][0] for r in fsdp_results] == [24, 18]
    per_rank = params(fsdp_results, key)
    assert_ranks_identical(per_rank)
    assert_matches(per_rank[0], ref(opt_name))


@pytest.mark.parametrize("opt_name", ["msam", "rwsam"])
def test_fsdp2_msam_rwsam_match_ddp(fsdp_results, ddp_results, opt_name):
    """MSAM / RWSAM: per-rank micro-batches and sample weights, so no one-process
    reference; the full parameters agree on every rank and with the DDP run."""
    per_rank = params(fsdp_results, f"fsdp2/{opt_name}")
    assert_ranks_identical(per_rank)
    assert_matches(per_rank[0], params(ddp_results, f"after/{opt_name}")[0])


@pytest.mark.parametrize("opt_name", ["fsgld", "sam"])
def test_fsdp2_empty_shard(fsdp_results, opt_name):
    key = f"fsdp2_empty/{opt_name}"
    assert [r[key]["local"][2:] for r in fsdp_results] == [[7, 1], [0, 0]]
    per_rank = params(fsdp_results, key)
    assert_ranks_identical(per_rank)
    assert_matches(per_rank[0], ref(opt_name, out=1))


def test_dcp_state_dict_helpers_raise_a_clear_error(fsdp_results):
    for r in fsdp_results:
        for name, got in r["get_state_dict"].items():
            assert got is not None, name
            msg, k = got
            assert "fused_flat.distributed.save_checkpoint" in msg and k == 0


@pytest.mark.parametrize("opt_name", ["fsgld", "sam"])
def test_fsdp2_dcp_checkpoint_resumes_bit_exactly(fsdp_results, opt_name):
    for r in fsdp_results:
        res = r[f"ckpt/{opt_name}"]
        assert res["k"] == 10
        assert all(t == "DTensor" for t in res["mom_types"])
        for a, b in zip(res["straight"], res["resumed"]):
            assert torch.equal(a, b), f"resumed differs by {(a - b).abs().max():.3g}"


def test_fsdp2_state_dict_with_dtensor_momentum(fsdp_results):
    for r in fsdp_results:
        res = r["state_dict/fsgld"]
        for a, b in zip(res["a"], res["b"]):
            assert torch.equal(a, b)


def test_fsdp2_nonfinite_shard_skips_on_every_rank(fsdp_results):
    for r in fsdp_results:
        res = r["nan_skip/fsgld"]
        assert res["skipped"] == 1
        for a, b in zip(res["before"], res["after"]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)   # restored (regenerated eps)
    assert_ranks_identical([r["nan_skip/fsgld"]["after"] for r in fsdp_results])


# --------------------------------------------------------------------------- the example
def run_torchrun(args: list[str], timeout: float = JOB_TIMEOUT) -> str:
    """``torchrun --standalone --nproc-per-node 2 -m fused_flat.examples.train_distributed``
    (a free port), killed with its workers after ``timeout`` seconds."""
    import signal

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(dc.WORLD), "-m", "fused_flat.examples.train_distributed", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout:.0f} s:\n{out[-3000:]}")
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}:\n{out[-3000:]}"
    return out


def _checksum(out: str) -> float:
    line = [ln for ln in out.splitlines() if ln.startswith("done:")][-1]
    return float(line.split("parameter checksum ")[1].split(";")[0])


def test_example_runs_under_torchrun(capsys):
    out = run_torchrun(["--strategy", "fsdp2", "--optimizer", "fsgld", "--steps", "6",
                        "--log-every", "3", "--cpu"])
    assert "fsdp2 on 2 process(es), gloo" in out
    assert "replicas identical: True" in out
    from fused_flat.examples import train_distributed

    assert train_distributed.main(["--optimizer", "fsgld", "--steps", "6", "--cpu"]) == 0
    single = _checksum(capsys.readouterr().out)
    assert abs(_checksum(out) - single) <= 1e-6 * abs(single)
