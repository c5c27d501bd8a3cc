"""Judging one step: the oracle's values, their bounds, and the comparison with the adapter's.

Quantities travel as flat dicts.  What both sides read: ``in.<input>``, ``state.<slot>``,
``ct.<output>`` (float64 arrays holding the dtype's values); what they compute:
``outputs.<output>``, ``grads.<input>``, ``state.<slot>``.  :func:`pack` and :func:`unpack` are
the one place that builds and splits those keys.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import reference
from conformance import memo, tolerance
from conformance.adapters import Request
from conformance.baseline import evaluate as same_precision
from conformance.dtypes import UNIT_ROUNDOFF, is_half, name_of, round_to

__all__ = ["Estimate", "Step", "baseline", "estimate", "expected_and_bounds", "flatten_response", "judge",
           "oracle", "pack", "status", "unpack"]

READ = ("in.", "state.", "ct.")
#: Why the same-precision baseline could not be evaluated, when it could not (see :func:`baseline`).
BASELINE_FAILURES: list[str] = []


def pack(inputs: dict[str, Any], state: dict[str, Any] | None, cotangents: dict[str, Any] | None
         ) -> dict[str, np.ndarray]:
    """``{"in.x": ..., "state.running_mean": ..., "ct.y": ...}`` from the three dicts."""
    out = {f"in.{k}": v for k, v in inputs.items()}
    out.update({f"state.{k}": v for k, v in (state or {}).items()})
    out.update({f"ct.{k}": v for k, v in (cotangents or {}).items()})
    return out


def unpack(arrays: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The entries of one prefix (``"in."``, ``"state."``, ``"outputs."``, ...), prefix removed."""
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


def flatten_response(response: Any) -> dict[str, np.ndarray]:
    """A :class:`~conformance.adapters.Response` as flat quantities."""
    flat = {f"outputs.{k}": v for k, v in response.outputs.items()}
    flat.update({f"state.{k}": v for k, v in (response.state or {}).items()})
    flat.update({f"grads.{k}": v for k, v in (response.grads or {}).items()})
    return flat


def oracle(op: reference.Op, hp: dict[str, Any], *, gradients: bool = True, backend: Any = None
           ) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """Flat float64 evaluation: ``in./state./ct.`` -> ``outputs./grads./state.`` (no gradients
    without cotangents, or when ``gradients`` is False).  The oracle computes in the array
    namespace of ``backend`` (a :class:`conformance.oracle_device.Backend`; None: the one
    ``NORMREF_BACKEND`` names, NumPy or CuPy on a GPU); what it returns is float64 NumPy."""
    spec = op.spec
    if spec.is_optimizer:
        return _optimizer_step(op, hp, backend)
    if backend is None:
        from conformance import oracle_device

        backend = oracle_device.current()
    to_device, to_host = backend.to_device, backend.to_host

    def evaluate(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with np.errstate(all="ignore"):  # NaN/inf cases and probes: judged, not warned about
            arrays = to_device(arrays)
            inputs, cts = unpack(arrays, "in."), unpack(arrays, "ct.")
            state = unpack(arrays, "state.") or None
            outputs, new_state = op.apply(inputs, state, **hp)
            flat = {f"outputs.{k}": to_host(v) for k, v in outputs.items()}
            flat.update({f"state.{k}": to_host(v) for k, v in new_state.items()})
            if gradients and cts and spec.differentiable:
                # The backward pass's state (PowerNorm's gradient statistic) is the step's final value.
                grads, updated = op.backward(inputs, state, cts, **hp)
                flat.update({f"grads.{k}": to_host(v) for k, v in grads.items()})
                flat.update({f"state.{k}": to_host(v) for k, v in updated.items()})
            return flat

    return evaluate


def _optimizer_step(op: reference.Op, hp: dict[str, Any], backend: Any = None
                    ) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """An optimizer's flat step, ``in.params/.., in.grads/.., state.`` -> ``outputs.params/..,
    state.``: the undecorated step on the float64 flat arrays the harness already holds, its
    hyper-parameters validated once (the probes call it tens of thousands of times a run; the
    decorator's per-call validation and promotion would change no value), in ``backend``'s
    namespace (as :func:`oracle`)."""
    step = getattr(op.function, "__wrapped__", op.function)
    init = getattr(op.spec_init, "__wrapped__", op.spec_init)
    hp = op.spec.resolve(hp)
    if backend is None:
        from conformance import oracle_device

        backend = oracle_device.current()
    to_device, to_host = backend.to_device, backend.to_host

    def evaluate(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with np.errstate(all="ignore"):
            arrays = to_device(arrays)
            params, grads = op.split_flat(unpack(arrays, "in."))
            state = unpack(arrays, "state.")
            tree = op.tree_state(state) if state else init(params, **hp)
            new_params, new_state = step(params, grads, tree, **hp)
            flat = {f"outputs.params/{p}": to_host(v) for p, v in new_params.items()}
            flat.update({f"state.{k}": to_host(v) for k, v in op.flat_state(new_state).items()})
            return flat

    return evaluate


def baseline(request: Request, hp: dict[str, Any], arrays: dict[str, np.ndarray], *,
             saved_statistics: bool = False) -> dict[str, np.ndarray]:
    """The oracle's formulas evaluated in float32 (half types: float32 opmath, rounded once) on the
    values both sides read.  For a float64 case the float64 values are rounded to float32 here;
    the bound scales this error from u(float32) down to u(float64).  ``saved_statistics``: a
    half-precision backward reads mean and 1/std rounded to the half type (PyTorch's CPU design)."""
    dtype = request.dtype if request.dtype != "float64" else "float32"
    req = Request(request.op, dtype, round_to(unpack(arrays, "in."), dtype),
                  round_to(unpack(arrays, "state."), dtype) if request.state is not None else None, dict(hp),
                  round_to(unpack(arrays, "ct."), dtype) if request.cotangents is not None else None)
    try:
        with np.errstate(all="ignore"):
            return flatten_response(same_precision(request.op, req, saved_statistics))
    except Exception as exc:  # noqa: BLE001 - a failing baseline only removes its term from the bound
        # ... silently for the run, so it is recorded: the tests require none (a baseline that
        # always failed would quietly loosen or tighten every bound of an op).
        if len(BASELINE_FAILURES) < 100:
            BASELINE_FAILURES.append(f"{request.op} {dtype}: {type(exc).__name__}: {exc}")
        return {}


def _exact_keys(op: reference.Op) -> set[str]:
    """Integer-valued arrays (step counts, batch counters; int64 and bool inputs such as labels
    and masks): read exactly, never perturbed."""
    return ({f"in.{t.name}" for t in op.spec.inputs if t.exact or t.dtype != "float64"}
            | {f"state.{t.name}" for t in op.spec.state if t.exact})


def exact_quantities(op: reference.Op) -> set[str]:
    """Prefixes of computed quantities that are counters (any dtype holding integers is right)."""
    return {f"state.{t.name}" for t in op.spec.state if t.exact}


@dataclass
class Estimate:
    """The oracle's quantities at one step and what their bounds are made of: the sensitivities
    and the float32 baseline's errors (so bounds for another dtype need no new evaluation)."""

    expected: dict[str, np.ndarray]
    sens: dict[str, np.ndarray]
    baseline_error: dict[str, np.ndarray | None]
    n: int
    scale: float             # the largest finite magnitude the step reads or computes
    of_exact_inputs: bool    # a function of exact inputs only (a schedule of the step count)
    #: per gradient, the size of the terms its VJP is formed from, |y| |ct| / |a| elementwise
    terms: dict[str, np.ndarray] = field(default_factory=dict)
    #: ``outputs.w`` -> ``outputs.sigma``: outputs scaled by another output (the spec's ``scaled_by``)
    scaled_by: dict[str, str] = field(default_factory=dict)

    def bounds(self, dtype: str, values: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """The bounds in ``dtype``; with ``values`` (another candidate's quantities), the bounds
        those values would get from the same sensitivities (a cheap first look for the diagnosis)."""
        bounds = {}
        for key, value in (values or self.expected).items():
            if key not in self.sens:
                continue
            b = tolerance.bound(value, self.sens[key], dtype, self.n, self.baseline_error.get(key))
            if not np.any(value) and not np.any(self.sens[key]):
                b = np.maximum(b, tolerance.structural_zero_floor(dtype, self.scale))
                if key in self.terms:
                    b = np.maximum(b, tolerance.structural_zero_floor(dtype, self.terms[key]))
            elif self.of_exact_inputs and np.size(value) and np.all(np.isfinite(value)):
                # A function of exact inputs (a schedule of the step count): a handful of flops on
                # quantities the size of its largest value (init - end, 1 + cos(pi t/T)), so every
                # element carries a few roundings of that size, not of its own (0 at the end of a
                # decay, 1e-6 at the start of a warm-up).
                peak = float(np.max(np.abs(value)))
                b = np.maximum(b, tolerance.structural_zero_floor(dtype, peak))
            bounds[key] = b
        for key, by in self.scaled_by.items():
            if key in bounds and by in bounds:
                bounds[key] = bounds[key] + tolerance.inherited(
                    (values or self.expected)[key], (values or self.expected)[by], bounds[by])
        return bounds


def estimate(
    op: reference.Op, hp: dict[str, Any], arrays: dict[str, np.ndarray], request: Request, n: int,
    seed: int,
) -> Estimate:
    """The oracle's quantities under ``hp``, their sensitivities and the float32 baseline's errors
    (computed once per process for the same reads: conformance/memo.py)."""
    key = memo.digest("estimate", op.name, hp, arrays, request.dtype, request.cotangents is not None, n, seed)
    return memo.estimate(key, lambda: _estimate(op, hp, arrays, request, n, seed))


def _estimate(
    op: reference.Op, hp: dict[str, Any], arrays: dict[str, np.ndarray], request: Request, n: int,
    seed: int,
) -> Estimate:
    evaluate = oracle(op, hp, gradients=request.cotangents is not None)
    expected = evaluate(arrays)
    exact = _exact_keys(op)
    # Values next to a jump (a bin edge) stay still: a probe across it would read the jump.
    near = _near_jumps(op, hp, arrays, 2.0 * tolerance.RELATIVE_STEPS[0])
    sens = tolerance.sensitivity(evaluate, arrays, seed=seed, center=expected,
                                 groups={key: (None if key in exact else key) for key in arrays},
                                 counters=exact_quantities(op),
                                 still={f"in.{k}": m for k, m in near.items()} or None)
    # Half types: also the design that saves the statistics of the backward in the half type.
    variants = (False, True) if is_half(request.dtype) and request.cotangents is not None else (False,)
    bases = [baseline(request, hp, arrays, saved_statistics=v) for v in variants]
    errors = {key: _largest(_error(b.get(key), value) for b in bases) for key, value in expected.items()}
    scale = tolerance.largest_finite([*expected.values(), *arrays.values()])
    scaled_by = {f"outputs.{t.name}": f"outputs.{t.scaled_by}" for t in op.spec.outputs if t.scaled_by}
    return Estimate(expected, sens, errors, n, scale, not op.spec.differentiable, _terms(expected, arrays),
                    scaled_by)


def _terms(expected: dict[str, np.ndarray], arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The size of the terms a gradient ``grads.a`` is formed from: |y| |ct| / |a| elementwise
    (a partial derivative dy/da is of the size y/a), with the largest output and cotangent.

    It matters where a gradient is exactly zero but its terms are not: the VJP of w = g v/||v||
    with one element per norm is 0 (w = g sign(v)), computed as g/|v| (ct - v_hat (v_hat ct)),
    whose terms grow as 1/|v| (see :func:`conformance.tolerance.structural_zero_floor`)."""
    outputs = tolerance.largest_finite([v for k, v in expected.items() if k.startswith("outputs.")])
    cotangents = tolerance.largest_finite(list(unpack(arrays, "ct.").values()))
    terms = {}
    for name, a in unpack(arrays, "in.").items():
        key = f"grads.{name}"
        if key in expected and np.shape(expected[key]) == np.shape(a):
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                terms[key] = outputs * cotangents / np.abs(np.asarray(a, dtype=np.float64))
    return terms


def expected_and_bounds(
    op: reference.Op, hp: dict[str, Any], arrays: dict[str, np.ndarray], request: Request, n: int,
    seed: int,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The oracle's quantities under ``hp`` and their bounds in ``request.dtype``."""
    est = estimate(op, hp, arrays, request, n, seed)
    return est.expected, est.bounds(request.dtype)


def _largest(errors: Iterable[np.ndarray | None]) -> np.ndarray | None:
    """The elementwise largest of the errors that exist (None if none does)."""
    found = [e for e in errors if e is not None]
    if not found:
        return None
    with np.errstate(invalid="ignore"):
        return np.maximum.reduce(found) if len(found) > 1 else found[0]


def _error(approx: Any, value: np.ndarray) -> np.ndarray | None:
    """|approx - value| when ``approx`` has value's shape (a baseline's error), else None."""
    if approx is None or np.shape(approx) != np.shape(value):
        return None
    with np.errstate(invalid="ignore", over="ignore"):
        return np.abs(np.asarray(approx, dtype=np.float64) - value)


def judge(
    actual: dict[str, np.ndarray],
    expected: dict[str, np.ndarray],
    bounds: dict[str, np.ndarray],
    dtype: str,
    *,
    skip: Iterable[str] = (),
    exact: Iterable[str] = (),
    check_dtypes: bool = True,
    state_dtype: str | None = None,
) -> list[tolerance.Comparison]:
    """Every expected quantity compared (``skip``: not compared; ``exact``: counters, whose dtype
    is free); ``check_dtypes`` also FAILs arrays returned in the wrong dtype (state may come in
    ``state_dtype``, the adapter's declared ``OpSupport.state_dtype``)."""
    skipped, counters = set(skip), tuple(exact)
    comps = []
    for key in sorted(expected):
        if key in skipped:
            continue
        if key not in actual or actual[key] is None:
            comps.append(tolerance.Comparison(key, "error", math.inf, math.inf, math.inf, 0.0, (),
                                              "the adapter did not return it", kind="missing"))
            continue
        comp = tolerance.compare(key, actual[key], expected[key], bounds[key], dtype)
        if check_dtypes and not any(key == c or key.startswith(c + "/") for c in counters):
            declared = state_dtype if key.startswith("state.") and state_dtype else dtype
            if name_of(actual[key]) != declared:
                comp = tolerance.check_dtype(comp, actual[key], dtype)
        comps.append(comp)
    return comps


def _near_jumps(op: reference.Op, hp: dict[str, Any], arrays: dict[str, np.ndarray], rel: float
                ) -> dict[str, np.ndarray]:
    """Per input, which values lie within ``rel`` (relatively) of a jump of the op (the spec's
    ``discontinuities``; nothing for ops without jumps)."""
    marker = op.discontinuity_counter
    if marker is None:
        return {}
    # The state is passed too: a jump may sit at a threshold the state sets (Unified Norm's filter).
    named = {**unpack(arrays, "state."), **unpack(arrays, "in.")}
    return {k: np.asarray(m, dtype=bool) for k, m in marker(named, hp, rel).items()}


def values_near_jumps(op: reference.Op, hp: dict[str, Any], arrays: dict[str, np.ndarray], dtype: str) -> int:
    """How many input values lie within K u(dtype), relatively, of a jump of the op (a bin edge
    of a binned metric); 0 for ops without jumps."""
    near = _near_jumps(op, hp, arrays, tolerance.K * UNIT_ROUNDOFF[dtype])
    return int(sum(np.sum(m) for m in near.values()))


def mistrust_near_jumps(comps: list[tolerance.Comparison], near: int) -> list[tolerance.Comparison]:
    """A metric that bins by confidence jumps where a value meets a bin edge: computed in the
    dtype, ``conf * bins`` may round across an edge the exact value does not reach (or the
    reverse), and both bins are right within the dtype's rounding.  With ``near`` such values a
    result that differs from the oracle's is MISTRUSTED (the dtype cannot decide the bin), not
    FAIL; a case with no value near an edge is judged as usual, so a wrong binning rule still
    FAILs there."""
    if not near:
        return comps
    for c in comps:
        if c.status == "fail" and c.kind != "dtype":
            c.status = "mistrusted"
            c.add_note(f"{near} input values lie within rounding of a jump (a bin edge): either "
                       "side of it is a correctly rounded result")
    return comps


def status(comps: list[tolerance.Comparison]) -> str:
    """The verdict of one step: the worst of its comparisons."""
    statuses = {c.status for c in comps}
    for s, verdict in (("error", "ERROR"), ("fail", "FAIL"), ("mistrusted", "MISTRUSTED")):
        if s in statuses:
            return verdict
    return "PASS"


def worst_ratio(comps: list[tolerance.Comparison]) -> float:
    ratios = [c.ratio for c in comps if not math.isnan(c.ratio)]
    return max(ratios, default=0.0)


@dataclass
class Step:
    """One judged step, kept for the diagnosis."""

    hp: dict[str, Any]
    dtype: str
    arrays: dict[str, np.ndarray]        # the float64 values both sides read ("in.", "state.", "ct.")
    actual: dict[str, np.ndarray]        # the adapter's quantities
    bounds: dict[str, np.ndarray]
    comparisons: list[tolerance.Comparison]
    request: Request
    n: int
    seed: int
    skip: tuple[str, ...] = ()
    exact: tuple[str, ...] = field(default_factory=tuple)
    estimate: Estimate | None = None     # normalizer steps: to bound the same results in another dtype

    def rejudge(self, expected: dict[str, np.ndarray], bounds: dict[str, np.ndarray] | None = None,
                dtype: str | None = None) -> list[tolerance.Comparison]:
        """The recorded results against other expected values (and bounds, dtype): values only."""
        return judge(self.actual, expected, self.bounds if bounds is None else bounds,
                     dtype or self.dtype, skip=self.skip, exact=self.exact, check_dtypes=False)
