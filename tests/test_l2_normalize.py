"""L2 normalization: forward vs mpmath on adversarial data, properties, torch / TF / Keras / ONNX forms."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reference
from conformance.cases import ADVERSARIAL, adversarial
from helpers import assert_vjp, mp_array, mp_sqrt, relative_error, t64, torch_or_skip, torch_vjp
from reference.normalizers.l2_normalize import l2_normalize

OP = reference.get("l2_normalize")
RNG = np.random.default_rng(20260107)
U = 2.0**-53  # unit roundoff of float64
FORMS = ("norm", "squared_norm")


def floor_of(eps, clamps):
    """The divisor's lower bound: eps, or sqrt(eps) for the squared-norm (TF) form."""
    return eps if clamps == "norm" else math.sqrt(eps)


def forward_tolerance(k):
    """Relative error bound of y = x / (s sqrt(sum (x/s)^2)) over k values (module docstring):
    x/s, the squares and the sum take k + 1 roundings, the root halves them, s * root and x / norm
    add one each; one more for the floor's own rounding (sqrt(eps))."""
    return ((k + 1) / 2 + 4) * U


def mp_l2_normalize(x, axes, eps, clamps):
    """x / max(||x||, floor) at 50 digits, independent of the oracle (no rescaling needed)."""
    X = mp_array(x)
    norm = mp_sqrt(np.sum(X * X, axis=axes, keepdims=True))
    E = mp_array(np.float64(eps))
    floor = E if clamps == "norm" else mp_sqrt(E)
    return X / np.maximum(norm, floor)


def row_norms(x, axes=(-1,)):
    return np.sqrt(np.sum(x * x, axis=axes, keepdims=True))


# --- forward accuracy -------------------------------------------------------------------------


def _eps_for(kind, x, axes, clamps):
    """'zero': no eps; 'default': 1e-12 (clamps the tiny_1e-150 rows in both forms); 'clamping':
    a floor 10x above every row's norm, so every row takes the clamped branch."""
    if kind == "zero":
        return 0.0
    if kind == "default":
        return 1e-12
    floor = 10.0 * float(np.max(row_norms(x, axes)))
    return floor if clamps == "norm" else floor * floor


@pytest.mark.parametrize("axes", [(-1,), (-2, -1)])
@pytest.mark.parametrize("clamps", FORMS)
@pytest.mark.parametrize("eps_kind", ["zero", "default", "clamping"])
@pytest.mark.parametrize("family", sorted(ADVERSARIAL))
def test_forward_matches_mpmath_on_adversarial_data(family, eps_kind, clamps, axes):
    x = adversarial(family, (4, 3, 10))
    eps = _eps_for(eps_kind, x, axes, clamps)
    y = OP.apply({"x": x}, None, axes=list(axes), eps=eps, eps_clamps=clamps)[0]["y"]
    k = int(np.prod([x.shape[a] for a in axes]))
    err = relative_error(y, mp_l2_normalize(x, axes, eps, clamps))
    assert err <= forward_tolerance(k), f"{family}, eps={eps:.3g}: relative error {err:.3g}"


def test_constant_rows_and_single_values():
    x = np.full((3, 16), -3.25)
    np.testing.assert_array_equal(l2_normalize(x, eps=0.0), -0.25)  # 1/sqrt(16), exactly
    one = RNG.standard_normal((4, 1))
    np.testing.assert_array_equal(l2_normalize(one), np.sign(one))


# --- properties -------------------------------------------------------------------------------

rows = st.tuples(st.integers(1, 4), st.integers(1, 16))
forms = st.sampled_from(FORMS)
seeds = st.integers(0, 2**32 - 1)
# Off the clamp: zero (plain x / ||x||) or an eps far below any row's norm.
small_eps = st.sampled_from([0.0, 1e-300, 1e-30])


@given(shape=rows, seed=seeds, log_c=st.floats(-3, 3), clamps=forms, eps=small_eps)
def test_unit_norm_rows(shape, seed, log_c, clamps, eps):
    x = np.random.default_rng(seed).standard_normal(shape) * 10.0**log_c
    y = l2_normalize(x, eps=eps, eps_clamps=clamps)
    # Each y_i carries the norm's relative error, so ||y|| does too, plus k roundings of its own.
    k = shape[1]
    np.testing.assert_allclose(row_norms(y), 1.0, rtol=forward_tolerance(k) + (k + 1) * U)


@given(shape=rows, seed=seeds, log_c=st.floats(-3, 3), clamps=forms, eps=small_eps)
def test_invariant_to_positive_row_scaling(shape, seed, log_c, clamps, eps):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    c = 10.0 ** (log_c + 0.1 * rng.standard_normal((shape[0], 1)))
    hp = {"eps": eps, "eps_clamps": clamps}
    # Elementwise: y_i = x_i / ||x||; c*x rounds each x_i (u), both sides carry the forward bound.
    np.testing.assert_allclose(l2_normalize(c * x, **hp), l2_normalize(x, **hp),
                               rtol=2 * forward_tolerance(shape[1]) + 2 * U, atol=0)


@given(shape=rows, seed=seeds, clamps=forms, eps=st.sampled_from([0.0, 1e-12, 1.0]))
def test_zero_row_maps_to_zero(shape, seed, clamps, eps):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    x[rng.random(shape[0]) < 0.5] = 0.0
    x[0] = 0.0
    zero = np.all(x == 0, axis=-1)
    hp = {"eps": eps, "eps_clamps": clamps}
    y = l2_normalize(x, **hp)
    assert np.all(np.isfinite(y))
    np.testing.assert_array_equal(y[zero], 0.0)
    dy = rng.standard_normal(shape)
    dx = OP.vjp({"x": x}, None, {"y": dy}, **hp)["x"]
    if eps > 0:  # the clamped branch: a constant divisor
        np.testing.assert_array_equal(dx[zero], dy[zero] / floor_of(eps, clamps))
    else:  # x / ||x|| is discontinuous at 0: no derivative there, and no value is invented
        assert np.all(np.isnan(dx[zero]))
    assert np.all(np.isfinite(dx[~zero]))


@given(shape=rows, seed=seeds, clamps=forms, eps=st.floats(1e-6, 1e6))
def test_clamped_rows_divide_by_the_floor(shape, seed, clamps, eps):
    rng = np.random.default_rng(seed)
    floor = floor_of(eps, clamps)
    z = rng.standard_normal(shape)
    x = z / row_norms(z) * floor * rng.uniform(0.01, 0.99, (shape[0], 1))  # ||x|| < floor
    hp = {"eps": eps, "eps_clamps": clamps}
    np.testing.assert_array_equal(l2_normalize(x, **hp), x / floor)
    dy = rng.standard_normal(shape)
    np.testing.assert_array_equal(OP.vjp({"x": x}, None, {"y": dy}, **hp)["x"], dy / floor)


@given(shape=rows, seed=seeds, eps=st.floats(1e-20, 1e4))
def test_squared_norm_form_is_norm_form_at_sqrt_eps(shape, seed, eps):
    """rsqrt(max(s, eps)) = 1 / max(sqrt(s), sqrt(eps)): TF's form is torch's at eps' = sqrt(eps)."""
    rng = np.random.default_rng(seed)
    # Row norms spread around the floor, so both branches are exercised.
    x = rng.standard_normal(shape) * math.sqrt(eps) * 10.0 ** rng.uniform(-2, 2, (shape[0], 1))
    dy = rng.standard_normal(shape)
    tf_form = {"eps": eps, "eps_clamps": "squared_norm"}
    torch_form = {"eps": math.sqrt(eps), "eps_clamps": "norm"}
    np.testing.assert_array_equal(l2_normalize(x, **tf_form), l2_normalize(x, **torch_form))
    np.testing.assert_array_equal(OP.vjp({"x": x}, None, {"y": dy}, **tf_form)["x"],
                                  OP.vjp({"x": x}, None, {"y": dy}, **torch_form)["x"])


@given(shape=rows, seed=seeds, log_c=st.floats(-3, 3), clamps=forms, eps=small_eps)
def test_grad_orthogonal_to_output(shape, seed, log_c, clamps, eps):
    """y stays on the unit sphere, so dx = (dy - y <y, dy>) / ||x|| lies in its tangent plane."""
    rng = np.random.default_rng(seed)
    x, dy = rng.standard_normal(shape) * 10.0**log_c, rng.standard_normal(shape)
    hp = {"eps": eps, "eps_clamps": clamps}
    dx = OP.vjp({"x": x}, None, {"y": dy}, **hp)["x"]
    y = l2_normalize(x, **hp)
    # <dx, y> ||x|| = <y, dy>(1 - ||y||^2) + roundings: each term dx_j y_j is accurate to a few u
    # of |dy_j y_j| + y_j^2 |a|, a = <y, dy>, and the k-term sum adds k more.
    k = shape[1]
    a = np.abs(np.sum(y * dy, axis=-1, keepdims=True))
    bound = (k + 6) * U * np.sum(np.abs(dy * y) + y * y * a, axis=-1) / row_norms(x)[:, 0]
    assert np.all(np.abs(np.sum(dx * y, axis=-1)) <= bound)


@pytest.mark.parametrize("clamps", FORMS)
@pytest.mark.parametrize("scale", [1e200, 1e300, 1e-200, 1e-300, 1e-310])
def test_overflow_safe_norm(scale, clamps):
    z = RNG.standard_normal((3, 12))
    x = scale * z  # 1e-310: subnormal values, fewer bits but exact inputs all the same
    with np.errstate(over="ignore", under="ignore"):
        naive = np.sqrt(np.sum(x * x, axis=-1))
    assert np.all(naive == 0) or np.all(np.isinf(naive))  # what the scaling avoids
    y = l2_normalize(x, eps=0.0, eps_clamps=clamps)
    # A subnormal norm (below 2.2e-308) is stored to an absolute half-ulp of 2^-1075, not u relative.
    norm = float(np.min(mp_sqrt(np.sum(mp_array(x) ** 2, axis=-1))))
    tol = forward_tolerance(12) + np.nextafter(0.0, 1.0) / (2 * norm)  # 2^-1075 / ||x||
    assert relative_error(y, mp_l2_normalize(x, (-1,), 0.0, clamps)) <= tol
    np.testing.assert_allclose(row_norms(y), 1.0, rtol=tol + 13 * U)
    # The gradient scales as 1/scale: dx(s z) s = dx(z) up to the inputs' rounding (1/1e-310
    # itself overflows: there the true gradient is beyond float64).
    if not np.isfinite(1.0 / scale):
        return
    dy = RNG.standard_normal(x.shape)
    dx = OP.vjp({"x": x}, None, {"y": dy}, eps=0.0, eps_clamps=clamps)["x"]
    dz = OP.vjp({"x": x / scale}, None, {"y": dy}, eps=0.0, eps_clamps=clamps)["x"]
    np.testing.assert_allclose(dx * scale, dz, rtol=0, atol=1e-12 * np.max(np.abs(dz)))


def test_nonfinite_rows_follow_the_frameworks():
    x = np.array([[1.0, np.inf, 2.0], [1.0, np.nan, 2.0], [3.0, 4.0, 0.0]])
    with np.errstate(invalid="ignore"):  # inf / inf, on purpose
        y = l2_normalize(x)
    # inf / inf = NaN at the infinity, finite / inf = 0 elsewhere (torch and TF alike); NaN spreads.
    np.testing.assert_array_equal(y[0], [0.0, np.nan, 0.0])
    assert np.all(np.isnan(y[1]))
    np.testing.assert_allclose(y[2], [0.6, 0.8, 0.0], rtol=2 * U)


@pytest.mark.parametrize("clamps", FORMS)
def test_vjp_on_rows_on_both_sides_of_the_clamp(clamps):
    floor = 1.0
    z = RNG.standard_normal((6, 5))
    x = z / row_norms(z) * np.array([[0.1], [0.5], [0.9], [1.2], [3.0], [40.0]]) * floor
    assert_vjp("l2_normalize", {"x": x}, rtol=1e-8, eps=floor if clamps == "norm" else floor**2,
               eps_clamps=clamps)


def test_dialect_values():
    assert OP.spec.hparams["eps_clamps"].default == "norm"
    assert OP.spec.hparams["eps"].default == 1e-12
    assert tuple(OP.dialect("torch")["axes"]) == (1,)  # F.normalize's default dim=1
    assert OP.dialect("tf")["eps_clamps"] == "squared_norm" and OP.dialect("tf")["eps"] == 1e-12
    # Keras 3.15.1's UnitNormalization calls ops.normalize(epsilon=1e-12): the norm form.
    assert OP.dialect("keras")["eps_clamps"] == "norm" and OP.dialect("keras")["eps"] == 1e-12
    assert OP.dialect("keras_ops")["eps"] == 1e-7 and OP.dialect("keras_ops")["eps_clamps"] == "norm"
    assert OP.dialect("onnx")["eps"] == 0.0 and OP.dialect("ngpt")["eps"] == 0.0


# --- framework forms, float64 -------------------------------------------------------------------


def _mixed_rows(shape, axes, floor):
    """Rows whose norms straddle ``floor`` (both branches, log-uniform over 3 decades), plus one
    zero row; the rows lie along ``axes``."""
    nd = len(shape)
    axes = sorted(a % nd for a in axes)
    lead = [shape[i] for i in range(nd) if i not in axes]
    rows = RNG.standard_normal([*lead, int(np.prod([shape[a] for a in axes]))])
    rows *= floor * 10.0 ** RNG.uniform(-1.5, 1.5, [*lead, 1]) / row_norms(rows)
    rows[(0,) * len(lead)] = 0.0
    x = rows.reshape([*lead, *(shape[a] for a in axes)])
    return np.ascontiguousarray(np.moveaxis(x, list(range(len(lead), nd)), axes))


@pytest.mark.parametrize("eps", [1e-12, 0.5])
@pytest.mark.parametrize(("shape", "dim"), [((5, 7), -1), ((2, 6, 3), 1), ((2, 3, 4), (1, 2))])
def test_matches_torch_normalize_float64(shape, dim, eps):
    torch = torch_or_skip()
    axes = (dim,) if isinstance(dim, int) else dim
    x = _mixed_rows(shape, axes, max(eps, 1e-3))
    tx = t64(x, True)
    ty = torch.nn.functional.normalize(tx, p=2.0, dim=dim, eps=eps)
    hp = {**OP.dialect("torch"), "axes": list(axes), "eps": eps}
    out, _ = OP.apply({"x": x}, None, **hp)
    np.testing.assert_allclose(out["y"], ty.detach().numpy(), rtol=1e-13, atol=1e-15)
    dy = RNG.standard_normal(shape)
    expected = torch_vjp(ty, {"x": tx}, dy)["x"]
    dx = OP.vjp({"x": x}, None, {"y": dy}, **hp)["x"]
    np.testing.assert_allclose(dx, expected, rtol=1e-11, atol=1e-12 * np.max(np.abs(expected)))


def _tf_l2_normalize(xp, x, axis, epsilon):
    """tf.math.l2_normalize (nn_impl.py) restated: x * rsqrt(maximum(sum(square(x)), epsilon))."""
    if xp is np:
        square_sum = np.sum(np.square(x), axis=axis, keepdims=True)
        return x * (1.0 / np.sqrt(np.maximum(square_sum, epsilon)))
    square_sum = xp.sum(xp.square(x), dim=axis, keepdim=True)
    return x * xp.rsqrt(xp.clamp_min(square_sum, epsilon))  # clamp_min: ties go to the sum, as tf.maximum


@pytest.mark.parametrize("eps", [1e-12, 0.25])
@pytest.mark.parametrize("dialect", ["tf"])
def test_matches_the_tf_form(dialect, eps):
    """TensorFlow is not installed: its formula in NumPy (forward) and in torch autograd (gradient)."""
    axes = (-1,)
    x = _mixed_rows((6, 9), axes, max(math.sqrt(eps), 1e-3))
    hp = {**OP.dialect(dialect), "eps": eps}
    y = OP.apply({"x": x}, None, **hp)[0]["y"]
    np.testing.assert_allclose(y, _tf_l2_normalize(np, x, axes, eps), rtol=1e-14, atol=0)
    torch = torch_or_skip()
    tx = t64(x, True)
    ty = _tf_l2_normalize(torch, tx, axes, eps)
    dy = RNG.standard_normal(x.shape)
    expected = torch_vjp(ty, {"x": tx}, dy)["x"]
    dx = OP.vjp({"x": x}, None, {"y": dy}, **hp)["x"]
    np.testing.assert_allclose(dx, expected, rtol=1e-11, atol=1e-12 * np.max(np.abs(expected)))


def test_tf_form_squares_overflow_where_the_oracle_does_not():
    x = 1e200 * RNG.standard_normal((2, 5))
    with np.errstate(over="ignore"):
        tf_y = _tf_l2_normalize(np, x, (-1,), 1e-12)
    np.testing.assert_array_equal(tf_y, 0.0)  # rsqrt(inf) = 0: TF's documented limitation
    y = OP.apply({"x": x}, None, **OP.dialect("tf"))[0]["y"]
    np.testing.assert_allclose(row_norms(y), 1.0, rtol=1e-15)


def test_keras_ops_normalize_form():
    """keras.ops.normalize (order 2) restated: x * minimum(rsqrt(sum x^2), 1/epsilon), epsilon 1e-7."""
    x = _mixed_rows((5, 4), (-1,), 1e-7)
    s = np.sum(x * x, axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        expected = x * np.minimum(1.0 / np.sqrt(s), 1.0 / 1e-7)  # zero row: min(inf, 1e7) -> 0
    y = OP.apply({"x": x}, None, **OP.dialect("keras_ops"))[0]["y"]
    np.testing.assert_allclose(y, expected, rtol=1e-14, atol=0)


def test_onnx_lp_normalization_form():
    """LpNormalization p=2 (onnx reference + onnx/onnx#7618): x / ||x||, 0 where the norm is 0."""
    x = RNG.standard_normal((4, 6))
    x[2] = 0.0
    norm = row_norms(x, (0,))  # axis 0, as in ONNX's test_l2normalization_axis_0
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = np.where(norm == 0, 0.0, x / norm)
    y = OP.apply({"x": x}, None, **{**OP.dialect("onnx"), "axes": [0]})[0]["y"]
    np.testing.assert_allclose(y, expected, rtol=1e-14, atol=0)
    x[:, 1] = 0.0  # a zero column: the 0 of #7618, not the 0/0 = NaN of the older reference
    y = OP.apply({"x": x}, None, **{**OP.dialect("onnx"), "axes": [0]})[0]["y"]
    np.testing.assert_array_equal(y[:, 1], 0.0)


def test_ngpt_justnorm_agrees_off_zero_rows():
    torch = torch_or_skip()
    x = RNG.standard_normal((2, 3, 8))
    tx = t64(x, True)
    ty = tx / tx.norm(p=2, dim=-1, keepdim=True)  # model.py Block.justnorm
    np.testing.assert_allclose(OP.apply({"x": x}, None, **OP.dialect("ngpt"))[0]["y"],
                               ty.detach().numpy(), rtol=1e-13, atol=1e-15)
    dy = RNG.standard_normal(x.shape)
    np.testing.assert_allclose(OP.vjp({"x": x}, None, {"y": dy}, **OP.dialect("ngpt"))["x"],
                               torch_vjp(ty, {"x": tx}, dy)["x"], rtol=1e-11, atol=1e-12)
    # The one difference, documented in the dialect's notes: justnorm(0) = 0/0 = NaN, the oracle 0.
    zero = torch.zeros(1, 8, dtype=torch.float64)
    assert torch.isnan(zero / zero.norm(p=2, dim=-1, keepdim=True)).all()
    np.testing.assert_array_equal(OP.apply({"x": np.zeros((1, 8))}, None, **OP.dialect("ngpt"))[0]["y"], 0.0)


@pytest.mark.parametrize("dialect", ["keras", "keras_ops"])
def test_matches_keras_float64(dialect):
    if importlib.util.find_spec("keras") is None:
        pytest.skip("keras is not installed")
    from conformance.adapters.keras import import_keras

    keras = import_keras()  # a backend chosen (jax by default): a bare import would want TensorFlow
    x = _mixed_rows((4, 6), (-1,), 1e-3)
    if dialect == "keras":
        layer = keras.layers.UnitNormalization(axis=-1, dtype="float64")
        y = layer(keras.ops.convert_to_tensor(x, dtype="float64"))
    else:
        y = keras.ops.normalize(keras.ops.convert_to_tensor(x, dtype="float64"), axis=-1, order=2)
    out = OP.apply({"x": x}, None, **OP.dialect(dialect))[0]["y"]
    np.testing.assert_allclose(out, keras.ops.convert_to_numpy(y), rtol=1e-13, atol=1e-15)
