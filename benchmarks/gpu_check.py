"""`make gpu-check`: the GPU report in one command (issue 12).

On a machine with a CUDA GPU:
  1. build the extension for this GPU's architecture (plus the default list);
  2. run the GPU tests: compiled Triton and CUDA kernels against the reference, bf16
     included (tests/test_cuda_gpu.py, tests/test_cuda_sam_gpu.py, tests/test_triton_sam.py,
     tests/test_triton.py), with TRITON_INTERPRET unset;
  3. the micro benchmark of the fused passes as fractions of measured copy bandwidth
     (benchmarks/gpu_micro.py, 1M .. 1G elements as memory allows, CUDA events);
  4. the end-to-end benchmark (benchmarks/e2e.py: SGD, FSGLD, SAM on the GPU);
  5. results/gpu-report.md with verdicts against the targets:
       each fused pass >= 85% of copy bandwidth at >= 64M elements;
       fSGLD <= 1.03x SGD and SAM >= 1.8x fSGLD end to end (s/step).
Without a GPU it prints one line saying so and exits 0.
Options: --quick (small sizes, few steps: a smoke run), --skip-build, --skip-tests.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NO_GPU_LINE = "gpu-check: no CUDA GPU on this machine (torch.cuda.is_available() is False); nothing to check."
GPU_TESTS = ["tests/test_cuda_gpu.py", "tests/test_cuda_sam_gpu.py", "tests/test_triton_sam.py",
             "tests/test_triton_multi.py", "tests/test_capturable_gpu.py",
             "tests/test_triton_device_scalars.py", "tests/test_cuda_device_scalars.py",
             "tests/test_triton.py"]
FSGLD_MAX_X_SGD = 1.03
SAM_MIN_X_FSGLD = 1.8


def _run(cmd, env=None, log=None) -> tuple[int, str]:
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    if log is not None:
        log.append(f"$ {' '.join(cmd)}  (exit {proc.returncode}, {time.time() - t0:.0f} s)")
    print(out[-3000:])
    return proc.returncode, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="fused_flat GPU report")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "results"))
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print(NO_GPU_LINE)
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    major, minor = torch.cuda.get_device_capability()
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("TRITON_CACHE_DIR", str(ROOT / "build" / "triton_cache"))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    archs = env.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    if f"{major}.{minor}" not in archs:
        archs = f"{archs};{major}.{minor}"
    env["TORCH_CUDA_ARCH_LIST"] = archs
    env.setdefault("CUDA_HOME", os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    env["FORCE_CUDA"] = "1"
    log: list[str] = []
    report = ["# fused_flat GPU report", "",
              f"Device: {torch.cuda.get_device_name()} (sm_{major}{minor}), torch {torch.__version__}, "
              f"CUDA {torch.version.cuda}; archs built: {archs}.", ""]

    build_ok = True
    if not args.skip_build:
        rc, _ = _run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], env, log)
        build_ok = rc == 0
    report += ["## Build", "", f"- {'ok' if build_ok else 'FAILED'}", ""]

    if not args.skip_tests:
        rc, txt = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
                       + [t for t in GPU_TESTS if (ROOT / t).exists()], env, log)
        summary = [ln for ln in txt.splitlines() if " passed" in ln or " failed" in ln or "error" in ln]
        report += ["## GPU tests (compiled Triton and CUDA vs the reference, fp32 and bf16)", "",
                   f"- {'PASS' if rc == 0 else 'FAIL'}: {summary[-1] if summary else txt[-300:]}", ""]

    # micro benchmark, in a subprocess so it sees the fresh build
    sizes = "1M,16M" if args.quick else "1M,4M,16M,64M,256M,1G"
    micro_out = out / "gpu"
    rc, _ = _run([sys.executable, "benchmarks/gpu_micro.py", "--sizes", sizes, "--out",
                  str(micro_out)] + (["--reps", "5"] if args.quick else []), env, log)
    report += ["## Fused passes vs copy bandwidth (target: >= 85% at >= 64M elements)", ""]
    import json

    sys.path.insert(0, str(ROOT))
    from benchmarks import gpu_micro

    mj = micro_out / "gpu_micro.json"
    if rc == 0 and mj.exists():
        result = json.loads(mj.read_text())
        for name, ok, detail in gpu_micro.verdicts(result):
            report.append(f"- {'MET' if ok else 'NOT MET'}: {name}: {detail}")
        report += [""] + gpu_micro.markdown(result) + [""]
    else:
        report += ["- micro benchmark FAILED (see the log below)", ""]

    # end to end
    e2e_out = out / "gpu_e2e"
    e2e_cmd = [sys.executable, "-m", "fused_flat", "bench", "e2e", "--device", "cuda",
               "--optimizers", "SGD,FSGLD,SAM", "--out", str(e2e_out), "--no-plot"]
    if args.quick:
        e2e_cmd.append("--quick")
    rc, _ = _run(e2e_cmd, env, log)
    report += [f"## End to end (targets: fSGLD <= {FSGLD_MAX_X_SGD}x SGD, SAM >= "
               f"{SAM_MIN_X_FSGLD}x fSGLD in s/step)", ""]
    ej = e2e_out / "e2e.json"
    if rc == 0 and ej.exists():
        rows = json.loads(ej.read_text())["rows"]
        for model in sorted({r["model"] for r in rows}):
            by = {r["optimizer"]: r for r in rows if r["model"] == model}
            sgd, fs, sam = (by.get(k, {}).get("median_s") for k in ("SGD", "FSGLD", "SAM"))
            if sgd and fs:
                x = fs / sgd
                report.append(f"- {'MET' if x <= FSGLD_MAX_X_SGD else 'NOT MET'}: {model}: fSGLD "
                              f"{fs:.4g} s/step = {x:.3f}x SGD ({sgd:.4g} s/step)")
            if fs and sam:
                x = sam / fs
                report.append(f"- {'MET' if x >= SAM_MIN_X_FSGLD else 'NOT MET'}: {model}: SAM "
                              f"{sam:.4g} s/step = {x:.2f}x fSGLD")
        report.append("")
    else:
        report += ["- e2e benchmark FAILED (see the log below)", ""]

    report += ["## Commands", ""] + [f"- `{x}`" for x in log] + [""]
    path = out / "gpu-report.md"
    path.write_text("\n".join(report))
    print(f"gpu-check: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
