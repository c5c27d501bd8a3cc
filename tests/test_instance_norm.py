"""InstanceNorm: forward vs mpmath on adversarial data, running statistics, properties, torch, errors."""

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
    mp_to_float,
    mp_var,
    relative_error,
    t64,
    torch_or_skip,
    torch_vjp,
)

OP = reference.get("instance_norm")
RNG = np.random.default_rng(20260103)


def mp_instance_norm(x, weight, bias, eps, axis=1):
    """Eq. 2 at 50 digits (per sample and channel over the spatial axes), then the affine."""
    axis %= x.ndim
    R = tuple(a for a in range(1, x.ndim) if a != axis)
    X = mp_array(x)
    y = (X - mp_mean(X, R)) / mp_sqrt(mp_var(X, R) + mp_array(np.float64(eps)))
    shape = [1] * x.ndim
    shape[axis] = -1
    return y * mp_array(weight).reshape(shape) + mp_array(bias).reshape(shape)


def _eps_for(family):
    # eps below the data's variance so the std term, not eps, dominates (var ~1e-300 for tiny).
    return 1e-305 if family == "tiny_1e-150" else 1e-5


# --- forward accuracy -------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(ADVERSARIAL))
@pytest.mark.parametrize(("shape", "axis"), [((2, 3, 8), 1), ((2, 3, 2, 4), -1)])
def test_forward_matches_mpmath_on_adversarial_data(family, shape, axis):
    x = adversarial(family, shape)
    c = shape[axis]
    weight, bias = 1 + 0.5 * RNG.standard_normal(c), RNG.standard_normal(c)
    eps = _eps_for(family)
    out, _ = OP.apply({"x": x, "weight": weight, "bias": bias}, None, eps=eps, axis=axis)
    err = relative_error(out["y"], mp_instance_norm(x, weight, bias, eps, axis))
    assert err <= 1e-10, f"{family}: relative error {err:.3g}"


@pytest.mark.parametrize("family", sorted(ADVERSARIAL))
def test_running_stats_match_mpmath_on_adversarial_data(family):
    """One tracked step: mean_n mu_nc and mean_n [n/(n-1) sigma^2_nc] at 50 digits."""
    x = adversarial(family, (3, 2, 5))
    out, state = OP.apply({"x": x}, None, track_running_stats=True, eps=_eps_for(family),
                          momentum=1.0)  # momentum 1: the running stats are the batch stats
    X = mp_array(x)
    mean = mp_mean(mp_mean(X, (2,)), (0,)).reshape(-1)
    var = mp_mean(mp_var(X, (2,), correction=1), (0,)).reshape(-1)
    # Measured <= 5e-16 on every family: a few float64 roundings (two means, the Bessel factor).
    assert relative_error(state["running_mean"], mean) <= 1e-14
    if family != "constant":
        assert relative_error(state["running_var"], var) <= 1e-14
    else:
        np.testing.assert_array_equal(state["running_var"], 0.0)


def test_constant_instances_give_beta_exactly():
    x = np.full((2, 3, 4), -1.25)
    bias = np.array([1.0, 2.0, 3.0])
    y = OP.apply({"x": x, "weight": np.full(3, 2.0), "bias": bias}, None)[0]["y"]
    np.testing.assert_array_equal(y, np.broadcast_to(bias[None, :, None], x.shape))


def test_single_sample_and_single_spatial_element():
    x = RNG.standard_normal((1, 2, 6))
    y = OP.apply({"x": x}, None, eps=1e-300)[0]["y"]
    np.testing.assert_allclose(y.mean(axis=2), 0, atol=1e-15)
    np.testing.assert_allclose(y.var(axis=2), 1, rtol=1e-14)
    x1 = RNG.standard_normal((2, 3, 1))
    for hp in ({}, {"training": False}):  # torch checks whenever instance statistics are used
        with pytest.raises(ValueError, match="expected more than 1 spatial element when training"):
            OP.apply({"x": x1}, None, **hp)
    bias = np.array([1.0, 2.0, 3.0])
    out, state = OP.apply({"x": x1, "bias": bias}, None, single_value="allow",
                          track_running_stats=True)
    np.testing.assert_array_equal(out["y"], np.broadcast_to(bias[None, :, None], x1.shape))
    # Bessel factor n/max(n - 1, 1) = 1 with n = 1: the running var is pulled toward 0, finite.
    np.testing.assert_allclose(state["running_var"], 0.9, rtol=1e-15)
    # Inference with running stats needs no spatial extent: it is BatchNorm inference.
    OP.apply({"x": x1}, state, track_running_stats=True, training=False)


# --- running statistics over several steps ----------------------------------------------------


def _expected_running(batches, momentum, convention, correction):
    """The recurrences written out: per-instance stats over L, averaged over the batch."""
    c = batches[0].shape[1]
    mean, var = np.zeros(c), np.ones(c)
    for k, x in enumerate(batches, start=1):
        n = x.shape[2]
        mu = x.mean(axis=2)                                           # (N, C)
        s2 = ((x - mu[:, :, None]) ** 2).sum(axis=2) / (n - correction)
        bm, bv = mu.mean(axis=0), s2.mean(axis=0)
        if momentum is None:
            w_new = 1.0 / k
        else:
            w_new = momentum if convention == "new_weight" else 1.0 - momentum
        mean = (1 - w_new) * mean + w_new * bm
        var = (1 - w_new) * var + w_new * bv
    return mean, var


@pytest.mark.parametrize("hp", [
    {},                                                                       # torch
    {"momentum": None},                                                       # cumulative
    {"momentum": 0.9, "momentum_convention": "old_weight", "running_var_correction": 0},
])
def test_running_stats_over_steps_with_train_eval_switch(hp):
    hp = {**hp, "track_running_stats": True}
    full = OP.spec.resolve(hp)
    batches = [RNG.standard_normal((3, 2, 5)) * (k + 1) + k for k in range(5)]
    state = None
    for k, x in enumerate(batches):
        _, state = OP.apply({"x": x}, state, **hp)
        if k == 2:  # an eval step in the middle must not touch the state and uses it
            frozen = {key: np.copy(v) for key, v in state.items()}
            out, state = OP.apply({"x": x}, state, **{**hp, "training": False})
            for key in frozen:
                np.testing.assert_array_equal(state[key], frozen[key])
            inv = 1 / np.sqrt(frozen["running_var"][None, :, None] + full["eps"])
            np.testing.assert_allclose(out["y"], (x - frozen["running_mean"][None, :, None]) * inv,
                                       rtol=1e-14)
    mean, var = _expected_running(batches, full["momentum"], full["momentum_convention"],
                                  full["running_var_correction"])
    np.testing.assert_allclose(state["running_mean"], mean, rtol=1e-13)
    np.testing.assert_allclose(state["running_var"], var, rtol=1e-13)
    assert float(state["num_batches_tracked"]) == 5


def test_untracked_has_no_state_and_eval_equals_train():
    x = RNG.standard_normal((2, 3, 4))
    out_t, state_t = OP.apply({"x": x}, None)
    out_e, state_e = OP.apply({"x": x}, None, training=False)
    assert state_t == state_e == {}
    np.testing.assert_array_equal(out_t["y"], out_e["y"])


# --- properties -------------------------------------------------------------------------------

shapes = st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(2, 6))


@given(shape=shapes, seed=st.integers(0, 2**32 - 1), log_a=st.floats(-3, 3), b=st.floats(-1e3, 1e3))
def test_invariant_to_positive_per_instance_affine(shape, seed, log_a, b):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    a = 10.0 ** (log_a + 0.1 * rng.standard_normal(shape[:2]))[:, :, None]
    shift = (b + rng.standard_normal(shape[:2]))[:, :, None]
    eps = 1e-300  # eps -> 0 makes the invariance exact up to rounding
    y1 = OP.apply({"x": x}, None, eps=eps)[0]["y"]
    y2 = OP.apply({"x": x * a + shift}, None, eps=eps)[0]["y"]
    # |shift|/(a std) is the cancellation condition number of the shifted input (std floored:
    # two standard-normal values can nearly coincide).
    cond = 1 + np.max(np.abs(shift) / (a * x.std(axis=2, keepdims=True).clip(1e-3)))
    np.testing.assert_allclose(y2, y1, atol=1e-13 * cond)


@pytest.mark.checks("instance_mean_beta_var_gamma2_var_over_var_plus_eps")
@given(shape=shapes, seed=st.integers(0, 2**32 - 1), eps=st.floats(1e-8, 1.0))
def test_instance_mean_is_beta_and_var_is_gamma2_var_over_var_plus_eps(shape, seed, eps):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    w, b = rng.standard_normal(shape[1]), rng.standard_normal(shape[1])
    y = OP.apply({"x": x, "weight": w, "bias": b}, None, eps=eps)[0]["y"]
    var = x.var(axis=2)
    np.testing.assert_allclose(y.mean(axis=2), np.broadcast_to(b, shape[:2]), atol=1e-13)
    np.testing.assert_allclose(y.var(axis=2), w**2 * var / (var + eps), rtol=1e-10, atol=1e-13)


@given(shape=shapes, seed=st.integers(0, 2**32 - 1))
def test_batch_size_independent(shape, seed):
    rng = np.random.default_rng(seed)
    x, w, b = rng.standard_normal(shape), rng.standard_normal(shape[1]), rng.standard_normal(shape[1])
    y = OP.apply({"x": x, "weight": w, "bias": b}, None)[0]["y"]
    for i in range(shape[0]):
        yi = OP.apply({"x": x[i:i + 1], "weight": w, "bias": b}, None)[0]["y"]
        # Same operations on the same values; only the summation order may differ (a few ulps).
        np.testing.assert_allclose(yi[0], y[i], rtol=0, atol=1e-14 * (1 + np.abs(y).max()))


@pytest.mark.checks("grad_sums_zero_per_instance")
@given(shape=shapes, seed=st.integers(0, 2**32 - 1))
def test_grad_sums_to_zero_per_instance(shape, seed):
    rng = np.random.default_rng(seed)
    x, dy, w = rng.standard_normal(shape), rng.standard_normal(shape), rng.standard_normal(shape[1])
    eps = 1e-5
    dx = OP.vjp({"x": x, "weight": w}, None, {"y": dy}, eps=eps)["x"]
    var = x.var(axis=2)
    # Each of the n terms is at most |h| inv_std (1 + |x_hat|^2): bound the rounding by their sum.
    scale = np.abs(dy * w[:, None]).sum() * 3 / np.sqrt(var.min() + eps)
    np.testing.assert_allclose(dx.sum(axis=2), 0, atol=1e-14 * scale)


@given(seed=st.integers(0, 2**32 - 1))
def test_tracked_eval_is_batch_norm_eval(seed):
    """pytorch#58843: with running stats, inference is BatchNorm inference (outputs and grads)."""
    if "batch_norm" not in reference.ops():
        pytest.skip("batch_norm is not registered")
    bn = reference.get("batch_norm")
    rng = np.random.default_rng(seed)
    x, dy = rng.standard_normal((3, 4, 5)), rng.standard_normal((3, 4, 5))
    inputs = {"x": x, "weight": rng.standard_normal(4), "bias": rng.standard_normal(4)}
    state = {"running_mean": rng.standard_normal(4), "running_var": rng.uniform(0.1, 2, 4),
             "num_batches_tracked": np.float64(3)}
    hp = {"training": False, "track_running_stats": True, "eps": 1e-5}
    y_in, s_in = OP.apply(inputs, state, **hp)
    y_bn, _ = bn.apply(inputs, state, **hp)
    np.testing.assert_array_equal(y_in["y"], y_bn["y"])
    for key in state:
        np.testing.assert_array_equal(s_in[key], state[key])
    g_in, g_bn = OP.vjp(inputs, state, {"y": dy}, **hp), bn.vjp(inputs, state, {"y": dy}, **hp)
    for key in g_bn:
        np.testing.assert_allclose(g_in[key], g_bn[key], rtol=1e-14, atol=1e-15, err_msg=key)


# --- PyTorch cross-check (float64, torch dialect) -----------------------------------------------


@pytest.mark.parametrize("tracked", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(4, 3, 5), (2, 3, 4, 5), (2, 2, 3, 2, 2)])
def test_matches_torch_float64(shape, training, tracked):
    torch = torch_or_skip()
    c = shape[1]
    x, w, b = RNG.standard_normal(shape), RNG.standard_normal(c), RNG.standard_normal(c)
    rm, rv = RNG.standard_normal(c), RNG.uniform(0.5, 2, c)
    tx, tw, tb = t64(x, True), t64(w, True), t64(b, True)
    trm, trv = (t64(rm), t64(rv)) if tracked else (None, None)
    ty = torch.nn.functional.instance_norm(
        tx, trm, trv, tw, tb, use_input_stats=training or not tracked, momentum=0.1, eps=1e-5)
    state = {"running_mean": rm, "running_var": rv, "num_batches_tracked": np.float64(0)} \
        if tracked else None
    hp = {**OP.dialect("torch"), "training": training, "track_running_stats": tracked}
    out, new_state = OP.apply({"x": x, "weight": w, "bias": b}, state, **hp)
    np.testing.assert_allclose(out["y"], ty.detach().numpy(), rtol=1e-12, atol=1e-13)
    if tracked:
        np.testing.assert_allclose(new_state["running_mean"], trm.numpy(), rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(new_state["running_var"], trv.numpy(), rtol=1e-13)
    dy = RNG.standard_normal(shape)
    expected = torch_vjp(ty, {"x": tx, "weight": tw, "bias": tb}, dy)
    grads = OP.vjp({"x": x, "weight": w, "bias": b}, state, {"y": dy}, **hp)
    for key in expected:
        np.testing.assert_allclose(grads[key], expected[key], rtol=1e-11, atol=1e-12, err_msg=key)


def test_multi_step_matches_torch_module_with_train_eval_train_switch():
    torch = torch_or_skip()
    c = 3
    module = torch.nn.InstanceNorm2d(c, affine=True, track_running_stats=True, momentum=0.2,
                                     dtype=torch.float64)
    with torch.no_grad():
        module.weight.copy_(t64(RNG.standard_normal(c)))
        module.bias.copy_(t64(RNG.standard_normal(c)))
    w, b = module.weight.detach().numpy().copy(), module.bias.detach().numpy().copy()
    hp = {**OP.dialect("torch"), "momentum": 0.2, "track_running_stats": True}
    state = None
    for step, training in enumerate([True, True, False, True, False, True]):
        module.train(training)
        x, dy = RNG.standard_normal((2, c, 3, 4)) * (step + 1) + step, RNG.standard_normal((2, c, 3, 4))
        tx = t64(x, True)
        ty = module(tx)
        expected = torch_vjp(ty, {"x": tx, "weight": module.weight, "bias": module.bias}, dy)
        grads = OP.vjp({"x": x, "weight": w, "bias": b}, state, {"y": dy},
                       **{**hp, "training": training})
        out, state = OP.apply({"x": x, "weight": w, "bias": b}, state,
                              **{**hp, "training": training})
        np.testing.assert_allclose(out["y"], ty.detach().numpy(), rtol=1e-12, atol=1e-12,
                                   err_msg=f"step {step}")
        np.testing.assert_allclose(state["running_mean"], module.running_mean.numpy(), rtol=1e-13,
                                   atol=1e-15, err_msg=f"step {step}")
        np.testing.assert_allclose(state["running_var"], module.running_var.numpy(), rtol=1e-13,
                                   err_msg=f"step {step}")
        for key in expected:
            np.testing.assert_allclose(grads[key], expected[key], rtol=1e-11, atol=1e-12,
                                       err_msg=f"step {step} {key}")
    # Four training steps; torch's InstanceNorm keeps num_batches_tracked at 0 (see spec notes).
    assert float(state["num_batches_tracked"]) == 4
    assert int(module.num_batches_tracked) == 0


def test_torch_module_momentum_none_freezes_running_stats():
    """nn.InstanceNorm*d(momentum=None) passes momentum 0.0: reproduced by momentum=0.0, not None."""
    torch = torch_or_skip()
    module = torch.nn.InstanceNorm1d(3, track_running_stats=True, momentum=None, dtype=torch.float64)
    state = None
    for k in range(3):
        x = RNG.standard_normal((4, 3, 5)) + k
        module(t64(x))
        _, state = OP.apply({"x": x}, state, track_running_stats=True, momentum=0.0)
    np.testing.assert_array_equal(state["running_mean"], module.running_mean.numpy())
    np.testing.assert_array_equal(state["running_var"], module.running_var.numpy())


def test_mp_helper_is_independent_of_the_oracle():
    """Guard the reference itself: mean 0 and variance 1 (at eps -> 0) at 50 digits."""
    x = RNG.standard_normal((2, 2, 5))
    y = mp_instance_norm(x, np.ones(2), np.zeros(2), 1e-300)
    assert np.abs(mp_to_float(mp_mean(y, (2,)))).max() < 1e-30
