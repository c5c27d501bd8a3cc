"""Ops with a forward (and a VJP) run step by step: a stateful op for ``profile.steps`` steps
with a train -> eval -> train schedule, each step judged from the oracle's state (conformance/
runner.py describes a case)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

import reference
from conformance import diagnose, judge, support
from conformance.adapters import Adapter, OpSupport, Request
from conformance.cases import FAMILIES, Case, as_layout, case_rng
from conformance.dtypes import round_to, widen
from conformance.outcome import CaseResult, call_adapter, diagnose_case, summarize
from conformance.planning import PlannedCase, Profile, primary_input

__all__ = ["run_steps"]


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


def run_steps(
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
        response = call_adapter(adapter, planned.op, _with_layout(request, layout) if layout else request,
                             seconds, result, k)
        if response is None:
            return
        actual = judge.flatten_response(response)
        skip = tuple(support.not_kept_keys(sup, expected))
        comps = judge.judge(actual, expected, bounds, dtype, skip=skip, exact=exact,
                            state_dtype=sup.state_dtype)
        comps = judge.mistrust_near_jumps(comps, judge.values_near_jumps(op, hp_k, arrays, dtype))
        history.append(judge.Step(hp_k, dtype, arrays, actual, bounds, comps, request, n, planned.seed,
                                  skip, exact, est))
        if trace is not None:
            trace.append({"step": k, "hparams": hp_k, "arrays": arrays, "expected": expected,
                          "actual": actual, "bounds": bounds, "comparisons": comps})
        # The next step starts from the oracle's state (normalizers are judged step by step).
        state = judge.unpack(expected, "state.") or None
    result.not_compared = sorted({key for s in history for key in s.skip})
    summarize(result, history)
    if result.verdict == "FAIL" and diagnose_fail:
        diagnose_case(result, planned.op, history[0].hp, sup, _step_explainer(op, history),
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
