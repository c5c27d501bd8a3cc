"""RMSNorm / pRMSNorm: forward vs mpmath on adversarial data, properties, torch, errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reference
from conformance.cases import ADVERSARIAL, adversarial
from helpers import mp_array, mp_sqrt, relative_error, t64, torch_or_skip, torch_vjp
from reference.normalizers.layer_norm import layer_norm
from reference.normalizers.rms_norm import rms_norm

OP = reference.get("rms_norm")
RNG = np.random.default_rng(20260103)
TORCH_F64_EPS = 2.220446049250313e-16  # torch.finfo(torch.float64).eps, torch's eps=None


def mp_rms_norm(x, weight, bias, eps, *, placement="inside", p=-1.0, offset=0.0):
    """Eq. 4 (and pRMSNorm over the last axis) at 50 digits, independent of the oracle."""
    X = mp_array(x)
    d = x.shape[-1]
    k = d if p < 0 else int(d * p)
    head = X[..., :k]
    ms = np.sum(head * head, axis=-1, keepdims=True) / k
    E = mp_array(np.float64(eps))
    y = X / mp_sqrt(ms + E) if placement == "inside" else X / (mp_sqrt(ms) + E)
    return y * (mp_array(np.float64(offset)) + mp_array(weight)) + mp_array(bias)


# --- forward accuracy -------------------------------------------------------------------------


def _eps_scaled_to(x, placement):
    """eps at 1e-3 of the row statistic it is added to (mean square inside, RMS outside), so the
    data and not eps set the denominator on every scale."""
    ms = float(np.mean(x * x))
    return 1e-3 * (ms if placement == "inside" else np.sqrt(ms))


@pytest.mark.parametrize("p", [-1.0, 0.4])
@pytest.mark.parametrize("placement", ["inside", "outside"])
@pytest.mark.parametrize("eps_kind", ["scaled", "default"])
@pytest.mark.parametrize("family", sorted(ADVERSARIAL))
def test_forward_matches_mpmath_on_adversarial_data(family, eps_kind, placement, p):
    x = adversarial(family, (4, 3, 10))
    weight, bias = 1 + 0.5 * RNG.standard_normal(10), RNG.standard_normal(10)
    eps = _eps_scaled_to(x, placement) if eps_kind == "scaled" else 1e-8
    hp = {"eps": eps, "eps_placement": placement, "p": p}
    y = OP.apply({"x": x, "weight": weight, "bias": bias}, None, **hp)[0]["y"]
    err = relative_error(y, mp_rms_norm(x, weight, bias, eps, placement=placement, p=p))
    assert err <= 1e-10, f"{family}, eps={eps:.3g}: relative error {err:.3g}"


def test_gemma_offset_matches_mpmath():
    x, w = adversarial("mixed_scales", (3, 8)), 0.1 * RNG.standard_normal(8)
    y = OP.apply({"x": x, "weight": w}, None, **OP.dialect("gemma"))[0]["y"]
    assert relative_error(y, mp_rms_norm(x, w, np.zeros(8), 1e-6, offset=1.0)) <= 1e-10


def test_constant_rows_and_a_single_value():
    x = np.full((3, 7), -3.25)
    y = rms_norm(x, eps=1e-300)
    np.testing.assert_allclose(y, -1.0, rtol=1e-15)  # rms of a constant row is |c|
    one = RNG.standard_normal((4, 1))
    np.testing.assert_allclose(rms_norm(one, eps=1e-300), np.sign(one), rtol=1e-15)


def test_zero_rows_are_finite_in_both_placements():
    x = np.zeros((2, 5))
    dy = RNG.standard_normal(x.shape)
    for placement in ("inside", "outside"):
        hp = {"eps_placement": placement, "eps": 1e-6}
        np.testing.assert_array_equal(OP.apply({"x": x}, None, **hp)[0]["y"], 0.0)
        dx = OP.vjp({"x": x}, None, {"y": dy}, **hp)["x"]
        # inside: 1/sqrt(eps); outside: 1/eps (the statistic's term is 0 at a zero row)
        scale = 1 / np.sqrt(1e-6) if placement == "inside" else 1 / 1e-6
        np.testing.assert_allclose(dx, dy * scale, rtol=1e-15)


# --- properties -------------------------------------------------------------------------------

rows = st.tuples(st.integers(1, 4), st.integers(2, 16))
placements = st.sampled_from(["inside", "outside"])
partial = st.sampled_from([-1.0, 0.5, 1.0])
TINY_EPS = 1e-300  # eps -> 0: the exact identities then hold up to rounding


@given(shape=rows, seed=st.integers(0, 2**32 - 1), log_c=st.floats(-3, 3), placement=placements, p=partial)
def test_invariant_to_positive_row_scaling(shape, seed, log_c, placement, p):
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal(shape), rng.standard_normal(shape[1])
    c = 10.0 ** (log_c + 0.1 * rng.standard_normal((shape[0], 1)))
    hp = {"eps": TINY_EPS, "eps_placement": placement, "p": p}
    # c*x rounds each entry (1 ulp) and the mean square a few more: no cancellation anywhere,
    # so the outputs agree to a few ulps of |w x_hat| <= |w| sqrt(d).
    np.testing.assert_allclose(rms_norm(c * x, w, **hp), rms_norm(x, w, **hp),
                               rtol=1e-13, atol=1e-14 * np.abs(w).max())


@given(shape=rows, seed=st.integers(0, 2**32 - 1), placement=placements, p=partial)
def test_unit_rms_without_affine(shape, seed, placement, p):
    x = np.random.default_rng(seed).standard_normal(shape) * 5 + 1
    y = rms_norm(x, eps=TINY_EPS, eps_placement=placement, p=p)
    d = shape[1]
    k = d if p < 0 else int(d * p)
    # The RMS over the first k outputs (all of them without p) is 1 up to a few roundings.
    np.testing.assert_allclose(np.sqrt(np.mean(y[:, :k] ** 2, axis=-1)), 1.0, rtol=1e-14)


@given(shape=rows, seed=st.integers(0, 2**32 - 1), eps=st.floats(1e-8, 1.0))
def test_equals_layer_norm_for_zero_mean_rows(shape, seed, eps):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(shape) + 2.0
    x = z - z.mean(axis=-1, keepdims=True)  # mean(x) = 0 up to ~u
    w, b = rng.standard_normal(shape[1]), rng.standard_normal(shape[1])
    # LN recenters by the ~1e-16 residual mean; everything else is the same arithmetic.
    np.testing.assert_allclose(rms_norm(x, w, b, eps=eps), layer_norm(x, w, b, eps=eps), atol=1e-13)


@pytest.mark.checks("not_shift_invariant")
@given(shape=st.tuples(st.integers(1, 4), st.integers(3, 16)), seed=st.integers(0, 2**32 - 1),
       shift=st.floats(0.5, 10.0), placement=placements)
def test_not_shift_invariant_unlike_layer_norm(shape, seed, shift, placement):
    x = np.random.default_rng(seed).standard_normal(shape)
    hp = {"eps": TINY_EPS, "eps_placement": placement}
    # RMSNorm(x + s) = RMSNorm(x) would need x + s parallel to x, i.e. a constant row.
    assert np.max(np.abs(rms_norm(x + shift, **hp) - rms_norm(x, **hp))) > 1e-3
    np.testing.assert_allclose(layer_norm(x + shift, eps=TINY_EPS), layer_norm(x, eps=TINY_EPS),
                               atol=1e-13 * (1 + shift / x.std(axis=-1).min()))


@pytest.mark.checks("grad_orthogonal_to_row")
@given(shape=rows, seed=st.integers(0, 2**32 - 1), placement=placements, p=partial)
def test_grad_orthogonal_to_the_row(shape, seed, placement, p):
    """Scale invariance y(c x) = y(x) gives J x = 0, hence <dx, x> = 0 for any gain (eps -> 0)."""
    rng = np.random.default_rng(seed)
    x, dy = rng.standard_normal(shape), rng.standard_normal(shape)
    w = rng.standard_normal(shape[1])
    hp = {"eps": TINY_EPS, "eps_placement": placement, "p": p}
    dx = OP.vjp({"x": x, "weight": w}, None, {"y": dy}, **hp)["x"]
    # dx_i x_i = h_i x_hat_i - [i < k] x_hat_i^2 c with c = (1/k) sum(h x_hat): the row sum
    # cancels terms of that size, so it is zero up to u * d * sum(|h x_hat| + x_hat^2 |c|).
    x_hat = rms_norm(x, **hp)
    h = dy * w
    k = shape[1] if p < 0 else int(shape[1] * p)
    c = np.abs(np.sum(h * x_hat, axis=-1, keepdims=True)) / k
    bound = 1e-15 * shape[1] * np.sum(np.abs(h * x_hat) + x_hat**2 * c, axis=-1)
    assert np.all(np.abs(np.sum(dx * x, axis=-1)) <= bound)


@pytest.mark.checks("partial_statistic_uses_first_k")
@given(seed=st.integers(0, 2**32 - 1), placement=placements)
def test_partial_statistic_ignores_the_features_after_k(seed, placement):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, 10))
    hp = {"p": 0.3, "eps_placement": placement}
    y = rms_norm(x, **hp)
    x2 = x.copy()
    x2[:, 3:] *= 7.0  # k = int(10 * 0.3) = 3: only x[:, :3] set the RMS
    y2 = rms_norm(x2, **hp)
    np.testing.assert_array_equal(y2[:, :3], y[:, :3])
    np.testing.assert_allclose(y2[:, 3:], 7.0 * y[:, 3:], rtol=1e-15)
    np.testing.assert_array_equal(rms_norm(x, p=1.0, eps_placement=placement),
                                  rms_norm(x, eps_placement=placement))


def test_official_partial_size_rounds_down():
    x = RNG.standard_normal((2, 10))
    # int(10 * 0.29) = 2: the same as p = 0.2; p = 0.3 gives 3 (10 * 0.3 = 3.0000000000000004).
    np.testing.assert_array_equal(rms_norm(x, p=0.29), rms_norm(x, p=0.2))
    assert not np.array_equal(rms_norm(x, p=0.3), rms_norm(x, p=0.2))


def test_dialect_values():
    assert OP.dialect("torch")["eps"] == np.finfo(np.float64).eps
    assert OP.dialect("official_torch")["eps_placement"] == "outside"
    assert OP.dialect("official_tf")["eps_placement"] == "inside"
    assert OP.spec.hparams["eps_placement"].default == "inside"
    assert OP.dialect("gemma")["weight_offset"] == 1.0


# --- PyTorch cross-check (float64) --------------------------------------------------------------


@pytest.mark.parametrize("torch_eps", [None, 1e-6])
@pytest.mark.parametrize(("shape", "k"), [((4, 7), 1), ((2, 3, 6), 1), ((2, 3, 4, 5), 2)])
def test_matches_torch_rms_norm_float64(shape, k, torch_eps):
    torch = torch_or_skip()
    normalized = shape[-k:]
    x, w = RNG.standard_normal(shape) + 0.3, RNG.standard_normal(normalized)
    tx, tw = t64(x, True), t64(w, True)
    ty = torch.nn.functional.rms_norm(tx, normalized, tw, eps=torch_eps)
    # eps=None is torch's finfo(float64).eps: the torch dialect's value.
    hp = {**OP.dialect("torch"), "axes": list(range(-k, 0))}
    if torch_eps is not None:
        hp["eps"] = torch_eps
    out, _ = OP.apply({"x": x, "weight": w}, None, **hp)
    np.testing.assert_allclose(out["y"], ty.detach().numpy(), rtol=1e-12, atol=1e-13)
    dy = RNG.standard_normal(shape)
    expected = torch_vjp(ty, {"x": tx, "weight": tw}, dy)
    grads = OP.vjp({"x": x, "weight": w}, None, {"y": dy}, **hp)
    for key in expected:
        np.testing.assert_allclose(grads[key], expected[key], rtol=1e-11, atol=1e-12, err_msg=key)


def _official_torch(torch, x, scale, offset, eps, p):
    """rmsnorm_torch.py's forward, restated from the equations in torch autograd."""
    d = x.shape[-1]
    if p < 0:
        part, d_x = x, d
    else:
        k = int(d * p)
        part, _ = torch.split(x, [k, d - k], dim=-1)
        d_x = k
    rms = part.norm(2, dim=-1, keepdim=True) * d_x ** (-1.0 / 2)
    return scale * (x / (rms + eps)) + offset


def _official_tf(torch, x, scale, offset, eps, p):
    """rmsnorm_tensorflow.py's forward (eps inside) in torch autograd."""
    d = x.shape[-1]
    part = x if p < 0 else x[..., : int(d * p)]
    return scale * x * torch.rsqrt((part**2).mean(dim=-1, keepdim=True) + eps) + offset


@pytest.mark.parametrize("p", [-1.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("dialect", ["official_torch", "official_tf"])
def test_matches_the_official_formulas_in_torch_autograd(dialect, p):
    torch = torch_or_skip()
    x, w, b = RNG.standard_normal((3, 2, 12)), RNG.standard_normal(12), RNG.standard_normal(12)
    tx, tw, tb = t64(x, True), t64(w, True), t64(b, True)
    formula = _official_torch if dialect == "official_torch" else _official_tf
    ty = formula(torch, tx, tw, tb, 1e-8, p)
    hp = {**OP.dialect(dialect), "p": p}
    inputs = {"x": x, "weight": w, "bias": b}
    np.testing.assert_allclose(OP.apply(inputs, None, **hp)[0]["y"], ty.detach().numpy(),
                               rtol=1e-12, atol=1e-13)
    dy = RNG.standard_normal(x.shape)
    expected = torch_vjp(ty, {"x": tx, "weight": tw, "bias": tb}, dy)
    grads = OP.vjp(inputs, None, {"y": dy}, **hp)
    for key in expected:
        np.testing.assert_allclose(grads[key], expected[key], rtol=1e-11, atol=1e-12, err_msg=key)


def test_outside_gradient_at_a_zero_row_matches_torch_subgradient():
    torch = torch_or_skip()
    x = np.zeros((2, 6))
    x[1] = RNG.standard_normal(6)
    tx = t64(x, True)
    ty = _official_torch(torch, tx, 1.0, 0.0, 1e-8, -1.0)
    dy = RNG.standard_normal(x.shape)
    expected = torch_vjp(ty, {"x": tx}, dy)["x"]
    dx = OP.vjp({"x": x}, None, {"y": dy}, **OP.dialect("official_torch"))["x"]
    np.testing.assert_allclose(dx, expected, rtol=1e-11)


def test_gemma_matches_its_torch_expression():
    torch = torch_or_skip()
    x, w = RNG.standard_normal((2, 4, 8)), 0.1 * RNG.standard_normal(8)
    tx, tw = t64(x, True), t64(w, True)
    ty = tx * torch.rsqrt(tx.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + tw)
    out, _ = OP.apply({"x": x, "weight": w}, None, **OP.dialect("gemma"))
    np.testing.assert_allclose(out["y"], ty.detach().numpy(), rtol=1e-12, atol=1e-13)
    dy = RNG.standard_normal(x.shape)
    expected = torch_vjp(ty, {"x": tx, "weight": tw}, dy)
    grads = OP.vjp({"x": x, "weight": w}, None, {"y": dy}, **OP.dialect("gemma"))
    for key in expected:
        np.testing.assert_allclose(grads[key], expected[key], rtol=1e-11, atol=1e-12, err_msg=key)


@pytest.mark.parametrize("placement", ["inside", "outside"])
@pytest.mark.parametrize("eps", [1e-6, 1e-8])
@pytest.mark.parametrize("d, p", [(1, -1.0), (3, 0.4)])
def test_vjp_with_one_feature_setting_the_statistic_matches_mpmath(d, p, eps, placement):
    """With k = 1 (one feature, or pRMSNorm keeping one), y_0 = x_0/sqrt(x_0^2 + eps) saturates
    for |x_0| >> sqrt(eps) and 1 - y_0^2 cancels in float64: the VJP forms eps/r^2 directly.
    Exact: d y_0/d x_0 = eps/r^3 (inside), eps/(|x_0| + eps)^2 (outside); for j >= k,
    d y_j/d x_j = 1/r and d y_j/d x_0 = -x_j x_0/r^3 (inside), -x_j sign(x_0)/(|x_0| + eps)^2."""
    mpmath = pytest.importorskip("mpmath")
    x = np.array([[3.0, 0.7, -2.0], [-1e2, 1.5, 0.3], [0.01, -0.2, 4.0], [2e-4, 1.0, 1.0]])[:, :d]
    dy = np.array([[0.5, -1.0, 2.0], [1.25, 0.5, -0.75], [-2.0, 1.0, 0.25], [1.0, -0.5, 0.5]])[:, :d]
    g = OP.vjp({"x": x}, None, {"y": dy}, eps=eps, eps_placement=placement, p=p)["x"]
    mpmath.mp.dps = 50
    E = mpmath.mpf(eps)
    expected = np.empty_like(x)
    for i in range(x.shape[0]):
        X, H = [mpmath.mpf(float(v)) for v in x[i]], [mpmath.mpf(float(v)) for v in dy[i]]
        if placement == "inside":
            r = mpmath.sqrt(X[0] ** 2 + E)
            own, pull = E / r**3, [-X[j] * X[0] / r**3 for j in range(1, d)]
        else:
            r = abs(X[0]) + E
            own, pull = E / r**2, [-X[j] * mpmath.sign(X[0]) / r**2 for j in range(1, d)]
        expected[i, 0] = float(H[0] * own + sum(H[j] * pull[j - 1] for j in range(1, d)))
        for j in range(1, d):
            expected[i, j] = float(H[j] / r)
    err = relative_error(g, expected)
    assert err <= 1e-14, f"relative error {err:.3g}"
