"""BatchNorm: forward vs mpmath on adversarial data, running statistics, properties, torch, errors."""

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

OP = reference.get("batch_norm")
RNG = np.random.default_rng(20260101)


def mp_batch_norm(x, weight, bias, eps, axis=1):
    """Alg. 1 at 50 digits, written independently of the oracle."""
    R = tuple(a for a in range(x.ndim) if a != axis % x.ndim)
    X = mp_array(x)
    mean = mp_mean(X, R)
    var = mp_var(X, R)
    shape = [1] * x.ndim
    shape[axis] = -1
    return (X - mean) / mp_sqrt(var + mp_array(np.float64(eps))) * mp_array(weight).reshape(shape) \
        + mp_array(bias).reshape(shape)


# --- forward accuracy -------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(ADVERSARIAL))
def test_train_forward_matches_mpmath_on_adversarial_data(family):
    x = adversarial(family, (4, 3, 5))
    weight, bias = 1 + 0.5 * RNG.standard_normal(3), RNG.standard_normal(3)
    # eps scaled to the data so the std term, not eps, dominates (otherwise huge/tiny is trivial).
    eps = 1e-5 if family != "tiny_1e-150" else 1e-310
    eps = max(eps, 1e-300)
    out, _ = OP.apply({"x": x, "weight": weight, "bias": bias}, None, eps=eps)
    err = relative_error(out["y"], mp_batch_norm(x, weight, bias, eps))
    assert err <= 1e-10, f"{family}: relative error {err:.3g}"


def test_plain_two_pass_mean_would_fail_the_offset_family():
    """The accuracy test has teeth: the naive two-pass formula misses 1e-10 on offset data."""
    x = adversarial("offset_1e8_std_1e-3", (4, 3, 5))
    mean = x.mean(axis=(0, 2), keepdims=True)
    naive = (x - mean) / np.sqrt(((x - mean) ** 2).mean(axis=(0, 2), keepdims=True) + 1e-5)
    assert relative_error(naive, mp_batch_norm(x, np.ones(3), np.zeros(3), 1e-5)) > 1e-10


def test_single_value_per_channel():
    x = RNG.standard_normal((1, 3))
    with pytest.raises(ValueError, match="expected more than 1 value per channel when training"):
        OP.apply({"x": x}, None)
    out, state = OP.apply({"x": x, "bias": np.array([1.0, 2.0, 3.0])}, None, single_value="allow")
    np.testing.assert_array_equal(out["y"], [[1.0, 2.0, 3.0]])  # var = 0 -> x_hat = 0 -> y = beta
    # n/max(n-1, 1) = 1: the running var is pulled toward 0 and stays finite (TF CPU behaviour).
    np.testing.assert_allclose(state["running_var"], 0.9 * np.ones(3), rtol=1e-15)


# --- running statistics over several steps ----------------------------------------------------


def _expected_running(batches, momentum, convention, correction):
    """The running-average recurrences written out directly (independent of the oracle)."""
    mean, var = np.zeros(batches[0].shape[1]), np.ones(batches[0].shape[1])
    for k, x in enumerate(batches, start=1):
        n = x.shape[0]
        bm = x.mean(axis=0)
        bv = ((x - bm) ** 2).sum(axis=0) / (n - correction)
        if momentum is None:
            w_new = 1.0 / k
        else:
            w_new = momentum if convention == "new_weight" else 1.0 - momentum
        mean = (1 - w_new) * mean + w_new * bm
        var = (1 - w_new) * var + w_new * bv
    return mean, var


@pytest.mark.parametrize("dialect", ["torch", "flax", "onnx", "paper", "tf_fused"])
def test_running_stats_over_steps_with_train_eval_switch(dialect):
    hp = OP.dialect(dialect)
    hp["axis"] = 1
    batches = [RNG.standard_normal((6, 3)) * (k + 1) + k for k in range(5)]
    state = None
    for k, x in enumerate(batches):
        _, state = OP.apply({"x": x}, state, **hp)
        if k == 2:  # an eval step in the middle must not touch the state
            frozen = {key: np.copy(v) for key, v in state.items()}
            out, state = OP.apply({"x": x}, state, **{**hp, "training": False})
            for key in frozen:
                np.testing.assert_array_equal(state[key], frozen[key])
            inv = 1 / np.sqrt(frozen["running_var"] + hp["eps"])
            np.testing.assert_allclose(out["y"], (x - frozen["running_mean"]) * inv, rtol=1e-14)
    mean, var = _expected_running(
        batches, hp["momentum"], hp["momentum_convention"], hp["running_var_correction"])
    np.testing.assert_allclose(state["running_mean"], mean, rtol=1e-13)
    np.testing.assert_allclose(state["running_var"], var, rtol=1e-13)
    assert float(state["num_batches_tracked"]) == 5


# --- properties -------------------------------------------------------------------------------

shapes = st.tuples(st.integers(2, 5), st.integers(1, 4), st.integers(1, 4))


@pytest.mark.checks("train_invariant_to_positive_channel_affine")
@given(shape=shapes, seed=st.integers(0, 2**32 - 1), log_a=st.floats(-3, 3), b=st.floats(-1e3, 1e3))
def test_train_output_invariant_to_positive_channel_affine(shape, seed, log_a, b):
    """normalizers.md 1.1 (a): BN_train(a_c x + b_c) = BN_train(x) per channel c, a_c > 0, eps -> 0."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    a = 10.0 ** (log_a + 0.1 * rng.standard_normal(shape[1]))
    shift = b + rng.standard_normal(shape[1])  # one shift b_c per channel
    eps = 1e-300  # eps -> 0 makes the invariance exact up to rounding
    y1 = OP.apply({"x": x}, None, eps=eps)[0]["y"]
    y2 = OP.apply({"x": x * a[None, :, None] + shift[None, :, None]}, None, eps=eps)[0]["y"]
    # |b_c|/(a_c std_c) up to ~1e6 is the cancellation condition number of the shifted input.
    cond = 1 + np.max(np.abs(shift) / (a * x.std(axis=(0, 2)).clip(1e-3)))
    np.testing.assert_allclose(y2, y1, atol=1e-13 * cond)


@pytest.mark.checks("train_channel_mean_beta_var_gamma2")
@given(shape=shapes, seed=st.integers(0, 2**32 - 1), eps=st.floats(1e-8, 1.0))
def test_train_channel_mean_is_beta_and_var_is_gamma2_var_over_var_plus_eps(shape, seed, eps):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    w, b = rng.standard_normal(shape[1]), rng.standard_normal(shape[1])
    y = OP.apply({"x": x, "weight": w, "bias": b}, None, eps=eps)[0]["y"]
    var = x.var(axis=(0, 2))
    np.testing.assert_allclose(y.mean(axis=(0, 2)), b, atol=1e-13)
    np.testing.assert_allclose(y.var(axis=(0, 2)), w**2 * var / (var + eps), rtol=1e-10, atol=1e-13)


@pytest.mark.checks("grad_sums_zero_per_channel")
@given(shape=shapes, seed=st.integers(0, 2**32 - 1))
def test_grad_sums_to_zero_per_channel(shape, seed):
    rng = np.random.default_rng(seed)
    x, dy = rng.standard_normal(shape), rng.standard_normal(shape)
    eps = 1e-5
    dx = OP.vjp({"x": x, "weight": np.full(shape[1], 1.7)}, None, {"y": dy}, eps=eps)["x"]
    var = x.var(axis=(0, 2), keepdims=True)
    x_hat = (x - x.mean(axis=(0, 2), keepdims=True)) / np.sqrt(var + eps)
    scale = np.abs(dy).sum() * 1.7 / np.sqrt(var.min() + eps)
    np.testing.assert_allclose(dx.sum(axis=(0, 2)), 0, atol=1e-13 * scale)
    # sum(dx * x_hat) = inv_std * eps/(var+eps) * sum(h * x_hat): zero exactly when eps = 0.
    h_xhat = (1.7 * dy * x_hat).sum(axis=(0, 2), keepdims=True)
    expected = h_xhat * eps / (var + eps) / np.sqrt(var + eps)
    np.testing.assert_allclose((dx * x_hat).sum(axis=(0, 2), keepdims=True), expected,
                               rtol=1e-9, atol=1e-12 * scale)


@pytest.mark.checks("eval_is_affine_map")
@given(seed=st.integers(0, 2**32 - 1))
def test_eval_is_an_affine_map_and_folds_into_a_linear_layer(seed):
    rng = np.random.default_rng(seed)
    x, W, c = rng.standard_normal((5, 4)), rng.standard_normal((3, 4)), rng.standard_normal(3)
    state = {"running_mean": rng.standard_normal(3), "running_var": rng.uniform(0.1, 2, 3),
             "num_batches_tracked": np.float64(7)}
    w, b = rng.standard_normal(3), rng.standard_normal(3)
    y = OP.apply({"x": x @ W.T + c, "weight": w, "bias": b}, state, training=False)[0]["y"]
    s = np.sqrt(state["running_var"] + 1e-5)
    W_fold, c_fold = W * (w / s)[:, None], b + w * (c - state["running_mean"]) / s
    np.testing.assert_allclose(y, x @ W_fold.T + c_fold, rtol=1e-12, atol=1e-12)


# --- PyTorch cross-check (float64, torch dialect) -----------------------------------------------


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(4, 3), (4, 3, 5), (2, 3, 4, 5)])
def test_matches_torch_float64(shape, training):
    torch = torch_or_skip()
    x, w, b = RNG.standard_normal(shape), RNG.standard_normal(shape[1]), RNG.standard_normal(shape[1])
    rm, rv = RNG.standard_normal(shape[1]), RNG.uniform(0.5, 2, shape[1])
    tx, tw, tb = t64(x, True), t64(w, True), t64(b, True)
    trm, trv = t64(rm), t64(rv)
    ty = torch.nn.functional.batch_norm(tx, trm, trv, tw, tb, training=training, momentum=0.1, eps=1e-5)
    state = {"running_mean": rm, "running_var": rv, "num_batches_tracked": np.float64(0)}
    hp = {**OP.dialect("torch"), "training": training}
    out, new_state = OP.apply({"x": x, "weight": w, "bias": b}, state, **hp)
    np.testing.assert_allclose(out["y"], ty.detach().numpy(), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(new_state["running_mean"], trm.numpy(), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(new_state["running_var"], trv.numpy(), rtol=1e-13)
    dy = RNG.standard_normal(shape)
    expected = torch_vjp(ty, {"x": tx, "weight": tw, "bias": tb}, dy)
    grads = OP.vjp({"x": x, "weight": w, "bias": b}, state, {"y": dy}, **hp)
    for key in expected:
        np.testing.assert_allclose(grads[key], expected[key], rtol=1e-11, atol=1e-12, err_msg=key)


def test_cumulative_average_matches_torch_module_momentum_none():
    torch = torch_or_skip()
    module = torch.nn.BatchNorm1d(3, momentum=None, dtype=torch.float64)
    state = None
    for k in range(4):
        x = RNG.standard_normal((5, 3)) + k
        module(t64(x))
        _, state = OP.apply({"x": x}, state, momentum=None)
    np.testing.assert_allclose(state["running_mean"], module.running_mean.numpy(), rtol=1e-13)
    np.testing.assert_allclose(state["running_var"], module.running_var.numpy(), rtol=1e-13)
    assert int(module.num_batches_tracked) == int(state["num_batches_tracked"]) == 4
