"""conformance.gradcheck: each check passes on the right derivative and fails on a wrong one."""

from __future__ import annotations

import numpy as np
import pytest

from conformance import (
    GradcheckError,
    check_hvp,
    check_jvp,
    check_vjp,
    directional_derivative,
    numerical_jacobian,
)

RNG = np.random.default_rng(7)
A = RNG.standard_normal((4, 3))


def f(x):
    """A smooth nonlinear map with a dict input and a tuple output."""
    return (np.sin(A @ x["a"]) * x["b"][0], np.tanh(x["a"]) * np.exp(x["b"][1]))


def vjp(x, u):
    u1, u2 = u
    s = A @ x["a"]
    da = A.T @ (np.cos(s) * x["b"][0] * u1) + (1 - np.tanh(x["a"]) ** 2) * np.exp(x["b"][1]) * u2
    db = np.array([np.dot(np.sin(s), u1), np.dot(np.tanh(x["a"]) * np.exp(x["b"][1]), u2)])
    return {"a": da, "b": db}


def jvp(x, v):
    s = A @ x["a"]
    t1 = np.cos(s) * (A @ v["a"]) * x["b"][0] + np.sin(s) * v["b"][0]
    e = np.exp(x["b"][1])
    t2 = (1 - np.tanh(x["a"]) ** 2) * v["a"] * e + np.tanh(x["a"]) * e * v["b"][1]
    return (t1, t2)


X = {"a": RNG.standard_normal(3), "b": np.array([0.7, -0.3])}


def test_check_vjp_passes_the_right_vjp_to_1e_minus_8():
    result = check_vjp(f, vjp, X, rtol=1e-8)
    assert result.passed and result.max_relative_error < 1e-10
    assert len(result.directions) == 3


@pytest.mark.parametrize("leaf", ["a", "b"])
def test_check_vjp_fails_a_wrong_vjp_and_names_the_culprit(leaf):
    def wrong(x, u):
        g = vjp(x, u)
        g[leaf] = g[leaf] * (1 + 1e-6)  # a relative slip far below any plot-level check
        return g

    with pytest.raises(GradcheckError) as info:
        check_vjp(f, wrong, X, rtol=1e-8)
    message = str(info.value)
    for needle in ("analytic", "numerical", "direction", "error estimate", "tolerance"):
        assert needle in message
    assert info.value.result.culprits == [leaf]


def test_check_vjp_cost_does_not_grow_with_input_size():
    def lin(x):
        return np.tanh(x) * 2.0

    def lin_vjp(x, u):
        return 2.0 * (1 - np.tanh(x) ** 2) * u

    small = check_vjp(lin, lin_vjp, RNG.standard_normal(10))
    large = check_vjp(lin, lin_vjp, RNG.standard_normal(10_000))
    assert large.nfev <= 2 * small.nfev < 200


def test_float32_inputs_get_steps_above_their_resolution():
    """A correct float32 function passes with the dtype's default tolerance; a wrong one fails."""
    x = RNG.standard_normal(50).astype(np.float32)

    def f32(x):
        return np.sin(x).astype(np.float32)

    def right(x, u):
        return (np.cos(x) * u).astype(np.float32)

    def wrong(x, u):
        return (1.05 * np.cos(x) * u).astype(np.float32)

    assert check_vjp(f32, right, x).passed
    assert not check_vjp(f32, wrong, x, raise_on_failure=False).passed


def test_noisy_function_is_not_judged_silently():
    """When the finite difference cannot be trusted the check fails and says so; it never passes."""
    def noisy(x):
        return x + 1e-3 * np.sign(np.sin(1e7 * x))

    result = check_vjp(noisy, lambda x, u: u, RNG.standard_normal(5), raise_on_failure=False)
    assert not result.passed
    assert "not accurate enough" in result.message


def test_positional_trees_and_wrt():
    def g(xs):
        a, b = xs
        return a * b

    def g_vjp(xs, u):
        a, b = xs
        return (u * b, u * a)

    xs = (RNG.standard_normal(4), RNG.standard_normal(4))
    assert check_vjp(g, g_vjp, xs).passed
    with pytest.raises(TypeError, match="wrt= needs dict inputs"):
        check_vjp(g, g_vjp, xs, wrt=["a"])
    with pytest.raises(ValueError, match=r"wrt names unknown inputs \['c'\]"):
        check_vjp(f, vjp, X, wrt=["c"])


def test_numerical_jacobian_matches_the_analytic_one():
    """1e-10 normwise relative accuracy (an element near 0, cos(a.x) A_ij ~ 1e-3, carries the
    absolute error of its row, ~1e-12, so an elementwise rtol would test the wrong thing); its own
    seed, so the point does not depend on which tests ran before in the worker."""
    x = np.random.default_rng(11).standard_normal(3)
    J, err = numerical_jacobian(lambda x: np.sin(A @ x), x)
    exact = np.cos(A @ x)[:, None] * A
    assert np.max(np.abs(J - exact)) <= 1e-10 * np.max(np.abs(exact))
    assert np.all(err < 1e-9)
    # and it fails for a wrong Jacobian (one entry off by 1e-8 relative)
    wrong = exact.copy()
    wrong[0, 0] *= 1 + 1e-8 / abs(wrong[0, 0]) * np.max(np.abs(exact))
    assert np.max(np.abs(J - wrong)) > 1e-10 * np.max(np.abs(exact))


def test_directional_derivative_reports_its_error_and_call_count():
    d = directional_derivative(lambda x: np.exp(x), np.zeros(2), np.ones(2))
    np.testing.assert_allclose(d.value, [1.0, 1.0], rtol=1e-12)
    assert d.success and np.all(d.error < 1e-10) and d.nfev > 5


def test_check_jvp_taylor_remainder():
    assert check_jvp(f, jvp, X).passed

    def wrong(x, v):
        t1, t2 = jvp(x, v)
        return (t1 * 1.001, t2)

    with pytest.raises(GradcheckError, match="shrinks at order 1.0"):
        check_jvp(f, wrong, X)


def test_check_jvp_affine_function():
    """An affine f has a zero remainder for the exact JVP and an O(h) one for a wrong JVP."""
    def aff(x):
        return A @ x + 1.0

    x = RNG.standard_normal(3)
    assert check_jvp(aff, lambda x, v: A @ v, x).passed
    assert not check_jvp(aff, lambda x, v: 1.01 * A @ v, x, raise_on_failure=False).passed


def test_check_hvp_against_a_given_hvp_and_by_symmetry():
    M = RNG.standard_normal((3, 3))
    S = M + M.T

    def grad(x):  # gradient of 0.5 x^T S x + sum(cos x)
        return S @ x - np.sin(x)

    def hvp(x, v):
        return S @ v - np.cos(x) * v

    x = RNG.standard_normal(3)
    assert check_hvp(grad, x, hvp).passed
    assert not check_hvp(grad, x, lambda x, v: hvp(x, v) * 1.01, raise_on_failure=False).passed
    assert check_hvp(grad, x).passed  # symmetric: a true gradient field
    with pytest.raises(GradcheckError, match="not a gradient field"):
        check_hvp(lambda x: M @ x, x)  # non-symmetric Jacobian: no scalar function has this gradient


def test_second_order_catches_a_vjp_that_dropped_a_term():
    """The stop-gradient-through-the-mean BN mutant is not a gradient field."""
    def bn_vjp_no_mean_term(x, u):
        c = x - x.mean()
        inv = 1 / np.sqrt((c * c).mean() + 1e-5)
        xh = c * inv
        return inv * (u - xh * (u * xh).mean())

    u = RNG.standard_normal(6)
    x = RNG.standard_normal(6)
    assert not check_hvp(lambda x: bn_vjp_no_mean_term(x, u), x, raise_on_failure=False).passed
