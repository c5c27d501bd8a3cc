"""EvoNorm (B0/B1/B2, S0/S1/S2): forward vs mpmath on adversarial data, properties, the max's tie
convention, the moving variance, and the timm / official TF forms transcribed in torch ops."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import reference
from conformance.cases import ADVERSARIAL, adversarial, default_cases
from helpers import (
    assert_vjp,
    mp,
    mp_array,
    mp_mean,
    mp_sqrt,
    mp_var,
    relative_error,
    t64,
    torch_or_skip,
    torch_vjp,
)
from reference.normalizers import evo_norm as E

OP = reference.get("evo_norm")
RNG = np.random.default_rng(20260215)


def run(inputs, state=None, **hp):
    out, new_state = OP.apply({k: v for k, v in inputs.items() if v is not None}, state, **hp)
    return out["y"], new_state


def grads(inputs, dy, state=None, **hp):
    return OP.vjp({k: v for k, v in inputs.items() if v is not None}, state, {"y": dy}, **hp)


# --- an independent 50-digit reference ----------------------------------------------------------


def mp_evo_norm(x, weight, bias, v, running_var, *, variant, training=True, nonlinearity=True,
                keep_denominator=False, eps, groups=1):
    """The module docstring's formulas at 50 digits on NCHW / NCL data (channel axis 1)."""
    mpmath = mp()
    n, c = x.shape[:2]
    X = mp_array(x).reshape(n, c, -1)
    e = mpmath.mpf(float(eps))
    one = mpmath.mpf(1)
    V = mp_array(np.ones(c) if v is None else v).reshape(1, c, 1)
    if variant.startswith("b"):
        if not nonlinearity:
            Z = X
        else:
            if training:
                left = mp_sqrt(mp_var(X, (0, 2)) + e)
            else:
                left = mp_sqrt(mp_array(running_var).reshape(1, c, 1) + e)
            if variant == "b0":
                right = V * X + mp_sqrt(mp_var(X, (2,)) + e)
            else:
                q = mp_sqrt(mp_mean(X * X, (2,)) + e)
                right = (X + one) * q if variant == "b1" else q - X
            Z = X / np.maximum(np.broadcast_to(left, X.shape), right)
    else:
        Xg = X.reshape(n, groups, c // groups, -1)
        if variant == "s2":
            den = mp_sqrt(mp_mean(Xg * Xg, (2, 3)) + e)
        else:
            den = mp_sqrt(mp_var(Xg, (2, 3)) + e)
        if nonlinearity:
            t = (V.reshape(1, groups, c // groups, 1) if variant == "s0" else one) * Xg
            sig = np.vectorize(lambda s: one / (one + mpmath.exp(-s)), otypes=[object])(t)
            Z = (Xg * sig / den).reshape(X.shape)
        elif keep_denominator:
            Z = (Xg / den).reshape(X.shape)
        else:
            Z = X
    Y = Z * mp_array(weight).reshape(1, c, 1) + mp_array(bias).reshape(1, c, 1)
    return Y.reshape(x.shape)


# --- forward accuracy -------------------------------------------------------------------------

CONFIGS = {
    "b0_train": {"variant": "b0"},
    "b0_eval": {"variant": "b0", "training": False},
    "b1_train": {"variant": "b1"},
    "b1_eval": {"variant": "b1", "training": False},
    "b2_train": {"variant": "b2"},
    "s0": {"variant": "s0", "groups": 2},
    "s1": {"variant": "s1", "groups": 4},
    "s2": {"variant": "s2", "groups": 2},
    "s0a_no_nonlinearity": {"variant": "s0", "groups": 2, "nonlinearity": False,
                            "keep_denominator": True},
}


def _eps_for(family):
    # eps below the tiny family's variance (~1e-300), so the statistics, not eps, set the scale.
    return 1e-305 if family == "tiny_1e-150" else 1e-5


@pytest.mark.parametrize("family", sorted(ADVERSARIAL))
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_forward_matches_mpmath_on_adversarial_data(family, config):
    cfg = dict(CONFIGS[config])
    groups = cfg.pop("groups", 1)
    shape = (2, 4, 3, 2) if config != "b1_eval" else (3, 4, 5)
    x = adversarial(family, shape)
    weight, bias = 1 + 0.5 * RNG.standard_normal(4), RNG.standard_normal(4)
    v = 1 + 0.5 * RNG.standard_normal(4)
    # A moving variance on the data's own scale (0.5x to 2x its batch variance), so inference
    # mixes both branches of the max as training does.
    running_var = np.var(x, axis=(0,) + tuple(range(2, x.ndim))) * RNG.uniform(0.5, 2.0, 4)
    eps = _eps_for(family)
    hp = {**cfg, "eps": eps, "num_groups": groups}
    y, _ = run({"x": x, "weight": weight, "bias": bias, "v": v}, {"running_var": running_var}, **hp)
    exact = mp_evo_norm(x, weight, bias, v, running_var, groups=groups, **{**cfg, "eps": eps})
    err = relative_error(y, exact)
    assert err <= 1e-10, f"{family}/{config}: relative error {err:.3g}"


def test_constant_input_takes_the_instance_branch_and_stays_finite():
    """var_B = var_I = 0: l = sqrt(eps), r = v x + sqrt(eps) > l for x v > 0, so y = x / r."""
    x = np.full((2, 3, 2, 2), 3.25)
    v = np.array([1.0, 2.0, 0.5])
    y, _ = run({"x": x, "v": v}, eps=1e-3)
    np.testing.assert_allclose(y, x / (v[None, :, None, None] * x + np.sqrt(1e-3)), rtol=1e-15)
    g = grads({"x": x, "v": v}, np.ones_like(x), eps=1e-3)
    assert np.all(np.isfinite(g["x"])) and np.all(np.isfinite(g["v"]))


# --- properties -------------------------------------------------------------------------------

layouts = st.tuples(st.integers(1, 3), st.sampled_from([(2, 1), (2, 2), (4, 2), (6, 3), (4, 4)]),
                    st.integers(1, 3), st.integers(1, 3))


def _draw(s, seed):
    n, (c, g), h, w = s
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w))
    return rng, x, c, g


@pytest.mark.checks("s0_with_v_zero_is_half_uncentered_group_norm")
@given(s=layouts, seed=st.integers(0, 2**32 - 1), eps=st.floats(1e-8, 1e-1))
def test_s0_with_zero_v_is_half_of_group_norm_without_centering(s, seed, eps):
    """sigmoid(0) = 1/2: S0(x; v = 0) = (1/2) x / sqrt(var_G + eps) * gamma + beta, i.e. half of
    GroupNorm with the group mean added back (x / std = x_hat + mean / std)."""
    rng, x, c, g = _draw(s, seed)
    w, b = rng.standard_normal(c), rng.standard_normal(c)
    y, _ = run({"x": x, "weight": w, "bias": b, "v": np.zeros(c)}, variant="s0", num_groups=g,
               eps=eps)
    n = x.shape[0]
    xg = x.reshape(n, g, -1)
    mean = xg.mean(axis=2, keepdims=True)
    std = np.sqrt(xg.var(axis=2, keepdims=True) + eps)
    gn = reference.get("group_norm").apply({"x": x}, None, num_groups=g, eps=eps)[0]["y"]
    uncentered = (gn.reshape(n, g, -1) + mean / std).reshape(x.shape)
    expected = 0.5 * uncentered * w[:, None, None] + b[:, None, None]
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


@given(s=layouts, seed=st.integers(0, 2**32 - 1))
def test_s1_is_s0_with_unit_v(s, seed):
    """timm's S1 (SiLU(x) / group std) is S0 with v = 1, and S0 without v takes v = 1: the same
    operations, bit for bit; gradients too."""
    rng, x, c, g = _draw(s, seed)
    w, b = rng.standard_normal(c), rng.standard_normal(c)
    base = {"x": x, "weight": w, "bias": b}
    s1, _ = run(base, variant="s1", num_groups=g)
    np.testing.assert_array_equal(run({**base, "v": np.ones(c)}, variant="s0", num_groups=g)[0], s1)
    np.testing.assert_array_equal(run(base, variant="s0", num_groups=g)[0], s1)
    dy = rng.standard_normal(x.shape)
    g1 = grads(base, dy, variant="s1", num_groups=g)
    g0 = grads({**base, "v": np.ones(c)}, dy, variant="s0", num_groups=g)
    for key in g1:
        np.testing.assert_array_equal(g0[key], g1[key], err_msg=key)


@given(s=layouts, seed=st.integers(0, 2**32 - 1), variant=st.sampled_from(["s0", "s1", "s2"]))
def test_s_variants_are_batch_independent(s, seed, variant):
    """No batch statistic: each sample alone gives its own rows, training equals inference, and
    no state is kept (a given running_var passes through unchanged)."""
    rng, x, c, g = _draw(s, seed)
    inputs = {"x": x, "weight": rng.standard_normal(c), "bias": rng.standard_normal(c),
              "v": 1 + 0.5 * rng.standard_normal(c)}
    y, state = run(inputs, variant=variant, num_groups=g)
    assert state == {}
    for i in range(x.shape[0]):
        yi, _ = run({**inputs, "x": x[i:i + 1]}, variant=variant, num_groups=g)
        np.testing.assert_allclose(yi[0], y[i], rtol=0, atol=1e-14 * (1 + np.abs(y).max()))
    rv = rng.uniform(0.5, 2.0, c)
    y_eval, st_eval = run(inputs, {"running_var": rv}, variant=variant, num_groups=g, training=False)
    np.testing.assert_array_equal(y_eval, y)
    np.testing.assert_array_equal(st_eval["running_var"], rv)


@pytest.mark.checks("b_eval_is_elementwise_given_moving_and_instance_statistics")
@given(s=layouts, seed=st.integers(0, 2**32 - 1), variant=st.sampled_from(["b0", "b1", "b2"]))
def test_b_eval_is_elementwise_given_the_moving_variance(s, seed, variant):
    """Inference: l = sqrt(running_var + eps) is a constant per channel, so y is a scalar function
    of x given its (sample, channel)'s instance statistic: each sample alone gives its own rows,
    and the state is returned unchanged."""
    rng, x, c, _ = _draw(s, seed)
    w, b, v = rng.standard_normal(c), rng.standard_normal(c), 1 + 0.5 * rng.standard_normal(c)
    rv = rng.uniform(0.2, 3.0, c)
    eps = 1e-5
    inputs = {"x": x, "weight": w, "bias": b, "v": v}
    y, state = run(inputs, {"running_var": rv}, variant=variant, training=False, eps=eps)
    np.testing.assert_array_equal(state["running_var"], rv)
    left = np.sqrt(rv + eps)[None, :, None, None]
    if variant == "b0":
        right = v[None, :, None, None] * x + np.sqrt(x.var(axis=(2, 3), keepdims=True) + eps)
    else:
        q = np.sqrt((x * x).mean(axis=(2, 3), keepdims=True) + eps)
        right = (x + 1) * q if variant == "b1" else q - x
    expected = x / np.maximum(left, right) * w[None, :, None, None] + b[None, :, None, None]
    np.testing.assert_allclose(y, expected, rtol=1e-13, atol=1e-13)
    for i in range(x.shape[0]):
        yi, _ = run({**inputs, "x": x[i:i + 1]}, {"running_var": rv}, variant=variant,
                    training=False, eps=eps)
        np.testing.assert_array_equal(yi[0], y[i])


@given(s=layouts, seed=st.integers(0, 2**32 - 1), log_a=st.floats(-3, 3))
def test_b0_train_invariant_to_positive_channel_scale(s, seed, log_a):
    """eps -> 0: x -> a_c x scales sqrt(var_B), v x and sqrt(var_I) all by a_c, so their max
    does too and y is unchanged (v fixed).  One value per channel (N H W = 1) has var_B = 0,
    where eps sets l: left out."""
    n, _, h, w = s
    assume(n * h * w > 1)
    rng, x, c, _ = _draw(s, seed)
    v = 1 + 0.5 * rng.standard_normal(c)
    a = 10.0 ** (log_a + 0.1 * rng.standard_normal(c))
    y1, _ = run({"x": x, "v": v}, eps=1e-300)
    y2, _ = run({"x": x * a[None, :, None, None], "v": v}, eps=1e-300)
    # Each side is a few roundings from exact; the max is continuous, so a branch switch at a
    # near-tie moves y by no more than the rounding itself.
    np.testing.assert_allclose(y2, y1, rtol=1e-13, atol=1e-13)


@given(s=layouts, seed=st.integers(0, 2**32 - 1), log_a=st.floats(-2, 2))
def test_s0_invariant_to_group_scale_with_v_rescaled(s, seed, log_a):
    """eps -> 0: S0(a x; v / a) = S0(x; v) for a positive scale a_g per group (shared by the
    samples, as v is): the group std scales by a_g and v x is unchanged."""
    rng, x, c, g = _draw(s, seed)
    v = 1 + 0.5 * rng.standard_normal(c)
    a = np.repeat(10.0 ** (log_a + 0.1 * rng.standard_normal(g)), c // g)
    y1, _ = run({"x": x, "v": v}, variant="s0", num_groups=g, eps=1e-300)
    y2, _ = run({"x": x * a[None, :, None, None], "v": v / a}, variant="s0", num_groups=g, eps=1e-300)
    np.testing.assert_allclose(y2, y1, rtol=1e-13, atol=1e-13)


@given(s=layouts, seed=st.integers(0, 2**32 - 1), training=st.booleans())
def test_max_branch_selection(s, seed, training):
    """d = max(l, r) per element: where the batch std l wins y = x / l (BatchNorm without
    centering), where r = v x + s_I wins y = x / r; the gradient of v lives on r's elements only."""
    rng, x, c, _ = _draw(s, seed)
    v = 1 + 0.5 * rng.standard_normal(c)
    rv = rng.uniform(0.2, 3.0, c)
    eps = 1e-5
    y, _ = run({"x": x, "v": v}, {"running_var": rv}, training=training, eps=eps)
    var = x.var(axis=(0, 2, 3)) if training else rv
    left = np.broadcast_to(np.sqrt(var + eps)[None, :, None, None], x.shape)
    right = v[None, :, None, None] * x + np.sqrt(x.var(axis=(2, 3), keepdims=True) + eps)
    lw, rw = left > right, right > left
    np.testing.assert_allclose(y[lw], (x / left)[lw], rtol=1e-13, atol=0)
    np.testing.assert_allclose(y[rw], (x / right)[rw], rtol=1e-13, atol=0)
    # v acts through r only: dv = sum over r's elements of -dy x / d^2 * x, and a cotangent on
    # l's elements alone gives dv = 0 exactly.
    dy = rng.standard_normal(x.shape)
    state = {"running_var": rv}
    dv = grads({"x": x, "v": v}, dy, state, training=training, eps=eps)["v"]
    d = np.maximum(left, right)
    np.testing.assert_allclose(dv, np.sum(np.where(rw, -dy * x * x / d**2, 0.0), axis=(0, 2, 3)),
                               rtol=1e-12, atol=1e-12)
    dv_l = grads({"x": x, "v": v}, dy * lw, state, training=training, eps=eps)["v"]
    np.testing.assert_array_equal(dv_l, 0.0)


def _tie_data():
    """x = +-1 in equal numbers per (sample, channel): every mean is exactly 0 and every variance
    exactly 1, so with v = 0 and a moving variance of 1, l = sqrt(1 + eps) = s_I = r bit for bit
    (in training too: var_B = 1)."""
    signs = np.array([1.0, -1.0, -1.0, 1.0, 1.0, -1.0])
    x = np.stack([np.stack([np.roll(signs, k + 2 * n) for k in range(3)]) for n in range(2)])
    x = x.reshape(2, 3, 2, 3)
    return x, np.zeros(3), np.ones(3)


@pytest.mark.checks("max_tie_gradient_convention")
@pytest.mark.parametrize("training", [False, True])
def test_tie_gradient_is_split_like_torch_maximum_or_first_like_tf(training):
    """At an exact tie l == r: "split" gives each branch half the gradient (torch.maximum, timm's
    ``left.max(right)``), "first" all of it to l (tf.maximum(left, right): ``greater_equal``)."""
    x, v, rv = _tie_data()
    eps = 1e-5
    w, b = np.array([1.5, 0.5, 2.0]), np.array([0.1, -0.2, 0.3])
    inputs = {"x": x, "weight": w, "bias": b, "v": v}
    left = np.sqrt((x.var(axis=(0, 2, 3)) if training else rv) + eps)[None, :, None, None]
    right = np.sqrt(x.var(axis=(2, 3), keepdims=True) + eps)
    assert np.all(np.broadcast_to(left, x.shape) == right)    # an exact tie everywhere
    dy = RNG.standard_normal(x.shape)
    hp = {"training": training, "eps": eps}
    split = grads(inputs, dy, {"running_var": rv}, max_tie="split", **hp)
    first = grads(inputs, dy, {"running_var": rv}, max_tie="first", **hp)
    assert not np.allclose(split["v"], first["v"])          # the conventions do differ here
    np.testing.assert_array_equal(first["v"], 0.0)          # TF: a tie goes to the batch std
    if not training:
        # One-sided gradients: a moving variance 1e-9 above (l wins) or below (r wins) the tie;
        # each branch's gradient is continuous, so these are its limits at the tie.
        l_wins = grads(inputs, dy, {"running_var": rv * (1 + 1e-9)}, **hp)
        r_wins = grads(inputs, dy, {"running_var": rv * (1 - 1e-9)}, **hp)
        for key in split:
            np.testing.assert_allclose(first[key], l_wins[key], rtol=1e-7, atol=1e-7, err_msg=key)
            np.testing.assert_allclose(split[key], 0.5 * (l_wins[key] + r_wins[key]), rtol=1e-7,
                                       atol=1e-7, err_msg=key)
    # torch autograd at the same exact tie: torch.maximum (split) and a select l >= r (first).
    # The variances are timm's manual_var (mean of squared deviations), exact on +-1 data (torch's
    # x.var over dims (2, 3) rounds some of these to 1 + 2^-52, which would break the tie).
    torch = torch_or_skip()

    def manual_var(t, dims):
        centered = t - t.mean(dim=dims, keepdim=True)
        return (centered * centered).mean(dim=dims, keepdim=True)

    for convention, got in (("split", split), ("first", first)):
        tx, tw, tb, tv = t64(x, True), t64(w, True), t64(b, True), t64(v, True)
        var = manual_var(tx, (0, 2, 3)) if training else t64(rv).view(1, -1, 1, 1)
        tl = (var + eps).sqrt().expand_as(tx)
        tr = tx * tv.view(1, -1, 1, 1) + (manual_var(tx, (2, 3)) + eps).sqrt()
        assert bool((tl == tr).all())
        d = tl.max(tr) if convention == "split" else torch.where(tl >= tr, tl, tr)
        ty = tx / d * tw.view(1, -1, 1, 1) + tb.view(1, -1, 1, 1)
        expected = torch_vjp(ty, {"x": tx, "weight": tw, "bias": tb, "v": tv}, dy)
        for key in expected:
            np.testing.assert_allclose(got[key], expected[key], rtol=1e-12, atol=1e-12,
                                       err_msg=f"{convention}: {key}")


@pytest.mark.checks("moving_variance_update")
@pytest.mark.parametrize("dialect", ["official_tf_b0", "timm_b0", "timm_b1", "timm_b2"])
def test_moving_variance_follows_each_source(dialect):
    """TF: moving_var -= (moving_var - var_biased)(1 - 0.9); timm: (1 - 0.1) old + 0.1 n/(n-1)
    var_biased.  Inference and nonlinearity=False leave it alone."""
    hp = OP.dialect(dialect)
    x = RNG.standard_normal((3, 4, 2, 3))
    rv = RNG.uniform(0.5, 2.0, 4)
    v = np.ones(4) if hp["variant"] == "b0" else None
    _, state = run({"x": x, "v": v}, {"running_var": rv}, **hp)
    var = x.var(axis=(0, 2, 3))
    n = x.size / 4
    if dialect == "official_tf_b0":
        expected = rv - (rv - var) * (1 - 0.9)
    else:
        expected = rv * (1 - 0.1) + var * 0.1 * (n / (n - 1))
    np.testing.assert_allclose(state["running_var"], expected, rtol=1e-14)
    for off in ({"training": False}, {"nonlinearity": False}):
        _, kept = run({"x": x, "v": v}, {"running_var": rv}, **{**hp, **off})
        np.testing.assert_array_equal(kept["running_var"], rv)


def test_running_var_over_steps_matches_a_hand_loop():
    """Three training steps then inference, TF convention: the EMA of the biased variances."""
    rv = np.ones(3)
    expected = np.ones(3)
    for step in range(3):
        x = RNG.standard_normal((2, 3, 2, 2)) * (step + 1)
        _, state = run({"x": x, "v": np.ones(3)}, {"running_var": rv})
        rv = state["running_var"]
        expected = 0.9 * expected + 0.1 * x.var(axis=(0, 2, 3))
    np.testing.assert_allclose(rv, expected, rtol=1e-14)
    x = RNG.standard_normal((2, 3, 2, 2))
    y, _ = run({"x": x, "v": np.ones(3)}, {"running_var": rv}, training=False)
    right = x + np.sqrt(x.var(axis=(2, 3), keepdims=True) + 1e-5)
    np.testing.assert_allclose(y, x / np.maximum(np.sqrt(rv + 1e-5)[None, :, None, None], right),
                               rtol=1e-14)


@pytest.mark.checks("nonlinearity_off_is_affine_or_uncentered_group_norm")
@pytest.mark.parametrize("variant", ["b0", "b1", "b2", "s0", "s1", "s2"])
def test_nonlinearity_off(variant):
    """TF nonlinearity=False / timm apply_act=False: y = gamma x + beta (v unused: zero
    gradient).  timm's S0a/S1a/S2a (keep_denominator) still divide by the group std (rms)."""
    x = RNG.standard_normal((2, 4, 3, 2))
    w, b, v = RNG.standard_normal(4), RNG.standard_normal(4), RNG.standard_normal(4)
    inputs = {"x": x, "weight": w, "bias": b, "v": v}
    y, _ = run(inputs, variant=variant, nonlinearity=False, num_groups=2)
    np.testing.assert_allclose(y, x * w[:, None, None] + b[:, None, None], rtol=1e-15, atol=1e-15)
    g = grads(inputs, np.ones_like(x), variant=variant, nonlinearity=False, num_groups=2)
    np.testing.assert_array_equal(g["v"], 0.0)
    y_a, _ = run(inputs, variant=variant, nonlinearity=False, keep_denominator=True, num_groups=2)
    if variant.startswith("b"):
        np.testing.assert_array_equal(y_a, y)   # B variants ignore keep_denominator
        return
    xg = x.reshape(2, 2, -1)
    stat = (xg * xg).mean(axis=2, keepdims=True) if variant == "s2" else xg.var(axis=2, keepdims=True)
    z = (xg / np.sqrt(stat + 1e-5)).reshape(x.shape)
    np.testing.assert_allclose(y_a, z * w[:, None, None] + b[:, None, None], rtol=1e-13, atol=1e-14)


# --- knobs, inputs the variant does not read, errors ---------------------------------------------


@pytest.mark.parametrize(("channels", "asked", "used"),
                         [(6, 4, 3), (7, 32, 7), (9, 4, 3), (64, 32, 32), (16, 32, 16), (5, 3, 1)])
def test_group_fallback_decrements_like_tf(channels, asked, used):
    """TF _group_std: `while num_groups > 1: if C % num_groups == 0: break; num_groups -= 1`."""
    assert E.effective_groups(channels, asked, "decrement") == used
    x = RNG.standard_normal((2, channels, 2, 2))
    y, _ = run({"x": x}, variant="s0", num_groups=asked)
    np.testing.assert_array_equal(y, run({"x": x}, variant="s0", num_groups=used)[0])
    if asked != used:
        with pytest.raises(ValueError, match=f"num_groups={asked} must divide the {channels} channels"):
            run({"x": x}, variant="s0", num_groups=asked, group_fallback="raise")


@pytest.mark.parametrize("variant", ["b1", "b2", "s1", "s2"])
def test_v_is_ignored_where_the_variant_has_none(variant):
    x = RNG.standard_normal((2, 4, 2, 3))
    y, _ = run({"x": x}, variant=variant, num_groups=2)
    y_v, _ = run({"x": x, "v": RNG.standard_normal(4)}, variant=variant, num_groups=2)
    np.testing.assert_array_equal(y_v, y)
    g = grads({"x": x, "v": RNG.standard_normal(4)}, np.ones_like(x), variant=variant, num_groups=2)
    np.testing.assert_array_equal(g["v"], 0.0)


def test_inference_needs_the_moving_variance():
    x = RNG.standard_normal((2, 3, 2, 2))
    with pytest.raises(ValueError, match="evo_norm: inference .* with variant 'b0' needs running_var"):
        E.evo_norm(x, training=False)
    assert OP.init_state({"x": x}, variant="s0") == {}
    np.testing.assert_array_equal(OP.init_state({"x": x})["running_var"], np.ones(3))


@pytest.mark.parametrize(("hp", "state"), [
    ({"max_tie": "first"}, None),
    ({"variant": "b0", "training": False}, {"running_var": np.array([0.5, 1.5, 1.0])}),
    ({"variant": "b1", "axis": -1}, None),
    ({"variant": "s0", "num_groups": 3, "eps": 1e-2}, None),
    ({"variant": "s2", "num_groups": 1, "nonlinearity": False, "keep_denominator": True}, None),
    ({"variant": "s0", "num_groups": 3, "training": False}, None),
])
def test_vjp_matches_finite_differences_off_the_spec_cases(hp, state):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 3, 2, 3))
    inputs = {"x": x, "weight": 1 + 0.5 * rng.standard_normal(3), "bias": rng.standard_normal(3),
              "v": 1 + 0.5 * rng.standard_normal(3)}
    assert_vjp("evo_norm", inputs, state, rtol=1e-8, **hp)


def test_spec_cases_sit_away_from_max_ties():
    """Finite differences straddle a kink of the max when l and r nearly tie: every small B case
    of the spec keeps them 1e-3 apart (relative), the realistic ones need not (no FD there)."""
    for case in default_cases("evo_norm"):
        hp = case.hparams
        if not hp["variant"].startswith("b") or not hp["nonlinearity"] or case.size > 20_000:
            continue
        x = case.inputs["x"]
        x3, _, _ = E._to_ncs(x, hp["axis"] % x.ndim)
        rv = np.ones(x3.shape[1])
        p = E._b_parts(x3, case.inputs.get("v"), rv, hp["variant"], hp["training"], hp["eps"])
        gap = np.min(np.abs(p["left"] - p["right"]) / p["d"])
        assert gap > 1e-3, f"{case.name}: l and r within {gap:.2g} (relative)"


# --- timm and the official TF code, transcribed in torch ops (float64) ---------------------------


def _timm_stats(torch):
    def instance_std(x, eps):
        return x.var(dim=(2, 3), unbiased=False, keepdim=True).add(eps).sqrt().expand(x.shape)

    def instance_rms(x, eps):
        return x.square().mean(dim=(2, 3), keepdim=True).add(eps).sqrt().expand(x.shape)

    def group_std(x, groups, eps):
        n, c, h, w = x.shape
        xg = x.reshape(n, groups, c // groups, h, w)
        std = xg.var(dim=(2, 3, 4), unbiased=False, keepdim=True).add(eps).sqrt()
        return std.expand(xg.shape).reshape(n, c, h, w)

    def group_rms(x, groups, eps):
        n, c, h, w = x.shape
        xg = x.reshape(n, groups, c // groups, h, w)
        rms = xg.square().mean(dim=(2, 3, 4), keepdim=True).add(eps).sqrt()
        return rms.expand(xg.shape).reshape(n, c, h, w)

    return instance_std, instance_rms, group_std, group_rms


def timm_forward(cls, x, w, b, v, running_var, *, training, eps, apply_act=True, groups=32,
                 momentum=0.1):
    """timm/layers/evo_norm.py (aa4b585) EvoNorm2d<cls>.forward, in torch ops: returns
    (y, new running_var or None)."""
    torch = torch_or_skip()
    instance_std, instance_rms, group_std, group_rms = _timm_stats(torch)
    shape = (1, -1, 1, 1)
    new_rv = None
    if cls in ("B0", "B1", "B2"):
        if apply_act:
            if training:
                var = x.var(dim=(0, 2, 3), unbiased=False)
                n = x.numel() / x.shape[1]
                new_rv = running_var * (1 - momentum) + var.detach() * momentum * (n / (n - 1))
            else:
                var = running_var
            left = var.add(eps).sqrt().view(shape).expand_as(x)
            if cls == "B0":
                right = x * v.view(shape) + instance_std(x, eps)
            elif cls == "B1":
                right = (x + 1) * instance_rms(x, eps)
            else:
                right = instance_rms(x, eps) - x
            x = x / left.max(right)
    elif cls == "S0":
        if apply_act:
            x = x * (x * v.view(shape)).sigmoid() / group_std(x, groups, eps)
    elif cls == "S0a":
        d = group_std(x, groups, eps)
        if apply_act:
            x = x * (x * v.view(shape)).sigmoid()
        x = x / d
    elif cls in ("S1", "S2"):
        stat = group_std if cls == "S1" else group_rms
        if apply_act:
            x = torch.nn.functional.silu(x) / stat(x, groups, eps)
    elif cls in ("S1a", "S2a"):
        stat = group_std if cls == "S1a" else group_rms
        act = torch.nn.functional.silu if apply_act else (lambda t: t)
        x = act(x) / stat(x, groups, eps)
    return x * w.view(shape) + b.view(shape), new_rv


TIMM = {  # class -> (dialect, has v)
    "B0": ("timm_b0", True), "B1": ("timm_b1", False), "B2": ("timm_b2", False),
    "S0": ("timm_s0", True), "S0a": ("timm_s0a", True), "S1": ("timm_s1", False),
    "S1a": ("timm_s1a", False), "S2": ("timm_s2", False), "S2a": ("timm_s2a", False),
}


@pytest.mark.parametrize("cls", sorted(TIMM))
@pytest.mark.parametrize(("training", "apply_act"), [(True, True), (False, True), (True, False)])
def test_matches_timm_transcribed_in_torch_float64(cls, training, apply_act):
    torch_or_skip()
    dialect, has_v = TIMM[cls]
    hp = {**OP.dialect(dialect), "training": training, "nonlinearity": apply_act}
    groups = 4
    if "num_groups" in hp:
        hp["num_groups"] = groups
    x = RNG.standard_normal((3, 8, 3, 2))
    w, b = 1 + 0.5 * RNG.standard_normal(8), RNG.standard_normal(8)
    v = 1 + 0.5 * RNG.standard_normal(8) if has_v and apply_act else None
    rv = RNG.uniform(0.5, 2.0, 8)
    tx, tw, tb = t64(x, True), t64(w, True), t64(b, True)
    tv = t64(v, True) if v is not None else None
    ty, t_rv = timm_forward(cls, tx, tw, tb, tv, t64(rv), training=training, eps=hp["eps"],
                            apply_act=apply_act, groups=groups)
    inputs = {"x": x, "weight": w, "bias": b, "v": v}
    y, state = run(inputs, {"running_var": rv}, **hp)
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-12, atol=1e-12)
    if t_rv is not None:
        np.testing.assert_allclose(state["running_var"], t_rv.numpy(), rtol=1e-13)
    elif cls.startswith("B"):
        np.testing.assert_array_equal(state["running_var"], rv)
    dy = RNG.standard_normal(x.shape)
    expected = torch_vjp(ty, {"x": tx, "weight": tw, "bias": tb, "v": tv}, dy)
    got = grads(inputs, dy, {"running_var": rv}, **hp)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-10, atol=1e-11, err_msg=key)


def official_tf_forward(layer, x, gamma, beta, v, moving_var, *, training, nonlinearity=True,
                        decay=0.9, eps=1e-5, num_groups=32, channels_last=False):
    """tensorflow/tpu models/official/resnet/resnet_model.py::evonorm (7dc921f), in torch ops:
    returns (y, new moving variance or None)."""
    torch = torch_or_skip()
    c = x.shape[-1] if channels_last else x.shape[1]
    var_shape = (1, 1, 1, c) if channels_last else (1, c, 1, 1)
    batch_axes, inst_axes = ((0, 1, 2), (1, 2)) if channels_last else ((0, 2, 3), (2, 3))
    new_mv = None
    if nonlinearity:
        v = v.view(var_shape)
        if layer == "evonorm_s0":
            while num_groups > 1:
                if c % num_groups == 0:
                    break
                num_groups -= 1
            if channels_last:
                n, h, w, _ = x.shape
                xg = x.reshape(-1, h, w, num_groups, c // num_groups)
                var = xg.var(dim=(1, 2, 4), unbiased=False, keepdim=True)
            else:
                n, _, h, w = x.shape
                xg = x.reshape(-1, num_groups, c // num_groups, h, w)
                var = xg.var(dim=(2, 3, 4), unbiased=False, keepdim=True)
            den = torch.sqrt(var + eps).expand(xg.shape).reshape(x.shape)
            x = x * torch.sigmoid(v * x) / den
        else:
            if training:
                variance = x.var(dim=batch_axes, unbiased=False, keepdim=True)
                new_mv = moving_var - (moving_var - variance.detach().reshape(-1)) * (1 - decay)
            else:
                variance = moving_var.view(var_shape)
            left = torch.sqrt(variance + eps)
            right = v * x + torch.sqrt(x.var(dim=inst_axes, unbiased=False, keepdim=True) + eps)
            x = x / torch.maximum(left.expand_as(x), right)
    return x * gamma.view(var_shape) + beta.view(var_shape), new_mv


@pytest.mark.parametrize(("layer", "training", "channels_last", "channels"), [
    ("evonorm_b0", True, False, 6), ("evonorm_b0", False, False, 6), ("evonorm_b0", True, True, 5),
    ("evonorm_b0", False, True, 5), ("evonorm_s0", True, False, 64), ("evonorm_s0", True, False, 48),
    ("evonorm_s0", False, True, 12),
])
def test_matches_official_tf_transcribed_in_torch_float64(layer, training, channels_last, channels):
    """Away from exact ties tf.maximum's gradient is torch.maximum's; the tie itself is
    test_tie_gradient_is_split_like_torch_maximum_or_first_like_tf."""
    torch_or_skip()
    dialect = "official_tf_b0" if layer == "evonorm_b0" else "official_tf_s0"
    hp = {**OP.dialect(dialect), "training": training, "axis": -1 if channels_last else 1}
    shape = (3, 2, 3, channels) if channels_last else (3, channels, 2, 3)
    x = RNG.standard_normal(shape)
    w, b = 1 + 0.5 * RNG.standard_normal(channels), RNG.standard_normal(channels)
    v, mv = 1 + 0.5 * RNG.standard_normal(channels), RNG.uniform(0.5, 2.0, channels)
    tx, tw, tb, tv = t64(x, True), t64(w, True), t64(b, True), t64(v, True)
    ty, t_mv = official_tf_forward(layer, tx, tw, tb, tv, t64(mv), training=training,
                                   channels_last=channels_last)
    inputs = {"x": x, "weight": w, "bias": b, "v": v}
    state = {"running_var": mv} if layer == "evonorm_b0" else None
    y, new_state = run(inputs, state, **hp)
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-12, atol=1e-12)
    if t_mv is not None:
        np.testing.assert_allclose(new_state["running_var"], t_mv.numpy(), rtol=1e-13)
    dy = RNG.standard_normal(shape)
    expected = torch_vjp(ty, {"x": tx, "weight": tw, "bias": tb, "v": tv}, dy)
    got = grads(inputs, dy, state, **hp)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-10, atol=1e-11, err_msg=key)


def _timm_or_skip():
    try:
        from timm.layers import evo_norm as timm_evo_norm
    except Exception as exc:  # noqa: BLE001 - ImportError, or torchvision not matching torch
        pytest.skip(f"timm does not import here ({type(exc).__name__}: {exc}); the timm forms are "
                    "checked by test_matches_timm_transcribed_in_torch_float64 instead")
    return timm_evo_norm


@pytest.mark.parametrize("cls", sorted(TIMM))
@pytest.mark.parametrize("training", [True, False])
def test_matches_timm_layers_float64(cls, training):
    """The real timm modules, when timm imports (float64 modules, running_var set by hand).

    timm computes its statistics as ``x.float().var(...)``: float32 even for a float64 module (a
    downcast there), so agreement is to float32 accuracy, ~1e-7 relative per statistic; the
    float64 semantics are test_matches_timm_transcribed_in_torch_float64's."""
    torch = torch_or_skip()
    timm_evo_norm = _timm_or_skip()
    dialect, has_v = TIMM[cls]
    layer = getattr(timm_evo_norm, f"EvoNorm2d{cls}")(8, groups=4) if cls.startswith("S") \
        else getattr(timm_evo_norm, f"EvoNorm2d{cls}")(8)
    layer = layer.double().train(training)
    hp = {**OP.dialect(dialect), "training": training}
    if "num_groups" in hp:
        hp["num_groups"] = 4
    x = RNG.standard_normal((3, 8, 3, 2))
    w, b = 1 + 0.5 * RNG.standard_normal(8), RNG.standard_normal(8)
    v = 1 + 0.5 * RNG.standard_normal(8) if has_v else None
    rv = RNG.uniform(0.5, 2.0, 8)
    with torch.no_grad():
        layer.weight.copy_(t64(w))
        layer.bias.copy_(t64(b))
        if has_v:
            layer.v.copy_(t64(v))
        if hasattr(layer, "running_var"):
            layer.running_var.copy_(t64(rv))
    tx = t64(x, True)
    ty = layer(tx)
    y, state = run({"x": x, "weight": w, "bias": b, "v": v}, {"running_var": rv}, **hp)
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-5, atol=1e-5)
    if hasattr(layer, "running_var"):
        np.testing.assert_allclose(state["running_var"], layer.running_var.numpy(), rtol=1e-6)
    dy = RNG.standard_normal(x.shape)
    params = {"x": tx, "weight": layer.weight, "bias": layer.bias, "v": getattr(layer, "v", None)}
    expected = torch_vjp(ty, params, dy)
    got = grads({"x": x, "weight": w, "bias": b, "v": v}, dy, {"running_var": rv}, **hp)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-5, err_msg=key)
