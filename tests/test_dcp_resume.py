"""fused_flat.distributed.load_checkpoint restores the whole optimizer state as saved.

Regression: its DCP template asked only for a momentum buffer of the parameter's dtype, so
bf16 + master_weights lost the fp32 masters and rounded the momentum to bf16 (resumed run
0.002 off the uninterrupted one), and SAM over AdamW lost exp_avg, exp_avg_sq and step
(0.04 off). Each case (tests/dist_cases.py, RESUME_CASES) trains 3 steps, saves, trains 3
more; a fresh model + optimizer + LR scheduler loads the checkpoint and trains the same 3:
parameters and optimizer state must be bitwise equal, on one process and under FSDP2."""
from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from fused_flat.distributed import load_checkpoint, save_checkpoint
from tests import dist_cases as dc

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not available")
CASES = list(dc.RESUME_CASES)


def max_diff(a, b) -> float:
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b))


def assert_same_run(straight: dict, resumed: dict):
    """Parameters, per-parameter state (dtype included), param groups and the 'fused_flat'
    entry of the resumed run are those of the uninterrupted run, bit for bit."""
    diff = max_diff(straight["params"], resumed["params"])
    for a, b in zip(straight["params"], resumed["params"]):
        assert a.dtype == b.dtype and torch.equal(a, b), f"parameters: max |diff| {diff:.3g}"
    assert straight["state"].keys() == resumed["state"].keys()
    for n, st in straight["state"].items():
        got = resumed["state"][n]
        assert st.keys() == got.keys(), n
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                assert v.dtype == got[k].dtype, f"state[{n!r}][{k!r}]: {got[k].dtype} != {v.dtype}"
                assert torch.equal(v, got[k]), (f"state[{n!r}][{k!r}] differs by "
                                                f"{(v.double() - got[k].double()).abs().max():.3g}")
            else:
                assert v == got[k], (n, k)
    assert straight["types"] == resumed["types"]   # DTensor state stays a DTensor
    assert straight["param_groups"] == resumed["param_groups"]
    assert straight["fused_flat"] == resumed["fused_flat"]


def assert_case_exercised(case: str, snap: dict):
    """The state the bug dropped is there (so the comparison covers it) and the scheduler
    moved the lr off its initial value."""
    st = next(iter(snap["state"].values()))
    if case == "fsgld_bf16_masters":
        assert snap["params"][0].dtype == torch.bfloat16
        assert st["master_weight"].dtype == st["momentum_buffer"].dtype == torch.float32
        lr0 = 0.05
    else:
        assert {"exp_avg", "exp_avg_sq", "step"} <= st.keys() and st["step"].dim() == 0
        assert float(st["step"]) == dc.RESUME_STEPS
        lr0 = 0.01
    assert snap["param_groups"][0]["lr"] == lr0 * 0.5 ** (dc.RESUME_STEPS // 2)
    assert snap["fused_flat"]["step"] == dc.RESUME_STEPS


@pytest.mark.parametrize("case", CASES)
def test_one_process_resume_is_bitwise(case, tmp_path):
    res = dc.resume_run(case, lambda dtype: dc.mlp().to(dtype), str(tmp_path / "ckpt"))
    assert_case_exercised(case, res["straight"])
    assert_same_run(res["straight"], res["resumed"])


@pytest.fixture(scope="module")
def fsdp_resume(tmp_path_factory):
    from tests.test_distributed import launch

    return launch("fsdp2_resume", str(tmp_path_factory.mktemp("fsdp2_resume")))


@pytest.mark.parametrize("case", CASES)
def test_fsdp2_resume_is_bitwise(fsdp_resume, case):
    for r in fsdp_resume:
        res = r[case]
        assert_case_exercised(case, res["straight"])
        assert_same_run(res["straight"], res["resumed"])
        # the parameter-shaped state was loaded sharded like the parameter
        assert "DTensor" in {t for st in res["resumed"]["types"].values() for t in st.values()}
    r0, r1 = (r[case]["resumed"]["params"] for r in fsdp_resume)
    assert all(torch.equal(a, b) for a, b in zip(r0, r1))   # the replicas agree


def _trained():
    model = dc.mlp()
    opt, sched = dc.make_resume("sam_adamw", model)
    x, y = dc.batch(0)
    dc.train_step("sam", model, opt, x, y)
    return model, opt


def test_checkpoint_without_optimizer_state_is_a_clear_error(tmp_path):
    model, _ = _trained()
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(tmp_path / "c"))
    fresh = dc.mlp(seed=1)
    opt, _ = dc.make_resume("sam_adamw", fresh)
    before = [p.detach().clone() for p in fresh.parameters()]
    with pytest.raises(ValueError, match="no optimizer state"):
        load_checkpoint(str(tmp_path / "c"), fresh, opt)
    assert all(torch.equal(a, b) for a, b in zip(before, fresh.parameters()))


def test_checkpoint_of_other_parameters_is_a_clear_error_and_loads_nothing(tmp_path):
    """The checkpoint has the model's entries but optimizer state for a parameter ('2.weight')
    the model lacks: ValueError naming it, and neither model nor optimizer changed."""
    model, opt = _trained()
    save_checkpoint(str(tmp_path / "c"), model, opt)
    small = nn.Sequential(nn.Linear(6, 7))
    opt2, _ = dc.make_resume("sam_adamw", small)
    before = [p.detach().clone() for p in small.parameters()]
    with pytest.raises(ValueError, match="'2.weight'"):
        load_checkpoint(str(tmp_path / "c"), small, opt2)
    assert all(torch.equal(a, b) for a, b in zip(before, small.parameters()))
    assert len(opt2.state) == 0 and opt2.param_groups[0]["lr"] == 0.01
