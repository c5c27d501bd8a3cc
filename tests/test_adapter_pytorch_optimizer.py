"""The built-in pytorch_optimizer adapter (kozistr's package) run through the conformance harness.

Importing it must not import jax; its declared dialects are the conventions of the specs'
``pytorch_optimizer`` tables; the quick profile gives no FAIL and no ERROR (SKIP for what the
package cannot express, MISTRUSTED for what the dtype cannot resolve) on its per-parameter loop
and on its batched (foreach) path.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("pytorch_optimizer")

import reference  # noqa: E402
from conformance import runner, xfails  # noqa: E402
from conformance.adapters import BUILTIN, Request, Unsupported, available_builtin, load_adapter  # noqa: E402

XFAILS_FILE = Path(__file__).resolve().parent.parent / "xfails" / "pytorch_optimizer.toml"
KNOWN = xfails.load(str(XFAILS_FILE))
REQUIRED = {"lars", "lamb", "lion", "novograd", "adafactor", "ranger21", "agc"}


@pytest.fixture(scope="module")
def adapter():
    return load_adapter("pytorch_optimizer")


def _problems(results) -> list[str]:
    return [f"{r.verdict} {r.id}: {r.message}" for r in results
            if r.verdict in ("FAIL", "ERROR", "XPASS")]


def _quick(adapter, dtypes: list[str]):
    ops = "^(" + "|".join(sorted(adapter.ops())) + ")$"
    planned = runner.plan(adapter, ops=ops, dtypes=dtypes, profile="quick")
    assert planned
    return runner.run(adapter, planned, profile="quick", xfails=KNOWN)


def test_importing_the_module_does_not_import_jax():
    code = (
        "import sys, conformance.adapters.pytorch_optimizer as m\n"
        "a = m.make_adapter()\n"
        "a.ops(); a.info()\n"
        "assert 'jax' not in sys.modules, 'jax imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_registered_as_a_builtin(adapter):
    assert BUILTIN["pytorch_optimizer"] == "conformance.adapters.pytorch_optimizer"
    assert "pytorch_optimizer" in available_builtin()
    assert adapter.name == "pytorch_optimizer"
    info = adapter.info()
    assert info["framework"] == "pytorch_optimizer" and info["version"] and info["torch"]


def test_dialects_are_conventions_of_the_spec_tables(adapter):
    ops = adapter.ops()
    assert REQUIRED <= set(ops)
    for op, support in ops.items():
        spec = reference.get(op).spec
        table = spec.dialects["pytorch_optimizer"]["hparams"]
        spec.resolve(support.dialect)  # valid values
        for knob, value in support.dialect.items():
            assert knob in table and table[knob] == value, (op, knob)
            assert knob != "lr" and spec.hparams[knob].type != "mask", (op, knob)
        # every knob of the table with an allowed list (masks aside) is declared
        switches = {k for k in table if spec.hparams[k].allowed is not None
                    and spec.hparams[k].type != "mask"}
        assert switches <= set(support.dialect), (op, switches - set(support.dialect))
        assert set(support.dtypes) == {"float64", "float32"}


def _request(op: str, inputs: dict[str, np.ndarray], **hp) -> Request:
    spec = reference.get(op).spec
    from conformance.adapters.pytorch_optimizer import MAPPINGS

    resolved = spec.resolve({**hp, **MAPPINGS[op].dialect})
    state = reference.get(op).init_state(inputs, **resolved)
    return Request(op, "float64", inputs, state, resolved, None)


def test_what_the_package_cannot_express_is_unsupported(adapter):
    inputs = {"params/w": np.ones((3, 4)), "params/b": np.ones(3),
              "grads/w": np.ones((3, 4)), "grads/b": np.ones(3)}
    with pytest.raises(Unsupported, match="ndim > 1"):   # LARS never decays a bias
        adapter.evaluate("lars", _request("lars", inputs, weight_decay=1e-2, weight_decay_mask="all"))
    with pytest.raises(Unsupported, match="beta0"):
        adapter.evaluate("ranger21", _request("ranger21", inputs, pnm_momentum_factor=1.0))
    with pytest.raises(Unsupported, match="relative step"):
        adapter.evaluate("adafactor", _request("adafactor", inputs, lr=0.1))
    with pytest.raises(Unsupported):
        adapter.evaluate("batch_norm", Request("batch_norm", "float64", {}, None, {}, None))


def test_one_step_from_a_nontrivial_state_matches_the_oracle(adapter):
    """The brief's mapping check: a step from init, then one from the state it left."""
    rng = np.random.default_rng(3)
    shapes = {"w": (6, 5), "c": (4, 3, 2), "b": (6,)}
    for op, hp in [("lamb", {"lr": 1e-2, "weight_decay": 1e-2}),
                   ("adafactor", {"beta1": 0.9, "weight_decay": 1e-2}),
                   ("novograd", {"lr": 1e-2, "grad_averaging": True})]:
        oracle = reference.get(op)
        resolved = oracle.spec.resolve({**hp, **adapter.ops()[op].dialect})
        inputs = {f"params/{p}": rng.standard_normal(s) for p, s in shapes.items()}
        state = oracle.init_state(inputs, **resolved)
        for _ in range(2):
            inputs.update({f"grads/{p}": rng.standard_normal(s) for p, s in shapes.items()})
            got = adapter.evaluate(op, Request(op, "float64", inputs, state, resolved, None))
            out, state = oracle.apply(inputs, state, **resolved)
            assert set(got.state) == set(state), op
            for key, want in {**out, **state}.items():
                actual = got.outputs.get(key, got.state.get(key))
                np.testing.assert_allclose(actual, want, rtol=1e-12, atol=1e-300, err_msg=f"{op} {key}")
            inputs.update(out)


def test_quick_profile_has_no_fail_or_error(adapter):
    results = _quick(adapter, ["float64", "float32"])
    assert not _problems(results), "\n".join(_problems(results))
    passed = {r.op for r in results if r.verdict == "PASS"}
    assert passed == set(adapter.ops()), set(adapter.ops()) - passed


def test_quick_profile_foreach_path_has_no_fail_or_error():
    from conformance.adapters.pytorch_optimizer import make_adapter

    results = _quick(make_adapter(foreach=True), ["float64"])
    assert not _problems(results), "\n".join(_problems(results))
