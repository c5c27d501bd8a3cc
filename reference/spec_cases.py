"""The case tables of a spec: ``[[cases]]`` (seeded cases of an op), an optimizer's trajectory
``[[cases]]``, and ``[[error_cases]]`` (bad arguments and the error they raise).  Their keys are
documented with the rest of the schema in reference/spec.py; each table is validated on load and
a malformed one raises :class:`~reference.spec.SpecError` naming the file and the key.

reference/spec.py imports this module; this module needs the :class:`~reference.spec.Spec` only
for annotations, so it imports it for type checkers alone and the two never import each other at
run time."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from reference.spec_schema import BOUNDED_DOMAINS, DOMAINS_OF, GRADIENT_SOURCES, SpecError, need, tables
from reference.spec_tensors import unsentinel

if TYPE_CHECKING:
    from reference.spec import Spec

__all__ = ["ERRORS", "ERROR_CASE_KEYS", "error_cases", "op_cases", "optimizer_cases"]


def optimizer_cases(data: Mapping[str, Any], spec: Spec, where: str) -> tuple[dict[str, Any], ...]:
    out = []
    allowed = {"name", "params", "gradients", "steps", "schedule", "tags", "hparams", "dialect"}
    for w, item in tables(data, "cases", where, allowed):
        name = need(item, "name", str, w)
        params = need(item, "params", dict, w)
        if not params:
            raise SpecError(f"{w}: params must name at least one parameter")
        for key, shape in params.items():
            if not isinstance(shape, list) or not all(isinstance(d, int) and d > 0 for d in shape):
                raise SpecError(f"{w}: shape of parameter {key!r} must be a list of positive ints")
        gradients = item.get("gradients", "fixed")
        if gradients not in GRADIENT_SOURCES:
            raise SpecError(f"{w}: gradients must be one of {GRADIENT_SOURCES}, got {gradients!r}")
        steps = item.get("steps")
        if steps is not None and (not isinstance(steps, int) or steps < 1):
            raise SpecError(f"{w}: steps must be a positive int, got {steps!r}")
        dialect, hparams, overrides = _case_hparams(item, spec, w)
        out.append({"name": name, "params": {k: tuple(v) for k, v in params.items()},
                    "shapes": {k: tuple(v) for k, v in params.items()},
                    "gradients": gradients, "steps": steps,
                    "schedule": str(item.get("schedule", "constant")),
                    "tags": tuple(item.get("tags", ())),
                    "hparams": hparams, "overrides": overrides, "dialect": dialect})
    _unique_names(out, where)
    if not out:
        raise SpecError(f"{where}: an optimizer spec needs at least one [[cases]]")
    return tuple(out)


def _case_hparams(item: Mapping[str, Any], spec: Spec, w: str) -> tuple[str | None, dict[str, Any],
                                                                      dict[str, Any]]:
    """A case's ``(dialect, hparams, overrides)``.  ``hparams``: fully resolved; ``overrides``:
    what the case itself asks for (its dialect's values, then its own), so a harness can overlay
    them on a framework's conventions."""
    dialect = item.get("dialect")
    if dialect is not None and dialect not in spec.dialects:
        raise SpecError(f"{w}: unknown dialect {dialect!r}")
    raw = {k: unsentinel(spec.hparams.get(k), v) for k, v in item.get("hparams", {}).items()}
    try:
        hparams = spec.resolve(raw, dialect=dialect)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{w}: {exc}") from None
    overrides = {**(spec.dialects[dialect]["hparams"] if dialect else {}), **{k: hparams[k] for k in raw}}
    return dialect, hparams, overrides


def _unique_names(cases: list[dict[str, Any]], where: str) -> None:
    names = [c["name"] for c in cases]
    if len(set(names)) != len(names):
        raise SpecError(f"{where}: case names repeat: {names}")


def op_cases(data: Mapping[str, Any], spec: Spec, where: str) -> tuple[dict[str, Any], ...]:
    out = []
    inputs = {t.name: t for t in spec.inputs}
    for w, item in tables(data, "cases", where, {"name", "shapes", "hparams", "dialect", "domains"}):
        name = need(item, "name", str, w)
        shapes = need(item, "shapes", dict, w)
        for key, shape in shapes.items():
            if key not in inputs:
                raise SpecError(f"{w}: shapes names unknown input {key!r}")
            if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise SpecError(f"{w}: shape of {key!r} must be a list of non-negative ints")
        missing = [t.name for t in spec.inputs if not t.optional and t.name not in shapes]
        if missing:
            raise SpecError(f"{w}: shapes must give the required inputs {missing}")
        domains = item.get("domains", {})
        for key, domain in (domains.items() if isinstance(domains, dict) else [(None, None)]):
            t = inputs.get(key)
            bad = (t is None or domain not in DOMAINS_OF[t.dtype]
                   or (domain in BOUNDED_DOMAINS and not t.upper))
            if bad:
                raise SpecError(f"{w}: domains must map inputs to one of their dtype's domains (a "
                                f"bounded one only where the input has an upper), got {key!r}: {domain!r}")
        dialect, hparams, overrides = _case_hparams(item, spec, w)
        out.append({"name": name, "shapes": {k: tuple(v) for k, v in shapes.items()},
                    "hparams": hparams, "overrides": overrides, "dialect": dialect,
                    "domains": dict(domains)})
    _unique_names(out, where)
    return tuple(out)


#: What an ``[[error_cases]]`` entry may say (the module docstring).
ERROR_CASE_KEYS = {"name", "call", "shapes", "values", "dtypes", "state", "cotangents", "params", "grads",
                   "hparams", "error", "match"}
ERRORS = ("ValueError", "TypeError")


def _shapetable(item: Mapping[str, Any], key: str, names: set[str] | None, w: str
                 ) -> dict[str, tuple[int, ...]]:
    table = item.get(key, {})
    if not isinstance(table, dict):
        raise SpecError(f"{w}: {key} must be a table of name -> shape")
    for name, shape in table.items():
        if names is not None and name not in names:
            raise SpecError(f"{w}: {key} names unknown {name!r}; known: {sorted(names)}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise SpecError(f"{w}: {key}.{name} must be a list of non-negative ints, got {shape!r}")
    return {k: tuple(v) for k, v in table.items()}


def error_cases(data: Mapping[str, Any], spec: Spec, where: str) -> tuple[dict[str, Any], ...]:
    """``[[error_cases]]``: a call with bad arguments and the error it must raise."""
    out = []
    inputs = {t.name for t in spec.inputs}
    for w, item in tables(data, "error_cases", where, ERROR_CASE_KEYS):
        call = item.get("call", "step" if spec.is_optimizer else "apply")
        calls = ("step",) if spec.is_optimizer else ("apply", "vjp")
        if call not in calls:
            raise SpecError(f"{w}: call must be one of {calls}, got {call!r}")
        error = need(item, "error", str, w)
        if error not in ERRORS:
            raise SpecError(f"{w}: error must be one of {ERRORS}, got {error!r}")
        hparams = item.get("hparams", {})
        if not isinstance(hparams, dict):
            raise SpecError(f"{w}: hparams must be a table")
        values = item.get("values", {})
        dtypes = item.get("dtypes", {})
        for key, table in (("values", values), ("dtypes", dtypes)):
            if not isinstance(table, dict) or (not spec.is_optimizer and set(table) - inputs):
                raise SpecError(f"{w}: {key} must be a table over the inputs {sorted(inputs)}")
        out.append({
            "name": need(item, "name", str, w), "call": call, "error": error,
            "match": need(item, "match", str, w),
            "hparams": {k: unsentinel(spec.hparams.get(k), v) for k, v in hparams.items()},
            "shapes": _shapetable(item, "shapes", None if spec.is_optimizer else inputs, w),
            "values": dict(values), "dtypes": dict(dtypes),
            "state": _shapetable(item, "state", None, w),
            "cotangents": _shapetable(item, "cotangents", {t.name for t in spec.outputs}, w),
            "params": _shapetable(item, "params", None, w), "grads": _shapetable(item, "grads", None, w),
        })
    _unique_names(out, where)
    return tuple(out)
