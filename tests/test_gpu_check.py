"""`make gpu-check` without a GPU: it runs with a Python that already has torch (GPU_PY=...,
PY=..., .venv/bin/python with torch, else python3 on PATH), never creates a venv nor installs
anything, prints one line and exits 0; its --dry-run plan builds for the GPU's architecture
only with every core; stages are stopped at their time budget and the report says so.

The interpreters here are throwaway venvs (no pip) that see .venv's torch through a .pth file
(the trick of tests/wheel_check.py). Traps: `pip`, `pip3`, `uv`, `virtualenv` on PATH and the
modules `pip`, `venv`, `ensurepip` first on PYTHONPATH, so that `python -m venv` or
`python -m pip` by any interpreter it starts is recorded (and fails) instead of running.
"""
import json
import os
import shutil
import signal
import site
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import gpu_check  # noqa: E402

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU this runs the whole report")
T = 180  # seconds per subprocess (each imports torch, on a shared 2-core machine)

TRAP_MOD = """import os, sys
with open({log!r}, "a") as f:
    f.write("python -m {name} " + " ".join(sys.argv[1:]) + "\\n")
raise SystemExit(97)
"""
TRAP_BIN = """#!/bin/sh
echo "$(basename "$0") $*" >> {log}
exit 97
"""


def _venv(path, with_torch):
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True,
                   timeout=T)
    if with_torch:
        purelib = subprocess.run([str(path / "bin" / "python"), "-c",
                                  "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                 check=True, capture_output=True, text=True, timeout=T).stdout.strip()
        with open(os.path.join(purelib, "fused_flat_test_torch.pth"), "w") as f:
            f.write("\n".join(site.getsitepackages()) + "\n")
    return path / "bin" / "python"


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """Throwaway interpreters, traps, and scratch checkouts (Makefile, gpu_check.py, pyproject)."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    ns = type("W", (), {})()
    ns.tmp = tmp
    ns.trap_log = tmp / "trap.log"
    ns.py = _venv(tmp / "torchvenv", with_torch=True)       # a Python other than .venv, with torch
    ns.bare = _venv(tmp / "bare", with_torch=False)          # a Python without torch
    mods = tmp / "trapmods"
    for name in ("pip", "venv", "ensurepip"):
        (mods / name).mkdir(parents=True)
        (mods / name / "__init__.py").write_text(TRAP_MOD.format(log=str(ns.trap_log), name=name))
        (mods / name / "__main__.py").write_text("")
    ns.trapmods = mods
    ns.bin = tmp / "trapbin"
    ns.bin.mkdir()
    for name in ("pip", "pip3", "uv", "virtualenv"):
        (ns.bin / name).write_text(TRAP_BIN.format(log=ns.trap_log))
        (ns.bin / name).chmod(0o755)
    # PATH: python3 = the throwaway torch venv, then the traps, then make, sh and the toolchain
    ns.path = os.pathsep.join([str(ns.py.parent), str(ns.bin), os.environ.get("PATH", "/usr/bin:/bin")])

    def checkout(name, dot_venv):
        d = tmp / name
        (d / "benchmarks").mkdir(parents=True)
        shutil.copy(os.path.join(ROOT, "Makefile"), d)
        shutil.copy(os.path.join(ROOT, "pyproject.toml"), d)
        shutil.copy(os.path.join(ROOT, "benchmarks", "gpu_check.py"), d / "benchmarks")
        if dot_venv is not None:
            _venv(d / ".venv", with_torch=dot_venv)
        return d

    ns.co_venv = checkout("co_venv", True)          # .venv with torch
    ns.co_bare_venv = checkout("co_bare_venv", False)   # .venv without torch
    ns.co_none = checkout("co_none", None)           # no .venv at all
    return ns


def make(w, cwd, *args, env_extra=None, pythonpath=None):
    env = {k: v for k, v in os.environ.items()
           if k not in ("PY", "GPU_PY", "VPY", "GPU_CHECK_ARGS", "TORCH_CUDA_ARCH_LIST", "MAKEFLAGS",
                        "MFLAGS", "MAKELEVEL")}
    env["PATH"] = w.path
    env["PYTHONPATH"] = os.pathsep.join([*(pythonpath or []), str(w.trapmods)])
    env.update(env_extra or {})
    if w.trap_log.exists():
        w.trap_log.unlink()
    proc = subprocess.run(["make", "--no-print-directory", "-C", str(cwd), "gpu-check", *args],
                          env=env, capture_output=True, text=True, timeout=T)
    trapped = w.trap_log.read_text() if w.trap_log.exists() else ""
    assert not trapped, f"gpu-check tried to install or make a venv:\n{trapped}"
    return proc


def plan_of(proc):
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("gpu-check plan (dry run"), proc.stdout
    kv = dict(ln.split(": ", 1) for ln in lines[1:] if ": " in ln and not ln.startswith("stage "))
    stages = {}
    for ln in lines:
        if ln.startswith("stage "):
            name, rest = ln[len("stage "):].split(": ", 1)
            stages[name] = rest
    return kv, stages


DRY = "GPU_CHECK_ARGS=--dry-run --assume-capability 9.0"


# ----------------------------------------------------------------------------- interpreter
@NO_GPU
def test_make_gpu_check_other_python_no_gpu_one_line(w):
    proc = make(w, ROOT, f"GPU_PY={w.py}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == [gpu_check.NO_GPU_LINE], proc.stdout + proc.stderr


def test_dry_run_plan_for_capability_9_0(w):
    # the Makefile exports TORCH_CUDA_ARCH_LIST=8.0;9.0+PTX and the environment may carry
    # MAX_JOBS: neither changes the plan, built for the GPU only with every core
    proc = make(w, ROOT, f"GPU_PY={w.py}", DRY, env_extra={"MAX_JOBS": "1"})
    kv, stages = plan_of(proc)
    assert kv["interpreter"] == str(w.py)
    assert kv["torch"] == torch.__version__
    assert kv["TORCH_CUDA_ARCH_LIST"] == "9.0"
    assert kv["MAX_JOBS"] == str(os.cpu_count())
    assert list(stages) == ["build", "tests", "micro", "e2e", "micro-small"]
    build = stages["build"]
    assert "TORCH_CUDA_ARCH_LIST=9.0 " in build and f"MAX_JOBS={os.cpu_count()} " in build
    assert "FORCE_CUDA=1" in build and build.endswith(f"{w.py} setup.py -q build_ext --inplace")
    assert " -m pytest -x " in stages["tests"] and "tests/test_cuda_gpu.py" in stages["tests"]
    budgets = [int(s.split("budget ", 1)[1].split(" s", 1)[0]) for s in stages.values()]
    assert all(b >= gpu_check.MIN_STAGE_S for b in budgets), budgets
    total = int(kv["total budget"].split()[0])
    assert sum(budgets) == total <= 570   # 10 minutes per command, with room to start and report
    for cmd in stages.values():          # every stage runs with the chosen interpreter
        assert str(w.py) in cmd and " pip " not in cmd and "-m venv" not in cmd


def test_dry_run_other_capability_and_explicit_arch_list(w):
    kv, _ = plan_of(make(w, ROOT, f"GPU_PY={w.py}",
                         "GPU_CHECK_ARGS=--dry-run --assume-capability 8.6 --budget 300"))
    assert kv["TORCH_CUDA_ARCH_LIST"] == "8.6" and kv["total budget"] == "300 s"
    kv, stages = plan_of(make(w, ROOT, f"GPU_PY={w.py}", DRY, "TORCH_CUDA_ARCH_LIST=9.0a"))
    assert kv["TORCH_CUDA_ARCH_LIST"] == "9.0a" and "TORCH_CUDA_ARCH_LIST=9.0a " in stages["build"]


def test_py_on_the_command_line_is_used(w):
    kv, _ = plan_of(make(w, w.co_venv, f"PY={w.py}", DRY))
    assert kv["interpreter"] == str(w.py)


def test_dot_venv_with_torch_is_chosen(w):
    kv, _ = plan_of(make(w, w.co_venv, DRY))
    assert kv["interpreter"] == str(w.co_venv / ".venv" / "bin" / "python")


def test_dot_venv_without_torch_falls_back_to_python3(w):
    kv, _ = plan_of(make(w, w.co_bare_venv, DRY))
    assert kv["interpreter"] == str(w.py.parent / "python3")


@NO_GPU
def test_fresh_checkout_without_venv_one_line_and_no_venv_made(w):
    # the old target depended on `venv` (python3 -m venv .venv + pip install torch==2.14.1)
    dry = make(w, w.co_none, "-n")
    assert "-m venv" not in dry.stdout and "pip install" not in dry.stdout, dry.stdout
    proc = make(w, w.co_none)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == [gpu_check.NO_GPU_LINE], proc.stdout + proc.stderr
    assert not (w.co_none / ".venv").exists()


def test_python_without_torch_is_refused(w):
    proc = make(w, ROOT, f"GPU_PY={w.bare}")
    assert proc.returncode != 0
    assert f"{w.bare} " in proc.stderr and "cannot import torch" in proc.stderr, proc.stderr
    assert "torch>=2.6,<2.15" in proc.stderr and "GPU_PY=" in proc.stderr


@pytest.mark.parametrize("version", ["2.5.1", "2.15.0", "3.0.0"])
def test_torch_out_of_range_is_refused(w, version):
    fake = w.tmp / f"faketorch-{version}"
    (fake / "torch").mkdir(parents=True, exist_ok=True)
    (fake / "torch" / "__init__.py").write_text(f"__version__ = {version!r}\n")
    proc = make(w, ROOT, f"GPU_PY={w.py}", pythonpath=[str(fake)])
    assert proc.returncode != 0
    assert f"torch {version}, outside the supported torch>=2.6,<2.15" in proc.stderr, proc.stderr


def test_version_range():
    lo, hi = gpu_check.supported_torch_range()
    assert (lo, hi) == ("2.6", "2.15")   # pyproject.toml: torch>=2.6,<2.15
    ok = ["2.6.0", "2.11.0+cu130", "2.14.1", "2.14.0a0+git1234", "2.10"]
    bad = ["2.5.1", "2.15.0", "2.15.0a0", "3.0", "1.13.1", "nonsense"]
    assert [gpu_check.torch_version_ok(v, lo, hi) for v in ok] == [True] * len(ok)
    assert [gpu_check.torch_version_ok(v, lo, hi) for v in bad] == [False] * len(bad)


# ----------------------------------------------------------------------------- budgets, report
def _alive(pid):
    """Running (a zombie waiting for init to reap it counts as gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return "State:\tZ" not in f.read()
    except FileNotFoundError:
        return False


def test_stage_cut_at_budget_stops_its_children(tmp_path):
    code = ("import subprocess, sys, time; p = subprocess.Popen(['sleep', '120']); "
            "print(p.pid, flush=True); time.sleep(120)")
    t0 = time.monotonic()
    rc, secs, cut = gpu_check.run_cmd([sys.executable, "-c", code], dict(os.environ), 2.0,
                                      tmp_path / "s.log")
    assert cut and rc != 0 and secs < 30 and time.monotonic() - t0 < 60
    child = int((tmp_path / "s.log").read_text().split()[0])
    try:
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child), "the stage's child outlived the cut"
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)
    rc, secs, cut = gpu_check.run_cmd([sys.executable, "-c", "raise SystemExit(3)"],
                                      dict(os.environ), 60, tmp_path / "f.log")
    assert (rc, cut) == (3, False)


def test_stage_budgets_pass_slack_forward():
    stages = [gpu_check.Stage(n, n, []) for n in gpu_check.STAGE_CAPS]
    caps = gpu_check.STAGE_CAPS
    full = gpu_check.DEFAULT_BUDGET_S
    assert sum(caps.values()) == full
    assert gpu_check.stage_budget(stages, 0, full, 1.0) == caps["build"]
    # build took 60 s of its 210: the tests may use the 150 s left over, not the later reserves
    left = full - 60
    assert gpu_check.stage_budget(stages, 1, left, 1.0) == caps["tests"] + caps["build"] - 60
    stages[1].skip = "--skip-tests"   # a skipped stage reserves nothing
    assert gpu_check.stage_budget(stages, 0, full, 1.0) == caps["build"] + caps["tests"]


def _fake_gpu(monkeypatch, tmp_path, outcome):
    """main() on a pretend sm_90 GPU: the stage commands are not run, run_cmd writes what the
    real ones would (micro and e2e JSON) or reports a cut; a fake clock counts the time."""
    clock = [0.0]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake H100")
    monkeypatch.setattr(gpu_check, "_clock", lambda: clock[0])
    seen = []

    def run_cmd(cmd, env, timeout, log):
        name = log.stem
        seen.append((name, cmd, env, timeout))
        log.parent.mkdir(parents=True, exist_ok=True)
        how = outcome.get(name, "ok")
        if how == "cut":
            log.write_text("collected 40 items\n....\n")
            clock[0] += timeout
            return -15, timeout, True
        clock[0] += 10
        if name == "tests":
            log.write_text("........\n40 passed in 9.0s\n")
        elif name.startswith("micro"):
            out = cmd[cmd.index("--out") + 1]
            n = 64 << 20 if name == "micro" else 1 << 20
            rows = [dict(dtype="float32", n=n, pass_="copy", seconds=1e-3, gbps=3000, fraction=1.0),
                    dict(dtype="float32", n=n, pass_="perturb_ triton", seconds=1e-3, gbps=2800,
                         fraction=0.93),
                    dict(dtype="float32", n=n, pass_="sam_perturb_ cuda", seconds=1e-3, gbps=2000,
                         fraction=0.67)]
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "gpu_micro.json"), "w") as f:
                json.dump({"device": "Fake H100", "rows": rows, "notes": [], "launch": []}, f)
            log.write_text("ok\n")
        elif name == "e2e":
            out = cmd[cmd.index("--out") + 1]
            os.makedirs(out, exist_ok=True)
            rows = [dict(model="resnet18", optimizer="SGD", median_s=0.100),
                    dict(model="resnet18", optimizer="FSGLD", median_s=0.101),
                    dict(model="resnet18", optimizer="SAM", median_s=0.150)]
            with open(os.path.join(out, "e2e.json"), "w") as f:
                json.dump({"rows": rows}, f)
            log.write_text("ok\n")
        else:
            log.write_text("built\n")
        return 0, 10.0, False

    monkeypatch.setattr(gpu_check, "run_cmd", run_cmd)
    monkeypatch.setenv("CUDA_HOME", "/fake/cuda")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    assert gpu_check.main(["--out", str(tmp_path)]) == 0
    return (tmp_path / "gpu-report.md").read_text(), seen


def test_report_on_a_pretend_gpu_all_stages(monkeypatch, tmp_path):
    report, seen = _fake_gpu(monkeypatch, tmp_path, {})
    assert [s[0] for s in seen] == ["build", "tests", "micro", "e2e", "micro-small"]
    build_env = seen[0][2]
    assert build_env["TORCH_CUDA_ARCH_LIST"] == "9.0" and build_env["MAX_JOBS"] == str(os.cpu_count())
    assert build_env["FORCE_CUDA"] == "1" and build_env["CUDA_HOME"] == "/fake/cuda"
    assert seen[0][1][1:] == ["setup.py", "-q", "build_ext", "--inplace"]
    assert "TRITON_INTERPRET" not in seen[1][2] and "-x" in seen[1][1]
    assert all(s[2]["TORCH_CUDA_ARCH_LIST"] == "9.0" for s in seen)
    assert "TORCH_CUDA_ARCH_LIST=9.0 (this GPU only)" in report
    assert "- PASS: 40 passed in 9.0s" in report
    assert "- MET: perturb_ triton float32: min 93% of copy bandwidth" in report
    assert "- NOT MET: sam_perturb_ cuda float32: min 67%" in report
    assert "- MET: resnet18: fSGLD 0.101 s/step = 1.010x SGD" in report
    assert "- NOT MET: resnet18: SAM 0.15 s/step = 1.49x fSGLD" in report
    assert "Cut for time: none. Not started for lack of time: none." in report
    assert "| build | build for 9.0 only" in report and "| 210 | 10 | ok |" in report


def test_report_on_a_pretend_gpu_tests_cut_for_time(monkeypatch, tmp_path):
    # the tests run to their budget: what is left goes to micro and e2e; micro-small, whose
    # reserve the tests did not touch, still runs; the report names the cut stage
    report, seen = _fake_gpu(monkeypatch, tmp_path, {"tests": "cut", "e2e": "cut"})
    assert [s[0] for s in seen] == ["build", "tests", "micro", "e2e", "micro-small"]
    caps = gpu_check.STAGE_CAPS
    assert seen[1][3] == caps["tests"] + caps["build"] - 10       # build's slack went on
    assert "| tests |" in report and "CUT for time (stopped at its 370 s budget)" in report
    assert "Cut for time: tests, e2e." in report
    assert "- CUT for time: ...." in report
    assert "- e2e benchmark CUT for time" in report
    assert "- MET: perturb_ triton float32" in report      # micro verdicts still there


def test_report_stage_not_started_when_time_is_spent(monkeypatch, tmp_path):
    clock_cut = {"build": "cut", "tests": "cut", "micro": "cut", "e2e": "cut"}
    report, seen = _fake_gpu(monkeypatch, tmp_path, clock_cut)
    # every stage used all its budget: micro-small still had its own 20 s reserve
    assert [s[0] for s in seen] == ["build", "tests", "micro", "e2e", "micro-small"]
    assert "Cut for time: build, tests, micro, e2e." in report
    monkeypatch.setattr(gpu_check, "STAGE_CAPS", {**gpu_check.STAGE_CAPS, "micro-small": 5})
    report, seen = _fake_gpu(monkeypatch, tmp_path / "b", clock_cut)
    assert [s[0] for s in seen] == ["build", "tests", "micro", "e2e"]
    assert "Not started for lack of time: micro-small." in report
    assert "| micro-small |" in report and "not run: no time left" in report
