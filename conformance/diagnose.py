"""Why a case FAILs: another convention, hyper-parameters kept in float32, or lower precision.

A FAIL is re-judged against the oracle under *candidates*, each a change of the hyper-parameters
every step used (the runner supplies ``explains(candidate)``, which recomputes the oracle, and the
bounds where needed, for the adapter's recorded results).  A candidate explains the FAIL when no
step FAILs or ERRORs under it; one under which every step PASSes is preferred to one that only
turns the FAILs into MISTRUSTED (a dtype-limited case cannot confirm a convention, but it cannot
refute it either).  The search, in order, stopping at the first stage that explains:

1. every single convention knob value (switches before numeric values, so
   ``momentum_convention='old_weight'`` is named before its numeric twin ``momentum=0.9``);
2. each whole dialect row of the spec (its convention switches together: "the keras dialect"),
   which finds frameworks that differ in three knobs at once;
3. pairs of knobs;
4. the float hyper-parameters rounded to float32 (frameworks whose attributes or optimizer
   variables are float32 whatever the data's dtype), reduced to the ones that matter
   ("float32 hyper-parameters: lr, beta2").

A knob with a fixed set of values (or a bool a dialect table sets) is a *convention*: the verdict
becomes CONVENTION.  A numeric value or a mask explaining the FAIL means the adapter ignored a
value it was given, and float32 hyper-parameters mean it should declare
``OpSupport(hparam_dtype="float32")``: both stay FAIL, with the diagnosis named.

Independently, a FAIL in float64 (float32) whose errors are within the bound of float32
(float16, bfloat16) arithmetic is "consistent with float32 arithmetic": the framework computes
that dtype in a lower precision (:func:`lower_precisions`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import reference
from conformance import support

__all__ = ["LAYOUT_KNOBS", "Candidate", "apply", "dialect_knobs", "is_switch", "lower_precisions", "search"]

#: Hyper-parameters that choose a layout or a mode, not a convention: never "explain" a FAIL.
LAYOUT_KNOBS = frozenset({"training", "track_running_stats", "axis", "axes", "dim"})
#: A diagnosis recomputes the bounds under a candidate (whose values, and so rounding errors, can
#: be orders of magnitude from the declared one's) only when the adapter is within this factor of
#: the candidate under the declared bounds; farther off, the candidate is rejected.
RECHECK_RATIO = 1e6
#: ... and, before that recomputation, when it is within this factor under bounds formed from the
#: declared values' sensitivities and the candidate's values (the same order of magnitude as the
#: candidate's own bounds): a wrong candidate is rejected without a new sensitivity estimate.
FIRST_LOOK_RATIO = 10.0

Explains = Callable[["Candidate"], "str | None"]


@dataclass(frozen=True)
class Candidate:
    """One explanation tried: knob changes and/or float hyper-parameters rounded to float32."""

    op: str
    kind: str                       # "convention" | "value" | "dialect" | "hparam_precision"
    change: dict[str, Any] = field(default_factory=dict)
    rounded: tuple[str, ...] = ()   # hyper-parameters rounded to float32
    dialect: str = ""               # the spec's dialect row, for kind "dialect"

    def transform(self, hp: dict[str, Any]) -> dict[str, Any]:
        """The hyper-parameters of one step under this candidate (raises if invalid)."""
        spec = reference.get(self.op).spec
        out = spec.resolve({**hp, **self.change}) if self.change else dict(hp)
        if self.rounded:
            out = support.round_hparams(self.op, out, "float32", self.rounded)
        return out

    @property
    def label(self) -> str:
        knobs = ", ".join(f"{k}={v!r}" for k, v in self.change.items())
        if self.kind == "dialect":
            return f"the {self.dialect} dialect ({knobs})"
        if self.kind == "hparam_precision":
            return "float32 hyper-parameters: " + ", ".join(self.rounded)
        return knobs


def is_switch(param: Any) -> bool:
    """A knob whose values are a fixed set (or a bool): a convention, not a chosen value."""
    return param.type == "bool" or (param.allowed is not None and param.type != "mask")


def dialect_knobs(op: str) -> dict[str, list[Any]]:
    """Convention knobs of an op and their candidate values.

    A knob is a hyper-parameter whose value differs between the spec's dialect tables (layout
    and mode switches excluded); its candidates are every value a dialect uses plus the declared
    ``allowed`` set.
    """
    spec = reference.get(op).spec
    values: dict[str, list[Any]] = {}
    for table in spec.dialects.values():
        for key, value in table["hparams"].items():
            if key in LAYOUT_KNOBS:
                continue
            values.setdefault(key, [])
            if value not in values[key]:
                values[key].append(value)
    knobs = {}
    for key, seen in values.items():
        allowed = list(spec.hparams[key].allowed or [])
        candidates = seen + [a for a in allowed if a not in seen]
        default = spec.hparams[key].default
        if default not in candidates:
            candidates.append(default)
        if len(candidates) > 1:
            knobs[key] = candidates
    return knobs


def _singles(op: str, current: dict[str, Any]) -> list[Candidate]:
    spec = reference.get(op).spec
    knobs = sorted(dialect_knobs(op).items(), key=lambda kv: not is_switch(spec.hparams[kv[0]]))
    return [Candidate(op, "convention" if is_switch(spec.hparams[k]) else "value", {k: v})
            for k, vals in knobs for v in vals if v != current.get(k)]


def _dialect_rows(op: str, current: dict[str, Any]) -> list[Candidate]:
    """Each dialect table's convention switches that differ from the current values (two or
    more: a single one is already a single-knob candidate)."""
    spec = reference.get(op).spec
    rows, seen = [], []
    for name, table in spec.dialects.items():
        change = {k: v for k, v in table["hparams"].items()
                  if k not in LAYOUT_KNOBS and k in spec.hparams and is_switch(spec.hparams[k])
                  and v != current.get(k)}
        if len(change) >= 2 and change not in seen:
            seen.append(change)
            rows.append(Candidate(op, "dialect", change, dialect=name))
    return rows


def _pairs(op: str, current: dict[str, Any]) -> Iterator[Candidate]:
    spec = reference.get(op).spec
    knobs = sorted(dialect_knobs(op).items(), key=lambda kv: not is_switch(spec.hparams[kv[0]]))
    for (k1, vals1), (k2, vals2) in itertools.combinations(knobs, 2):
        for v1, v2 in itertools.product(vals1, vals2):
            if v1 != current.get(k1) and v2 != current.get(k2):
                both = is_switch(spec.hparams[k1]) and is_switch(spec.hparams[k2])
                kind = "convention" if both else "value"
                yield Candidate(op, kind, {k1: v1, k2: v2})


def _best(found: list[tuple[Candidate, str]]) -> list[Candidate]:
    """The candidates under which everything PASSes, else those that leave MISTRUSTED cases."""
    passing = [c for c, status in found if status == "PASS"]
    return passing or [c for c, _ in found]


def search(op: str, current: dict[str, Any], explains: Explains, *, hparam_dtype: str = "float64"
           ) -> list[Candidate]:
    """The candidates that explain the FAIL (module docstring), best first; empty if none does."""
    found = [(c, s) for c in _singles(op, current) if (s := explains(c))]
    if found:
        return _best(found)
    # Every dialect row that explains, fewest knobs first: on a case that cannot tell two rows apart
    # (no weight decay: Keras's RMSprop row and Graves's agree) the smaller change is named first.
    found = [(c, s) for c in sorted(_dialect_rows(op, current), key=lambda c: len(c.change))
             if (s := explains(c))]
    if found:
        return _best(found)
    for candidate in _pairs(op, current):
        if explains(candidate):
            return [candidate]
    if hparam_dtype == "float64":
        rounded = _precision(op, current, explains)
        if rounded:
            return [rounded]
    return []


def _precision(op: str, current: dict[str, Any], explains: Explains) -> Candidate | None:
    """Float hyper-parameters rounded to float32: all of them (then reduced to those whose rounding
    matters), else every subset of up to three (a framework may keep lr and the betas as float32
    variables but not eps or the weight decay)."""
    names = support.inexact_hparams(op, current, "float32")
    if not names:
        return None
    if explains(Candidate(op, "hparam_precision", rounded=tuple(names))):
        for name in list(names):
            fewer = tuple(n for n in names if n != name)
            if fewer and explains(Candidate(op, "hparam_precision", rounded=fewer)):
                names = list(fewer)
        return Candidate(op, "hparam_precision", rounded=tuple(names))
    for size in range(1, min(3, len(names) - 1) + 1):
        for subset in itertools.combinations(names, size):
            candidate = Candidate(op, "hparam_precision", rounded=subset)
            if explains(candidate):
                return candidate
    return None


def apply(result: Any, found: list[Candidate], *, dtype_failed: bool = False) -> None:
    """Write the diagnosis into ``result`` (a CaseResult): CONVENTION when the best candidate is a
    convention switch (or a dialect row) and the response dtypes were right, else FAIL with the
    explanation named."""
    if not found:
        return
    best = found[0]
    also = f" (equivalently: {'; '.join(c.label for c in found[1:])})" if len(found) > 1 else ""
    result.diagnosis = best.label
    result.convention = dict(best.change)
    if best.kind in ("convention", "dialect") and not dtype_failed:
        result.verdict = "CONVENTION"
        result.message = f"matches the oracle with {best.label}{also} instead of the declared dialect"
    elif best.kind == "hparam_precision":
        result.message = (f"explained by {best.label}: the framework keeps them in float32; declare "
                          "OpSupport(hparam_dtype='float32') if it does so by design")
    elif best.kind in ("convention", "dialect"):
        result.message = f"matches the oracle with {best.label}{also}, but returns the wrong dtype"
    else:
        given = ", ".join(f"{k}={result.hparams.get(k)!r}" for k in best.change)
        result.message = (f"behaves as {best.label}{also} although the case asked for {given}: "
                          "a value it was given is ignored or replaced")


#: The lower precisions a FAIL in each dtype is tried against ("computes float64 in float32").
LOWER = {"float64": ("float32",), "float32": ("float16", "bfloat16")}


#: A lower precision explains a FAIL only if the errors are of its size: at least this fraction of
#: its bound (a float32 computation's worst error is a sizable fraction of the float32 bound; a
#: FAIL 2x over a float64 bound sits at 1e-8 of it and says nothing about float32).
LOWER_PRECISION_SIZE = 0.01


def lower_precisions(dtype: str, judge: Callable[[str], float | None]) -> tuple[str, float] | None:
    """The first lower precision under whose bounds the FAIL disappears and whose size the errors
    have, with the worst ratio.

    ``judge(p)`` re-judges the recorded results against bounds computed for dtype ``p`` and returns
    the worst error/bound ratio, or None when something still FAILs or ERRORs.
    """
    for lower in LOWER.get(dtype, ()):
        ratio = judge(lower)
        if ratio is not None and ratio >= LOWER_PRECISION_SIZE:
            return lower, ratio
    return None
