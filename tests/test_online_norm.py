"""Online Normalization: forward vs mpmath on adversarial data, the paper's properties, the
declared (control-process) backward and its backward-pass state, a loop transcription of the
equations, and harness mutants (the backward without the control process, the statistics updated
before the sample they normalize)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reference
from conformance import check_vjp, runner
from conformance.cases import ADVERSARIAL, adversarial
from helpers import mp, mp_array, mp_sqrt, relative_error, verdict_table
from mutants import Mutant
from reference.normalizers.online_norm import online_norm

OP = reference.get("online_norm")
RNG = np.random.default_rng(20190514)
TINY_EPS = 1e-300  # eps -> 0: the identities of the stationary limit then hold up to rounding


def _state(c, *, mean=None, var=None, u=None, v=None):
    def given_or(value, default):
        return np.full(c, default) if value is None else np.asarray(value, dtype=np.float64)

    return {"running_mean": given_or(mean, 0.0), "running_var": given_or(var, 1.0),
            "u": given_or(u, 0.0), "v": given_or(v, 0.0)}


def _random_state(rng, c, *, controls=True):
    return _state(c, mean=rng.standard_normal(c), var=rng.uniform(0.3, 3.0, c),
                  u=rng.standard_normal(c) if controls else None, v=rng.standard_normal(c) if controls else None)


def _positions(x):
    """The position axes of an NCHW / NC array (none for NC): <a, b> averages over them."""
    return tuple(range(2, x.ndim))


def _inner(a, b):
    axes = _positions(a)
    return np.mean(a * b, axis=axes) if axes else a * b


# --- an independent transcription: Eq. 8, 11, 12 element by element ---------------------------


def _loop_step(x, dy, weight, bias, state, *, training, eps, alpha_fwd, alpha_bkw, ecm, ls_eps,
               clamp_value):
    """One call of the layer (NCHW or NC), written from the equations with explicit loops over the
    samples, channels and positions, composed as the official module: norm -> *gamma -> +beta ->
    ECM, the ECM also in inference, the clamp's VJP zero where the output equals +-c.  Returns the
    output, the gradients of <dy, out> and the new state."""
    N, C = x.shape[:2]
    xs, dys = x.reshape(N, C, -1), dy.reshape(N, C, -1)
    n = xs.shape[2]
    m, s2 = state["running_mean"].copy(), state["running_var"].copy()
    u, v = state["u"].copy(), state["v"].copy()
    y, scale = np.empty_like(xs), np.empty((N, C))
    for t in range(N):
        for c in range(C):
            scale[t, c] = np.sqrt(s2[c] + eps)
            for i in range(n):
                y[t, c, i] = (xs[t, c, i] - m[c]) / scale[t, c]                       # (8a)
            if training:
                mu = sum(xs[t, c]) / n
                var = sum((xs[t, c, i] - mu) ** 2 for i in range(n)) / n
                s2[c] = alpha_fwd * s2[c] + (1 - alpha_fwd) * var + alpha_fwd * (1 - alpha_fwd) * (mu - m[c]) ** 2
                m[c] = alpha_fwd * m[c] + (1 - alpha_fwd) * mu                        # (8b)
    w = np.ones(C) if weight is None else weight
    b = np.zeros(C) if bias is None else bias
    z = y * w[None, :, None] + b[None, :, None]
    out, dz = np.empty_like(z), np.empty_like(z)
    for t in range(N):
        if ecm == "ls":   # x / sqrt(mean(x^2) + eps) over the sample's features, and its VJP
            r = np.sqrt(np.mean(z[t] ** 2) + ls_eps)
            out[t] = z[t] / r
            dz[t] = (dys[t] - out[t] * np.mean(dys[t] * out[t])) / r
        elif ecm == "ac":
            out[t] = np.clip(z[t], -clamp_value, clamp_value)
            dz[t] = np.where(np.abs(out[t]) == clamp_value, 0.0, dys[t])
        else:
            out[t], dz[t] = z[t], dys[t]
    yp = dz * w[None, :, None]
    dx = np.empty_like(yp)
    for t in range(N):
        for c in range(C):
            if not training:
                dx[t, c] = yp[t, c] / scale[t, c]
                continue
            g = yp[t, c] - (1 - alpha_bkw) * v[c] * y[t, c]                            # (11a)
            v[c] = v[c] + sum(g * y[t, c]) / n                                         # (11b)
            dx[t, c] = g / scale[t, c] - (1 - alpha_bkw) * u[c]                         # (12a)
            u[c] = u[c] + sum(dx[t, c]) / n                                            # (12b)
    grads = {"x": dx.reshape(x.shape), "weight": np.sum(dz * y, axis=(0, 2)), "bias": np.sum(dz, axis=(0, 2))}
    return out.reshape(x.shape), grads, {"running_mean": m, "running_var": s2, "u": u, "v": v}


HP = {"eps": 1e-5, "alpha_fwd": 0.9, "alpha_bkw": 0.8, "ls_eps": 1e-5, "clamp_value": 1.5}


@pytest.mark.parametrize("ecm", ["ls", "ac", "none"])
@pytest.mark.parametrize("shape", [(6, 3), (5, 3, 2, 3)], ids=["fully_connected", "conv"])
@pytest.mark.parametrize("axis", [1, -1], ids=["channels_first", "channels_last"])
def test_matches_a_loop_transcription_of_the_equations(shape, ecm, axis):
    """Five calls (train, train, inference, train, train) against the transcription: outputs,
    gradients and the whole state, the state carried from call to call."""
    c = shape[1]
    w, b = 1 + 0.4 * RNG.standard_normal(c), 0.5 * RNG.standard_normal(c)
    hp = {**HP, "ecm": ecm}
    state = _state(c)
    for k in range(5):
        training = k != 2
        x, dy = RNG.standard_normal(shape) * (1 + k) + 0.3 * k, RNG.standard_normal(shape)
        ref_out, ref_grads, ref_state = _loop_step(x, dy, w, b, state, training=training, **hp)
        if axis == -1:  # the same call with the channels last
            x, dy = np.moveaxis(x, 1, -1), np.moveaxis(dy, 1, -1)
            ref_out, ref_grads["x"] = np.moveaxis(ref_out, 1, -1), np.moveaxis(ref_grads["x"], 1, -1)
        inputs = {"x": x, "weight": w, "bias": b}
        out, new = OP.apply(inputs, state, training=training, axis=axis, **hp)
        grads, back = OP.backward(inputs, state, {"y": dy}, training=training, axis=axis, **hp)
        np.testing.assert_allclose(out["y"], ref_out, rtol=1e-13, atol=1e-14, err_msg=f"out, call {k}")
        for key, ref in ref_grads.items():
            np.testing.assert_allclose(grads[key], ref, rtol=1e-12, atol=1e-13, err_msg=f"d{key}, call {k}")
        for key, ref in ref_state.items():
            got = back[key] if key in ("u", "v") else new[key]
            np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-13, err_msg=f"{key}, call {k}")
        state = {**new, **back}


def test_the_human_api_starts_from_the_initial_state():
    x = RNG.standard_normal((3, 4))
    out, state = online_norm(x, ecm="none")
    np.testing.assert_allclose(out[0], x[0] / np.sqrt(1 + 1e-5), rtol=1e-15)   # mu_0 = 0, sigma^2_0 = 1
    np.testing.assert_array_equal(state["u"], 0.0)
    np.testing.assert_array_equal(state["v"], 0.0)
    assert OP.spec.backward_state == ("u", "v") and OP.spec.backward == "custom"


def test_dialect_values():
    assert OP.dialect("paper")["ecm"] == "ls" and OP.spec.hparams["ecm"].default == "ls"
    official = OP.dialect("official")
    assert official["ecm"] == "ac" and official["clamp_value"] == 5.0
    assert (official["alpha_fwd"], official["alpha_bkw"], official["eps"]) == (0.999, 0.99, 1e-5)
    assert OP.dialect("norm_only")["ecm"] == "none"


# --- forward accuracy -------------------------------------------------------------------------


def mp_online_step(x, weight, bias, state, *, eps, alpha_fwd, ecm, ls_eps):
    """One sample (shape (1, C, *S)) through Eq. 8 and the ECM at 50 digits from the float64
    state: ``(out, mu_1, sigma^2_1)``."""
    mpmath = mp()
    X = mp_array(x)
    axes = _positions(x)
    n = int(np.prod([x.shape[a] for a in axes])) if axes else 1
    a, one = mpmath.mpf(alpha_fwd), mpmath.mpf(1)
    m = mp_array(state["running_mean"]).reshape(1, -1, *([1] * len(axes)))
    s2 = mp_array(state["running_var"]).reshape(m.shape)
    y = (X - m) / mp_sqrt(s2 + mpmath.mpf(eps))
    mu = np.sum(X, axis=axes, keepdims=True) / n if axes else X
    var = np.sum((X - mu) ** 2, axis=axes, keepdims=True) / n if axes else 0 * X
    s2_new = a * s2 + (one - a) * var + a * (one - a) * (mu - m) ** 2
    m_new = a * m + (one - a) * mu
    z = y * mp_array(weight).reshape(m.shape) + mp_array(bias).reshape(m.shape)
    if ecm == "ls":
        ms = np.sum(z * z) / z.size
        z = z / mpmath.sqrt(ms + mpmath.mpf(ls_eps))
    return z, m_new.reshape(-1), s2_new.reshape(-1)


@pytest.mark.parametrize("ecm", ["none", "ls"])
@pytest.mark.parametrize("start", ["initial", "on_the_data"])
@pytest.mark.parametrize("shape", [(4, 3), (3, 3, 2, 3)], ids=["fully_connected", "conv"])
@pytest.mark.parametrize("family", sorted(ADVERSARIAL))
def test_forward_matches_mpmath_on_adversarial_data(family, shape, start, ecm):
    """Each sample's output and statistics against 50 digits from the float64 state it is
    normalized with (the stream is a sequence of single-sample calls: tested bitwise below).
    ``on_the_data`` starts from statistics near the data's (a converged stream: x - mu cancels)."""
    x = adversarial(family, shape)
    c = shape[1]
    weight, bias = 1 + 0.5 * RNG.standard_normal(c), RNG.standard_normal(c)
    state = _state(c)
    if start == "on_the_data":
        axes = (0, *_positions(x))
        spread = np.std(x, axis=axes)
        state = _state(c, mean=np.mean(x, axis=axes) + 0.5 * spread * RNG.standard_normal(c),
                       var=np.maximum(spread**2, 1e-300) * RNG.uniform(0.5, 2.0, c))
    hp = {"eps": 1e-5 if family != "tiny_1e-150" else 1e-300, "alpha_fwd": 0.9, "ecm": ecm, "ls_eps": 1e-5}
    for t in range(shape[0]):
        sample = x[t:t + 1]
        out, new = OP.apply({"x": sample, "weight": weight, "bias": bias}, state, **hp)
        out_mp, mean_mp, var_mp = mp_online_step(sample, weight, bias, state, **{k: hp[k] for k in hp})
        err = relative_error(out["y"], out_mp)
        assert err <= 1e-14, f"{family}, sample {t}: relative error {err:.3g}"
        assert relative_error(new["running_mean"], mean_mp) <= 1e-15
        assert relative_error(new["running_var"], var_mp) <= 1e-15
        state = {**state, **{k: new[k] for k in ("running_mean", "running_var")}}


# --- forward properties -----------------------------------------------------------------------

streams = st.sampled_from([(5, 3), (4, 2, 3), (3, 2, 2, 3)])   # (N, C, *S)


@given(shape=streams, seed=st.integers(0, 2**32 - 1), eps=st.floats(1e-8, 1.0))
def test_first_sample_uses_the_given_statistics(shape, seed, eps):
    """Eq. 8a at t = 1: the first sample is normalized with the statistics given in the state,
    whatever the later samples are (the official buffers' 0 and 1 at the start of training)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * 3 + 1
    state = _random_state(rng, shape[1], controls=False)
    out = OP.apply({"x": x}, state, eps=eps, ecm="none")[0]["y"]
    lay = (1, -1) + (1,) * (x.ndim - 2)
    m, s2 = state["running_mean"].reshape(lay), state["running_var"].reshape(lay)
    np.testing.assert_allclose(out[:1], (x[:1] - m) / np.sqrt(s2 + eps), rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("ecm", ["ls", "ac", "none"])
@given(shape=streams, seed=st.integers(0, 2**32 - 1), k=st.integers(1, 2))
def test_causal_in_sample_order(shape, seed, k, ecm):
    """Sample t is normalized with the samples before it, and its gradient controlled by the
    cotangents before it: changing the samples from k on (inputs and cotangents) leaves the
    outputs and input gradients of samples < k bitwise unchanged; moving sample k earlier
    changes what follows."""
    rng = np.random.default_rng(seed)
    x, dy = rng.standard_normal(shape), rng.standard_normal(shape)
    state = _random_state(rng, shape[1])
    x2, dy2 = x.copy(), dy.copy()
    x2[k:] += 1 + rng.standard_normal(x2[k:].shape)
    dy2[k:] = rng.standard_normal(dy2[k:].shape)
    hp = {"ecm": ecm, "alpha_fwd": 0.7, "alpha_bkw": 0.6, "clamp_value": 1.5}
    for a, b in ((OP.apply({"x": x}, state, **hp)[0]["y"], OP.apply({"x": x2}, state, **hp)[0]["y"]),
                 (OP.vjp({"x": x}, state, {"y": dy}, **hp)["x"], OP.vjp({"x": x2}, state, {"y": dy2}, **hp)["x"])):
        np.testing.assert_array_equal(a[:k], b[:k])
    swapped = np.concatenate([x[k:k + 1], x[:k], x[k + 1:]])
    later = OP.apply({"x": swapped}, state, **hp)[0]["y"][k + 1:]
    if later.size and ecm != "ac":
        assert np.max(np.abs(later - OP.apply({"x": x}, state, **hp)[0]["y"][k + 1:])) > 0


@pytest.mark.parametrize(("shape", "axis"), [((5, 3), 1), ((4, 3, 2, 3), 1), ((4, 2, 3, 3), -1)],
                         ids=["fully_connected", "conv", "channels_last"])
@pytest.mark.parametrize("ecm", ["ls", "ac", "none"])
def test_a_batch_is_a_stream_of_single_samples(shape, axis, ecm):
    """N samples in one call = N calls of one sample each, forward state and backward state
    carried from call to call, bitwise: the batch is only a way to pass the stream."""
    x, dy = RNG.standard_normal(shape) * 2 + 1, RNG.standard_normal(shape)
    c = x.shape[axis]
    w, b = 1 + 0.4 * RNG.standard_normal(c), RNG.standard_normal(c)
    hp = {"ecm": ecm, "axis": axis, "alpha_fwd": 0.8, "alpha_bkw": 0.7, "clamp_value": 1.5}
    state = _random_state(RNG, c)
    out, new = OP.apply({"x": x, "weight": w, "bias": b}, state, **hp)
    grads, back = OP.backward({"x": x, "weight": w, "bias": b}, state, {"y": dy}, **hp)
    carried, outs, dxs, dws = dict(state), [], [], []
    for t in range(shape[0]):
        inputs = {"x": x[t:t + 1], "weight": w, "bias": b}
        o, n = OP.apply(inputs, carried, **hp)
        g, bk = OP.backward(inputs, carried, {"y": dy[t:t + 1]}, **hp)
        outs.append(o["y"])
        dxs.append(g["x"])
        dws.append(g["weight"])
        carried = {**n, **bk}
    np.testing.assert_array_equal(np.concatenate(outs), out["y"])
    np.testing.assert_array_equal(np.concatenate(dxs), grads["x"])
    np.testing.assert_allclose(np.sum(dws, axis=0), grads["weight"], rtol=1e-13, atol=1e-13)
    for key in ("running_mean", "running_var"):
        np.testing.assert_array_equal(carried[key], new[key])
    for key in ("u", "v"):
        np.testing.assert_array_equal(carried[key], back[key])


@given(shape=streams, seed=st.integers(0, 2**32 - 1), alpha=st.floats(0.0, 1.0))
def test_running_statistics_are_exponentially_weighted_moments(shape, seed, alpha):
    """Eq. 8b-8c are the exponentially weighted mean and variance of the stream's values:
    mu_N = a^N mu_0 + (1-a) sum_t a^(N-t) mean(x_t), and with the second moment
    s_N = a^N (sigma^2_0 + mu_0^2) + (1-a) sum_t a^(N-t) mean(x_t^2), sigma^2_N = s_N - mu_N^2."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * rng.uniform(0.5, 2.0) + rng.uniform(-1.0, 1.0)
    state = _random_state(rng, shape[1], controls=False)
    new = OP.apply({"x": x}, state, alpha_fwd=alpha)[1]
    axes = _positions(x)
    mean_t = np.mean(x, axis=axes) if axes else x
    square_t = np.mean(x * x, axis=axes) if axes else x * x
    n = shape[0]
    weights = (1 - alpha) * alpha ** np.arange(n - 1, -1, -1)
    mu = alpha**n * state["running_mean"] + weights @ mean_t
    s = alpha**n * (state["running_var"] + state["running_mean"] ** 2) + weights @ square_t
    np.testing.assert_allclose(new["running_mean"], mu, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(new["running_var"], s - mu**2, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("ecm", ["ls", "ac", "none"])
@given(shape=streams, seed=st.integers(0, 2**32 - 1))
def test_frozen_statistics_forward_is_the_eval_map(shape, seed, ecm):
    """alpha_fwd = 1: Eq. 8b-8c leave the statistics as they are, and a training call computes
    the inference map (the affine map of x with the stored statistics, then the ECM) bitwise."""
    rng = np.random.default_rng(seed)
    x, w, b = rng.standard_normal(shape) * 2, rng.standard_normal(shape[1]), rng.standard_normal(shape[1])
    state = _random_state(rng, shape[1])
    hp = {"ecm": ecm, "alpha_fwd": 1.0, "clamp_value": 1.0}
    train, new = OP.apply({"x": x, "weight": w, "bias": b}, state, **hp)
    evaluated, same = OP.apply({"x": x, "weight": w, "bias": b}, state, training=False, **hp)
    np.testing.assert_array_equal(train["y"], evaluated["y"])
    for key in state:
        np.testing.assert_array_equal(new[key], state[key])
        np.testing.assert_array_equal(same[key], state[key])


@given(shape=streams, seed=st.integers(0, 2**32 - 1), ls_eps=st.floats(1e-8, 1.0))
def test_layer_scaling_gives_unit_rms_per_sample(shape, seed, ls_eps):
    """ecm = ls: each sample's output is the affine output divided by its root mean square over
    all features (channels and positions), so mean_F out^2 = ms / (ms + ls_eps) per sample."""
    rng = np.random.default_rng(seed)
    x, w, b = rng.standard_normal(shape) * 3, rng.standard_normal(shape[1]), rng.standard_normal(shape[1])
    state = _random_state(rng, shape[1], controls=False)
    z = OP.apply({"x": x, "weight": w, "bias": b}, state, ecm="none")[0]["y"]
    out = OP.apply({"x": x, "weight": w, "bias": b}, state, ecm="ls", ls_eps=ls_eps)[0]["y"]
    features = tuple(range(1, x.ndim))
    ms = np.mean(z * z, axis=features)
    np.testing.assert_allclose(np.mean(out * out, axis=features), ms / (ms + ls_eps), rtol=1e-13)
    np.testing.assert_allclose(out, z / np.sqrt(ms + ls_eps).reshape(-1, *([1] * (x.ndim - 1))), rtol=1e-14)


@given(shape=streams, seed=st.integers(0, 2**32 - 1), c=st.floats(0.25, 3.0))
def test_activation_clamping_bounds_the_output(shape, seed, c):
    """ecm = ac: out = clip(z, -c, c) (|out| <= c), and the gradient stops where the clamp is
    active: in inference dx is exactly 0 there (elsewhere gamma dy / sigma)."""
    rng = np.random.default_rng(seed)
    x, dy = rng.standard_normal(shape) * 2, rng.standard_normal(shape)
    w, b = rng.standard_normal(shape[1]), rng.standard_normal(shape[1])
    state = _random_state(rng, shape[1])
    inputs = {"x": x, "weight": w, "bias": b}
    z = OP.apply(inputs, state, ecm="none")[0]["y"]
    out = OP.apply(inputs, state, ecm="ac", clamp_value=c)[0]["y"]
    assert np.all(np.abs(out) <= c)
    np.testing.assert_array_equal(out, np.clip(z, -c, c))
    z_eval = OP.apply(inputs, state, ecm="none", training=False)[0]["y"]
    dx = OP.vjp(inputs, state, {"y": dy}, ecm="ac", clamp_value=c, training=False)["x"]
    lay = (1, -1) + (1,) * (x.ndim - 2)
    free = np.abs(z_eval) < c
    np.testing.assert_array_equal(dx[~free], 0.0)
    expected = (w.reshape(lay) * dy / np.sqrt(state["running_var"].reshape(lay) + 1e-5))[free]
    np.testing.assert_allclose(dx[free], expected, rtol=1e-14)


# --- the declared backward --------------------------------------------------------------------


def _away_from_the_clamp(inputs, state, hp, margin=0.05):
    """Whether no pre-clamp value lies within ``margin`` of +-c (finite differences across the
    clamp's kink would measure the jump, not the slope)."""
    z = OP.apply(inputs, state, **{**hp, "ecm": "none"})[0]["y"]
    return bool(np.all(np.abs(np.abs(z) - hp["clamp_value"]) > margin))


def _check_true_gradient(inputs, state, dy, hp, wrt=("x", "weight", "bias")):
    """The declared VJP against finite differences of the forward (same state) for ``wrt``."""
    held = {k: v for k, v in inputs.items() if k not in wrt}

    def f(given):
        return {"y": OP.apply({**held, **given}, state, **hp)[0]["y"]}

    def vjp(given, u):
        grads = OP.vjp({**held, **given}, state, u, **hp)
        return {k: grads[k] for k in given}

    check_vjp(f, vjp, {k: inputs[k] for k in wrt}, cotangent={"y": dy}, rtol=1e-8)


def _drawn(seed, shape, hp):
    """Inputs, cotangent and a random state, redrawn until the clamp (if any) is not within reach
    of the finite differences."""
    rng = np.random.default_rng(seed)
    while True:
        x, dy = rng.standard_normal(shape), rng.standard_normal(shape)
        inputs = {"x": x, "weight": 1 + 0.5 * rng.standard_normal(shape[1]), "bias": rng.standard_normal(shape[1])}
        state = _random_state(rng, shape[1])
        if hp["ecm"] != "ac" or _away_from_the_clamp(inputs, state, hp):
            return inputs, dy, state


@pytest.mark.parametrize("ecm", ["ls", "ac", "none"])
@pytest.mark.parametrize("shape", [(4, 3), (3, 2, 2, 3)], ids=["fully_connected", "conv"])
def test_frozen_processes_backward_is_true_gradient(shape, ecm):
    """alpha_fwd = alpha_bkw = 1: the statistics do not move and the corrections (1 - a_b) eps
    vanish, so the forward is a fixed affine map followed by the ECM and Eq. 11-12 give its exact
    gradient, the ECM's VJP (VJP-RMS of layer scaling, the clamp's mask) included."""
    hp = {"ecm": ecm, "alpha_fwd": 1.0, "alpha_bkw": 1.0, "clamp_value": 1.0}
    inputs, dy, state = _drawn(3, shape, hp)
    _check_true_gradient(inputs, state, dy, hp)


@pytest.mark.parametrize("ecm", ["ls", "ac", "none"])
@pytest.mark.parametrize("phase", [{"training": True}, {"training": False}], ids=["training", "inference"])
def test_weight_and_bias_grads_are_exact(ecm, phase):
    """dgamma = sum dz y and dbeta = sum dz are the true gradients in every phase and for every
    ECM, whatever the statistics and the accumulators hold (the statistics depend on x only)."""
    hp = {"ecm": ecm, "alpha_fwd": 0.7, "alpha_bkw": 0.6, "clamp_value": 1.0, **phase}
    for shape in ((5, 3), (3, 2, 2, 3)):
        inputs, dy, state = _drawn(7, shape, hp)
        _check_true_gradient(inputs, state, dy, hp, wrt=("weight", "bias"))


@pytest.mark.parametrize("ecm", ["ls", "ac", "none"])
def test_eval_backward_is_true_gradient(ecm):
    """Inference is the map x -> ECM(gamma (x - mu)/sqrt(sigma^2 + eps) + beta): its VJP is exact,
    and the backward pass leaves u and v alone."""
    hp = {"ecm": ecm, "training": False, "clamp_value": 1.0}
    for shape in ((5, 3), (3, 2, 2, 3)):
        inputs, dy, state = _drawn(11, shape, hp)
        _check_true_gradient(inputs, state, dy, hp)
        _, back = OP.backward(inputs, state, {"y": dy}, **hp)
        for key in ("u", "v"):
            np.testing.assert_array_equal(back[key], state[key])


def _streamed(x, state, hp):
    """y_t and sqrt(sigma^2_{t-1} + eps) of every sample, from single-sample calls (ecm none, no
    affine map: the output is y)."""
    ys, scales, carried = [], [], dict(state)
    for t in range(x.shape[0]):
        lay = (1, -1) + (1,) * (x.ndim - 2)
        scales.append(np.sqrt(carried["running_var"] + hp["eps"]).reshape(lay))
        out, new = OP.apply({"x": x[t:t + 1]}, carried, **hp)
        ys.append(out["y"])
        carried = {**carried, **new}
    return np.concatenate(ys), np.concatenate(scales)


@given(seed=st.integers(0, 2**32 - 1), alpha_bkw=st.floats(0.05, 0.95))
def test_fixed_point_controls_orthogonalize_each_sample(seed, alpha_bkw):
    """The fixed points of Eq. 11 and 12: with eps^(y) = <y', y> / ((1 - a_b) <y, y>) the
    corrected gradient x~' is orthogonal to y and v stays; with eps^(1) = <x~'/sigma, 1> / (1 - a_b)
    the produced gradient has zero mean over the positions and u stays (per channel, any state)."""
    rng = np.random.default_rng(seed)
    x, dy = rng.standard_normal((1, 3, 2, 3)) * 2 + 1, rng.standard_normal((1, 3, 2, 3))
    w = 1 + 0.5 * rng.standard_normal(3)
    hp = {"ecm": "none", "alpha_bkw": alpha_bkw, "eps": 1e-5}
    state = _random_state(rng, 3, controls=False)
    y, scale = _streamed(x, state, hp)
    yp = w.reshape(1, -1, 1, 1) * dy
    gain = 1.0 - alpha_bkw
    v0 = (_inner(yp, y) / _inner(y, y))[0] / gain
    corrected = yp - gain * v0.reshape(1, -1, 1, 1) * y
    u0 = _inner(corrected / scale, 1.0)[0] / gain
    state = {**state, "u": u0, "v": v0}
    grads, back = OP.backward({"x": x, "weight": w}, state, {"y": dy}, **hp)
    size = np.max(np.abs(yp / scale))
    np.testing.assert_allclose(_inner(grads["x"], 1.0), 0.0, atol=1e-14 * size)
    x_tilde = (grads["x"] + gain * u0.reshape(1, -1, 1, 1)) * scale
    np.testing.assert_allclose(_inner(x_tilde, y), 0.0, atol=1e-14 * size * np.max(np.abs(y)) * np.max(scale))
    np.testing.assert_allclose(back["v"], v0, rtol=1e-13, atol=1e-14 * np.max(np.abs(v0)))
    np.testing.assert_allclose(back["u"], u0, rtol=1e-13, atol=1e-14 * np.max(np.abs(u0)))


@pytest.mark.parametrize("shape", [(6, 3), (5, 3, 2, 2)], ids=["fully_connected", "conv"])
@given(seed=st.integers(0, 2**32 - 1), alpha_bkw=st.floats(0.3, 1.0))
def test_projections_accumulate_in_the_controls(seed, alpha_bkw, shape):
    """The errors feed back: over a call, the produced gradients' projections onto 1 sum to the
    change of u, sum_t <x'_t, 1> = u_N - u_0, and the y-corrected gradients'
    x~'_t = (x'_t + (1 - a_b) u_{t-1}) sigma_{t-1} project onto y_t by v_N - v_0 in total
    (Eq. 11b, 12b): what the corrections leave is kept, to be removed later."""
    rng = np.random.default_rng(seed)
    x, dy = rng.standard_normal(shape) * 2, rng.standard_normal(shape)
    hp = {"ecm": "none", "alpha_bkw": alpha_bkw, "alpha_fwd": 0.8, "eps": 1e-5}
    state = _random_state(rng, shape[1])
    grads, back = OP.backward({"x": x}, state, {"y": dy}, **hp)
    y, scale = _streamed(x, state, hp)
    dx = grads["x"]
    ones = _inner(dx, 1.0)                                            # <x'_t, 1>, (N, C)
    u_before = state["u"] + np.concatenate([np.zeros((1, shape[1])), np.cumsum(ones, axis=0)[:-1]])
    lay = (shape[0], shape[1]) + (1,) * (len(shape) - 2)
    x_tilde = (dx + (1 - alpha_bkw) * u_before.reshape(lay)) * scale
    size = np.max(np.abs(dy)) * shape[0]
    np.testing.assert_allclose(np.sum(ones, axis=0), back["u"] - state["u"], rtol=1e-12, atol=1e-13 * size)
    np.testing.assert_allclose(np.sum(_inner(x_tilde, y), axis=0), back["v"] - state["v"], rtol=1e-11,
                               atol=1e-12 * size * np.max(np.abs(y)))


def _population_gradient(x, dy):
    """The true gradient of batch normalization over samples and positions (eps -> 0), from the
    BatchNorm oracle: the gradient of normalizing with the population's own statistics."""
    return reference.get("batch_norm").vjp({"x": x}, None, {"y": dy}, eps=TINY_EPS)["x"]


def _at_population_statistics(x, dy, alpha_bkw):
    """State with mu, sigma^2 the population's and the controls at the population's fixed point:
    (1 - a_b) v = mean(y' y) / mean(y^2), (1 - a_b) u = mean(x~' / sigma)."""
    axes = (0, *_positions(x))
    mean, var = np.mean(x, axis=axes), np.var(x, axis=axes)
    lay = (1, -1) + (1,) * (x.ndim - 2)
    y = (x - mean.reshape(lay)) / np.sqrt(var.reshape(lay))
    gain = 1.0 - alpha_bkw
    coef = np.mean(dy * y, axis=axes) / np.mean(y * y, axis=axes)
    corrected = dy - coef.reshape(lay) * y
    return _state(x.shape[1], mean=mean, var=var, u=np.mean(corrected / np.sqrt(var.reshape(lay)), axis=axes) / gain,
                  v=coef / gain)


@pytest.mark.parametrize("shape", [(8, 3), (6, 3, 2, 2)], ids=["fully_connected", "conv"])
def test_stationary_limit_is_the_population_gradient(shape):
    """With the statistics frozen at the population's (a_f = 1, eps -> 0) and the controls at
    their fixed point, the control process yields batch normalization's true gradient as
    a_b -> 1: the error is O(N (1 - a_b)), shrinking a hundredfold per hundredfold step."""
    x, dy = RNG.standard_normal(shape) * 1.5 + 0.7, RNG.standard_normal(shape)
    expected = _population_gradient(x, dy)
    errors = []
    for delta in (1e-3, 1e-5, 1e-7):
        alpha_bkw = 1.0 - delta
        state = _at_population_statistics(x, dy, alpha_bkw)
        dx = OP.vjp({"x": x}, state, {"y": dy}, ecm="none", alpha_fwd=1.0, alpha_bkw=alpha_bkw, eps=TINY_EPS)["x"]
        errors.append(np.max(np.abs(dx - expected)) / np.max(np.abs(expected)))
    assert errors[2] < 1e-6 * shape[0], errors
    assert errors[0] > 30 * errors[1] > 900 * errors[2], errors


@pytest.mark.checks("stationary_limit_is_the_population_gradient")
def test_a_repeated_sample_converges_to_its_instance_gradient():
    """One sample repeated (a stationary stream) with statistics frozen at its own and the controls
    starting from 0: the per-sample gradients converge geometrically (rate a_b and
    1 - (1 - a_b) <y, y>) to the true gradient of normalizing it over its positions."""
    sample, d_sample = RNG.standard_normal((1, 3, 3, 3)) * 2 - 1, RNG.standard_normal((1, 3, 3, 3))
    reps = 60
    x, dy = np.repeat(sample, reps, axis=0), np.repeat(d_sample, reps, axis=0)
    state = _state(3, mean=np.mean(sample, axis=(0, 2, 3)), var=np.var(sample, axis=(0, 2, 3)))
    dx = OP.vjp({"x": x}, state, {"y": dy}, ecm="none", alpha_fwd=1.0, alpha_bkw=0.5, eps=TINY_EPS)["x"]
    expected = _population_gradient(sample, d_sample)[0]
    errors = np.max(np.abs(dx - expected), axis=(1, 2, 3)) / np.max(np.abs(expected))
    assert errors[0] > 1e-2 and errors[-1] < 1e-13, errors
    assert errors[20] < 1e-4 * errors[0], errors


# --- the harness flags plausible wrong implementations ----------------------------------------


class _OnlineMutant(Mutant):
    """The oracle's formulas in the request dtype (tests/mutants.py; the VJP's backward-pass
    state u, v goes into the response like forward state)."""

    op = "online_norm"


class _ControlOnline(_OnlineMutant):
    """No mistake: the plumbing above around the oracle's own formulas."""


class _NoErrorCompensation(_OnlineMutant):
    """The backward without the control process: dx = gamma dy / sigma_{t-1}, the statistics
    treated as constants (a stop-gradient through them, autograd's answer), no accumulators."""

    def backward(self, ct, a, hp):
        grads, _ = self.oracle_vjp(ct, a, hp, alpha_bkw=1.0)
        return grads, {"u": a["u"], "v": a["v"]}


class _StatisticsUpdatedFirst(_OnlineMutant):
    """The forward normalizes sample t with the statistics already updated by it (mu_t, sigma_t
    instead of mu_{t-1}, sigma_{t-1}: the update placed before the normalization)."""

    def forward(self, a, hp):
        if not hp["training"]:
            return self.oracle(a, hp)
        carried = {k: a[k] for k in ("running_mean", "running_var", "u", "v")}
        outs = []
        for t in range(a["x"].shape[0]):
            sample = {"x": a["x"][t:t + 1], "weight": a.get("weight"), "bias": a.get("bias")}
            carried = {**carried, **self.oracle({**sample, **carried}, hp)[1]}
            outs.append(self.oracle({**sample, **carried}, {**hp, "training": False})[0]["y"])
        return {"y": np.concatenate(outs)}, carried


def _run_quick(adapter):
    planned = runner.plan(adapter, ops="^online_norm$", dtypes=list(adapter.dtypes), profile="quick")
    return runner.run(adapter, planned, profile="quick")


# One worker for the three runs: the oracle's side of each case is computed once (conformance/memo.py).
@pytest.mark.xdist_group("online_norm")
@pytest.mark.parametrize("mutant", [_NoErrorCompensation(), _StatisticsUpdatedFirst()], ids=lambda m: m.name)
def test_online_norm_mutants_fail(mutant):
    """Each mistake is flagged (FAIL) in float64 and float32 by several cases (the quick profile;
    the default profile flags both too)."""
    results = _run_quick(mutant)
    for dtype in mutant.dtypes:
        flagged = [r for r in results if r.dtype == dtype and r.verdict == "FAIL"]
        assert len(flagged) >= 2, f"{mutant.name} {dtype}:\n{verdict_table(results)}"


@pytest.mark.xdist_group("online_norm")
def test_online_norm_control_is_not_flagged():
    """The same plumbing without a mistake passes, so the flags come from the mutations."""
    results = _run_quick(_ControlOnline())
    assert results and all(r.verdict == "PASS" for r in results), verdict_table(results)
