"""Spectral Normalization: forward vs mpmath on adversarial weights, the power-iteration state,
the paper's properties, the official / framework code transcribed, torch float64, the human
API's defaults (bad input: the spec's [[error_cases]], tests/test_error_cases.py)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reference
from conformance import check_vjp
from conformance.cases import ADVERSARIAL, adversarial
from helpers import mp, mp_array, relative_error, t64, torch_or_skip
from reference.normalizers.spectral_norm import spectral_norm

OP = reference.get("spectral_norm")
RNG = np.random.default_rng(20260107)
U64 = np.finfo(np.float64).eps


def unit(rng, n):
    x = rng.standard_normal(n)
    return x / np.linalg.norm(x)


def matrix(W, dim=0):
    """W_mat written independently of the oracle: moveaxis + C-order reshape."""
    W = np.moveaxis(np.asarray(W), dim, 0)
    return W.reshape(W.shape[0], -1)


def apply(weight, state=None, **hp):
    out, new_state = OP.apply({"weight": weight}, state, **hp)
    return out["w"], float(out["sigma"]), new_state


# --- an independent mpmath reference ------------------------------------------------------------


def mp_normalize(x, normalize, eps):
    mpmath = mp()
    norm = mpmath.sqrt(sum(e * e for e in x))
    e = mpmath.mpf(float(eps))
    denom = {"max": lambda: max(norm, e), "add": lambda: norm + e,
             "rsqrt": lambda: mpmath.sqrt(norm * norm + e)}[normalize]()
    return x / denom


def mp_spectral_norm(W, u, v, steps, order, normalize, eps, dim=0):
    """Algorithm 1 at 50 digits: returns (w, sigma, u, v) as mpf object arrays."""
    Wm = mp_array(matrix(W, dim))
    U, V = mp_array(u), mp_array(v)
    for _ in range(steps):
        if order == "u_then_v":
            U = mp_normalize(Wm.dot(V), normalize, eps)
            V = mp_normalize(Wm.T.dot(U), normalize, eps)
        else:
            V = mp_normalize(Wm.T.dot(U), normalize, eps)
            U = mp_normalize(Wm.dot(V), normalize, eps)
    sigma = U.dot(Wm.dot(V))
    return mp_array(W) / sigma, np.array([sigma], dtype=object), U, V


CONVENTIONS = [("v_then_u", "add"), ("u_then_v", "max"), ("v_then_u", "rsqrt")]


def _eps_for(family, normalize):
    # Norms of the power-iteration vectors are ~|W|: on the 1e-150 family the default 1e-12
    # would dominate (N(x) = x / eps), making the test trivial; scale eps below the norm so the
    # normalization itself is exercised (rsqrt's eps sits under the root next to ||x||^2 ~ 1e-300,
    # so eps / ||x||^2 ~ 1e-9 still enters the result, computed exactly in both).
    if family == "tiny_1e-150":
        return 1e-309 if normalize == "rsqrt" else 1e-300
    return 1e-12


@pytest.mark.parametrize(("order", "normalize"), CONVENTIONS)
@pytest.mark.parametrize("steps", [0, 3])
@pytest.mark.parametrize("family", sorted(ADVERSARIAL))
def test_forward_matches_mpmath_on_adversarial_weights(family, steps, order, normalize):
    W = adversarial(family, (4, 2, 3))
    rng = np.random.default_rng(7)
    u, v = unit(rng, 4), unit(rng, 6)
    eps = _eps_for(family, normalize)
    hp = dict(n_power_iterations=steps, iteration_order=order, normalize=normalize, eps=eps)
    out, state = OP.apply({"weight": W}, {"u": u, "v": v}, **hp)
    ref_w, ref_sigma, ref_u, ref_v = mp_spectral_norm(W, u, v, steps, order, normalize, eps)
    for name, got, ref in (("w", out["w"], ref_w), ("sigma", np.atleast_1d(out["sigma"]), ref_sigma),
                           ("u", state["u"], ref_u), ("v", state["v"], ref_v)):
        err = relative_error(got, ref)
        assert err <= 1e-10, f"{family} {name}: relative error {err:.3g}"


@pytest.mark.parametrize("shape", [(1, 6), (7,), (6, 1)])
@pytest.mark.parametrize("family", sorted(ADVERSARIAL))
def test_single_row_single_column_and_vectors_match_mpmath(family, shape):
    """N = 1 (one output unit) and 1-D weights, the (n, 1) matrix: sigma = ||W|| after one step."""
    W = adversarial(family, shape)
    rows = shape[0]
    cols = W.size // rows
    u, v = np.ones(rows) / np.sqrt(rows), np.ones(cols) / np.sqrt(cols)
    eps = _eps_for(family, "max")
    out, state = OP.apply({"weight": W}, {"u": u, "v": v}, iteration_order="u_then_v",
                          normalize="max", eps=eps)
    ref_w, ref_sigma, _, _ = mp_spectral_norm(W, u, v, 1, "u_then_v", "max", eps)
    assert relative_error(out["w"], ref_w) <= 1e-10
    assert relative_error(np.atleast_1d(out["sigma"]), ref_sigma) <= 1e-10
    mpmath = mp()
    norm = mpmath.sqrt(sum(e * e for e in mp_array(W).ravel()))
    assert relative_error(np.atleast_1d(out["sigma"]), np.array([norm], dtype=object)) <= 1e-10


def test_weights_beyond_1e154_do_not_overflow_the_norm():
    """The test has teeth: NumPy's (array-API) vector_norm squares unscaled and overflows."""
    W = 1e200 * RNG.standard_normal((3, 4))
    with np.errstate(over="ignore"):
        assert np.isinf(np.linalg.vector_norm(W[0]))
    u, v = unit(RNG, 3), unit(RNG, 4)
    for normalize in ("max", "add", "rsqrt"):
        out, _ = OP.apply({"weight": W}, {"u": u, "v": v}, normalize=normalize, n_power_iterations=2)
        ref_w, ref_sigma, _, _ = mp_spectral_norm(W, u, v, 2, "v_then_u", normalize, 1e-12)
        assert relative_error(out["w"], ref_w) <= 1e-10
        assert relative_error(np.atleast_1d(out["sigma"]), ref_sigma) <= 1e-10


# --- the state: init, modes, trajectories -------------------------------------------------------


@pytest.mark.parametrize(("shape", "dim"), [((4, 6), 0), ((3, 2, 3, 3), 0), ((2, 4, 3), 1),
                                            ((3, 3, 2, 5), -1), ((7,), 0)])
def test_init_state_is_the_signed_first_singular_pair(shape, dim):
    W = RNG.standard_normal(shape)
    state = OP.init_state({"weight": W}, dim=dim)
    U, S, Vh = np.linalg.svd(matrix(W, dim))
    sign = np.sign(state["v"][np.argmax(np.abs(state["v"]))])
    assert sign == 1.0
    np.testing.assert_allclose(np.abs(state["u"]), np.abs(U[:, 0]), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.abs(state["v"]), np.abs(Vh[0]), rtol=1e-12, atol=1e-14)
    _, sigma, _ = apply(W, state, training=False, dim=dim)
    np.testing.assert_allclose(sigma, S[0], rtol=1e-14)


def test_eval_modes():
    W = RNG.standard_normal((4, 5))
    state = {"u": unit(RNG, 4), "v": unit(RNG, 5)}
    w_train, s_train, st_train = apply(W, state, training=True, n_power_iterations=2)
    # frozen: sigma = u^T W v with the stored vectors; state untouched.
    w, s, st_frozen = apply(W, state, training=False, n_power_iterations=2)
    np.testing.assert_allclose(s, state["u"] @ W @ state["v"], rtol=1e-14)
    np.testing.assert_allclose(w, W / s, rtol=1e-15)
    for key in state:
        np.testing.assert_array_equal(st_frozen[key], state[key])
    # iterate_no_store: the training output, the old state.
    w, s, st_ns = apply(W, state, training=False, eval_mode="iterate_no_store", n_power_iterations=2)
    np.testing.assert_array_equal(w, w_train)
    for key in state:
        np.testing.assert_array_equal(st_ns[key], state[key])
    # iterate_store: exactly training.
    w, s, st_s = apply(W, state, training=False, eval_mode="iterate_store", n_power_iterations=2)
    np.testing.assert_array_equal(w, w_train)
    for key in state:
        np.testing.assert_array_equal(st_s[key], st_train[key])
    # stored_kernel (Keras eval): no normalization at all.
    w, s, st_k = apply(W, state, training=False, eval_mode="stored_kernel")
    np.testing.assert_array_equal(w, W)
    assert s == 1.0


def test_missing_v_is_not_read_by_v_then_u():
    """Chainer, Flax and Keras store only u: with n >= 1 the v_then_u order never reads v."""
    W = RNG.standard_normal((3, 5))
    u = unit(RNG, 3)
    w1, s1, st1 = apply(W, {"u": u}, n_power_iterations=2)
    w2, s2, st2 = apply(W, {"u": u, "v": unit(RNG, 5)}, n_power_iterations=2)
    np.testing.assert_array_equal(w1, w2)
    np.testing.assert_array_equal(st1["v"], st2["v"])


@pytest.mark.parametrize("order", ["u_then_v", "v_then_u"])
def test_one_call_of_k_iterations_equals_k_calls_of_one(order):
    W = RNG.standard_normal((5, 2, 3))
    state = {"u": unit(RNG, 5), "v": unit(RNG, 6)}
    hp = dict(iteration_order=order, normalize="max")
    w_k, s_k, st_k = apply(W, state, n_power_iterations=4, **hp)
    for _ in range(4):
        w, s, state = apply(W, state, n_power_iterations=1, **hp)
    np.testing.assert_array_equal(w, w_k)
    for key in state:
        np.testing.assert_array_equal(state[key], st_k[key])


def test_orders_differ_before_convergence_and_agree_after():
    """Why iteration_order is a knob: one step from the same state gives different sigma."""
    W = RNG.standard_normal((4, 6))
    state = {"u": unit(RNG, 4), "v": unit(RNG, 6)}
    _, s_uv, _ = apply(W, state, iteration_order="u_then_v", normalize="max")
    _, s_vu, _ = apply(W, state, iteration_order="v_then_u", normalize="max")
    assert abs(s_uv - s_vu) > 1e-6 * s_uv
    top = np.linalg.svd(W, compute_uv=False)[0]
    for order in ("u_then_v", "v_then_u"):
        _, s, _ = apply(W, state, iteration_order=order, normalize="max", n_power_iterations=500)
        np.testing.assert_allclose(s, top, rtol=1e-13)


# --- the official code and the frameworks without a Python package here, transcribed ----------


def test_chainer_max_singular_value_transcribed():
    """max_sv.py: u (1, out); _v = l2n(u W); _u = l2n(_v W^T); sigma = sum((_u W) * _v)."""
    W = RNG.standard_normal((4, 3, 2, 2))  # SNConvolution2D: W.reshape(out, -1)
    u = RNG.standard_normal((1, 4))        # Chainer's u is not normalized
    Wm = W.reshape(4, -1)

    def l2n(x):
        return x / (np.sqrt(np.sum(x * x)) + 1e-12)

    _u = u
    for _ in range(2):
        _v = l2n(_u @ Wm)
        _u = l2n(_v @ Wm.T)
    sigma = np.sum((_u @ Wm) * _v)
    for dialect in ("chainer", "chainer_conv2d"):
        out, state = OP.apply({"weight": W}, {"u": u[0]}, **{**OP.dialect(dialect), "n_power_iterations": 2})
        np.testing.assert_allclose(out["sigma"], sigma, rtol=1e-14)
        np.testing.assert_allclose(out["w"], W / sigma, rtol=1e-14)
        np.testing.assert_allclose(state["u"], _u[0], rtol=1e-13)
    # Test time: SNLinear stores, SNConvolution2D does not (but both iterate).
    _, st = OP.apply({"weight": W}, {"u": u[0]}, **{**OP.dialect("chainer"), "training": False})
    assert not np.array_equal(st["u"], u[0])
    _, st = OP.apply({"weight": W}, {"u": u[0]}, **{**OP.dialect("chainer_conv2d"), "training": False})
    np.testing.assert_array_equal(st["u"], u[0])


def test_flax_spectral_normalize_transcribed():
    """flax SpectralNorm on an (kh, kw, in, out) kernel: value = reshape(-1, out), u0 (1, out)."""
    kernel = RNG.standard_normal((3, 3, 2, 4))
    u0 = RNG.standard_normal((1, 4))
    value = kernel.reshape(-1, 4)

    def l2n(x, eps=1e-12):
        return x / np.sqrt(np.sum(x * x) + eps)

    v0 = l2n(u0 @ value.T)
    u1 = l2n(v0 @ value)
    sigma = (v0 @ value @ u1.T)[0, 0]
    hp = OP.dialect("flax")
    out, state = OP.apply({"weight": kernel}, {"u": u0[0]}, **hp)
    np.testing.assert_allclose(out["sigma"], sigma, rtol=1e-14)
    np.testing.assert_allclose(out["w"], kernel / sigma, rtol=1e-14)
    np.testing.assert_allclose(state["u"], u1[0], rtol=1e-13)
    # update_stats=False: same output, u kept.
    out_eval, st_eval = OP.apply({"weight": kernel}, {"u": u0[0]}, **{**hp, "training": False})
    np.testing.assert_array_equal(out_eval["w"], out["w"])
    np.testing.assert_array_equal(st_eval["u"], u0[0])


def test_keras_spectral_normalization_transcribed():
    """Keras: K = reshape(kernel, (-1, out)); normalize = x / max(||x||, 1e-7); dW = dw."""
    kernel = RNG.standard_normal((5, 3))
    u0 = 0.02 * RNG.standard_normal((1, 3))
    K = kernel.reshape(-1, 3)

    def normalize(x):
        return x * np.minimum(1 / np.sqrt(np.sum(x * x)), 1e7)

    v = normalize(u0 @ K.T)
    u = normalize(v @ K)
    sigma = (v @ K @ u.T)[0, 0]
    hp = {**OP.dialect("keras"), "training": True}
    out, state = OP.apply({"weight": kernel}, {"u": u0[0]}, **hp)
    np.testing.assert_allclose(out["w"], kernel / sigma, rtol=1e-14)
    np.testing.assert_allclose(state["u"], u[0], rtol=1e-13)
    dw = RNG.standard_normal(kernel.shape)
    grads = OP.vjp({"weight": kernel}, {"u": u0[0]}, {"w": dw, "sigma": np.float64(3.0)}, **hp)
    np.testing.assert_array_equal(grads["weight"], dw)


# --- properties ---------------------------------------------------------------------------------

small_shapes = st.tuples(st.integers(1, 5), st.integers(1, 6))
orders = st.sampled_from(["u_then_v", "v_then_u"])
normalizers = st.sampled_from(["add", "max", "rsqrt"])


@pytest.mark.checks("invariant_to_positive_scaling_given_uv")
@given(shape=small_shapes, seed=st.integers(0, 2**32 - 1), k=st.integers(-60, 60),
       order=orders, normalize=normalizers, training=st.booleans())
def test_invariant_to_power_of_two_scaling_exactly(shape, seed, k, order, normalize, training):
    """W_SN(aW) = W_SN(W) for fixed u, v: bit for bit when a = 2^k (every step scales exactly;
    eps = 1e-300 is below every norm, so it drops out of the rounding)."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal(shape)
    state = {"u": unit(rng, shape[0]), "v": unit(rng, shape[1])}
    hp = dict(iteration_order=order, normalize=normalize, training=training, eps=1e-300,
              n_power_iterations=2)
    w1, s1, st1 = apply(W, state, **hp)
    w2, s2, st2 = apply(W * 2.0**k, state, **hp)
    np.testing.assert_array_equal(w2, w1)
    assert s2 == s1 * 2.0**k
    for key in state:
        np.testing.assert_array_equal(st2[key], st1[key])


@pytest.mark.checks("invariant_to_positive_scaling_given_uv")
@given(shape=small_shapes, seed=st.integers(0, 2**32 - 1), log_a=st.floats(-6, 6))
def test_invariant_to_positive_scaling_frozen(shape, seed, log_a):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal(shape)
    u, v = unit(rng, shape[0]), unit(rng, shape[1])
    a = 10.0**log_a
    w1, s1, _ = apply(W, {"u": u, "v": v}, training=False)
    w2, _, _ = apply(W * a, {"u": u, "v": v}, training=False)
    # sigma = u^T W v: rounding of a*W (1 ulp) and of the sum (n ulps) relative to |u|^T|W||v|;
    # its condition number |u|^T|W||v| / |sigma| carries that to w.
    cond = (np.abs(u) @ np.abs(W) @ np.abs(v)) / abs(s1)
    np.testing.assert_allclose(w2, w1, rtol=4 * (W.size + 2) * U64 * cond, atol=0)


def _with_gap(rng, shape, gap):
    """A matrix whose singular values satisfy s1 >= gap * s2 (U, V random orthogonal)."""
    m, n = shape
    k = min(m, n)
    U, _ = np.linalg.qr(rng.standard_normal((m, m)))
    V, _ = np.linalg.qr(rng.standard_normal((n, n)))
    s = np.sort(rng.uniform(0.1, 1.0, k))[::-1]
    s[0] = gap * (s[1] if k > 1 else s[0]) + rng.uniform(0, 1)
    S = np.zeros((m, n))
    S[:k, :k] = np.diag(s)
    return U @ S @ V.T, s[0]


@pytest.mark.checks("sigma_increases_monotonically_to_largest_singular_value")
@given(shape=small_shapes, seed=st.integers(0, 2**32 - 1), order=orders, normalize=normalizers)
def test_sigma_increases_monotonically_to_the_largest_singular_value(shape, seed, order, normalize):
    rng = np.random.default_rng(seed)
    W, s1 = _with_gap(rng, shape, gap=1.5)
    state = {"u": unit(rng, shape[0]), "v": unit(rng, shape[1])}
    eps = 1e-12
    hp = dict(iteration_order=order, normalize=normalize, eps=eps)
    sigmas = []
    for _ in range(80):
        w, s, state = apply(W, state, **hp)
        sigmas.append(s)
    sigmas = np.array(sigmas)
    # Exact power iteration: each half-step is a Cauchy-Schwarz step, so the estimates never
    # decrease and never exceed s1.  Rounding: ~10 ulps.  eps shortens each normalized vector,
    # by eps/||x|| ("add") or eps/(2||x||^2) ("rsqrt"; "max" not at all when ||x|| > eps), with
    # ||x|| >= sigma_k, which lowers sigma by up to twice that, relative.
    s_min = sigmas.min()
    shrink = {"add": eps / s_min, "rsqrt": eps / (2 * s_min**2), "max": 0.0}[normalize]
    slack = 16 * U64 + 4 * shrink
    assert np.all(np.diff(sigmas) >= -slack * sigmas[1:])
    assert np.all(sigmas <= s1 * (1 + slack))
    # (s2/s1)^2 <= 0.45 per step: after 80 steps the iterate is exact to rounding and eps.
    np.testing.assert_allclose(sigmas[-1], s1, rtol=slack + 1e-13)
    np.testing.assert_allclose(np.linalg.norm(w, 2), 1.0, rtol=slack + 1e-13)


@pytest.mark.checks("vjp_at_singular_vectors_is_gradient_of_w_over_spectral_norm")
@given(shape=small_shapes, seed=st.integers(0, 2**32 - 1), training=st.booleans())
def test_vjp_at_singular_vectors_is_the_gradient_of_w_over_spectral_norm(shape, seed, training):
    """Eq. 12: with u, v the exact singular vectors the detached VJP is the true gradient of
    W / ||W||_2 (and of sigma = ||W||_2), checked by finite differences of an SVD."""
    rng = np.random.default_rng(seed)
    W, _ = _with_gap(rng, shape, gap=1.2)

    def f(inputs):
        Wx = inputs["weight"]
        s = np.linalg.svd(Wx, compute_uv=False)[0]
        return {"sigma": np.asarray(s), "w": Wx / s}

    def vjp(inputs, cot):
        state = OP.init_state(inputs)
        return OP.vjp(inputs, state, cot, training=training, normalize="max")

    check_vjp(f, vjp, {"weight": W}, rtol=1e-8)


@pytest.mark.checks("grad_orthogonal_to_weight")
@given(shape=small_shapes, seed=st.integers(0, 2**32 - 1), order=orders, training=st.booleans(),
       dsigma=st.floats(-3, 3))
def test_grad_is_orthogonal_to_weight(shape, seed, order, training, dsigma):
    """<dW, W> = <G,W>/sigma - <G,W>/sigma^2 u^T W v + dsigma u^T W v = dsigma * sigma."""
    rng = np.random.default_rng(seed)
    W, G = rng.standard_normal(shape), rng.standard_normal(shape)
    state = {"u": unit(rng, shape[0]), "v": unit(rng, shape[1])}
    hp = dict(iteration_order=order, training=training, normalize="max")
    _, sigma, _ = apply(W, state, **hp)
    dW = OP.vjp({"weight": W}, state, {"w": G, "sigma": np.float64(dsigma)}, **hp)["weight"]
    # Each term of <dW, W> is accurate to ~n ulps of its own size.
    scale = np.sum(np.abs(G * W)) / abs(sigma) * (1 + np.abs(state["u"]) @ np.abs(W) @
                                                  np.abs(state["v"]) / abs(sigma))
    atol = 8 * (W.size + 2) * U64 * (scale + abs(dsigma * sigma))
    np.testing.assert_allclose(np.sum(dW * W), dsigma * sigma, atol=atol)


@pytest.mark.checks("training_vjp_is_frozen_vjp_at_the_updated_state")
@given(shape=small_shapes, seed=st.integers(0, 2**32 - 1), order=orders, normalize=normalizers)
def test_training_vjp_is_the_frozen_vjp_at_the_updated_state(shape, seed, order, normalize):
    """u, v are detached: training differentiates W / (u'^T W v') with the updated u', v' fixed."""
    rng = np.random.default_rng(seed)
    W, G = rng.standard_normal(shape), rng.standard_normal(shape)
    state = {"u": unit(rng, shape[0]), "v": unit(rng, shape[1])}
    hp = dict(iteration_order=order, normalize=normalize, n_power_iterations=2)
    _, sigma, new_state = apply(W, state, **hp)
    cot = {"w": G, "sigma": np.float64(0.7)}
    g_train = OP.vjp({"weight": W}, state, cot, **hp)["weight"]
    g_frozen = OP.vjp({"weight": W}, new_state, cot, training=False, **hp)["weight"]
    # The two sigmas differ by rounding only (evaluated as <W^T u, v> vs <u, W v>).
    cond = (np.abs(new_state["u"]) @ np.abs(W) @ np.abs(new_state["v"])) / abs(sigma)
    scale = np.max(np.abs(g_frozen)) + np.sum(np.abs(G * W)) / sigma**2
    np.testing.assert_allclose(g_train, g_frozen, atol=8 * (W.size + 2) * U64 * cond * scale)


def test_detached_vjp_differs_from_the_true_derivative_away_from_convergence():
    """backward = custom: from stale u, v the forward's true derivative has du/dW terms."""
    W = RNG.standard_normal((4, 5))
    state = {"u": unit(RNG, 4), "v": unit(RNG, 5)}
    f_true = {"weight": W}

    def f(inputs):
        out, _ = OP.apply(inputs, state)
        return {"sigma": out["sigma"], "w": out["w"]}

    def vjp(inputs, cot):
        return OP.vjp(inputs, state, cot)

    result = check_vjp(f, vjp, f_true, rtol=1e-8, raise_on_failure=False)
    assert result.max_relative_error > 1e-4
    # With n_power_iterations = 0 the forward is W / (u^T W v): the VJP is exact.
    def f0(inputs):
        out, _ = OP.apply(inputs, state, n_power_iterations=0)
        return {"sigma": out["sigma"], "w": out["w"]}

    check_vjp(f0, lambda x, c: OP.vjp(x, state, c, n_power_iterations=0), f_true, rtol=1e-8)


# --- PyTorch cross-checks (float64) ------------------------------------------------------------


def _torch_param_steps(module, dim, steps=3, lr=0.1):
    """Train steps (forward + backward + SGD) then one eval step of a parametrized module,
    each compared with the oracle under the torch dialect (weight, u, v, grad)."""
    torch = torch_or_skip()
    P = torch.nn.utils.parametrizations
    P.spectral_norm(module, dim=dim)
    param = module.parametrizations.weight.original
    sn = module.parametrizations.weight[0]
    hp = {**OP.dialect("torch"), "dim": dim if dim is not None else 0}
    if dim is None and isinstance(module, torch.nn.ConvTranspose2d):
        hp["dim"] = 1
    state = {"u": sn._u.detach().numpy().copy(), "v": sn._v.detach().numpy().copy()}
    for step in range(steps + 1):
        training = step < steps
        module.train(training)
        W = param.detach().numpy().copy()
        G = RNG.standard_normal(W.shape)
        w_t = module.weight                      # one parametrization forward = one power step
        (w_t * t64(G)).sum().backward()
        out, new_state = OP.apply({"weight": W}, state, **{**hp, "training": training})
        grads = OP.vjp({"weight": W}, state, {"w": G}, **{**hp, "training": training})
        np.testing.assert_allclose(out["w"], w_t.detach().numpy(), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(new_state["u"], sn._u.numpy(), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(new_state["v"], sn._v.numpy(), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(grads["weight"], param.grad.numpy(), rtol=1e-10, atol=1e-12)
        with torch.no_grad():
            param -= lr * param.grad
        param.grad = None
        state = new_state


def test_matches_torch_parametrization_linear():
    torch = torch_or_skip()
    torch.manual_seed(0)
    _torch_param_steps(torch.nn.Linear(6, 4, dtype=torch.float64), None)


def test_matches_torch_parametrization_conv2d():
    torch = torch_or_skip()
    torch.manual_seed(1)
    _torch_param_steps(torch.nn.Conv2d(3, 4, 3, dtype=torch.float64), None)


def test_matches_torch_parametrization_conv_transpose():
    torch = torch_or_skip()
    torch.manual_seed(2)
    module = torch.nn.ConvTranspose2d(3, 2, 2, dtype=torch.float64)  # weight (in, out, kh, kw)
    _torch_param_steps(module, None)


def test_matches_torch_on_a_vector_weight():
    """torch: 1-D weights take F.normalize in every mode, no buffers.  Here: the (n, 1) matrix,
    which one power step normalizes exactly (training, or eval_mode = iterate_no_store)."""
    torch = torch_or_skip()
    module = torch.nn.Linear(3, 5, dtype=torch.float64)
    torch.nn.utils.parametrizations.spectral_norm(module, name="bias")
    param = module.parametrizations.bias.original
    b = param.detach().numpy().copy()
    stale = {"u": unit(RNG, 5), "v": np.ones(1)}
    for training, mode in ((True, "frozen"), (False, "iterate_no_store")):
        module.train(training)
        G = RNG.standard_normal(5)
        (module.bias * t64(G)).sum().backward()
        hp = {**OP.dialect("torch"), "training": training, "eval_mode": mode}
        out, _ = OP.apply({"weight": b}, stale, **hp)
        grads = OP.vjp({"weight": b}, stale, {"w": G}, **hp)
        np.testing.assert_allclose(out["w"], module.bias.detach().numpy(), rtol=1e-14)
        np.testing.assert_allclose(float(out["sigma"]), np.linalg.norm(b), rtol=1e-14)
        np.testing.assert_allclose(grads["weight"], param.grad.numpy(), rtol=1e-12, atol=1e-14)
        param.grad = None


def test_matches_torch_legacy_spectral_norm():
    torch = torch_or_skip()
    torch.manual_seed(3)
    module = torch.nn.utils.spectral_norm(torch.nn.Linear(5, 3, dtype=torch.float64))
    param = module.weight_orig
    hp = OP.dialect("torch_legacy")
    state = {"u": module.weight_u.numpy().copy(), "v": module.weight_v.numpy().copy()}
    x = t64(RNG.standard_normal((2, 5)))
    for step in range(4):
        training = step < 3
        module.train(training)
        W = param.detach().numpy().copy()
        module(x)                                # the pre-forward hook computes module.weight
        G = RNG.standard_normal(W.shape)
        (module.weight * t64(G)).sum().backward()
        out, new_state = OP.apply({"weight": W}, state, **{**hp, "training": training})
        grads = OP.vjp({"weight": W}, state, {"w": G}, **{**hp, "training": training})
        np.testing.assert_allclose(out["w"], module.weight.detach().numpy(), rtol=1e-12)
        np.testing.assert_allclose(new_state["u"], module.weight_u.numpy(), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(new_state["v"], module.weight_v.numpy(), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(grads["weight"], param.grad.numpy(), rtol=1e-10, atol=1e-12)
        with torch.no_grad():
            param -= 0.1 * param.grad
        param.grad = None
        state = new_state


def test_torch_warm_up_approaches_the_oracle_init_state():
    """torch's 15 registration steps head for the exact singular pair init_state returns."""
    torch = torch_or_skip()
    torch.manual_seed(4)
    # Singular values 4, 1, 0.5, 0.25: the power iteration's error shrinks by (1/4)^2 a step, so
    # 15 steps from any start not orthogonal to the pair leave ~1e-18 (its own generator: a
    # shared one made W, and the gap, depend on the tests run before it).
    rng = np.random.default_rng(4)
    U, _ = np.linalg.qr(rng.standard_normal((6, 4)))
    V, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    W = U @ np.diag([4.0, 1.0, 0.5, 0.25]) @ V.T
    module = torch.nn.Linear(4, 6, dtype=torch.float64)
    with torch.no_grad():
        module.weight.copy_(t64(W))
    torch.nn.utils.parametrizations.spectral_norm(module)
    sn = module.parametrizations.weight[0]
    state = OP.init_state({"weight": W})
    sign = np.sign(sn._v.numpy() @ state["v"])
    np.testing.assert_allclose(sign * sn._u.numpy(), state["u"], atol=1e-6)
    np.testing.assert_allclose(sign * sn._v.numpy(), state["v"], atol=1e-6)


# --- the human API (bad input: [[error_cases]] in specs/normalizers/spectral_norm.toml) ---------


def test_human_api_defaults():
    W = np.ones((3, 4)) + np.eye(3, 4)
    (w, sigma), state = spectral_norm(W)  # defaults: the exact singular pair, one "add" step
    # x / (||x|| + eps) shortens u and v by eps / ||x|| each: sigma is low by ~2 eps / sigma.
    top = np.linalg.norm(W, 2)
    np.testing.assert_allclose(float(sigma), top * (1 - 2e-12 / top), rtol=1e-14)
    assert set(state) == {"u", "v"}
