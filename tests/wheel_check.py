"""The release check (`make wheel-test`): `python -m build` makes an sdist and a wheel; the
wheel is installed into a fresh virtual environment, and there, away from this checkout,
`import fused_flat` must come from the wheel and take an FSGLD step on the compiled CPU
kernels and on the reference, which must agree.

The fresh venv gets the pinned torch of this project's .venv through a .pth file (the same
torch==2.14.1, without copying 5 GB again); nothing else of the checkout is visible to it.
The wheel is built from the sdist (what `python -m build` does), with the CPU kernels only
(FORCE_CUDA=0) to keep the check to a few minutes; the CUDA sources are in the sdist.
"""
from __future__ import annotations

import glob
import os
import shutil
import site
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "build", "dist")

STEP = r"""
import sys, torch, fused_flat, fused_flat.backends._native as n
assert fused_flat.__file__.startswith(sys.prefix), fused_flat.__file__
info = n.build_info()
assert info, f"the wheel's extension did not load: {n.load_error}"
print("fused_flat", fused_flat.__version__, "from", fused_flat.__file__, info)
out = {}
for backend in ("cpp", "reference"):
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 10)
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    opt = fused_flat.FSGLD(model.parameters(), lr=0.1, beta=1e6, momentum=0.9, seed=1,
                           backend=backend)
    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss
    for _ in range(3):
        opt.step(closure)
    out[backend] = torch.cat([p.detach().flatten() for p in model.parameters()])
diff = (out["cpp"] - out["reference"]).abs().max().item()
print(f"FSGLD, 3 steps: cpp vs reference max |diff| = {diff:.2e}")
assert diff < 1e-5, diff
"""


def run(cmd, **kw):
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def main() -> int:
    t0 = time.time()
    shutil.rmtree(OUT, ignore_errors=True)
    env = dict(os.environ, FORCE_CUDA="0")
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", OUT, ROOT], env=env)
    sdist = glob.glob(os.path.join(OUT, "fused_flat-*.tar.gz"))
    wheel = glob.glob(os.path.join(OUT, "fused_flat-*.whl"))
    assert len(sdist) == 1 and len(wheel) == 1, os.listdir(OUT)
    with tempfile.TemporaryDirectory() as tmp:
        venv = os.path.join(tmp, "venv")
        run([sys.executable, "-m", "venv", venv])
        py = os.path.join(venv, "bin", "python")
        purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                 check=True, capture_output=True, text=True).stdout.strip()
        with open(os.path.join(purelib, "pinned_torch.pth"), "w") as f:
            f.write("\n".join(site.getsitepackages()) + "\n")
        run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel[0]])
        run([py, "-c", STEP], cwd=tmp, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    print(f"wheel check passed in {time.time() - t0:.0f} s: {os.path.basename(sdist[0])}, "
          f"{os.path.basename(wheel[0])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
