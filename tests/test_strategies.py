"""Hypothesis-driven conformance cases: the oracle never FAILs itself; a bug is found and shrunk."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, find, given, settings

import harness_adapters as ha
import reference
from conformance import runner, strategies


@pytest.mark.parametrize("op", reference.ops("normalizers"))
def test_the_oracle_passes_hypothesis_cases(op):
    adapter = ha.OracleAdapter()

    @settings(max_examples=8, suppress_health_check=[HealthCheck.too_slow], deadline=None)
    @given(planned=strategies.cases(op, dtypes=("float64",)))
    def check(planned):
        result = runner.run_case(adapter, planned, profile="quick")
        assert result.verdict not in ("FAIL", "ERROR", "CONVENTION"), result.message

    check()


def test_a_wrong_gradient_is_found_and_shrunk():
    adapter = ha.BadGradientAdapter()
    found = find(
        strategies.cases("batch_norm", dtypes=("float64",)),
        lambda p: runner.run_case(adapter, p, profile="quick", diagnose_fail=False).verdict == "FAIL",
        settings=settings(max_examples=20, database=None, deadline=None),
    )
    assert found.op == "batch_norm" and found.dtype == "float64"
