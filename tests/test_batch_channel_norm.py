"""Batch-Channel Normalization: forward and estimates vs mpmath on adversarial data, the
composition with batch_norm / group_norm, EstBN's estimates, the backward (exact where no estimate
moves, no gradient through the estimates where they do), the official classes restated in float64
torch over train/eval calls, bad input, and two harness mutants."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reference
from conformance import check_vjp
from conformance.cases import ADVERSARIAL, adversarial
from helpers import (
    MIN_FLAGGED,
    assert_vjp,
    flagged_cases,
    mp_array,
    mp_mean,
    mp_sqrt,
    mp_var,
    relative_error,
    run_mutant,
    t64,
    torch_or_skip,
    verdict_table,
)
from mutants import Control, Mutant

OP = reference.get("batch_channel_norm")
BN = reference.get("batch_norm")
GN = reference.get("group_norm")
RNG = np.random.default_rng(20260711)


def _inputs(rng, shape, groups, affine="per_group", scale=1.0, offset=0.0):
    c = shape[1]
    k = groups if affine == "per_group" else c
    return {"x": offset + scale * rng.standard_normal(shape), "bn_weight": 1 + 0.5 * rng.standard_normal(c),
            "bn_bias": rng.standard_normal(c), "weight": 1 + 0.5 * rng.standard_normal(k),
            "bias": rng.standard_normal(k)}


def _state(rng, c):
    return {"running_mean": rng.standard_normal(c), "running_var": 0.5 + rng.random(c),
            "num_batches_tracked": np.float64(3.0)}


def _channel(v, ndim):
    return np.asarray(v).reshape((1, -1) + (1,) * (ndim - 2))


# --- forward accuracy -------------------------------------------------------------------------


def mp_bcn(x, a, mean_used, var_used, bn_eps, eps, groups):
    """BN step then the channel step at 50 digits, NCHW, per-group affine, written from the
    equations (independent of the oracle); ``mean_used`` None: batch statistics."""
    R = tuple(a_ for a_ in range(x.ndim) if a_ != 1)
    X = mp_array(x)
    if mean_used is None:
        mean_used, var_used = mp_mean(X, R), mp_var(X, R)
    z = (X - mean_used) / mp_sqrt(var_used + mp_array(np.float64(bn_eps)))
    z = z * _channel(mp_array(a["bn_weight"]), x.ndim) + _channel(mp_array(a["bn_bias"]), x.ndim)
    n, c = x.shape[:2]
    zg = z.reshape(n, groups, -1)
    y = (zg - mp_mean(zg, (2,))) / mp_sqrt(mp_var(zg, (2,)) + mp_array(np.float64(eps)))
    y = y * mp_array(a["weight"]).reshape(1, -1, 1) + mp_array(a["bias"]).reshape(1, -1, 1)
    return y.reshape(x.shape)


def mp_estimates(x, rm, rv, r):
    """EstBN's update at 50 digits: the mean, and the variance around the old estimate."""
    R = tuple(a for a in range(x.ndim) if a != 1)
    X, old = mp_array(x), _channel(mp_array(rm), x.ndim)
    mean = mp_mean(X, R)
    v_b = mp_mean((X - old) * (X - old), R)
    r = mp_array(np.float64(r))
    return (1 - r) * old + r * mean, (1 - r) * _channel(mp_array(rv), x.ndim) + r * v_b


def _eps_for(values, axes):
    """eps = 1e-3 of the typical variance over ``axes``, so the spread (not eps) dominates the
    denominator on every scale (1e-5 for the default where the values are constant)."""
    var = float(np.mean(np.var(values, axis=axes)))
    return 1e-3 * var if var > 0 else 1e-5


def _channel_eps(a, state, groups, **hp):
    """The channel step's eps scaled to the spread of z in its groups (z from the registered
    batch_norm: the batch statistics, or the statistics in ``state``)."""
    bn_in = {"x": a["x"], "weight": a["bn_weight"], "bias": a["bn_bias"]}
    z = BN.apply(bn_in, state, **hp)[0]["y"]
    return _eps_for(z.reshape(z.shape[0], groups, -1), (2,))


@pytest.mark.parametrize("groups", [2, 4])
@pytest.mark.parametrize("mode", ["estimated", "batch", "eval"])
@pytest.mark.parametrize("family", sorted(ADVERSARIAL))
def test_forward_and_estimates_match_mpmath_on_adversarial_data(family, mode, groups):
    """y and the estimates to 1e-10 relative against 50 digits, both eps scaled to the spread they
    divide (of x, of z), so that nothing hides behind eps; groups = 4 puts one channel in each
    group, where an offset rounded into z would cost 1e-5 on the offset family."""
    x = adversarial(family, (3, 4, 5))
    a = {**_inputs(RNG, (3, 4, 5), groups), "x": x}
    r = 0.3
    hp = {"num_groups": groups, "bn_eps": _eps_for(x, (0, 2)), "momentum": r}
    state = None
    if mode == "eval":  # estimates from one earlier step on the same data
        _, state = OP.apply(a, None, **hp)
    mode_hp = {"bn_statistics": "batch" if mode == "batch" else "estimated", "training": mode != "eval"}
    _, new = OP.apply(a, state, **hp, **mode_hp)
    used = new if mode != "batch" else None
    hp["eps"] = _channel_eps(a, used, groups, training=used is None, eps=hp["bn_eps"])
    out, _ = OP.apply(a, state, **hp, **mode_hp)
    if mode == "batch":
        exact = mp_bcn(x, a, None, None, hp["bn_eps"], hp["eps"], groups)
    else:
        if mode == "estimated":
            m, v = mp_estimates(x, np.zeros(4), np.ones(4), r)
            assert relative_error(new["running_mean"], m.reshape(-1)) <= 1e-14
            assert relative_error(new["running_var"], v.reshape(-1)) <= 1e-14
        else:
            m, v = _channel(mp_array(state["running_mean"]), 3), _channel(mp_array(state["running_var"]), 3)
        exact = mp_bcn(x, a, m, v, hp["bn_eps"], hp["eps"], groups)
    err = relative_error(out["y"], exact)
    assert err <= 1e-10, f"{family}, {mode}, G={groups}: relative error {err:.3g}"


def test_plain_composition_would_fail_the_offset_family():
    """The accuracy test has teeth: batch_norm's inference map followed by group_norm, each exact
    on its own, loses 1e-5 on offset data normalized by estimates, with one channel per group."""
    x = adversarial("offset_1e8_std_1e-3", (3, 4, 5))
    a = {**_inputs(RNG, (3, 4, 5), 4), "x": x}
    hp = {"num_groups": 4, "bn_eps": 1e-9, "momentum": 0.3}
    _, new = OP.apply(a, None, **hp)
    hp["eps"] = _channel_eps(a, new, 4, training=False, eps=1e-9)
    z, _ = BN.apply({"x": x, "weight": a["bn_weight"], "bias": a["bn_bias"]}, new, training=False, eps=1e-9)
    plain = GN.apply({"x": z["y"], "weight": a["weight"], "bias": a["bias"]}, None, num_groups=4,
                     affine="per_group", eps=hp["eps"])[0]["y"]
    m, v = mp_estimates(x, np.zeros(4), np.ones(4), 0.3)
    exact = mp_bcn(x, a, m, v, 1e-9, hp["eps"], 4)
    assert relative_error(plain, exact) > 1e-8
    assert relative_error(OP.apply(a, None, **hp)[0]["y"], exact) <= 1e-10


# --- properties -------------------------------------------------------------------------------


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 4), groups=st.sampled_from([1, 2, 3, 6]),
       mode=st.sampled_from(["estimated", "batch"]), training=st.booleans(),
       affine=st.sampled_from(["per_group", "per_channel"]))
def test_is_group_norm_of_batch_norm(seed, n, groups, mode, training, affine):
    """y = group_norm(batch_norm(x)) with the registered ops: batch_norm with batch statistics
    (nn.BatchNorm2d in training) or its inference map at the statistics this step uses (the
    updated estimates: EstBN)."""
    rng = np.random.default_rng(seed)
    a = _inputs(rng, (n, 6, 3), groups, affine, scale=2.0, offset=1.0)
    state = _state(rng, 6)
    hp = {"num_groups": groups, "affine": affine, "bn_statistics": mode, "training": training, "momentum": 0.2}
    out, new = OP.apply(a, state, **hp)
    bn_in = {"x": a["x"], "weight": a["bn_weight"], "bias": a["bn_bias"]}
    if mode == "batch":
        z, bn_state = BN.apply(bn_in, state, training=training, momentum=0.2)
        for k in bn_state:
            np.testing.assert_allclose(new[k], bn_state[k], rtol=1e-15)
    else:
        z, _ = BN.apply(bn_in, new, training=False)
    y, _ = GN.apply({"x": z["y"], "weight": a["weight"], "bias": a["bias"]}, None, num_groups=groups, affine=affine)
    np.testing.assert_allclose(out["y"], y["y"], rtol=1e-12, atol=1e-13)


@given(seed=st.integers(0, 2**32 - 1), r=st.floats(0.0, 1.0), n=st.integers(1, 3))
def test_estimated_variance_is_around_the_old_mean(seed, r, n):
    """EstBN's variance is mean (x - mu_hat_old)^2 = var_B + (mu_B - mu_hat_old)^2 (not the batch
    variance): the estimate follows it with weight r."""
    rng = np.random.default_rng(seed)
    a = _inputs(rng, (n, 4, 5), 2, offset=3.0)
    state = _state(rng, 4)
    _, new = OP.apply(a, state, num_groups=2, momentum=r)
    mu_b, var_b = a["x"].mean(axis=(0, 2)), a["x"].var(axis=(0, 2))
    around_old = var_b + (mu_b - state["running_mean"]) ** 2
    np.testing.assert_allclose(new["running_mean"], (1 - r) * state["running_mean"] + r * mu_b, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(new["running_var"], (1 - r) * state["running_var"] + r * around_old, rtol=1e-13)


@given(seed=st.integers(0, 2**32 - 1), r=st.floats(0.01, 1.0), steps=st.integers(1, 5))
def test_estimates_follow_their_recurrence(seed, r, steps):
    """k training calls: mu_hat_k = (1 - r)^k mu_0 + sum_j r (1 - r)^(k - j) mu_j (a linear
    recurrence), var_hat with each step's variance around the estimate before it; evaluation
    calls change nothing; the estimated form never advances the counter, the batch form does."""
    rng = np.random.default_rng(seed)
    batches = [_inputs(rng, (2, 4, 3), 2, offset=j)["x"] for j in range(steps)]
    params = _inputs(rng, (2, 4, 3), 2)
    state, est = None, None
    mean, var = np.zeros(4), np.ones(4)
    closed = np.zeros(4)
    for j, x in enumerate(batches):
        a = {**params, "x": x}
        _, state = OP.apply(a, state, num_groups=2, momentum=r)
        _, frozen = OP.apply(a, state, num_groups=2, momentum=r, training=False)
        assert all(np.array_equal(frozen[k], state[k]) for k in state)
        mu_b = x.mean(axis=(0, 2))
        var = (1 - r) * var + r * ((x - mean[None, :, None]) ** 2).mean(axis=(0, 2))
        mean = (1 - r) * mean + r * mu_b
        closed = closed + r * (1 - r) ** (steps - 1 - j) * mu_b
        _, est = OP.apply(a, est, num_groups=2, momentum=r, bn_statistics="batch")
    np.testing.assert_allclose(state["running_mean"], mean, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(state["running_mean"], closed, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(state["running_var"], var, rtol=1e-12)
    assert float(state["num_batches_tracked"]) == 0.0 and float(est["num_batches_tracked"]) == steps


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 3))
def test_zero_moving_speed_is_the_eval_map(seed, n):
    """r = 0 (the official buffer's initial value): the estimates never move, and training
    computes the inference map bit for bit."""
    rng = np.random.default_rng(seed)
    a, state = _inputs(rng, (n, 4, 3), 2), _state(rng, 4)
    out, new = OP.apply(a, state, num_groups=2, momentum=0.0)
    ev, _ = OP.apply(a, state, num_groups=2, momentum=0.0, training=False)
    assert all(np.array_equal(new[k], state[k]) for k in state)
    np.testing.assert_array_equal(out["y"], ev["y"])


@given(seed=st.integers(0, 2**32 - 1), k=st.lists(st.integers(-8, 8), min_size=4, max_size=4))
def test_batch_statistics_invariant_to_positive_channel_affine(seed, k):
    """With batch statistics, x -> a_c x + b_c (a_c = 2^k_c > 0) leaves y unchanged (BN's
    invariance; eps scaled with a_c^2 so it is exact in real arithmetic)."""
    rng = np.random.default_rng(seed)
    a = _inputs(rng, (3, 4, 5), 2)
    scale = 2.0 ** np.array(k, dtype=np.float64)
    out, _ = OP.apply(a, None, num_groups=2, bn_statistics="batch", bn_eps=1e-300)
    moved = {**a, "x": a["x"] * _channel(scale, 3) + _channel(rng.standard_normal(4), 3)}
    out2, _ = OP.apply(moved, None, num_groups=2, bn_statistics="batch", bn_eps=1e-300)
    np.testing.assert_allclose(out2["y"], out["y"], rtol=1e-11, atol=1e-11)


@given(seed=st.integers(0, 2**32 - 1), mode=st.sampled_from(["estimated", "batch"]),
       groups=st.sampled_from([1, 2, 4]), eps=st.sampled_from([1e-5, 0.5]))
def test_each_sample_group_is_standardized(seed, mode, groups, eps):
    """Without the channel step's affine, every (sample, group) of y has mean 0 and variance
    v / (v + eps), v the variance of the BN output z over it (GroupNorm's Eqs. 1-2)."""
    rng = np.random.default_rng(seed)
    a = _inputs(rng, (3, 4, 5), groups)
    del a["weight"], a["bias"]
    state = _state(rng, 4)
    out, new = OP.apply(a, state, num_groups=groups, bn_statistics=mode, eps=eps)
    bn_in = {"x": a["x"], "weight": a["bn_weight"], "bias": a["bn_bias"]}
    z = BN.apply(bn_in, state if mode == "batch" else new, training=mode == "batch")[0]["y"]
    v = z.reshape(3, groups, -1).var(axis=2)
    yg = out["y"].reshape(3, groups, -1)
    np.testing.assert_allclose(yg.mean(axis=2), 0.0, atol=1e-14)
    np.testing.assert_allclose(yg.var(axis=2), v / (v + eps), rtol=1e-12)


# --- backward ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [
    {"bn_statistics": "batch"},
    {"bn_statistics": "batch", "training": False},
    {"bn_statistics": "estimated", "training": False},
    {"bn_statistics": "estimated", "momentum": 0.0},
    {"bn_statistics": "batch", "affine": "per_channel"},
], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_backward_is_exact_where_no_estimate_moves(case):
    """Batch statistics, inference, or r = 0: the statistics either are the batch's (and BN's VJP
    differentiates through them) or do not depend on x: the VJP is the true gradient (finite
    differences, 1e-8), for x and all four affine parameters."""
    affine = case.get("affine", "per_group")
    a = _inputs(RNG, (3, 4, 2, 2), 2, affine, scale=1.5, offset=0.5)
    assert_vjp("batch_channel_norm", a, _state(RNG, 4), rtol=1e-8, num_groups=2, **case)


def test_estimated_statistics_carry_no_gradient():
    """In training with r > 0 the VJP is the gradient of the inference map at the updated
    estimates (torch.no_grad in EstBN): equal to it, and it passes finite differences of that map,
    not of the training forward (whose estimates move with x)."""
    a, state = _inputs(RNG, (2, 4, 3), 2, scale=1.5, offset=0.5), _state(RNG, 4)
    hp = {"num_groups": 2, "momentum": 0.4}
    _, new = OP.apply(a, state, **hp)
    ct = {"y": RNG.standard_normal(a["x"].shape)}
    train = OP.vjp(a, state, ct, **hp)
    frozen = OP.vjp(a, new, ct, training=False, **hp)
    for k in train:
        np.testing.assert_allclose(train[k], frozen[k], rtol=1e-14, atol=1e-15)
    assert_vjp("batch_channel_norm", a, new, rtol=1e-8, training=False, **hp)

    def forward(x):
        return {"y": OP.apply({**a, **x}, state, **hp)[0]["y"]}

    def vjp(x, u):
        return {"x": OP.vjp({**a, **x}, state, u, **hp)["x"]}

    true_gradient = check_vjp(forward, vjp, {"x": a["x"]}, rtol=1e-8, raise_on_failure=False)
    assert true_gradient.max_relative_error > 1e-3


# --- the official classes, restated in float64 torch ------------------------------------------


def _torch_bcn(torch, x, p, buffers, *, mode, training, groups, r, eps=1e-5):
    """README BCNorm / EstBN and imagenet GN, from their equations: the batch step (EstBN under
    no_grad, or F.batch_norm as nn.BatchNorm2d), then torch.batch_norm on the (1, N*G, -1) view in
    training mode and the (1, G, 1) affine."""
    F = torch.nn.functional
    n, c = x.shape[:2]
    if mode == "estimated":
        if training:
            with torch.no_grad():
                flat = x.transpose(0, 1).reshape(c, -1)
                mean = flat.mean(dim=1)
                var = ((flat - buffers["running_mean"][:, None]) ** 2).mean(dim=1)
                buffers["running_mean"] = (1 - r) * buffers["running_mean"] + r * mean
                buffers["running_var"] = (1 - r) * buffers["running_var"] + r * var
        view = (1, -1) + (1,) * (x.ndim - 2)
        z = (x - buffers["running_mean"].view(view)) / torch.sqrt(buffers["running_var"] + 1e-5).view(view)
        z = p["bn_weight"].view(view) * z + p["bn_bias"].view(view)
    else:
        z = F.batch_norm(x, buffers["running_mean"], buffers["running_var"], p["bn_weight"], p["bn_bias"],
                         training, r, 1e-5)
        if training:
            buffers["num_batches_tracked"] += 1
    out = torch.batch_norm(z.reshape(1, n * groups, -1), None, None, None, None, True, 0.0, eps, False)
    out = out.view(n, groups, -1) * p["weight"].view(1, groups, 1) + p["bias"].view(1, groups, 1)
    return out.view_as(x)


@pytest.mark.parametrize("mode", ["estimated", "batch"])
def test_official_modules_match(mode):
    """Five calls (train, train, eval, train, eval) of the official forms in float64 torch autograd
    against the oracle carrying its own state: y, every gradient and the buffers to 1e-13.  (The
    README and imagenet/models/layers.py classes themselves agree with the oracle to 2.3e-15 over
    the same protocol.)"""
    torch = torch_or_skip()
    groups, r = 2, 0.3
    p = {k: v for k, v in _inputs(RNG, (2, 4, 3, 3), groups).items() if k != "x"}
    tp = {k: t64(v, requires_grad=True) for k, v in p.items()}
    buffers = {"running_mean": t64(np.zeros(4)), "running_var": t64(np.ones(4)), "num_batches_tracked": 0}
    state = None
    hp = {"num_groups": groups, "momentum": r, "bn_statistics": mode}
    for training in (True, True, False, True, False):
        x = 3.0 + 2.0 * RNG.standard_normal((2, 4, 3, 3))
        xt = t64(x, requires_grad=True)
        y = _torch_bcn(torch, xt, tp, buffers, mode=mode, training=training, groups=groups, r=r)
        dy = RNG.standard_normal(x.shape)
        grads = torch.autograd.grad(y, [xt, *tp.values()], t64(dy))
        out, new = OP.apply({**p, "x": x}, state, training=training, **hp)
        mine = OP.vjp({**p, "x": x}, state, {"y": dy}, training=training, **hp)
        state = new
        np.testing.assert_allclose(out["y"], y.detach().numpy(), rtol=1e-13, atol=1e-13)
        for k, g in zip(["x", *tp], grads, strict=True):
            np.testing.assert_allclose(mine[k], g.numpy(), rtol=1e-12, atol=1e-12, err_msg=k)
        for k in ("running_mean", "running_var"):
            np.testing.assert_allclose(state[k], buffers[k].numpy(), rtol=1e-14, err_msg=k)
        assert float(state["num_batches_tracked"]) == buffers["num_batches_tracked"]


# --- the harness flags plausible mistakes -------------------------------------------------------


class _Bcn(Mutant):
    op = "batch_channel_norm"
    dtypes = ("float64",)  # the mistakes do not depend on the rounding


class EstimatedVarianceAroundBatchMean(_Bcn):
    """EstBN's variance taken around the batch mean (the usual biased batch variance) instead of
    around the estimate before the update: the estimates and y differ wherever mu_B != mu_hat."""

    def forward(self, a, hp):
        if hp["bn_statistics"] != "estimated" or not hp["training"]:
            return self.oracle(a, hp)
        x, r, axis = a["x"], hp["momentum"], hp["axis"] % a["x"].ndim
        R = tuple(i for i in range(x.ndim) if i != axis)
        mean = (1 - r) * a["running_mean"] + r * x.mean(axis=R)
        var = (1 - r) * a["running_var"] + r * x.var(axis=R)  # the mistake
        out, _ = self.oracle({**a, "running_mean": mean, "running_var": var}, {**hp, "training": False})
        return out, {"running_mean": mean, "running_var": var, "num_batches_tracked": a["num_batches_tracked"]}


@pytest.mark.parametrize("cls", [EstimatedVarianceAroundBatchMean], ids=lambda c: c.__name__)
def test_mutants_are_flagged(cls):
    flagged, results = flagged_cases(cls())
    assert flagged >= MIN_FLAGGED, f"{cls.__name__} flagged by {flagged} cases:\n{verdict_table(results)}"


def test_the_unmutated_control_is_not_flagged():
    """The mutants' plumbing without a mistake: no FAIL, ERROR or CONVENTION."""
    _, results = run_mutant(Control(_Bcn.op, _Bcn.dialect, _Bcn.dtypes))
    flagged = [r for r in results if r.verdict in ("FAIL", "ERROR", "CONVENTION")]
    assert not flagged, verdict_table(flagged)
