"""The harness catches bugs: every mutant of tests/mutants.py is flagged, the unmutated control is not.

Each mutant runs through the harness exactly as ``normref check`` would run it: the default
profile, seed 0, its own op and dtypes.  A mutant expecting ``("FAIL",)`` must be left FAIL or
ERROR (after diagnosis) by at least MIN_FLAGGED cases.  A mutant expecting
``("CONVENTION", "knob=value")`` (its mistake is another known dialect) must be diagnosed: at least one CONVENTION, every CONVENTION naming exactly that knob and
value, no FAIL or ERROR in float64 (where conventions are told apart, so the diagnosis must explain
everything), and no case PASSing silently past the mistake: wherever the mirror image of the
mistake (the correct formulas declared under ``knob=value``) is flagged, the mutant is flagged too.
"""

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
from mutants import CATALOGUE, Control, Mutant

PROFILE = MUTANT_PROFILE
FLAGGED = ("FAIL", "ERROR")


class _Mirror(Mutant):
    """The correct formulas of ``mutant``'s declared dialect, declared under ``knob=value``.

    The harness flags it exactly on the cases that can tell the two conventions apart, so the
    mutant must be flagged on those cases too.
    """

    def __init__(self, mutant: Mutant, change: dict[str, Any]) -> None:
        self.op = mutant.op  # type: ignore[misc]
        self.dtypes = mutant.dtypes  # type: ignore[misc]
        self.dialect = {**mutant.dialect, **change}  # type: ignore[misc]
        self.truth = {k: mutant.dialect[k] for k in change}

    @property
    def name(self) -> str:
        return "mirror"

    def forward(self, a, hp):
        return self.oracle(a, hp, **self.truth)

    def backward(self, ct, a, hp):
        return self.oracle_vjp(ct, a, hp, **self.truth)


def _param(cls: type[Mutant]) -> Any:
    marks = [pytest.mark.xfail(strict=True, reason=f"known harness gap: {cls.known_gap}")] \
        if cls.known_gap else []
    # One worker per op: the oracle's side of each case is computed once there (conformance/memo.py).
    return pytest.param(cls, id=cls.__name__, marks=[*marks, pytest.mark.xdist_group(cls.op)])


def test_the_catalogue_is_complete_and_well_formed():
    assert len(CATALOGUE) >= 22
    assert {cls.op for cls in CATALOGUE} == {
        "batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm", "weight_norm",
        "spectral_norm", "weight_standardization"}
    assert any("float16" in cls.dtypes for cls in CATALOGUE)
    for cls in CATALOGUE:
        mutant = cls()
        assert (cls.__doc__ or "").strip(), f"{cls.__name__} must name its real-world mistake"
        assert mutant.expect[0] in ("FAIL", "CONVENTION"), cls.__name__
        assert set(mutant.dialect) <= set(reference.get(mutant.op).spec.hparams), cls.__name__
        if mutant.expect[0] == "CONVENTION":
            knob = next(iter(expected_change(mutant)))
            assert knob in mutant.dialect, f"{cls.__name__} must declare the {knob} it gets wrong"


@pytest.mark.parametrize("cls", [_param(cls) for cls in CATALOGUE])
def test_every_mutant_is_flagged(cls: type[Mutant]):
    mutant = cls()
    if mutant.expect == ("FAIL",):
        flagged, results = flagged_cases(mutant)
        assert flagged >= MIN_FLAGGED, (
            f"{cls.__name__} was flagged by fewer than {MIN_FLAGGED} cases:\n{verdict_table(results)}")
        return
    planned, results = run_mutant(mutant)
    table = verdict_table(results)

    change = expected_change(mutant)
    expected = mutant.expect[1]
    named = [r for r in results if r.verdict == "CONVENTION"]
    assert sum(names_expected(r, mutant, exactly=True) for r in named) >= MIN_FLAGGED, (
        f"{cls.__name__}: fewer than {MIN_FLAGGED} CONVENTION {expected}:\n{table}")
    wrong = [r for r in named if not names_expected(r, mutant)]
    assert not wrong, f"{cls.__name__}: CONVENTION with another diagnosis:\n{verdict_table(wrong)}"
    unexplained = [r for r in results if r.dtype == "float64" and r.verdict in FLAGGED]
    assert not unexplained, (
        f"{cls.__name__}: float64 cases the diagnosis {expected} does not explain:\n"
        f"{verdict_table(unexplained)}")

    mirror = _Mirror(mutant, change)
    silent = []
    for case, result in zip(planned, results, strict=True):
        if result.verdict == "PASS":
            seen = runner.run_case(mirror, case, profile=PROFILE)
            if seen.verdict in FLAGGED + ("CONVENTION",):
                silent.append(result)
    assert not silent, (
        f"{cls.__name__}: PASSes although the two conventions differ observably there:\n"
        f"{verdict_table(silent)}")


def _controls() -> list[Any]:
    seen: dict[tuple[Any, ...], Control] = {}
    for cls in CATALOGUE:
        key = (cls.op, tuple(sorted(cls.dialect.items())), cls.dtypes)
        seen.setdefault(key, Control(cls.op, cls.dialect, cls.dtypes))
    return [pytest.param(c, id="-".join([c.op, *c.dtypes, *(f"{k}={v}" for k, v in key[1])]),
                         marks=pytest.mark.xdist_group(c.op))
            for key, c in seen.items()]


@pytest.mark.parametrize("control", _controls())
def test_the_unmutated_control_is_not_flagged(control: Control):
    """The same plumbing without a mistake, under every (op, dialect, dtypes) the mutants claim."""
    _, results = run_mutant(control)
    flagged = [r for r in results if r.verdict in FLAGGED + ("CONVENTION",)]
    assert not flagged, f"the control is flagged:\n{verdict_table(flagged)}"
    for dtype in control.dtypes:
        assert any(r.verdict == "PASS" and r.dtype == dtype for r in results), dtype
