"""LayerNorm: forward vs mpmath on adversarial data, properties, torch, errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reference
from conformance.cases import ADVERSARIAL, adversarial
from helpers import (
    mp_array,
    mp_mean,
    mp_sqrt,
    mp_var,
    relative_error,
    t64,
    torch_or_skip,
    torch_vjp,
)
from reference.normalizers.layer_norm import layer_norm
from reference.normalizers.rms_norm import rms_norm

OP = reference.get("layer_norm")
RNG = np.random.default_rng(20260102)


def _param_shape(x_shape, axes):
    return tuple(x_shape[a] for a in sorted(a % len(x_shape) for a in axes))


def _bcast(v, ndim, axes):
    shape = [1] * ndim
    for a, s in zip(sorted(a % ndim for a in axes), v.shape, strict=True):
        shape[a] = s
    return v.reshape(shape)


def mp_layer_norm(x, weight, bias, eps, axes=(-1,)):
    """Eqs. 3-4 at 50 digits, written independently of the oracle."""
    R = tuple(sorted(a % x.ndim for a in axes))
    X = mp_array(x)
    mean = mp_mean(X, R)
    var = mp_var(X, R)
    y = (X - mean) / mp_sqrt(var + mp_array(np.float64(eps)))
    return y * _bcast(mp_array(weight), x.ndim, R) + _bcast(mp_array(bias), x.ndim, R)


# --- forward accuracy -------------------------------------------------------------------------


def _eps_scaled_to(x, axes):
    """eps = 1e-3 of the typical row variance, so the spread (not eps) dominates the denominator
    on every scale (1e-6 for the offset family, 1e300 for huge, 1e-300 for tiny)."""
    var = float(np.mean(np.var(x, axis=axes)))
    return 1e-3 * var if var > 0 else 1e-5


@pytest.mark.parametrize("axes", [(-1,), (-2, -1)])
@pytest.mark.parametrize("eps_kind", ["scaled", "default"])
@pytest.mark.parametrize("family", sorted(ADVERSARIAL))
def test_forward_matches_mpmath_on_adversarial_data(family, eps_kind, axes):
    x = adversarial(family, (4, 6, 5))
    shape = _param_shape(x.shape, axes)
    weight, bias = 1 + 0.5 * RNG.standard_normal(shape), RNG.standard_normal(shape)
    eps = _eps_scaled_to(x, axes) if eps_kind == "scaled" else 1e-5
    y = OP.apply({"x": x, "weight": weight, "bias": bias}, None, axes=axes, eps=eps)[0]["y"]
    err = relative_error(y, mp_layer_norm(x, weight, bias, eps, axes))
    assert err <= 1e-10, f"{family}, eps={eps:.3g}: relative error {err:.3g}"


def test_plain_two_pass_mean_would_fail_the_offset_family():
    """The accuracy test has teeth: the naive two-pass formula misses 1e-10 on offset data."""
    x = adversarial("offset_1e8_std_1e-3", (4, 6, 5))
    eps = _eps_scaled_to(x, (-1,))
    mean = x.mean(axis=-1, keepdims=True)
    naive = (x - mean) / np.sqrt(((x - mean) ** 2).mean(axis=-1, keepdims=True) + eps)
    exact = mp_layer_norm(x, np.ones(5), np.zeros(5), eps)
    assert relative_error(naive, exact) > 1e-10


def test_constant_rows_give_exactly_the_bias():
    x = np.full((3, 7), 3.25)
    bias = RNG.standard_normal(7)
    y = layer_norm(x, RNG.standard_normal(7), bias)
    np.testing.assert_array_equal(y, np.broadcast_to(bias, x.shape))  # var = 0 -> x_hat = 0
    grads = OP.vjp({"x": x}, None, {"y": RNG.standard_normal(x.shape)})
    assert np.all(np.isfinite(grads["x"]))  # 1/sqrt(eps), not 1/0


def test_a_single_normalized_value_gives_the_bias():
    x = RNG.standard_normal((4, 1))
    y = layer_norm(x, np.array([2.0]), np.array([0.5]))
    np.testing.assert_array_equal(y, np.full((4, 1), 0.5))


# --- properties -------------------------------------------------------------------------------

rows = st.tuples(st.integers(1, 4), st.integers(2, 16))
TINY_EPS = 1e-300  # eps -> 0: the exact identities then hold up to rounding


@pytest.mark.checks("rows_mean_zero_var_ratio")
@given(shape=rows, seed=st.integers(0, 2**32 - 1), eps=st.floats(1e-8, 1.0))
def test_rows_have_mean_zero_and_var_ratio_without_affine(shape, seed, eps):
    x = np.random.default_rng(seed).standard_normal(shape)
    y = layer_norm(x, eps=eps)
    var = x.var(axis=-1)
    # |y| <= sqrt(d) <= 4: d roundings of size u*4 in the mean; var's relative error ~ d*u.
    np.testing.assert_allclose(y.mean(axis=-1), 0, atol=1e-14)
    np.testing.assert_allclose(y.var(axis=-1), var / (var + eps), rtol=1e-12)


@given(shape=rows, seed=st.integers(0, 2**32 - 1), log_a=st.floats(-3, 3), b=st.floats(-1e3, 1e3))
def test_invariant_to_positive_row_affine(shape, seed, log_a, b):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    a = 10.0 ** (log_a + 0.1 * rng.standard_normal((shape[0], 1)))
    y1 = layer_norm(x, eps=TINY_EPS)
    y2 = layer_norm(a * x + b, eps=TINY_EPS)
    # Rounding a*x + b loses u*|b| absolutely, i.e. u*|b|/(a std) relative to the spread: the
    # cancellation condition number of the shifted input (as in the BatchNorm test).
    cond = 1 + np.max(np.abs(b) / (a[:, 0] * x.std(axis=-1).clip(1e-3)))
    np.testing.assert_allclose(y2, y1, atol=1e-13 * cond)


@pytest.mark.checks("geometric_form_norm_sqrt_d_orthogonal_1")
@given(shape=rows, seed=st.integers(0, 2**32 - 1), offset=st.floats(-10, 10))
def test_geometric_form_norm_sqrt_d_and_orthogonal_to_ones(shape, seed, offset):
    """Brody et al.: LN(x) = sqrt(d) P x / ||P x|| with P = I - 11^T/d (eps -> 0)."""
    x = np.random.default_rng(seed).standard_normal(shape) + offset
    d = shape[1]
    y = layer_norm(x, eps=TINY_EPS)
    P = np.eye(d) - np.ones((d, d)) / d
    Px = x @ P.T
    expected = np.sqrt(d) * Px / np.linalg.norm(Px, axis=-1, keepdims=True)
    # |offset| <= 10 against std ~ 1: the projection loses ~u*|offset| per entry in both.
    np.testing.assert_allclose(y, expected, atol=1e-13 * (1 + abs(offset)))
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.sqrt(d), rtol=1e-13)
    np.testing.assert_allclose(y.sum(axis=-1), 0, atol=1e-13)


@pytest.mark.checks("equals_rms_norm_of_centered_input")
@given(shape=rows, seed=st.integers(0, 2**32 - 1), eps=st.floats(1e-8, 1.0))
def test_equals_rms_norm_of_the_centered_input(shape, seed, eps):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) + 3.0
    w, b = rng.standard_normal(shape[1]), rng.standard_normal(shape[1])
    centered = x - x.mean(axis=-1, keepdims=True)
    expected = rms_norm(centered, w, b, eps=eps, eps_placement="inside")
    # mean(centered^2) is the biased variance; both sides round a few times at |x| ~ 3.
    np.testing.assert_allclose(layer_norm(x, w, b, eps=eps), expected, atol=1e-13)


@pytest.mark.checks("permutation_equivariant")
@given(shape=rows, seed=st.integers(0, 2**32 - 1))
def test_permutation_equivariant_over_features(shape, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    w, b = rng.standard_normal(shape[1]), rng.standard_normal(shape[1])
    perm = rng.permutation(shape[1])
    y = layer_norm(x, w, b)
    # Only the summation order of the statistics changes: a few ulps.
    np.testing.assert_allclose(layer_norm(x[:, perm], w[perm], b[perm]), y[:, perm], atol=1e-14)
    dy = rng.standard_normal(shape)
    g = OP.vjp({"x": x, "weight": w, "bias": b}, None, {"y": dy})
    gp = OP.vjp({"x": x[:, perm], "weight": w[perm], "bias": b[perm]}, None, {"y": dy[:, perm]})
    for key in g:
        np.testing.assert_allclose(gp[key], g[key][..., perm], atol=1e-13, err_msg=key)


@pytest.mark.checks("grad_sums_zero_per_row")
@given(shape=rows, seed=st.integers(0, 2**32 - 1), eps=st.floats(1e-8, 1.0))
def test_grad_sums_to_zero_per_row(shape, seed, eps):
    rng = np.random.default_rng(seed)
    x, dy = rng.standard_normal(shape), rng.standard_normal(shape)
    w = rng.standard_normal(shape[1])
    dx = OP.vjp({"x": x, "weight": w}, None, {"y": dy}, eps=eps)["x"]
    # dx = inv_std * (h - mean h - x_hat mean(h x_hat)); its row sum cancels terms of size
    # inv_std * sum|h|, so the rounding is u * d * that.
    scale = (np.abs(dy * w).sum(axis=-1) / np.sqrt(x.var(axis=-1) + eps))
    np.testing.assert_allclose(dx.sum(axis=-1), 0, atol=1e-14 * shape[1] * scale.max())


# --- conventions ------------------------------------------------------------------------------


def test_non_contiguous_axes_match_a_direct_formula():
    """Keras axis=[1, 3]: statistics over axes 1 and 3, gain of shape (x.shape[1], x.shape[3])."""
    x = RNG.standard_normal((2, 3, 4, 5))
    w, b = RNG.standard_normal((3, 5)), RNG.standard_normal((3, 5))
    mean = x.mean(axis=(1, 3), keepdims=True)
    var = x.var(axis=(1, 3), keepdims=True)
    expected = (x - mean) / np.sqrt(var + 1e-3) * w[None, :, None, :] + b[None, :, None, :]
    y = OP.apply({"x": x, "weight": w, "bias": b}, None, **{**OP.dialect("keras"), "axes": [1, 3]})
    np.testing.assert_allclose(y[0]["y"], expected, rtol=1e-13, atol=1e-14)


def test_dialect_eps_values():
    assert {d: OP.dialect(d)["eps"] for d in OP.spec.dialects} == {
        "torch": 1e-5, "flax": 1e-6, "keras": 1e-3, "onnx": 1e-5, "bert": 1e-12}


# --- PyTorch cross-check (float64, torch dialect) -----------------------------------------------


@pytest.mark.parametrize("affine", ["both", "weight", "none"])
@pytest.mark.parametrize(("shape", "k"), [((4, 7), 1), ((2, 3, 6), 1), ((2, 3, 4, 5), 2), ((2, 3, 4, 5), 3)])
def test_matches_torch_float64(shape, k, affine):
    torch = torch_or_skip()
    normalized = shape[-k:]
    x = RNG.standard_normal(shape) * 2 + 0.5
    w = RNG.standard_normal(normalized) if affine != "none" else None
    b = RNG.standard_normal(normalized) if affine == "both" else None
    tx = t64(x, True)
    tw = t64(w, True) if w is not None else None
    tb = t64(b, True) if b is not None else None
    ty = torch.nn.functional.layer_norm(tx, normalized, tw, tb, eps=1e-5)
    hp = {**OP.dialect("torch"), "axes": list(range(-k, 0))}
    inputs = {"x": x, "weight": w, "bias": b}
    out, _ = OP.apply(inputs, None, **hp)
    np.testing.assert_allclose(out["y"], ty.detach().numpy(), rtol=1e-12, atol=1e-13)
    dy = RNG.standard_normal(shape)
    expected = torch_vjp(ty, {"x": tx, "weight": tw, "bias": tb}, dy)
    grads = OP.vjp(inputs, None, {"y": dy}, **hp)
    assert grads.keys() == expected.keys()
    for key in expected:
        np.testing.assert_allclose(grads[key], expected[key], rtol=1e-11, atol=1e-12, err_msg=key)


def test_non_contiguous_axes_match_torch_after_moving_them_last():
    """Keras-style axes (1, 3) = torch layer_norm over the last two dims of a permuted x."""
    torch = torch_or_skip()
    x, w, b = RNG.standard_normal((2, 3, 4, 5)), RNG.standard_normal((3, 5)), RNG.standard_normal((3, 5))
    tx, tw, tb = t64(x, True), t64(w, True), t64(b, True)
    ty = torch.nn.functional.layer_norm(tx.permute(0, 2, 1, 3), (3, 5), tw, tb, eps=1e-3).permute(0, 2, 1, 3)
    hp = {"axes": (1, 3), "eps": 1e-3}
    out, _ = OP.apply({"x": x, "weight": w, "bias": b}, None, **hp)
    np.testing.assert_allclose(out["y"], ty.detach().numpy(), rtol=1e-12, atol=1e-13)
    dy = RNG.standard_normal(x.shape)
    expected = torch_vjp(ty, {"x": tx, "weight": tw, "bias": tb}, dy)
    grads = OP.vjp({"x": x, "weight": w, "bias": b}, None, {"y": dy}, **hp)
    for key in expected:
        np.testing.assert_allclose(grads[key], expected[key], rtol=1e-11, atol=1e-12, err_msg=key)
