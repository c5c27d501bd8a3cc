"""Golden vectors on disk: the format shared by ``normref export``, ``normref judge`` and any
backend without Python (C++, CUDA, Rust, Triton) that reads them.

``normref export DIR`` (conformance/golden_export.py) runs the ordinary check machinery with a
recording adapter and writes every request the harness makes, per case; a backend reads them,
computes, and writes its results; ``normref judge DIR RESULTS`` (conformance/replay.py) runs the
same machinery again with an adapter that answers each request from RESULTS, so the verdicts,
bounds, diagnoses and reports are those ``normref check`` gives an adapter that returns those
arrays.  The layout (also explained in the ``README.md`` written into DIR):

* ``DIR/index.json``: the run (normref version, seed, profile, ``--ops``, dtypes, the backend's
  declaration) and one entry per case, in the planned order; ``DIR/cases.tsv``: the same cases,
  one tab-separated line each (for shell scripts and C);
* per case, a stem ``<op>/<dtype>/<case>`` (:func:`case_stem`): ``<stem>.json`` (the manifest:
  hyper-parameters per step, what is given, what to return, shapes and dtypes) and its arrays,
  either ``<stem>.npz`` (layout ``npz``) or a folder ``<stem>/`` of ``.npy`` files named by key
  (layout ``npy-dir``: ``<stem>/step0/inputs/x.npy``, a header C reads in twenty lines);
* the backend's results for a case: ``RESULTS/<stem>.npz`` or ``RESULTS/<stem>/`` (``.npy`` files
  by key: ``step0/outputs/y``, ``step0/grads/x``, ``step0/state/running_mean``), and optionally
  ``RESULTS/<stem>.json`` saying the case is ``unsupported`` (SKIP) or raised an ``error``.

Arrays are stored in the case's dtype; bfloat16, which has no NumPy dtype, is stored as its
uint16 bit patterns (:func:`to_file`, :func:`from_file`).  Each step's request is identified by a
digest of what is given in it (:func:`request_key`), which is how the replaying adapter knows which
case and step the harness is asking for, and checks that it asks for what was exported.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

import reference
from conformance import memo, support
from conformance.adapters import OpSupport, Request
from conformance.dtypes import DTYPES, np_dtype

__all__ = ["FORMAT", "LAYOUTS", "Declaration", "Golden", "array_meta", "case_stem", "from_file",
           "given_parts", "hparams_json", "read_arrays", "request_key", "results_present", "to_file",
           "write_arrays"]

#: The format of an export (written into every manifest and the index).
FORMAT = "normref-golden/1"
#: How a case's arrays are stored: one ``.npz`` file, or a folder of ``.npy`` files.
LAYOUTS = ("npz", "npy-dir")
_SAFE = re.compile(r"[^A-Za-z0-9._@+=-]")


def case_stem(op: str, dtype: str, name: str) -> str:
    """The stable relative path of a case, ``<op>/<dtype>/<case>`` (characters outside
    ``[A-Za-z0-9._@+=-]`` in the case name become ``_``)."""
    return f"{op}/{dtype}/{_SAFE.sub('_', name)}"


# --------------------------------------------------------------------------------------------
# Arrays
# --------------------------------------------------------------------------------------------


def to_file(value: Any) -> np.ndarray:
    """An array as stored: C-contiguous, bfloat16 as its uint16 bit patterns."""
    array = np.array(value, order="C", copy=None)  # (ascontiguousarray would make a 0-d array 1-d)
    if array.dtype == np.dtype(np_dtype("bfloat16")):
        return array.view(np.uint16)
    if array.dtype.kind not in "biuf":
        raise TypeError(f"cannot store an array of dtype {array.dtype} (floats, ints and bools only)")
    return array


def from_file(value: np.ndarray, case_dtype: str) -> np.ndarray:
    """A stored array as the harness holds it: in a bfloat16 case a uint16 array is bfloat16."""
    if case_dtype == "bfloat16" and value.dtype == np.uint16:
        return value.view(np_dtype("bfloat16"))
    return value


def array_meta(value: Any) -> dict[str, Any]:
    """Shape, dtype and storage of one array, for a manifest."""
    array = np.asarray(value)
    dtype = "bfloat16" if array.dtype == np.dtype(np_dtype("bfloat16")) else str(array.dtype)
    meta: dict[str, Any] = {"shape": list(array.shape), "dtype": dtype}
    if dtype == "bfloat16":
        meta["stored_as"] = "uint16"
    return meta


def write_arrays(base: Path, arrays: dict[str, Any], layout: str) -> int:
    """Write ``arrays`` (keys like ``step0/inputs/x``) at ``base`` (a stem, no suffix) in the
    layout; returns the bytes written."""
    stored = {key: to_file(v) for key, v in arrays.items()}
    if layout == "npz":
        path = base.with_name(base.name + ".npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **stored)
        return path.stat().st_size
    if layout != "npy-dir":
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    total = 0
    for key, value in stored.items():
        path = base / f"{key}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, value, allow_pickle=False)
        total += path.stat().st_size
    return total


def _arrays_at(base: Path) -> Path | None:
    npz = base.with_name(base.name + ".npz")
    if npz.is_file():
        return npz
    return base if base.is_dir() else None


def read_arrays(base: Path, case_dtype: str) -> dict[str, np.ndarray] | None:
    """The arrays stored at ``base`` (``<base>.npz`` or the folder ``<base>/``), bfloat16 restored;
    None when neither exists."""
    where = _arrays_at(base)
    if where is None:
        return None
    if where.suffix == ".npz" and where.is_file():
        with np.load(where, allow_pickle=False) as data:
            return {key: from_file(data[key], case_dtype) for key in data.files}
    out = {}
    for path in sorted(where.rglob("*.npy")):
        key = path.relative_to(where).as_posix()[: -len(".npy")]
        out[key] = from_file(np.load(path, allow_pickle=False), case_dtype)
    return out


def results_present(results: Path, stem: str) -> bool:
    """Whether the backend wrote anything for the case (arrays or a ``.json`` note)."""
    base = results / stem
    return _arrays_at(base) is not None or base.with_name(base.name + ".json").is_file()


# --------------------------------------------------------------------------------------------
# Requests: what is given at a step, and its digest
# --------------------------------------------------------------------------------------------


def hparams_json(hp: dict[str, Any]) -> dict[str, Any]:
    """Hyper-parameters as JSON values (tuples as lists, NumPy scalars as numbers); a value
    JSON cannot hold (a callable mask) is a TypeError naming it."""

    def value(name: str, v: Any) -> Any:
        if isinstance(v, (tuple, list)):
            return [value(name, x) for x in v]
        if isinstance(v, (set, frozenset)):
            return sorted((value(name, x) for x in v), key=repr)
        if isinstance(v, np.generic):
            return v.item()
        if v is None or isinstance(v, (str, int, float, bool)):
            return v
        raise TypeError(f"hyper-parameter {name!r} = {v!r} cannot be exported (not a JSON value)")

    return {k: value(k, v) for k, v in hp.items()}


def given_parts(request: Request) -> dict[str, list[str] | None]:
    """Every part of a request: the names of its inputs, state (None: no state) and cotangents
    (None: forward only)."""
    return {"inputs": sorted(request.inputs),
            "state": None if request.state is None else sorted(request.state),
            "cotangents": None if request.cotangents is None else sorted(request.cotangents)}


def request_key(request: Request, given: dict[str, list[str] | None]) -> str:
    """A digest of the parts of ``request`` named in ``given`` (what the export wrote for that
    step), its op, dtype and hyper-parameters.  A name ``given`` lists that the request lacks is
    a KeyError."""

    def part(tree: dict[str, Any] | None, names: list[str] | None) -> Any:
        if names is None:
            return None if tree is None else "present"
        if tree is None:
            raise KeyError("the request has no such part")
        return {n: np.asarray(tree[n]) for n in names}

    hp = json.dumps(hparams_json(request.hparams), sort_keys=True)
    key = memo.digest(request.op, request.dtype, part(request.inputs, given["inputs"]),
                      part(request.state, given["state"]), part(request.cotangents, given["cotangents"]), hp)
    assert key is not None  # arrays, dicts and strings only
    return key


# --------------------------------------------------------------------------------------------
# The backend's declaration (what an adapter's ops() says)
# --------------------------------------------------------------------------------------------


_SUPPORT_FIELDS = {f.name for f in fields(OpSupport)}


def _knob_json(v: Any) -> Any:
    if isinstance(v, (set, frozenset)):
        return {"one_of": sorted((_knob_json(x) for x in v), key=repr)}
    if isinstance(v, tuple):
        return [_knob_json(x) for x in v]
    return v.item() if isinstance(v, np.generic) else v


def _knob(v: Any) -> Any:
    if isinstance(v, dict) and set(v) == {"one_of"}:
        return frozenset(_knob(x) for x in v["one_of"])
    if isinstance(v, list):
        return tuple(_knob(x) for x in v)
    return v


def support_json(sup: OpSupport) -> dict[str, Any]:
    """An :class:`OpSupport` as JSON (a set of knob values as ``{"one_of": [...]}``)."""
    return {"dialect": {k: _knob_json(v) for k, v in sup.dialect.items()}, "dtypes": list(sup.dtypes),
            "api": sup.api, "gradients": sup.gradients, "hparam_dtype": sup.hparam_dtype,
            "not_kept": list(sup.not_kept), "state_dtype": sup.state_dtype, "takes_draws": sup.takes_draws}


def support_from_json(where: str, record: Any) -> OpSupport:
    """The inverse of :func:`support_json`; unknown keys are a ValueError naming them."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object of OpSupport fields, got {record!r}")
    unknown = sorted(set(record) - _SUPPORT_FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; the keys are "
                         f"{', '.join(sorted(_SUPPORT_FIELDS))}")
    values = dict(record)
    if "dialect" in values:
        if not isinstance(values["dialect"], dict):
            raise ValueError(f"{where}: dialect must be an object knob -> value")
        values["dialect"] = {k: _knob(v) for k, v in values["dialect"].items()}
    for key in ("dtypes", "not_kept"):
        if key in values:
            if not isinstance(values[key], list):
                raise ValueError(f"{where}: {key} must be a list, got {values[key]!r}")
            values[key] = tuple(values[key])
    return OpSupport(**values)


@dataclass
class Declaration:
    """What a backend declares: its name (the first part of every case id), its ``info()`` for
    the reports, and per op what it supports (validated like an adapter's ``ops()``)."""

    name: str
    info: dict[str, str]
    table: dict[str, OpSupport]

    def ops(self) -> dict[str, OpSupport]:
        return dict(self.table)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "info": dict(self.info),
                "ops": {op: support_json(sup) for op, sup in self.table.items()}}

    @classmethod
    def from_json(cls, record: Any, where: str = "the declaration") -> Declaration:
        if not isinstance(record, dict) or not isinstance(record.get("ops"), dict):
            raise ValueError(f"{where}: expected an object with \"name\" and \"ops\" "
                             "(op -> OpSupport fields)")
        unknown = sorted(set(record) - {"name", "info", "ops"})
        if unknown:
            raise ValueError(f"{where}: unknown key {unknown[0]!r}; the keys are name, info, ops")
        name = record.get("name") or "backend"
        if not isinstance(name, str) or ":" in name:
            raise ValueError(f"{where}: name must be a string without ':', got {name!r}")
        info = {str(k): str(v) for k, v in (record.get("info") or {"framework": name}).items()}
        table = {op: support_from_json(f"{where}: ops.{op}", sup) for op, sup in record["ops"].items()}
        declaration = cls(name, info, table)
        support.validate(declaration)  # an unknown op, dtype, knob or value: ConfigurationError
        return declaration

    @classmethod
    def load(cls, path: str | Path) -> Declaration:
        """A declaration file: JSON ``{"name": ..., "info": {...}, "ops": {op: {dtypes, dialect,
        gradients, hparam_dtype, not_kept, state_dtype, takes_draws, api}}}``; ``"*"`` as an op
        name stands for every registered op."""
        try:
            record = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a readable JSON declaration ({type(exc).__name__}: {exc})"
                             ) from None
        if isinstance(record, dict) and isinstance(record.get("ops"), dict) and "*" in record["ops"]:
            every = record["ops"].pop("*")
            record["ops"] = {**{op: every for op in reference.ops()}, **record["ops"]}
        return cls.from_json(record, str(path))

    @classmethod
    def of(cls, adapter: Any) -> Declaration:
        """What a Python adapter declares (its ``evaluate`` is never called)."""
        return cls(adapter.name, dict(adapter.info()), dict(support.validate(adapter)))

    @classmethod
    def default(cls) -> Declaration:
        """Every registered op in every dtype, the spec's default conventions, with gradients."""
        return cls("backend", {"framework": "backend"},
                   {op: OpSupport(dtypes=DTYPES) for op in reference.ops()})


# --------------------------------------------------------------------------------------------
# Reading an export
# --------------------------------------------------------------------------------------------


class Golden:
    """An export directory: its index, each case's manifest and arrays."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        path = self.root / "index.json"
        try:
            self.index = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{root}: not a normref export (cannot read index.json: {type(exc).__name__})"
                             ) from None
        if self.index.get("format") != FORMAT:
            raise ValueError(f"{root}: index.json is not a {FORMAT} export (format "
                             f"{self.index.get('format')!r})")
        if self.index.get("normref_version") != reference.__version__:
            raise ValueError(f"{root} was exported by normref {self.index.get('normref_version')}, this is "
                             f"normref {reference.__version__}: export again (the cases and bounds may "
                             "differ)")
        self.declaration = Declaration.from_json(self.index["declaration"], f"{root}/index.json")
        self.cases: list[dict[str, Any]] = self.index["cases"]

    def manifest(self, entry: dict[str, Any]) -> dict[str, Any]:
        return json.loads((self.root / f"{entry['stem']}.json").read_text())

    def arrays(self, entry: dict[str, Any]) -> dict[str, np.ndarray]:
        found = read_arrays(self.root / entry["stem"], entry["dtype"])
        if found is None:
            raise ValueError(f"{self.root}: the arrays of {entry['id']} ({entry['stem']}) are missing")
        return found
