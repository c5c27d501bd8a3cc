"""Contract v2: integer and boolean inputs (class labels, masks), shown by the test op
``class_center`` (tests/contract_ops.py, tests/specs/testing/class_center.toml)."""

from __future__ import annotations

import dataclasses
import os
import textwrap
from pathlib import Path

import numpy as np
import pytest

import helpers
import reference
from conformance import judge, memo, planning, runner
from conformance.adapters import OpSupport, Response
from conformance.adapters.numpy32 import NumPy32Adapter
from reference.spec import SpecError, all_specs, load_spec, specs_dirs

HERE = Path(__file__).parent
DTYPES = ("float64", "float32", "float16", "bfloat16")


def _forget() -> None:
    all_specs.cache_clear()
    planning.cases_for.cache_clear()
    memo.clear()


@pytest.fixture
def test_ops(monkeypatch):
    """normref's specs plus tests/specs (the contract's test ops), for this test only."""
    monkeypatch.setenv("NORMREF_SPECS", os.pathsep.join([str(p) for p in specs_dirs()] + [str(HERE / "specs")]))
    _forget()
    yield reference.get("class_center")
    monkeypatch.delenv("NORMREF_SPECS")
    _forget()


def _loop_reference(x, labels, valid, num_classes):
    """The class means written as loops (tests/contract_ops.py docstring)."""
    y = x.copy()
    for c in range(num_classes):
        members = [j for j in range(len(x)) if labels[j] == c and valid[j]]
        mean = np.mean(x[members], axis=0) if members else np.zeros(x.shape[1])
        y[labels == c] -= mean
    return y


def test_integer_and_boolean_inputs_in_the_oracle(test_ops):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 3))
    labels = np.array([0, 4, 0, 2, 4, 4, 0], dtype=np.int32)   # any integer dtype; 1 and 3 absent
    valid = np.array([True, True, False, True, False, True, True])
    outputs, _ = test_ops.apply({"x": x, "labels": labels, "valid": valid}, None, num_classes=5)
    y = outputs["y"]
    assert np.allclose(y, _loop_reference(x, labels, valid, 5), rtol=0, atol=8 * 2.0**-53 * np.max(np.abs(x)))
    helpers.assert_vjp("class_center", {"x": x, "labels": labels, "valid": valid}, num_classes=5)
    grads = test_ops.vjp({"x": x, "labels": labels, "valid": valid}, None, {"y": np.ones_like(x)}, num_classes=5)
    assert set(grads) == {"x"}   # labels and masks are never differentiated


@pytest.mark.parametrize(("given", "needle"), [
    ({"labels": np.array([0.0, 1.0, 2.0])}, "labels must be an integer array (int8 ... int64, uint8 ...), got float64"),
    ({"labels": np.array([True, False, True])}, "labels must be an integer array (int8 ... int64, uint8 ...), got bool"),
    ({"valid": np.array([1, 0, 1])}, "valid must be a boolean array, got int64"),
])
def test_a_label_or_mask_of_the_wrong_kind_is_named(test_ops, given, needle):
    inputs = {"x": np.ones((3, 2)), "labels": np.array([0, 1, 2]), "valid": np.ones(3, dtype=bool), **given}
    with pytest.raises(TypeError, match=needle.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        test_ops.apply(inputs, None)


@pytest.mark.checks("class_means_of_valid_rows_are_zero", "empty_class_leaves_rows_unchanged")
def test_generated_cases_draw_labels_in_their_domain(test_ops):
    """Labels are int64 in [0, num_classes) (one class: all 0; nine classes over four rows:
    some absent), masks are bool; the op's claims hold on every generated case."""
    seen_absent = False
    for case in planning.cases_for("class_center", planning.PROFILES["default"], 0):
        name, c = case
        labels, valid, x = c.inputs["labels"], c.inputs["valid"], c.inputs["x"]
        k = c.hparams["num_classes"]
        assert labels.dtype == np.int64 and valid.dtype == np.bool_, name
        assert labels.min() >= 0 and labels.max() < k, name
        if not np.all(np.isfinite(x)):
            continue
        y = test_ops.apply(c.inputs, None, **c.hparams)[0]["y"]
        for cls in range(k):
            rows = (labels == cls) & valid
            if rows.any():
                assert np.allclose(np.sum(y[rows], axis=0), 0.0, atol=64 * 2.0**-53 * np.sum(np.abs(x[labels == cls])))
            elif (labels == cls).any():
                seen_absent = True
                assert np.array_equal(y[labels == cls], x[labels == cls])
    assert seen_absent


class _Recording(NumPy32Adapter):
    """The same-precision baseline, recording what it is sent."""

    name = "recording"

    def __init__(self) -> None:
        super().__init__()
        self.seen: list = []

    def ops(self):
        return {"class_center": OpSupport({}, DTYPES, "test")}

    def evaluate(self, op, request):
        self.seen.append(request)
        return super().evaluate(op, request)


def test_labels_and_masks_reach_the_adapter_unchanged_and_a_correct_adapter_passes(test_ops):
    adapter = _Recording()
    planned = runner.plan(adapter, ops="^class_center$", dtypes=DTYPES, profile="quick")
    results = runner.run(adapter, planned, profile="quick")
    assert {r.verdict for r in results} <= {"PASS", "MISTRUSTED"} and any(r.verdict == "PASS" for r in results)
    cases = {p.case.name: p.case for p in planned}
    for request in adapter.seen:
        assert request.inputs["labels"].dtype == np.int64 and request.inputs["valid"].dtype == np.bool_
        assert request.inputs["x"].dtype.name == request.dtype or request.dtype == "bfloat16"
    originals = [c.inputs["labels"] for c in cases.values()]
    assert all(any(np.array_equal(r.inputs["labels"], o) for o in originals) for r in adapter.seen)
    assert not any("grads.labels" in line or "grads.valid" in line for r in results for line in r.comparisons)


class _IgnoresTheMask(_Recording):
    """A forward mistake: the class means over every row of the class, valid or not."""

    name = "ignores-mask"

    def evaluate(self, op, request):
        inputs = {**request.inputs, "valid": np.ones_like(request.inputs["valid"])}
        return super().evaluate(op, dataclasses.replace(request, inputs=inputs))


class _BackwardWithoutTheMask(_Recording):
    """A backward mistake: dx = dy - (1/n) sum dy for every row, invalid ones included."""

    name = "backward-no-mask"

    def evaluate(self, op, request):
        response = super().evaluate(op, request)
        if request.cotangents is not None:
            labels = request.inputs["labels"]
            valid, dy = request.inputs["valid"], request.cotangents["y"].astype(np.float64)
            k = request.hparams["num_classes"]
            onehot = (labels[:, None] == np.arange(k)).astype(np.float64)
            counts = (onehot * valid[:, None]).sum(axis=0)
            per_class = onehot.T @ dy / np.where(counts > 0, counts, 1.0)[:, None]
            response.grads = {"x": (dy - onehot @ per_class).astype(request.inputs["x"].dtype)}
        return response


@pytest.mark.parametrize("mutant", [_IgnoresTheMask, _BackwardWithoutTheMask])
def test_mask_mutants_fail(test_ops, mutant):
    adapter = mutant()
    planned = runner.plan(adapter, ops="^class_center$", dtypes=("float64", "float32"), profile="quick")
    results = runner.run(adapter, planned, profile="quick", diagnose_fail=False)
    assert sum(r.verdict == "FAIL" for r in results) >= 2


@pytest.mark.parametrize(("inputs_block", "needle"), [
    ('name = "labels"\nshape = "(N,)"\ndtype = "int64"\n', "int64 inputs need 'upper'"),
    ('name = "labels"\nshape = "(N,)"\ndtype = "int64"\nupper = "eps"\n', "upper must be an int >= 1 or the name of an int"),
    ('name = "labels"\nshape = "(N,)"\ndtype = "int64"\nupper = 3\ndifferentiable = true\n', "never differentiable"),
    ('name = "mask"\nshape = "(N,)"\ndtype = "bool"\ndomain = "index"\n', "domain of a bool input must be one of ('mask',)"),
    ('name = "mask"\nshape = "(N,)"\ndtype = "int8"\n', "dtype must be one of ('float64', 'int64', 'bool')"),
])
def test_a_malformed_discrete_input_is_a_spec_error(tmp_path, inputs_block, needle):
    text = textwrap.dedent("""\
        name = "toy"
        family = "testing"
        summary = "toy"
        function = "contract_ops:class_center"
        vjp = "contract_ops:class_center_vjp"
        backward = "exact"
        [citation]
        title = "t"
        equations = "(1)"
        code = "c"
        [[inputs]]
        name = "x"
        shape = "(N, D)"
        differentiable = true
        [[inputs]]
        """) + inputs_block + textwrap.dedent("""\
        [[outputs]]
        name = "y"
        shape = "like x"
        [hparams.eps]
        type = "float"
        default = 1e-5
        """)
    path = tmp_path / "toy.toml"
    path.write_text(text)
    with pytest.raises(SpecError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_spec(path)


# -- state updated by the backward pass (custom backward): backward_ema -------------------------


@pytest.mark.checks("statistic_is_an_ema_of_mean_squared_dy", "dx_is_dy_over_root_of_updated_statistic")
def test_the_backward_pass_returns_its_state(test_ops):
    op = reference.get("backward_ema")
    assert op.spec.backward_state == ("phi",) and op.spec.backward == "custom"
    rng = np.random.default_rng(1)
    x, phi = rng.standard_normal((4, 3)), np.asarray(0.7)
    outputs, state = op.apply({"x": x}, {"phi": phi}, momentum=0.8)
    assert np.array_equal(outputs["y"], x) and np.array_equal(state["phi"], phi)  # the forward keeps phi
    dy = rng.standard_normal((4, 3))
    grads, updated = op.backward({"x": x}, {"phi": phi}, {"y": dy}, momentum=0.8)
    expected_phi = 0.8 * 0.7 + 0.2 * np.mean(dy * dy)
    assert np.isclose(updated["phi"], expected_phi, rtol=4 * 2.0**-53, atol=0)
    assert np.allclose(grads["x"], dy / np.sqrt(expected_phi + 1e-5), rtol=8 * 2.0**-53, atol=0)
    assert set(op.vjp({"x": x}, {"phi": phi}, {"y": dy}, momentum=0.8)) == {"x"}


class _BackwardEmaAdapter(NumPy32Adapter):
    name = "backward-ema"

    def ops(self):
        return {"backward_ema": OpSupport({}, DTYPES, "test")}


class _ForgetsTheBackwardState(_BackwardEmaAdapter):
    """Runs the backward but returns the state as the forward left it (the update is lost)."""

    name = "forgets-backward-state"

    def evaluate(self, op, request):
        response = super().evaluate(op, request)
        response.state = dict(request.state)
        return response


class _MomentumOnTheNewValue(_BackwardEmaAdapter):
    """The other EMA convention: phi' = (1 - m) phi + m mean(dy^2)."""

    name = "ema-convention"

    def evaluate(self, op, request):
        hp = {**request.hparams, "momentum": 1.0 - request.hparams["momentum"]}
        return super().evaluate(op, dataclasses.replace(request, hparams=hp))


def test_state_the_backward_updates_is_compared_step_by_step(test_ops):
    control = _BackwardEmaAdapter()
    planned = runner.plan(control, ops="^backward_ema$", dtypes=("float64", "float32"), profile="quick")
    results = runner.run(control, planned, profile="quick")
    assert {r.verdict for r in results} <= {"PASS", "MISTRUSTED"}
    assert all(r.steps == runner.PROFILES["quick"].steps for r in results if r.verdict == "PASS")
    for mutant in (_ForgetsTheBackwardState(), _MomentumOnTheNewValue()):
        results = runner.run(mutant, planned, profile="quick", diagnose_fail=False)
        failing = [r for r in results if r.verdict == "FAIL"]
        assert len(failing) >= 2, mutant.name
        assert any("state.phi" in line for r in failing for line in r.comparisons), mutant.name


# -- a metric with jumps (bin edges): binned_ece -------------------------------------------------


@pytest.mark.checks("binning_is_floor_of_c_times_bins")
def test_binning_is_floor_of_c_times_bins(test_ops):
    """b_i = min(floor(c_i B), B - 1): an edge k/B belongs to bin k, c = 1 to the last bin."""
    op = reference.get("binned_ece")
    c = np.array([0.0, 0.2, 0.39, 0.4, 0.99, 1.0])
    a = np.array([True, False, True, True, False, True])
    bins = [0, 1, 1, 2, 4, 4]
    gaps = np.zeros(5)
    for ci, ai, b in zip(c, a, bins, strict=True):
        gaps[b] += float(ai) - ci
    (ece,) = op.apply({"confidence": c, "correct": a}, None, num_bins=5)[0].values()
    assert ece == pytest.approx(np.sum(np.abs(gaps)) / len(c), rel=8 * 2.0**-53, abs=0)


class _EceAdapter(NumPy32Adapter):
    """binned_ece computed in the request's dtype with a given binning rule."""

    name = "ece"
    rule = staticmethod(np.floor)

    def ops(self):
        return {"binned_ece": OpSupport({}, DTYPES, "test")}

    def evaluate(self, op, request):
        c = np.asarray(request.inputs["confidence"])
        a = request.inputs["correct"]
        b = request.hparams["num_bins"]
        bins = np.clip(self.rule(c * c.dtype.type(b)), 0, b - 1).astype(np.int64)
        gaps = np.array([np.sum((a - c.astype(np.float64))[bins == k]) for k in range(b)])
        ece = np.asarray(np.sum(np.abs(gaps)) / len(c)).astype(c.dtype)
        return Response(outputs={"ece": ece})


class _RoundsToNearestBin(_EceAdapter):
    name = "round-bins"
    rule = staticmethod(np.round)


def test_a_binned_metric_is_judged_with_its_jumps(test_ops, monkeypatch):
    """Computing c B in float16 moves on-edge values across their edge (0.2 is 0.19995 in float16,
    0.19995 * 5 rounds to 1.0 there): right within float16, so those cases are MISTRUSTED, not
    FAIL; cases with no value near an edge PASS; a wrong binning rule FAILs; and without the jump
    rule the float16 binning would FAIL."""
    planned = runner.plan(_EceAdapter(), ops="^binned_ece$", dtypes=("float16", "float32"), profile="quick")
    results = runner.run(_EceAdapter(), planned, profile="quick", diagnose_fail=False)
    assert not [r.id for r in results if r.verdict in ("FAIL", "ERROR")]
    edge = [r for r in results if r.verdict == "MISTRUSTED"]
    assert edge and all("on_edges" in r.case and "bin edge" in " ".join(r.comparisons) for r in edge)
    assert all(r.verdict == "PASS" for r in results if "uniform" in r.case)
    wrong = runner.run(_RoundsToNearestBin(), planned, profile="quick", diagnose_fail=False)
    assert sum(r.verdict == "FAIL" for r in wrong) >= 2
    monkeypatch.setattr(judge, "values_near_jumps", lambda *args: 0)
    blind = runner.run(_EceAdapter(), planned, profile="quick", diagnose_fail=False)
    assert any(r.verdict == "FAIL" for r in blind)


@pytest.mark.parametrize("op", ["class_center", "backward_ema", "binned_ece"])
def test_the_test_ops_bad_inputs_raise_their_errors(test_ops, op):
    """The test ops' own [[error_cases]] (tests/test_error_cases.py runs normref's ops only)."""
    import builtins

    from test_error_cases import _call

    spec = reference.get(op).spec
    assert spec.error_cases
    for case in spec.error_cases:
        with pytest.raises(getattr(builtins, case["error"]), match=case["match"]):
            _call(reference.get(op), case)
