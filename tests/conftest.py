"""Test configuration. Without a GPU, Triton's interpreter must be switched on before any
@triton.jit kernel is defined, so it is set here, before fused_flat is imported anywhere.
With a CUDA GPU the kernels are compiled for it (TRITON_INTERPRET stays unset unless the
caller sets it)."""
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(ROOT, "build", "triton_cache"))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402

import fused_flat  # noqa: E402,F401
from fused_flat import backends  # noqa: E402


def cpu_backends():
    """Concrete backends that run CPU tensors here ('triton' runs them under the interpreter)."""
    out = ["reference"]
    if backends.available_backends().get("cpp") == "ok":
        out.append("cpp")
    return out


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP spin-waits on a shared machine (use
    with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _torch_defaults():
    torch.manual_seed(0)
    yield
