"""Every example in examples/ runs in its smoke mode (seconds each) and reports finite
metrics: what `make test` promises about the examples."""
import math
import os
import runpy

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")

# script, extra arguments, a module it needs (skipped without it)
CASES = [
    ("cifar_synthetic.py", [], None),
    ("diagnostics.py", [], "sklearn"),
    ("chains.py", [], "sklearn"),
    ("lightning_fsgld.py", [], "lightning.pytorch"),
    ("transformers_fsgld.py", [], "transformers"),
    ("transformers_fsgld.py", ["--optimizer", "sam"], "transformers"),
]


def test_every_example_is_covered():
    scripts = {f for f in os.listdir(EXAMPLES) if f.endswith(".py")}
    assert scripts == {c[0] for c in CASES}


def _numbers(x):
    if isinstance(x, dict):
        for v in x.values():
            yield from _numbers(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _numbers(v)
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield float(x)


@pytest.mark.parametrize("script,argv,needs", CASES,
                         ids=[f"{c[0]}{'-' + '-'.join(c[1]) if c[1] else ''}" for c in CASES])
def test_example_smoke(tmp_path, monkeypatch, script, argv, needs):
    if needs:
        pytest.importorskip(needs)
    monkeypatch.chdir(tmp_path)
    module = runpy.run_path(os.path.join(EXAMPLES, script), run_name="example")
    result = module["main"](["--smoke", *argv])
    values = list(_numbers(result))
    assert values and all(math.isfinite(v) for v in values), result
