"""The registry and the spec format: every spec loads and agrees with its functions; bad use fails clearly."""

from __future__ import annotations

import functools
import inspect
import textwrap
from pathlib import Path

import numpy as np
import pytest

import reference
from reference.registry import SpecError, load_spec

OPS = reference.ops()


def test_the_eight_core_normalizers_are_registered():
    core = {
        "batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm",
        "weight_norm", "spectral_norm", "weight_standardization",
    }
    missing = core - set(OPS)
    assert not missing, f"core normalizers without a spec: {sorted(missing)}"


@pytest.mark.parametrize("name", OPS)
def test_spec_agrees_with_function_signatures(name):
    op = reference.get(name)
    spec = op.spec
    if spec.is_optimizer:
        _check_optimizer_signatures(op)
        return
    tensors = [t.name for t in spec.inputs] + [t.name for t in spec.state]
    pairs = [(op.function, [])]
    if spec.backward != "none":
        pairs.append((op.vjp_function, ["d" + t.name for t in spec.outputs]))
    for fn, leading in pairs:
        params = inspect.signature(fn).parameters.values()
        positional = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
        kw_only = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}
        assert positional == leading + tensors, f"{fn.__name__}: parameters {positional}"
        assert list(kw_only) == list(spec.hparams), f"{fn.__name__}: hyper-parameters {list(kw_only)}"
        for key, default in kw_only.items():
            assert spec.hparams[key].default == default, f"{fn.__name__}: default of {key}"
    if spec.state:
        assert spec.init_state, "stateful op without init_state"


def _check_optimizer_signatures(op):
    """init(params, *, hp) and step(params, grads, state, *, hp), hp = the spec's, same defaults."""
    spec = op.spec
    for fn, positional_names in ((op.spec_init, ["params"]), (op.function, ["params", "grads", "state"])):
        params = inspect.signature(fn).parameters.values()
        positional = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
        kw_only = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}
        assert positional == positional_names, f"{fn.__name__}: parameters {positional}"
        assert list(kw_only) == list(spec.hparams), f"{fn.__name__}: hyper-parameters {list(kw_only)}"
        for key, default in kw_only.items():
            assert spec.hparams[key].default == default, f"{fn.__name__}: default of {key}"
        assert getattr(fn, "__normref_op__", (None,))[0] == spec.name, f"{fn.__name__} is not decorated"
    assert spec.state, "an optimizer declares its [[slots]]"


@pytest.mark.parametrize("name", OPS)
def test_spec_has_citation_cases_and_dialect_coverage(name):
    spec = reference.get(name).spec
    assert spec.citation.title and spec.citation.equations and spec.citation.code
    assert spec.properties, "every op names the invariants its property tests check"
    assert spec.cases, "every op has seeded default cases"
    covered = {c["dialect"] for c in spec.cases}
    uncovered = set(spec.dialects) - covered
    assert not uncovered, f"dialects without a [[cases]] entry: {sorted(uncovered)}"


def test_unknown_op_names_the_known_ones():
    with pytest.raises(KeyError, match="unknown op 'batch_nrom'.*batch_norm"):
        reference.get("batch_nrom")


def test_unknown_hparam_names_op_and_key():
    op = reference.get("batch_norm")
    with pytest.raises(TypeError, match=r"batch_norm: unknown hyper-parameter 'epsilon'.*eps"):
        op.apply({"x": np.ones((2, 3))}, None, epsilon=1e-5)


@pytest.mark.parametrize(
    ("key", "value", "exc", "pattern"),
    [
        ("eps", -0.5, ValueError, r"'eps' must be float > 0.0, got -0.5"),
        ("eps", 0.0, ValueError, r"'eps' must be float > 0.0"),
        ("eps", float("nan"), ValueError, r"'eps'"),
        ("momentum", 1.5, ValueError, r"'momentum' must be float >= 0.0 and <= 1.0 or None, got 1.5"),
        ("momentum_convention", "newest", ValueError, r"one of 'new_weight', 'old_weight'"),
        ("training", "yes", TypeError, r"'training' must be a bool"),
        ("axis", 1.5, TypeError, r"'axis' must be an int"),
    ],
)
def test_bad_hparam_values_name_key_expected_and_actual(key, value, exc, pattern):
    op = reference.get("batch_norm")
    with pytest.raises(exc, match=pattern):
        op.apply({"x": np.ones((2, 3))}, None, **{key: value})


def test_human_api_validates_against_the_same_spec():
    from reference.normalizers.batch_norm import batch_norm

    with pytest.raises(ValueError, match="batch_norm: hyper-parameter 'eps' must be float > 0.0"):
        batch_norm(np.ones((2, 3)), eps=-1.0, track_running_stats=False)


def test_promotion_is_recorded_and_non_float_rejected():
    op = reference.get("batch_norm")
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    outputs, _ = op.apply({"x": x}, None)
    assert outputs.promoted == {"x": "float32"}
    assert outputs["y"].dtype == np.float64
    with pytest.raises(TypeError, match="batch_norm: x must have a real floating dtype.*got int64"):
        op.apply({"x": x.astype(np.int64)}, None)
    with pytest.raises(TypeError, match="batch_norm: x must have a real floating dtype.*complex"):
        op.apply({"x": x.astype(np.complex128)}, None)


def test_unknown_input_state_and_cotangent_keys_are_rejected():
    op = reference.get("batch_norm")
    x = np.ones((2, 3))
    with pytest.raises(TypeError, match="unknown input 'X'"):
        op.apply({"X": x}, None)
    with pytest.raises(TypeError, match="unknown state 'running_avg'"):
        op.apply({"x": x}, {"running_avg": np.zeros(3)})
    with pytest.raises(TypeError, match="unknown cotangent 'dy'"):
        op.vjp({"x": x}, None, {"dy": x})
    with pytest.raises(ValueError, match="input 'x' is required"):
        op.apply({}, None)


def test_dialect_lookup():
    op = reference.get("batch_norm")
    assert op.dialect("flax")["momentum_convention"] == "old_weight"
    with pytest.raises(ValueError, match="unknown dialect 'mxnet'; known: .*torch"):
        op.dialect("mxnet")


GOOD_SPEC = """
name = "toy"
family = "normalizers"
summary = "toy"
function = "reference.normalizers.batch_norm:batch_norm"
vjp = "reference.normalizers.batch_norm:batch_norm_vjp"
backward = "exact"
[citation]
title = "t"
equations = "(1)"
code = "c"
[[inputs]]
name = "x"
shape = "(N,)"
differentiable = true
[[outputs]]
name = "y"
shape = "like x"
[hparams.eps]
type = "float"
default = 1e-5
gt = 0.0
"""


@pytest.mark.parametrize(
    ("mutation", "pattern"),
    [
        (lambda s: s.replace('name = "toy"', 'name = "other"'), "must equal the file name"),
        (lambda s: s.replace('backward = "exact"', 'backward = "magic"'), "backward must be one of"),
        (lambda s: s.replace('default = 1e-5', 'default = -1.0'), r"\[hparams.eps\]: default is invalid"),
        (lambda s: s.replace('type = "float"', 'type = "complex"'), r"\[hparams.eps\]: type must be one of"),
        (lambda s: s.replace('equations = "(1)"\n', ''), r"\[citation\]: missing key 'equations'"),
        (lambda s: s.replace('gt = 0.0', 'gt = 0.0\nunits = "m"'), r"unknown keys \['units'\]"),
        (lambda s: s + '[dialects.torch]\nhparams = { epsilon = 1 }\n', r"\[dialects.torch\]: unknown hyper-parameter 'epsilon'"),
        (lambda s: s + '[dialects.torch]\nhparams = { eps = -1.0 }\n', r"\[dialects.torch\].*'eps' must be float > 0.0"),
        (lambda s: s + '[[cases]]\nname = "a"\nshapes = { z = [2] }\n', r"shapes names unknown input 'z'"),
        (lambda s: s + "[[state]]\nname = 's'\nshape = '()'\n", "has \\[\\[state\\]\\] but no 'init_state'"),
        (lambda s: s.replace("summary", "summary = \n"), "not valid TOML"),
        (lambda s: s.replace('backward = "exact"', 'backward = "none"'), "backward = 'none' has no 'vjp'"),
        (lambda s: s.replace('backward = "exact"', 'backward = "custom"'), "backward_properties .* are required"),
        (lambda s: s.replace('backward = "exact"', 'backward = "custom"\nbackward_properties = ["x"]'),
         r"backward_properties must be among properties, got \['x'\]"),
        (lambda s: s.replace("differentiable = true", ""), "backward = 'exact' needs a differentiable input"),
        (lambda s: s.replace('backward = "exact"', 'backward = "exact"\ntolerance = "standardizer"'),
         r"unknown keys \['tolerance'\]"),
        (lambda s: s.replace('shape = "like x"', 'shape = "like x"\nscaled_by = "z"'),
         r"'y': scaled_by must name another output, got 'z'"),
    ],
)
def test_malformed_spec_names_file_and_key(tmp_path, mutation, pattern):
    path = tmp_path / ("toy.toml")
    path.write_text(textwrap.dedent(mutation(GOOD_SPEC)))
    with pytest.raises(SpecError, match=pattern) as info:
        load_spec(path)
    assert str(path) in str(info.value)


def test_good_spec_loads(tmp_path):
    path = tmp_path / "toy.toml"
    path.write_text(GOOD_SPEC)
    spec = load_spec(path)
    assert spec.hparams["eps"].default == 1e-5


@functools.cache
def _property_tests() -> frozenset[str]:
    """What the test files name as checked properties: ``test_<property>`` functions and the
    arguments of ``@pytest.mark.checks(...)`` (read from the source, not collected)."""
    import ast

    found: set[str] = set()
    for path in Path(__file__).parent.glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef) or not node.name.startswith("test_"):
                continue
            found.add(node.name[len("test_"):])
            for deco in node.decorator_list:
                call = deco if isinstance(deco, ast.Call) else None
                if call is not None and ast.unparse(call.func).endswith("mark.checks"):
                    found |= {a.value for a in call.args if isinstance(a, ast.Constant)}
    return frozenset(found)


@pytest.mark.parametrize("name", OPS)
def test_every_spec_property_names_a_test(name):
    """A spec's ``properties`` are claims: each must be the name of a test (test_<property>) or
    be listed by a test's ``@pytest.mark.checks(...)``."""
    unbound = [p for p in reference.get(name).spec.properties if p not in _property_tests()]
    assert not unbound, f"{name}: properties with no test: {unbound}"
