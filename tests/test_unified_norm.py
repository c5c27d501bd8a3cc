"""Unified Normalization: forward (and declared backward) vs mpmath on adversarial data, the
properties of its window statistics and outlier filter, the declared backward and its
backward-pass state, the official UN1d/UN2dFunction restated per channel, and harness mutants."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import reference
from conformance import check_vjp
from conformance.cases import ADVERSARIAL, adversarial
from helpers import (
    MIN_FLAGGED,
    flagged_cases,
    mp,
    mp_array,
    mp_sqrt,
    relative_error,
    run_mutant,
    verdict_table,
)
from mutants import Mutant
from reference.normalizers import unified_norm as _un
from reference.normalizers.unified_norm import geometric_mean, near_outlier_threshold, unified_norm

OP = reference.get("unified_norm")
RNG = np.random.default_rng(20260412)
TINY_EPS = 1e-300  # eps -> 0: the exact identities then hold up to rounding
R = (0, 1)         # the reduced axes of the (B, N, C) inputs below (channels last)
NEVER = 10**9      # a compensation_start no test reaches: r = 1


def _state(c, *, f=4, fb=4, var=None, ema=None, bx=None, bg=None, iters=0.0, skips=0.0):
    return {"running_var": np.ones(c) if var is None else np.asarray(var, dtype=np.float64),
            "ema_gz": np.zeros(c) if ema is None else np.asarray(ema, dtype=np.float64),
            "buffer_x2": np.zeros((f, c)) if bx is None else np.asarray(bx, dtype=np.float64),
            "buffer_gz": np.zeros((fb, c)) if bg is None else np.asarray(bg, dtype=np.float64),
            "iters": np.float64(iters), "skip_counter": np.float64(skips)}


def _q(x):
    return np.mean(x * x, axis=R)


def _gm(rows):
    """The geometric mean of window rows, plainly: prod ** (1/F) (fine at moderate scales)."""
    rows = np.asarray(rows, dtype=np.float64)
    return np.prod(rows, axis=0) ** (1.0 / rows.shape[0])


# --- forward accuracy -------------------------------------------------------------------------


def mp_unified_norm(x, weight, bias, buffer, running_var, t, *, window, eps, dy, ema, momentum):
    """Eq. 1, 3, 5-7 and the backward Eq. 10-14 (not skipped, a backward window of one row, r
    active: t > max(T_c, W)) at 50 digits, independent of the oracle: ``(y, s, dx)``.
    ``window``: s = GM of the buffer with row t mod F set to q (mpmath's root of the product),
    else s = q; r = clip(sqrt(s + eps)/sqrt(v + eps), 1/5, 5)."""
    mpmath = mp()
    X, DY, W, B = mp_array(x), mp_array(dy), mp_array(weight), mp_array(bias)
    n = x.shape[0] * x.shape[1]
    q = np.sum(X * X, axis=R) / n
    E = mp_array(np.float64(eps))
    if window:
        rows = mp_array(buffer)
        rows[int(t) % buffer.shape[0]] = q
        s = np.array([mpmath.root(mpmath.fprod(rows[:, c]), buffer.shape[0]) for c in range(x.shape[-1])],
                     dtype=object)
    else:
        s = q
    ratio = mp_sqrt(s + E) / mp_sqrt(mp_array(running_var) + E)
    r = np.array([min(max(v, mpmath.mpf(1) / 5), mpmath.mpf(5)) for v in ratio], dtype=object)
    root = mp_sqrt(s + E)
    z = X / root
    g = DY * W * r
    lam = np.sum(g * z, axis=R) / n
    m = mp_array(np.float64(momentum))
    c = m * mp_array(ema) + (1 - m) * lam  # mu = Lambda: a backward window of one row
    return z * W + B, s, (g - c * z) / root


@pytest.mark.parametrize("window", [False, True], ids=["batch", "window"])
@pytest.mark.parametrize("eps_kind", ["scaled", "default"])
@pytest.mark.parametrize("family", sorted(ADVERSARIAL))
def test_forward_and_backward_match_mpmath_on_adversarial_data(family, eps_kind, window):
    x = adversarial(family, (5, 4, 6))
    dy = RNG.standard_normal(x.shape)
    weight, bias = 1 + 0.5 * RNG.standard_normal(6), RNG.standard_normal(6)
    q = _q(x)
    # A window of earlier statistics on the data's scale (within a factor 2 of this batch's);
    # a running statistic up to 30x off it, so the ratio r is clamped in some channels.
    buffer = q * RNG.uniform(0.5, 2.0, (3, 6))
    running_var = q * 10.0 ** RNG.uniform(-1.5, 1.5, 6)
    eps = max(1e-3 * q.min(), 1e-300) if eps_kind == "scaled" else 1e-5
    ema = RNG.standard_normal(6)
    # window: step t = 8 > F = 3 (warm-up over, r active); batch: step 2 <= F.
    iters = 7.0 if window else 1.0
    hp = {"eps": eps, "fp_window": 3, "bp_window": 1, "warmup_iters": 0, "compensation_start": 0}
    state = _state(6, f=3, fb=1, var=running_var, ema=ema, bx=buffer, iters=iters)
    inputs = {"x": x, "weight": weight, "bias": bias}
    out, new = OP.apply(inputs, state, **hp)
    grads, back = OP.backward(inputs, state, {"y": dy}, **hp)
    y_mp, s_mp, dx_mp = mp_unified_norm(x, weight, bias, buffer, running_var, iters + 1, window=window,
                                        eps=eps, dy=dy, ema=ema, momentum=0.9)
    # The sums of 20 squares and products, the window's GM (a few ulps), roots and divisions:
    # about 30 roundings (measured: <= 3e-16 for y and dx over every family).
    err_y, err_dx = relative_error(out["y"], y_mp), relative_error(grads["x"], dx_mp)
    assert err_y <= 30 * 2.0**-53, f"{family}, eps={eps:.3g}: y relative error {err_y:.3g}"
    assert err_dx <= 30 * 2.0**-53, f"{family}, eps={eps:.3g}: dx relative error {err_dx:.3g}"
    # Eq. 8: the running statistic moves toward the normalizing one.
    v_mp = mp_array(running_var) * mp_array(np.float64(0.9)) + s_mp * mp_array(np.float64(0.1))
    assert relative_error(new["running_var"], v_mp) <= 1e-14
    assert relative_error(new["buffer_x2"][(int(iters) + 1) % 3], np.sum(mp_array(x) ** 2, axis=R) / 20) <= 1e-14


@pytest.mark.parametrize("f", [2, 3, 4, 7])
@pytest.mark.parametrize("decades", [0.3, 30.0, 600.0])
def test_geometric_mean_is_accurate_over_the_window(decades, f):
    """GM rescaled by the window's largest entry S (module docstring): within 2 + 2 mean|ln(B/S)|
    ulps of the exact geometric mean for statistics near 1e-300 and windows spanning 0.3 to 600
    decades; within 3 ulps for a power-of-two F on windows of up to 30 decades, where the
    official exp(mean(log B)) loses hundreds (the logarithm's absolute error, u |ln B|)."""
    mpmath = mp()
    rng = np.random.default_rng(f)
    low, high = (-300.0, -300.0 + decades) if decades < 600 else (-300.0, 300.0)
    base = 10.0 ** rng.uniform(low, high, (f, 8))
    exact = [mpmath.root(mpmath.fprod(mp_array(base[:, c])), f) for c in range(8)]

    def ulps(values):
        return [float(abs(mpmath.mpf(float(v)) - e) / e) / 2.0**-53 for v, e in zip(values, exact, strict=True)]

    spread = np.mean(np.log(base.max(axis=0)) - np.log(base), axis=0)  # mean |ln(B/S)|
    assert np.all(np.array(ulps(geometric_mean(base))) <= 2 + 2 * spread), (ulps(geometric_mean(base)), spread)
    if decades <= 30 and f in (2, 4):
        assert max(ulps(geometric_mean(base))) <= 3
        assert max(ulps(np.exp(np.mean(np.log(base), axis=0)))) >= 100


def test_the_human_api_starts_from_the_initial_state():
    x = RNG.standard_normal((4, 3))
    y, state = unified_norm(x)
    np.testing.assert_allclose(y, x / np.sqrt(_q(x[None]) + 1e-5), rtol=1e-15)
    np.testing.assert_allclose(state["running_var"], 0.9 + 0.1 * _q(x[None]), rtol=1e-15)
    np.testing.assert_array_equal(state["buffer_x2"][1], _q(x[None]))  # row t mod F, t = 1
    np.testing.assert_array_equal(state["buffer_x2"][[0, 2, 3]], 0.0)
    assert float(state["iters"]) == 1.0 and float(state["skip_counter"]) == 0.0
    assert OP.spec.backward_state == ("ema_gz", "buffer_gz") and OP.spec.backward == "custom"


def test_dialect_values():
    nlp, cv = OP.dialect("official_nlp"), OP.dialect("official_cv")
    assert not nlp["outlier_filtration"] and cv["outlier_filtration"]
    for hp in (nlp, cv):
        assert (hp["fp_window"], hp["bp_window"], hp["warmup_iters"]) == (4, 4, 4000)
        assert (hp["compensation_start"], hp["r_max"], hp["momentum"], hp["eps"]) == (1000, 5.0, 0.9, 1e-5)


# --- forward properties -----------------------------------------------------------------------

tokens = st.tuples(st.integers(1, 4), st.integers(2, 5), st.integers(1, 4))  # (B, N, C)
seeds = st.integers(0, 2**32 - 1)


@given(shape=tokens, seed=seeds, eps=st.floats(1e-8, 1.0))
def test_batch_statistic_phase_unit_quadratic_mean(shape, seed, eps):
    """Eq. 1, 5, 7 while s = q (the warm-up): mean_R (y - beta)^2 = gamma^2 q / (q + eps)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * 3 + 1
    w, b = rng.standard_normal(shape[-1]), rng.standard_normal(shape[-1])
    state = _state(shape[-1], iters=rng.integers(0, 3000))
    y = OP.apply({"x": x, "weight": w, "bias": b}, state, eps=eps)[0]["y"]
    q = _q(x)
    np.testing.assert_allclose(np.mean((y - b) ** 2, axis=R), w**2 * q / (q + eps), rtol=1e-13, atol=1e-15)


def _stream(hp, steps, c=3, scale=None, eval_at=(), rng=RNG):
    """Run the op (forward + backward) over a stream; returns the per-step records."""
    state, records = None, []
    for k in range(steps):
        x = rng.standard_normal((2, 3, c)) * (1.0 if scale is None else scale(k)) + 0.3
        dy = rng.standard_normal(x.shape)
        training = k not in eval_at
        out, new = OP.apply({"x": x}, state, training=training, **hp)
        grads, back = OP.backward({"x": x}, state, {"y": dy}, training=training, **hp)
        records.append({"x": x, "dy": dy, "y": out["y"], "dx": grads["x"], "training": training,
                        "before": state or OP.init_state({"x": x}, **hp), "after": {**new, **back}})
        state = {**new, **back}
    return records


@pytest.mark.checks("running_var_is_ema_of_the_normalizing_statistic")
@pytest.mark.parametrize(("f", "w"), [(3, 2), (2, 0), (4, 6)])
def test_window_statistic_is_geometric_mean_of_last_batches(f, w):
    """Eq. 3, 5, 8 over a stream with an inference step in the middle: s = q while t <= F or
    t < W, then the geometric mean of the last F batch statistics; the running statistic is the
    EMA of s.  No filter: the window holds every step's q."""
    hp = {"fp_window": f, "warmup_iters": w, "eps": 1e-5}
    records = _stream(hp, 10, eval_at=(4,))
    qs, v = [], np.ones(3)
    for rec in records:
        if not rec["training"]:
            np.testing.assert_allclose(rec["y"], rec["x"] / np.sqrt(v + 1e-5), rtol=1e-14)
            for key in ("running_var", "buffer_x2", "iters"):
                np.testing.assert_array_equal(rec["after"][key], rec["before"][key])
            continue
        qs.append(_q(rec["x"]))
        t = len(qs)
        s = qs[-1] if (t <= f or t < w) else _gm(qs[-f:])
        np.testing.assert_allclose(rec["y"], rec["x"] / np.sqrt(s + 1e-5), rtol=1e-13)
        v = 0.9 * v + 0.1 * s
        np.testing.assert_allclose(rec["after"]["running_var"], v, rtol=1e-13)
        assert float(rec["after"]["iters"]) == t and float(rec["after"]["skip_counter"]) == 0


def _random_state(rng, c, f, fb, iters):
    return _state(c, f=f, fb=fb, var=rng.uniform(0.5, 2.0, c), ema=rng.standard_normal(c),
                  bx=rng.uniform(0.5, 2.0, (f, c)), bg=rng.standard_normal((fb, c)), iters=iters)


@given(seed=seeds, log_a=st.floats(-3, 3), iters=st.integers(0, 8), filtration=st.booleans())
def test_invariant_to_scaling_the_stream(seed, log_a, iters, filtration):
    """Every statistic of the forward is a quadratic mean: scaling x and the stored statistics
    (running_var, buffer_x2) by a > 0 and a^2 leaves y, the filter's decision, the backward
    state and a dx (times a) unchanged (eps -> 0); the new statistics scale by a^2."""
    rng = np.random.default_rng(seed)
    a = 10.0**log_a
    x, dy = rng.standard_normal((2, 3, 4)) * rng.uniform(0.3, 3.0, 4), rng.standard_normal((2, 3, 4))
    w = 1 + 0.5 * rng.standard_normal(4)
    state = _random_state(rng, 4, 3, 2, iters)
    scaled = {**state, "running_var": state["running_var"] * a * a, "buffer_x2": state["buffer_x2"] * a * a}
    hp = {"eps": TINY_EPS, "fp_window": 3, "bp_window": 2, "warmup_iters": 1, "compensation_start": 2,
          "outlier_filtration": filtration}
    assume(not near_outlier_threshold({"x": x, **state}, OP.spec.resolve(hp), 1e-9)["x"].any())
    y1, s1 = OP.apply({"x": x, "weight": w}, state, **hp)
    y2, s2 = OP.apply({"x": a * x, "weight": w}, scaled, **hp)
    np.testing.assert_allclose(y2["y"], y1["y"], rtol=1e-12, atol=1e-13 * np.abs(w).max())
    assert float(s2["skip_counter"]) == float(s1["skip_counter"])
    for key in ("running_var", "buffer_x2"):
        np.testing.assert_allclose(s2[key], s1[key] * a * a, rtol=1e-12)
    g1, b1 = OP.backward({"x": x, "weight": w}, state, {"y": dy}, **hp)
    g2, b2 = OP.backward({"x": a * x, "weight": w}, scaled, {"y": dy}, **hp)
    np.testing.assert_allclose(g2["x"] * a, g1["x"], rtol=1e-11, atol=1e-12 * np.abs(g1["x"]).max())
    np.testing.assert_allclose(g2["weight"], g1["weight"], rtol=1e-11, atol=1e-12)
    for key in b1:
        np.testing.assert_allclose(b2[key], b1[key], rtol=1e-11, atol=1e-12)


def _steady(rng, c, f, *, t):
    """A state whose window holds the same statistic q in every row (AM = GM) at step t - 1."""
    q = rng.uniform(0.5, 2.0, c)
    return _state(c, f=f, var=q, bx=np.tile(q, (f, 1)), iters=t - 1), q


def _with_quadratic_mean(rng, shape, q):
    """Data whose per-channel quadratic mean over R is exactly q (up to rounding)."""
    x = rng.standard_normal(shape)
    return x * np.sqrt(q / _q(x))


@given(seed=seeds, f=st.integers(1, 5), t=st.integers(1, 20), c=st.integers(1, 5))
def test_stationary_stream_is_never_filtered(seed, f, t, c):
    """Eq. 4: a window whose rows all hold this batch's statistic has AM = GM (computed exactly:
    the rescaled logarithms are log 1 = 0), so the gap AM - GM = 0 never exceeds F rho >= 0."""
    rng = np.random.default_rng(seed)
    state, q = _steady(rng, c, f, t=t)
    x = _with_quadratic_mean(rng, (2, 3, c), q)
    state["buffer_x2"] = np.tile(_q(x), (f, 1))  # q as computed, to the last bit
    hp = {"fp_window": f, "warmup_iters": 0, "outlier_filtration": True}
    _, new = OP.apply({"x": x}, state, **hp)
    assert float(new["skip_counter"]) == 0
    np.testing.assert_array_equal(geometric_mean(state["buffer_x2"]), _q(x))


@given(seed=seeds, f=st.integers(2, 5), spike=st.floats(30.0, 1e4), channel=st.integers(0, 3))
def test_outlier_batch_is_filtered(seed, f, spike, channel):
    """Eq. 4 on a steady window: a batch whose statistic jumps by `spike` in one channel opens
    the AM - GM gap beyond F rho; the step normalizes by the batch statistic (Eq. 5), writes the
    old running_var into the window, counts the skip, and r = 1 (dgamma = sum dy z)."""
    rng = np.random.default_rng(seed)
    c, t = 4, 10
    state, q = _steady(rng, c, f, t=t)
    q_new = q.copy()
    q_new[channel] *= spike
    x = _with_quadratic_mean(rng, (2, 3, c), q_new)
    dy = rng.standard_normal(x.shape)
    hp = {"fp_window": f, "warmup_iters": 0, "compensation_start": 0, "outlier_filtration": True}
    out, new = OP.apply({"x": x}, state, **hp)
    assert float(new["skip_counter"]) == 1
    s = _q(x)
    np.testing.assert_allclose(out["y"], x / np.sqrt(s + 1e-5), rtol=1e-14)
    expected_window = state["buffer_x2"].copy()
    expected_window[t % f] = state["running_var"]
    np.testing.assert_array_equal(new["buffer_x2"], expected_window)
    np.testing.assert_allclose(new["running_var"], 0.9 * state["running_var"] + 0.1 * s, rtol=1e-15)
    grads = OP.vjp({"x": x, "weight": np.ones(c)}, state, {"y": dy}, **hp)
    np.testing.assert_allclose(grads["weight"], np.sum(dy * out["y"], axis=R), rtol=1e-13)
    # Without the filter the same step normalizes by the window's geometric mean.
    unfiltered = OP.apply({"x": x}, state, **{**hp, "outlier_filtration": False})[0]["y"]
    window = state["buffer_x2"].copy()
    window[t % f] = s
    np.testing.assert_allclose(unfiltered, x / np.sqrt(_gm(window) + 1e-5), rtol=1e-13)


def test_filter_decision_near_its_threshold_is_marked():
    """The spec's ``discontinuities``: a window of one statistic repeated in every channel has
    AM - GM = 0 = F rho (a tie: rounding decides the official code's filter) and marks every x;
    a spike far past the threshold, the filter off, an inference step or a missing state mark
    nothing."""
    hp = OP.spec.resolve({"fp_window": 3, "warmup_iters": 0, "outlier_filtration": True})
    x = np.ones((2, 3, 4))
    state = _state(4, f=3, var=np.ones(4), bx=np.ones((3, 4)), iters=9)
    assert near_outlier_threshold({"x": x, **state}, hp, 1e-7)["x"].all()
    spike = x * np.array([1.0, 30.0, 1.0, 1.0])
    assert not near_outlier_threshold({"x": spike, **state}, hp, 1e-7)["x"].any()
    assert float(OP.apply({"x": spike}, state, **hp)[1]["skip_counter"]) == 1
    for changed in ({"outlier_filtration": False}, {"training": False}):
        assert not near_outlier_threshold({"x": x, **state}, {**hp, **changed}, 1e-7)["x"].any()
    assert not near_outlier_threshold({"x": x}, hp, 1e-7)["x"].any()


@given(seed=seeds)
def test_eval_folds_into_next_linear(seed):
    """Eq. 9: inference is x -> gamma x / sqrt(v + eps) + beta, so a Linear(W, c) after it is one
    Linear with W' = W diag(gamma / sqrt(v + eps)) and c' = W beta + c (the paper's point: UN
    costs nothing at inference)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, 5, 4))
    W, c = rng.standard_normal((6, 4)), rng.standard_normal(6)
    w, b = 1 + 0.5 * rng.standard_normal(4), rng.standard_normal(4)
    state = _random_state(rng, 4, 4, 4, iters=5000)
    y = OP.apply({"x": x, "weight": w, "bias": b}, state, training=False)[0]["y"]
    scale = w / np.sqrt(state["running_var"] + 1e-5)
    np.testing.assert_allclose(y @ W.T + c, x @ (W * scale).T + (W @ b + c), rtol=1e-12, atol=1e-12)


# --- the declared backward --------------------------------------------------------------------


def _check_true_gradient(x, w, b, state, dy, hp, wrt=("x", "weight", "bias"), rtol=1e-8):
    """The declared VJP (from ``state``) against finite differences of the forward (same state)."""
    given_inputs = {"x": x, "weight": w, "bias": b}
    held = {k: v for k, v in given_inputs.items() if k not in wrt}

    def f(inputs):
        return {"y": OP.apply({**held, **inputs}, state, **hp)[0]["y"]}

    def vjp(inputs, u):
        grads = OP.vjp({**held, **inputs}, state, u, **hp)
        return {k: grads[k] for k in inputs}

    check_vjp(f, vjp, {k: given_inputs[k] for k in wrt}, cotangent={"y": dy}, rtol=rtol)


def _inputs(rng, shape=(2, 3, 4)):
    x, dy = rng.standard_normal(shape), rng.standard_normal(shape)
    return x, dy, 1 + 0.5 * rng.standard_normal(shape[-1]), rng.standard_normal(shape[-1])


@pytest.mark.parametrize("iters", [0, 3, 50])
@given(seed=seeds, momentum=st.floats(0.0, 1.0))
def test_skipped_step_backward_is_true_gradient(seed, momentum, iters):
    """F = 1 skips every step (official: no window): s = q, r = 1 and c_t = mu_t = Lambda_t, so
    Eq. 14 is VJP-RMS, the exact gradient, whatever momentum and the backward state hold; the
    window G takes the old EMA and e moves toward Lambda."""
    rng = np.random.default_rng(seed)
    x, dy, w, b = _inputs(rng)
    state = _random_state(rng, 4, 1, 1, iters)
    hp = {"fp_window": 1, "bp_window": 1, "warmup_iters": 0, "compensation_start": 0, "momentum": momentum}
    _check_true_gradient(x, w, b, state, dy, hp)
    _, back = OP.backward({"x": x, "weight": w}, state, {"y": dy}, **hp)
    lam = np.mean(w * dy * x / np.sqrt(_q(x) + 1e-5), axis=R)
    np.testing.assert_allclose(back["buffer_gz"][0], state["ema_gz"], rtol=0)
    np.testing.assert_allclose(back["ema_gz"], momentum * state["ema_gz"] + (1 - momentum) * lam,
                               rtol=1e-12, atol=1e-14)


@pytest.mark.checks("skipped_step_backward_is_true_gradient")
def test_filtered_step_backward_is_true_gradient():
    """A step the outlier filter skips (a spike on a steady window, far beyond the threshold, so
    the finite differences do not cross it) is exact in every input."""
    rng = np.random.default_rng(7)
    state, q = _steady(rng, 4, 3, t=20)
    state["ema_gz"] = rng.standard_normal(4)
    x = _with_quadratic_mean(rng, (2, 3, 4), q * np.array([1.0, 500.0, 1.0, 1.0]))
    _, dy, w, b = _inputs(rng)
    hp = {"fp_window": 3, "warmup_iters": 0, "compensation_start": 0, "outlier_filtration": True}
    assert float(OP.apply({"x": x}, state, **hp)[1]["skip_counter"]) == 1
    _check_true_gradient(x, w, b, state, dy, hp)


@given(seed=seeds, t=st.integers(1, 4))
def test_batch_phase_backward_with_zero_momentum_is_true_gradient(seed, t):
    """m = 0 while s = q and mu = Lambda (t <= F, F_b) and r = 1: e_t = mu_t = Lambda_t (Eq. 12-13), so the official
    correction c_t = e_t is the current coefficient and Eq. 14 is the exact gradient; with m > 0
    it is not (the EMA lags)."""
    rng = np.random.default_rng(seed)
    x, dy, w, b = _inputs(rng)
    state = _random_state(rng, 4, 4, 4, t - 1)
    hp = {"fp_window": 4, "bp_window": 4, "warmup_iters": 0, "compensation_start": NEVER, "momentum": 0.0}
    _check_true_gradient(x, w, b, state, dy, hp)
    lagging = OP.vjp({"x": x, "weight": w}, state, {"y": dy}, **{**hp, "momentum": 0.9})["x"]
    exact = OP.vjp({"x": x, "weight": w}, state, {"y": dy}, **hp)["x"]
    assert np.max(np.abs(lagging - exact)) > 1e-6 * np.max(np.abs(exact))


@pytest.mark.parametrize(("f", "fb", "w", "filtration"), [(2, 2, 0, True), (3, 2, 4, False), (1, 3, 2, True)])
def test_backward_state_follows_its_recurrence(f, fb, w, filtration):
    """Eq. 11-14 stepped over a stream with spikes (filtered steps) and an inference step, from
    the forward's outputs alone (z = y without affine, r = 1): G's row t mod F_b takes Lambda_t
    (the old EMA on a skipped step), mu_t is Lambda_t or G's mean, e is the EMA of mu, and dx =
    (dy - c z) z / x with c = e_t (mu_t when skipped)."""
    hp = {"fp_window": f, "bp_window": fb, "warmup_iters": w, "compensation_start": NEVER,
          "outlier_filtration": filtration, "momentum": 0.8}
    records = _stream(hp, 9, c=3, scale=lambda k: 40.0 if k in (5, 7) else 1.0, eval_at=(3,))
    G, e = np.zeros((fb, 3)), np.zeros(3)
    skipped_any = False
    for rec in records:
        if rec["training"]:
            t = float(rec["before"]["iters"]) + 1
            skip = f == 1 or float(rec["after"]["skip_counter"]) > float(rec["before"]["skip_counter"])
            skipped_any |= skip and f > 1
            z = rec["y"]
            lam = np.mean(rec["dy"] * z, axis=R)
            G[int(t) % fb] = e if skip else lam
            mu = lam if (t <= fb or t < w or skip) else np.mean(G, axis=0)
            e = 0.8 * e + 0.2 * mu
            c = mu if skip else e
            np.testing.assert_allclose(rec["dx"], (rec["dy"] - c * z) * z / rec["x"], rtol=1e-10, atol=1e-13)
        else:
            np.testing.assert_allclose(rec["dx"], rec["dy"] * rec["y"] / rec["x"], rtol=1e-12)
        np.testing.assert_allclose(rec["after"]["buffer_gz"], G, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(rec["after"]["ema_gz"], e, rtol=1e-12, atol=1e-15)
    assert skipped_any == (filtration and f > 1)


@given(seed=seeds, r_max=st.floats(1.0, 3.0), log_v=st.floats(-1.5, 1.5), t=st.integers(4, 30))
def test_compensation_scales_gradients_by_clamped_ratio(seed, r_max, log_v, t):
    """Eq. 6, 10, 15 after t > max(T_c, W): r = clip(sqrt(s + eps)/sqrt(v + eps), 1/r_max, r_max)
    with s the window's geometric mean; with m = 0 and F_b = 1 the correction is r Lambda, so dx
    and dgamma are r times the uncompensated ones (the same step with T_c never reached)."""
    rng = np.random.default_rng(seed)
    x, dy, w, _ = _inputs(rng)
    state = _random_state(rng, 4, 3, 1, t - 1)
    state["running_var"] = state["running_var"] * 10.0**log_v
    hp = {"fp_window": 3, "bp_window": 1, "warmup_iters": 0, "compensation_start": 3, "momentum": 0.0,
          "r_max": r_max}
    window = state["buffer_x2"].copy()
    window[t % 3] = _q(x)
    ratio = np.sqrt(_gm(window) + 1e-5) / np.sqrt(state["running_var"] + 1e-5)
    r = np.clip(ratio, 1 / r_max, r_max)
    comp = OP.vjp({"x": x, "weight": w}, state, {"y": dy}, **hp)
    plain = OP.vjp({"x": x, "weight": w}, state, {"y": dy}, **{**hp, "compensation_start": NEVER})
    np.testing.assert_allclose(comp["x"], r * plain["x"], rtol=1e-12, atol=1e-14 * np.abs(comp["x"]).max())
    np.testing.assert_allclose(comp["weight"], r * plain["weight"], rtol=1e-12, atol=1e-14)
    # The forward does not see r.
    hp_never = {**hp, "compensation_start": NEVER}
    np.testing.assert_array_equal(OP.apply({"x": x}, state, **hp)[0]["y"], OP.apply({"x": x}, state, **hp_never)[0]["y"])


@pytest.mark.parametrize("phase", ["batch", "window", "compensated", "eval"])
def test_weight_and_bias_grads_are_exact_until_compensation(phase):
    """dbeta = sum dy is exact in every phase; dgamma = sum dy r z is exact while r = 1 (the
    batch and window phases before T_c, inference); after T_c it is r times the exact one."""
    rng = np.random.default_rng(11)
    x, dy, w, b = _inputs(rng)
    hp = {"fp_window": 2, "warmup_iters": 0, "compensation_start": NEVER, "outlier_filtration": False}
    iters = {"batch": 0, "window": 6, "compensated": 6, "eval": 6}[phase]
    if phase == "compensated":
        hp["compensation_start"] = 0
    if phase == "eval":
        hp["training"] = False
    state = _random_state(rng, 4, 2, 4, iters)
    state["running_var"] = state["running_var"] * 9.0  # r far from 1 once compensated
    if phase == "compensated":
        _check_true_gradient(x, w, b, state, dy, hp, wrt=("bias",))
        exact = OP.vjp({"x": x, "weight": w}, state, {"y": dy}, **{**hp, "compensation_start": NEVER})
        assert not np.allclose(OP.vjp({"x": x, "weight": w}, state, {"y": dy}, **hp)["weight"], exact["weight"])
    else:
        _check_true_gradient(x, w, b, state, dy, hp, wrt=("weight", "bias"))


def test_eval_backward_is_true_gradient():
    """Inference (Eq. 9) is linear in x: the VJP is exact in every input and the backward state
    is returned unchanged (the official eval path is autograd, no UN2dFunction)."""
    rng = np.random.default_rng(3)
    x, dy, w, b = _inputs(rng)
    state = _random_state(rng, 4, 4, 4, 5000)
    hp = {"training": False, "outlier_filtration": True}
    _check_true_gradient(x, w, b, state, dy, hp)
    _, back = OP.backward({"x": x, "weight": w, "bias": b}, state, {"y": dy}, **hp)
    for key in back:
        np.testing.assert_array_equal(back[key], state[key])


# --- the official code, restated ----------------------------------------------------------------


class _OfficialUN:
    """UN1d + UN2dFunction (hikvision-research/Unified-Normalization, unified_normalization.py,
    commit 0ce9bf2) restated channel by channel in plain Python floats and NumPy, with the
    official buffers and the official geometric mean exp(mean(log B))."""

    def __init__(self, c, window, warmup, filtration, weight, bias, momentum=0.9, eps=1e-5):
        self.f, self.fb = (window, window) if isinstance(window, int) else window
        self.warmup, self.filtration, self.m, self.eps = warmup, filtration, momentum, eps
        self.weight, self.bias = weight, bias
        self.running_var, self.ema_gz = np.ones(c), np.zeros(c)
        self.buffer_x2, self.buffer_gz = np.zeros((self.f, c)), np.zeros((self.fb, c))
        self.iters, self.skip_counter = 0, 0

    def step(self, x, dy, training):
        """One call (B, N, C) and its backward: (y, dx, dweight, dbias)."""
        c = x.shape[-1]
        rows = x.reshape(-1, c)
        g_rows = dy.reshape(-1, c)
        if not training:
            z = rows / np.sqrt(self.running_var + self.eps)
            return ((self.weight * z + self.bias).reshape(x.shape), (g_rows * self.weight / np.sqrt(
                self.running_var + self.eps)).reshape(x.shape), (g_rows * z).sum(0), g_rows.sum(0))
        self.iters += 1
        t = self.iters
        skip = self.f <= 1
        x2 = [float(np.mean(rows[:, j] ** 2)) for j in range(c)]
        recorded = float(np.var(np.sqrt(self.buffer_x2), ddof=1)) if self.buffer_x2.size > 1 else np.nan
        self.buffer_x2[t % self.f] = x2
        if t >= self.warmup and self.filtration:
            with np.errstate(divide="ignore"):
                am = self.buffer_x2.mean(0)
                gm = np.exp(np.mean(np.log(self.buffer_x2), 0))
            if any(am[j] - gm[j] > recorded * self.f for j in range(c)):
                self.buffer_x2[t % self.f] = self.running_var
                skip = True
                self.skip_counter += 1
        if t <= self.f or t < self.warmup or skip:
            var = np.array(x2)
        else:
            with np.errstate(divide="ignore"):  # log 0 = -inf, as torch.log
                var = np.exp(np.mean(np.log(self.buffer_x2), 0))
        r = np.sqrt(var + self.eps) / np.sqrt(self.running_var + self.eps)
        r = np.ones(c) if (t <= max(1000, self.warmup) or skip) else np.clip(r, 0.2, 5.0)
        z = rows / np.sqrt(var + self.eps)
        self.running_var = self.m * self.running_var + (1 - self.m) * var
        y = self.weight * z + self.bias
        # backward
        g = g_rows * self.weight * r
        gz = np.array([np.mean(g[:, j] * z[:, j]) for j in range(c)])
        self.buffer_gz[t % self.fb] = self.ema_gz if skip else gz
        mean_gz = gz if (t <= self.fb or t < self.warmup or skip) else self.buffer_gz.mean(0)
        self.ema_gz = self.ema_gz * self.m + (1 - self.m) * mean_gz
        approx = g - (mean_gz if skip else self.ema_gz) * z
        dx = approx / np.sqrt(var + self.eps)
        return y.reshape(x.shape), dx.reshape(x.shape), (g_rows * r * z).sum(0), g_rows.sum(0)

    def state(self):
        return _state(len(self.running_var), f=self.f, fb=self.fb, var=self.running_var, ema=self.ema_gz,
                      bx=self.buffer_x2, bg=self.buffer_gz, iters=self.iters, skips=self.skip_counter)


@pytest.mark.parametrize(("window", "warmup", "filtration", "offset"),
                         [(4, 4000, False, 0), (2, 0, True, 0), ((3, 2), 3, True, 995), ((2, 4), 0, False, 997),
                          (1, 0, False, 998)])
def test_official_code_matches_numpy_restatement(window, warmup, filtration, offset):
    """The op against the restated official layer for 12 calls (an inference call among them,
    statistics jumping by e^2.5 now and then, so the filter fires), outputs, all three gradients
    and every buffer, step by step; ``offset`` starts the counter near the official constant
    1000 so the compensation phase is reached (compensation_start = 1000, the default)."""
    rng = np.random.default_rng(len(str(window)) + warmup + offset)
    c = 5
    w, b = 1 + 0.3 * rng.standard_normal(c), rng.standard_normal(c)
    official = _OfficialUN(c, window, warmup + offset if warmup else 0, filtration, w, b)
    official.iters = offset
    hp = {"fp_window": official.f, "bp_window": official.fb, "warmup_iters": official.warmup,
          "outlier_filtration": filtration}
    state = official.state()
    skips = 0
    for k in range(12):
        training = k != 5
        x = rng.standard_normal((3, 4, c)) * np.exp(rng.normal(0, 2.5 if k % 4 == 3 else 0.5, c))
        dy = rng.standard_normal(x.shape)
        y, dx, dw, db = official.step(x, dy, training)
        inputs = {"x": x, "weight": w, "bias": b}
        out, new = OP.apply(inputs, state, training=training, **hp)
        grads, back = OP.backward(inputs, state, {"y": dy}, training=training, **hp)
        np.testing.assert_allclose(out["y"], y, rtol=1e-13, atol=1e-13, err_msg=f"y, step {k}")
        for key, ref in (("x", dx), ("weight", dw), ("bias", db)):
            np.testing.assert_allclose(grads[key], ref, rtol=1e-12, atol=1e-13, err_msg=f"d{key}, step {k}")
        expected = official.state()
        for key, value in {**new, **back}.items():
            np.testing.assert_allclose(value, expected[key], rtol=1e-12, atol=1e-14, err_msg=f"{key}, step {k}")
        skips = official.skip_counter
        state = {**new, **back}
    assert (skips > 0) == filtration


# --- the harness flags plausible wrong implementations ----------------------------------------


class _UN(Mutant):
    """The oracle's formulas in the request dtype (tests/mutants.py; the VJP's backward-pass
    state buffer_gz, ema_gz goes into the response like forward state)."""

    op = "unified_norm"
    dtypes = ("float64",)  # the mistakes do not depend on the rounding


class UNArithmeticWindowMean(_UN):
    """The forward window averages the batch statistics arithmetically (``buffer_x2.mean(0)``),
    the backward's rule, instead of the geometric mean the forward's smoothing uses."""

    def forward(self, a, hp):
        out, state = self.oracle(a, hp)
        t = float(a["iters"]) + 1
        skipped = hp["fp_window"] == 1 or float(state["skip_counter"]) > float(a["skip_counter"])
        if hp["training"] and not (t <= hp["fp_window"] or t < hp["warmup_iters"] or skipped):
            x = a["x"]
            axis = hp["axis"] % x.ndim
            shape = [1] * x.ndim
            shape[axis] = x.shape[axis]
            s = np.mean(state["buffer_x2"], axis=0)  # the mistake: AM, not GM
            z = x / np.sqrt(s.reshape(shape) + hp["eps"])
            out["y"] = z * (1 if a.get("weight") is None else a["weight"].reshape(shape)) + (
                0 if a.get("bias") is None else a["bias"].reshape(shape))
            state["running_var"] = hp["momentum"] * a["running_var"] + (1 - hp["momentum"]) * s
        return out, state


class UNCorrectionWithOldEma(_UN):
    """The backward subtracts the EMA of the previous step (e_{t-1}, read before its update) in
    Eq. 14, where the official code updates e first and subtracts e_t."""

    def backward(self, ct, a, hp):
        grads, updated = self.oracle_vjp(ct, a, hp)
        if hp["training"]:
            x = a["x"]
            axis = hp["axis"] % x.ndim
            p = _un._forward(x, _un._state(x, axis, hp["fp_window"], hp["bp_window"], **{
                k: a[k] for k in ("running_var", "ema_gz", "buffer_x2", "buffer_gz", "iters", "skip_counter")}),
                **{k: hp[k] for k in ("training", "eps", "fp_window", "warmup_iters", "outlier_filtration",
                                      "compensation_start", "r_max")}, axis=axis)
            if not p.skip:  # dx = (g - c z) / sqrt(s + eps): c = e_{t-1} instead of e_t
                shape = [1] * x.ndim
                shape[axis] = x.shape[axis]
                delta = np.reshape(updated["ema_gz"] - a["ema_gz"], shape)
                grads["x"] = grads["x"] + delta * p.z * p.inv_s
        return grads, updated


@pytest.mark.xdist_group("unified_norm")
@pytest.mark.parametrize("cls", [UNArithmeticWindowMean, UNCorrectionWithOldEma], ids=lambda c: c.__name__)
def test_mutants_are_flagged(cls):
    flagged, results = flagged_cases(cls())
    assert flagged >= MIN_FLAGGED, f"{cls.__name__} flagged by {flagged} cases:\n{verdict_table(results)}"


@pytest.mark.xdist_group("unified_norm")
def test_the_unmutated_control_is_not_flagged():
    """The mutants' plumbing without a mistake: no FAIL, ERROR or CONVENTION."""

    class _Control(_UN):
        """No mistake."""

    _, results = run_mutant(_Control())
    flagged = [r for r in results if r.verdict in ("FAIL", "ERROR", "CONVENTION")]
    assert not flagged, verdict_table(flagged)
