"""Checks every registered op gets from its spec alone: VJPs against finite differences,
second-order consistency, and backend purity on array_api_strict."""

from __future__ import annotations

import numpy as np
import pytest

import reference
from conformance.cases import default_cases
from helpers import assert_vjp

# Cases above this many input elements are realistic-size cases for the harness and benchmarks;
# finite differences on them would only slow CI down without covering anything new.
GRADCHECK_MAX_SIZE = 20_000

CASES = [c for op in reference.ops("normalizers") for c in default_cases(op)]
SMALL = [c for c in CASES if c.size <= GRADCHECK_MAX_SIZE]
# A custom or surrogate backward is not the true gradient: its spec's backward_properties (bound
# to tests, tests/test_registry.py) replace the finite-difference check.
EXACT = [c for c in SMALL if reference.get(c.op).spec.backward == "exact"]
FIRST_PER_OP = list({c.op: c for c in reversed(EXACT)}.values())


@pytest.mark.parametrize("case", EXACT, ids=lambda c: f"{c.op}-{c.name}")
def test_vjp_matches_finite_differences(case):
    """<J^T u, v> = d/dt <u, f(x + t v)> to 1e-8 relative, for every differentiable input of an
    op whose backward is the exact gradient."""
    assert_vjp(case.op, case.inputs, None, rtol=1e-8, **case.hparams)


@pytest.mark.parametrize("case", FIRST_PER_OP, ids=lambda c: f"{c.op}-{c.name}")
def test_vjp_is_a_gradient_field(case):
    """Second order: the finite-difference Jacobian of the VJP is symmetric."""
    assert_vjp(case.op, case.inputs, None, rtol=1e-8, second_order=True, **case.hparams)


@pytest.mark.parametrize("case", SMALL, ids=lambda c: f"{c.op}-{c.name}")
def test_array_api_strict_matches_numpy(case):
    """The oracle is backend-pure: on array_api_strict float64 it reproduces NumPy to 1 ulp."""
    xs = pytest.importorskip("array_api_strict")
    op = reference.get(case.op)

    def strict(tree):
        return {k: xs.asarray(v) for k, v in tree.items()}

    def back(tree):
        return {k: np.asarray(v) for k, v in tree.items()}

    out_np, state_np = op.apply(case.inputs, None, **case.hparams)
    out_xs, state_xs = op.apply(strict(case.inputs), None, **case.hparams)
    rng = np.random.default_rng(0)
    cot = {k: rng.standard_normal(v.shape) for k, v in out_np.items()}
    g_np = op.vjp(case.inputs, None, cot, **case.hparams)
    g_xs = op.vjp(strict(case.inputs), None, strict(cot), **case.hparams)
    for label, a, b in (
        ("outputs", out_np, back(out_xs)),
        ("state", state_np, back(state_xs)),
        ("grads", g_np, back(g_xs)),
    ):
        assert a.keys() == b.keys(), label
        for key in a:
            np.testing.assert_array_max_ulp(np.asarray(a[key]), b[key], maxulp=1)
