"""Runs cases through an adapter, compares with the oracle, and diagnoses what differs.

One *case* is an op, a dtype, a named input recipe and a seed (conformance/planning.py).  It runs
for T steps (T = 1 for ops without state; ``profile.steps`` for stateful ones, with a train ->
eval -> train schedule).  Each step: draw inputs and cotangents, round them to the dtype, give the
adapter the oracle's current state (rounded), let the adapter compute outputs, gradients and the
new state with its own code and autodiff, let the oracle compute the same in float64 from the
same rounded values (and the same hyper-parameters, rounded to ``OpSupport.hparam_dtype``), and
compare every quantity against the bound of :mod:`conformance.tolerance` (conformance/judge.py).
Optimizers run free trajectories instead (conformance/trajectory.py).

What the adapter declares shapes the request: a forward-only op (``gradients=False``) gets no
cotangents and no gradient is judged; state it does not keep (``not_kept``) is supplied from the
oracle and not compared.  Verdicts (worst over steps and quantities): ERROR (the adapter raised,
called ``sys.exit``, hung past the timeout, returned a wrong shape, nothing, or a non-finite
value where the oracle is finite: ``CaseResult.error_kind`` says which), FAIL, MISTRUSTED (the
dtype cannot resolve the case), PASS, SKIP (the adapter refuses a hyper-parameter value).  A FAIL
is diagnosed (conformance/diagnose.py): CONVENTION when another convention explains it, or a
named explanation (a value ignored, float32 hyper-parameters, lower-precision arithmetic).
Expected failures (conformance/xfails.py) turn FAIL/ERROR into XFAIL and PASS into XPASS.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import reference
from conformance import diagnose, judge, memo, support, tolerance, trajectory
from conformance.adapters import Adapter, OpSupport, Request, Unsupported
from conformance.cases import FAMILIES, Case, as_layout, case_rng
from conformance.dtypes import DTYPES, round_to, widen
from conformance.planning import (
    PROFILES,
    Coverage,
    PlannedCase,
    Profile,
    coverage,
    find_case,
    plan,
    possible_ids,
    primary_input,
    select_ops,
)
from conformance.xfails import Xfails

__all__ = [
    "DTYPES",
    "PROFILES",
    "VERDICTS",
    "CaseResult",
    "Coverage",
    "PlannedCase",
    "Profile",
    "coverage",
    "dialect_knobs",
    "find_case",
    "plan",
    "possible_ids",
    "run",
    "run_case",
    "select_ops",
]

VERDICTS = ("PASS", "CONVENTION", "MISTRUSTED", "XFAIL", "SKIP", "XPASS", "FAIL", "ERROR")
#: Verdicts of a case that compared something and judged it.
JUDGED = ("PASS", "CONVENTION", "XFAIL", "XPASS", "FAIL", "ERROR")
#: Consecutive timeouts after which an adapter is abandoned (its remaining cases: ERROR).
MAX_CONSECUTIVE_TIMEOUTS = 3
dialect_knobs = diagnose.dialect_knobs


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
    #: the knob values of the diagnosis (a CONVENTION's, or a value the adapter ignored)
    convention: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    #: ERROR only: raised | exit | timeout | aborted | nonfinite | shape | missing | harness | crashed
    error_kind: str = ""
    gradients_checked: bool = True
    hparam_dtype: str = "float64"
    not_compared: list[str] = field(default_factory=list)
    comparisons: list[str] = field(default_factory=list)
    seconds_adapter: float = 0.0
    seconds_oracle: float = 0.0
    framework: dict[str, str] = field(default_factory=dict)
    normref_version: str = reference.__version__

    @property
    def repro(self) -> str:
        return f"normref repro {self.id}"

    def error(self, kind: str, message: str, step: int = -1) -> None:
        self.verdict, self.error_kind, self.message, self.step = "ERROR", kind, message, step


# --------------------------------------------------------------------------------------------
# Calling the adapter
# --------------------------------------------------------------------------------------------


class _Timeout(Exception):
    pass


class _Exit(Exception):
    """The adapter called sys.exit (or raised SystemExit) inside evaluate."""


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
    error = box.get("error")
    if isinstance(error, SystemExit):
        raise _Exit(f"the adapter called sys.exit({error.code!r})")
    if error is not None:
        raise error
    return box["value"]


def _evaluate(adapter: Adapter, op: str, request: Request, seconds: float, result: CaseResult, k: int
              ) -> Any | None:
    """The adapter's response, or None with the case's verdict set (SKIP or ERROR)."""
    t0 = time.perf_counter()
    try:
        return _call_with_timeout(lambda: adapter.evaluate(op, request), seconds)
    except Unsupported as exc:
        result.verdict, result.message = "SKIP", f"unsupported: {exc}"
    except _Timeout as exc:
        result.error("timeout", f"step {k}: {exc}", k)
    except _Exit as exc:
        result.error("exit", f"step {k}: {exc}", k)
    except Exception as exc:  # noqa: BLE001 - any adapter fault is this case's ERROR
        result.error("raised", f"step {k}: the adapter raised {type(exc).__name__}: {exc}", k)
    finally:
        result.seconds_adapter += time.perf_counter() - t0
    return None


# --------------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------------


def _schedule(steps: int) -> list[bool]:
    """train ... -> eval -> train ...: the middle step is in inference mode."""
    return [k != steps // 2 for k in range(steps)] if steps > 1 else [True]


def _step_inputs(case: Case, k: int) -> dict[str, np.ndarray]:
    if k == 0:
        return case.inputs
    rng = case_rng(case.seed, case.op, case.name, f"step{k}")
    primary = primary_input(case.op)
    out = dict(case.inputs)
    if "adversarial" in case.tags:
        family = case.name.split("@")[0][len("adv-"):]
        out[primary] = FAMILIES[family](rng, case.inputs[primary].shape)
    else:
        out[primary] = rng.standard_normal(case.inputs[primary].shape) * float(
            np.std(case.inputs[primary]) or 1.0) + float(np.mean(case.inputs[primary]))
    return out


def _with_layout(request: Request, layout: str) -> Request:
    """The same request with every array in a non-contiguous memory layout."""
    def apply(tree: dict[str, np.ndarray] | None) -> dict[str, np.ndarray] | None:
        return None if tree is None else {k: as_layout(v, layout) for k, v in tree.items()}

    return Request(request.op, request.dtype, apply(request.inputs), apply(request.state),
                   request.hparams, apply(request.cotangents))


def _new_result(adapter: Adapter, planned: PlannedCase, sup: OpSupport | None) -> CaseResult:
    return CaseResult(
        id=planned.id(adapter.name), adapter=adapter.name, op=planned.op, dtype=planned.dtype,
        case=planned.name, seed=planned.seed, verdict="SKIP",
        shapes={k: list(v.shape) for k, v in planned.case.inputs.items()},
        framework=dict(adapter.info()),
        dialect={k: (sorted(v, key=repr) if isinstance(v, (set, frozenset)) else v)
                 for k, v in (sup.dialect if sup else {}).items()},
        hparam_dtype=sup.hparam_dtype if sup else "float64",
    )


def run_case(
    adapter: Adapter,
    planned: PlannedCase,
    *,
    profile: str = "default",
    trace: list | None = None,
    diagnose_fail: bool = True,
    timeout: float | None = None,
    support_table: dict[str, OpSupport] | None = None,
) -> CaseResult:
    """Run one planned case (all its steps) and return its result; never raises for adapter faults.

    ``diagnose_fail=False`` skips the diagnosis of a FAIL (e.g. while shrinking).  ``trace``, if
    given, receives one dict per step: the hyper-parameters, the arrays both sides read, the
    oracle's and the adapter's quantities, the bounds and the comparisons (for repro).
    ``timeout``: seconds per adapter call (default: the profile's).  ``support_table``: the
    adapter's validated ``ops()`` (read from the adapter when not given).
    """
    prof = PROFILES[profile]
    seconds = prof.timeout if timeout is None else timeout
    op = reference.get(planned.op)
    sup = (support_table if support_table is not None else adapter.ops()).get(planned.op)
    result = _new_result(adapter, planned, sup)
    if sup is None:
        result.message = f"{adapter.name} does not implement {planned.op}"
        return result
    if planned.dtype not in sup.dtypes:
        result.message = f"{adapter.name} does not support {planned.dtype} for {planned.op}"
        return result
    try:
        hp = support.hparams_for(planned.op, planned.case.overrides, sup.dialect)
    except (TypeError, ValueError) as exc:
        result.error("harness", f"the adapter's dialect is not valid for this op: {exc}")
        return result
    result.hparams = _recorded(support.round_hparams(planned.op, hp, sup.hparam_dtype))
    result.gradients_checked = sup.gradients and op.spec.differentiable and not op.spec.is_optimizer
    if op.spec.is_optimizer:
        _run_trajectory(adapter, planned, prof, op, hp, sup, result, trace, diagnose_fail, seconds)
    else:
        _run_steps(adapter, planned, prof, op, hp, sup, result, trace, diagnose_fail, seconds)
    return result


def _recorded(hp: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in hp.items() if not callable(v)}


def _run_steps(
    adapter: Adapter, planned: PlannedCase, prof: Profile, op: reference.Op, hp: dict[str, Any],
    sup: OpSupport, result: CaseResult, trace: list | None, diagnose_fail: bool, seconds: float,
) -> None:
    spec, dtype = op.spec, planned.dtype
    stateful = bool(spec.state)
    steps = prof.steps if stateful else 1
    schedule = _schedule(steps) if stateful and "training" in hp else [hp.get("training", True)] * steps
    state: dict[str, np.ndarray] | None = None
    n = max(int(v.size) for v in planned.case.inputs.values())
    gradients = result.gradients_checked
    exact = tuple(judge.exact_quantities(op))
    history: list[judge.Step] = []
    for k in range(steps):
        hp_k = {**hp, "training": schedule[k]} if "training" in hp else dict(hp)
        hp_k = support.round_hparams(planned.op, hp_k, sup.hparam_dtype)
        raw = _step_inputs(planned.case, k)
        inputs = widen(round_to(raw, dtype))
        if any(np.any(np.isfinite(raw[key]) & ~np.isfinite(v)) for key, v in inputs.items()):
            result.verdict, result.message = "MISTRUSTED", f"the inputs overflow {dtype} when rounded to it"
            return
        t0 = time.perf_counter()
        try:
            if state is None and stateful:
                state = op.init_state(inputs, **hp_k)
            state_d = widen(round_to(state, dtype)) if stateful else {}
            with np.errstate(all="ignore"):
                outputs, _ = op.apply(inputs, state_d or None, **hp_k)
        except (TypeError, ValueError) as exc:
            result.verdict = "SKIP"
            result.message = f"the oracle rejects this case under the adapter's dialect: {exc}"
            return
        rng = case_rng(planned.seed, planned.op, planned.name, f"cot{k}")
        cts = (widen(round_to({key: rng.standard_normal(np.shape(v)) for key, v in outputs.items()}, dtype))
               if gradients else {})
        arrays = judge.pack(inputs, state_d, cts)
        request = Request(planned.op, dtype, round_to(inputs, dtype),
                          round_to(state_d, dtype) if stateful else None, dict(hp_k),
                          round_to(cts, dtype) if cts else None)
        est = judge.estimate(op, hp_k, arrays, request, n, planned.seed)
        expected, bounds = est.expected, est.bounds(dtype)
        result.seconds_oracle += time.perf_counter() - t0
        layout = next((t[len("layout:"):] for t in planned.case.tags if t.startswith("layout:")), None)
        response = _evaluate(adapter, planned.op, _with_layout(request, layout) if layout else request,
                             seconds, result, k)
        if response is None:
            return
        actual = judge.flatten_response(response)
        skip = tuple(support.not_kept_keys(sup, expected))
        comps = judge.judge(actual, expected, bounds, dtype, skip=skip, exact=exact,
                            state_dtype=sup.state_dtype)
        history.append(judge.Step(hp_k, dtype, arrays, actual, bounds, comps, request, n, planned.seed,
                                  skip, exact, est))
        if trace is not None:
            trace.append({"step": k, "hparams": hp_k, "arrays": arrays, "expected": expected,
                          "actual": actual, "bounds": bounds, "comparisons": comps})
        # The next step starts from the oracle's state (normalizers are judged step by step).
        state = judge.unpack(expected, "state.") or None
    result.not_compared = sorted({key for s in history for key in s.skip})
    _summarize(result, history)
    if result.verdict == "FAIL" and diagnose_fail:
        _diagnose(result, planned.op, history[0].hp, sup, _step_explainer(op, history),
                  _step_precision(history), history)


def _step_explainer(op: reference.Op, history: list[judge.Step]) -> diagnose.Explains:
    """Whether every step passes against the oracle under a candidate (bounds recomputed for it:
    another convention can move the values, and so their rounding, by orders of magnitude)."""

    def explains(candidate: diagnose.Candidate) -> str | None:
        worst = "PASS"
        for s in history:
            try:
                hp = candidate.transform(s.hp)
                expected = judge.oracle(op, hp, gradients=s.request.cotangents is not None)(s.arrays)
            except (TypeError, ValueError):
                return None
            comps = s.rejudge(expected)
            verdict = judge.status(comps)
            if verdict in ("FAIL", "ERROR"):
                if verdict == "ERROR" or judge.worst_ratio(comps) > diagnose.RECHECK_RATIO:
                    return None  # far off even allowing for the other candidate's magnitudes
                first_look = s.estimate.bounds(s.dtype, expected) if s.estimate is not None else None
                if first_look and judge.worst_ratio(s.rejudge(expected, first_look)) > \
                        diagnose.FIRST_LOOK_RATIO:
                    return None
                _, bounds = judge.expected_and_bounds(op, hp, s.arrays, s.request, s.n, s.seed)
                verdict = judge.status(s.rejudge(expected, bounds))
                if verdict in ("FAIL", "ERROR"):
                    return None
            if verdict == "MISTRUSTED":
                worst = "MISTRUSTED"
        return worst

    return explains


def _step_precision(history: list[judge.Step]) -> Callable[[str], float | None]:
    """Re-judge the recorded steps against the bounds of a lower precision (from the same
    sensitivities and baseline errors: only the dtype's unit roundoffs change)."""

    def judge_in(dtype: str) -> float | None:
        worst = 0.0
        for s in history:
            assert s.estimate is not None
            comps = s.rejudge(s.estimate.expected, s.estimate.bounds(dtype), dtype)
            if judge.status(comps) in ("FAIL", "ERROR"):
                return None
            worst = max(worst, judge.worst_ratio(comps))
        return worst

    return judge_in


def _diagnose(result: CaseResult, op: str, hp: dict[str, Any], sup: OpSupport,
              explains: diagnose.Explains, precision: Callable[[str], float | None],
              history: list[Any]) -> None:
    failing = [c for s in history for c in s.comparisons if c.status in ("fail", "error")]
    if failing and all(c.kind == "dtype" and c.ratio <= 1.0 for c in failing):
        return  # the values agree: only the dtype is wrong, and the message says which
    dtype_failed = any(c.kind == "dtype" for c in failing)
    found = diagnose.search(op, hp, explains, hparam_dtype=sup.hparam_dtype)
    diagnose.apply(result, found, dtype_failed=dtype_failed)
    if result.verdict == "FAIL" and not (found and found[0].kind == "hparam_precision"):
        lower = diagnose.lower_precisions(result.dtype, precision)
        if lower is not None:
            dtype, ratio = lower
            note = (f"consistent with {dtype} arithmetic: the errors are within the {dtype} bound "
                    f"(worst ratio {ratio:.2g})")
            result.diagnosis = "; ".join(p for p in (result.diagnosis, note) if p)
            result.message = f"{note}; {result.message}" if result.message else note


def _summarize(result: CaseResult, history: list[Any]) -> None:
    verdicts = [judge.status(s.comparisons) for s in history]
    order = ["ERROR", "FAIL", "MISTRUSTED", "PASS"]
    result.steps = len(history)
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
        if result.verdict == "ERROR":
            result.error_kind = worst.kind or "nonfinite"
        result.message = result.message or f"step {worst_step}: {worst.describe()}"
    result.comparisons = [f"step {k}: {c.describe()} [{c.status}]" for k, s in enumerate(history)
                          for c in s.comparisons if c.status != "ok"]


def _rank(c: tolerance.Comparison) -> tuple[int, float]:
    severity = {"error": 3, "fail": 2, "mistrusted": 1, "ok": 0}[c.status]
    ratio = c.ratio if math.isfinite(c.ratio) else 1e300
    return severity, ratio


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
    hparam_dtype: str = "float64"    # the precision the adapter keeps float hyper-parameters in
    state_dtype: str | None = None   # the adapter's declared OpSupport.state_dtype

    def hps(self, hp: dict[str, Any], transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None
            ) -> list[dict[str, Any]]:
        """Each step's hyper-parameters: the scheduled lr, rounded as the adapter keeps them."""
        out = [support.round_hparams(self.op.name, {**hp, "lr": hp["lr"] * m}, self.hparam_dtype)
               for m in self.multipliers]
        return [transform(h) for h in out] if transform else out

    def oracle(self, hp: dict[str, Any], *, with_bounds: bool = True, bound_dtype: str | None = None,
               transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
               ) -> Iterable[trajectory.OracleStep]:
        """The oracle's trajectory under ``hp`` (each step's hyper-parameters through ``transform``),
        step by step (a generator); ``bound_dtype``: judge in another dtype than the run's."""
        hps = self.hps(hp, transform)
        bounds_in = bound_dtype or self.dtype

        def start() -> Iterator[trajectory.OracleStep]:
            inputs = {f"params/{p}": v for p, v in self.initial.items()}
            state0 = widen(round_to(self.op.init_state(inputs, **hps[0]), self.dtype))
            return trajectory.iter_oracle_trajectory(
                self.op, hps, self.initial, state0, self.source, self.dtype, self.seed,
                self.baseline(bounds_in), lambda h: judge.oracle(self.op, h), with_bounds=with_bounds,
                bound_dtype=bounds_in)

        if transform is not None:
            return start()  # a diagnosis candidate: looked at once
        # The same trajectory for every adapter run on this case (conformance/memo.py).
        source = self.source
        key = memo.digest("trajectory", self.op.name, hps, self.initial, self.dtype, self.seed, bounds_in,
                          with_bounds, source.kind, source.family, source.op, source.case, source.seed)
        return memo.trajectory(key, start)

    def baseline(self, dtype: str) -> Callable[[dict[str, Any], dict[str, np.ndarray]],
                                                dict[str, np.ndarray]]:
        """The float32 same-formula evaluation of a step, for bounds in ``dtype``."""
        op_name = self.op.name

        def evaluate(h: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return judge.baseline(Request(op_name, dtype, {}, {}, dict(h), None), h, arrays)

        return evaluate

    def own_step(self, step: judge.Step, hp: dict[str, Any], dtype: str | None = None, *,
                 check_dtypes: bool = True) -> list[tolerance.Comparison]:
        """The adapter's step judged against the exact step map (under ``hp``) from its own inputs."""
        dtype = dtype or self.dtype
        arrays = judge.pack(widen(step.request.inputs), widen(step.request.state or {}), None)
        return trajectory.judge_own_step(self.op, hp, arrays, step.actual, dtype, step.n, step.seed,
                                         self.baseline(dtype), judge.oracle(self.op, hp), skip=step.skip,
                                         exact=step.exact, check_dtypes=check_dtypes,
                                         state_dtype=self.state_dtype)


def _run_trajectory(
    adapter: Adapter, planned: PlannedCase, prof: Profile, op: reference.Op, hp: dict[str, Any],
    sup: OpSupport, result: CaseResult, trace: list | None, diagnose_fail: bool, seconds: float,
) -> None:
    case, dtype = planned.case, planned.dtype
    steps = int(trajectory.tag(case, "steps") or prof.trajectory_steps)
    rounded = round_to(case.inputs, dtype)
    if not trajectory.finite(rounded) or not trajectory.finite(case.inputs):
        result.verdict, result.message = "MISTRUSTED", f"the parameters overflow {dtype} when rounded to it"
        return
    run = _Trajectory(op, dtype, planned.seed, steps,
                      trajectory.schedule_multipliers(trajectory.tag(case, "schedule", "constant"), steps),
                      trajectory.source_of(case),
                      {k[len("params/"):]: v for k, v in widen(rounded).items()}, hp, sup.hparam_dtype,
                      sup.state_dtype)
    n = max(int(v.size) for v in run.initial.values())
    params = round_to(run.initial, dtype)
    state: dict[str, np.ndarray] | None = None
    history: list[judge.Step] = []
    exact = tuple(judge.exact_quantities(op))
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
            state = round_to(judge.unpack(ostep.arrays, "state."), dtype)
        grads = round_to(run.source(widen(params), k), dtype)
        inputs = {**{f"params/{p}": v for p, v in params.items()},
                  **{f"grads/{p}": v for p, v in grads.items()}}
        request = Request(planned.op, dtype, inputs, dict(state), dict(ostep.hp), None)
        response = _evaluate(adapter, planned.op, request, seconds, result, k)
        if response is None:
            return
        actual = judge.flatten_response(response)
        skip = tuple(support.not_kept_keys(sup, ostep.expected))
        step = judge.Step(ostep.hp, dtype, ostep.arrays, actual, ostep.bounds, [], request, n,
                          planned.seed + k, skip, exact)
        free = judge.judge(actual, ostep.expected, ostep.bounds, dtype, skip=skip, exact=exact,
                           state_dtype=sup.state_dtype)
        step.comparisons = _trajectory_step(free, lambda s=step, h=ostep.hp: run.own_step(s, h))
        comps = step.comparisons
        history.append(step)
        if trace is not None:
            trace.append({"step": k, "hparams": ostep.hp, "arrays": ostep.arrays,
                          "expected": ostep.expected, "actual": actual, "bounds": ostep.bounds,
                          "comparisons": comps})
        if any(c.status == "error" for c in comps):
            break  # a missing or non-finite quantity: the trajectory cannot go on
        if any(c.beyond_range for c in comps):
            # The exact state left the dtype's range: the framework's copy is inf from here on
            # and no later step can be compared with the oracle's.
            result.message = (f"step {k}: the exact values exceed the {dtype} range; "
                              "the trajectory is not judged beyond this step")
            break
        params = {p: np.asarray(response.outputs[f"params/{p}"]) for p in params}
        # State the framework keeps comes back from it; state it does not keep (a step count it
        # never stores) is supplied from the oracle, as a training loop would know it.
        kept = {key: np.asarray(v) for key, v in (response.state or {}).items()}
        supplied = round_to({key[len("state."):]: ostep.expected[key] for key in skip}, dtype)
        state = {**kept, **supplied}
    result.not_compared = sorted({key.split("/", 1)[0] for s in history for key in s.skip})
    _summarize(result, history)
    if result.verdict == "FAIL" and diagnose_fail:
        _diagnose(result, planned.op, history[0].hp, sup, _trajectory_explainer(run, history),
                  _trajectory_precision(run, history), history)


def _trajectory_step(free: list[tolerance.Comparison],
                     own: Callable[[], list[tolerance.Comparison]]) -> list[tolerance.Comparison]:
    """One trajectory step's comparisons: the free-running ones against the oracle's trajectory
    and its accumulated bound, or, where those FAIL (or find a NaN/inf the trajectory does not
    have), the step judged from the adapter's own inputs (conformance/trajectory.py): a wrong step
    FAILs there, a right one means the trajectory is more sensitive than its first-order
    propagated bound, and the step is MISTRUSTED."""
    verdict = judge.status(free)
    if verdict not in ("FAIL", "ERROR") or any(
            c.status == "error" and c.kind != "nonfinite" for c in free):
        return free
    mine = own()
    worst = max((c for c in free if c.status in ("fail", "error")), key=_rank)
    if judge.status(mine) in ("FAIL", "ERROR"):
        for c in mine:
            if c.status in ("fail", "error"):
                c.add_note("judged from the adapter's own parameters and state")
        return mine
    note = (f"the trajectory left its propagated bound ({worst.quantity}: ratio {worst.ratio:.3g}) while "
            "the step from the adapter's own parameters and state agrees with the exact step map: "
            "the trajectory is more sensitive here than its first-order bound")
    return [*mine, tolerance.Comparison("trajectory", "mistrusted", worst.ratio, worst.max_abs_error,
                                        worst.max_rel_error, worst.bound_at_worst, worst.worst_index, note)]


def _trajectory_explainer(run: _Trajectory, history: list[judge.Step]) -> diagnose.Explains:
    """Whether the adapter's recorded trajectory passes against the oracle's under a candidate
    (the oracle's whole trajectory recomputed for it, each step that leaves its bound judged
    from the adapter's own state under the candidate)."""

    def explains(candidate: diagnose.Candidate) -> str | None:
        try:
            # Values only, step by step from the adapter's own state: most candidates are far off
            # at the first steps.
            for s in history:
                hp = candidate.transform(s.hp)
                arrays = judge.pack(widen(s.request.inputs), widen(s.request.state or {}), None)
                comps = s.rejudge(judge.oracle(run.op, hp)(arrays))
                if judge.status(comps) == "ERROR" or (
                        judge.status(comps) == "FAIL" and judge.worst_ratio(comps) > diagnose.RECHECK_RATIO):
                    return None
            worst = "PASS"
            for s, f in zip(history, run.oracle(run.hp, transform=candidate.transform), strict=False):
                comps = _trajectory_step(s.rejudge(f.expected, f.bounds),
                                         lambda s=s, h=f.hp: run.own_step(s, h, check_dtypes=False))
                verdict = judge.status(comps)
                if verdict in ("FAIL", "ERROR"):
                    return None
                if verdict == "MISTRUSTED":
                    worst = "MISTRUSTED"
            return worst
        except (TypeError, ValueError):
            return None

    return explains


def _trajectory_precision(run: _Trajectory, history: list[judge.Step]) -> Callable[[str], float | None]:
    def judge_in(dtype: str) -> float | None:
        worst = 0.0
        for s, f in zip(history, run.oracle(run.hp, bound_dtype=dtype), strict=False):
            comps = _trajectory_step(s.rejudge(f.expected, f.bounds, dtype),
                                     lambda s=s, h=f.hp: run.own_step(s, h, dtype, check_dtypes=False))
            if judge.status(comps) in ("FAIL", "ERROR"):
                return None
            worst = max(worst, judge.worst_ratio(comps))
        return worst

    return judge_in


# --------------------------------------------------------------------------------------------
# A whole run
# --------------------------------------------------------------------------------------------


def run(
    adapter: Adapter,
    planned: list[PlannedCase],
    *,
    profile: str = "default",
    xfails: Xfails | dict[str, str] | None = None,
    progress: Callable[[int, int, CaseResult], None] | None = None,
    timeout: float | None = None,
    max_consecutive_timeouts: int = MAX_CONSECUTIVE_TIMEOUTS,
    diagnose_fail: bool = True,
    jobs: int = 1,
) -> list[CaseResult]:
    """Run every planned case; ``xfails`` (an :class:`~conformance.xfails.Xfails` or a
    ``{pattern: reason}`` dict) marks expected failures.  ``timeout``: seconds per adapter call
    (default: the profile's); ``diagnose_fail``: as in :func:`run_case`.  After
    ``max_consecutive_timeouts`` timeouts in a row the adapter is abandoned: its remaining cases
    are ERROR (``aborted``) and the run still returns every result.  ``jobs`` > 1 runs the cases
    in that many worker processes (conformance/parallel.py), with the same results in the same
    order."""
    expected = xfails if isinstance(xfails, Xfails) else Xfails.from_dict(xfails or {})
    table = support.validate(adapter)
    options = {"profile": profile, "timeout": timeout, "max_consecutive_timeouts": max_consecutive_timeouts,
               "diagnose_fail": diagnose_fail}
    if jobs > 1 and len(planned) > 1:
        from conformance import parallel

        def crashed(case: PlannedCase, message: str) -> CaseResult:
            result = _new_result(adapter, case, table.get(case.op))
            result.error("crashed", message)
            return result

        produced = parallel.run(adapter, planned, jobs, options, crashed)
    else:
        produced = _in_order(adapter, planned, table, **options)
    results: list[CaseResult | None] = [None] * len(planned)
    for done, (i, result) in enumerate(produced, 1):
        _apply_xfail(result, expected.reason(result.id))
        results[i] = result
        if progress:
            progress(done, len(planned), result)
    return [r for r in results if r is not None]


def _in_order(adapter: Adapter, planned: list[PlannedCase], table: dict[str, OpSupport], *, profile: str,
              timeout: float | None, max_consecutive_timeouts: int, diagnose_fail: bool
              ) -> Iterator[tuple[int, CaseResult]]:
    """``(index, result)`` for every planned case, run one after the other in this process."""
    timeouts = 0
    for i, case in enumerate(planned):
        if timeouts >= max_consecutive_timeouts:
            result = _new_result(adapter, case, table.get(case.op))
            result.error("aborted", f"not run: the adapter was abandoned after {timeouts} consecutive "
                         "timeouts")
        else:
            try:
                result = run_case(adapter, case, profile=profile, timeout=timeout, support_table=table,
                                  diagnose_fail=diagnose_fail)
            except Exception as exc:  # noqa: BLE001 - a harness fault must not lose the run
                result = _new_result(adapter, case, table.get(case.op))
                result.error("harness", f"harness error: {type(exc).__name__}: {exc}")
            timeouts = timeouts + 1 if result.error_kind == "timeout" else 0
        yield i, result


def _apply_xfail(result: CaseResult, why: str | None) -> None:
    if why is None:
        return
    if result.verdict in ("FAIL", "ERROR"):
        result.verdict, result.message = "XFAIL", f"expected: {why}; {result.message}"
    elif result.verdict == "PASS":
        result.verdict, result.message = "XPASS", f"expected to fail ({why}) but passed"


def judged(results: list[CaseResult]) -> int:
    """How many cases compared something and judged it (not SKIP, not MISTRUSTED)."""
    return sum(r.verdict in JUDGED for r in results)
