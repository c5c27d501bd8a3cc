"""PowerNorm: forward vs mpmath on adversarial data, the paper's properties, the declared
(approximate) backward and its backward-pass state, the official code transcribed in NumPy."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reference
from conformance import check_vjp
from conformance.cases import ADVERSARIAL, adversarial
from helpers import mp_array, mp_sqrt, relative_error
from reference.normalizers.power_norm import power_norm

OP = reference.get("power_norm")
RNG = np.random.default_rng(20260311)
TINY_EPS = 1e-300  # eps -> 0: the exact identities then hold up to rounding
R = (0, 1)         # the reduced axes of the (T, B, C) inputs below (channels last)


def _state(c, *, phi=None, nu=None, iters=0.0):
    return {"running_phi": np.ones(c) if phi is None else np.asarray(phi, dtype=np.float64),
            "ema_gz": np.zeros(c) if nu is None else np.asarray(nu, dtype=np.float64),
            "iters": np.float64(iters)}


def _group_scaled(x, group_num, group_eps):
    """Eq. 0 in plain NumPy (channels last): x / sqrt(mean over each group of x^2 + eps)."""
    if group_num is None:
        return x
    u = x.reshape(*x.shape[:-1], group_num, x.shape[-1] // group_num)
    return (u / np.sqrt(np.mean(u * u, axis=-1, keepdims=True) + group_eps)).reshape(x.shape)


def mp_power_norm(x, weight, bias, phi, *, running, eps, group_num=None, group_eps=1e-5):
    """Eq. 0-3 at 50 digits (channels last), independent of the oracle: ``(y, psi2_B)``."""
    X = mp_array(x)
    if group_num is not None:
        u = X.reshape(*x.shape[:-1], group_num, x.shape[-1] // group_num)
        ms = np.sum(u * u, axis=-1, keepdims=True) / u.shape[-1]
        X = (u / mp_sqrt(ms + mp_array(np.float64(group_eps)))).reshape(x.shape)
    axes = tuple(range(x.ndim - 1))
    n = int(np.prod([x.shape[a] for a in axes]))
    psi2 = np.sum(X * X, axis=axes, keepdims=True) / n
    s = mp_array(phi) if running else psi2
    y = X / mp_sqrt(s + mp_array(np.float64(eps))) * mp_array(weight) + mp_array(bias)
    return y, psi2.reshape(-1)


# --- forward accuracy -------------------------------------------------------------------------


@pytest.mark.parametrize("group_num", [None, 3])
@pytest.mark.parametrize("running", [False, True], ids=["warmup", "running"])
@pytest.mark.parametrize("eps_kind", ["scaled", "default"])
@pytest.mark.parametrize("family", sorted(ADVERSARIAL))
def test_forward_matches_mpmath_on_adversarial_data(family, eps_kind, running, group_num):
    x = adversarial(family, (5, 4, 6))
    weight, bias = 1 + 0.5 * RNG.standard_normal(6), RNG.standard_normal(6)
    ms = np.mean(x * x, axis=-1).min()
    group_eps = max(1e-3 * ms, 1e-300) if eps_kind == "scaled" else 1e-5
    xt = _group_scaled(x, group_num, group_eps)
    psi2 = np.mean(xt * xt, axis=R)
    phi = psi2 * RNG.uniform(0.5, 2.0, 6)  # a running statistic on the data's scale
    eps = max(1e-3 * min(psi2.min(), phi.min()), 1e-300) if eps_kind == "scaled" else 1e-5
    # running: step 6 of a 2-step warm-up (EMA); warm-up: step 3 of 10 (cumulative average)
    iters, warmup = (5.0, 2) if running else (2.0, 10)
    hp = {"eps": eps, "group_num": group_num, "group_eps": group_eps, "warmup_iters": warmup}
    out, state = OP.apply({"x": x, "weight": weight, "bias": bias}, _state(6, phi=phi, iters=iters), **hp)
    y_mp, psi2_mp = mp_power_norm(x, weight, bias, phi, running=running, eps=eps,
                                  group_num=group_num, group_eps=group_eps)
    err = relative_error(out["y"], y_mp)
    assert err <= 1e-10, f"{family}, eps={eps:.3g}: relative error {err:.3g}"
    Phi = mp_array(phi)
    phi_mp = Phi * 0.9 + psi2_mp * mp_array(np.float64(0.1)) if running else (Phi * 2 + psi2_mp) / 3
    assert relative_error(state["running_phi"], phi_mp) <= 1e-13
    assert float(state["iters"]) == iters + 1


def test_the_human_api_starts_from_the_initial_state():
    x = RNG.standard_normal((4, 3))
    y, state = power_norm(x)
    np.testing.assert_allclose(y, x / np.sqrt(np.mean(x * x, axis=0) + 1e-5), rtol=1e-15)
    np.testing.assert_allclose(state["running_phi"], np.mean(x * x, axis=0), rtol=1e-15)  # (4a), t = 1
    np.testing.assert_array_equal(state["ema_gz"], 0.0)
    assert float(state["iters"]) == 1.0
    assert OP.spec.backward_state == ("ema_gz",) and OP.spec.backward == "custom"


def test_dialect_values():
    assert OP.dialect("paper")["warmup_iters"] == 0 and OP.dialect("paper")["group_num"] is None
    official = OP.dialect("official")
    assert official["official_code"] and official["group_num"] == 1 and official["warmup_iters"] == 10000
    assert OP.dialect("official_iwslt14")["group_num"] == 4
    assert not OP.spec.hparams["official_code"].default


# --- forward properties -----------------------------------------------------------------------

tokens = st.tuples(st.integers(2, 5), st.integers(1, 3), st.integers(1, 4))  # (T, B, C)


@given(shape=tokens, seed=st.integers(0, 2**32 - 1), eps=st.floats(1e-8, 1.0))
def test_warmup_unit_quadratic_mean(shape, seed, eps):
    """Eq. 1-3 in the warm-up: mean_R (y - beta)^2 = gamma^2 psi2 / (psi2 + eps) per channel."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * 3 + 1
    w, b = rng.standard_normal(shape[-1]), rng.standard_normal(shape[-1])
    y = OP.apply({"x": x, "weight": w, "bias": b}, None, eps=eps)[0]["y"]
    psi2 = np.mean(x * x, axis=R)
    np.testing.assert_allclose(np.mean((y - b) ** 2, axis=R), w**2 * psi2 / (psi2 + eps),
                               rtol=1e-13, atol=1e-15)


@given(shape=tokens, seed=st.integers(0, 2**32 - 1), log_a=st.floats(-3, 3))
def test_warmup_invariant_to_positive_channel_scaling(shape, seed, log_a):
    """normalizers.md 2.3: the PN core is degree-0 homogeneous per channel in the warm-up; the
    declared dx then scales by 1/a (Eq. 8 divides by the batch statistic)."""
    rng = np.random.default_rng(seed)
    x, dy, w = (rng.standard_normal(shape), rng.standard_normal(shape), rng.standard_normal(shape[-1]))
    a = 10.0 ** (log_a + 0.1 * rng.standard_normal(shape[-1]))
    state = _state(shape[-1], nu=rng.standard_normal(shape[-1]), iters=3)
    hp = {"eps": TINY_EPS, "warmup_iters": 10}
    y1 = OP.apply({"x": x, "weight": w}, state, **hp)[0]["y"]
    y2 = OP.apply({"x": x * a, "weight": w}, state, **hp)[0]["y"]
    np.testing.assert_allclose(y2, y1, rtol=1e-13, atol=1e-14 * np.abs(w).max())
    g1, s1 = OP.backward({"x": x, "weight": w}, state, {"y": dy}, **hp)
    g2, s2 = OP.backward({"x": x * a, "weight": w}, state, {"y": dy}, **hp)
    scale = np.abs(g1["x"]).max()
    np.testing.assert_allclose(g2["x"] * a, g1["x"], rtol=1e-12, atol=1e-13 * scale)
    np.testing.assert_allclose(s2["ema_gz"], s1["ema_gz"], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("official_code", [False, True])
@pytest.mark.parametrize("group_num", [None, 2])
@given(seed=st.integers(0, 2**32 - 1), past=st.integers(0, 50))
def test_post_warmup_forward_is_the_eval_map(seed, past, group_num, official_code):
    """Eq. 2-3 after the warm-up: the training output is the inference map with the previous
    step's phi (linear in the scaled input); the state then takes the EMA step (4b)."""
    rng = np.random.default_rng(seed)
    x, w, b = rng.standard_normal((3, 2, 4)), rng.standard_normal(4), rng.standard_normal(4)
    phi = rng.uniform(0.1, 3.0, 4)
    state = _state(4, phi=phi, iters=5 + past)
    hp = {"warmup_iters": 5, "group_num": group_num, "official_code": official_code}
    train, new = OP.apply({"x": x, "weight": w, "bias": b}, state, **hp)
    evaluated, same = OP.apply({"x": x, "weight": w, "bias": b}, state, training=False, **hp)
    np.testing.assert_array_equal(train["y"], evaluated["y"])
    xt = _group_scaled(x, group_num, 1e-5)
    np.testing.assert_allclose(train["y"], w * xt / np.sqrt(phi + 1e-5) + b, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(new["running_phi"], 0.9 * phi + 0.1 * np.mean(xt * xt, axis=R), rtol=1e-14)
    assert float(new["iters"]) == 6 + past
    for key in state:  # inference leaves the state alone
        np.testing.assert_array_equal(same[key], state[key])


@pytest.mark.parametrize("warmup_iters", [0, 10], ids=["running", "warmup"])
@given(shape=tokens, seed=st.integers(0, 2**32 - 1), log_c=st.floats(-3, 3))
def test_group_scaling_invariant_to_positive_token_scaling(shape, seed, log_c, warmup_iters):
    """Eq. 0 removes each token's scale (normalizers.md 2.3): with GroupScaling the whole module
    is invariant to c_token > 0 in both phases (eps -> 0), its state update too."""
    rng = np.random.default_rng(seed)
    c_dim = 2 * shape[-1]
    x, w = rng.standard_normal((*shape[:-1], c_dim)), rng.standard_normal(c_dim)
    c = 10.0 ** (log_c + rng.standard_normal((*shape[:-1], 1)))
    state = _state(c_dim, phi=rng.uniform(0.5, 2.0, c_dim), iters=2)
    hp = {"group_num": 2, "group_eps": TINY_EPS, "warmup_iters": warmup_iters}
    y1, s1 = OP.apply({"x": x, "weight": w}, state, **hp)
    y2, s2 = OP.apply({"x": c * x, "weight": w}, state, **hp)
    np.testing.assert_allclose(y2["y"], y1["y"], rtol=1e-13, atol=1e-14 * np.abs(w).max())
    np.testing.assert_allclose(s2["running_phi"], s1["running_phi"], rtol=1e-13)


@pytest.mark.checks("not_shift_invariant")
@given(seed=st.integers(0, 2**32 - 1), shift=st.floats(0.5, 10.0))
def test_power_norm_is_not_shift_invariant(seed, shift):
    """No centering: PN(x + s) differs from PN(x) (BN would not), in the warm-up and in inference."""
    x = np.random.default_rng(seed).standard_normal((4, 3, 5))
    for hp in ({}, {"training": False}):
        y1 = OP.apply({"x": x}, None, **hp)[0]["y"]
        y2 = OP.apply({"x": x + shift}, None, **hp)[0]["y"]
        assert np.max(np.abs(y2 - y1)) > 0.1


@pytest.mark.checks("eval_is_affine_map")
@given(seed=st.integers(0, 2**32 - 1))
def test_eval_is_an_affine_map_and_folds_into_a_linear_layer(seed):
    """Alg. inference: y = gamma x / sqrt(phi + eps) + beta folds into the preceding linear layer."""
    rng = np.random.default_rng(seed)
    x, W, c = rng.standard_normal((5, 4)), rng.standard_normal((3, 4)), rng.standard_normal(3)
    state = _state(3, phi=rng.uniform(0.1, 2, 3), nu=rng.standard_normal(3), iters=7)
    w, b = rng.standard_normal(3), rng.standard_normal(3)
    y = OP.apply({"x": x @ W.T + c, "weight": w, "bias": b}, state, training=False)[0]["y"]
    s = np.sqrt(state["running_phi"] + 1e-5)
    W_fold, c_fold = W * (w / s)[:, None], b + w * c / s
    np.testing.assert_allclose(y, x @ W_fold.T + c_fold, rtol=1e-12, atol=1e-12)


def _expected_phi(psi2s, warmup, *, official):
    """Eq. 4a/4b, or the official sequence (c), written out from the batch statistics."""
    phi = np.ones_like(psi2s[0])
    for t, psi2 in enumerate(psi2s, start=1):
        if official:
            if t < warmup:
                phi = phi * (t - 1) / t + psi2 / t
            phi = 0.9 * phi + 0.1 * psi2
        elif t <= warmup:
            phi = np.mean(psi2s[:t], axis=0)  # the cumulative average of the batch statistics
        else:
            phi = 0.9 * phi + 0.1 * psi2
    return phi


@pytest.mark.checks("running_statistic_is_warmup_average_then_ema")
@pytest.mark.parametrize("official_code", [False, True])
def test_running_statistic_over_steps_with_an_eval_step(official_code):
    batches = [RNG.standard_normal((4, 2, 3)) * (k + 1) + k for k in range(7)]
    hp = {"warmup_iters": 3, "official_code": official_code}
    state, psi2s = None, []
    for k, x in enumerate(batches):
        if k == 3:  # an inference step in the middle: no counter step, no update
            _, frozen = OP.apply({"x": x}, state, training=False, **hp)
            for key in state:
                np.testing.assert_array_equal(frozen[key], state[key])
            continue
        out, state = OP.apply({"x": x}, state, **hp)
        psi2s.append(np.mean(x * x, axis=R))
        t = len(psi2s)
        divisor = psi2s[-1] if t <= 3 else _expected_phi(psi2s[:-1], 3, official=official_code)
        np.testing.assert_allclose(out["y"], x / np.sqrt(divisor + 1e-5), rtol=1e-13)
        np.testing.assert_allclose(state["running_phi"], _expected_phi(psi2s, 3, official=official_code),
                                   rtol=1e-13)
        assert float(state["iters"]) == t
    if not official_code:  # phi_W is the population average of the warm-up batches
        np.testing.assert_allclose(_expected_phi(psi2s[:3], 3, official=False), np.mean(psi2s[:3], axis=0))


# --- the declared backward --------------------------------------------------------------------


def _z(x, phi, *, running, eps=1e-5, group_num=None):
    """Eq. 3 before the affine map, in plain NumPy."""
    xt = _group_scaled(x, group_num, 1e-5)
    s = phi if running else np.mean(xt * xt, axis=R)
    return xt / np.sqrt(s + eps)


def _check_true_gradient(x, w, b, state, dy, hp, wrt=("x", "weight", "bias"), rtol=1e-8):
    """The declared VJP (from ``state``, with the cotangent ``dy``) against finite differences
    of the forward (same state) for every input in ``wrt``."""
    given = {"x": x, "weight": w, "bias": b}
    held = {k: v for k, v in given.items() if k not in wrt}  # not perturbed

    def f(inputs):
        return {"y": OP.apply({**held, **inputs}, state, **hp)[0]["y"]}

    def vjp(inputs, u):
        grads = OP.vjp({**held, **inputs}, state, u, **hp)
        return {k: grads[k] for k in inputs}

    check_vjp(f, vjp, {k: given[k] for k in wrt}, cotangent={"y": dy}, rtol=rtol)


@pytest.mark.parametrize("official_code", [False, True])
@pytest.mark.parametrize("group_num", [None, 2])
@given(seed=st.integers(0, 2**32 - 1))
def test_backward_with_batch_grad_statistic_is_true_gradient(seed, group_num, official_code):
    """Eq. 6: with nu = Lambda_t = mean_R(gamma dy z), the current batch's statistic (official:
    ema_gz = Lambda_t / (1 - alpha_bkw)), Eq. 7-8 are the exact gradient of the warm-up forward,
    GroupScaling's chain included: PN-V's (RMS over the batch) backward."""
    rng = np.random.default_rng(seed)
    x, dy = rng.standard_normal((3, 2, 4)), rng.standard_normal((3, 2, 4))
    w, b = 1 + 0.5 * rng.standard_normal(4), rng.standard_normal(4)
    lam = np.mean(w * dy * _z(x, None, running=False, group_num=group_num), axis=R)
    nu = lam / (1 - 0.9) if official_code else lam
    state = _state(4, nu=nu, iters=1)
    hp = {"warmup_iters": 5, "group_num": group_num, "official_code": official_code}
    _check_true_gradient(x, w, b, state, dy, hp)


@pytest.mark.parametrize("group_num", [None, 2])
def test_backward_without_correction_is_true_gradient_after_warmup(group_num):
    """nu = 0 after the warm-up: Eq. 8 is gamma dy / sqrt(phi + eps), the exact gradient of the
    then linear forward; alpha_bkw = 1 freezes nu (Eq. 9), so it stays 0 and the backward stays
    exact step after step.  The official code (b) divides by the batch statistic instead."""
    hp = {"warmup_iters": 0, "alpha_bkw": 1.0, "group_num": group_num}
    w, b = 1 + 0.5 * RNG.standard_normal(4), RNG.standard_normal(4)
    state = _state(4, phi=RNG.uniform(0.5, 2.0, 4))
    for _ in range(4):
        x, dy = RNG.standard_normal((3, 2, 4)), RNG.standard_normal((3, 2, 4))
        _check_true_gradient(x, w, b, state, dy, hp)
        _, new = OP.apply({"x": x, "weight": w, "bias": b}, state, **hp)
        grads, back = OP.backward({"x": x, "weight": w, "bias": b}, state, {"y": dy}, **hp)
        np.testing.assert_array_equal(back["ema_gz"], 0.0)
        if group_num is None:
            official = OP.vjp({"x": x, "weight": w}, state, {"y": dy}, **{**hp, "official_code": True})
            psi2 = np.mean(x * x, axis=R)
            np.testing.assert_allclose(official["x"], w * dy / np.sqrt(psi2 + 1e-5), rtol=1e-14)
            np.testing.assert_allclose(official["x"] * np.sqrt(psi2 + 1e-5),
                                       grads["x"] * np.sqrt(state["running_phi"] + 1e-5), rtol=1e-13)
        state = {**new, **back}


def _paper_nu(nu, lam, gam, alpha):
    return nu * (1 - (1 - alpha) * gam) + (1 - alpha) * lam  # Eq. 9, the algorithm box's form


@pytest.mark.parametrize("official_code", [False, True])
@pytest.mark.parametrize("warmup_iters", [0, 3], ids=["running", "crossing"])
def test_backward_statistic_follows_its_recurrence(warmup_iters, official_code):
    """Eq. 9 stepped over several training steps (with an inference step in between, which
    leaves it alone): nu_t = nu (1 - (1 - a_b) Gamma) + (1 - a_b) Lambda with Gamma = mean_R z^2
    and Lambda = mean_R(gamma dy z); the official buffer (a) follows
    ema_t = ema (1 - (1 - a_b) Gamma) + Lambda."""
    hp = {"warmup_iters": warmup_iters, "alpha_bkw": 0.8, "official_code": official_code}
    w, b = 1 + 0.5 * RNG.standard_normal(3), RNG.standard_normal(3)
    state = OP.init_state({"x": np.zeros((1, 3))})
    nu = np.zeros(3)
    for k in range(7):
        x, dy = RNG.standard_normal((4, 2, 3)) * 2, RNG.standard_normal((4, 2, 3))
        training = k != 3
        _, new = OP.apply({"x": x, "weight": w, "bias": b}, state, training=training, **hp)
        _, back = OP.backward({"x": x, "weight": w, "bias": b}, state, {"y": dy}, training=training, **hp)
        if training:
            t = float(state["iters"]) + 1
            z = _z(x, state["running_phi"], running=t > warmup_iters)
            lam, gam = np.mean(w * dy * z, axis=R), np.mean(z * z, axis=R)
            nu = nu * (1 - 0.2 * gam) + lam if official_code else _paper_nu(nu, lam, gam, 0.8)
        np.testing.assert_allclose(back["ema_gz"], nu, rtol=1e-12, atol=1e-14)
        state = {**new, **back}


@pytest.mark.checks("backward_statistic_follows_its_recurrence")
@given(seed=st.integers(0, 2**32 - 1), alpha=st.floats(0.0, 1.0))
def test_backward_statistic_is_an_ema_of_lambda_when_gamma_is_one(seed, alpha):
    """In the warm-up with eps -> 0, Gamma = mean_R z^2 = 1 and Eq. 9 is the EMA
    nu_t = a_b nu + (1 - a_b) Lambda_t."""
    rng = np.random.default_rng(seed)
    x, dy, w = rng.standard_normal((3, 2, 4)), rng.standard_normal((3, 2, 4)), rng.standard_normal(4)
    nu = rng.standard_normal(4)
    hp = {"eps": TINY_EPS, "alpha_bkw": alpha}
    _, back = OP.backward({"x": x, "weight": w}, _state(4, nu=nu), {"y": dy}, **hp)
    lam = np.mean(w * dy * _z(x, None, running=False, eps=TINY_EPS), axis=R)
    np.testing.assert_allclose(back["ema_gz"], alpha * nu + (1 - alpha) * lam, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("running", [False, True], ids=["warmup", "running"])
@given(seed=st.integers(0, 2**32 - 1))
def test_backward_statistic_fixed_point_orthogonalizes_gradient(seed, running):
    """nu* = Lambda/Gamma is the fixed point of Eq. 9, and there the declared dx is orthogonal to
    z per channel, sum_R dx z = 0: the identity of a scale-invariant normalizer's gradient."""
    rng = np.random.default_rng(seed)
    x, dy, w = rng.standard_normal((3, 2, 4)), rng.standard_normal((3, 2, 4)), rng.standard_normal(4)
    phi = rng.uniform(0.5, 2.0, 4)
    z = _z(x, phi, running=running)
    nu = np.mean(w * dy * z, axis=R) / np.mean(z * z, axis=R)
    state = _state(4, phi=phi, nu=nu, iters=3)
    grads, back = OP.backward({"x": x, "weight": w}, state, {"y": dy}, warmup_iters=0 if running else 10)
    scale = np.sum(np.abs(w * dy * z), axis=R)
    np.testing.assert_allclose(back["ema_gz"], nu, rtol=1e-12, atol=1e-14 * scale.max())
    np.testing.assert_allclose(np.sum(grads["x"] * z, axis=R), 0.0,
                               atol=1e-13 * (scale / np.sqrt(phi.min())).max() * 10)


@pytest.mark.parametrize("official_code", [False, True])
@pytest.mark.parametrize("phase", [{"warmup_iters": 10}, {"warmup_iters": 0}, {"training": False}],
                         ids=["warmup", "running", "eval"])
def test_weight_and_bias_grads_are_exact(phase, official_code):
    """dgamma = sum_R dy z and dbeta = sum_R dy are the true gradients in every phase, with and
    without GroupScaling, whatever nu holds."""
    for group_num in (None, 2):
        x, dy = RNG.standard_normal((3, 2, 4)), RNG.standard_normal((3, 2, 4))
        w, b = 1 + 0.5 * RNG.standard_normal(4), RNG.standard_normal(4)
        state = _state(4, phi=RNG.uniform(0.5, 2.0, 4), nu=RNG.standard_normal(4), iters=2)
        hp = {**phase, "group_num": group_num, "official_code": official_code}
        _check_true_gradient(x, w, b, state, dy, hp, wrt=("weight", "bias"))


@pytest.mark.parametrize("group_num", [None, 2])
def test_eval_backward_is_true_gradient(group_num):
    """Inference is the plain map x -> gamma x~ / sqrt(phi + eps) + beta: its VJP is exact and
    the backward leaves ema_gz as it was (the official eval path is autograd, no PowerFunction)."""
    x, dy = RNG.standard_normal((3, 2, 4)), RNG.standard_normal((3, 2, 4))
    w, b = 1 + 0.5 * RNG.standard_normal(4), RNG.standard_normal(4)
    state = _state(4, phi=RNG.uniform(0.5, 2.0, 4), nu=RNG.standard_normal(4), iters=20)
    for official_code in (False, True):
        hp = {"training": False, "group_num": group_num, "official_code": official_code}
        _check_true_gradient(x, w, b, state, dy, hp)
        _, back = OP.backward({"x": x, "weight": w, "bias": b}, state, {"y": dy}, **hp)
        np.testing.assert_array_equal(back["ema_gz"], state["ema_gz"])


# --- the official code, transcribed ------------------------------------------------------------


def _official_group_scaling(x, group_num, eps=1e-5):
    """GroupScaling1D.forward on (T, B, C): the per-(token, group) second moment, repeated."""
    T, B, C = x.shape
    cg = C // group_num
    gn = x.reshape(T, B, group_num, cg)
    moment2 = np.repeat(np.mean(gn * gn, axis=3, keepdims=True), cg, axis=-1).reshape(T, B, C)
    return x / np.sqrt(moment2 + eps)


def _official_group_scaling_backward(x, grad, group_num, eps=1e-5):
    """What autograd gives for GroupScaling1D, from the Jacobian of each (token, group) block:
    x~ = u / r, r = sqrt(|u|^2 / k + eps)  =>  d x~_i / d u_j = delta_ij / r - u_i u_j / (k r^3)."""
    T, B, C = x.shape
    k = C // group_num
    out = np.empty_like(grad)
    for i in range(T):
        for j in range(B):
            for g in range(group_num):
                sl = slice(g * k, (g + 1) * k)
                u = x[i, j, sl]
                r = np.sqrt(np.dot(u, u) / k + eps)
                jac = np.eye(k) / r - np.outer(u, u) / (k * r**3)
                out[i, j, sl] = jac.T @ grad[i, j, sl]
    return out


def _official_step(x, dy, weight, bias, buf, *, training, warmup_iters, group_num,
                   eps=1e-5, afwd=0.9, abkw=0.9):
    """MaskPowerNorm.forward (pad_mask=None) -> PowerFunction.forward/backward -> GroupScaling1D
    (sIncerass/powernorm mask_powernorm.py, 9ea6226) in NumPy float64, the official layout
    (B, C, T, 1) and buffers (1, C, 1, 1) kept.  Returns y, dx, dweight, dbias and the buffers."""
    shaped = x.ndim == 2
    if shaped:
        x, dy = x[None], dy[None]
    T, B, C = x.shape
    xs = _official_group_scaling(x, group_num)
    mask_input = xs.reshape(-1, C)
    inp = xs.transpose(1, 2, 0)[..., None]
    grad_output = dy.transpose(1, 2, 0)[..., None]
    w, b = weight.reshape(1, C, 1, 1), bias.reshape(1, C, 1, 1)
    phi, ema_gz, iters = buf["running_phi"].copy(), buf["ema_gz"].copy(), buf["iters"]
    if training:
        iters += 1
        var = (mask_input * mask_input).mean(axis=0).reshape(1, C, 1, 1)
        z = inp / np.sqrt(var + eps) if iters <= warmup_iters else inp / np.sqrt(phi + eps)
        if iters < warmup_iters:
            phi = phi * (iters - 1) / iters + var / iters
        phi = afwd * phi + (1 - afwd) * var
        y = w * z + b
        g = grad_output * w
        approx_grad_g = g - (1 - abkw) * ema_gz * z
        ema_gz = ema_gz + (approx_grad_g * z).mean(axis=(0, 2, 3), keepdims=True)
        gx = approx_grad_g / np.sqrt(var + eps)
    else:
        z = inp / np.sqrt(phi + eps)
        y = w * z + b
        gx = grad_output * w / np.sqrt(phi + eps)
    dweight, dbias = (grad_output * z).sum(axis=(0, 2, 3)), grad_output.sum(axis=(0, 2, 3))

    def back(a):
        return a[..., 0].transpose(2, 0, 1)

    dx = _official_group_scaling_backward(x, back(gx), group_num)
    y = back(y)
    if shaped:
        y, dx = y[0], dx[0]
    return y, dx, dweight, dbias, {"running_phi": phi, "ema_gz": ema_gz, "iters": iters}


@pytest.mark.checks("official_code_matches_numpy_transcription")
@pytest.mark.parametrize(("shape", "group_num"), [((4, 3, 8), 1), ((4, 3, 8), 4), ((5, 6), 2)])
def test_official_code_matches_the_numpy_transcription_over_steps(shape, group_num):
    """official_code = True against the transcription, 8 steps across a 3-step warm-up with an
    inference step in the middle: outputs, all three gradients and the state, step by step."""
    c = shape[-1]
    w, b = 1 + 0.3 * RNG.standard_normal(c), RNG.standard_normal(c)
    hp = {**OP.dialect("official"), "warmup_iters": 3, "group_num": group_num}
    buf = {"running_phi": np.ones((1, c, 1, 1)), "ema_gz": np.zeros((1, c, 1, 1)), "iters": 0}
    state = None
    for k in range(8):
        training = k != 4
        x, dy = RNG.standard_normal(shape) * (1 + k) + 0.5, RNG.standard_normal(shape)
        y, dx, dw, db, buf = _official_step(x, dy, w, b, buf, training=training, warmup_iters=3,
                                            group_num=group_num)
        inputs = {"x": x, "weight": w, "bias": b}
        hp_k = {**hp, "training": training}
        out, new = OP.apply(inputs, state, **hp_k)
        grads, back = OP.backward(inputs, state, {"y": dy}, **hp_k)
        np.testing.assert_allclose(out["y"], y, rtol=1e-13, atol=1e-13, err_msg=f"y, step {k}")
        for key, ref in (("x", dx), ("weight", dw), ("bias", db)):
            np.testing.assert_allclose(grads[key], ref, rtol=1e-12, atol=1e-13, err_msg=f"d{key}, step {k}")
        np.testing.assert_allclose(new["running_phi"], buf["running_phi"].ravel(), rtol=1e-13)
        np.testing.assert_allclose(back["ema_gz"], buf["ema_gz"].ravel(), rtol=1e-12, atol=1e-14)
        assert float(new["iters"]) == buf["iters"]
        state = {**new, **back}


@pytest.mark.checks("official_code_is_paper_with_rescaled_statistic")
@pytest.mark.parametrize("group_num", [None, 2])
def test_official_code_is_the_paper_with_a_rescaled_statistic(group_num):
    """(a): run in lock-step from ema_gz = nu / (1 - a_b), the official code and the algorithm box
    give the same dx in the warm-up and their statistics stay in that ratio; after the warm-up (b)
    rescales the official dx by sqrt(phi + eps) / sqrt(psi2_B + eps) (without GroupScaling)."""
    hp = {"warmup_iters": 3, "alpha_bkw": 0.75, "group_num": group_num}
    w = 1 + 0.5 * RNG.standard_normal(4)
    paper = _state(4, nu=RNG.standard_normal(4))
    official = {**paper, "ema_gz": paper["ema_gz"] / 0.25}
    for k in range(6):
        x, dy = RNG.standard_normal((3, 2, 4)) * (k + 1), RNG.standard_normal((3, 2, 4))
        g_p, b_p = OP.backward({"x": x, "weight": w}, paper, {"y": dy}, **hp)
        g_o, b_o = OP.backward({"x": x, "weight": w}, official, {"y": dy}, **hp, official_code=True)
        np.testing.assert_allclose(b_o["ema_gz"] * 0.25, b_p["ema_gz"], rtol=1e-12, atol=1e-14)
        t = float(paper["iters"]) + 1
        scale = np.abs(g_p["x"]).max()
        if t <= 3:
            np.testing.assert_allclose(g_o["x"], g_p["x"], rtol=1e-12, atol=1e-14 * scale)
        elif group_num is None:
            ratio = np.sqrt(paper["running_phi"] + 1e-5) / np.sqrt(np.mean(x * x, axis=R) + 1e-5)
            np.testing.assert_allclose(g_o["x"], g_p["x"] * ratio, rtol=1e-12, atol=1e-14 * scale)
        # advance both; the forward statistics differ only by (c), so carry the paper's
        _, paper_new = OP.apply({"x": x, "weight": w}, paper, **hp)
        paper = {**paper_new, **b_p}
        official = {**paper_new, **b_o}
