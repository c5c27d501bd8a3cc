"""Optimizers and stream ops run as free trajectories (the model and its accumulated bounds:
conformance/trajectory.py): the adapter runs its own T steps from its own parameters (an
optimizer's) and state, given each step's gradients or batch, the oracle runs the same recipe in
float64, every step is compared, and a step that leaves its propagated bound is judged again from
the adapter's own inputs."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

import reference
from conformance import diagnose, judge, memo, support, tolerance, trajectory
from conformance.adapters import Adapter, OpSupport, Request
from conformance.dtypes import round_to, widen
from conformance.outcome import CaseResult, call_adapter, diagnose_case, rank, summarize
from conformance.planning import PlannedCase, Profile

__all__ = ["run_trajectory"]


@dataclass
class _Trajectory:
    """What the oracle's trajectory needs, shared by the run and its diagnosis."""

    op: reference.Op
    dtype: str
    seed: int
    steps: int
    multipliers: list[float]
    source: trajectory.StepSource
    initial: dict[str, np.ndarray]   # rounded initial carried inputs {"params/<path>": w} (float64)
    hp: dict[str, Any]               # the hyper-parameters with the base lr (schedule: multipliers)
    hparam_dtype: str = "float64"    # the precision the adapter keeps float hyper-parameters in
    state_dtype: str | None = None   # the adapter's declared OpSupport.state_dtype

    def hps(self, hp: dict[str, Any], transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None
            ) -> list[dict[str, Any]]:
        """Each step's hyper-parameters: the scheduled lr, rounded as the adapter keeps them."""
        out = [support.round_hparams(self.op.name, {**hp, "lr": hp["lr"] * m} if "lr" in hp else dict(hp),
                                     self.hparam_dtype) for m in self.multipliers]
        return [transform(h) for h in out] if transform else out

    def oracle(self, hp: dict[str, Any], *, with_bounds: bool = True, bound_dtype: str | None = None,
               transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
               ) -> Iterable[trajectory.OracleStep]:
        """The oracle's trajectory under ``hp`` (each step's hyper-parameters through ``transform``),
        step by step (a generator); ``bound_dtype``: judge in another dtype than the run's."""
        hps = self.hps(hp, transform)
        bounds_in = bound_dtype or self.dtype

        def start() -> Iterator[trajectory.OracleStep]:
            inputs = {**self.initial, **widen(round_to(self.source.fresh(self.initial, 0), self.dtype))}
            state0 = widen(round_to(self.op.init_state(inputs, **hps[0]), self.dtype))
            return trajectory.iter_oracle_trajectory(
                self.op, hps, self.initial, state0, self.source, self.dtype, self.seed,
                self.baseline(bounds_in), lambda h: judge.oracle(self.op, h), with_bounds=with_bounds,
                bound_dtype=bounds_in)

        if transform is not None:
            return start()  # a diagnosis candidate: looked at once
        # The same trajectory for every adapter run on this case (conformance/memo.py).
        key = memo.digest("trajectory", self.op.name, hps, self.initial, self.dtype, self.seed, bounds_in,
                          with_bounds, *self.source.key)
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


def run_trajectory(
    adapter: Adapter, planned: PlannedCase, prof: Profile, op: reference.Op, hp: dict[str, Any],
    sup: OpSupport, result: CaseResult, trace: list | None, diagnose_fail: bool, seconds: float,
) -> None:
    case, dtype = planned.case, planned.dtype
    steps = int(trajectory.tag(case, "steps") or prof.trajectory_steps)
    rounded = round_to(case.inputs, dtype)
    if not trajectory.finite(rounded) or not trajectory.finite(case.inputs):
        what = "parameters" if op.spec.is_optimizer else "inputs"
        result.verdict, result.message = "MISTRUSTED", f"the {what} overflow {dtype} when rounded to it"
        return
    source = trajectory.source_of(case)
    # An optimizer carries its parameters from step to step; a stream op carries only its state.
    initial = {} if isinstance(source, trajectory.BatchSource) else widen(rounded)
    run = _Trajectory(op, dtype, planned.seed, steps,
                      trajectory.schedule_multipliers(trajectory.tag(case, "schedule", "constant"), steps),
                      source, initial, hp, sup.hparam_dtype, sup.state_dtype)
    n = max(int(v.size) for v in case.inputs.values())
    carried = round_to(run.initial, dtype)
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
        inputs = {**carried, **round_to(run.source.fresh(widen(carried), k), dtype)}
        request = Request(planned.op, dtype, inputs, dict(state), dict(ostep.hp), None)
        response = call_adapter(adapter, planned.op, request, seconds, result, k)
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
        carried = {name: np.asarray(response.outputs[name]) for name in carried}
        # State the framework keeps comes back from it; state it does not keep (a step count it
        # never stores) is supplied from the oracle, as a training loop would know it.
        kept = {key: np.asarray(v) for key, v in (response.state or {}).items()}
        supplied = round_to({key[len("state."):]: ostep.expected[key] for key in skip}, dtype)
        state = {**kept, **supplied}
    result.not_compared = sorted({key.split("/", 1)[0] for s in history for key in s.skip})
    summarize(result, history)
    if result.verdict == "FAIL" and diagnose_fail:
        diagnose_case(result, planned.op, history[0].hp, sup, _trajectory_explainer(run, history),
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
    worst = max((c for c in free if c.status in ("fail", "error")), key=rank)
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
        except (TypeError, ValueError, KeyError):  # KeyError: the candidate needs a slot not recorded
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
