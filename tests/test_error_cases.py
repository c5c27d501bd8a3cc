"""Bad input gets a clear error: every spec's ``[[error_cases]]`` (reference/spec.py), run by
one test.  Each builds the call it describes (inputs drawn from their declared domains at the
given shapes, or given values; state and cotangents of ones; optimizer parameters and
gradients), passes its hyper-parameters unvalidated, and requires the named exception with a
message matching the pattern (which names the argument, what was expected and what came)."""

from __future__ import annotations

import builtins
from typing import Any

import numpy as np
import pytest

import reference
from conformance.cases import draw
from conformance.dtypes import DTYPES, np_dtype

ERROR_CASES = [(op, case) for op in reference.ops() for case in reference.get(op).spec.error_cases]


def _dtype(name: str) -> Any:
    return np_dtype(name) if name in DTYPES else np.dtype(name)


def _inputs(spec: Any, case: dict[str, Any]) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    tensors = {t.name: t for t in spec.inputs}
    inputs: dict[str, Any] = {}
    for name, shape in case["shapes"].items():
        t = tensors[name]
        upper = case["hparams"].get(t.upper, spec.hparams[t.upper].default) if isinstance(t.upper, str) and t.upper \
            else int(t.upper or 0)
        inputs[name] = draw(rng, t.domain, shape, int(upper))
    for name, values in case["values"].items():
        kind = {"int64": np.int64, "bool": np.bool_}.get(tensors[name].dtype, np.float64)
        inputs[name] = np.asarray(values, dtype=kind)
    for name, dtype in case["dtypes"].items():
        inputs[name] = np.asarray(inputs[name]).astype(_dtype(dtype))
    return inputs


def _call(op: Any, case: dict[str, Any]) -> Any:
    spec, hp = op.spec, case["hparams"]
    if spec.is_optimizer:
        rng = np.random.default_rng(0)
        params = {p: rng.standard_normal(s) for p, s in case["params"].items()}
        grads = {p: rng.standard_normal(s) for p, s in (case["grads"] or case["params"]).items()}
        return op.step(params, grads, None, **hp)
    inputs = _inputs(spec, case)
    state = {slot: np.ones(shape) for slot, shape in case["state"].items()} or None
    if case["call"] == "vjp":
        cotangents = {name: np.ones(shape) for name, shape in case["cotangents"].items()}
        return op.vjp(inputs, state, cotangents, **hp)
    return op.apply(inputs, state, **hp)


@pytest.mark.parametrize(("op", "case"), ERROR_CASES, ids=[f"{op}-{c['name']}" for op, c in ERROR_CASES])
def test_bad_input_raises_a_clear_error(op, case):
    with pytest.raises(getattr(builtins, case["error"]), match=case["match"]):
        _call(reference.get(op), case)


@pytest.mark.parametrize("op", reference.ops())
def test_every_op_declares_its_bad_inputs(op):
    """Bad input gets a clear error: each op's spec lists at least one bad argument of its own."""
    assert reference.get(op).spec.error_cases, f"{op}: no [[error_cases]] in its spec"
