"""The same-precision baseline: the oracle's own formulas evaluated in the dtype under test.

The oracle's functions (undecorated: no float64 promotion) are called on float32 arrays (NumPy
keeps float32 through every operation) and gradients come from the oracle's hand-written VJPs in
the same dtype.  Half precision (float16, bfloat16) is a storage type: like every framework's
"opmath", the baseline computes it in float32 and rounds the results once to the half type;
float64 is the oracle's own arithmetic.  The error model measures the error of this evaluation
(conformance/tolerance.py, "Same-algorithm baseline"); the ``numpy32`` adapter offers the same
evaluation as an adapter (conformance/adapters/numpy32.py).  ``saved_statistics``: a
half-precision backward reads its mean and 1/std rounded to the half type (PyTorch's CPU design).
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

import reference
from conformance.adapters import Request, Response
from conformance.dtypes import np_dtype
from reference.normalizers._stats import statistics_saved_in

__all__ = ["evaluate"]


def _compute(value: np.ndarray) -> np.ndarray:
    """The compute dtype: float32 for the half types (opmath), the array's own dtype otherwise."""
    value = np.asarray(value)
    if value.dtype.itemsize < 4 and value.dtype.kind not in "biu":  # labels and masks as they are
        return value.astype(np.float32)
    return value


def _stored(value: Any, store: Any) -> np.ndarray:
    """A result rounded once to the storage dtype (beyond its range: inf, as a framework's)."""
    with np.errstate(over="ignore"):
        return np.asarray(value).astype(store)


def _raw(fn: Any) -> Any:
    """The undecorated oracle function (no float64 promotion)."""
    return getattr(fn, "__wrapped__", fn)


def evaluate(op: str, request: Request, saved_statistics: bool = False) -> Response:
    bound = reference.get(op)
    spec = bound.spec
    if spec.is_optimizer:
        return _optimizer(bound, request)
    arrays = {k: _compute(v) for k, v in {**request.inputs, **(request.state or {})}.items()}
    cotangents = {k: _compute(v) for k, v in (request.cotangents or {}).items()}
    with np.errstate(all="ignore"):
        result = _raw(bound.function)(**arrays, **request.hparams)
        outputs, new_state = (result if spec.state else (result, {}))
        if len(spec.outputs) == 1:
            outputs = {spec.outputs[0].name: outputs}
        else:
            outputs = {t.name: v for t, v in zip(spec.outputs, outputs, strict=True)}
        grads = {}
        store = np.dtype(np_dtype(request.dtype))
        if request.cotangents is not None:
            cts = {"d" + t.name: cotangents.get(t.name) for t in spec.outputs}
            saved = store if saved_statistics and store.itemsize < 4 else None
            with (statistics_saved_in(saved) if saved is not None else contextlib.nullcontext()):
                grads = _raw(bound.vjp_function)(**cts, **arrays, **request.hparams)
            if spec.backward_state:  # the backward pass also updates state
                grads, backward_state = grads
                new_state = {**new_state, **backward_state}
            grads = dict(grads)

    def out(tree: dict[str, Any]) -> dict[str, np.ndarray]:
        return {k: _stored(v, store) for k, v in tree.items()}

    return Response(outputs=out(outputs), state=out(new_state), grads=out(grads))

def _optimizer(bound: Any, request: Request) -> Response:
    """One optimizer step with the raw oracle step function on float32 (opmath) leaves."""
    params, grads = bound.split_flat({k: _compute(v) for k, v in request.inputs.items()})
    state = bound.tree_state({k: _compute(v) for k, v in (request.state or {}).items()})
    if not state:
        state = _raw(bound.spec_init)(params, **request.hparams)
    with np.errstate(all="ignore"):
        new_params, new_state = _raw(bound.function)(params, grads, state, **request.hparams)
    store = next(iter(request.inputs.values())).dtype
    flat = bound.flat_state(new_state)
    exact = {s.name for s in bound.spec.state if s.exact}
    return Response(
        outputs={f"params/{p}": _stored(v, store) for p, v in new_params.items()},
        state={k: (np.asarray(v, dtype=np.float64) if k.split("/", 1)[0] in exact
                   else _stored(v, store)) for k, v in flat.items()})
