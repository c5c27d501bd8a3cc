"""The tensor and hyper-parameter tables of a spec, and their validation.

``[[inputs]]``, ``[[state]]`` and ``[[outputs]]`` (and an optimizer's ``[[slots]]``) become
:class:`TensorSpec` s; each ``[hparams.<name>]`` becomes an :class:`HParam`, whose
:meth:`HParam.check` also validates every hyper-parameter value given at run time
(:meth:`reference.spec.Spec.resolve`).  The keys are documented in reference/spec.py; a malformed
table raises :class:`~reference.spec_schema.SpecError` naming the file and the key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from reference.spec_schema import (
    BOUNDED_DOMAINS,
    DOMAINS_OF,
    HPARAM_TYPES,
    NONE_SENTINEL,
    SpecError,
    need,
    table,
    tables,
)

__all__ = ["HParam", "TensorSpec", "read_hparam", "read_slots", "read_tensors", "unsentinel"]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: str
    differentiable: bool = False
    optional: bool = False
    doc: str = ""
    per: str = ""   # optimizer slots: "param" (one array per parameter) or "global" (a scalar)
    exact: bool = False  # integer-valued (a step count): read exactly, never rounding-perturbed
    #: state: "forward" (the forward pass updates it, the default) or "backward" (the VJP reads
    #: and updates it, e.g. PowerNorm's running statistic of the output gradient)
    updated_in: str = "forward"
    #: inputs: the values a generated case draws (conformance/cases.py::draw): "normal" N(0, 1),
    #: "around_one" 1 + N(0, 1)/2 (gains: no channel switched off), "steps" 0, 1, 2, ...
    domain: str = "normal"
    #: inputs: "float64" (promoted, rounded to the dtype under test, perturbed by the error
    #: model), or "int64" / "bool" (class labels, indices, masks: passed to every side unchanged,
    #: never rounded, perturbed or differentiated)
    dtype: str = "float64"
    #: int64 inputs: values lie in [0, upper); an integer or the name of an int hyper-parameter
    upper: int | str = ""
    #: outputs: the name of another output this one is multiplied or divided by (spectral norm's
    #: ``w = W / sigma``): that output's own rounding error enters this one relatively
    scaled_by: str = ""
    #: inputs: random draws the op consumes (U[0, 1) variates, domain "uniform"): given to the
    #: oracle and to adapters that take them; an adapter that samples its own is checked in
    #: distribution against the spec's ``expectation`` (conformance/distributional.py)
    draws: bool = False


@dataclass(frozen=True)
class HParam:
    name: str
    type: str
    default: Any
    allowed: tuple[Any, ...] | None = None
    min: float | None = None
    max: float | None = None
    gt: float | None = None
    lt: float | None = None
    nullable: bool = False
    doc: str = ""

    def domain(self) -> str:
        """The allowed values in words, for error messages and ``normref show``."""
        parts = []
        if self.allowed is not None:
            parts.append("one of " + ", ".join(repr(a) for a in self.allowed))
        if self.gt is not None:
            parts.append(f"> {self.gt}")
        if self.min is not None:
            parts.append(f">= {self.min}")
        if self.lt is not None:
            parts.append(f"< {self.lt}")
        if self.max is not None:
            parts.append(f"<= {self.max}")
        text = f"{self.type} " + " and ".join(parts) if parts else self.type
        return text + (" or None" if self.nullable else "")

    def check(self, op: str, value: Any) -> Any:
        """Return ``value`` (axes normalized to a tuple) or raise naming op, key and domain."""
        where = f"{op}: hyper-parameter {self.name!r}"
        if value is None:
            if self.nullable:
                return None
            raise ValueError(f"{where} must be {self.domain()}, got None")
        value = _check_type(where, self.type, value)
        if self.allowed is not None and not callable(value) and value not in self.allowed:
            raise ValueError(f"{where} must be {self.domain()}, got {value!r}")
        if self.type in ("float", "int"):
            bad = (
                (self.type == "float" and not math.isfinite(value))
                or (self.gt is not None and not value > self.gt)
                or (self.min is not None and not value >= self.min)
                or (self.lt is not None and not value < self.lt)
                or (self.max is not None and not value <= self.max)
            )
            if bad:
                raise ValueError(f"{where} must be {self.domain()}, got {value!r}")
        return value


def _check_type(where: str, kind: str, value: Any) -> Any:
    if kind == "bool":
        if not isinstance(value, bool):
            raise TypeError(f"{where} must be a bool, got {type(value).__name__} {value!r}")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise TypeError(f"{where} must be a str, got {type(value).__name__} {value!r}")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            if not (hasattr(value, "__index__") and not isinstance(value, bool)):
                raise TypeError(f"{where} must be an int, got {type(value).__name__} {value!r}")
        return int(value)
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                return float(value)  # NumPy scalars
            except (TypeError, ValueError):
                raise TypeError(
                    f"{where} must be a float, got {type(value).__name__} {value!r}"
                ) from None
        return float(value)
    if kind == "mask":
        # A parameter mask: the name of a predicate of reference.optimizers._tree.MASKS, or a
        # callable (path, array) -> bool (Python API only; TOML cannot hold one).
        if isinstance(value, str) or callable(value):
            return value
        raise TypeError(f"{where} must be a mask name or a callable (path, array) -> bool, "
                        f"got {type(value).__name__} {value!r}")
    if kind == "axes":
        items = (value,) if isinstance(value, int) and not isinstance(value, bool) else value
        try:
            items = tuple(items)
        except TypeError:
            raise TypeError(
                f"{where} must be an int or a sequence of ints, got {type(value).__name__}"
            ) from None
        if not items or any(isinstance(a, bool) or not isinstance(a, int) for a in items):
            raise TypeError(f"{where} must be an int or a non-empty sequence of ints, got {value!r}")
        return items
    raise AssertionError(kind)  # pragma: no cover


# --------------------------------------------------------------------------------------------
# Parsing the tables
# --------------------------------------------------------------------------------------------


def read_tensors(data: Mapping[str, Any], key: str, where: str) -> tuple[TensorSpec, ...]:
    """An op's ``[[inputs]]``, ``[[state]]`` or ``[[outputs]]`` (``key``), each table validated."""
    out = []
    allowed = {"name", "shape", "differentiable", "optional", "doc", "exact"}
    if key == "outputs":
        allowed.add("scaled_by")
    if key == "inputs":
        allowed |= {"domain", "dtype", "upper", "draws"}
    if key == "state":
        allowed.add("updated_in")
    for w, item in tables(data, key, where, allowed):
        dtype = str(item.get("dtype", "float64"))
        if dtype not in DOMAINS_OF:
            raise SpecError(f"{w}: dtype must be one of {tuple(DOMAINS_OF)}, got {dtype!r}")
        out.append(
            TensorSpec(
                name=need(item, "name", str, w),
                shape=need(item, "shape", str, w),
                differentiable=bool(item.get("differentiable", False)),
                optional=bool(item.get("optional", False)),
                doc=str(item.get("doc", "")),
                exact=bool(item.get("exact", False)),
                scaled_by=str(item.get("scaled_by", "")),
                domain=str(item.get("domain", DOMAINS_OF[dtype][0])),
                dtype=dtype,
                upper=item.get("upper", ""),
                updated_in=str(item.get("updated_in", "forward")),
                draws=bool(item.get("draws", False)),
            )
        )
        t = out[-1]
        if t.draws and (t.domain != "uniform" or t.differentiable):
            raise SpecError(f"{w}: random draws are U[0, 1) variates (domain = 'uniform') and not "
                            f"differentiable, got domain {t.domain!r}"
                            f"{', differentiable' if t.differentiable else ''}")
        if t.updated_in not in ("forward", "backward"):
            raise SpecError(f"{w}: updated_in must be 'forward' or 'backward', got {t.updated_in!r}")
        if t.domain not in DOMAINS_OF[dtype]:
            raise SpecError(f"{w}: domain of a {dtype} input must be one of {DOMAINS_OF[dtype]}, "
                            f"got {t.domain!r}")
        if dtype != "float64" and (t.differentiable or t.exact):
            raise SpecError(f"{w}: a {dtype} input is never differentiable or perturbed; drop "
                            "differentiable/exact")
        if (t.domain in BOUNDED_DOMAINS or dtype == "int64") and t.upper == "":
            raise SpecError(f"{w}: the domains {BOUNDED_DOMAINS} and int64 inputs need 'upper' (an int "
                            "or an int hyper-parameter)")
        if dtype == "bool" and t.upper != "":
            raise SpecError(f"{w}: a bool input has no 'upper'")
    names = {t.name for t in out}
    for t in out:
        if t.scaled_by and (t.scaled_by not in names or t.scaled_by == t.name):
            raise SpecError(f"{where} [[{key}]] {t.name!r}: scaled_by must name another output, "
                            f"got {t.scaled_by!r} (outputs: {sorted(names)})")
    return tuple(out)


def read_slots(data: Mapping[str, Any], where: str) -> tuple[TensorSpec, ...]:
    """An optimizer's ``[[slots]]``: its state, one array per parameter or one global scalar."""
    out = []
    allowed = {"name", "per", "shape", "doc", "exact"}
    for w, item in tables(data, "slots", where, allowed):
        per = need(item, "per", str, w)
        if per not in ("param", "global"):
            raise SpecError(f"{w}: per must be 'param' or 'global', got {per!r}")
        out.append(TensorSpec(name=need(item, "name", str, w), shape=need(item, "shape", str, w),
                              doc=str(item.get("doc", "")), per=per,
                              exact=bool(item.get("exact", False))))
    return tuple(out)


def read_hparam(name: str, item: Any, where: str) -> HParam:
    """``[hparams.<name>]``, its default checked against its own domain (an axes default normalized)."""
    w = f"{where} [hparams.{name}]"
    table(item, w, {"type", "default", "allowed", "min", "max", "gt", "lt", "nullable", "doc"})
    kind = need(item, "type", str, w)
    if kind not in HPARAM_TYPES:
        raise SpecError(f"{w}: type must be one of {HPARAM_TYPES}, got {kind!r}")
    if "default" not in item:
        raise SpecError(f"{w}: missing key 'default'")
    nullable = bool(item.get("nullable", False))

    def unsentinel(v: Any) -> Any:
        return None if nullable and v == NONE_SENTINEL else v

    allowed = item.get("allowed")
    param = HParam(
        name=name,
        type=kind,
        default=unsentinel(item["default"]),
        allowed=tuple(allowed) if allowed is not None else None,
        min=item.get("min"),
        max=item.get("max"),
        gt=item.get("gt"),
        lt=item.get("lt"),
        nullable=nullable,
        doc=str(item.get("doc", "")),
    )
    try:
        checked = param.check(name, param.default)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{w}: default is invalid: {exc}") from None
    if kind == "axes" and checked is not None:
        param = HParam(**{**param.__dict__, "default": checked})
    return param


def unsentinel(param: HParam | None, value: Any) -> Any:
    """TOML has no null: the string "None" means None for a nullable hyper-parameter."""
    return None if param is not None and param.nullable and value == NONE_SENTINEL else value
