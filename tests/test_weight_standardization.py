"""Weight Standardization: forward vs mpmath on adversarial filters, properties, torch (timm, README,
BCN, Chainer formulas) and JAX (NFNets formula) cross-checks, constant filters
(bad input: the spec's [[error_cases]], tests/test_error_cases.py)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reference
from conformance.cases import ADVERSARIAL, adversarial
from helpers import (
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
from reference.normalizers.weight_standardization import weight_standardization

OP = reference.get("weight_standardization")
RNG = np.random.default_rng(20260103)
MODES = [("add_std", 1), ("add_std", 0), ("add_var", 1), ("add_var", 0), ("max_fanin_var", 0),
         ("max_fanin_var", 1)]


def mp_weight_standardization(w, eps, correction, eps_mode, axis=0):
    """Eq. 5 at 50 digits with the chosen sigma, written independently of the oracle."""
    mpmath = mp()
    R = tuple(a for a in range(w.ndim) if a != axis % w.ndim)
    n = int(np.prod([w.shape[a] for a in R]))
    W = mp_array(w)
    var = mp_var(W, R, correction)
    e = mpmath.mpf(float(eps))
    if eps_mode == "add_std":
        sigma = mp_sqrt(var) + e
    elif eps_mode == "add_var":
        sigma = mp_sqrt(var + e)
    else:
        sigma = mp_sqrt(np.vectorize(lambda a: max(n * a, e), otypes=[object])(var))
    return (W - mp_mean(W, R)) / sigma


# --- forward accuracy -------------------------------------------------------------------------


def _eps_for(family, eps_mode):
    # eps at 1e-5 of the data's own scale: large enough that a wrong placement of eps errs by
    # ~1e-5 (far above the 1e-10 bound), small enough that the statistics, not eps, dominate.
    std = {"offset_1e8_std_1e-3": 1e-3, "offset_1e4_std_1e-2": 1e-2, "constant": 1.0,
           "huge_1e150": 1e150, "tiny_1e-150": 1e-150, "mixed_scales": 1e5,
           "fp16_square_overflow": 300.0}[family]
    # add_std compares eps with a std; add_var and max_fanin_var with a variance.
    return 1e-5 * std if eps_mode == "add_std" else max(1e-5 * std * std, 5e-324)


@pytest.mark.parametrize(("eps_mode", "correction"), MODES)
@pytest.mark.parametrize("family", sorted(ADVERSARIAL))
def test_forward_matches_mpmath_on_adversarial_filters(family, eps_mode, correction):
    w = adversarial(family, (4, 3, 3, 2))
    eps = _eps_for(family, eps_mode)
    out = weight_standardization(w, eps=eps, correction=correction, eps_mode=eps_mode)
    err = relative_error(out, mp_weight_standardization(w, eps, correction, eps_mode))
    assert err <= 1e-10, f"{family}: relative error {err:.3g}"


@pytest.mark.parametrize("dialect", ["ws_readme_tf", "nfnets"])
def test_hwio_layout_matches_mpmath(dialect):
    w = adversarial("offset_1e4_std_1e-2", (3, 3, 2, 4))
    hp = OP.dialect(dialect)
    hp["eps"] = 1e-9
    out = OP.apply({"weight": w}, None, **hp)[0]["w_hat"]
    exact = mp_weight_standardization(w, 1e-9, hp["correction"], hp["eps_mode"], axis=-1)
    assert relative_error(out, exact) <= 1e-10


def test_plain_two_pass_formula_would_fail_the_offset_family():
    """The accuracy test has teeth: the README formula in plain float64 misses 1e-10 here."""
    w = adversarial("offset_1e8_std_1e-3", (4, 3, 3, 2))
    mean = w.mean(axis=(1, 2, 3), keepdims=True)
    naive = (w - mean) / (w.std(axis=(1, 2, 3), ddof=1, keepdims=True) + 1e-8)
    assert relative_error(naive, mp_weight_standardization(w, 1e-8, 1, "add_std")) > 1e-10


@pytest.mark.checks("constant_filter_gives_zero")
@pytest.mark.parametrize(("eps_mode", "correction"), MODES)
def test_constant_filters_give_zero_and_the_limit_gradient(eps_mode, correction):
    """var = 0: W_hat = 0 exactly in every mode, and dW = (G - mean G)/sigma(0), which is the
    derivative of c / (||c||/sqrt(d) + eps) at c = 0 (the formula's second term is 0 * inf there).
    A central difference with a tiny step confirms it to O(step)."""
    w = adversarial("constant", (3, 2, 2, 2))
    w[2] = RNG.standard_normal((2, 2, 2))     # one ordinary filter alongside
    eps = 1e-2
    hp = {"eps": eps, "correction": correction, "eps_mode": eps_mode}
    out = OP.apply({"weight": w}, None, **hp)[0]["w_hat"]
    np.testing.assert_array_equal(out[:2], 0.0)
    G = RNG.standard_normal(w.shape)
    dw = OP.vjp({"weight": w}, None, {"w_hat": G}, **hp)["weight"]
    assert np.all(np.isfinite(dw))
    sigma0 = {"add_std": eps, "add_var": np.sqrt(eps), "max_fanin_var": np.sqrt(eps)}[eps_mode]
    expected = (G[:2] - G[:2].mean(axis=(1, 2, 3), keepdims=True)) / sigma0
    np.testing.assert_allclose(dw[:2], expected, rtol=1e-14)
    D = np.zeros_like(w)
    D[:2] = RNG.standard_normal((2, 2, 2, 2))
    t = 1e-9
    plus = OP.apply({"weight": w + t * D}, None, **hp)[0]["w_hat"]
    minus = OP.apply({"weight": w - t * D}, None, **hp)[0]["w_hat"]
    fd = np.sum(G * (plus - minus)) / (2 * t)
    np.testing.assert_allclose(np.sum(dw * D), fd, rtol=1e-5)


def test_fan_in_of_one_is_zero_when_biased():
    out = weight_standardization(np.array([[2.0], [-1.0]]), correction=0, eps_mode="add_var")
    np.testing.assert_array_equal(out, 0.0)


# --- properties -------------------------------------------------------------------------------

shapes = st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), st.integers(2, 3))
modes = st.sampled_from(MODES)


@given(shape=shapes, mode=modes, seed=st.integers(0, 2**32 - 1), log_a=st.floats(-3, 3),
       b=st.floats(-1e3, 1e3))
def test_invariant_to_positive_filter_affine(shape, mode, seed, log_a, b):
    eps_mode, correction = mode
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape)
    a = 10.0 ** (log_a + 0.1 * rng.standard_normal((shape[0], 1, 1, 1)))
    eps = 1e-300   # eps -> 0 makes the invariance exact up to rounding
    hp = {"eps": eps, "correction": correction, "eps_mode": eps_mode}
    y1 = weight_standardization(w, **hp)
    y2 = weight_standardization(a * w + b, **hp)
    # |b|/(a std) is the cancellation condition number of the shifted filter (as in the BN test);
    # each output errs by ~u times it after the shift (Sterbenz-exact centering of the rest).
    std = w.reshape(shape[0], -1).std(axis=1).clip(1e-3)[:, None, None, None]
    cond = 1 + np.max(np.abs(b) / (a * std))
    np.testing.assert_allclose(y2, y1, atol=1e-13 * cond * np.max(np.abs(y1)))


@pytest.mark.checks("filter_mean_is_zero", "filter_variance_matches_correction")
@given(shape=shapes, mode=modes, seed=st.integers(0, 2**32 - 1), eps=st.floats(1e-8, 1.0))
def test_filter_mean_is_zero_and_variance_matches_correction(shape, mode, seed, eps):
    eps_mode, correction = mode
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape) * 2.0 + 0.5
    y = weight_standardization(w, eps=eps, correction=correction, eps_mode=eps_mode)
    flat, wf = y.reshape(shape[0], -1), w.reshape(shape[0], -1)
    n = flat.shape[1]
    np.testing.assert_allclose(flat.mean(axis=1), 0, atol=1e-14 * np.max(np.abs(flat)) + 1e-300)
    var = wf.var(axis=1, ddof=correction)
    # Expected spread of W_hat in the statistic that sigma used (var/sigma^2, 1 as eps -> 0).
    if eps_mode == "add_std":
        expected = var / (np.sqrt(var) + eps) ** 2
    elif eps_mode == "add_var":
        expected = var / (var + eps)
    else:
        # n var_c(W_hat) = n var / max(n var, eps): unit L2 norm per filter when unclamped.
        expected = n * var / np.maximum(n * var, eps) / n
    np.testing.assert_allclose(flat.var(axis=1, ddof=correction), expected, rtol=1e-12, atol=1e-15)


@pytest.mark.checks("grad_sums_zero_per_filter")
@given(shape=shapes, mode=modes, seed=st.integers(0, 2**32 - 1))
def test_grad_sums_to_zero_per_filter(shape, mode, seed):
    """The filter mean is subtracted, so W + c 1 does not change W_hat: sum_fan-in dW = 0."""
    eps_mode, correction = mode
    rng = np.random.default_rng(seed)
    w, G = rng.standard_normal(shape), rng.standard_normal(shape)
    hp = {"eps": 1e-5, "correction": correction, "eps_mode": eps_mode}
    dw = OP.vjp({"weight": w}, None, {"w_hat": G}, **hp)["weight"]
    sigma_min = np.sqrt(1e-5) if eps_mode != "add_std" else 1e-5
    scale = np.sum(np.abs(G)) / max(np.min(w.reshape(shape[0], -1).std(axis=1)), sigma_min)
    np.testing.assert_allclose(dw.reshape(shape[0], -1).sum(axis=1), 0, atol=1e-14 * scale)


# --- PyTorch cross-checks (float64): timm, README, BCN, Chainer formulas ------------------------


def _torch_formulas():
    torch = torch_or_skip()
    F = torch.nn.functional

    def timm(w, eps):     # timm/layers/std_conv.py StdConv2d
        return F.batch_norm(w.reshape(1, w.shape[0], -1), None, None, training=True,
                            momentum=0.0, eps=eps).reshape_as(w)

    def readme_torch(w, eps):     # WeightStandardization README, PyTorch (std_mean: unbiased)
        std, mean = torch.std_mean(w, dim=tuple(range(1, w.ndim)), keepdim=True)
        return (w - mean) / (std + eps)

    def readme_tf(w, eps):        # README TF snippet on an HWIO kernel; keras std is biased
        axes = tuple(range(w.ndim - 1))
        c = w - w.mean(dim=axes, keepdim=True)
        return c / (c.std(dim=axes, keepdim=True, correction=0) + eps)

    def bcn(w, eps):              # Batch-Channel-Normalization imagenet/models/layers.py
        c = w - w.mean(dim=1, keepdim=True).mean(dim=2, keepdim=True).mean(dim=3, keepdim=True)
        std = torch.pow(c.view(c.size(0), -1).var(dim=1) + eps, 0.5).view(-1, 1, 1, 1)
        return c / std.expand_as(c)

    def chainer(w, eps):          # chainer/functions/normalization/_standardize.py
        # sqrt(mean(c^2)) written as torch's biased std, whose backward masks std = 0 as
        # Chainer's hand-written backward does (a bare sqrt would give 0 * inf = NaN there).
        axes = tuple(range(1, w.ndim))
        c = w - w.mean(dim=axes, keepdim=True)
        return c / (c.std(dim=axes, keepdim=True, correction=0) + eps)

    return {"timm": timm, "ws_readme_torch": readme_torch, "ws_readme_tf": readme_tf,
            "bcn": bcn, "chainer": chainer}


@pytest.mark.parametrize("eps_scale", [1.0, 1e4])
@pytest.mark.parametrize("constant_filter", [False, True])
@pytest.mark.parametrize("dialect", ["timm", "ws_readme_torch", "ws_readme_tf", "bcn", "chainer"])
def test_matches_official_formulas_in_torch_float64(dialect, constant_filter, eps_scale):
    """Each dialect reproduces its source's formula, outputs and autograd gradients.
    eps_scale = 1e4 makes eps large enough that its placement changes the result visibly;
    a constant filter checks the var = 0 limit against torch's autograd."""
    formula = _torch_formulas()[dialect]
    hp = OP.dialect(dialect)
    hp["eps"] *= eps_scale
    shape = (3, 3, 2, 4) if hp["axis"] == -1 else (4, 2, 3, 3)
    w = RNG.standard_normal(shape) * 0.1
    if constant_filter:   # output filter 1 all equal
        w[(..., 1) if hp["axis"] == -1 else (1,)] = 0.75
    tw = t64(w, True)
    ty = formula(tw, hp["eps"])
    out = OP.apply({"weight": w}, None, **hp)[0]["w_hat"]
    np.testing.assert_allclose(out, ty.detach().numpy(), rtol=1e-13, atol=1e-14)
    G = RNG.standard_normal(shape)
    expected = torch_vjp(ty, {"weight": tw}, G)["weight"]
    got = OP.vjp({"weight": w}, None, {"w_hat": G}, **hp)["weight"]
    np.testing.assert_allclose(got, expected, rtol=1e-11, atol=1e-11 * np.max(np.abs(expected)))


def test_dialects_are_told_apart():
    """The knobs matter: on the same filters every pair of dialects disagrees (eps scaled up)."""
    w = RNG.standard_normal((4, 2, 3, 3)) * 0.1
    outs = {}
    for d in ("timm", "ws_readme_torch", "bcn", "chainer"):
        hp = OP.dialect(d) | {"eps": 1e-3}
        outs[d] = OP.apply({"weight": w}, None, **hp)[0]["w_hat"]
    names = sorted(outs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert np.max(np.abs(outs[a] - outs[b])) > 1e-4, (a, b)


# --- NFNets formula in JAX (float64) --------------------------------------------------------------


@pytest.mark.parametrize("eps", [1e-4, 30.0])
def test_matches_nfnets_wsconv2d_formula_in_jax(eps):
    """deepmind-research nfnets/base.py WSConv2D.standardize_weight with gain = 1 (HWIO):
    w * rsqrt(max(var * fan_in, eps)) - mean * rsqrt(...).  eps = 30 clamps the small filters."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    w = RNG.standard_normal((3, 3, 2, 5))
    w[..., :2] *= 0.3    # fan_in * var ~ 18 * 0.09 < 30: the floor branch for these two filters
    G = RNG.standard_normal(w.shape)

    def standardize_weight(weight):
        mean = jnp.mean(weight, axis=(0, 1, 2), keepdims=True)
        var = jnp.var(weight, axis=(0, 1, 2), keepdims=True)
        fan_in = np.prod(weight.shape[:-1])
        scale = jax.lax.rsqrt(jnp.maximum(var * fan_in, eps))
        return weight * scale - mean * scale

    with jax.enable_x64(True):
        out, pullback = jax.vjp(standardize_weight, jnp.asarray(w))
        expected = np.asarray(pullback(jnp.asarray(G))[0])
        out = np.asarray(out)
    hp = OP.dialect("nfnets") | {"eps": eps}
    np.testing.assert_allclose(OP.apply({"weight": w}, None, **hp)[0]["w_hat"], out, rtol=1e-13,
                               atol=1e-14)
    got = OP.vjp({"weight": w}, None, {"w_hat": G}, **hp)["weight"]
    np.testing.assert_allclose(got, expected, rtol=1e-11, atol=1e-12)


def test_nfnets_tie_splits_the_gradient_like_jax():
    """At n var == eps exactly, jnp.maximum gives each branch half the gradient; so does the oracle."""
    w = np.array([[1.0, -1.0, 1.0, -1.0]])      # n = 4, var = 1: n var = 4
    G = np.array([[0.3, -1.2, 0.5, 1.0]])
    hp = {"eps": 4.0, "correction": 0, "eps_mode": "max_fanin_var"}
    dw = OP.vjp({"weight": w}, None, {"w_hat": G}, **hp)["weight"]
    below = OP.vjp({"weight": w}, None, {"w_hat": G}, **(hp | {"eps": 4.0 * (1 + 1e-12)}))["weight"]
    above = OP.vjp({"weight": w}, None, {"w_hat": G}, **(hp | {"eps": 4.0 * (1 - 1e-12)}))["weight"]
    np.testing.assert_allclose(dw, 0.5 * (below + above), rtol=1e-11)
    assert np.max(np.abs(below - above)) > 0.1

