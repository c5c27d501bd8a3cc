"""``normref judge DIR RESULTS``: the verdicts of a backend's results on exported golden vectors.

Nothing is judged here.  The ordinary check machinery runs (:func:`conformance.runner.run`, with
the same plan, profile, seed and declaration as the export) with :class:`ReplayAdapter`, an
adapter whose ``evaluate`` answers each request with the arrays the backend wrote for that case
and step.  Bounds, comparisons, MISTRUSTED, the trajectories' own-step re-judging, the
diagnosis, expected failures and every report are therefore those ``normref check`` gives an
adapter that returns those arrays.

The adapter is told nothing about which case the harness is running: it recognises it.  Each
exported step carries a digest of what the export gave in it (conformance/golden.py,
:func:`~conformance.golden.request_key`).  A request continuing the current case (its next step,
or a sampler's next draw) must match that step's digest; otherwise it must match the first step
of a case not answered yet (cases with identical first requests are answered in the planned
order, the order the runner asks in).  A request that matches neither was not exported: the
adapter raises, and the case is ERROR, naming it.  So a RESULTS folder cannot be judged against
the wrong export, and an export cannot silently drift from what ``normref check`` asks.

A case whose results are absent is ERROR of kind ``no result`` (never SKIP): a backend that
crashed or skipped a case must not pass the gate.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from conformance import runner
from conformance.adapters import OpSupport, Request, Response, Unsupported
from conformance.golden import Golden, given_parts, read_arrays, request_key, results_present
from conformance.outcome import CaseResult, new_result
from conformance.xfails import Xfails

__all__ = ["NO_RESULT", "ReplayAdapter", "ReplayMismatch", "judge"]

#: The error kind of a case the backend wrote no result for.
NO_RESULT = "no result"


class ReplayMismatch(Exception):
    """The harness asked for something that was not exported (another export, another normref)."""


class _Current:
    """The case being answered: its index entry, manifest, results and how far it got."""

    def __init__(self, entry: dict[str, Any], manifest: dict[str, Any], results: dict[str, np.ndarray],
                 note: dict[str, Any]) -> None:
        self.entry, self.manifest, self.results, self.note = entry, manifest, results, note
        self.step = 0      # the step answered last
        self.sample = 0    # a sampler's draws answered so far


class ReplayAdapter:
    """Answers the harness's requests from a backend's RESULTS for an export ``golden``."""

    def __init__(self, golden: str | Path | Golden, results: str | Path) -> None:
        self.golden = golden if isinstance(golden, Golden) else Golden(golden)
        self.results = Path(results)
        self.name = self.golden.declaration.name
        self._first: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        for entry in self.golden.cases:
            if entry["key"]:
                self._first.setdefault((entry["op"], entry["dtype"], entry["key"]), []).append(entry)
        self._answered: set[str] = set()
        self._current: _Current | None = None
        #: ids of cases judged without asking (no result): never the answer to another case's request
        self.without_results: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:  # a worker process starts with nothing loaded
        state = dict(self.__dict__)
        state["_current"], state["_answered"] = None, set()
        return state

    def info(self) -> dict[str, str]:
        path = self.results / "info.json"
        if path.is_file():
            try:
                return {str(k): str(v) for k, v in json.loads(path.read_text()).items()}
            except (ValueError, AttributeError):
                pass
        return dict(self.golden.declaration.info)

    def ops(self) -> dict[str, OpSupport]:
        return self.golden.declaration.ops()

    # ----------------------------------------------------------------------------------------

    def evaluate(self, op: str, request: Request) -> Response:
        cur = self._current
        if cur is not None and cur.entry["op"] == op and cur.entry["dtype"] == request.dtype:
            if cur.entry["run"] == "distributional" and cur.sample < self._samples(cur) \
                    and self._matches(request, cur, 0):
                cur.sample += 1
                return self._answer(cur, f"sample{cur.sample - 1}/", 0)
            if cur.step + 1 < cur.entry["steps"] and self._matches(request, cur, cur.step + 1):
                cur.step += 1
                return self._answer(cur, f"step{cur.step}/", cur.step)
        entry = self._starting(op, request)
        self._answered.add(entry["id"])
        self._current = cur = self._load(entry)
        if entry["run"] == "distributional":
            cur.sample = 1
            return self._answer(cur, "sample0/", 0)
        return self._answer(cur, "step0/", 0)

    def _starting(self, op: str, request: Request) -> dict[str, Any]:
        key = request_key(request, given_parts(request))
        for entry in self._first.get((op, request.dtype, key), []):
            if entry["id"] not in self._answered and entry["id"] not in self.without_results:
                return entry
        where = (f"step {self._current.step + 1} of {self._current.entry['id']} or " if self._current else "")
        raise ReplayMismatch(f"the harness asked for a {op} {request.dtype} request that matches neither "
                             f"{where}the first step of an exported case not answered yet: "
                             f"{self.golden.root} was exported with other settings")

    def _matches(self, request: Request, cur: _Current, k: int) -> bool:
        step = cur.manifest["steps"][k]
        given = {part: (None if names is None else sorted(names)) for part, names in step["given"].items()}
        try:
            return request_key(request, given) == step["key"]
        except KeyError:
            return False

    def _samples(self, cur: _Current) -> int:
        return int(cur.manifest.get("samples", 0))

    def _load(self, entry: dict[str, Any]) -> _Current:
        base = self.results / entry["stem"]
        arrays = read_arrays(base, entry["dtype"]) or {}
        note_path = base.with_name(base.name + ".json")
        note = json.loads(note_path.read_text()) if note_path.is_file() else {}
        if not isinstance(note, dict):
            raise ValueError(f"{note_path}: expected a JSON object (unsupported / error / step)")
        return _Current(entry, self.golden.manifest(entry), arrays, note)

    def _answer(self, cur: _Current, prefix: str, k: int) -> Response:
        """The backend's arrays under ``prefix``; its note (unsupported / error) at step ``k``."""
        note = cur.note
        if note and int(note.get("step", 0)) <= k:
            if "unsupported" in note:
                raise Unsupported(str(note["unsupported"]))
            if "error" in note:
                raise _named(str(note.get("exception") or "BackendError"))(str(note["error"]))
        parts: dict[str, dict[str, np.ndarray]] = {"outputs": {}, "state": {}, "grads": {}}
        for key, value in cur.results.items():
            if key.startswith(prefix):
                part, _, name = key[len(prefix):].partition("/")
                if part in parts and name:
                    parts[part][name] = value
        return Response(outputs=parts["outputs"], state=parts["state"], grads=parts["grads"])


def _named(name: str) -> type[Exception]:
    """An exception class named as the backend's was (the report reads ``raised <name>: ...``)."""
    clean = name if name.isidentifier() else "BackendError"
    return type(clean, (Exception,), {})


# --------------------------------------------------------------------------------------------
# The whole judgement
# --------------------------------------------------------------------------------------------


def judge(
    golden_dir: str | Path,
    results_dir: str | Path,
    *,
    xfails: Xfails | dict[str, str] | None = None,
    jobs: int | Callable[[list[Any]], int] = 1,
    timeout: float | None = None,
    progress: Callable[[int, int, CaseResult], None] | None = None,
) -> tuple[list[CaseResult], dict[str, Any], dict[str, Any]]:
    """The results of every exported case (in the export's order), the run's metadata (as
    ``normref check`` writes it) and the coverage per adapter.  A RESULTS path that is not a
    directory, an export of another normref or one whose cases this normref would not plan is a
    ValueError.  ``jobs``: worker processes, or a function of the planned cases giving their number.
    """
    golden = Golden(golden_dir)
    results = Path(results_dir)
    if not results.is_dir():
        raise ValueError(f"RESULTS {str(results)!r} is not a directory")
    replay = ReplayAdapter(golden, results)
    idx = golden.index
    planned = runner.plan(replay, ops=idx["ops"], dtypes=idx["dtypes"], seed=idx["seed"],
                          profile=idx["profile"], max_examples=idx["max_examples"])
    exported = [c["id"] for c in golden.cases]
    if [c.id(replay.name) for c in planned] != exported:
        raise ValueError(f"{golden_dir}: its cases are not the ones this normref plans for the same settings "
                         "(an edited spec or index?): export again")
    expected = xfails if isinstance(xfails, Xfails) else Xfails.from_dict(xfails or {})
    table = replay.ops()
    present = [i for i, e in enumerate(golden.cases)
               if not e["needs_result"] or results_present(results, e["stem"])]
    replay.without_results = set(exported) - {exported[i] for i in present}
    out: list[CaseResult | None] = [None] * len(planned)
    done = 0
    for i, (c, e) in enumerate(zip(planned, golden.cases, strict=True)):
        if e["id"] not in replay.without_results:
            continue
        result = new_result(replay, c, table.get(c.op))
        result.error(NO_RESULT, f"{NO_RESULT}: the backend wrote neither {e['stem']}.npz nor {e['stem']}/ "
                     f"(nor {e['stem']}.json) in {results}")
        # the same rule as every other case's (an expected failure turns ERROR into XFAIL)
        runner._apply_xfail(result, expected.reason(result.id))
        out[i] = result
        out[i] = result
        done += 1
        if progress:
            progress(done, len(planned), result)

    def step(_: int, __: int, result: CaseResult) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, len(planned), result)

    asked = [planned[i] for i in present]
    judged = runner.run(replay, asked, profile=idx["profile"], xfails=expected, progress=step,
                        timeout=timeout, jobs=jobs(asked) if callable(jobs) else jobs)
    for i, result in zip(present, judged, strict=True):
        out[i] = result
    coverage = runner.coverage(replay, ops=idx["ops"], dtypes=idx["dtypes"])
    meta = {"adapters": {replay.name: replay.info()}, "seed": idx["seed"], "profile": idx["profile"],
            "dtypes": idx["dtypes"], "ops": idx["ops"], "shard": None,
            "coverage": {replay.name: coverage.__dict__}, "golden": str(golden_dir), "results": str(results)}
    return [r for r in out if r is not None], meta, {replay.name: coverage}
