"""MsgNorm (DeeperGCN): forward vs mpmath on adversarial features and messages, the properties of
s ||x|| m / ||m||, the composition with l2_normalize, PyG's MessageNorm and the official MsgNorm in
torch (float64), the feature normalization of layer-normalized FL as l2_normalize composed with a
constant, and harness mutants."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reference
from conformance.cases import ADVERSARIAL, adversarial
from helpers import (
    MIN_FLAGGED,
    flagged_cases,
    mp_array,
    mp_sqrt,
    relative_error,
    run_mutant,
    t64,
    torch_or_skip,
    torch_vjp,
    verdict_table,
)
from mutants import Control, Mutant
from reference.normalizers.msg_norm import msg_norm

OP = reference.get("msg_norm")
L2 = reference.get("l2_normalize")
SEED = 20260702  # each test draws from its own generator: no order dependence
U = 2.0**-53  # unit roundoff of float64
FORMS = ("norm", "squared_norm")


def mp_msg_norm(x, msg, s, axes, eps, clamps):
    """s ||x|| m / max(||m||, floor) at 50 digits, from the definition (no rescaled norms)."""
    X, M = mp_array(x), mp_array(msg)
    x_norm = mp_sqrt(np.sum(X * X, axis=axes, keepdims=True))
    m_norm = mp_sqrt(np.sum(M * M, axis=axes, keepdims=True))
    E = mp_array(np.float64(eps))
    floor = E if clamps == "norm" else mp_sqrt(E)
    denominator = np.maximum(m_norm, floor)
    unit = np.where(denominator == 0, 0, M / np.where(denominator == 0, 1, denominator))
    return mp_array(np.float64(s)) * x_norm * unit


def forward_tolerance(k):
    """Relative bound over rows of k values: l2_normalize's ((k + 1)/2 + 4) u for the unit message,
    as much for the scaled norm of x, and one rounding each for the two products."""
    return ((k + 1) + 10) * U


def row_norms(v, axes=(-1,)):
    return np.sqrt(np.sum(v * v, axis=axes, keepdims=True))


def apply(inputs, **hp):
    return OP.apply(inputs, None, **hp)[0]["y"]


def vjp(inputs, dy, **hp):
    return OP.vjp(inputs, None, {"y": dy}, **hp)


# --- forward accuracy -------------------------------------------------------------------------


@pytest.mark.parametrize("clamps", FORMS)
@pytest.mark.parametrize("eps", [0.0, 1e-12])
@pytest.mark.parametrize("on", ["x", "msg"])
@pytest.mark.parametrize("family", sorted(ADVERSARIAL))
def test_forward_matches_mpmath_on_adversarial_data(family, on, eps, clamps):
    """The adversarial family on the features or on the messages (the other input N(0, 1)):
    within (k + 11) u of mpmath.  eps = 1e-12 clamps the tiny_1e-150 messages in both forms."""
    rng = np.random.default_rng(SEED)
    inputs = {"x": rng.standard_normal((4, 10)), "msg": rng.standard_normal((4, 10)),
              "scale": np.array([1.0 + 0.5 * rng.standard_normal()])}
    inputs[on] = adversarial(family, (4, 10))
    y = apply(inputs, eps=eps, eps_clamps=clamps)
    exact = mp_msg_norm(inputs["x"], inputs["msg"], inputs["scale"][0], (-1,), eps, clamps)
    err = relative_error(y, exact)
    assert err <= forward_tolerance(10), f"{family} on {on}: relative error {err / U:.2f} u"


# --- properties -------------------------------------------------------------------------------

rows = st.tuples(st.integers(1, 4), st.integers(1, 12))
seeds = st.integers(0, 2**32 - 1)
forms = st.sampled_from(FORMS)
# Off the clamp: no eps, or an eps far below every message's norm.
small_eps = st.sampled_from([0.0, 1e-300, 1e-30])


def _draw(shape, seed, log_c=0.0, scale=True):
    rng = np.random.default_rng(seed)
    inputs = {"x": rng.standard_normal(shape) * 10.0**log_c, "msg": rng.standard_normal(shape)}
    if scale:
        inputs["scale"] = np.array([rng.choice([-1.0, 1.0]) * 10.0 ** rng.uniform(-1, 1)])
    return inputs, rng


@given(shape=rows, seed=seeds, clamps=forms, eps=st.sampled_from([0.0, 1e-12, 1e-3, 10.0]),
       axes=st.sampled_from([(-1,), (0, 1)]))
def test_is_scaled_l2_normalize(shape, seed, clamps, eps, axes):
    """y = s ||x|| l2_normalize(msg) with the registered l2_normalize, on and off its clamp; the VJP
    is the chain rule through it: dmsg = l2_normalize's VJP of s ||x|| dy, dx = s <dy, u> x / ||x||."""
    inputs, rng = _draw(shape, seed)
    hp = {"axes": list(axes), "eps": eps, "eps_clamps": clamps}
    s = inputs["scale"][0]
    unit = L2.apply({"x": inputs["msg"]}, None, **hp)[0]["y"]
    x_norm = row_norms(inputs["x"], axes)
    k = int(np.prod([shape[a] for a in axes]))  # the row length
    # Both sides carry one unit vector; the norms of x differ by their own roundings (rescaled or not).
    np.testing.assert_allclose(apply(inputs, **hp), s * x_norm * unit, rtol=forward_tolerance(k), atol=0)
    dy = rng.standard_normal(shape)
    g = vjp(inputs, dy, **hp)
    cotangent = s * x_norm * dy
    dmsg = L2.vjp({"x": inputs["msg"]}, None, {"y": cotangent}, **hp)["x"]
    # dmsg = (c - u <u, c>) / max(||msg||, floor) cancels where c is along u: its error is relative
    # to the terms, |c| / denominator, and x's two norms differ as above.
    floor = eps if clamps == "norm" else math.sqrt(eps)
    terms = np.max(np.abs(cotangent) / np.maximum(row_norms(inputs["msg"], axes), floor))
    np.testing.assert_allclose(g["msg"], dmsg, rtol=0, atol=4 * forward_tolerance(k) * k * terms)
    along = np.sum(s * dy * unit, axis=axes, keepdims=True)
    dx = along * inputs["x"] / x_norm
    # |along| <= sum |s dy| (|u_i| <= 1), |x_i| / ||x|| <= 1: k roundings of the sum and a few more.
    np.testing.assert_allclose(g["x"], dx, rtol=0, atol=2 * forward_tolerance(k) * k * np.max(np.abs(s * dy)))
    total = float(np.sum(np.abs(dy * x_norm * unit)))
    np.testing.assert_allclose(g["scale"], [np.sum(dy * x_norm * unit)], rtol=0,
                               atol=2 * forward_tolerance(k) * dy.size * total)


@given(shape=rows, seed=seeds, log_c=st.floats(-3, 3), clamps=forms, eps=small_eps)
def test_output_norm_is_scale_times_feature_norm(shape, seed, log_c, clamps, eps):
    """DeeperGCN's point: the normalized message has the norm of the node's features, times |s|."""
    inputs, _ = _draw(shape, seed, log_c)
    y = apply(inputs, eps=eps, eps_clamps=clamps)
    k = shape[1]
    expected = abs(inputs["scale"][0]) * row_norms(inputs["x"])
    np.testing.assert_allclose(row_norms(y), expected, rtol=forward_tolerance(k) + (k + 1) * U)


@given(shape=rows, seed=seeds, clamps=forms, eps=small_eps)
def test_output_along_the_message(shape, seed, clamps, eps):
    """y = (s ||x|| / ||msg||) msg elementwise: the message's direction is all that is kept."""
    inputs, _ = _draw(shape, seed)
    y = apply(inputs, eps=eps, eps_clamps=clamps)
    factor = inputs["scale"][0] * row_norms(inputs["x"]) / row_norms(inputs["msg"])
    np.testing.assert_allclose(y, factor * inputs["msg"], rtol=forward_tolerance(shape[1]) + 4 * U, atol=0)


@given(shape=rows, seed=seeds, log_c=st.floats(-3, 3), clamps=forms, eps=small_eps)
def test_invariant_to_positive_message_scaling(shape, seed, log_c, clamps, eps):
    inputs, rng = _draw(shape, seed)
    c = 10.0 ** (log_c + 0.1 * rng.standard_normal((shape[0], 1)))
    scaled = dict(inputs, msg=c * inputs["msg"])
    # c * msg rounds each element (u); both sides carry the forward bound.
    np.testing.assert_allclose(apply(scaled, eps=eps, eps_clamps=clamps), apply(inputs, eps=eps, eps_clamps=clamps),
                               rtol=2 * forward_tolerance(shape[1]) + 2 * U, atol=0)


@given(shape=rows, seed=seeds, log_c=st.floats(-3, 3), clamps=forms, eps=st.sampled_from([0.0, 1e-12, 10.0]))
def test_homogeneous_in_the_features(shape, seed, log_c, clamps, eps):
    """||c x|| = |c| ||x||: y(c x, msg) = |c| y(x, msg), whatever the clamp does to msg."""
    inputs, rng = _draw(shape, seed)
    c = -(10.0**log_c) if rng.random() < 0.5 else 10.0**log_c
    scaled = dict(inputs, x=c * inputs["x"])
    np.testing.assert_allclose(apply(scaled, eps=eps, eps_clamps=clamps),
                               abs(c) * apply(inputs, eps=eps, eps_clamps=clamps),
                               rtol=2 * forward_tolerance(shape[1]) + 4 * U, atol=0)


@given(shape=rows, seed=seeds, clamps=forms, eps=st.sampled_from([0.0, 1e-12, 1.0]))
def test_zero_rows(shape, seed, clamps, eps):
    """A zero message row gives y = 0 (0 / floor, or l2_normalize's 0 at eps = 0), a zero feature
    row gives y = 0 and dx = 0 (the minimum-norm subgradient of ||x|| at 0, PyTorch's value); the
    message's gradient at a zero message is dy s ||x|| / floor with eps > 0 and NaN (no derivative)
    at eps = 0."""
    inputs, rng = _draw(shape, seed)
    zero_msg = rng.random(shape[0]) < 0.5
    zero_x = rng.random(shape[0]) < 0.5
    inputs["msg"][zero_msg] = 0.0
    inputs["x"][zero_x] = 0.0
    hp = {"eps": eps, "eps_clamps": clamps}
    y = apply(inputs, **hp)
    assert np.all(np.isfinite(y))
    np.testing.assert_array_equal(y[zero_msg | zero_x], 0.0)
    dy = rng.standard_normal(shape)
    g = vjp(inputs, dy, **hp)
    np.testing.assert_array_equal(g["x"][zero_x], 0.0)
    assert np.all(np.isfinite(g["x"]))
    if eps > 0:
        floor = eps if clamps == "norm" else math.sqrt(eps)
        s, x_norm = inputs["scale"][0], row_norms(inputs["x"])
        np.testing.assert_allclose(g["msg"][zero_msg], (s * x_norm * dy / floor)[zero_msg], rtol=4 * U)
    else:
        assert np.all(np.isnan(g["msg"][zero_msg]))


@given(shape=rows, seed=seeds, clamps=forms, eps=st.sampled_from([0.0, 1e-12, 10.0]))
def test_grad_x_along_x(shape, seed, clamps, eps):
    """y depends on x through ||x|| alone, so dx is a multiple of x in every row: dx_i x_j = dx_j x_i."""
    inputs, rng = _draw(shape, seed)
    dy = rng.standard_normal(shape)
    dx = vjp(inputs, dy, eps=eps, eps_clamps=clamps)["x"]
    x = inputs["x"]
    cross = dx[:, :, None] * x[:, None, :] - dx[:, None, :] * x[:, :, None]
    size = np.abs(dx[:, :, None] * x[:, None, :]) + np.abs(dx[:, None, :] * x[:, :, None])
    assert np.all(np.abs(cross) <= (shape[1] + 8) * U * 4 * np.maximum(size, np.max(size) * U))


@given(shape=rows, seed=seeds, log_c=st.floats(-3, 3), clamps=forms, eps=small_eps)
def test_grad_msg_orthogonal_to_message(shape, seed, log_c, clamps, eps):
    """Off the clamp y does not change along msg (scale invariance), so <dmsg, msg> = 0."""
    inputs, rng = _draw(shape, seed)
    inputs["msg"] = inputs["msg"] * 10.0**log_c
    dy = rng.standard_normal(shape)
    dmsg = vjp(inputs, dy, eps=eps, eps_clamps=clamps)["msg"]
    m = inputs["msg"]
    # Each term dmsg_j m_j is accurate to a few u of its size; the k-term sum adds k more.
    k = shape[1]
    bound = (k + 8) * U * 4 * np.sum(np.abs(dmsg * m) + np.abs(inputs["scale"][0]) * row_norms(inputs["x"])
                                     * np.abs(dy) * np.abs(m) / row_norms(m), axis=-1)
    assert np.all(np.abs(np.sum(dmsg * m, axis=-1)) <= bound)


def test_dialect_values():
    assert tuple(OP.dialect("pyg")["axes"]) == (-1,) and tuple(OP.dialect("deep_gcns")["axes"]) == (1,)
    for name in ("pyg", "deep_gcns"):
        assert OP.dialect(name)["eps"] == 1e-12 and OP.dialect(name)["eps_clamps"] == "norm"
    assert OP.dialect("paper")["eps"] == 0.0
    assert OP.spec.hparams["eps"].default == L2.spec.hparams["eps"].default == 1e-12
    assert OP.spec.hparams["eps_clamps"].allowed == L2.spec.hparams["eps_clamps"].allowed


def test_human_api_without_scale_is_s_equal_to_one():
    rng = np.random.default_rng(SEED)
    x, m = rng.standard_normal((3, 5)), rng.standard_normal((3, 5))
    np.testing.assert_array_equal(msg_norm(x, m), msg_norm(x, m, np.ones(1)))
    assert set(OP.vjp({"x": x, "msg": m}, None, {"y": np.ones((3, 5))})) == {"x", "msg"}


# --- PyG's MessageNorm and the official MsgNorm in torch (float64) ------------------------------


def _mixed(shape, rng):
    """Rows on both sides of the clamp and one zero message row, one zero feature row."""
    x, m = rng.standard_normal(shape), rng.standard_normal(shape)
    m *= 10.0 ** rng.uniform(-14, 1, (shape[0], 1))  # norms from 1e-14 (below eps = 1e-12) to 10
    m[0] = 0.0
    x[1] = 0.0
    return x, m


def test_matches_pyg_message_norm_float64():
    """torch_geometric.nn.MessageNorm(learn_scale=True) in float64 (its forward and autograd), the
    pyg dialect.  Measured max relative errors over 20 seeds: forward 5.0e-16, gradients 5.5e-16 (x),
    2.3e-16 (msg), 4.8e-15 (scale, a sum over the 63 elements)."""
    torch = torch_or_skip()
    pyg = pytest.importorskip("torch_geometric.nn")
    rng = np.random.default_rng(SEED)
    x, m = _mixed((7, 9), rng)
    module = pyg.MessageNorm(learn_scale=True).double()
    with torch.no_grad():
        module.scale.fill_(0.75)
    tx, tm = t64(x, True), t64(m, True)
    ty = module(tx, tm)
    inputs = {"x": x, "msg": m, "scale": np.array([0.75])}
    y = apply(inputs, **OP.dialect("pyg"))
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=forward_tolerance(9), atol=0)
    dy = rng.standard_normal(x.shape)
    expected = torch.autograd.grad(ty, [tx, tm, module.scale], t64(dy))
    got = vjp(inputs, dy, **OP.dialect("pyg"))
    for name, e in zip(("x", "msg", "scale"), expected, strict=True):
        e = e.numpy()
        np.testing.assert_allclose(got[name], e, rtol=0, atol=(x.size + 8) * U * np.max(np.abs(e)), err_msg=name)


@pytest.mark.parametrize("learn_scale", [True, False])
def test_matches_the_official_msg_norm_in_torch_autograd(learn_scale):
    """deep_gcns_torch MsgNorm.forward restated (F.normalize(msg, p=2, dim=1) * x.norm(p=2, dim=1,
    keepdim=True) * msg_scale), the deep_gcns dialect; a frozen scale is the op without it.
    Measured max relative errors over 20 seeds: the same as PyG's (the same torch operations)."""
    torch = torch_or_skip()
    rng = np.random.default_rng(SEED + 1)
    x, m = _mixed((6, 5), rng)
    scale = np.array([1.0 if not learn_scale else 1.3])
    tx, tm, ts = t64(x, True), t64(m, True), t64(scale, learn_scale)
    ty = torch.nn.functional.normalize(tm, p=2, dim=1) * tx.norm(p=2, dim=1, keepdim=True) * ts
    inputs = {"x": x, "msg": m, **({"scale": scale} if learn_scale else {})}
    hp = OP.dialect("deep_gcns")
    np.testing.assert_allclose(apply(inputs, **hp), ty.detach().numpy(), rtol=forward_tolerance(5), atol=0)
    dy = rng.standard_normal(x.shape)
    expected = torch_vjp(ty, {"x": tx, "msg": tm, "scale": ts}, dy)
    got = vjp(inputs, dy, **hp)
    assert set(got) == set(expected)
    for name, e in expected.items():
        np.testing.assert_allclose(got[name], e, rtol=0, atol=(x.size + 8) * U * np.max(np.abs(e)), err_msg=name)


# --- Feature normalization of layer-normalized federated learning: a composition ---------------


def test_fl_feature_normalization_is_l2_normalize_times_sqrt_d():
    """'Normalization Is All You Need' (Zhang et al., arXiv:2308.09565) calls FN the normalization
    of the penultimate feature before the classifier head.  Its official code (huawei-noah/
    Federated-Learning, Layer_Normalization/models/resnet.py: ``F.normalize(out, p=2, dim=1) *
    torch.sqrt(torch.tensor(out.shape[1]))``; models/cnn.py's 'v' = the same, 'n' = without the
    sqrt(d), 's' = subtract the mean first) is l2_normalize (torch dialect) times the constant
    sqrt(d): no op of its own.  Checked against that expression in torch autograd, forward and
    gradient (measured over 20 seeds: 3.7e-16 and 3.5e-16 relative); 'sv' (shift, then the scaled
    l2 norm) is LayerNorm without affine at eps -> 0."""
    torch = torch_or_skip()
    rng = np.random.default_rng(SEED + 2)
    h = rng.standard_normal((6, 12)) * 3 + 1
    d = h.shape[1]
    th = t64(h, True)
    fn = torch.nn.functional.normalize(th, p=2, dim=1) * torch.sqrt(torch.tensor(float(d), dtype=torch.float64))
    hp = L2.dialect("torch")
    y = math.sqrt(d) * L2.apply({"x": h}, None, **hp)[0]["y"]
    np.testing.assert_allclose(y, fn.detach().numpy(), rtol=(d + 10) * U, atol=0)
    dy = rng.standard_normal(h.shape)
    dh = L2.vjp({"x": h}, None, {"y": math.sqrt(d) * dy}, **hp)["x"]
    np.testing.assert_allclose(dh, torch_vjp(fn, {"x": th}, dy)["x"], rtol=0,
                               atol=(d + 8) * U * 8 * np.max(np.abs(dh)))
    # 'sv': (h - mean) / ||h - mean|| * sqrt(d) = (h - mean) / sqrt(var): layer_norm at eps -> 0.
    centered = h - h.mean(axis=1, keepdims=True)
    sv = math.sqrt(d) * L2.apply({"x": centered}, None, **hp)[0]["y"]
    ln = reference.get("layer_norm").apply({"x": h}, None, eps=1e-300)[0]["y"]
    np.testing.assert_allclose(sv, ln, rtol=0, atol=(d + 10) * U * 4 * np.max(np.abs(ln)))


# --- the harness flags plausible mistakes -------------------------------------------------------


class _MN(Mutant):
    op = "msg_norm"
    dialect = {"eps_clamps": "norm"}


class MsgNormArgumentsSwapped(_MN):
    """PyG's forward(x, msg) called as forward(msg, x): the features normalized to the message's
    norm, s ||msg|| x / ||x||."""

    def forward(self, a, hp):
        swapped = dict(a, x=a["msg"], msg=a["x"])
        return self.oracle(swapped, hp)


class MsgNormFeatureNormDetached(_MN):
    """A hand-written backward that treats ||x|| as a constant (``x_norm.detach()``): no dx."""

    def backward(self, ct, a, hp):
        grads = self.oracle_vjp(ct, a, hp)
        grads["x"] = np.zeros_like(a["x"])
        return grads


class MsgNormTfFormUnderTorchsName(_MN):
    """tf.math.l2_normalize's rsqrt(max(sum m^2, eps)) in a port that claims torch's F.normalize."""

    expect = ("CONVENTION", "eps_clamps=squared_norm")

    def forward(self, a, hp):
        return self.oracle(a, hp, eps_clamps="squared_norm")

    def backward(self, ct, a, hp):
        return self.oracle_vjp(ct, a, hp, eps_clamps="squared_norm")


@pytest.mark.parametrize("cls", [MsgNormArgumentsSwapped, MsgNormFeatureNormDetached], ids=lambda c: c.__name__)
def test_mutants_are_flagged(cls):
    flagged, results = flagged_cases(cls())
    assert flagged >= MIN_FLAGGED, f"{cls.__name__} flagged by {flagged} cases:\n{verdict_table(results)}"


def test_the_tf_form_under_torchs_name_is_a_convention():
    _, results = run_mutant(MsgNormTfFormUnderTorchsName())
    named = [r for r in results if r.verdict == "CONVENTION"]
    assert len(named) >= MIN_FLAGGED, verdict_table(results)
    assert all("eps_clamps='squared_norm'" in (r.diagnosis or "") for r in named), verdict_table(named)
    assert not [r for r in results if r.verdict in ("FAIL", "ERROR")], verdict_table(results)


def test_the_unmutated_control_is_not_flagged():
    """The mutants' plumbing without a mistake: no FAIL, ERROR or CONVENTION."""
    _, results = run_mutant(Control(_MN.op, _MN.dialect, _MN.dtypes))
    flagged = [r for r in results if r.verdict in ("FAIL", "ERROR", "CONVENTION")]
    assert not flagged, verdict_table(flagged)
