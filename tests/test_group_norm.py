"""GroupNorm: forward vs mpmath on adversarial data, properties, torch, errors."""

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

OP = reference.get("group_norm")
RNG = np.random.default_rng(20260102)


def mp_group_norm(x, weight, bias, num_groups, eps, axis=1, affine="per_channel"):
    """Eqs. 1-3 at 50 digits with the group sets written out (channel c in group c // (C/G))."""
    xc = np.moveaxis(np.asarray(x), axis, 1)
    n, c = xc.shape[:2]
    X = mp_array(xc).reshape(n, c, -1)
    m = c // num_groups
    out = np.empty_like(X)
    for g in range(num_groups):
        block = X[:, g * m:(g + 1) * m, :]          # S_i of Eq. 3: one group of every sample
        mean = mp_mean(block, (1, 2))
        var = mp_var(block, (1, 2))
        out[:, g * m:(g + 1) * m, :] = (block - mean) / mp_sqrt(var + mp_array(np.float64(eps)))
    for ch in range(c):
        k = ch if affine == "per_channel" else ch // m
        if weight is not None:
            out[:, ch, :] = out[:, ch, :] * mp_array(weight[k])[()]
        if bias is not None:
            out[:, ch, :] = out[:, ch, :] + mp_array(bias[k])[()]
    return np.moveaxis(out.reshape(xc.shape), 1, axis)


def _eps_for(family):
    # eps scaled below the data's variance so the std term, not eps, dominates: with var ~1e-300
    # (tiny family) a 1e-5 eps would make y ~ x/sqrt(eps) and the test trivial.
    return 1e-305 if family == "tiny_1e-150" else 1e-5


# --- forward accuracy -------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(ADVERSARIAL))
@pytest.mark.parametrize(("shape", "groups", "axis", "affine"), [
    ((2, 6, 5), 3, 1, "per_channel"),
    ((2, 3, 2, 4), 2, -1, "per_channel"),
    ((3, 4, 3), 2, 1, "per_group"),
])
def test_forward_matches_mpmath_on_adversarial_data(family, shape, groups, axis, affine):
    x = adversarial(family, shape)
    k = shape[axis] if affine == "per_channel" else groups
    weight, bias = 1 + 0.5 * RNG.standard_normal(k), RNG.standard_normal(k)
    eps = _eps_for(family)
    hp = {"num_groups": groups, "axis": axis, "eps": eps, "affine": affine}
    out, _ = OP.apply({"x": x, "weight": weight, "bias": bias}, None, **hp)
    err = relative_error(out["y"], mp_group_norm(x, weight, bias, groups, eps, axis, affine))
    assert err <= 1e-10, f"{family}: relative error {err:.3g}"


def test_constant_groups_give_beta_exactly():
    x = np.full((2, 4, 3), 7.5)
    bias = np.array([1.0, -2.0, 3.0, 0.5])
    y = OP.apply({"x": x, "weight": np.full(4, 3.0), "bias": bias}, None, num_groups=2)[0]["y"]
    np.testing.assert_array_equal(y, np.broadcast_to(bias[None, :, None], x.shape))


def test_one_element_per_group_gives_beta():
    """N * C/G * prod(spatial) == 1: torch refuses, the oracle computes var = 0 -> y = beta."""
    x = RNG.standard_normal((1, 3))
    bias = np.array([0.5, -1.0, 2.0])
    out, _ = OP.apply({"x": x, "weight": np.ones(3), "bias": bias}, None, num_groups=3)
    np.testing.assert_array_equal(out["y"], bias[None, :])
    grads = OP.vjp({"x": x, "weight": np.ones(3), "bias": bias}, None, {"y": np.ones((1, 3))},
                   num_groups=3)
    np.testing.assert_array_equal(grads["x"], 0.0)  # y does not depend on x at all
    np.testing.assert_array_equal(grads["bias"], 1.0)


def test_single_sample():
    x = RNG.standard_normal((1, 4, 5))
    y = OP.apply({"x": x}, None, num_groups=2, eps=1e-300)[0]["y"]
    np.testing.assert_allclose(y.reshape(2, 10).mean(axis=1), 0, atol=1e-15)
    np.testing.assert_allclose(y.reshape(2, 10).var(axis=1), 1, rtol=1e-14)


# --- properties -------------------------------------------------------------------------------

shapes = st.tuples(st.integers(1, 4), st.sampled_from([(2, 1), (2, 2), (3, 3), (4, 2), (6, 3)]),
                   st.integers(1, 4))


def _shape(s):
    n, (c, g), spatial = s
    return (n, c, spatial), g


@given(s=shapes, seed=st.integers(0, 2**32 - 1), log_a=st.floats(-3, 3), b=st.floats(-1e3, 1e3))
def test_invariant_to_positive_per_sample_group_affine(s, seed, log_a, b):
    shape, g = _shape(s)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    n, c = shape[:2]
    a = 10.0 ** (log_a + 0.1 * rng.standard_normal((n, g)))   # one positive scale per (n, group)
    shift = b + rng.standard_normal((n, g))
    per_channel = lambda v: np.repeat(v, c // g, axis=1)[:, :, None]  # noqa: E731
    eps = 1e-300  # eps -> 0 makes the invariance exact up to rounding
    hp = {"num_groups": g, "eps": eps}
    y1 = OP.apply({"x": x}, None, **hp)[0]["y"]
    y2 = OP.apply({"x": x * per_channel(a) + per_channel(shift)}, None, **hp)[0]["y"]
    # |shift|/(a std) is the cancellation condition number of the shifted input: the shifted data
    # carry that many ulps of the spread, and x_hat inherits them.  The group std is floored at
    # 1e-3 because a standard-normal group can be nearly constant for n*C/G*spatial = 2.
    std = x.reshape(n, g, -1).std(axis=2).clip(1e-3)
    cond = 1 + np.max(np.abs(shift) / (a * std))
    np.testing.assert_allclose(y2, y1, atol=1e-13 * cond)


@given(s=shapes, seed=st.integers(0, 2**32 - 1))
def test_batch_size_independent(s, seed):
    shape, g = _shape(s)
    rng = np.random.default_rng(seed)
    x, w, b = rng.standard_normal(shape), rng.standard_normal(shape[1]), rng.standard_normal(shape[1])
    y = OP.apply({"x": x, "weight": w, "bias": b}, None, num_groups=g)[0]["y"]
    for i in range(shape[0]):
        yi = OP.apply({"x": x[i:i + 1], "weight": w, "bias": b}, None, num_groups=g)[0]["y"]
        # The same float64 operations on the same values; only the order of the summations
        # inside a group may differ between the layouts, a few ulps of |y|.
        np.testing.assert_allclose(yi[0], y[i], rtol=0, atol=1e-14 * (1 + np.abs(y).max()))


@pytest.mark.checks("group_mean_beta_var_over_var_plus_eps")
@given(s=shapes, seed=st.integers(0, 2**32 - 1), eps=st.floats(1e-8, 1.0))
def test_group_mean_is_beta_and_var_is_gamma2_var_over_var_plus_eps(s, seed, eps):
    """With the per-group affine (ONNX-18) each group's output has mean beta_g, var gamma_g^2 ..."""
    shape, g = _shape(s)
    rng = np.random.default_rng(seed)
    x, w, b = rng.standard_normal(shape), rng.standard_normal(g), rng.standard_normal(g)
    y = OP.apply({"x": x, "weight": w, "bias": b}, None, num_groups=g, eps=eps,
                 affine="per_group")[0]["y"]
    n = shape[0]
    var = x.reshape(n, g, -1).var(axis=2)
    yg = y.reshape(n, g, -1)
    np.testing.assert_allclose(yg.mean(axis=2), np.broadcast_to(b, (n, g)), atol=1e-13)
    np.testing.assert_allclose(yg.var(axis=2), w**2 * var / (var + eps), rtol=1e-10, atol=1e-13)
    # The spec's form, gamma = 1 per group (no weight): mean beta_g and var var/(var + eps).
    y1 = OP.apply({"x": x, "bias": b}, None, num_groups=g, eps=eps, affine="per_group")[0]["y"]
    y1g = y1.reshape(n, g, -1)
    np.testing.assert_allclose(y1g.mean(axis=2), np.broadcast_to(b, (n, g)), atol=1e-13)
    np.testing.assert_allclose(y1g.var(axis=2), var / (var + eps), rtol=1e-10, atol=1e-13)


@pytest.mark.checks("one_group_is_layer_norm_with_channel_affine")
@given(s=shapes, seed=st.integers(0, 2**32 - 1))
def test_one_group_is_layer_norm_over_channels_and_space_with_channel_affine(s, seed):
    shape, _ = _shape(s)
    rng = np.random.default_rng(seed)
    x, w, b = rng.standard_normal(shape), rng.standard_normal(shape[1]), rng.standard_normal(shape[1])
    eps = 1e-5
    y = OP.apply({"x": x, "weight": w, "bias": b}, None, num_groups=1, eps=eps)[0]["y"]
    mean = x.mean(axis=(1, 2), keepdims=True)
    var = ((x - mean) ** 2).mean(axis=(1, 2), keepdims=True)
    expected = (x - mean) / np.sqrt(var + eps) * w[:, None] + b[:, None]
    # Both are backward-stable float64 standardizers of standard-normal data (condition ~1).
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
    # The LayerNorm oracle over (C, spatial), its gain and bias the per-channel ones broadcast
    # over space: the same standardization on another view, so only summation order may differ.
    c, spatial = shape[1:]
    ln = reference.get("layer_norm").apply(
        {"x": x, "weight": np.broadcast_to(w[:, None], (c, spatial)),
         "bias": np.broadcast_to(b[:, None], (c, spatial))}, None, axes=(1, 2), eps=eps)[0]["y"]
    np.testing.assert_allclose(y, ln, rtol=1e-13, atol=1e-14)


@given(s=shapes, seed=st.integers(0, 2**32 - 1))
def test_channel_groups_is_instance_norm(s, seed):
    n, (c, _), spatial = s
    shape = (n, c, spatial + 1)  # InstanceNorm needs a spatial extent > 1
    ops = reference.ops()
    if "instance_norm" not in ops:
        pytest.skip("instance_norm is not registered")
    rng = np.random.default_rng(seed)
    x, w, b = rng.standard_normal(shape), rng.standard_normal(c), rng.standard_normal(c)
    y = OP.apply({"x": x, "weight": w, "bias": b}, None, num_groups=c)[0]["y"]
    y_in = reference.get("instance_norm").apply({"x": x, "weight": w, "bias": b}, None)[0]["y"]
    np.testing.assert_allclose(y, y_in, rtol=1e-13, atol=1e-14)


@pytest.mark.checks("grad_sums_zero_per_sample_group")
@given(s=shapes, seed=st.integers(0, 2**32 - 1))
def test_grad_sums_to_zero_per_sample_and_group(s, seed):
    """sum_R dx = inv_std (sum h - m mean h - mean(h x_hat) sum x_hat) = 0, for any gamma."""
    shape, g = _shape(s)
    rng = np.random.default_rng(seed)
    x, dy, w = rng.standard_normal(shape), rng.standard_normal(shape), rng.standard_normal(shape[1])
    eps = 1e-5
    dx = OP.vjp({"x": x, "weight": w}, None, {"y": dy}, num_groups=g, eps=eps)["x"]
    n = shape[0]
    var = x.reshape(n, g, -1).var(axis=2)
    # Each of the m terms is at most |h| inv_std (1 + |x_hat|^2): bound the rounding by their sum.
    scale = np.abs(dy * w[:, None]).sum() * 3 / np.sqrt(var.min() + eps)
    np.testing.assert_allclose(dx.reshape(n, g, -1).sum(axis=2), 0, atol=1e-14 * scale)


# --- PyTorch cross-check (float64, torch dialect) -----------------------------------------------


@pytest.mark.parametrize(("shape", "groups"), [((4, 6), 3), ((3, 6, 5), 2), ((2, 8, 3, 4), 4),
                                               ((2, 4, 2, 2, 3), 1), ((2, 4, 3), 4)])
def test_matches_torch_float64(shape, groups):
    torch = torch_or_skip()
    c = shape[1]
    x, w, b = RNG.standard_normal(shape), RNG.standard_normal(c), RNG.standard_normal(c)
    tx, tw, tb = t64(x, True), t64(w, True), t64(b, True)
    ty = torch.nn.functional.group_norm(tx, groups, tw, tb, eps=1e-5)
    hp = {**OP.dialect("torch"), "num_groups": groups}
    out, _ = OP.apply({"x": x, "weight": w, "bias": b}, None, **hp)
    np.testing.assert_allclose(out["y"], ty.detach().numpy(), rtol=1e-12, atol=1e-13)
    dy = RNG.standard_normal(shape)
    expected = torch_vjp(ty, {"x": tx, "weight": tw, "bias": tb}, dy)
    grads = OP.vjp({"x": x, "weight": w, "bias": b}, None, {"y": dy}, **hp)
    for key in expected:
        np.testing.assert_allclose(grads[key], expected[key], rtol=1e-11, atol=1e-12, err_msg=key)


def test_channels_last_matches_torch_on_moved_axis():
    """Flax/Keras layout: the same contiguous groups as torch after NHWC -> NCHW."""
    torch = torch_or_skip()
    x, w, b = RNG.standard_normal((2, 3, 4, 6)), RNG.standard_normal(6), RNG.standard_normal(6)
    tx = t64(np.moveaxis(x, -1, 1), True)
    tw, tb = t64(w, True), t64(b, True)
    ty = torch.nn.functional.group_norm(tx, 3, tw, tb, eps=1e-6)
    hp = {**OP.dialect("flax"), "num_groups": 3}
    out, _ = OP.apply({"x": x, "weight": w, "bias": b}, None, **hp)
    np.testing.assert_allclose(np.moveaxis(out["y"], -1, 1), ty.detach().numpy(), rtol=1e-12,
                               atol=1e-13)
    dy = RNG.standard_normal(x.shape)
    expected = torch_vjp(ty, {"x": tx, "weight": tw, "bias": tb}, np.moveaxis(dy, -1, 1))
    grads = OP.vjp({"x": x, "weight": w, "bias": b}, None, {"y": dy}, **hp)
    np.testing.assert_allclose(np.moveaxis(grads["x"], -1, 1), expected["x"], rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(grads["weight"], expected["weight"], rtol=1e-11, atol=1e-12)


def test_per_group_affine_is_per_channel_with_repeated_values():
    """ONNX-18 -> 21 converter semantics: repeat each group's gamma/beta over its channels; the
    per-group parameter gradient is the sum of the per-channel ones (checked through torch)."""
    torch = torch_or_skip()
    x, w, b = RNG.standard_normal((3, 6, 4)), RNG.standard_normal(3), RNG.standard_normal(3)
    tx = t64(x, True)
    tw, tb = t64(w, True), t64(b, True)
    ty = torch.nn.functional.group_norm(tx, 3, tw.repeat_interleave(2), tb.repeat_interleave(2))
    hp = {**OP.dialect("onnx18"), "num_groups": 3}
    out, _ = OP.apply({"x": x, "weight": w, "bias": b}, None, **hp)
    np.testing.assert_allclose(out["y"], ty.detach().numpy(), rtol=1e-12, atol=1e-13)
    dy = RNG.standard_normal(x.shape)
    expected = torch_vjp(ty, {"x": tx, "weight": tw, "bias": tb}, dy)
    grads = OP.vjp({"x": x, "weight": w, "bias": b}, None, {"y": dy}, **hp)
    for key in expected:
        np.testing.assert_allclose(grads[key], expected[key], rtol=1e-11, atol=1e-12, err_msg=key)


def test_torch_refuses_one_element_per_group_which_the_oracle_allows():
    torch = torch_or_skip()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        torch.nn.functional.group_norm(t64(np.ones((1, 3))), 3)
    # With two samples torch computes it and agrees up to its rounding: the oracle's x - mean is
    # exactly 0 (y = beta bit for bit), torch's carries ~u|x| which 1/sqrt(eps) = 316 amplifies.
    x, b = RNG.standard_normal((2, 3)), RNG.standard_normal(3)
    ty = torch.nn.functional.group_norm(t64(x), 3, None, t64(b))
    y = OP.apply({"x": x, "bias": b}, None, num_groups=3)[0]["y"]
    np.testing.assert_array_equal(y, np.broadcast_to(b, (2, 3)))
    np.testing.assert_allclose(y, ty.numpy(), rtol=0, atol=16 * 2**-53 * np.abs(x).max() / 1e-5**0.5)
