"""CRMSNorm: forward vs mpmath on adversarial data, the paper's equivalences (Pre-LN -> Pre-RMSNorm ->
Pre-CRMSNorm, executable on a small ViT as in the official example.py), gradient identities, the
official formula in torch autograd (float64), bad input, and two harness mutants."""

from __future__ import annotations

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
from reference.normalizers.crms_norm import compress, compress_input_weight, crms_norm, decompress
from reference.normalizers.layer_norm import layer_norm
from reference.normalizers.rms_norm import rms_norm

OP = reference.get("crms_norm")
RMS = reference.get("rms_norm")
RNG = np.random.default_rng(20260611)
TINY_EPS = 1e-300  # eps -> 0: the scale identities then hold up to rounding


def mp_crms_norm(x, eps):
    """CRMSNorm at 50 digits: RMSNorm of the decompressed vector (x, -sum x), restricted to x;
    written from the definition, independently of the oracle's formula."""
    X = mp_array(x)
    dropped = -np.sum(X, axis=-1, keepdims=True)
    d = x.shape[-1] + 1
    ms = (np.sum(X * X, axis=-1, keepdims=True) + dropped * dropped) / d
    return X / mp_sqrt(ms + mp_array(np.float64(eps)))


# --- forward accuracy -------------------------------------------------------------------------


@pytest.mark.parametrize("eps_kind", ["scaled", "default"])
@pytest.mark.parametrize("family", sorted(ADVERSARIAL))
def test_forward_matches_mpmath_on_adversarial_data(family, eps_kind):
    """Within 1e-10 relative (normwise) of 50-digit arithmetic on every adversarial family, with eps
    at 1e-3 of the mean square (the data set the denominator on every scale) and at its default."""
    x = adversarial(family, (4, 3, 10))
    z = decompress(x)
    eps = 1e-3 * float(np.mean(z * z)) if eps_kind == "scaled" else 1e-5
    eps = max(eps, 1e-300)  # the constant family's mean square is positive; tiny's is 1e-300
    y = OP.apply({"x": x}, None, eps=eps)[0]["y"]
    err = relative_error(y, mp_crms_norm(x, eps))
    assert err <= 1e-10, f"{family}, eps={eps:.3g}: relative error {err:.3g}"


def mp_crms_norm_vjp(x, dy, eps):
    """The VJP at 50 digits: the chain rule through r = q^(-1/2) written out per element."""
    X, DY = mp_array(x), mp_array(dy)
    d = x.shape[-1] + 1
    s = np.sum(X, axis=-1, keepdims=True)
    r = 1 / mp_sqrt((np.sum(X * X, axis=-1, keepdims=True) + s * s) / d + mp_array(np.float64(eps)))
    # dx_j = dy_j r + sum_i dy_i x_i (d r / d x_j), d r / d x_j = -r^3 (x_j + s) / d
    return DY * r - r**3 * (X + s) / d * np.sum(DY * X, axis=-1, keepdims=True)


@pytest.mark.parametrize("shape", [(3, 2, 6), (6, 1)])
@pytest.mark.parametrize("family", sorted(ADVERSARIAL))
def test_vjp_matches_mpmath_on_adversarial_data(family, shape):
    """The hand-derived VJP within 1e-10 relative (normwise) of 50 digits, eps at 1e-3 of the mean
    square, also with one feature (d = 2), where the general form would cancel (measured 8.6e-11
    at eps = 1e-6 before the d = 2 branch)."""
    x = adversarial(family, shape)
    dy = RNG.standard_normal(shape)
    z = decompress(x)
    eps = max(1e-3 * float(np.mean(z * z)), 1e-300)
    dx = OP.vjp({"x": x}, None, {"y": dy}, eps=eps)["x"]
    err = relative_error(dx, mp_crms_norm_vjp(x, dy, eps))
    assert err <= 1e-10, f"{family}: relative error {err:.3g}"


def test_one_feature_gradient_in_the_saturated_regime():
    """d = 2, x^2 >> eps: dx = eps r^3 dy, accurate to a few ulps where r (1 - y^2) dy is not."""
    x, dy = np.array([[0.7], [-2.0], [30.0]]), np.array([[1.0], [-0.5], [2.0]])
    dx = OP.vjp({"x": x}, None, {"y": dy}, eps=1e-6)["x"]
    assert relative_error(dx, mp_crms_norm_vjp(x, dy, 1e-6)) <= 1e-15


def test_constant_rows_and_zero_rows():
    """A constant row c (m features) decompresses to (c, ..., c, -m c): mean square c^2 m (m + 1)/d
    = m c^2, so y = sign(c) / sqrt(m).  A zero row gives 0 and a gradient dy / sqrt(eps)."""
    m = 6
    x = np.full((2, m), -2.5)
    np.testing.assert_allclose(crms_norm(x, eps=TINY_EPS), -1 / np.sqrt(m), rtol=1e-15)
    zero, dy = np.zeros((2, m)), RNG.standard_normal((2, m))
    np.testing.assert_array_equal(crms_norm(zero, eps=1e-6), 0.0)
    dx = OP.vjp({"x": zero}, None, {"y": dy}, eps=1e-6)["x"]
    np.testing.assert_allclose(dx, dy / np.sqrt(1e-6), rtol=1e-15)


# --- the paper's equivalences ---------------------------------------------------------------------

rows = st.tuples(st.integers(1, 4), st.integers(1, 12))
epsilons = st.sampled_from([1e-5, 1e-6, 0.3])


@given(shape=rows, seed=st.integers(0, 2**32 - 1), eps=epsilons, scale=st.floats(-3, 3))
def test_equals_rms_norm_of_decompressed_input(shape, seed, eps, scale):
    """decompress(CRMSNorm(x)) = RMSNorm(decompress(x)) with the same eps (inside the root)."""
    x = np.random.default_rng(seed).standard_normal(shape) * 10.0**scale
    z = decompress(x)
    expect = rms_norm(z, eps=eps, eps_placement="inside")
    y = crms_norm(x, eps=eps)
    # The same statistic summed in a different order (the dropped square inside the sum or apart):
    # a few ulps of the result, whose entries are at most sqrt(d) in size.
    np.testing.assert_allclose(decompress(y), expect, rtol=0, atol=1e-14 * np.sqrt(shape[1] + 1))


@given(shape=st.tuples(st.integers(1, 4), st.integers(2, 12)), seed=st.integers(0, 2**32 - 1),
       eps=epsilons, offset=st.floats(-50, 50))
def test_layer_norm_equals_crms_norm_of_compressed(shape, seed, eps, offset):
    """Pre-LN -> Pre-RMSNorm -> Pre-CRMSNorm on one vector: LN(v) = RMSNorm(v - mean v) =
    decompress(CRMSNorm(compress(v - mean v))); compress is lossless on zero-mean vectors."""
    v = np.random.default_rng(seed).standard_normal(shape) + offset
    z = v - v.mean(axis=-1, keepdims=True)
    ln = layer_norm(v, eps=eps)
    # z carries the rounding of the mean (u |offset|); LN's own centering is more accurate, so the
    # bound is that rounding seen through 1/std (std ~ 1 here).
    atol = 1e-14 * (1 + abs(offset)) * np.sqrt(shape[1])
    np.testing.assert_allclose(rms_norm(z, eps=eps, eps_placement="inside"), ln, rtol=0, atol=atol)
    np.testing.assert_allclose(decompress(compress(z)), z, rtol=0, atol=atol)
    np.testing.assert_allclose(decompress(crms_norm(compress(z), eps=eps)), ln, rtol=0, atol=atol)


def _gelu(a):
    return 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a**3)))


def _linear(a, w, b=None):
    out = a @ w.T
    return out if b is None else out + b


def _vit(patches, p, norm, heads=2):
    """example.py's pre_normalization_vit in NumPy: patch linear, positional embedding, class token,
    pre-norm attention and MLP blocks with residuals, final norm, the class token's logits."""
    x = _linear(patches, p["patch_w"], p["patch_b"]) + p["pos"]
    cls = np.broadcast_to(p["cls"], (x.shape[0], 1, x.shape[-1]))
    x = np.concatenate([cls, x], axis=1)
    for blk in p["blocks"]:
        q, k, v = np.split(_linear(norm(x), blk["att_in_w"], blk["att_in_b"]), 3, axis=-1)
        b, n, dim = q.shape
        q, k, v = (t.reshape(b, n, heads, dim // heads).transpose(0, 2, 1, 3) for t in (q, k, v))
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(dim // heads)
        a = np.exp(s - s.max(axis=-1, keepdims=True))
        a = (a / a.sum(axis=-1, keepdims=True)) @ v
        x = x + _linear(a.transpose(0, 2, 1, 3).reshape(b, n, dim), blk["att_out_w"], blk["att_out_b"])
        x = x + _linear(_gelu(_linear(norm(x), blk["mlp_in_w"], blk["mlp_in_b"])), blk["mlp_out_w"],
                        blk["mlp_out_b"])
    return _linear(norm(x)[:, 0], p["head_w"], p["head_b"])


def _zero_mean(p):
    """Variant 2 of example.py: recenter whatever writes to the main branch (mean over the output
    dim); Pre-LN outputs do not change."""
    def c(w, axis):
        return w - w.mean(axis=axis, keepdims=True)
    q = {"patch_w": c(p["patch_w"], 0), "patch_b": c(p["patch_b"], 0), "pos": c(p["pos"], -1),
         "cls": c(p["cls"], -1), "head_w": p["head_w"], "head_b": p["head_b"], "blocks": []}
    for blk in p["blocks"]:
        q["blocks"].append({**blk, "att_out_w": c(blk["att_out_w"], 0), "att_out_b": c(blk["att_out_b"], 0),
                            "mlp_out_w": c(blk["mlp_out_w"], 0), "mlp_out_b": c(blk["mlp_out_b"], 0)})
    return q


def _compressed(p, inputs=True):
    """Variant 4: drop the last coordinate of what writes to the main branch; the linears that read
    it absorb the decompression, W -> W[:, :-1] - W[:, -1:] (only with ``inputs``)."""
    reads = compress_input_weight if inputs else (lambda w: w[:, :-1])
    q = {"patch_w": p["patch_w"][:-1], "patch_b": p["patch_b"][:-1], "pos": p["pos"][..., :-1],
         "cls": p["cls"][..., :-1], "head_w": reads(p["head_w"]), "head_b": p["head_b"], "blocks": []}
    for blk in p["blocks"]:
        q["blocks"].append({**blk, "att_in_w": reads(blk["att_in_w"]), "mlp_in_w": reads(blk["mlp_in_w"]),
                            "att_out_w": blk["att_out_w"][:-1], "att_out_b": blk["att_out_b"][:-1],
                            "mlp_out_w": blk["mlp_out_w"][:-1], "mlp_out_b": blk["mlp_out_b"][:-1]})
    return q


@given(seed=st.integers(0, 2**32 - 1), eps=st.sampled_from([1e-5, 1e-6]))
def test_pre_ln_equals_pre_crms_transformer(seed, eps):
    """The official example.py's recipe, executable: a Pre-LN ViT, its zero-mean-main-branch form,
    its Pre-RMSNorm form and its Pre-CRMSNorm form (one coordinate fewer everywhere on the main
    branch) give the same logits to rounding; leaving the input linears uncompressed does not."""
    rng = np.random.default_rng(seed)
    dim, depth, patch_dim, n_patch, classes = 8, 2, 6, 4, 3

    def r(*shape):
        return rng.standard_normal(shape) / np.sqrt(shape[-1])

    p = {"patch_w": r(dim, patch_dim), "patch_b": r(dim), "pos": r(1, n_patch, dim), "cls": r(1, 1, dim),
         "head_w": r(classes, dim), "head_b": r(classes),
         "blocks": [{"att_in_w": r(3 * dim, dim), "att_in_b": r(3 * dim), "att_out_w": r(dim, dim),
                     "att_out_b": r(dim), "mlp_in_w": r(2 * dim, dim), "mlp_in_b": r(2 * dim),
                     "mlp_out_w": r(dim, 2 * dim), "mlp_out_b": r(dim)} for _ in range(depth)]}
    patches = rng.standard_normal((2, n_patch, patch_dim))
    zm = _zero_mean(p)
    pre_ln = _vit(patches, p, lambda a: layer_norm(a, eps=eps))
    pre_ln_zm = _vit(patches, zm, lambda a: layer_norm(a, eps=eps))
    pre_rms = _vit(patches, zm, lambda a: rms_norm(a, eps=eps, eps_placement="inside"))
    pre_crms = _vit(patches, _compressed(zm), lambda a: crms_norm(a, eps=eps))
    scale = np.abs(pre_ln).max()
    for name, got in (("zero-mean main branch", pre_ln_zm), ("Pre-RMSNorm", pre_rms), ("Pre-CRMSNorm", pre_crms)):
        np.testing.assert_allclose(got, pre_ln, rtol=0, atol=1e-12 * scale, err_msg=name)
    wrong = _vit(patches, _compressed(zm, inputs=False), lambda a: crms_norm(a, eps=eps))
    assert np.abs(wrong - pre_ln).max() > 1e-3 * scale


@given(shape=rows, seed=st.integers(0, 2**32 - 1), log_c=st.floats(-3, 3))
def test_invariant_to_positive_scaling(shape, seed, log_c):
    """CRMSNorm(c x) = CRMSNorm(x) for c > 0 as eps -> 0 (RMSNorm's invariance, through the linear
    decompress); a negative c flips the sign."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    c = 10.0 ** (log_c + 0.1 * rng.standard_normal((shape[0], 1)))
    y = crms_norm(x, eps=TINY_EPS)
    np.testing.assert_allclose(crms_norm(c * x, eps=TINY_EPS), y, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(crms_norm(-c * x, eps=TINY_EPS), -y, rtol=1e-13, atol=1e-15)


@given(shape=rows, seed=st.integers(0, 2**32 - 1), eps=epsilons)
def test_unit_rms_of_decompressed_output(shape, seed, eps):
    """The decompressed output has mean square q / (q + eps) over its d coordinates, q the input's
    (1 as eps -> 0); the compressed coordinates alone do not (the dropped one carries the rest)."""
    x = np.random.default_rng(seed).standard_normal(shape) * 3
    z = decompress(x)
    q = np.mean(z * z, axis=-1)
    y = decompress(crms_norm(x, eps=eps))
    np.testing.assert_allclose(np.mean(y * y, axis=-1), q / (q + eps), rtol=1e-14)


@given(shape=rows, seed=st.integers(0, 2**32 - 1), eps=epsilons)
def test_grad_radial_component(shape, seed, eps):
    """sum_j x_j dx_j = eps r^2 sum_i dy_i y_i with r = 1/sqrt(q + eps): the derivative along x
    comes from eps alone (scale invariance as eps -> 0)."""
    rng = np.random.default_rng(seed)
    x, dy = rng.standard_normal(shape), rng.standard_normal(shape)
    y = crms_norm(x, eps=eps)
    dx = OP.vjp({"x": x}, None, {"y": dy}, eps=eps)["x"]
    z = decompress(x)
    r2 = 1.0 / (np.mean(z * z, axis=-1) + eps)
    expect = eps * r2 * np.sum(dy * y, axis=-1)
    # The row sum cancels terms of size |dy y| and |y|^2 |coupling|: bound by u d times them.
    d = shape[1] + 1
    terms = np.sum(np.abs(dy * y) + (np.abs(y) + np.abs(y.sum(-1, keepdims=True))) ** 2
                   * np.abs(np.sum(dy * y, -1, keepdims=True)) / d, axis=-1)
    assert np.all(np.abs(np.sum(x * dx, axis=-1) - expect) <= 1e-14 * d * terms)


@given(shape=rows, seed=st.integers(0, 2**32 - 1), eps=epsilons)
def test_grad_is_rms_grad_through_decompress(shape, seed, eps):
    """The VJP is RMSNorm's VJP in R^d (cotangent (dy, 0): the dropped coordinate is not an output)
    pulled back through decompress, whose transpose maps (g, g_d) to g - g_d."""
    rng = np.random.default_rng(seed)
    x, dy = rng.standard_normal(shape), rng.standard_normal(shape)
    z = decompress(x)
    g = RMS.vjp({"x": z}, None, {"y": np.concatenate([dy, np.zeros((shape[0], 1))], axis=-1)},
                eps=eps, eps_placement="inside")["x"]
    dx = OP.vjp({"x": x}, None, {"y": dy}, eps=eps)["x"]
    np.testing.assert_allclose(dx, g[:, :-1] - g[:, -1:], rtol=1e-12, atol=1e-13 * np.abs(g).max())


def test_dialects_and_helpers():
    assert OP.dialect("official_torch")["eps"] == 1e-5
    assert OP.dialect("official_jax")["eps"] == 1e-6
    w, x = RNG.standard_normal((4, 6)), RNG.standard_normal((3, 5))
    np.testing.assert_allclose(decompress(x) @ w.T, x @ compress_input_weight(w).T, rtol=1e-13, atol=1e-14)
    with pytest.raises(ValueError, match="compress needs at least 2 features"):
        compress(np.ones((3, 1)))
    with pytest.raises(ValueError, match=r"compress_input_weight needs a \(out, d\) weight"):
        compress_input_weight(np.ones(4))


# --- the official formula in torch (float64) ----------------------------------------------------


def _official_torch(torch, tx, eps):
    """The official formula in torch: the discarded element is minus the sum of the features, the
    divisor the feature count + 1 (restated from the equation)."""
    discarded = tx.sum(dim=-1, keepdim=True)
    return tx * torch.rsqrt((tx.square().sum(dim=-1, keepdim=True) + discarded.square()) / (tx.shape[-1] + 1)
                            + eps)


@pytest.mark.parametrize("dialect", ["official_torch", "official_jax"])
@pytest.mark.parametrize("shape", [(4, 7), (2, 3, 16), (3, 2)])
def test_matches_the_official_formula_in_torch_autograd(dialect, shape):
    """customized_layer.py's crms_norm (torch) / jax/model.py's CRMSNorm in float64 torch autograd
    (the torch module's x.float() left out: it computes a float64 input in float32, 1.4e-7 from the
    oracle on (8, 197, 383)).  Measured max relative errors over 20 draws per shape and eps:
    forward 3.2e-16, gradient 5.4e-16."""
    torch = torch_or_skip()
    eps = OP.dialect(dialect)["eps"]
    x = RNG.standard_normal(shape) + 0.5
    tx = t64(x, True)
    ty = _official_torch(torch, tx, eps)
    out = OP.apply({"x": x}, None, **OP.dialect(dialect))[0]["y"]
    np.testing.assert_allclose(out, ty.detach().numpy(), rtol=1e-14, atol=1e-15)
    dy = RNG.standard_normal(shape)
    dx = OP.vjp({"x": x}, None, {"y": dy}, **OP.dialect(dialect))["x"]
    np.testing.assert_allclose(dx, torch_vjp(ty, {"x": tx}, dy)["x"], rtol=1e-13, atol=1e-14)


def test_one_feature_torch_autograd_cancels_where_the_oracle_does_not():
    """d = 2 with x^2 >> eps: torch's autograd of the official formula forms r (1 - y^2) and loses
    digits (measured up to 7e-12 normwise at eps = 1e-6); the oracle is within a few ulps of mpmath
    and torch within its cancellation bound u x^2 / eps of it."""
    torch = torch_or_skip()
    x, dy = RNG.standard_normal((6, 1)) * 3 + 0.5, RNG.standard_normal((6, 1))
    tx = t64(x, True)
    expect = mp_crms_norm_vjp(x, dy, 1e-6)
    got_torch = torch_vjp(_official_torch(torch, tx, 1e-6), {"x": tx}, dy)["x"]
    assert relative_error(OP.vjp({"x": x}, None, {"y": dy}, eps=1e-6)["x"], expect) <= 1e-15
    assert relative_error(got_torch, expect) <= 4 * np.finfo(float).eps * float(np.max(x * x)) / 1e-6


# --- the harness flags plausible mistakes -------------------------------------------------------


class _CRMS(Mutant):
    op = "crms_norm"


class CRMSMeanOverCompressedLength(_CRMS):
    """The mean square is taken over the m compressed features (x.shape[-1]) instead of the
    decompressed d = m + 1: the official code's ``+ 1`` dropped."""

    def forward(self, a, hp):
        x = a["x"]
        m = x.shape[-1]
        s = x.sum(axis=-1, keepdims=True)
        q = (np.sum(x * x, axis=-1, keepdims=True) + s * s) / m + hp["eps"]  # the mistake: / m
        return {"y": x / np.sqrt(q)}, {}


class CRMSGradWithoutRestoredCoordinate(_CRMS):
    """A hand-written backward that treats the statistic as RMSNorm's over the m compressed
    features: the restored coordinate's term ``sum(y)`` is missing from the coupling."""

    def backward(self, ct, a, hp):
        x, dy = a["x"], ct["y"]
        d = x.shape[-1] + 1
        s = x.sum(axis=-1, keepdims=True)
        r = 1 / np.sqrt((np.sum(x * x, axis=-1, keepdims=True) + s * s) / d + hp["eps"])
        y = x * r
        return {"x": r * (dy - y * np.sum(dy * y, axis=-1, keepdims=True) / d)}  # no + s r


@pytest.mark.parametrize("cls", [CRMSMeanOverCompressedLength, CRMSGradWithoutRestoredCoordinate],
                         ids=lambda c: c.__name__)
def test_mutants_are_flagged(cls):
    flagged, results = flagged_cases(cls())
    assert flagged >= MIN_FLAGGED, f"{cls.__name__} flagged by {flagged} cases:\n{verdict_table(results)}"


def test_the_unmutated_control_is_not_flagged():
    """The mutants' plumbing without a mistake: no FAIL, ERROR or CONVENTION."""
    _, results = run_mutant(Control(_CRMS.op, _CRMS.dialect, _CRMS.dtypes))
    flagged = [r for r in results if r.verdict in ("FAIL", "ERROR", "CONVENTION")]
    assert not flagged, verdict_table(flagged)
