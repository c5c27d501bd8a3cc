"""The harness catches optimizer bugs: every mutant of tests/optimizer_mutants.py is flagged by the
default profile (seed 0, float64: the math mistakes do not need another dtype), the unmutated
control is not.  A CONVENTION mutant must be diagnosed with exactly its knob, nothing it cannot
explain may remain in float64, and wherever the mirror image of the mistake (the correct step
declared under knob=value) is flagged, the mutant is flagged too (no silent PASS past it)."""

from __future__ import annotations

from typing import Any

import pytest

import reference
from conformance import runner
from helpers import (
    MIN_FLAGGED,
    MUTANT_PROFILE,
    expected_change,
    flagged_cases,
    names_expected,
    run_mutant,
    verdict_table,
)
from optimizer_mutants import CATALOGUE, OptimizerControl, OptimizerMutant

PROFILE = MUTANT_PROFILE
FLAGGED = ("FAIL", "ERROR")


class _Mirror(OptimizerMutant):
    """The correct step of the mutant's declared dialect, declared under ``knob=value``."""

    def __init__(self, mutant: OptimizerMutant, change: dict[str, Any]) -> None:
        self.op = mutant.op  # type: ignore[misc]
        self.dtypes = mutant.dtypes  # type: ignore[misc]
        self.dialect = {**mutant.dialect, **change}  # type: ignore[misc]
        self.truth = {k: mutant.dialect[k] for k in change}

    def step(self, params, grads, state, hp):
        return self.oracle(params, grads, state, hp, **self.truth)


def test_the_catalogue_is_complete_and_well_formed():
    assert len(CATALOGUE) >= 15
    for cls in CATALOGUE:
        mutant = cls()
        assert (cls.__doc__ or "").strip(), f"{cls.__name__} must name its real-world mistake"
        assert mutant.expect[0] in ("FAIL", "CONVENTION"), cls.__name__
        assert set(mutant.dialect) <= set(reference.get(mutant.op).spec.hparams), cls.__name__
        if mutant.expect[0] == "CONVENTION":
            assert next(iter(expected_change(mutant))) in mutant.dialect, cls.__name__


@pytest.mark.parametrize("cls", [pytest.param(cls, id=cls.__name__, marks=pytest.mark.xdist_group(cls.op))
                                 for cls in CATALOGUE])
def test_every_optimizer_mutant_is_flagged(cls: type[OptimizerMutant]):
    mutant = cls()
    if mutant.expect == ("FAIL",):
        flagged, results = flagged_cases(mutant)
        assert flagged >= MIN_FLAGGED, (
            f"{cls.__name__} was flagged by fewer than {MIN_FLAGGED} cases:\n{verdict_table(results)}")
        return
    planned, results = run_mutant(mutant)
    table = verdict_table(results)
    expected = mutant.expect[1]
    named = [r for r in results if r.verdict == "CONVENTION"]
    assert sum(names_expected(r, mutant, exactly=True) for r in named) >= MIN_FLAGGED, (
        f"{cls.__name__}: fewer than {MIN_FLAGGED} CONVENTION {expected}:\n{table}")
    wrong = [r for r in named if not names_expected(r, mutant)]
    assert not wrong, f"{cls.__name__}: CONVENTION with another diagnosis:\n{verdict_table(wrong)}"
    unexplained = [r for r in results if r.verdict in FLAGGED]
    assert not unexplained, f"{cls.__name__}: cases {expected} does not explain:\n{verdict_table(unexplained)}"
    mirror = _Mirror(mutant, expected_change(mutant))
    silent = [r for case, r in zip(planned, results, strict=True) if r.verdict == "PASS"
              and runner.run_case(mirror, case, profile=PROFILE).verdict in FLAGGED + ("CONVENTION",)]
    assert not silent, f"{cls.__name__}: PASSes where the conventions differ:\n{verdict_table(silent)}"


def _controls() -> list[Any]:
    seen: dict[tuple[Any, ...], OptimizerControl] = {}
    for cls in CATALOGUE:
        key = (cls.op, tuple(sorted(cls.dialect.items())), cls.dtypes)
        seen.setdefault(key, OptimizerControl(cls.op, dict(cls.dialect), cls.dtypes))
    return [pytest.param(c, id=c.op, marks=pytest.mark.xdist_group(c.op)) for c in seen.values()]


@pytest.mark.parametrize("control", _controls())
def test_the_unmutated_optimizer_control_is_not_flagged(control: OptimizerControl):
    _, results = run_mutant(control)
    flagged = [r for r in results if r.verdict in FLAGGED + ("CONVENTION",)]
    assert not flagged, f"the control is flagged:\n{verdict_table(flagged)}"
    assert any(r.verdict == "PASS" for r in results)
