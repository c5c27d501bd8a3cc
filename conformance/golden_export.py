"""``normref export DIR``: every request the harness would make of a backend, written to disk
(the format: conformance/golden.py; the README written into DIR: conformance/golden_readme.py).

The requests are not rebuilt here: the ordinary check machinery runs (:func:`conformance.runner.
run_case`, with its trace) with a recording adapter that keeps every request and answers it with
the oracle's own values rounded to the dtype, so the export holds exactly what ``normref check``
sends.  What that answer can change is not exported as given:

* normalizers and other ops judged step by step get the oracle's state at every step, never the
  adapter's: every step's request is fixed and exported whole;
* an optimizer runs its own trajectory: its parameters and state at step k are its own outputs of
  step k-1, so step k's file holds only what does not depend on them: the gradients of a fixed
  sequence, the state slots it does not keep (supplied by the harness), the hyper-parameters (the
  scheduled lr).  The gradients of a model source (``quadratic``, ``rosenbrock``) are a function
  of its own parameters: the manifest gives the function and its constants, and the backend
  computes them (in float64 from its parameters, then rounded to the dtype, as the harness does);
* a stream op (an estimator over batches) gets a fresh batch every step (exported) and carries
  its own state;
* an op with random draws, for a backend declaring ``takes_draws = false``, is one request
  repeated ``samples`` times (its outputs' means are judged).

A case the harness decides before any call (inputs that overflow the dtype: MISTRUSTED; a
convention the oracle rejects: SKIP) is listed with no request; ``normref judge`` decides it the
same way without a result.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import reference
from conformance import judge, runner, support, trajectory
from conformance.adapters import Request, Response
from conformance.dtypes import round_to, widen
from conformance.golden import (
    FORMAT,
    LAYOUTS,
    Declaration,
    array_meta,
    case_stem,
    given_parts,
    hparams_json,
    request_key,
    write_arrays,
)
from conformance.golden_readme import readme_text
from conformance.parallel import chunks
from conformance.planning import PlannedCase
from conformance.step_sources import ROSENBROCK_A

__all__ = ["ExportSummary", "export", "run_kind"]


def run_kind(op: str, takes_draws: bool) -> str:
    """How a case runs: ``steps`` (judged step by step from the oracle's state), ``trajectory``
    (optimizers and streams: the backend's own), ``distributional`` (own random draws)."""
    spec = reference.get(op).spec
    if spec.draws and not takes_draws:
        return "distributional"
    return "trajectory" if spec.is_trajectory else "steps"


class _Recorder:
    """An adapter that keeps every request and answers with the oracle's values in the dtype."""

    def __init__(self, declaration: Declaration) -> None:
        self.declaration = declaration
        self.name = declaration.name
        self.requests: list[Request] = []
        self._repeated: Response | None = None

    def info(self) -> dict[str, str]:
        return dict(self.declaration.info)

    def ops(self) -> dict[str, Any]:
        return self.declaration.ops()

    def reset(self) -> None:
        self.requests, self._repeated = [], None

    def evaluate(self, op: str, request: Request) -> Response:
        if self._repeated is not None:  # the same request again: a sampler's next draw
            return self._repeated
        self.requests.append(Request(request.op, request.dtype, _copy(request.inputs), _copy(request.state),
                                     dict(request.hparams), _copy(request.cotangents)))
        response = _oracle_answer(op, request)
        if run_kind(op, self.declaration.table[op].takes_draws) == "distributional":
            self._repeated = response
        return response


def _copy(tree: dict[str, Any] | None) -> dict[str, np.ndarray] | None:
    return None if tree is None else {k: np.array(v, copy=True, order="C") for k, v in tree.items()}


def _oracle_answer(name: str, request: Request) -> Response:
    """The oracle at the request, rounded to its dtype (the means over the draws for a sampler):
    a valid answer, so every step of a case is asked for."""
    op = reference.get(name)
    if any(d not in request.inputs for d in op.spec.draws):
        means = op.expectation(widen(request.inputs), op.spec.resolve(request.hparams))
        return Response(outputs=round_to({k: m for k, (m, _, _) in means.items()}, request.dtype))
    arrays = judge.pack(widen(request.inputs), widen(request.state or {}),
                        None if request.cotangents is None else widen(request.cotangents))
    flat = round_to(judge.oracle(op, request.hparams, gradients=request.cotangents is not None)(arrays),
                    request.dtype)
    return Response(outputs=judge.unpack(flat, "outputs."), state=judge.unpack(flat, "state."),
                    grads=judge.unpack(flat, "grads."))


# --------------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------------


def _slash(key: str) -> str:
    """``outputs.params/w`` -> ``outputs/params/w``: the harness's flat key as a file key."""
    return key.replace(".", "/", 1)


def _return_meta(op: reference.Op, key: str, value: np.ndarray, dtype: str, state_dtype: str | None
                 ) -> dict[str, Any]:
    counters = judge.exact_quantities(op)
    if any(key == c or key.startswith(c + "/") for c in counters):
        wanted = "any (an exact count)"
    elif key.startswith("state.") and state_dtype:
        wanted = state_dtype
    else:
        wanted = dtype
    return {"shape": list(np.shape(value)), "dtype": wanted}


def _gradient_source(planned: PlannedCase, arrays: dict[str, np.ndarray]) -> dict[str, Any] | None:
    """A model source's function and constants (fixed sources and streams: None)."""
    source = trajectory.source_of(planned.case)
    if not isinstance(source, trajectory.GradientSource) or not source.depends_on_params:
        return None
    rule = ("computed in float64 from your parameters of that step (widened exactly), then rounded to "
            "nearest to the case's dtype")
    if source.kind == "quadratic":
        for p in source.shapes:
            arrays[f"source/curvature/{p}"] = source.curvature[p]
            arrays[f"source/center/{p}"] = source.center[p]
        return {"kind": "quadratic",
                "formula": "grads/<p> = source/curvature/<p> * (params/<p> - source/center/<p>), elementwise "
                           "(the subtraction first); " + rule}
    return {"kind": "rosenbrock", "a": ROSENBROCK_A,
            "formula": "over the flattened (C order) params/<p>, x of length n: g = 0; for i < n-1: "
                       "r = x[i+1] - x[i]^2, g[i] += -4 a x[i] r - 2 (1 - x[i]), g[i+1] += 2 a r; "
                       "for n = 1: g = -2 (1 - x); " + rule}


def _export_case(recorder: _Recorder, planned: PlannedCase, profile: str, root: Path, layout: str,
                 with_expected: bool) -> tuple[dict[str, Any], int]:
    recorder.reset()
    trace: list[dict[str, Any]] = []
    result = runner.run_case(recorder, planned, profile=profile, trace=trace, diagnose_fail=False,
                             support_table=recorder.declaration.table)
    op = reference.get(planned.op)
    sup = recorder.declaration.table[planned.op]
    kind = run_kind(planned.op, sup.takes_draws)
    requests = recorder.requests
    stem = case_stem(planned.op, planned.dtype, planned.name)
    arrays: dict[str, np.ndarray] = {}
    # Names keep the request's order (an adapter may build its parameter list from it).
    carried = [n for n in requests[0].inputs if n.startswith("params/")] if (
        requests and kind == "trajectory" and op.spec.is_optimizer) else []
    source = _gradient_source(planned, arrays) if kind == "trajectory" and op.spec.is_optimizer else None
    steps = []
    for k, req in enumerate(requests):
        if kind == "trajectory" and k > 0:
            given: dict[str, list[str] | None] = {
                "inputs": sorted(n for n in req.inputs
                                 if n not in carried and not (source and n.startswith("grads/"))),
                "state": sorted(n for n in (req.state or {}) if n.split("/", 1)[0] in sup.not_kept),
                "cotangents": None}
        else:
            given = given_parts(req)
        metas: dict[str, dict[str, Any] | None] = {}
        for part, tree in (("inputs", req.inputs), ("state", req.state), ("cotangents", req.cotangents)):
            names = given[part]
            ordered = [] if names is None or tree is None else [n for n in tree if n in names]
            metas[part] = None if names is None else {n: array_meta(tree[n]) for n in ordered}  # type: ignore[index]
            for n in ordered:
                arrays[f"step{k}/{part}/{n}"] = tree[n]  # type: ignore[index]
        step: dict[str, Any] = {"k": k, "hparams": hparams_json(req.hparams), "given": metas,
                                "key": request_key(req, given)}
        if kind == "distributional":
            means = op.expectation(widen(req.inputs), op.spec.resolve(req.hparams))
            step["return"] = {f"sample<m>/outputs/{n}": {"shape": list(np.shape(m)), "dtype": planned.dtype}
                              for n, (m, _, _) in means.items()}
            if with_expected:
                for n, (mean, low, high) in means.items():
                    arrays[f"step0/expected/outputs/{n}"] = np.asarray(mean, dtype=np.float64)
                    arrays[f"step0/expected_low/outputs/{n}"] = np.asarray(low, dtype=np.float64)
                    arrays[f"step0/expected_high/outputs/{n}"] = np.asarray(high, dtype=np.float64)
        elif k < len(trace):
            expected, bounds = trace[k]["expected"], trace[k]["bounds"]
            skipped = set(support.not_kept_keys(sup, expected))
            step["return"] = {_slash(key): _return_meta(op, key, v, planned.dtype, sup.state_dtype)
                              for key, v in sorted(expected.items()) if key not in skipped}
            step["not_compared"] = sorted(_slash(key) for key in skipped)
            if with_expected:
                for key, v in expected.items():
                    arrays[f"step{k}/expected/{_slash(key)}"] = np.asarray(v, dtype=np.float64)
                    if key in bounds:
                        arrays[f"step{k}/bound/{_slash(key)}"] = np.asarray(bounds[key], dtype=np.float64)
        steps.append(step)
    size = write_arrays(root / stem, arrays, layout) if arrays else 0
    if layout == "npy-dir":
        for step in steps:  # the hyper-parameters as "name<TAB>JSON value" lines, for C
            lines = [f"{k}\t{json.dumps(v)}" for k, v in step["hparams"].items()]
            path = root / stem / f"step{step['k']}" / "hparams.tsv"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(lines) + "\n")
    layout_tag = next((t[len("layout:"):] for t in planned.case.tags if t.startswith("layout:")), None)
    manifest = {
        "format": FORMAT, "normref_version": reference.__version__, "id": planned.id(recorder.name),
        "op": planned.op, "family": op.spec.family, "kind": op.spec.kind, "run": kind, "dtype": planned.dtype,
        "case": planned.name, "seed": planned.seed, "profile": profile, "stem": stem,
        "arrays": f"{stem}.npz" if layout == "npz" else f"{stem}/",
        "declared": recorder.declaration.to_json()["ops"][planned.op],
        "memory_layout": layout_tag,
        "state": "dict" if requests and requests[0].state is not None else "none",
        "cotangents": bool(requests) and requests[0].cotangents is not None,
        "steps": steps,
        "bound": {"judged_by": "normref judge (the bounds of conformance/tolerance.py and, for trajectories, "
                               "conformance/trajectory.py)",
                  "arrays": "step<k>/bound/<key>: the bound of the free-running comparison with "
                            "step<k>/expected/<key> (absent with --no-expected)",
                  "depends_on": "the case (op, dtype, inputs, seed, profile), its hyper-parameters, the "
                                "declared hparam_dtype, state_dtype and not_kept; for a trajectory step that "
                                "leaves its propagated bound, your own parameters and state of that step"},
    }
    if kind == "trajectory":
        manifest["carried"] = {n: f"outputs/{n}" for n in carried}
        manifest["gradient_source"] = source
    if kind == "distributional":
        manifest["samples"] = runner.PROFILES[profile].draw_samples
    if not requests:
        manifest["judged_without_backend"] = {"verdict": result.verdict, "message": result.message}
    path = root / f"{stem}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=1))
    entry = {"id": manifest["id"], "op": planned.op, "dtype": planned.dtype, "case": planned.name,
             "stem": stem, "run": kind, "steps": len(steps), "needs_result": bool(requests),
             "key": steps[0]["key"] if steps else None, "model_gradients": source is not None,
             "recorded_verdict": result.verdict}
    return entry, size + path.stat().st_size


def _export_chunk(declaration: Declaration, cases: list[PlannedCase], profile: str, root: str, layout: str,
                  with_expected: bool) -> list[tuple[dict[str, Any], int]]:
    recorder = _Recorder(declaration)
    return [_export_case(recorder, c, profile, Path(root), layout, with_expected) for c in cases]


# --------------------------------------------------------------------------------------------
# The whole export
# --------------------------------------------------------------------------------------------


@dataclass
class ExportSummary:
    """What an export wrote."""

    cases: int = 0
    need_result: int = 0
    without_backend: int = 0
    model_gradients: int = 0
    by_run: dict[str, int] = field(default_factory=dict)
    recorder_errors: list[str] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0

    def lines(self, root: str) -> list[str]:
        runs = ", ".join(f"{n} {k}" for k, n in sorted(self.by_run.items()))
        out = [f"normref export: {self.cases} cases ({runs}) written to {root}: {self.bytes / 1e6:.1f} MB "
               f"in {self.seconds:.1f} s",
               f"  {self.need_result} need a result from the backend; {self.without_backend} are decided "
               "without one (the harness judges them before any call: inputs that overflow the dtype, a "
               "convention the oracle rejects)",
               "  0 cases could not be exported"]
        if self.model_gradients:
            out.append(f"  {self.model_gradients} optimizer trajectories take the gradient of a model "
                       "(quadratic, Rosenbrock) at the backend's own parameters: the backend computes them "
                       "by the formula in the manifest's gradient_source (see README.md)")
        for line in self.recorder_errors[:5]:
            out.append(f"  warning: {line}")
        return out


def export(
    root: str | Path,
    declaration: Declaration,
    *,
    ops: str | None = None,
    dtypes: tuple[str, ...] | list[str] = ("float64", "float32", "float16", "bfloat16"),
    seed: int = 0,
    profile: str = "default",
    max_examples: int | None = None,
    layout: str = "npz",
    with_expected: bool = True,
    jobs: int | Callable[[list[PlannedCase]], int] = 1,
    progress: Callable[[int, int], None] | None = None,
) -> ExportSummary:
    """Write every case the declaration would be asked for into ``root`` (which must not exist or
    be empty): per case a manifest and its arrays, then ``index.json``, ``cases.tsv`` and
    ``README.md``.  Nothing is written when no case is planned (``cases`` is 0).  A bad selection
    is a :class:`~conformance.support.ConfigurationError`; ``jobs``: worker processes, or a
    function of the planned cases giving their number."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    started = time.perf_counter()
    target = Path(root)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ValueError(f"{root} exists and is not an empty directory")
    recorder = _Recorder(declaration)
    planned = runner.plan(recorder, ops=ops, dtypes=dtypes, seed=seed, profile=profile,
                          max_examples=max_examples)
    if not planned:
        return ExportSummary()
    jobs = jobs(planned) if callable(jobs) else jobs
    target.mkdir(parents=True, exist_ok=True)
    entries: list[tuple[dict[str, Any], int] | None] = [None] * len(planned)
    parts = chunks(planned)
    done = 0
    if jobs > 1 and len(parts) > 1:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_export_chunk, declaration, [planned[i] for i in part], profile,
                                   str(target), layout, with_expected): part for part in parts}
            for future in futures:
                for i, produced in zip(futures[future], future.result(), strict=True):
                    entries[i] = produced
                done += len(futures[future])
                if progress:
                    progress(done, len(planned))
    else:
        for part in parts:
            for i in part:
                entries[i] = _export_case(recorder, planned[i], profile, target, layout, with_expected)
            done += len(part)
            if progress:
                progress(done, len(planned))
    summary = ExportSummary()
    cases = []
    for produced in entries:
        assert produced is not None
        entry, size = produced
        cases.append(entry)
        summary.bytes += size
        summary.by_run[entry["run"]] = summary.by_run.get(entry["run"], 0) + 1
        summary.need_result += entry["needs_result"]
        summary.model_gradients += entry["model_gradients"]
        if entry["recorded_verdict"] == "ERROR":
            summary.recorder_errors.append(f"{entry['id']}: the oracle's own answers ended the case early")
    summary.cases = len(cases)
    summary.without_backend = summary.cases - summary.need_result
    stems = [c["stem"] for c in cases]
    if len(set(stems)) != len(stems):
        raise ValueError("two cases map to the same file name (case names differ only in characters "
                         "outside [A-Za-z0-9._@+=-])")
    index = {"format": FORMAT, "normref_version": reference.__version__, "adapter": declaration.name,
             "declaration": declaration.to_json(), "seed": seed, "profile": profile,
             "max_examples": max_examples,
             "ops": ops, "dtypes": list(dtypes), "layout": layout, "expected_values": with_expected,
             "bfloat16_storage": "uint16 bit patterns (the upper half of the float32 bits)",
             "cases": cases}
    (target / "index.json").write_text(json.dumps(index, indent=1))
    rows = ["id\top\tdtype\tcase\tstem\trun\tsteps\tneeds_result"]
    rows += [f"{c['id']}\t{c['op']}\t{c['dtype']}\t{c['case']}\t{c['stem']}\t{c['run']}\t{c['steps']}\t"
             f"{int(c['needs_result'])}" for c in cases]
    (target / "cases.tsv").write_text("\n".join(rows) + "\n")
    (target / "README.md").write_text(readme_text(index, summary))
    summary.bytes += sum((target / n).stat().st_size for n in ("index.json", "cases.tsv", "README.md"))
    summary.seconds = time.perf_counter() - started
    return summary
