"""The compatibility promise (docs/compatibility.md): checkpoints written by the previous
release load into this one. tests/data/checkpoints_v0.1.0.pt was written by fused_flat
0.1.0 (state format 2, noise layout 2; tests/data/make_checkpoints_v0_1_0.py)."""
import warnings
from pathlib import Path

import pytest
import torch

import fused_flat
from fused_flat import noise

DATA = Path(__file__).parent / "data" / "checkpoints_v0.1.0.pt"


def _build(name, model):
    if name == "FSGLD":
        return fused_flat.FSGLD(model.parameters(), lr=0.05, beta=1e6, momentum=0.9,
                                weight_decay=1e-3, backend="reference")
    return fused_flat.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9,
                          backend="reference")


@pytest.mark.parametrize("name", ["FSGLD", "SAM"])
def test_previous_release_checkpoint_loads_and_continues_on_the_current_layout(name):
    saved = torch.load(DATA, weights_only=True)[name]
    meta = saved["optimizer"]["fused_flat"]
    assert meta["stream"] == 2 and noise.LAYOUT_VERSION > 2
    model = torch.nn.Linear(4, 3)
    model.load_state_dict(saved["model"])
    opt = _build(name, model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.load_state_dict(saved["optimizer"])
    layout_warnings = [w for w in caught if "layout" in str(w.message)]
    assert len(layout_warnings) == 1, [str(w.message) for w in caught]
    # everything the checkpoint holds was loaded
    assert opt.seed == meta["seed"] and opt.step_count == meta["step"]
    params = list(model.parameters())
    for i, p in enumerate(params):
        torch.testing.assert_close(opt.state[p]["momentum_buffer"],
                                   saved["optimizer"]["state"][i]["momentum_buffer"], rtol=0, atol=0)
    # it continues, on the current layout, and says so in its next checkpoint
    x, y = saved["x"], saved["y"]

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    before = [p.detach().clone() for p in params]
    if name == "SAM":
        closure()
    opt.step(closure)
    assert all(not torch.equal(a, p) for a, p in zip(before, params))
    assert all(torch.isfinite(p).all() for p in params)
    sd = opt.state_dict()
    assert sd["fused_flat"]["stream"] == noise.LAYOUT_VERSION
    assert sd["fused_flat"]["step"] == meta["step"] + 1
    # a checkpoint of the current layout loads silently
    opt2 = _build(name, model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt2.load_state_dict(sd)
