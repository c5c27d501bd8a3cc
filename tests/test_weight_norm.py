"""WeightNorm: forward vs mpmath on adversarial v, properties, inits, torch and Flax/TF formulas, errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reference
from conformance.cases import ADVERSARIAL, adversarial
from helpers import mp, mp_array, mp_sqrt, relative_error, t64, torch_or_skip, torch_vjp
from reference.normalizers.weight_norm import data_dependent_init, init_g, weight_norm

OP = reference.get("weight_norm")
RNG = np.random.default_rng(20260102)


def _keep(v, dim):
    """Axes reduced by the norm and g's keepdims shape (written independently of the oracle)."""
    if dim is None:
        return tuple(range(v.ndim)), (1,) * v.ndim
    d = dim % v.ndim
    shape = [1] * v.ndim
    shape[d] = v.shape[d]
    return tuple(a for a in range(v.ndim) if a != d), tuple(shape)


def mp_weight_norm(v, g, dim, eps=0.0, eps_mode="add"):
    """Eq. 2 at 50 digits: g * v / sqrt(sum v^2 + eps) (or max(sum v^2, eps))."""
    mpmath = mp()
    axes, _ = _keep(v, dim)
    V = mp_array(v)
    sq = np.sum(V * V, axis=axes, keepdims=True)
    e = mpmath.mpf(float(eps))
    if eps_mode == "add":
        s = mp_sqrt(sq + e)
    else:
        s = mp_sqrt(np.vectorize(lambda a: max(a, e), otypes=[object])(sq))
    return mp_array(g) * V / s


# --- forward accuracy -------------------------------------------------------------------------


def _eps_for(v, axes, kind):
    # "comparable": eps = half the mean squared slice norm, so eps changes w by O(1) and its
    # placement is tested at 1e-10; representable for every family (1e-300 .. 1e301).
    if kind == "zero":
        return 0.0
    return 0.5 * float(np.mean(np.sum(v * v, axis=axes)))


@pytest.mark.parametrize("dim", [0, -1, None])
@pytest.mark.parametrize(("eps_kind", "eps_mode"), [("zero", "add"), ("comparable", "add"),
                                                    ("comparable", "max")])
@pytest.mark.parametrize("family", sorted(ADVERSARIAL))
def test_forward_matches_mpmath_on_adversarial_v(family, eps_kind, eps_mode, dim):
    v = adversarial(family, (4, 3, 5))
    axes, g_shape = _keep(v, dim)
    g = 1 + 0.5 * RNG.standard_normal(g_shape)
    eps = _eps_for(v, axes, eps_kind)
    w = OP.apply({"v": v, "g": g}, None, dim=dim, eps=eps, eps_mode=eps_mode)[0]["w"]
    err = relative_error(w, mp_weight_norm(v, g, dim, eps, eps_mode))
    assert err <= 1e-10, f"{family}: relative error {err:.3g}"


@pytest.mark.parametrize("scale", [1e200, 1e-200, 1e300])
def test_scaled_norm_reaches_beyond_the_sum_of_squares_range(scale):
    """|v| = 1e±200: sum v^2 overflows (or goes subnormal) in float64; the scaled norm does not."""
    v = scale * RNG.standard_normal((3, 6))
    g = 1 + 0.5 * RNG.standard_normal((3, 1))
    with np.errstate(over="ignore", under="ignore", divide="ignore", invalid="ignore"):
        naive = g * v / np.sqrt(np.sum(v * v, axis=1, keepdims=True))
    assert not np.all(np.isfinite(naive)) or relative_error(
        naive, mp_weight_norm(v, g, 0)) > 1e-10, "the test would have no teeth"
    w = weight_norm(v, g, dim=0)
    assert relative_error(w, mp_weight_norm(v, g, 0)) <= 1e-10


def test_rank_one_v_with_dim_zero_is_g_times_sign():
    """Every element is its own slice (as in torch and Flax): w = g * sign(v)."""
    v, g = np.array([3.0, -4.0, 1e-300, -1e300]), np.array([2.0, 0.5, -1.0, 3.0])
    np.testing.assert_array_equal(weight_norm(v, g, dim=0), g * np.sign(v))


def test_constant_v_and_eps_dominated_slices():
    v = adversarial("constant", (2, 9))
    w = weight_norm(v, np.ones((2, 1)), dim=0)
    np.testing.assert_allclose(w, np.full((2, 9), 1 / 3), rtol=2e-16)
    # A zero slice with eps > 0 gives w = 0 and the finite gradient g G / sqrt(eps).
    v = np.zeros((2, 4))
    v[1] = RNG.standard_normal(4)
    for mode in ("add", "max"):
        out = weight_norm(v, np.full((2, 1), 2.0), dim=0, eps=1e-12, eps_mode=mode)
        np.testing.assert_array_equal(out[0], 0.0)
        G = RNG.standard_normal((2, 4))
        dv = OP.vjp({"v": v, "g": np.full((2, 1), 2.0)}, None, {"w": G}, eps=1e-12,
                    eps_mode=mode)["v"]
        np.testing.assert_allclose(dv[0], 2.0 * G[0] / 1e-6, rtol=1e-15)


# --- properties -------------------------------------------------------------------------------

shapes = st.tuples(st.integers(1, 5), st.integers(1, 4), st.integers(1, 4))
dims = st.sampled_from([0, 1, 2, -1, None])

# Tolerances: w = g * v / ||v|| rounds once per element and the norm sums n <= 80 squares, so its
# relative error is below (n/2 + 4) u < 1e-14; 1e-13 relative leaves a margin without hiding a
# missing or wrong factor (which errs by O(1)).


@given(shape=shapes, dim=dims, seed=st.integers(0, 2**32 - 1), log_a=st.floats(-6, 6))
def test_invariant_to_positive_scaling_of_v(shape, dim, seed, log_a):
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(shape)
    g = rng.standard_normal(_keep(v, dim)[1])
    a = 10.0 ** log_a
    w1, w2 = weight_norm(v, g, dim=dim), weight_norm(a * v, g, dim=dim)
    np.testing.assert_allclose(w2, w1, rtol=1e-13, atol=1e-13 * np.max(np.abs(g)))


@given(shape=shapes, dim=dims, seed=st.integers(0, 2**32 - 1))
def test_slice_norm_of_w_is_abs_g(shape, dim, seed):
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(shape) * 10.0 ** rng.uniform(-3, 3)
    axes, g_shape = _keep(v, dim)
    g = rng.standard_normal(g_shape)
    w = weight_norm(v, g, dim=dim)
    np.testing.assert_allclose(np.sqrt(np.sum(w * w, axis=axes, keepdims=True)), np.abs(g),
                               rtol=1e-13)


@pytest.mark.checks("grad_v_orthogonal_to_v")
@given(shape=shapes, dim=dims, seed=st.integers(0, 2**32 - 1), eps=st.sampled_from([0.0, 0.3]))
def test_grad_v_is_orthogonal_to_v(shape, dim, seed, eps):
    """<dv, v> = 0 per slice (Eq. 4, eps = 0); with eps, <dv, v> = g dg eps / s^2 exactly."""
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(shape)
    axes, g_shape = _keep(v, dim)
    g, G = rng.standard_normal(g_shape), rng.standard_normal(shape)
    grads = OP.vjp({"v": v, "g": g}, None, {"w": G}, dim=dim, eps=eps)
    inner = np.sum(grads["v"] * v, axis=axes, keepdims=True)
    s2 = np.sum(v * v, axis=axes, keepdims=True) + eps
    expected = g * grads["g"] * eps / s2
    # Scale of the cancelling terms: |g| ||G|| (each of <g G/s, v> and its projection).
    scale = np.abs(g) * np.sqrt(np.sum(G * G, axis=axes, keepdims=True))
    np.testing.assert_allclose(inner, expected, rtol=1e-12, atol=1e-13 * np.max(scale))
    # dg = <G, v> / s (Eq. 3)
    np.testing.assert_allclose(grads["g"], np.sum(G * v, axis=axes, keepdims=True) / np.sqrt(s2),
                               rtol=1e-12, atol=1e-13 * np.max(scale))


@pytest.mark.checks("torch_init_g_reproduces_v")
@given(shape=shapes, dim=dims, seed=st.integers(0, 2**32 - 1))
def test_torch_init_g_reproduces_v_and_flax_init_gives_unit_slices(shape, dim, seed):
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(shape)
    g = init_g(v, dim=dim, mode="norm")
    assert g.shape == (() if dim is None else _keep(v, dim)[1])
    np.testing.assert_allclose(weight_norm(v, g, dim=dim), v, rtol=1e-14, atol=1e-15)
    ones = init_g(v, dim=dim, mode="ones")
    np.testing.assert_array_equal(ones, np.ones_like(g))
    np.testing.assert_allclose(weight_norm(v, ones, dim=dim), weight_norm(v, dim=dim), rtol=0)


@pytest.mark.parametrize("dim", [0, 1, -1])
@given(seed=st.integers(0, 2**32 - 1), init_scale=st.sampled_from([1.0, 0.1]))
def test_data_dependent_init_standardizes_preactivations(dim, seed, init_scale):
    """Sec. 3: with g = s/sigma(t), b = -mu(t) s/sigma(t), y = g t + b has mean 0, std s per unit."""
    rng = np.random.default_rng(seed)
    n_in, n_out = 4, 3
    v = rng.standard_normal((n_out, n_in) if dim == 0 else (n_in, n_out))
    x = rng.standard_normal((16, n_in)) + 2.0
    g, b = data_dependent_init(v, x, dim=dim, init_scale=init_scale)
    assert g.shape == ((n_out, 1) if dim == 0 else (1, n_out)) and b.shape == (n_out,)
    W = weight_norm(v, g, dim=dim)
    y = x @ (W.T if dim == 0 else W) + b
    np.testing.assert_allclose(y.mean(axis=0), 0, atol=1e-13)
    np.testing.assert_allclose(y.std(axis=0), init_scale, rtol=1e-12)
    # eps inside the root (PixelCNN++ 1e-10, Keras 1e-10): sigma = sqrt(var + eps).
    t = x @ ((v / np.linalg.norm(v, axis=1, keepdims=True)).T if dim == 0
             else v / np.linalg.norm(v, axis=0, keepdims=True))
    g_eps, _ = data_dependent_init(v, x, dim=dim, eps=0.25)
    np.testing.assert_allclose(np.ravel(g_eps), 1 / np.sqrt(t.var(axis=0) + 0.25), rtol=1e-13)


# --- PyTorch cross-checks (float64) -------------------------------------------------------------


@pytest.mark.parametrize(("shape", "torch_dim", "dim"), [
    ((4, 5), 0, 0), ((3, 2, 3, 3), 0, 0), ((3, 2, 3, 3), 1, 1), ((2, 3, 4), 2, -1),
    ((2, 3, 4), -1, None), ((5,), 0, 0),
])
def test_matches_torch_weight_norm_interface(shape, torch_dim, dim):
    """torch._weight_norm(v, g, dim): outputs and autograd gradients; torch's -1 = our None."""
    torch = torch_or_skip()
    v = RNG.standard_normal(shape)
    g_shape = () if dim is None else _keep(v, dim)[1]
    g = 1 + 0.5 * RNG.standard_normal(g_shape)
    tv, tg = t64(v, True), t64(g, True)
    tw = torch._weight_norm(tv, tg, torch_dim)
    hp = OP.dialect("torch") | {"dim": dim}
    w = OP.apply({"v": v, "g": g}, None, **hp)[0]["w"]
    np.testing.assert_allclose(w, tw.detach().numpy(), rtol=1e-14, atol=1e-15)
    G = RNG.standard_normal(shape)
    expected = torch_vjp(tw, {"v": tv, "g": tg}, G)
    grads = OP.vjp({"v": v, "g": g}, None, {"w": G}, **hp)
    for key in ("v", "g"):
        np.testing.assert_allclose(grads[key], expected[key], rtol=1e-12, atol=1e-14, err_msg=key)


@pytest.mark.parametrize("layer", ["linear", "conv2d", "conv2d_dim1", "linear_dim_none"])
def test_matches_torch_parametrizations_weight_norm_module(layer):
    """nn.utils.parametrizations.weight_norm: registration (w == v), then gradients w.r.t.
    original0 (g) and original1 (v) after both were moved away from their initial values."""
    torch = torch_or_skip()
    torch.manual_seed(0)
    nn = torch.nn
    module, dim, torch_dim = {
        "linear": (nn.Linear(5, 3), 0, 0),
        "conv2d": (nn.Conv2d(2, 4, 3), 0, 0),
        "conv2d_dim1": (nn.Conv2d(2, 4, 3), 1, 1),
        "linear_dim_none": (nn.Linear(5, 3), None, None),
    }[layer]
    module = module.double()
    w0 = module.weight.detach().numpy().copy()
    nn.utils.parametrizations.weight_norm(module, dim=torch_dim)
    params = module.parametrizations.weight
    g0, v0 = params.original0.detach().numpy(), params.original1.detach().numpy()
    np.testing.assert_allclose(g0, init_g(w0, dim=dim), rtol=1e-14)
    np.testing.assert_allclose(v0, w0, rtol=0)
    hp = OP.dialect("torch") | {"dim": dim}
    np.testing.assert_allclose(OP.apply({"v": v0, "g": g0}, None, **hp)[0]["w"], w0, rtol=1e-14,
                               atol=1e-16)
    with torch.no_grad():
        params.original0.mul_(1.5).add_(0.1)
        params.original1.add_(0.3 * torch.randn_like(params.original1))
    g, v = params.original0.detach().numpy().copy(), params.original1.detach().numpy().copy()
    weight = module.weight
    G = RNG.standard_normal(weight.shape)
    tg, tv = torch.autograd.grad(weight, [params.original0, params.original1], t64(G))
    np.testing.assert_allclose(OP.apply({"v": v, "g": g}, None, **hp)[0]["w"],
                               weight.detach().numpy(), rtol=1e-14, atol=1e-16)
    grads = OP.vjp({"v": v, "g": g}, None, {"w": G}, **hp)
    np.testing.assert_allclose(grads["g"], tg.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(grads["v"], tv.numpy(), rtol=1e-12, atol=1e-14)


# --- Flax and TF formulas, written in JAX (float64) ---------------------------------------------


@pytest.mark.parametrize(("dialect", "eps"), [("flax", None), ("flax", 0.7),
                                              ("openai_tf_conv", None), ("openai_tf_conv", 50.0)])
def test_matches_flax_and_tf_l2_normalize_formulas_in_jax(dialect, eps):
    """Flax WeightNorm (v * rsqrt(sum v^2 + eps) * scale) and tf.nn.l2_normalize
    (v * rsqrt(max(sum v^2, eps))) on an HWIO kernel, outputs and jax.vjp gradients.
    eps = 50 puts some slices of this kernel (16 entries each) on the clamp's constant branch."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    hp = OP.dialect(dialect)
    if eps is not None:
        hp["eps"] = eps
    v = RNG.standard_normal((2, 2, 4, 5))
    v[..., 0] *= 0.1    # a small slice: clamped when eps = 50
    scale = 1 + 0.5 * RNG.standard_normal(5)
    G = RNG.standard_normal(v.shape)

    def reference_formula(v, scale):
        sq = jnp.sum(v * v, axis=(0, 1, 2), keepdims=True)
        den = sq + hp["eps"] if hp["eps_mode"] == "add" else jnp.maximum(sq, hp["eps"])
        return v * jax.lax.rsqrt(den) * scale.reshape(1, 1, 1, -1)

    with jax.enable_x64(True):
        out, pullback = jax.vjp(reference_formula, jnp.asarray(v), jnp.asarray(scale))
        dv, dscale = (np.asarray(a) for a in pullback(jnp.asarray(G)))
        out = np.asarray(out)
    g = scale.reshape(1, 1, 1, -1)
    np.testing.assert_allclose(OP.apply({"v": v, "g": g}, None, **hp)[0]["w"], out, rtol=1e-14)
    grads = OP.vjp({"v": v, "g": g}, None, {"w": G}, **hp)
    np.testing.assert_allclose(grads["v"], dv, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.ravel(grads["g"]), dscale, rtol=1e-12, atol=1e-14)


# --- bad input (the op's own cases: [[error_cases]] in specs/normalizers/weight_norm.toml) ------


# init_g and data_dependent_init are helpers other than the op: the spec format cannot call them.
def test_bad_init_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="init_g: mode must be 'norm' or 'ones', got 'zeros'"):
        init_g(np.ones((2, 3)), mode="zeros")
    with pytest.raises(ValueError, match=r"x has 4 features on its last axis but v has 3 inputs "
                                         r"on axis 1 \(dim=0 is the output axis\)"):
        data_dependent_init(np.ones((2, 3)), np.ones((5, 4)), dim=0)
    with pytest.raises(ValueError, match=r"v must have 2 dimensions, got 3"):
        data_dependent_init(np.ones((2, 3, 3)), np.ones((5, 3)))
    with pytest.raises(ValueError, match=r"pre-activation is constant on this batch"):
        data_dependent_init(np.eye(3), np.ones((4, 3)))


def test_clamp_tie_takes_the_norm_branch_like_tf_maximum_grad():
    """eps_mode="max" at sum v^2 == eps exactly: TF's Maximum gradient (greater_equal) routes it
    through the norm, so the gradient equals the eps = 0 one (projection term included)."""
    v, g, G = np.array([[3.0, 4.0]]), np.array([[1.5]]), np.array([[0.7, -0.2]])
    tie = OP.vjp({"v": v, "g": g}, None, {"w": G}, eps=25.0, eps_mode="max")
    free = OP.vjp({"v": v, "g": g}, None, {"w": G}, eps=0.0)
    clamped = OP.vjp({"v": v, "g": g}, None, {"w": G}, eps=25.0 * (1 + 1e-12), eps_mode="max")
    np.testing.assert_allclose(tie["v"], free["v"], rtol=1e-15)
    assert np.max(np.abs(clamped["v"] - free["v"])) > 0.05  # the projection term, 0.0624


# --- data-dependent initialization of convolutions (Sec. 3 for conv layers) ----------------------


def direct_conv(x, w, stride=1, padding=0, dilation=1, groups=1):
    """NCHW / OIHW cross-correlation from its definition, one output position at a time (written
    independently of reference/normalizers/_conv.py)."""
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    c_out, ci, kh, kw = w.shape
    co = c_out // groups
    h_out = (xp.shape[2] - dilation * (kh - 1) - 1) // stride + 1
    w_out = (xp.shape[3] - dilation * (kw - 1) - 1) // stride + 1
    y = np.zeros((x.shape[0], c_out, h_out, w_out))
    for o in range(c_out):
        g = o // co
        for a in range(h_out):
            for b in range(w_out):
                patch = xp[:, g * ci:(g + 1) * ci, a * stride:a * stride + dilation * (kh - 1) + 1:dilation,
                           b * stride:b * stride + dilation * (kw - 1) + 1:dilation]
                y[:, o, a, b] = np.sum(patch * w[o], axis=(1, 2, 3))
    return y


conv_geometries = st.sampled_from([
    # (n, c_in, hw, c_out, k, stride, padding, dilation, groups)
    (4, 3, (5, 5), 4, (3, 3), 1, 1, 1, 1),
    (3, 4, (6, 5), 6, (3, 2), 2, 0, 1, 2),
    (2, 2, (7, 7), 3, (3, 3), 1, 2, 2, 1),
    (5, 6, (3, 3), 6, (1, 1), 1, 0, 1, 3),
])


@pytest.mark.checks("conv_data_dependent_init_standardizes_preactivations")
@given(seed=st.integers(0, 2**32 - 1), geo=conv_geometries, layout=st.sampled_from(["torch", "tf"]),
       init_scale=st.sampled_from([1.0, 0.1]))
def test_conv_data_dependent_init_standardizes_preactivations(seed, geo, layout, init_scale):
    """Sec. 3 on a conv layer: with g = s / sigma(t), b = -mu(t) s / sigma(t), t = conv(x, v / ||v||)
    (one norm per output channel), the layer y = conv(x, g v / ||v||) + b has mean 0 and standard
    deviation s per output channel over (N, H_out, W_out), in PyTorch's (OIHW, NCHW) and
    TensorFlow's (HWIO, NHWC) layouts; the TF layout is the PyTorch one transposed."""
    rng = np.random.default_rng(seed)
    n, c_in, hw, c_out, k, stride, padding, dilation, groups = geo
    v = rng.standard_normal((c_out, c_in // groups, *k)) * rng.uniform(0.1, 10)
    x = rng.standard_normal((n, c_in, *hw)) + rng.standard_normal((1, c_in, 1, 1)) * 3
    conv_hp = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
    if layout == "torch":
        g, b = data_dependent_init(v, x, dim=0, init_scale=init_scale, **conv_hp)
        assert g.shape == (c_out, 1, 1, 1) and b.shape == (c_out,)
        w = weight_norm(v, g, dim=0)
    else:
        g, b = data_dependent_init(v.transpose(2, 3, 1, 0), x.transpose(0, 2, 3, 1), dim=-1,
                                   init_scale=init_scale, **conv_hp)
        assert g.shape == (1, 1, 1, c_out) and b.shape == (c_out,)
        w = weight_norm(v.transpose(2, 3, 1, 0), g, dim=-1).transpose(3, 2, 0, 1)
        g_torch, b_torch = data_dependent_init(v, x, dim=0, init_scale=init_scale, **conv_hp)
        np.testing.assert_allclose(g.reshape(-1), g_torch.reshape(-1), rtol=1e-13)
        np.testing.assert_allclose(b, b_torch, rtol=1e-13, atol=1e-13)
    y = direct_conv(x, w, **conv_hp) + b.reshape(1, -1, 1, 1)
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-13 * init_scale)
    np.testing.assert_allclose(y.std(axis=(0, 2, 3)), init_scale, rtol=1e-12)


@pytest.mark.checks("conv_data_init_on_1x1_equals_linear")
@pytest.mark.parametrize("dim", [0, -1])
def test_conv_data_init_on_1x1_equals_linear(dim):
    """A 1x1 convolution (stride 1, no padding) is the linear layer applied to every pixel: its
    (g, b) equal the linear init of v reshaped to (out, in) on the N H W pixels as rows."""
    v = RNG.standard_normal((5, 3, 1, 1))
    x = RNG.standard_normal((4, 3, 6, 7)) * 2 - 1
    rows = x.transpose(0, 2, 3, 1).reshape(-1, 3)
    g_lin, b_lin = data_dependent_init(v.reshape(5, 3), rows, dim=0, eps=1e-3)
    if dim == 0:
        g, b = data_dependent_init(v, x, dim=0, eps=1e-3)
    else:
        g, b = data_dependent_init(v.transpose(2, 3, 1, 0), x.transpose(0, 2, 3, 1), dim=-1, eps=1e-3)
    np.testing.assert_allclose(g.reshape(-1), g_lin.reshape(-1), rtol=1e-13)
    np.testing.assert_allclose(b, b_lin, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize(("k", "init_scale"), [(3, 1.0), (5, 0.1), (1, 1.0)])
def test_conv_data_init_matches_pixel_cnn_conv2d_restated_in_torch(k, init_scale):
    """openai/pixel-cnn pixel_cnn_pp/nn.py conv2d's init pass (TensorFlow is not installed; its
    lines restated in torch float64): V (HWIO) normalized by tf.nn.l2_normalize(V, [0, 1, 2])
    (V rsqrt(max(sum V^2, 1e-12))), conv with padding 'SAME' (stride 1, odd k: k // 2 on each
    side) of an NHWC batch, tf.nn.moments over [0, 1, 2] (biased), scale_init = init_scale /
    sqrt(v_init + 1e-10), g = scale_init, b = -m_init scale_init."""
    torch = torch_or_skip()
    V = RNG.standard_normal((k, k, 3, 4)) * 0.05
    x = RNG.standard_normal((6, 5, 5, 3)) + 0.5
    tV = t64(V)
    V_norm = tV * torch.rsqrt(torch.clamp((tV * tV).sum(dim=(0, 1, 2), keepdim=True), min=1e-12))
    t = torch.nn.functional.conv2d(t64(x).permute(0, 3, 1, 2), V_norm.permute(3, 2, 0, 1), padding=k // 2)
    t = t.permute(0, 2, 3, 1)                                        # NHWC
    m_init, v_init = t.mean(dim=(0, 1, 2)), t.var(dim=(0, 1, 2), unbiased=False)
    scale_init = init_scale / torch.sqrt(v_init + 1e-10)
    g, b = data_dependent_init(V, x, dim=-1, init_scale=init_scale, eps=1e-10, padding=k // 2)
    np.testing.assert_allclose(g.reshape(-1), scale_init.numpy(), rtol=1e-13)
    np.testing.assert_allclose(b, (-m_init * scale_init).numpy(), rtol=1e-13, atol=1e-15)


def _tfa_data_init(v_hwio, x_nhwc, bias0):
    """tensorflow-addons WeightNormalization(data_init=True)._data_dep_init, restated (tfa 0.23.0,
    the last release, is deprecated and needs TensorFlow, which is not installed): moments of the
    wrapped layer run with the *raw* kernel v and its initial bias (``_naked_clone_layer`` with
    ``self.layer.get_weights()``), ``scale_init = 1 / sqrt(v_init + 1e-10)``, g = 1 * scale_init,
    bias = -m_init * scale_init."""
    t = direct_conv(x_nhwc.transpose(0, 3, 1, 2), v_hwio.transpose(3, 2, 0, 1)) + bias0.reshape(1, -1, 1, 1)
    m, var = t.mean(axis=(0, 2, 3)), t.var(axis=(0, 2, 3))
    scale = 1 / np.sqrt(var + 1e-10)
    return scale, -m * scale


def test_tensorflow_addons_data_init_standardizes_only_unit_norm_kernels():
    """Finding: tfa's data init takes the moments of conv(x, v) (+ the initial bias) instead of
    conv(x, v / ||v||), so after it the layer conv(x, g v / ||v||) + b has per-channel standard
    deviation 1 / ||v_o|| (and mean -mu (1 - 1/||v_o||) / sigma without the initial bias), not 1.
    It agrees with the paper (and the oracle, eps 1e-10) only when every slice of v has unit norm,
    as in its own test (an identity kernel)."""
    v = RNG.standard_normal((3, 3, 2, 4)) * 0.05                     # HWIO, Glorot-like scale
    x = RNG.standard_normal((8, 6, 6, 2)) + 1.0
    norms = np.sqrt(np.sum(v * v, axis=(0, 1, 2)))
    g_tfa, b_tfa = _tfa_data_init(v, x, np.zeros(4))
    w = weight_norm(v, g_tfa.reshape(1, 1, 1, -1), dim=-1)
    y = direct_conv(x.transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1)) + b_tfa.reshape(1, -1, 1, 1)
    raw_var = direct_conv(x.transpose(0, 3, 1, 2), v.transpose(3, 2, 0, 1)).var(axis=(0, 2, 3))
    np.testing.assert_allclose(y.std(axis=(0, 2, 3)), np.sqrt(raw_var / (raw_var + 1e-10)) / norms, rtol=1e-12)
    assert np.all(np.abs(y.std(axis=(0, 2, 3)) - 1) > 0.5)          # ||v_o|| ~ 0.2: far from 1
    g, b = data_dependent_init(v, x, dim=-1, eps=1e-10)
    unit = v / norms                                                 # every slice of norm 1
    g_unit, b_unit = _tfa_data_init(unit, x, np.zeros(4))
    g_ref, b_ref = data_dependent_init(unit, x, dim=-1, eps=1e-10)
    np.testing.assert_allclose(g_unit, g_ref.reshape(-1), rtol=1e-12)
    np.testing.assert_allclose(b_unit, b_ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(g_ref, g, rtol=1e-12)                # the oracle ignores ||v||


def test_bad_conv_init_arguments_raise_clear_errors():
    v, x = np.ones((4, 3, 3, 3)), RNG.standard_normal((2, 3, 5, 5))
    with pytest.raises(ValueError, match=r"a 4-D v is a conv weight with its output channels on axis 0 .* got dim=1"):
        data_dependent_init(v, x, dim=1)
    with pytest.raises(ValueError, match=r"stride, padding, dilation and groups are a convolution's \(a 4-D v\)"):
        data_dependent_init(np.ones((2, 3)), np.ones((5, 3)), padding=1)
    with pytest.raises(ValueError, match=r"v must have C_in / groups = 2 / 1 = 2 input channels on axis 1"):
        data_dependent_init(v, x[:, :2], dim=0)
    with pytest.raises(ValueError, match=r"x must have 4 dimensions, got 3"):
        data_dependent_init(v, x[0], dim=0)
    with pytest.raises(ValueError, match=r"the kernel 3x3 with dilation 3 does not fit in the input 5x5"):
        data_dependent_init(v, x, dilation=3)
