"""Cases run in worker processes (``normref check --jobs N``), with the report of ``--jobs 1``.

A case's verdict depends only on the case, the adapter and the profile: the oracle's values, its
probes and the diagnosis are seeded by the case (``conformance/tolerance.py``), and the memo
(``conformance/memo.py``) only saves recomputation.  So cases can run anywhere, and the results
are put back in the planned order: the same seed gives the same JSON as one process, timings
aside.

Work is handed out by op and dtype (the contiguous run of planned cases of one op in one dtype):
the oracle's values of a case are keyed by its dtype, so nothing a worker could reuse is split.
Each worker loads the adapter once, from the name or path it was loaded from (``load_adapter``
records it), or from a pickled copy of an adapter built in Python.  Two differences from one
process, both about failures: the "abandoned after N consecutive timeouts" rule counts within
one such run, and a worker that dies (a segfault in a framework, ``os._exit``) loses the run it
was on: that run is repeated alone in a fresh process, and if that dies too, its cases are ERROR
of kind ``crashed`` while the run goes on.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from typing import Any

from conformance.planning import PlannedCase

__all__ = ["chunks", "run"]

_ADAPTER: Any = None


def chunks(planned: list[PlannedCase]) -> list[list[int]]:
    """The indices of ``planned``, cut into contiguous runs of one op in one dtype."""
    out: list[list[int]] = []
    for i, case in enumerate(planned):
        last = planned[out[-1][-1]] if out else None
        if last is not None and (last.op, last.dtype) == (case.op, case.dtype):
            out[-1].append(i)
        else:
            out.append([i])
    return out


def _payload(adapter: Any) -> Any:
    """What a worker rebuilds the adapter from: its name or path, else the adapter itself."""
    return getattr(adapter, "_normref_source", None) or adapter


def _start(payload: Any) -> None:
    global _ADAPTER
    if isinstance(payload, str):
        from conformance.adapters import load_adapter

        _ADAPTER = load_adapter(payload)
    else:
        _ADAPTER = payload


def _run(cases: list[PlannedCase], options: dict[str, Any]) -> list[Any]:
    from conformance import runner

    return runner.run(_ADAPTER, cases, **options)


def _pool(jobs: int, payload: Any) -> ProcessPoolExecutor:
    # spawn, not fork: a forked copy of a process that has started torch's or XLA's threads can hang
    return ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start, initargs=(payload,))


def run(adapter: Any, planned: list[PlannedCase], jobs: int, options: dict[str, Any],
        crashed: Callable[[PlannedCase, str], Any]) -> Iterator[tuple[int, Any]]:
    """``(index, result)`` for every planned case, as the workers finish them.

    ``options``: the keyword arguments of :func:`conformance.runner.run` for each run of cases;
    ``crashed(case, message)``: the result of a case whose worker died twice."""
    payload = _payload(adapter)
    lost: list[list[int]] = []
    with _pool(jobs, payload) as pool:
        futures: dict[Future, list[int]] = {
            pool.submit(_run, [planned[i] for i in part], options): part for part in chunks(planned)}
        for future in as_completed(futures):
            part = futures[future]
            try:
                results = future.result()
            except Exception:  # noqa: BLE001 - a dead worker (BrokenProcessPool): retried alone below
                lost.append(part)
                continue
            yield from zip(part, results, strict=True)
    for part in sorted(lost):
        try:
            with _pool(1, payload) as alone:
                results = alone.submit(_run, [planned[i] for i in part], options).result()
        except Exception as exc:  # noqa: BLE001 - the run goes on; these cases are ERROR
            message = (f"the worker process running these cases failed twice ({type(exc).__name__}: "
                       f"{exc}; a crash inside the framework?); rerun the op with --jobs 1 to see it")
            results = [crashed(planned[i], message) for i in part]
        yield from zip(part, results, strict=True)
