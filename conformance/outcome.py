"""The outcome of one case: its result record, the call of the adapter, the verdict over its
steps and the diagnosis of a FAIL (shared by the step-by-step runs of conformance/run_steps.py
and the trajectories of conformance/run_trajectory.py)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import reference
from conformance import diagnose, judge, tolerance
from conformance.adapters import Adapter, OpSupport, Request, Unsupported
from conformance.planning import PlannedCase

__all__ = ["CaseResult", "call_adapter", "diagnose_case", "new_result", "rank", "summarize"]


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


def call_adapter(adapter: Adapter, op: str, request: Request, seconds: float, result: CaseResult, k: int
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


def new_result(adapter: Adapter, planned: PlannedCase, sup: OpSupport | None) -> CaseResult:
    return CaseResult(
        id=planned.id(adapter.name), adapter=adapter.name, op=planned.op, dtype=planned.dtype,
        case=planned.name, seed=planned.seed, verdict="SKIP",
        shapes={k: list(v.shape) for k, v in planned.case.inputs.items()},
        framework=dict(adapter.info()),
        dialect={k: (sorted(v, key=repr) if isinstance(v, (set, frozenset)) else v)
                 for k, v in (sup.dialect if sup else {}).items()},
        hparam_dtype=sup.hparam_dtype if sup else "float64",
    )


def diagnose_case(result: CaseResult, op: str, hp: dict[str, Any], sup: OpSupport,
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


def summarize(result: CaseResult, history: list[Any]) -> None:
    verdicts = [judge.status(s.comparisons) for s in history]
    order = ["ERROR", "FAIL", "MISTRUSTED", "PASS"]
    result.steps = len(history)
    result.verdict = min(verdicts, key=order.index) if verdicts else "PASS"
    worst_step, worst = -1, None
    for k, s in enumerate(history):
        for c in s.comparisons:
            if worst is None or rank(c) > rank(worst):
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


def rank(c: tolerance.Comparison) -> tuple[int, float]:
    severity = {"error": 3, "fail": 2, "mistrusted": 1, "ok": 0}[c.status]
    ratio = c.ratio if math.isfinite(c.ratio) else 1e300
    return severity, ratio
