"""Runs cases through an adapter, compares with the oracle, and diagnoses what differs.

One *case* is an op, a dtype, a named input recipe and a seed (conformance/planning.py).  It runs
for T steps (T = 1 for ops without state; ``profile.steps`` for stateful ones, with a train ->
eval -> train schedule).  Each step: draw inputs and cotangents, round them to the dtype, give the
adapter the oracle's current state (rounded), let the adapter compute outputs, gradients and the
new state with its own code and autodiff, let the oracle compute the same in float64 from the
same rounded values (and the same hyper-parameters, rounded to ``OpSupport.hparam_dtype``), and
compare every quantity against the bound of :mod:`conformance.tolerance` (conformance/judge.py;
the step-by-step loop is conformance/run_steps.py).  Optimizers and stream ops run free
trajectories instead (conformance/run_trajectory.py, the model in conformance/trajectory.py).
What a case produces, the call of the adapter and the diagnosis of a FAIL are
conformance/outcome.py; this module
plans nothing (conformance/planning.py) and runs one case or a list of them, in this process or
in workers (conformance/parallel.py).

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

from collections.abc import Callable, Iterator
from typing import Any

import reference
from conformance import diagnose, support
from conformance.adapters import Adapter, OpSupport
from conformance.dtypes import DTYPES
from conformance.outcome import CaseResult, new_result
from conformance.planning import (
    PROFILES,
    Coverage,
    PlannedCase,
    Profile,
    coverage,
    find_case,
    plan,
    possible_ids,
    select_ops,
)
from conformance.run_steps import run_steps
from conformance.run_trajectory import run_trajectory
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


# --------------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------------


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
    result = new_result(adapter, planned, sup)
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
    if op.spec.draws and not sup.takes_draws:
        from conformance.distributional import run_distributional

        run_distributional(adapter, planned, prof, op, hp, sup, result, seconds)
    elif op.spec.is_trajectory:
        run_trajectory(adapter, planned, prof, op, hp, sup, result, trace, diagnose_fail, seconds)
    else:
        run_steps(adapter, planned, prof, op, hp, sup, result, trace, diagnose_fail, seconds)
    return result


def _recorded(hp: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in hp.items() if not callable(v)}


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
            result = new_result(adapter, case, table.get(case.op))
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
            result = new_result(adapter, case, table.get(case.op))
            result.error("aborted", f"not run: the adapter was abandoned after {timeouts} consecutive "
                         "timeouts")
        else:
            try:
                result = run_case(adapter, case, profile=profile, timeout=timeout, support_table=table,
                                  diagnose_fail=diagnose_fail)
            except Exception as exc:  # noqa: BLE001 - a harness fault must not lose the run
                result = new_result(adapter, case, table.get(case.op))
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
