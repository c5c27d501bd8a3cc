"""The vocabulary of the spec schema, and the TOML readers every part of the spec loader shares.

The keys of a spec file are documented in reference/spec.py, which loads one.  The loader is three
modules (spec.py: the :class:`~reference.spec.Spec` and its top-level keys; spec_tensors.py: the
tensor and hyper-parameter tables; spec_cases.py: the case tables), and this one holds what all
three check a key against: the allowed values of the enumerated keys, the top-level keys of each
kind of spec, :class:`SpecError`, and the readers of a TOML table that check a key's presence and
type (:func:`need`) or a table's keys (:func:`table`, :func:`tables`).  It imports no other spec
module, so each of them imports it at module level without a cycle.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

__all__ = [
    "BACKWARD_KINDS",
    "BOUNDED_DOMAINS",
    "DOMAINS",
    "DOMAINS_OF",
    "GRADIENT_SOURCES",
    "HPARAM_TYPES",
    "KINDS",
    "NONE_SENTINEL",
    "TOP_KEYS",
    "SpecError",
    "need",
    "table",
    "tables",
]

BACKWARD_KINDS = ("exact", "custom", "surrogate", "none")
HPARAM_TYPES = ("float", "int", "bool", "str", "axes", "mask")
KINDS = ("op", "stream", "optimizer")
GRADIENT_SOURCES = ("fixed", "quadratic", "rosenbrock")
NONE_SENTINEL = "None"
#: The value domains an input may declare (drawn by conformance/cases.py::draw), by input dtype.
DOMAINS_OF = {"float64": ("normal", "around_one", "steps", "uniform", "on_edges"), "int64": ("index",),
              "bool": ("mask",)}
#: Domains whose values need a bound ``upper`` (an int or an int hyper-parameter).
BOUNDED_DOMAINS = ("index", "on_edges")
DOMAINS = tuple(d for ds in DOMAINS_OF.values() for d in ds)
#: The top-level keys of each kind of spec (documented in reference/spec.py's docstring).
_COMMON_KEYS = {"name", "family", "summary", "kind", "properties", "citation", "hparams", "dialects", "cases",
                "error_cases"}
TOP_KEYS = {"op": _COMMON_KEYS | {"function", "vjp", "init_state", "backward", "backward_properties",
                                  "discontinuities", "expectation", "inputs", "state", "outputs"},
            "optimizer": _COMMON_KEYS | {"step", "init", "slots"}}
TOP_KEYS["stream"] = TOP_KEYS["op"]


class SpecError(ValueError):
    """A spec file is malformed; the message names the file and the key."""


# --------------------------------------------------------------------------------------------
# Reading TOML tables
# --------------------------------------------------------------------------------------------


def need(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in data:
        raise SpecError(f"{where}: missing key {key!r}")
    value = data[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise SpecError(f"{where}: key {key!r} must be {names}, got {type(value).__name__}")
    return value


def table(item: Any, where: str, allowed: set[str] | None = None) -> dict[str, Any]:
    """``item`` checked to be a TOML table holding only ``allowed`` keys (any keys when None)."""
    if not isinstance(item, dict):
        raise SpecError(f"{where}: must be a table")
    extra = set(item) - allowed if allowed is not None else set()
    if extra:
        raise SpecError(f"{where}: unknown keys {sorted(extra)}; allowed {sorted(allowed or ())}")
    return item


def tables(data: Mapping[str, Any], key: str, where: str, allowed: set[str]
            ) -> Iterator[tuple[str, dict[str, Any]]]:
    """The entries of the array of tables ``[[key]]``, each with its location for messages."""
    for i, item in enumerate(data.get(key, [])):
        w = f"{where} [[{key}]] #{i}"
        yield w, table(item, w, allowed)
