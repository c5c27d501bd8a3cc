"""The built-in keras adapter (Keras 3 layers and optimizers, backend autodiff) run through the
conformance harness.

Importing it imports no framework; creating it picks the jax backend unless ``KERAS_BACKEND`` says
otherwise, with x64 enabled first.  Its declared conventions are the specs' ``keras`` tables, knob
for knob; a quick-profile subset gives no FAIL and no ERROR; Keras's float64 layers compute in
float32 (the finding ``xfails/keras.toml`` records), and a wrong declaration is flagged.
XLA compilation dominates the time: the checks run few ops, dtypes and cases.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

if importlib.util.find_spec("keras") is None or importlib.util.find_spec("jax") is None:
    pytest.skip("keras (with jax) is not installed", allow_module_level=True)

import reference  # noqa: E402
from conformance import runner  # noqa: E402
from conformance.adapters import BUILTIN, Request, Unsupported, available_builtin, load_adapter  # noqa: E402


@pytest.fixture(scope="module")
def adapter():
    if os.environ.get("KERAS_BACKEND", "jax") != "jax":
        pytest.skip("these checks run the jax backend")
    return load_adapter("keras")


def _run(adapter, op: str, dtypes: list[str], cases: tuple[str, ...] = ()):
    """The quick profile of ``op``, restricted to the named cases (all when none are named)."""
    planned = runner.plan(adapter, ops=f"^{op}$", dtypes=dtypes, profile="quick")
    if cases:
        planned = [p for p in planned if p.name in cases]
    assert planned, f"no cases planned for {op}"
    return runner.run(adapter, planned, profile="quick")


def _problems(results) -> list[str]:
    return [f"{r.verdict} {r.id}: {r.message}" for r in results if r.verdict in ("FAIL", "ERROR")]


# --------------------------------------------------------------------------------------------
# The adapter object
# --------------------------------------------------------------------------------------------


def test_importing_imports_no_framework_and_creating_picks_jax_with_x64():
    code = (
        "import os, sys\n"
        "os.environ.pop('KERAS_BACKEND', None)\n"
        "import conformance.adapters.keras as m\n"
        "assert not {'keras', 'jax', 'torch'} & set(sys.modules), 'a framework imported at import'\n"
        "a = m.make_adapter()\n"
        "assert os.environ['KERAS_BACKEND'] == 'jax' and a.backend.name == 'jax'\n"
        "import jax\n"
        "assert jax.config.jax_enable_x64, 'creating the adapter must enable x64'\n"
        "assert 'torch' not in sys.modules, 'torch imported by the jax backend'\n"
        "assert a.info()['backend'].startswith('jax')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_a_users_keras_backend_is_respected():
    """KERAS_BACKEND=torch: the same mappings on torch tensors, torch autograd and optimizer.apply."""
    code = (
        "import numpy as np, reference\n"
        "from conformance.adapters import Request\n"
        "from conformance.adapters.keras import make_adapter\n"
        "a = make_adapter()\n"
        "assert a.backend.name == 'torch' and a.info()['backend'].startswith('torch')\n"
        "spec = reference.get('layer_norm').spec\n"
        "x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)\n"
        "r = Request('layer_norm', 'float32', {'x': x}, None, spec.resolve({}), {'y': np.ones_like(x)})\n"
        "got = a.evaluate('layer_norm', r)\n"
        "y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)\n"
        "assert np.allclose(got.outputs['y'], y, atol=1e-5), got.outputs['y']\n"
        "assert np.allclose(got.grads['x'], 0, atol=1e-5)  # sum of a normalized row: constant\n"
        "op = reference.get('sgd')\n"
        "hp = op.spec.resolve({'lr': 0.1, 'momentum': 0.9, **a.ops()['sgd'].dialect})\n"
        "inputs = {'params/w': np.ones(3, np.float32), 'grads/w': np.full(3, 2.0, np.float32)}\n"
        "state = op.init_state(inputs, **hp)\n"
        "got = a.evaluate('sgd', Request('sgd', 'float32', inputs, state, hp, None))\n"
        "assert np.allclose(got.outputs['params/w'], 0.8) and np.allclose(got.state['momentum_buffer/w'], 0.2)\n"
        "assert got.state['step'] == 1\n"
    )
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr


def test_registered_as_a_builtin(adapter):
    assert BUILTIN["keras"] == "conformance.adapters.keras"
    assert "keras" in available_builtin()
    info = adapter.info()
    assert info["framework"] == "keras" and info["version"] and info["backend"].startswith("jax")


REQUIRED = {"batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm", "l2_normalize",
            "sgd", "adam", "adamw", "adagrad", "rmsprop", "adafactor", "lion", "lamb",
            "per_tensor_clip", "global_norm_clip"}


def test_declared_conventions_are_the_spec_keras_tables(adapter):
    """The adapter's declarations and the specs' [dialects.keras] tables (read from Keras's
    source) are one claim: knob for knob equal, every switch of the table declared, nothing
    numeric or layout declared."""
    ops = adapter.ops()
    assert REQUIRED <= set(ops)
    for op, support in ops.items():
        spec = reference.get(op).spec
        table = spec.dialects["keras"]["hparams"]
        spec.resolve(support.dialect)  # valid values
        for knob, value in support.dialect.items():
            assert knob in table and table[knob] == value, (op, knob, value, table.get(knob))
        switches = {k for k in table if spec.hparams[k].allowed is not None and spec.hparams[k].type != "mask"}
        assert switches <= set(support.dialect), (op, switches - set(support.dialect))
        assert not set(support.dialect) & {"axis", "axes", "eps", "momentum", "lr", "num_groups"}, op
        if spec.is_optimizer:
            # Keras's learning_rate is a float32 (floatx) variable whatever the parameters' dtype.
            assert support.hparam_dtype == "float32" and set(support.dtypes) == {"float64", "float32"}
            assert "step" not in support.not_kept, op   # Keras keeps `iterations` everywhere
        else:
            assert set(support.dtypes) == {"float64", "float32", "float16", "bfloat16"}, op
    assert ops["batch_norm"].not_kept == ("num_batches_tracked",)


def _request(adapter, op: str, inputs, *, state=None, cotangents=None, dtype="float64", **hp) -> Request:
    spec = reference.get(op).spec
    resolved = spec.resolve({**hp, **adapter.ops()[op].dialect})
    if state is None and spec.state:
        state = reference.get(op).init_state(inputs, **resolved)
    return Request(op, dtype, inputs, state, resolved, cotangents)


@pytest.mark.parametrize(
    "op, inputs, hp, reason",
    [
        ("batch_norm", {"x": np.ones((4, 3))}, {"momentum": None, "axis": -1}, "momentum=None"),
        ("batch_norm", {"x": np.ones((4, 3))}, {"training": False, "track_running_stats": False, "axis": -1},
         "moving statistics"),
        ("rms_norm", {"x": np.ones((2, 4)), "bias": np.zeros(4)}, {}, "no bias"),
        ("instance_norm", {"x": np.ones((2, 3, 4))}, {"track_running_stats": True}, "running statistics"),
        ("sgd", {"params/w": np.ones(3), "grads/w": np.ones(3)}, {"momentum": 0.9, "dampening": 0.5},
         "dampening"),
        ("adafactor", {"params/w": np.ones((3, 2)), "grads/w": np.ones((3, 2))}, {"weight_decay": 0.1},
         "alpha_t"),
    ],
)
def test_what_keras_cannot_express_is_unsupported(adapter, op, inputs, hp, reason):
    with pytest.raises(Unsupported, match=reason):
        adapter.evaluate(op, _request(adapter, op, inputs, **hp))


def test_unit_normalization_is_the_norm_form_with_eps_1e12(adapter):
    """keras.layers.UnitNormalization (the layer itself, eps fixed at 1e-12) agrees with the oracle
    under the spec's keras table on rows with norms from 1e-13 to 1e-5, where the squared-norm form
    (floor sqrt(1e-12) = 1e-6) differs by up to 1e6."""
    keras = adapter.keras
    rng = np.random.default_rng(7)
    rows = rng.standard_normal((9, 5))
    x = rows / np.linalg.norm(rows, axis=-1, keepdims=True) * np.logspace(-13, -5, 9)[:, None]
    y = keras.ops.convert_to_numpy(keras.layers.UnitNormalization(axis=-1, dtype="float64")(x))
    op = reference.get("l2_normalize")
    want = op.apply({"x": x}, None, **op.dialect("keras"))[0]["y"]
    np.testing.assert_allclose(y, want, rtol=1e-14, atol=0)
    squared = op.apply({"x": x}, None, **{**op.dialect("keras"), "eps_clamps": "squared_norm"})[0]["y"]
    assert np.max(np.abs(squared - y)) > 0.5


def test_rms_scaling_is_neither_layer_norm_nor_rms_norm(adapter):
    """Why LayerNormalization(rms_scaling=True) is not mapped: it computes x * rsqrt(var(x) + eps),
    the variance without centring, which differs from both registered ops on data with a mean."""
    keras = adapter.keras
    x = np.random.default_rng(5).standard_normal((4, 16)) + 1.0
    with pytest.warns(UserWarning, match="variance, not the root mean square"):
        layer = keras.layers.LayerNormalization(rms_scaling=True, epsilon=1e-3, dtype="float32")
    y = keras.ops.convert_to_numpy(layer(x.astype(np.float32))).astype(np.float64)
    np.testing.assert_allclose(y, x / np.sqrt(x.var(-1, keepdims=True) + 1e-3), rtol=1e-5)
    for name in ("layer_norm", "rms_norm"):
        op = reference.get(name)
        other = op.apply({"x": x}, None, **{**op.dialect("keras"), "eps": 1e-3})[0]["y"]
        assert np.max(np.abs(other - y)) > 0.5, name


def test_optimizer_steps_from_a_nontrivial_state_match_the_oracle(adapter):
    """Two steps from the state each returned, a new lr each step: slots loaded and read back
    under the right names and signs (SGD's buffer is minus Keras's), Adafactor's factored and
    unfactored parameters, the step count from Keras's iterations.  float64 where Keras computes
    in float64 (its ops.mean does not: Adafactor runs float32)."""
    rng = np.random.default_rng(3)
    shapes = {"w": (6, 5), "c": (4, 3, 2), "b": (6,)}
    for op, dtype, hp, rtol in [
        ("sgd", "float64", {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-2}, 1e-12),
        ("adam", "float64", {"amsgrad": True, "weight_decay": 1e-2, "weight_decay_mask": "ndim>=2"}, 1e-12),
        ("rmsprop", "float64", {"centered": True, "momentum": 0.5}, 1e-12),
        ("adafactor", "float32", {}, 2e-5),
    ]:
        oracle = reference.get(op)
        resolved = oracle.spec.resolve({**hp, **adapter.ops()[op].dialect})
        inputs = {f"params/{p}": rng.standard_normal(s).astype(dtype) for p, s in shapes.items()}
        state = oracle.init_state(inputs, **resolved)
        for lr in (0.03, 0.01):   # float32 values: the mapping's hparam_dtype
            resolved["lr"] = lr = float(np.float32(lr))
            inputs.update({f"grads/{p}": rng.standard_normal(s).astype(dtype) for p, s in shapes.items()})
            got = adapter.evaluate(op, Request(op, dtype, inputs, state, resolved, None))
            wide = {k: np.asarray(v, np.float64) for k, v in {**inputs, **state}.items()}
            out, want_state = oracle.apply({k: wide[k] for k in inputs},
                                           {k: wide[k] for k in state}, **resolved)
            assert set(got.state) == set(want_state), op
            for key, want in {**out, **want_state}.items():
                actual = got.outputs.get(key, got.state.get(key))
                np.testing.assert_allclose(actual, want, rtol=rtol, atol=1e-30, err_msg=f"{op} {key}")
            inputs.update(got.outputs)
            state = got.state


# --------------------------------------------------------------------------------------------
# The harness, quick profile (a subset: XLA compiles every case)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op, dtypes, cases", [
    ("batch_norm", ["float32", "float16"], ("nchw_train", "keras_channels_last")),
    ("layer_norm", ["float32", "bfloat16"], ("tokens_last_axis", "keras_non_contiguous_axes")),
    ("l2_normalize", ["float64", "float16"], ("rows", "two_axes", "clamped_norm")),
    ("adam", ["float64", "float32"], ("keras_eps_hat", "amsgrad")),
    ("sgd", ["float64"], ("keras_inside", "nesterov_quadratic")),
])
def test_quick_profile_subset_has_no_fail_or_error(adapter, op, dtypes, cases):
    results = _run(adapter, op, dtypes, cases)
    assert not _problems(results), "\n".join(_problems(results))
    assert all(r.verdict == "PASS" for r in results), [(r.id, r.verdict, r.message) for r in results]


def test_float64_layers_compute_in_float32(adapter):
    """The finding: Keras's result_type maps float64 to float32 on the jax and torch backends
    (BIT64_TO_BIT32_DTYPE), so a float64 LayerNormalization computes in
    result_type(x.dtype, "float32") = float32 and returns float64 values of float32 accuracy."""
    (result,) = _run(adapter, "layer_norm", ["float64"], ("tokens_last_axis",))
    assert result.verdict == "FAIL"
    assert "consistent with float32 arithmetic" in result.diagnosis
    from keras.src.backend.common import dtypes

    assert dtypes.result_type("float64", "float32") == "float32"


# --------------------------------------------------------------------------------------------
# Mutants: a wrong declaration about Keras is flagged
# --------------------------------------------------------------------------------------------


class _Claims:
    """The keras adapter claiming ``knob = claimed`` for ``op`` while Keras keeps doing what it
    does (what a hand-written adapter with a wrong dialect would report)."""

    def __init__(self, inner, op: str, knob: str, claimed) -> None:
        self.inner, self.op, self.knob, self.claimed = inner, op, knob, claimed
        self.name = inner.name
        self.true = inner.ops()[op].dialect[knob]

    def info(self):
        return self.inner.info()

    def ops(self):
        ops = self.inner.ops()
        ops[self.op] = dataclasses.replace(ops[self.op], dialect={**ops[self.op].dialect, self.knob: self.claimed})
        return ops

    def evaluate(self, op, request):
        if op == self.op:
            request = dataclasses.replace(request, hparams={**request.hparams, self.knob: self.true})
        return self.inner.evaluate(op, request)


@pytest.mark.parametrize("op, knob, claimed, dtype, case", [
    ("batch_norm", "momentum_convention", "new_weight", "float32", "keras_channels_last"),
    ("adam", "adam_eps_mode", "corrected", "float64", "keras_eps_hat"),
])
def test_a_wrong_declaration_is_flagged(adapter, op, knob, claimed, dtype, case):
    (result,) = _run(_Claims(adapter, op, knob, claimed), op, [dtype], (case,))
    assert result.verdict == "CONVENTION", (result.verdict, result.message)
    assert knob in result.diagnosis and repr(adapter.ops()[op].dialect[knob]) in result.diagnosis
