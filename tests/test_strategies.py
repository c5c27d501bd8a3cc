"""Hypothesis-driven conformance cases: the oracle never FAILs itself; a bug is found and shrunk."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, find, given, settings

import harness_adapters as ha
import reference
from conformance import runner, strategies
from conformance.adapters import OpSupport


@pytest.mark.parametrize("op", reference.ops("normalizers"))
def test_the_oracle_passes_hypothesis_cases(op):
    adapter = ha.OracleAdapter()

    @settings(max_examples=8, suppress_health_check=[HealthCheck.too_slow], deadline=None)
    @given(planned=strategies.cases(op, dtypes=("float64",)))
    def check(planned):
        result = runner.run_case(adapter, planned, profile="quick")
        assert result.verdict not in ("FAIL", "ERROR", "CONVENTION"), result.message

    check()


class _BadLayerNormGradient(ha.BadGradientAdapter):
    """The same 1%-off input gradient in a LayerNorm (one step per case: a cheap search)."""

    def ops(self) -> dict[str, OpSupport]:
        return {"layer_norm": OpSupport({}, ("float64",))}


def test_a_wrong_gradient_is_found_and_shrunk():
    adapter = _BadLayerNormGradient()
    found = find(
        strategies.cases("layer_norm", dtypes=("float64",)),
        lambda p: runner.run_case(adapter, p, profile="quick", diagnose_fail=False).verdict == "FAIL",
        settings=settings(max_examples=20, database=None, deadline=None),
    )
    assert found.op == "layer_norm" and found.dtype == "float64"
    # Shrunk to the simplest data: the values of seed 0, with offset 0 and scale 1.
    x = found.case.inputs["x"]
    assert np.array_equal(x, np.random.default_rng(0).standard_normal(x.shape))


def test_spec_domains_are_the_drawn_domains():
    """reference/spec.py names the value domains a spec may declare; conformance/cases.py draws
    each: the two lists are one."""
    from conformance.cases import DOMAINS as DRAWN
    from conformance.cases import draw
    from reference.spec import DOMAINS

    assert set(DOMAINS) == set(DRAWN)
    rng = np.random.default_rng(0)
    assert np.array_equal(draw(rng, "steps", (2, 3)), np.arange(6.0).reshape(2, 3))
    assert abs(float(np.mean(draw(rng, "around_one", (4000,)))) - 1.0) < 0.05
    edges = draw(rng, "on_edges", (400,), 5)
    assert np.all((edges >= 0) & (edges <= 1)) and np.mean(np.isin(edges, np.arange(6) / 5)) > 0.4
    assert len(np.unique(edges)) < 0.8 * edges.size   # ties
    with pytest.raises(ValueError, match="unknown value domain 'beta'"):
        draw(rng, "beta", (2,))
    with pytest.raises(ValueError, match="the on_edges domain needs upper >= 1"):
        draw(rng, "on_edges", (2,))
