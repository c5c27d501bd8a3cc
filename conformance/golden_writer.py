"""A backend reading golden vectors, written in Python: a Python adapter run on an export, its
results written as a backend without Python writes them (the steps of the export's README.md).

It is what the tests use to show that ``normref judge`` on an adapter's written results gives
the verdicts ``normref check`` gives the adapter itself, and it is the reference a C++ or Rust
engineer can read next to the README: :func:`write_results` reads only the files (index,
manifests, arrays), builds each step's request from what is given and from its own previous
outputs (trajectories), and computes a model source's gradients by the manifest's formula.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from conformance.adapters import Adapter, Request, Response, Unsupported
from conformance.cases import as_layout
from conformance.dtypes import round_to, widen
from conformance.golden import Golden, write_arrays
from conformance.step_sources import _rosenbrock_grad

__all__ = ["model_gradients", "write_results"]


def model_gradients(source: dict[str, Any], arrays: dict[str, np.ndarray], params: dict[str, np.ndarray],
                    dtype: str) -> dict[str, np.ndarray]:
    """``grads/<p>`` of a model gradient source (the manifest's ``gradient_source``) at the
    parameters ``params`` (``params/<p>``): in float64 from the parameters widened exactly, then
    rounded to ``dtype``."""
    wide = widen(params)
    out = {}
    with np.errstate(all="ignore"):
        for key, w in wide.items():
            p = key[len("params/"):]
            if source["kind"] == "quadratic":
                g = arrays[f"source/curvature/{p}"] * (w - arrays[f"source/center/{p}"])
            elif source["kind"] == "rosenbrock":
                g = _rosenbrock_grad(w)
            else:
                raise ValueError(f"unknown gradient source {source['kind']!r}")
            out[f"grads/{p}"] = g
    return round_to(out, dtype)


def _hparams(value: Any) -> Any:
    """JSON hyper-parameters as the harness holds them: lists (axes, shapes) are tuples."""
    if isinstance(value, dict):
        return {k: _hparams(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_hparams(v) for v in value)
    return value


def _part(arrays: dict[str, np.ndarray], prefix: str, present: bool) -> dict[str, np.ndarray] | None:
    if not present:
        return None
    return {key[len(prefix):]: v for key, v in arrays.items() if key.startswith(prefix)}


def _with_layout(tree: dict[str, np.ndarray] | None, layout: str | None) -> dict[str, np.ndarray] | None:
    if tree is None or layout is None:
        return tree
    return {k: as_layout(v, layout) for k, v in tree.items()}


def _results(response: Response, prefix: str) -> dict[str, np.ndarray]:
    out = {}
    for part, tree in (("outputs", response.outputs), ("state", response.state), ("grads", response.grads)):
        out.update({f"{prefix}{part}/{k}": np.asarray(v) for k, v in (tree or {}).items()})
    return out


def _run_case(adapter: Adapter, manifest: dict[str, Any], arrays: dict[str, np.ndarray]
              ) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
    """The case's result arrays and a note (unsupported / error) if the adapter stopped."""
    op, dtype, layout = manifest["op"], manifest["dtype"], manifest["memory_layout"]
    has_state, has_cts = manifest["state"] == "dict", manifest["cotangents"]
    written: dict[str, np.ndarray] = {}
    previous: Response | None = None
    for step in manifest["steps"]:
        k = step["k"]
        given = f"step{k}/"
        inputs = _part(arrays, f"{given}inputs/", True) or {}
        state = _part(arrays, f"{given}state/", has_state)
        if manifest["run"] == "trajectory" and previous is not None:
            if any(src[len("outputs/"):] not in previous.outputs for src in manifest["carried"].values()):
                break  # a carried output is missing: the harness stops the trajectory there too
            # carried inputs: my own outputs of the previous step; state: mine, given slots replacing
            own = {name: np.asarray(previous.outputs[src[len("outputs/"):]])
                   for name, src in manifest["carried"].items()}
            if manifest["gradient_source"]:
                inputs = {**inputs, **model_gradients(manifest["gradient_source"], arrays, own, dtype)}
            inputs = {**own, **inputs}
            state = {**{k2: np.asarray(v) for k2, v in (previous.state or {}).items()}, **(state or {})}
        cotangents = _part(arrays, f"{given}cotangents/", has_cts)
        request = Request(op, dtype, _with_layout(inputs, layout) or {}, _with_layout(state, layout),
                          _hparams(step["hparams"]), _with_layout(cotangents, layout))
        try:
            if manifest["run"] == "distributional":
                for m in range(int(manifest["samples"])):
                    written.update(_results(adapter.evaluate(op, request), f"sample{m}/"))
                break
            previous = adapter.evaluate(op, request)
        except Unsupported as exc:
            return written, {"unsupported": str(exc), "step": k}
        except Exception as exc:  # noqa: BLE001 - recorded as the case's error, as the harness would
            return written, {"error": str(exc), "exception": type(exc).__name__, "step": k}
        written.update(_results(previous, given))
    return written, None


def write_results(adapter: Adapter, golden_dir: str | Path, results_dir: str | Path, *,
                  layout: str = "npz", only: set[str] | None = None) -> dict[str, int]:
    """Run ``adapter`` on every exported case that needs a result (or the case ids in ``only``)
    and write its results into ``results_dir`` as a backend would; returns counts of the cases
    written, unsupported and raised."""
    golden = Golden(golden_dir)
    out = Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "info.json").write_text(json.dumps(dict(adapter.info())))
    counts = {"written": 0, "unsupported": 0, "error": 0}
    for entry in golden.cases:
        if not entry["needs_result"] or (only is not None and entry["id"] not in only):
            continue
        manifest = golden.manifest(entry)
        written, note = _run_case(adapter, manifest, golden.arrays(entry))
        base = out / entry["stem"]
        if written:
            write_arrays(base, written, layout)
        if note is not None:
            base.parent.mkdir(parents=True, exist_ok=True)
            base.with_name(base.name + ".json").write_text(json.dumps(note))
            counts["unsupported" if "unsupported" in note else "error"] += 1
        counts["written"] += 1
    return counts
