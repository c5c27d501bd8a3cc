"""What an adapter declares, checked before anything runs, and how it shapes a request.

:func:`validate` reads ``adapter.ops()`` once and rejects what cannot be meant: an op, a dtype, a
knob or a knob value the registry does not know, a state slot that is not the op's, a
hyper-parameter precision that is not a dtype.  A typo would otherwise make every case of that
op SKIP and the gate permanently green, so each is a configuration error naming the closest
known name.

:func:`hparams_for` merges a case's hyper-parameters with the adapter's declared conventions (a
knob may declare a *set* of values: the case's value is used when it is in the set), and
:func:`round_hparams` rounds the float hyper-parameters to the precision the framework keeps them
in (``OpSupport.hparam_dtype``): like the inputs, the oracle then computes from the values the
framework actually has.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from typing import Any

import numpy as np

import reference
from conformance.adapters import OpSupport
from conformance.dtypes import DTYPES, np_dtype

__all__ = ["ConfigurationError", "declared", "hparams_for", "not_kept_keys", "round_hparams", "validate"]


class ConfigurationError(ValueError):
    """An adapter's ``ops()`` (or the run's selection) names something that does not exist."""


def _closest(name: str, known: Iterable[str]) -> str:
    found = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
    return f" (did you mean {found[0]!r}?)" if found else ""


def _values(value: Any) -> list[Any]:
    """A declared knob value, or the values of a declared set (in a stable order)."""
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    return [value]


def validate(adapter: Any) -> dict[str, OpSupport]:
    """``adapter.ops()``, checked: raises :class:`ConfigurationError` naming the first problem."""
    where = f"adapter {getattr(adapter, 'name', adapter)!r}"
    support = adapter.ops()
    if not isinstance(support, dict):
        raise ConfigurationError(f"{where}: ops() must return a dict op -> OpSupport, "
                                 f"got {type(support).__name__}")
    known = reference.ops()
    for op, sup in support.items():
        if op not in known:
            raise ConfigurationError(f"{where}: ops() names unknown op {op!r}{_closest(op, known)}")
        if not isinstance(sup, OpSupport):
            raise ConfigurationError(f"{where}: ops()[{op!r}] must be an OpSupport, got {type(sup).__name__}")
        _validate_one(f"{where}: {op}", reference.get(op).spec, sup)
    return support


def _validate_one(where: str, spec: Any, sup: OpSupport) -> None:
    if isinstance(sup.dtypes, str) or not sup.dtypes:
        raise ConfigurationError(f"{where}: dtypes must be a non-empty tuple of dtype names, "
                                 f"got {sup.dtypes!r}")
    for dtype in sup.dtypes:
        if dtype not in DTYPES:
            raise ConfigurationError(f"{where}: unknown dtype {dtype!r}{_closest(str(dtype), DTYPES)}; "
                                     f"known: {', '.join(DTYPES)}")
    if sup.hparam_dtype not in DTYPES:
        raise ConfigurationError(f"{where}: hparam_dtype must be one of {', '.join(DTYPES)}, "
                                 f"got {sup.hparam_dtype!r}")
    if sup.state_dtype is not None and sup.state_dtype not in DTYPES:
        raise ConfigurationError(f"{where}: state_dtype must be None or one of {', '.join(DTYPES)}, "
                                 f"got {sup.state_dtype!r}")
    if not isinstance(sup.gradients, bool):
        raise ConfigurationError(f"{where}: gradients must be True or False, got {sup.gradients!r}")
    for knob, value in sup.dialect.items():
        if knob not in spec.hparams:
            raise ConfigurationError(f"{where}: unknown knob {knob!r}{_closest(knob, spec.hparams)}; "
                                     f"the op's hyper-parameters are {', '.join(spec.hparams)}")
        values = _values(value)
        if not values:
            raise ConfigurationError(f"{where}: knob {knob!r} declares an empty set of values")
        param = spec.hparams[knob]
        for v in values:
            try:
                param.check(spec.name, v)
            except (TypeError, ValueError):
                known = [str(a) for a in param.allowed or ()]
                hint = _closest(v, known) if isinstance(v, str) else ""
                raise ConfigurationError(f"{where}: knob {knob!r} must be {param.domain()}, "
                                         f"got {v!r}{hint}") from None
    slots = [t.name for t in spec.state]
    if isinstance(sup.not_kept, str):
        raise ConfigurationError(f"{where}: not_kept must be a tuple of state names, got {sup.not_kept!r}")
    for name in sup.not_kept:
        if name not in slots:
            raise ConfigurationError(f"{where}: not_kept names {name!r}, which is not a state of "
                                     f"{spec.name}{_closest(name, slots)}; its state is "
                                     f"{', '.join(slots) or 'empty'}")


def declared(support: dict[str, OpSupport], op: str, dtype: str) -> bool:
    return op in support and dtype in support[op].dtypes


def hparams_for(op: str, overrides: dict[str, Any], dialect: dict[str, Any]) -> dict[str, Any]:
    """Spec defaults <- the case's own requests <- the adapter's declared conventions.

    A knob declared as a set of values keeps the case's value when the set holds it, else the
    spec's default when the set holds that, else the set's first value (in ``repr`` order).
    """
    spec = reference.get(op).spec
    chosen = {}
    for knob, value in dialect.items():
        values = _values(value)
        if len(values) == 1:
            chosen[knob] = values[0]
            continue
        wanted = overrides.get(knob, spec.hparams[knob].default)
        default = spec.hparams[knob].default
        chosen[knob] = wanted if wanted in values else default if default in values else values[0]
    return spec.resolve({**overrides, **chosen})


def declared_values(dialect: dict[str, Any], knob: str) -> list[Any]:
    """Every value the adapter declares for ``knob`` (empty when it declares none)."""
    return _values(dialect[knob]) if knob in dialect else []


def round_hparams(op: str, hp: dict[str, Any], dtype: str,
                  names: Iterable[str] | None = None) -> dict[str, Any]:
    """``hp`` with its float hyper-parameters (or those in ``names``) rounded to ``dtype``.

    Only finite values of spec type ``float`` are rounded; a value beyond the dtype's range is left
    as it is (a framework would reject it, the case is not about it).
    """
    if dtype == "float64":
        return dict(hp)
    spec = reference.get(op).spec
    pick = set(names) if names is not None else None
    out = dict(hp)
    for name, value in hp.items():
        param = spec.hparams.get(name)
        if param is None or param.type != "float" or value is None or isinstance(value, bool):
            continue
        if pick is not None and name not in pick:
            continue
        if not math.isfinite(float(value)):
            continue
        with np.errstate(over="ignore"):
            rounded = float(np.asarray(float(value)).astype(np_dtype(dtype)))
        if math.isfinite(rounded):
            out[name] = rounded
    return out


def inexact_hparams(op: str, hp: dict[str, Any], dtype: str) -> list[str]:
    """The float hyper-parameters whose value changes when rounded to ``dtype``."""
    rounded = round_hparams(op, hp, dtype)
    return [k for k in hp if rounded[k] != hp[k]]


def not_kept_keys(sup: OpSupport, keys: Iterable[str]) -> list[str]:
    """The flat quantity keys (``state.<slot>`` or ``state.<slot>/<path>``) of slots not kept."""
    slots = set(sup.not_kept)
    return [k for k in keys if k.startswith("state.") and k[len("state."):].split("/", 1)[0] in slots]
