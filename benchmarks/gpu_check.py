"""`make gpu-check`: the GPU report in one command (issue 12), within one 10-minute command.

It runs with the Python it is started with (the Makefile picks it: GPU_PY=..., else PY=...
if given, else .venv/bin/python if that has torch, else python3 on PATH) and never creates a
virtual environment nor installs anything: that Python must already hold a torch in the range
pyproject.toml supports (torch>=2.6,<2.15), else it says so and exits 2.

On a machine with a CUDA GPU, each stage with its own time budget (seconds, --budget scales
them; time a stage leaves unused goes to the stages after it):
  1. build   the extension in place for THIS GPU's architecture only (TORCH_CUDA_ARCH_LIST
             from torch.cuda.get_device_capability(), e.g. "9.0"; --arch-list overrides),
             MAX_JOBS = os.cpu_count(), FORCE_CUDA=1, CUDA_HOME as the Makefile finds it;
  2. tests   the GPU tests (compiled Triton and CUDA kernels against the reference, bf16
             included; tests/test_gpu_sync.py: no synchronizing call in any optimizer's
             step, CUDA graphs captured on the first step), pytest -x, TRITON_INTERPRET unset; one file per worker when
             pytest-xdist is there (--test-workers 0: one process);
  3. micro   fused passes as fractions of measured copy bandwidth at the sizes >= 64M
             (benchmarks/gpu_micro.py; the sizes the verdicts read);
  4. e2e     the end-to-end benchmark (benchmarks/e2e.py: SGD, FSGLD, SAM on the GPU);
  5. micro-small  the sizes < 64M of the micro benchmark (table only, no verdict);
then results/gpu-report.md: which stages ran, their times, which were cut for time (a stage
past its budget is stopped with its whole process group), and the verdicts against the targets:
       each fused pass >= 85% of copy bandwidth at >= 64M elements;
       fSGLD <= 1.03x SGD and SAM >= 1.8x fSGLD end to end (s/step).
Stage logs: results/gpu-logs/<stage>.log.
Without a GPU it prints one line saying so and exits 0.
Options: --quick (small sizes, few steps: a smoke run), --skip-build, --skip-tests,
--budget SECONDS (all stages together, default 540), --dry-run (print the plan: interpreter,
arch list, MAX_JOBS, stages, budgets and commands; build and run nothing) with
--assume-capability 9.0 to plan for a GPU that is not there.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NO_GPU_LINE = "gpu-check: no CUDA GPU on this machine (torch.cuda.is_available() is False); nothing to check."
# test_gpu_sync.py first: no synchronizing call in any optimizer's step on any GPU backend
# (sync debug mode "error"), CUDA graphs captured on the first step (the launch tables that
# the registered ops build in their real implementations, which fake tensors cannot reach)
GPU_TESTS = ["tests/test_gpu_sync.py",
             "tests/test_cuda_gpu.py", "tests/test_cuda_sam_gpu.py", "tests/test_triton_sam.py",
             "tests/test_triton_multi.py", "tests/test_capturable_gpu.py",
             "tests/test_triton_device_scalars.py", "tests/test_cuda_device_scalars.py",
             "tests/test_triton.py"]
FSGLD_MAX_X_SGD = 1.03
SAM_MIN_X_FSGLD = 1.8
# The GPU machines allow 10 minutes per command: 9 for the stages, the rest for starting
# Python, importing torch and writing the report.
DEFAULT_BUDGET_S = 540
# Seconds reserved per stage (sum = DEFAULT_BUDGET_S); a stage may also use what the stages
# before it left unused, never what is reserved for the stages after it.
STAGE_CAPS = {"build": 210, "tests": 170, "micro": 70, "e2e": 70, "micro-small": 20}
MIN_STAGE_S = 15            # a stage with less time than this left is not started
TORCH_RANGE_FALLBACK = ("2.6", "2.15")
SIZES = "1M,4M,16M,64M,256M,1G"
QUICK_SIZES = "1M,16M"
VERDICT_MIN_SIZE = 64 << 20  # = benchmarks.gpu_micro.TARGET_MIN_SIZE (not imported: needs torch)


# ----------------------------------------------------------------------------- interpreter
def supported_torch_range(pyproject: Path = ROOT / "pyproject.toml") -> tuple[str, str]:
    """(lowest, first unsupported) torch version from pyproject's `torch>=A,<B`."""
    try:
        m = re.search(r"""dependencies\s*=\s*\[[^\]]*["']torch\s*>=\s*([\d.]+)\s*,\s*<\s*([\d.]+)""",
                      pyproject.read_text())
        if m:
            return m.group(1), m.group(2)
    except OSError:
        pass
    return TORCH_RANGE_FALLBACK


def _vtuple(v: str) -> tuple[int, ...]:
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", v.strip())
    if not m:
        raise ValueError(f"not a version: {v!r}")
    return tuple(int(x or 0) for x in m.groups())


def torch_version_ok(version: str, lo: str, hi: str) -> bool:
    """lo <= version < hi on the release numbers ('2.11.0+cu130', '2.14.0a0+git' alike)."""
    try:
        return _vtuple(lo) <= _vtuple(version) < _vtuple(hi)
    except ValueError:
        return False


def check_torch():
    """The torch module of this interpreter, or (None, message) when it cannot serve."""
    lo, hi = supported_torch_range()
    want = f"torch>={lo},<{hi}"
    hint = ("choose a Python that has one: make gpu-check GPU_PY=/path/to/python "
            "(gpu-check never creates a virtual environment nor installs packages)")
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - ImportError or a broken install alike
        return None, (f"gpu-check: {sys.executable} (Python {sys.version.split()[0]}) cannot import "
                      f"torch ({type(exc).__name__}: {exc}); needs {want}: {hint}")
    version = str(getattr(torch, "__version__", "?"))
    if not torch_version_ok(version, lo, hi):
        return None, (f"gpu-check: {sys.executable} has torch {version}, outside the supported "
                      f"{want} (pyproject.toml): {hint}")
    return torch, None


def find_cuda_home(env: dict) -> str | None:
    """The CUDA toolkit as the Makefile finds it: $CUDA_HOME, $CUDA_PATH, /usr/local/cuda,
    then nvcc on PATH (symlinks resolved); a directory counts if it has bin/nvcc and
    include/cuda.h (nvcc itself may be a wrapper script elsewhere)."""
    if env.get("CUDA_HOME"):
        return env["CUDA_HOME"]
    for d in (env.get("CUDA_PATH"), "/usr/local/cuda"):
        if d and os.access(os.path.join(d, "bin", "nvcc"), os.X_OK) and \
                os.path.isfile(os.path.join(d, "include", "cuda.h")):
            return d
    nvcc = shutil.which("nvcc", path=env.get("PATH"))
    if nvcc:
        d = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.isfile(os.path.join(d, "include", "cuda.h")):
            return d
    return None


def parse_capability(s: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", s)
    if not m:
        raise argparse.ArgumentTypeError(f"capability like 9.0, got {s!r}")
    return int(m.group(1)), int(m.group(2))


# ----------------------------------------------------------------------------- stages
def _clock() -> float:
    """Seconds since some start: the clock of the budgets (the tests swap it for a fake)."""
    return time.monotonic()


@dataclass
class Stage:
    name: str
    title: str
    cmd: list[str]
    env_shown: dict = field(default_factory=dict)   # the variables the plan shows for it
    skip: str | None = None                         # reason it is not run at all
    budget: float | None = None
    seconds: float | None = None
    rc: int | None = None
    cut: bool = False
    log: Path | None = None
    output: str = ""

    @property
    def status(self) -> str:
        if self.skip:
            return f"skipped: {self.skip}"
        if self.seconds is None:
            return "not run: no time left"
        if self.cut:
            return f"CUT for time (stopped at its {self.budget:.0f} s budget)"
        return "ok" if self.rc == 0 else f"FAILED (exit {self.rc})"

    @property
    def ran_ok(self) -> bool:
        return self.seconds is not None and not self.cut and self.rc == 0


def stage_budget(stages: list[Stage], i: int, remaining: float, scale: float) -> float:
    """Seconds stage i may use: what is left minus what the later (not skipped) stages
    have reserved."""
    later = sum(STAGE_CAPS[s.name] * scale for s in stages[i + 1:] if not s.skip)
    return remaining - later


def run_cmd(cmd: list[str], env: dict, timeout: float, log: Path) -> tuple[int, float, bool]:
    """Run cmd in ROOT, output to log; past timeout its whole process group is stopped
    (SIGTERM, then SIGKILL). Returns (exit code, seconds, cut for time)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout, 0.1))
            cut = False
        except subprocess.TimeoutExpired:
            cut = True
            for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 30)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            rc = proc.returncode if proc.returncode is not None else -9
    # the group may outlive its leader (a child ignoring SIGTERM): make sure it is gone
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return rc, time.monotonic() - t0, cut


def _show(cmd: list[str], env_shown: dict) -> str:
    return " ".join([f"{k}={shlex.quote(str(v))}" for k, v in env_shown.items()]
                    + [shlex.quote(str(c)) for c in cmd])


def _split_sizes(sizes: str) -> tuple[str, str]:
    """(sizes >= 64M, sizes < 64M) of a gpu_micro --sizes list."""
    big, small = [], []
    for s in sizes.split(","):
        t = s.strip().upper()
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "B": 1 << 30}.get(t[-1:], 1)
        n = int(float(t[:-1] if mult > 1 else t) * mult)
        (big if n >= VERDICT_MIN_SIZE else small).append(s.strip())
    return ",".join(big), ",".join(small)


def plan(args, capability: tuple[int, int] | None, env: dict) -> tuple[dict, list[Stage]]:
    """What a run does: the settings and the stages, with their commands."""
    py = sys.executable
    jobs = args.jobs or os.cpu_count() or 1
    archs = args.arch_list or (f"{capability[0]}.{capability[1]}" if capability else "")
    cuda_home = find_cuda_home(env)
    settings = {"interpreter": py, "python": sys.version.split()[0],
                "TORCH_CUDA_ARCH_LIST": archs, "MAX_JOBS": jobs, "CUDA_HOME": cuda_home or "",
                "total budget": f"{args.budget:.0f} s"}
    out = Path(args.out)
    stages = []

    build_env = {"CUDA_HOME": cuda_home or "", "FORCE_CUDA": "1", "MAX_JOBS": str(jobs),
                 "TORCH_CUDA_ARCH_LIST": archs}
    skip = ("--skip-build" if args.skip_build else
            "no GPU, no arch list" if not archs else
            None if cuda_home else "no CUDA toolkit found (CUDA_HOME, CUDA_PATH, /usr/local/cuda, "
                                   "nvcc on PATH): the CUDA kernels cannot be built")
    stages.append(Stage("build", f"build for {archs or '(no GPU)'} only, {jobs} jobs",
                        [py, "setup.py", "-q", "build_ext", "--inplace"], build_env, skip))

    tests = [t for t in GPU_TESTS if (ROOT / t).exists()]
    test_cmd = [py, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
    workers = args.test_workers
    if workers is None:
        workers = min(len(tests), max(1, jobs // 2)) if importlib.util.find_spec("xdist") else 0
    if workers > 1:
        test_cmd += ["-n", str(workers), "--dist", "loadfile"]
    # pytest's own watchdog: a test hanging near the stage's end prints where it hangs
    faulthandler_s = max(30, int(STAGE_CAPS["tests"] * args.budget / DEFAULT_BUDGET_S) - 20)
    test_cmd += ["-o", f"faulthandler_timeout={faulthandler_s}"] + tests
    stages.append(Stage("tests", "GPU tests (compiled Triton and CUDA vs the reference, fp32 and "
                        "bf16)", test_cmd, {}, "--skip-tests" if args.skip_tests else None))

    big, small = _split_sizes(QUICK_SIZES if args.quick else args.sizes)
    reps = ["--reps", "5"] if args.quick else []
    micro = [py, "benchmarks/gpu_micro.py"]
    stages.append(Stage("micro", "micro benchmark, sizes >= 64M (the verdicts)",
                        micro + ["--sizes", big, "--out", str(out / "gpu")] + reps, {},
                        None if big else "no size >= 64M asked for (--quick)"))
    e2e = [py, "-m", "fused_flat", "bench", "e2e", "--device", "cuda", "--optimizers",
           "SGD,FSGLD,SAM", "--out", str(out / "gpu_e2e"), "--no-plot"]
    stages.append(Stage("e2e", "end-to-end benchmark (SGD, FSGLD, SAM)",
                        e2e + (["--quick"] if args.quick else []), {}))
    stages.append(Stage("micro-small", "micro benchmark, sizes < 64M (table only)",
                        micro + ["--sizes", small, "--out", str(out / "gpu_small")] + reps, {},
                        None if small else "no size < 64M asked for"))
    return settings, stages


def print_plan(settings: dict, stages: list[Stage], args, device: str) -> None:
    scale = args.budget / DEFAULT_BUDGET_S
    print("gpu-check plan (dry run: nothing is built or run)")
    for k, v in settings.items():
        print(f"{k}: {v}")
    print(f"device: {device}")
    remaining = args.budget
    for i, st in enumerate(stages):
        if st.skip:
            print(f"stage {st.name}: skipped ({st.skip}): {_show(st.cmd, st.env_shown)}")
            continue
        b = stage_budget(stages, i, remaining, scale)
        print(f"stage {st.name}: budget {b:.0f} s: {_show(st.cmd, st.env_shown)}")
        remaining -= b        # the plan assumes each stage uses all of its budget


# ----------------------------------------------------------------------------- report
def _tail(text: str, n: int = 300) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "(no output)")[-n:]


def _pytest_summary(text: str) -> str:
    summary = [ln for ln in text.splitlines()
               if re.search(r"\d+ (passed|failed|error|skipped)", ln)]
    return summary[-1].strip("= ") if summary else _tail(text)


def _merge_micro(results: list[dict]) -> dict:
    results = [r for r in results if r]
    merged = dict(results[0])
    merged["rows"] = [row for r in results for row in r["rows"]]
    order = {d: i for i, d in enumerate(dict.fromkeys(row["dtype"] for row in merged["rows"]))}
    merged["rows"].sort(key=lambda row: (order[row["dtype"]], row["n"]))   # stable per size
    merged["notes"] = [n for r in results for n in r["notes"]]
    merged["launch"] = next((r["launch"] for r in results if r.get("launch")), [])
    return merged


def stage_table(stages: list[Stage]) -> list[str]:
    md = ["| stage | what | budget s | took s | result |", "|---|---|---:|---:|---|"]
    for st in stages:
        md.append(f"| {st.name} | {st.title} | "
                  f"{'' if st.budget is None else f'{st.budget:.0f}'} | "
                  f"{'' if st.seconds is None else f'{st.seconds:.0f}'} | {st.status} |")
    cut = [st.name for st in stages if st.cut]
    late = [st.name for st in stages if not st.skip and st.seconds is None]
    md += ["", f"Ran: {', '.join(st.name for st in stages if st.seconds is not None) or 'none'}. "
               f"Cut for time: {', '.join(cut) or 'none'}. "
               f"Not started for lack of time: {', '.join(late) or 'none'}."]
    return md


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="fused_flat GPU report")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "results"))
    ap.add_argument("--sizes", default=SIZES, help="micro benchmark sizes (default %(default)s)")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                    help="seconds for all stages together (default %(default)s; per stage: "
                         + ", ".join(f"{k} {v}" for k, v in STAGE_CAPS.items()) + ", scaled)")
    ap.add_argument("--arch-list", default=None,
                    help="TORCH_CUDA_ARCH_LIST to build (default: this GPU's capability only)")
    ap.add_argument("--jobs", type=int, default=None, help="MAX_JOBS (default: os.cpu_count())")
    ap.add_argument("--test-workers", type=int, default=None,
                    help="pytest-xdist workers (default: one per test file up to cores/2 when "
                         "pytest-xdist is installed; 0: one process)")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the plan (interpreter, arch list, MAX_JOBS, stages, budgets)")
    ap.add_argument("--assume-capability", type=parse_capability, default=None,
                    help="with --dry-run: plan for a GPU of this compute capability, e.g. 9.0")
    args = ap.parse_args(argv)
    if args.assume_capability and not args.dry_run:
        ap.error("--assume-capability only goes with --dry-run")

    t_start = _clock()
    torch, problem = check_torch()
    if problem:
        print(problem, file=sys.stderr)
        return 2

    env = dict(os.environ)
    has_gpu = torch.cuda.is_available()
    if args.dry_run:
        cap = args.assume_capability or (torch.cuda.get_device_capability() if has_gpu else None)
        device = (f"assumed compute capability {cap[0]}.{cap[1]}" if args.assume_capability else
                  f"{torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]})" if has_gpu else
                  f"none: a run prints {NO_GPU_LINE!r} and exits 0")
        settings, stages = plan(args, cap, env)
        settings = {"interpreter": settings.pop("interpreter"), "torch": torch.__version__,
                    **settings}
        print_plan(settings, stages, args, device)
        return 0
    if not has_gpu:
        print(NO_GPU_LINE)
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "gpu-logs"
    major, minor = torch.cuda.get_device_capability()
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("TRITON_CACHE_DIR", str(ROOT / "build" / "triton_cache"))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    settings, stages = plan(args, (major, minor), env)
    archs = settings["TORCH_CUDA_ARCH_LIST"]
    # every stage builds (if at all) for this GPU only, not the Makefile's wider default
    env["TORCH_CUDA_ARCH_LIST"] = archs
    scale = args.budget / DEFAULT_BUDGET_S

    for i, st in enumerate(stages):
        if st.skip:
            continue
        remaining = args.budget - (_clock() - t_start)
        budget = stage_budget(stages, i, remaining, scale)
        if budget < MIN_STAGE_S:
            print(f"gpu-check: [{st.name}] not started: {budget:.0f} s left for it", flush=True)
            continue
        st.budget = budget
        st.log = logs / f"{st.name}.log"
        print(f"gpu-check: [{st.name}] budget {budget:.0f} s: {_show(st.cmd, st.env_shown)}",
              flush=True)
        st.rc, st.seconds, st.cut = run_cmd(st.cmd, {**env, **st.env_shown}, budget, st.log)
        st.output = st.log.read_text(errors="replace")
        print(st.output[-3000:])
        print(f"gpu-check: [{st.name}] {st.status}, {st.seconds:.0f} s", flush=True)

    by = {st.name: st for st in stages}
    report = ["# fused_flat GPU report", "",
              f"Device: {torch.cuda.get_device_name()} (sm_{major}{minor}), torch {torch.__version__}, "
              f"CUDA {torch.version.cuda}; Python {settings['python']} ({settings['interpreter']}); "
              f"TORCH_CUDA_ARCH_LIST={archs} (this GPU only), MAX_JOBS={settings['MAX_JOBS']}.", "",
              f"Time budget: {args.budget:.0f} s for the stages (the GPU machines allow 10 minutes "
              f"per command); the whole check took {_clock() - t_start:.0f} s.", "",
              "## Stages", ""] + stage_table(stages) + [""]

    b = by["build"]
    report += ["## Build", "", f"- {b.status}" + ("" if b.ran_ok or b.skip or b.seconds is None
                                                  else f": {_tail(b.output)}"), ""]

    t = by["tests"]
    report += [f"## {t.title[0].upper()}{t.title[1:]}", ""]
    if t.seconds is not None:
        verdict = "PASS" if t.ran_ok else "CUT for time" if t.cut else "FAIL"
        report += [f"- {verdict}: {_pytest_summary(t.output)}", ""]
    else:
        report += [f"- {t.status}", ""]

    report += ["## Fused passes vs copy bandwidth (target: >= 85% at >= 64M elements)", ""]
    results = []
    for name, sub in (("micro", "gpu"), ("micro-small", "gpu_small")):
        mj = out / sub / "gpu_micro.json"
        if by[name].ran_ok and mj.exists():
            results.append(json.loads(mj.read_text()))
        elif not by[name].skip:
            report.append(f"- {name} ({by[name].title}): {by[name].status}"
                          + (f": {_tail(by[name].output)}" if by[name].seconds is not None else ""))
    if results:
        sys.path.insert(0, str(ROOT))
        from benchmarks import gpu_micro

        result = _merge_micro(results)
        for name, ok, detail in gpu_micro.verdicts(result):
            report.append(f"- {'MET' if ok else 'NOT MET'}: {name}: {detail}")
        report += [""] + gpu_micro.markdown(result)
    report.append("")

    e = by["e2e"]
    report += [f"## End to end (targets: fSGLD <= {FSGLD_MAX_X_SGD}x SGD, SAM >= "
               f"{SAM_MIN_X_FSGLD}x fSGLD in s/step)", ""]
    ej = out / "gpu_e2e" / "e2e.json"
    if e.ran_ok and ej.exists():
        rows = json.loads(ej.read_text())["rows"]
        for model in sorted({r["model"] for r in rows}):
            byopt = {r["optimizer"]: r for r in rows if r["model"] == model}
            sgd, fs, sam = (byopt.get(k, {}).get("median_s") for k in ("SGD", "FSGLD", "SAM"))
            if sgd and fs:
                x = fs / sgd
                report.append(f"- {'MET' if x <= FSGLD_MAX_X_SGD else 'NOT MET'}: {model}: fSGLD "
                              f"{fs:.4g} s/step = {x:.3f}x SGD ({sgd:.4g} s/step)")
            if fs and sam:
                x = sam / fs
                report.append(f"- {'MET' if x >= SAM_MIN_X_FSGLD else 'NOT MET'}: {model}: SAM "
                              f"{sam:.4g} s/step = {x:.2f}x fSGLD")
    else:
        report.append(f"- e2e benchmark {e.status}"
                      + (f": {_tail(e.output)}" if e.seconds is not None else ""))
    report.append("")

    report += ["## Commands", ""]
    for st in stages:
        if st.seconds is not None:
            report.append(f"- `{_show(st.cmd, st.env_shown)}` ({st.status}, {st.seconds:.0f} s; "
                          f"log: {st.log.relative_to(out) if st.log.is_relative_to(out) else st.log})")
    report.append("")
    path = out / "gpu-report.md"
    path.write_text("\n".join(report))
    print(f"gpu-check: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
