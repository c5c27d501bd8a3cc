"""Hypothesis strategies for conformance cases, derived from the specs (needs ``hypothesis``).

``cases(op)`` draws a whole :class:`~conformance.runner.PlannedCase`: one of the spec's small
cases as the layout (so every input's shape stays consistent), the primary input's values (from a
drawn seed, with a drawn offset and scale, so large-mean / tiny-variance data comes up), every
convention or mode
hyper-parameter from its declared domain, and a dtype.  Hypothesis shrinks a failing case towards
simple data and default hyper-parameters and prints it; ``normref``'s own case id is in the
case name for a CLI repro of the seeded part.

    from hypothesis import given
    from conformance import strategies, runner

    @given(strategies.cases("batch_norm", dtypes=("float64",)))
    def test_my_batch_norm(planned):
        assert runner.run_case(MyAdapter(), planned).verdict not in ("FAIL", "ERROR")
"""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st

import reference
from conformance.cases import Case, default_cases
from conformance.cases import draw as draw_values
from conformance.diagnose import LAYOUT_KNOBS
from conformance.planning import REALISTIC_SIZE, PlannedCase

__all__ = ["cases", "hparam_values"]

#: Layouts up to this many input elements are drawn from (larger spec cases only if none is).
SMALL_SIZE = 400


def _float_domain(p: Any) -> st.SearchStrategy[float]:
    lo = p.gt if p.gt is not None else p.min
    hi = p.lt if p.lt is not None else p.max
    if p.name == "eps" or (lo == 0.0 and p.gt is not None and hi is None):
        # Scale parameters: log-uniform over the decades frameworks use.
        return st.floats(-12, -1).map(lambda e: float(10.0**e))
    lo = 0.0 if lo is None else lo
    hi = lo + 10.0 if hi is None else hi
    return st.floats(lo, hi, exclude_min=p.gt is not None, exclude_max=p.lt is not None)


def hparam_values(op: str) -> st.SearchStrategy[dict[str, Any]]:
    """Values for the op's non-layout hyper-parameters, each from its declared domain."""
    spec = reference.get(op).spec
    parts: dict[str, st.SearchStrategy[Any]] = {}
    for name, p in spec.hparams.items():
        if name in LAYOUT_KNOBS - {"training"} or p.type == "axes":
            continue
        if p.allowed is not None:
            strategy: st.SearchStrategy[Any] = st.sampled_from(list(p.allowed))
        elif p.type == "bool":
            strategy = st.booleans()
        elif p.type == "float":
            strategy = _float_domain(p)
        else:
            continue  # free ints (num_groups, iteration counts) shape the case: keep the layout's
        parts[name] = st.one_of(st.none(), strategy) if p.nullable else strategy
    return st.fixed_dictionaries(parts)


@st.composite
def cases(
    draw: st.DrawFn, op: str, dtypes: tuple[str, ...] = ("float64", "float32", "float16")
) -> PlannedCase:
    """A planned case for ``op`` (see the module docstring)."""
    layouts = [c for c in default_cases(op) if c.size <= SMALL_SIZE] or [
        c for c in default_cases(op) if c.size <= REALISTIC_SIZE]
    base: Case = draw(st.sampled_from(layouts))
    spec = reference.get(op).spec
    primary = next(t for t in spec.inputs if not t.optional)
    shape = base.inputs[primary.name].shape
    # Values from a drawn seed, in the input's declared domain (the rule the spec's cases use):
    # cheap for any size; hypothesis shrinks the seed, and for N(0, 1) data an offset and scale.
    values = draw_values(np.random.default_rng(draw(st.integers(0, 2**32 - 1))), primary.domain, shape)
    if primary.domain == "normal":
        offset = draw(st.sampled_from([0.0, 1.0, -50.0, 1e4]))
        values = offset + draw(st.sampled_from([1.0, 1e-2, 1e3])) * values
    inputs = {**base.inputs, primary.name: values}
    drawn = draw(hparam_values(op))
    overrides = {**base.overrides, **drawn}
    try:
        hparams = spec.resolve(overrides)
    except (TypeError, ValueError):
        hparams = dict(base.hparams)
        overrides = dict(base.overrides)
    dtype = draw(st.sampled_from(list(dtypes)))
    name = f"hyp@{base.name}"
    case = Case(op, name, inputs, hparams, base.dialect, 0, overrides=overrides, tags=("hypothesis",))
    return PlannedCase(op, dtype, name, 0, case)
