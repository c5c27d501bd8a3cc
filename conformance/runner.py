"""Runs cases through an adapter, compares with the oracle, and diagnoses dialects.

One *case* is an op, a dtype, a named input recipe and a seed.  It runs for T steps (T = 1 for ops
without state; ``profile.steps`` for stateful ones, with a train -> eval -> train schedule).  Each
step: draw inputs and cotangents, round them to the dtype, give the adapter the oracle's current
state (rounded), let the adapter compute outputs, gradients and the new state with its own code
and autodiff, let the oracle compute the same in float64 from the same rounded values, and compare
every quantity against the bound of :mod:`conformance.tolerance`.

Verdicts (worst over steps and quantities): ERROR (the adapter raised, hung, returned a wrong
shape or a non-finite value where the oracle is finite), FAIL, MISTRUSTED (the dtype cannot
resolve the case), PASS, SKIP (the adapter does not support the op, dtype or a hyper-parameter
value).  A FAIL is re-judged against the oracle under the other values of the op's dialect knobs,
one knob at a time and then pairs: if one explains every quantity, the verdict is CONVENTION
naming the knob and value.  Expected failures (``--xfails``) turn FAIL into XFAIL and PASS into XPASS.
"""

from __future__ import annotations

import itertools
import math
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import reference
from conformance import tolerance, trajectory
from conformance.adapters import Adapter, Request, Unsupported
from conformance.cases import FAMILIES, LAYOUTS, Case, as_layout, case_rng, default_cases

__all__ = [
    "PROFILES",
    "VERDICTS",
    "CaseResult",
    "PlannedCase",
    "Profile",
    "dialect_knobs",
    "plan",
    "run",
    "run_case",
]

VERDICTS = ("PASS", "CONVENTION", "MISTRUSTED", "XFAIL", "SKIP", "XPASS", "FAIL", "ERROR")
DTYPES = ("float64", "float32", "float16", "bfloat16")
#: Hyper-parameters that choose a layout or a mode, not a convention: never "explain" a FAIL.
LAYOUT_KNOBS = frozenset({"training", "track_running_stats", "axis", "axes", "dim"})


@dataclass(frozen=True)
class Profile:
    name: str
    steps: int            # steps of a stateful case
    adversarial: bool     # add the adversarial families
    realistic: bool       # keep the spec's realistic-size cases
    random: int           # extra seeded random cases per op (shapes and hyper-parameters)
    timeout: float        # seconds per adapter call
    trajectory_steps: int = 20  # steps of an optimizer trajectory (conformance/trajectory.py)


PROFILES = {
    "quick": Profile("quick", steps=3, adversarial=False, realistic=False, random=0, timeout=30.0,
                     trajectory_steps=5),
    "default": Profile("default", steps=5, adversarial=True, realistic=True, random=2, timeout=60.0,
                       trajectory_steps=20),
    "thorough": Profile("thorough", steps=10, adversarial=True, realistic=True, random=20, timeout=120.0,
                        trajectory_steps=200),
}
#: A diagnosis recomputes the bounds under a candidate convention (whose values, and so rounding
#: errors, can be orders of magnitude from the declared one's) only when the adapter is within this
#: factor of the candidate under the declared bounds; farther off, the candidate is rejected.
RECHECK_RATIO = 1e6
#: Inputs above this many elements are "realistic size" (the spec's large cases).
REALISTIC_SIZE = 100_000


@dataclass
class PlannedCase:
    """A case before it runs: everything needed to rebuild it from its id."""

    op: str
    dtype: str
    name: str
    seed: int
    case: Case

    def id(self, adapter: str) -> str:
        return f"{adapter}:{self.op}:{self.dtype}:{self.name}:{self.seed}"


@dataclass
class CaseResult:
    """The outcome of one case, as written to every report."""

    id: str
    adapter: str
    op: str
    dtype: str
    case: str
    seed: int
    verdict: str
    shapes: dict[str, list[int]] = field(default_factory=dict)
    hparams: dict[str, Any] = field(default_factory=dict)
    dialect: dict[str, Any] = field(default_factory=dict)
    steps: int = 0
    worst_ratio: float = 0.0
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0
    bound: float = 0.0
    worst: str = ""
    step: int = -1
    diagnosis: str = ""
    message: str = ""
    comparisons: list[str] = field(default_factory=list)
    seconds_adapter: float = 0.0
    seconds_oracle: float = 0.0
    framework: dict[str, str] = field(default_factory=dict)
    normref_version: str = reference.__version__

    @property
    def repro(self) -> str:
        return f"normref repro {self.id}"


# --------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------


def _primary_input(op: str) -> str:
    spec = reference.get(op).spec
    return next(t.name for t in spec.inputs if not t.optional)


def _adversarial_cases(op: str, base: Case) -> list[tuple[str, Case]]:
    primary = _primary_input(op)
    out = []
    for family in FAMILIES:
        rng = case_rng(base.seed, op, "adv", family)
        inputs = dict(base.inputs)
        inputs[primary] = FAMILIES[family](rng, base.inputs[primary].shape)
        name = f"adv-{family}@{base.name}"
        out.append((name, Case(op, name, inputs, dict(base.hparams), base.dialect, base.seed,
                               overrides=dict(base.overrides), tags=("adversarial",))))
    spec = reference.get(op).spec
    eps = spec.hparams.get("eps")
    if eps is not None and eps.type == "float":
        # eps -> 0: the smallest eps any dialect table uses (BERT's LayerNorm) on ordinary data.
        name = f"eps_1e-12@{base.name}"
        out.append((name, Case(op, name, dict(base.inputs), {**base.hparams, "eps": 1e-12},
                               base.dialect, base.seed, overrides={**base.overrides, "eps": 1e-12})))
    for layout in LAYOUTS:
        name = f"layout-{layout}@{base.name}"
        out.append((name, Case(op, name, dict(base.inputs), dict(base.hparams), base.dialect,
                               base.seed, overrides=dict(base.overrides), tags=(f"layout:{layout}",))))
    return out


def _random_hparams(op: str, rng: np.random.Generator) -> dict[str, Any]:
    """Random values for the continuous hyper-parameters within their declared domains."""
    spec = reference.get(op).spec
    out: dict[str, Any] = {}
    for name, p in spec.hparams.items():
        if name == "eps" and p.type == "float":
            out[name] = float(10.0 ** rng.uniform(-8, -1))
        elif name == "momentum" and p.type == "float":
            out[name] = float(rng.uniform(0.01, 0.99))
    return out


def _random_cases(op: str, base: Case, count: int, seed: int) -> list[tuple[str, Case]]:
    out = []
    for k in range(count):
        name = f"rand{k}@{base.name}"
        rng = case_rng(seed, op, name)
        drawn = _random_hparams(op, rng)
        hp, overrides = {**base.hparams, **drawn}, {**base.overrides, **drawn}
        inputs = {key: rng.standard_normal(v.shape) * float(10.0 ** rng.uniform(-2, 2))
                  if key == _primary_input(op) else v for key, v in base.inputs.items()}
        out.append((name, Case(op, name, inputs, hp, base.dialect, seed, overrides=overrides,
                               tags=("random",))))
    return out


def _cases_for(op: str, profile: Profile, seed: int) -> list[tuple[str, Case]]:
    spec = reference.get(op).spec
    if spec.is_optimizer:
        return trajectory.optimizer_cases(op, adversarial=profile.adversarial, seed=seed)
    base = default_cases(op, seed)
    if not spec.differentiable:
        # Functions of exact inputs (schedules of the step count): the spec's cases only.
        return [(c.name, c) for c in base]
    cases = [(c.name, c) for c in base if profile.realistic or c.size <= REALISTIC_SIZE]
    small = [c for c in base if c.size <= REALISTIC_SIZE]
    if profile.adversarial and small:
        cases += _adversarial_cases(op, small[0])
    if profile.random and small:
        cases += _random_cases(op, small[0], profile.random, seed)
    return cases


def plan(
    adapter: Adapter,
    *,
    ops: str | None = None,
    dtypes: Iterable[str] = ("float64", "float32", "float16"),
    seed: int = 0,
    profile: str = "default",
    max_examples: int | None = None,
) -> list[PlannedCase]:
    """Every (op, dtype, case) the adapter will be asked for, in a stable order."""
    prof = PROFILES[profile]
    if max_examples is not None:
        prof = Profile(prof.name, prof.steps, prof.adversarial, prof.realistic, max_examples, prof.timeout,
                       prof.trajectory_steps)
    pattern = re.compile(ops) if ops else None
    planned = []
    for op in reference.ops():
        # The pattern is searched in "<family>/<op>": "optim" selects every optimizer,
        # "normalizers" every normalizer, "^adam$" or "/adam$" one op.
        if pattern and not (pattern.search(op) or pattern.search(f"{reference.get(op).spec.family}/{op}")):
            continue
        for dtype in dtypes:
            for name, case in _cases_for(op, prof, seed):
                planned.append(PlannedCase(op, dtype, name, seed, case))
    return planned


def find_case(op: str, name: str, seed: int, dtype: str, profile: str = "thorough") -> PlannedCase:
    """Rebuild one planned case from the parts of its id (for ``normref repro``)."""
    for case_name, case in _cases_for(op, PROFILES[profile], seed):
        if case_name == name:
            return PlannedCase(op, dtype, name, seed, case)
    raise KeyError(f"no case {name!r} for op {op!r} with seed {seed}")


# --------------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------------


def _np_dtype(dtype: str) -> Any:
    if dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(dtype)


def _round(arrays: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    with np.errstate(over="ignore"):
        return {k: np.asarray(v, dtype=np.float64).astype(_np_dtype(dtype)) for k, v in arrays.items()}


def _widen(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v).astype(np.float64) for k, v in arrays.items()}


def _schedule(steps: int) -> list[bool]:
    """train ... -> eval -> train ...: the middle step is in inference mode."""
    return [k != steps // 2 for k in range(steps)] if steps > 1 else [True]


def _step_inputs(case: Case, k: int) -> dict[str, np.ndarray]:
    if k == 0:
        return case.inputs
    rng = case_rng(case.seed, case.op, case.name, f"step{k}")
    primary = _primary_input(case.op)
    out = dict(case.inputs)
    if "adversarial" in case.tags:
        family = case.name.split("@")[0][len("adv-"):]
        out[primary] = FAMILIES[family](rng, case.inputs[primary].shape)
    else:
        out[primary] = rng.standard_normal(case.inputs[primary].shape) * float(
            np.std(case.inputs[primary]) or 1.0) + float(np.mean(case.inputs[primary]))
    return out


def _oracle(op: reference.Op, hp: dict[str, Any]) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """Flat float64 evaluation: keys "in.*", "state.*", "ct.*" -> "outputs.*", "grads.*", "state.*"."""
    spec = op.spec

    def evaluate(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with np.errstate(all="ignore"):  # NaN/inf cases and probes: judged, not warned about
            return _evaluate(arrays)

    def _evaluate(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = {k[3:]: v for k, v in arrays.items() if k.startswith("in.")}
        state = {k[6:]: v for k, v in arrays.items() if k.startswith("state.")} or None
        cts = {k[3:]: v for k, v in arrays.items() if k.startswith("ct.")}
        outputs, new_state = op.apply(inputs, state, **hp)
        flat = {f"outputs.{k}": np.asarray(v, dtype=np.float64) for k, v in outputs.items()}
        flat.update({f"state.{k}": np.asarray(v, dtype=np.float64) for k, v in new_state.items()})
        if cts and spec.differentiable:
            grads = op.vjp(inputs, state, cts, **hp)
            flat.update({f"grads.{k}": np.asarray(v, dtype=np.float64) for k, v in grads.items()})
        return flat

    return evaluate


def _baseline(request: Request, hp: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The oracle's formulas evaluated in float32 (half types: float32 opmath, rounded once) on the
    values both sides read.  For a float64 case the float64 values are rounded to float32 here;
    the bound scales this error from u(float32) down to u(float64)."""
    from conformance.adapters.numpy32 import NumPy32Adapter

    dtype = request.dtype if request.dtype != "float64" else "float32"
    part = {prefix: {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
            for prefix in ("in.", "state.", "ct.")}
    req = Request(request.op, dtype, _round(part["in."], dtype),
                  _round(part["state."], dtype) if request.state is not None else None, dict(hp),
                  _round(part["ct."], dtype) if request.cotangents is not None else None)
    try:
        with np.errstate(all="ignore"):
            return _flatten_response(NumPy32Adapter().evaluate(request.op, req))
    except Exception:  # noqa: BLE001 - a failing baseline only removes its term from the bound
        return {}


def _with_layout(request: Request, layout: str) -> Request:
    """The same request with every array in a non-contiguous memory layout."""
    def apply(tree: dict[str, np.ndarray] | None) -> dict[str, np.ndarray] | None:
        return None if tree is None else {k: as_layout(v, layout) for k, v in tree.items()}

    return Request(request.op, request.dtype, apply(request.inputs), apply(request.state),
                   request.hparams, apply(request.cotangents))


class _Timeout(Exception):
    pass


def _call_with_timeout(fn: Callable[[], Any], seconds: float) -> Any:
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - reported as the case's ERROR
            box["error"] = exc

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise _Timeout(f"the adapter did not answer within {seconds:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _flatten_response(response: Any) -> dict[str, np.ndarray]:
    flat = {f"outputs.{k}": v for k, v in response.outputs.items()}
    flat.update({f"state.{k}": v for k, v in (response.state or {}).items()})
    flat.update({f"grads.{k}": v for k, v in (response.grads or {}).items()})
    return flat


@dataclass
class _Step:
    hp: dict[str, Any]
    dtype: str
    arrays: dict[str, np.ndarray]        # the float64 values both sides read ("in.", "state.", "ct.")
    actual: dict[str, np.ndarray]        # the adapter's quantities
    bounds: dict[str, np.ndarray]
    comparisons: list[tolerance.Comparison]
    request: Request
    n: int
    seed: int


def _expected_and_bounds(
    op: reference.Op, hp: dict[str, Any], arrays: dict[str, np.ndarray], request: Request, n: int,
    seed: int,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The oracle's quantities under ``hp`` and their bounds (sensitivity and baseline under ``hp``)."""
    evaluate = _oracle(op, hp)
    expected = evaluate(arrays)
    exact = {f"in.{t.name}" for t in op.spec.inputs if t.exact}  # step counts: read exactly
    sens = tolerance.sensitivity(evaluate, arrays, seed=seed, center=expected,
                                 groups={key: (None if key in exact else key) for key in arrays})
    baseline = _baseline(request, hp, arrays)
    bounds = {}
    for key, value in expected.items():
        base = baseline.get(key)
        with np.errstate(invalid="ignore", over="ignore"):
            base_err = None if base is None or np.shape(base) != np.shape(value) else np.abs(
                np.asarray(base, dtype=np.float64) - value)
        bounds[key] = tolerance.bound(value, sens[key], request.dtype, n, base_err)
    scale = max([float(np.max(np.abs(v))) for v in [*expected.values(), *arrays.values()]
                 if np.size(v) and np.all(np.isfinite(v))] or [0.0])
    for key, value in expected.items():
        if not np.any(value) and not np.any(sens[key]):
            bounds[key] = np.maximum(bounds[key], tolerance.structural_zero_floor(request.dtype, scale))
        elif not op.spec.differentiable and np.size(value) and np.all(np.isfinite(value)):
            # A function of exact inputs (a schedule of the step count): a handful of flops on
            # quantities the size of its largest value (init - end, 1 + cos(pi t/T)), so every
            # element carries a few roundings of that size, not of its own (0 at the end of a
            # decay, 1e-6 at the start of a warm-up).
            peak = float(np.max(np.abs(value)))
            bounds[key] = np.maximum(bounds[key], tolerance.structural_zero_floor(request.dtype, peak))
    return expected, bounds


def _judge(
    actual: dict[str, np.ndarray],
    expected: dict[str, np.ndarray],
    bounds: dict[str, np.ndarray],
    dtype: str,
) -> list[tolerance.Comparison]:
    comps = []
    for key in sorted(expected):
        if key not in actual:
            comps.append(tolerance.Comparison(key, "error", math.inf, math.inf, math.inf, 0.0, (),
                                              "the adapter did not return it"))
            continue
        comps.append(tolerance.compare(key, actual[key], expected[key], bounds[key], dtype))
    return comps


def _status(comps: list[tolerance.Comparison]) -> str:
    statuses = {c.status for c in comps}
    for status, verdict in (("error", "ERROR"), ("fail", "FAIL"), ("mistrusted", "MISTRUSTED")):
        if status in statuses:
            return verdict
    return "PASS"


def merged_hparams(op: str, case: Case, adapter_dialect: dict[str, Any]) -> dict[str, Any]:
    """Spec defaults <- the case's own requests <- the adapter's declared conventions."""
    spec = reference.get(op).spec
    return spec.resolve({**case.overrides, **adapter_dialect})


def run_case(
    adapter: Adapter,
    planned: PlannedCase,
    *,
    profile: str = "default",
    trace: list | None = None,
    diagnose_fail: bool = True,
) -> CaseResult:
    """Run one planned case (all its steps) and return its result; never raises for adapter faults.

    ``diagnose_fail=False`` skips the dialect diagnosis of a FAIL (e.g. while shrinking).
    ``trace``, if given, receives one dict per step: the hyper-parameters, the arrays both sides
    read, the oracle's and the adapter's quantities, the bounds and the comparisons (for repro).
    """
    prof = PROFILES[profile]
    op = reference.get(planned.op)
    spec = op.spec
    support = adapter.ops().get(planned.op)
    result = CaseResult(
        id=planned.id(adapter.name), adapter=adapter.name, op=planned.op, dtype=planned.dtype,
        case=planned.name, seed=planned.seed, verdict="SKIP",
        shapes={k: list(v.shape) for k, v in planned.case.inputs.items()},
        framework=dict(adapter.info()),
    )
    if support is None:
        result.message = f"{adapter.name} does not implement {planned.op}"
        return result
    if planned.dtype not in support.dtypes:
        result.message = f"{adapter.name} does not support {planned.dtype} for {planned.op}"
        return result
    result.dialect = dict(support.dialect)
    try:
        hp = merged_hparams(planned.op, planned.case, support.dialect)
    except (TypeError, ValueError) as exc:
        result.message = f"the adapter's dialect is not valid for this op: {exc}"
        result.verdict = "ERROR"
        return result
    result.hparams = {k: (list(v) if isinstance(v, tuple) else v) for k, v in hp.items()
                      if not callable(v)}
    if spec.is_optimizer:
        _run_trajectory(adapter, planned, prof, op, hp, result, trace, diagnose_fail)
        return result
    stateful = bool(spec.state)
    steps = prof.steps if stateful else 1
    schedule = _schedule(steps) if stateful and "training" in hp else [hp.get("training", True)] * steps
    state: dict[str, np.ndarray] | None = None
    n = max(int(v.size) for v in planned.case.inputs.values())
    history: list[_Step] = []
    for k in range(steps):
        hp_k = {**hp, "training": schedule[k]} if "training" in hp else dict(hp)
        raw = _step_inputs(planned.case, k)
        inputs = _widen(_round(raw, planned.dtype))
        if any(np.any(np.isfinite(raw[key]) & ~np.isfinite(v)) for key, v in inputs.items()):
            result.verdict = "MISTRUSTED"
            result.message = f"the inputs overflow {planned.dtype} when rounded to it"
            return result
        t0 = time.perf_counter()
        try:
            if state is None and stateful:
                state = op.init_state(inputs, **hp_k)
            state_d = _widen(_round(state, planned.dtype)) if stateful else {}
            with np.errstate(all="ignore"):
                outputs, _ = op.apply(inputs, state_d or None, **hp_k)
        except (TypeError, ValueError) as exc:
            result.verdict = "SKIP"
            result.message = f"the oracle rejects this case under the adapter's dialect: {exc}"
            return result
        rng = case_rng(planned.seed, planned.op, planned.name, f"cot{k}")
        cts = (_widen(_round({key: rng.standard_normal(np.shape(v)) for key, v in outputs.items()},
                             planned.dtype)) if spec.differentiable else {})
        arrays = {**{f"in.{key}": v for key, v in inputs.items()},
                  **{f"state.{key}": v for key, v in state_d.items()},
                  **{f"ct.{key}": v for key, v in cts.items()}}
        request = Request(planned.op, planned.dtype, _round(inputs, planned.dtype),
                          _round(state_d, planned.dtype) if stateful else None, dict(hp_k),
                          _round(cts, planned.dtype) if cts else None)
        expected, bounds = _expected_and_bounds(op, hp_k, arrays, request, n, planned.seed)
        result.seconds_oracle += time.perf_counter() - t0
        layout = next((t[len("layout:"):] for t in planned.case.tags if t.startswith("layout:")), None)
        if layout:
            request = _with_layout(request, layout)
        t0 = time.perf_counter()
        try:
            response = _call_with_timeout(lambda r=request: adapter.evaluate(planned.op, r), prof.timeout)
        except Unsupported as exc:
            result.verdict, result.message = "SKIP", f"unsupported: {exc}"
            return result
        except Exception as exc:  # noqa: BLE001 - any adapter fault is this case's ERROR
            result.seconds_adapter += time.perf_counter() - t0
            result.verdict, result.step = "ERROR", k
            result.message = f"step {k}: the adapter raised {type(exc).__name__}: {exc}"
            return result
        result.seconds_adapter += time.perf_counter() - t0
        actual = _flatten_response(response)
        comps = _judge(actual, expected, bounds, planned.dtype)
        history.append(_Step(hp_k, planned.dtype, arrays, actual, bounds, comps, request, n, planned.seed))
        if trace is not None:
            trace.append({"step": k, "hparams": hp_k, "arrays": arrays, "expected": expected,
                          "actual": actual, "bounds": bounds, "comparisons": comps})
        state = {key[6:]: v for key, v in expected.items() if key.startswith("state.")} or None
    result.steps = len(history)
    _summarize(result, history)
    if result.verdict == "FAIL" and diagnose_fail:
        _apply_diagnosis(result, spec, diagnose(op, history))
    return result


# --------------------------------------------------------------------------------------------
# Optimizer trajectories (conformance/trajectory.py)
# --------------------------------------------------------------------------------------------


@dataclass
class _Trajectory:
    """What the oracle's trajectory needs, shared by the run and its diagnosis."""

    op: reference.Op
    dtype: str
    seed: int
    steps: int
    multipliers: list[float]
    source: trajectory.GradientSource
    initial: dict[str, np.ndarray]   # rounded initial parameters {path: w} (float64)
    hp: dict[str, Any]               # the hyper-parameters with the base lr (schedule: multipliers)

    def hps(self, hp: dict[str, Any]) -> list[dict[str, Any]]:
        return [{**hp, "lr": hp["lr"] * m} for m in self.multipliers]

    def oracle(self, hp: dict[str, Any], *, with_bounds: bool = True) -> Iterable[trajectory.OracleStep]:
        """The oracle's trajectory under ``hp``, step by step (a generator)."""
        hps = self.hps(hp)
        inputs = {f"params/{p}": v for p, v in self.initial.items()}
        state0 = _widen(_round(self.op.init_state(inputs, **hps[0]), self.dtype))
        dtype, op_name = self.dtype, self.op.name

        def baseline(h: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            request = Request(op_name, dtype, {}, {}, dict(h), None)
            return _baseline(request, h, arrays)

        return trajectory.iter_oracle_trajectory(
            self.op, hps, self.initial, state0, self.source, self.dtype, self.seed, baseline,
            lambda h: _oracle(self.op, h), with_bounds=with_bounds)


def _run_trajectory(
    adapter: Adapter, planned: PlannedCase, prof: Profile, op: reference.Op, hp: dict[str, Any],
    result: CaseResult, trace: list | None, diagnose_fail: bool,
) -> None:
    case, dtype = planned.case, planned.dtype
    steps = int(trajectory.tag(case, "steps") or prof.trajectory_steps)
    rounded = _round(case.inputs, dtype)
    if not trajectory.finite(rounded) or not trajectory.finite(case.inputs):
        result.verdict, result.message = "MISTRUSTED", f"the parameters overflow {dtype} when rounded to it"
        return
    run = _Trajectory(op, dtype, planned.seed, steps,
                      trajectory.schedule_multipliers(trajectory.tag(case, "schedule", "constant"), steps),
                      trajectory.source_of(case),
                      {k[len("params/"):]: v for k, v in _widen(rounded).items()}, hp)
    n = max(int(v.size) for v in run.initial.values())
    params = _round(run.initial, dtype)
    state: dict[str, np.ndarray] | None = None
    history: list[_Step] = []
    # The oracle's steps are computed in lockstep with the adapter's, so a trajectory that errs at
    # step 3 costs 3 oracle steps.
    oracle = run.oracle(hp)
    for k in range(steps):
        t0 = time.perf_counter()
        try:
            ostep = next(oracle)
        except (TypeError, ValueError) as exc:
            result.verdict = "SKIP"
            result.message = f"the oracle rejects this case under the adapter's dialect: {exc}"
            return
        result.seconds_oracle += time.perf_counter() - t0
        if state is None:
            state = _round({key[len("state."):]: v for key, v in ostep.arrays.items()
                            if key.startswith("state.")}, dtype)
        grads = run.source(_widen(params), k)
        grads = _round(grads, dtype)
        inputs = {**{f"params/{p}": v for p, v in params.items()},
                  **{f"grads/{p}": v for p, v in grads.items()}}
        request = Request(planned.op, dtype, inputs, dict(state), dict(ostep.hp), None)
        t0 = time.perf_counter()
        try:
            response = _call_with_timeout(lambda r=request: adapter.evaluate(planned.op, r), prof.timeout)
        except Unsupported as exc:
            result.verdict, result.message = "SKIP", f"unsupported: {exc}"
            return
        except Exception as exc:  # noqa: BLE001 - any adapter fault is this case's ERROR
            result.seconds_adapter += time.perf_counter() - t0
            result.verdict, result.step = "ERROR", k
            result.message = f"step {k}: the adapter raised {type(exc).__name__}: {exc}"
            return
        result.seconds_adapter += time.perf_counter() - t0
        actual = _flatten_response(response)
        comps = _judge(actual, ostep.expected, ostep.bounds, dtype)
        history.append(_Step(ostep.hp, dtype, ostep.arrays, actual, ostep.bounds, comps, request, n,
                             planned.seed))
        if trace is not None:
            trace.append({"step": k, "hparams": ostep.hp, "arrays": ostep.arrays,
                          "expected": ostep.expected, "actual": actual, "bounds": ostep.bounds,
                          "comparisons": comps})
        if any(c.status == "error" for c in comps):
            break  # a missing or non-finite quantity: the trajectory cannot go on
        params = {p: np.asarray(response.outputs[f"params/{p}"]) for p in params}
        state = {key: np.asarray(v) for key, v in (response.state or {}).items()}
    result.steps = len(history)
    _summarize(result, history)
    if result.verdict == "FAIL" and diagnose_fail:
        _apply_diagnosis(result, op.spec, _diagnose_trajectory(run, history))


def _explains_trajectory(run: _Trajectory, history: list[_Step], change: dict[str, Any]) -> bool:
    """Whether the adapter's recorded trajectory passes against the oracle's under ``change``."""
    try:
        hp = run.op.spec.resolve({**run.hp, **change})
        # Values only, step by step: most candidates are far off at the first steps.
        for s, q in zip(history, run.oracle(hp, with_bounds=False), strict=False):
            comps = _judge(s.actual, q.expected, s.bounds, s.dtype)
            if _status(comps) != "PASS" and max(c.ratio for c in comps) > RECHECK_RATIO:
                return False
    except (TypeError, ValueError):
        return False
    full = run.oracle(hp)
    return all(_status(_judge(s.actual, f.expected, f.bounds, s.dtype)) == "PASS"
               for s, f in zip(history, full, strict=False))


def _diagnose_trajectory(run: _Trajectory, history: list[_Step]) -> list[dict[str, Any]]:
    """:func:`diagnose` for a trajectory: the oracle's whole trajectory is recomputed per candidate."""
    return _search_knobs(run.op, history[0].hp, lambda change: _explains_trajectory(run, history, change))


def _is_switch(param: Any) -> bool:
    return param.type == "bool" or (param.allowed is not None and param.type != "mask")


def _apply_diagnosis(result: CaseResult, spec: reference.Spec, found: list[dict[str, Any]]) -> None:
    """CONVENTION when a convention switch explains the FAIL.  When only numeric values (eps,
    momentum) explain it, the adapter ignores a value the case gave it: that stays a FAIL."""
    if not found:
        return
    names = [", ".join(f"{k}={v!r}" for k, v in change.items()) for change in found]
    also = f" (equivalently: {'; '.join(names[1:])})" if len(names) > 1 else ""
    result.diagnosis = names[0]
    # A convention is a switch: a fixed set of values, or a bool that a dialect table sets (the
    # official code's bugs on or off); masks (which parameters a term applies to) are the case's
    # own choice, like numeric values.
    if all(_is_switch(spec.hparams[k]) for k in found[0]):
        result.verdict = "CONVENTION"
        result.message = f"matches the oracle with {names[0]}{also} instead of the declared dialect"
    else:
        given = ", ".join(f"{k}={result.hparams.get(k)!r}" for k in found[0])
        result.message = (f"behaves as {names[0]}{also} although the case asked for {given}: "
                          "a value it was given is ignored or replaced")


def _summarize(result: CaseResult, history: list[_Step]) -> None:
    verdicts = [_status(s.comparisons) for s in history]
    order = ["ERROR", "FAIL", "MISTRUSTED", "PASS"]
    result.verdict = min(verdicts, key=order.index) if verdicts else "PASS"
    worst_step, worst = -1, None
    for k, s in enumerate(history):
        for c in s.comparisons:
            if worst is None or _rank(c) > _rank(worst):
                worst_step, worst = k, c
    if worst is not None:
        result.worst_ratio = worst.ratio
        result.max_abs_error = worst.max_abs_error
        result.max_rel_error = worst.max_rel_error
        result.bound = worst.bound_at_worst
        result.worst = worst.quantity
        result.step = worst_step
        result.message = result.message or f"step {worst_step}: {worst.describe()}"
    result.comparisons = [f"step {k}: {c.describe()} [{c.status}]" for k, s in enumerate(history)
                          for c in s.comparisons if c.status != "ok"]


def _rank(c: tolerance.Comparison) -> tuple[int, float]:
    severity = {"error": 3, "fail": 2, "mistrusted": 1, "ok": 0}[c.status]
    ratio = c.ratio if math.isfinite(c.ratio) else 1e300
    return severity, ratio


# --------------------------------------------------------------------------------------------
# Dialect diagnosis
# --------------------------------------------------------------------------------------------


def dialect_knobs(op: str) -> dict[str, list[Any]]:
    """Convention knobs of an op and their candidate values.

    A knob is a hyper-parameter whose value differs between the spec's dialect tables (layout
    and mode switches excluded); its candidates are every value a dialect uses plus the declared
    ``allowed`` set.
    """
    spec = reference.get(op).spec
    values: dict[str, list[Any]] = {}
    for table in spec.dialects.values():
        for key, value in table["hparams"].items():
            if key in LAYOUT_KNOBS:
                continue
            values.setdefault(key, [])
            if value not in values[key]:
                values[key].append(value)
    knobs = {}
    for key, seen in values.items():
        allowed = list(spec.hparams[key].allowed or [])
        candidates = seen + [a for a in allowed if a not in seen]
        default = spec.hparams[key].default
        if default not in candidates:
            candidates.append(default)
        if len(candidates) > 1:
            knobs[key] = candidates
    return knobs


def _explains(op: reference.Op, history: list[_Step], change: dict[str, Any]) -> bool:
    """Whether every step passes against the oracle under ``change`` (bounds recomputed for it:
    another convention can move the values, and so their rounding, by orders of magnitude)."""
    for s in history:
        try:
            hp = op.spec.resolve({**s.hp, **change})
            expected = _oracle(op, hp)(s.arrays)
        except (TypeError, ValueError):
            return False
        comps = _judge(s.actual, expected, s.bounds, s.dtype)
        if _status(comps) == "PASS":
            continue
        if max(c.ratio for c in comps) > RECHECK_RATIO:
            return False  # far off even allowing for the other convention's magnitudes
        _, bounds = _expected_and_bounds(op, hp, s.arrays, s.request, s.n, s.seed)
        if _status(_judge(s.actual, expected, bounds, s.dtype)) != "PASS":
            return False
    return True


def diagnose(op: reference.Op, history: list[_Step]) -> list[dict[str, Any]]:
    """The knob assignments under which the adapter's results pass: every single knob that does,
    else the first pair that does.  Convention switches (knobs with an ``allowed`` set) are tried
    before numeric values, so ``momentum_convention='old_weight'`` is named before its numeric
    twin ``momentum=0.9``."""
    return _search_knobs(op, history[0].hp, lambda change: _explains(op, history, change))


def _search_knobs(op: reference.Op, current: dict[str, Any],
                  explains: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    """Every single knob value that ``explains`` the results, else the first pair that does."""
    spec = op.spec
    knobs = sorted(dialect_knobs(op.name).items(), key=lambda kv: not _is_switch(spec.hparams[kv[0]]))
    singles = [{k: v} for k, vals in knobs for v in vals if v != current.get(k)]
    found = [change for change in singles if explains(change)]
    if found:
        return found
    for (k1, vals1), (k2, vals2) in itertools.combinations(knobs, 2):
        for v1, v2 in itertools.product(vals1, vals2):
            if v1 == current.get(k1) or v2 == current.get(k2):
                continue
            change = {k1: v1, k2: v2}
            if explains(change):
                return [change]
    return []


# --------------------------------------------------------------------------------------------
# A whole run
# --------------------------------------------------------------------------------------------


def run(
    adapter: Adapter,
    planned: list[PlannedCase],
    *,
    profile: str = "default",
    xfails: dict[str, str] | None = None,
    progress: Callable[[int, int, CaseResult], None] | None = None,
) -> list[CaseResult]:
    """Run every planned case; ``xfails`` maps case-id patterns (regex) to reasons."""
    results = []
    patterns = {re.compile(p): why for p, why in (xfails or {}).items()}
    for i, case in enumerate(planned):
        try:
            result = run_case(adapter, case, profile=profile)
        except Exception as exc:  # noqa: BLE001 - a harness fault must not lose the run
            result = CaseResult(case.id(adapter.name), adapter.name, case.op, case.dtype, case.name,
                                case.seed, "ERROR", message=f"harness error: {type(exc).__name__}: {exc}")
        for pattern, why in patterns.items():
            if pattern.search(result.id):
                if result.verdict in ("FAIL", "ERROR"):
                    result.verdict, result.message = "XFAIL", f"expected: {why}; {result.message}"
                elif result.verdict == "PASS":
                    result.verdict, result.message = "XPASS", f"expected to fail ({why}) but passed"
        results.append(result)
        if progress:
            progress(i + 1, len(planned), result)
    return results


def load_xfails(path: str | None) -> dict[str, str]:
    """An expected-failures file: TOML ``[[xfail]]`` tables with ``id`` (a regex over case ids,
    ``ADAPTER:OP:DTYPE:CASE:SEED``) and ``reason``.  Returns {pattern: reason}."""
    if not path:
        return {}
    import sys as _sys
    from pathlib import Path

    if _sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    data = tomllib.loads(Path(path).read_text())
    entries = data.get("xfail", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "id" in e for e in entries):
        raise ValueError(f"{path}: expected [[xfail]] tables with an 'id' (regex) and a 'reason'")
    return {e["id"]: str(e.get("reason", "")).strip() for e in entries}


def unmatched_xfails(xfails: dict[str, str], results: list[CaseResult]) -> list[str]:
    """Expected-failure patterns that matched no case id (stale entries)."""
    return [p for p in xfails if not any(re.search(p, r.id) for r in results)]
