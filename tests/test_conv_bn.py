"""ConvBN blocks (You et al., arXiv:2305.11624): forward vs mpmath in every mode, the paper's
properties (Tune = Eval in forward and parameter gradients, Deploy's forward equal on the folded
parameters and its gradients related through the fold), the conv against its definition, the
float16 fold measured, PyTorch in float64 (nn.Conv2d + nn.BatchNorm2d, Inductor's
efficient_conv_bn_eval, fuse_conv_bn_weights / fuse_conv_bn_eval), and the harness on two
mutants (a fold left stale after a training update, a fold that forgets the conv bias)."""

from __future__ import annotations

import functools

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
    mp_mean,
    mp_sqrt,
    mp_to_float,
    mp_var,
    t64,
    torch_or_skip,
    torch_vjp,
    verdict_table,
)
from mutants import Control, Mutant
from reference.normalizers._conv import conv2d, conv2d_vjp, geometry
from reference.normalizers.conv_bn import MODES, fold_conv_bn

OP = reference.get("conv_bn")
BN = reference.get("batch_norm")
RNG = np.random.default_rng(20260518)
U64 = float(np.finfo(np.float64).eps) / 2
U16 = float(np.finfo(np.float16).eps) / 2
GRADS = ("x", "weight", "bias", "bn_weight", "bn_bias")


def block(rng, n=2, c_in=4, hw=(5, 5), c_out=6, k=(3, 3), groups=1, bias=True, affine=True, scale=1.0):
    """Inputs and a nontrivial state (as after some training) of one ConvBN block."""
    inputs = {"x": rng.standard_normal((n, c_in, *hw)) * scale,
              "weight": rng.standard_normal((c_out, c_in // groups, *k))}
    if bias:
        inputs["bias"] = rng.standard_normal(c_out)
    if affine:
        inputs["bn_weight"] = 1 + 0.5 * rng.standard_normal(c_out)
        inputs["bn_bias"] = rng.standard_normal(c_out)
    state = {"running_mean": rng.standard_normal(c_out), "running_var": rng.uniform(0.2, 3.0, c_out),
             "num_batches_tracked": np.float64(4)}
    return inputs, state


def fan_in(inputs, groups=1):
    """K, the number of products each conv output sums (C_in / groups kh kw)."""
    return int(np.prod(inputs["weight"].shape[1:]))


# --- mpmath references, written from the definitions (independent of reference/_conv.py) ------


def mp_conv(x, w, stride=1, padding=0, dilation=1, groups=1):
    """y[n, o, a, b] = sum_{c, i, j} w[o, c, i, j] x_pad[n, G(o) ci + c, a s + i d, b s + j d]."""
    X = np.pad(mp_array(x), ((0, 0), (0, 0), (padding, padding), (padding, padding)),
               constant_values=mp_array(np.zeros(1))[0])
    W = mp_array(w)
    n, c_in = x.shape[:2]
    c_out, ci, kh, kw = w.shape
    co = c_out // groups
    h_out = (X.shape[2] - dilation * (kh - 1) - 1) // stride + 1
    w_out = (X.shape[3] - dilation * (kw - 1) - 1) // stride + 1
    Y = np.empty((n, c_out, h_out, w_out), dtype=object)
    for o in range(c_out):
        g = o // co
        for a in range(h_out):
            for b in range(w_out):
                patch = X[:, g * ci:(g + 1) * ci, a * stride:a * stride + dilation * (kh - 1) + 1:dilation,
                          b * stride:b * stride + dilation * (kw - 1) + 1:dilation]
                Y[:, o, a, b] = np.sum(patch * W[o], axis=(1, 2, 3))
    return Y


def mp_conv_bn(inputs, state, *, training, eps, **geo):
    """Train / Eval (= Tune) at 50 digits: BN's Alg. 1 (biased batch variance) or its running
    statistics, applied to T = conv(x, W) + b."""
    T = mp_conv(inputs["x"], inputs["weight"], **geo)
    if inputs.get("bias") is not None:
        T = T + mp_array(inputs["bias"]).reshape(1, -1, 1, 1)
    return mp_bn(T, inputs, state, training=training, eps=eps)


def mp_bn(T, inputs, state, *, training, eps):
    shape = (1, T.shape[1], 1, 1)
    if training:
        mean, var = mp_mean(T, (0, 2, 3)), mp_var(T, (0, 2, 3))
    else:
        mean, var = mp_array(state["running_mean"]).reshape(shape), mp_array(state["running_var"]).reshape(shape)
    Y = (T - mean) / mp_sqrt(var + mp_array(np.float64(eps)))
    if inputs.get("bn_weight") is not None:
        Y = Y * mp_array(inputs["bn_weight"]).reshape(shape)
    if inputs.get("bn_bias") is not None:
        Y = Y + mp_array(inputs["bn_bias"]).reshape(shape)
    return Y


def rounding_scale(inputs, state, eps, **geo):
    """|y|'s size with every term taken in absolute value, per element: c (|W| * |x| + |b| + |mu|)
    + |beta| (c = |gamma| / sqrt(var + eps)).  A backward-stable float64 evaluation of Eval, Tune
    or Deploy errs by at most (K + a few) u times this (Higham, Thm. 3.5 for each of the K-term
    sums, then a handful of correctly rounded operations)."""
    abs_in = {k: np.abs(v) for k, v in inputs.items()}
    t = conv2d(abs_in["x"], abs_in["weight"], geometry("t", abs_in["x"], abs_in["weight"], **geo))
    t = t + (abs_in["bias"].reshape(1, -1, 1, 1) if "bias" in abs_in else 0.0)
    if state is None:
        return t
    c = 1 / np.sqrt(state["running_var"] + eps) * abs_in.get("bn_weight", 1.0)
    t = (t + np.abs(state["running_mean"]).reshape(1, -1, 1, 1)) * c.reshape(1, -1, 1, 1)
    return t + (abs_in["bn_bias"].reshape(1, -1, 1, 1) if "bn_bias" in abs_in else 0.0)


# --- forward accuracy -------------------------------------------------------------------------

GEO = {"stride": 1, "padding": 1, "dilation": 1, "groups": 2}
EPS = 1e-5


@functools.cache
def _adversarial_block(family):
    """A grouped, padded block with x from ``family``, its 50-digit conv output T (each family's
    T is shared by the modes), and the Deploy parameters folded in float64."""
    rng = np.random.default_rng(sorted(ADVERSARIAL).index(family))
    inputs, state = block(rng, n=2, c_in=4, hw=(4, 4), c_out=4, groups=2)
    inputs["x"] = adversarial(family, inputs["x"].shape)
    T = mp_conv(inputs["x"], inputs["weight"], **GEO) + mp_array(inputs["bias"]).reshape(1, -1, 1, 1)
    folded = fold_conv_bn(inputs["weight"], inputs["bias"], inputs["bn_weight"], inputs["bn_bias"],
                          state["running_mean"], state["running_var"], EPS)
    return inputs, state, T, folded


@pytest.mark.parametrize("mode", ["train", "eval", "tune", "deploy"])
@pytest.mark.parametrize("family", sorted(ADVERSARIAL))
def test_forward_matches_mpmath_on_adversarial_data(family, mode):
    """Every mode against 50-digit values of its definition, x from each adversarial family.  The
    float64 conv itself rounds each output's K = 18 products, so the allowed error is that of a
    backward-stable conv carried through the mode's map: (K + 8) u times the absolute-value scale
    for the affine modes, and through BN's standardization (x_hat moves by at most
    (2 + max|x_hat|) |dt| / sigma for a perturbation dt of t) in Train.  Measured: at most 0.17 of
    the allowance (mixed scales, Deploy), 0.02 in Train."""
    inputs, state, T, (w_fold, b_fold) = _adversarial_block(family)
    hp = {**MODES[mode], **GEO, "eps": EPS}
    K = fan_in(inputs)
    if mode == "deploy":
        deployed = {"x": inputs["x"], "weight": w_fold, "bias": b_fold}
        out, _ = OP.apply(deployed, None, **hp)
        exact = mp_to_float(mp_conv(inputs["x"], w_fold, **GEO) + mp_array(b_fold).reshape(1, -1, 1, 1))
        allowed = (K + 8) * U64 * rounding_scale(deployed, None, EPS, **GEO)
    else:
        out, _ = OP.apply(inputs, state, **hp)
        exact = mp_to_float(mp_bn(T, inputs, state, training=hp["training"], eps=EPS))
        if hp["training"]:
            sigma = np.sqrt(mp_to_float(T).var(axis=(0, 2, 3)) + EPS)
            gamma = np.abs(inputs["bn_weight"])
            x_hat = np.max(np.abs(exact - inputs["bn_bias"].reshape(1, -1, 1, 1)) / gamma.reshape(1, -1, 1, 1))
            dt = (K + 8) * U64 * np.max(rounding_scale(inputs, None, EPS, **GEO), axis=(0, 2, 3))
            allowed = ((2 + x_hat) * gamma * dt / sigma).reshape(1, -1, 1, 1) + 16 * U64 * np.abs(exact)
        else:
            allowed = (K + 8) * U64 * rounding_scale(inputs, state, EPS, **GEO)
    assert np.all(np.isfinite(out["y"]))
    excess = np.max(np.abs(out["y"] - exact) / allowed)
    assert excess <= 1.0, f"{family} {mode}: error / allowed = {excess:.3g}"


def test_well_conditioned_forward_is_accurate_to_a_few_ulps():
    """On ordinary data every mode is within 1e-14 (normwise) of the 50-digit value."""
    inputs, state = block(RNG, n=2, c_in=2, hw=(4, 3), c_out=3, k=(2, 2))
    geo = {"stride": 1, "padding": 1, "dilation": 1, "groups": 1}
    for mode in ("train", "eval", "tune"):
        out, _ = OP.apply(inputs, state, **MODES[mode], **geo)
        exact = mp_to_float(mp_conv_bn(inputs, state, training=MODES[mode]["training"], eps=1e-5, **geo))
        assert np.max(np.abs(out["y"] - exact)) <= 1e-14 * np.max(np.abs(exact)), mode


# --- the paper's properties ---------------------------------------------------------------------

geometries = st.sampled_from([
    # (n, c_in, hw, c_out, k, stride, padding, dilation, groups)
    (2, 3, (5, 5), 4, (3, 3), 1, 1, 1, 1),
    (3, 4, (6, 5), 6, (3, 2), 2, 0, 1, 2),
    (2, 2, (7, 7), 4, (3, 3), 1, 2, 2, 1),
    (4, 3, (3, 3), 3, (1, 1), 1, 0, 1, 3),
    (1, 4, (6, 6), 2, (2, 2), 2, 1, 1, 2),
])


def _drawn(seed, geo, bias, affine):
    rng = np.random.default_rng(seed)
    n, c_in, hw, c_out, k, stride, padding, dilation, groups = geo
    inputs, state = block(rng, n=n, c_in=c_in, hw=hw, c_out=c_out, k=k, groups=groups, bias=bias,
                          affine=affine)
    hp = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups, "eps": 1e-3}
    dy = rng.standard_normal(geometry("t", inputs["x"], inputs["weight"], stride=stride, padding=padding,
                                      dilation=dilation, groups=groups).out_shape)
    return inputs, state, hp, dy


def absolute_terms(inputs, state, hp, dy):
    """Eval's outputs and gradients with every term made non-negative (|x|, |W|, |b|, |gamma|,
    |beta|, |dy|, and -|mu| so that t - mu = |t| + |mu|): each is then the sum of the absolute
    values of the terms its float64 evaluation adds up, elementwise, and an evaluation that rounds
    each of at most K + 8 operations in sequence errs by at most (K + 8) u times it."""
    abs_in = {k: np.abs(v) for k, v in inputs.items()}
    abs_state = {**state, "running_mean": -np.abs(state["running_mean"])}
    hp_eval = {**hp, **MODES["eval"]}
    out, _ = OP.apply(abs_in, abs_state, **hp_eval)
    return {"y": out["y"], **OP.vjp(abs_in, abs_state, {"y": np.abs(dy)}, **hp_eval)}


@pytest.mark.checks("tune_equals_eval_forward_and_parameter_gradients")
@given(seed=st.integers(0, 2**32 - 1), geo=geometries, bias=st.booleans(), affine=st.booleans())
def test_tune_equals_eval_forward_and_parameter_gradients(seed, geo, bias, affine):
    """The paper's claim: Tune computes Eval's function (conv then BN with running statistics) and
    Eval's gradients w.r.t. x, W, b, gamma, beta, as the same sums in another order: equal up to
    rounding, elementwise within (K + 8) u of the absolute terms."""
    inputs, state, hp, dy = _drawn(seed, geo, bias, affine)
    tune = {"y": OP.apply(inputs, state, **hp, **MODES["tune"])[0]["y"],
            **OP.vjp(inputs, state, {"y": dy}, **hp, **MODES["tune"])}
    evl = {"y": OP.apply(inputs, state, **hp, **MODES["eval"])[0]["y"],
           **OP.vjp(inputs, state, {"y": dy}, **hp, **MODES["eval"])}
    assert tune.keys() == evl.keys() == {"y", *inputs}
    scale = absolute_terms(inputs, state, hp, dy)
    K = fan_in(inputs)
    for key in evl:
        assert np.all(np.abs(tune[key] - evl[key]) <= (K + 8) * U64 * scale[key]), key
    # not vacuously: Eval and Tune differ in their last bits somewhere
    assert any(np.any(tune[key] != evl[key]) for key in evl)


def _fold(inputs, state, eps):
    return fold_conv_bn(inputs["weight"], inputs.get("bias"), inputs.get("bn_weight"), inputs.get("bn_bias"),
                        state["running_mean"], state["running_var"], eps)


@pytest.mark.checks("deploy_forward_equals_eval_on_folded_parameters")
@given(seed=st.integers(0, 2**32 - 1), geo=geometries, bias=st.booleans(), affine=st.booleans())
def test_deploy_forward_equals_eval_on_folded_parameters(seed, geo, bias, affine):
    """Deploy on (W', b') = fold(W, b, gamma, beta, mu, var) computes Eval's y, and so does its
    input gradient (the same linear map of x); training has no effect on a deployed block."""
    inputs, state, hp, dy = _drawn(seed, geo, bias, affine)
    w_fold, b_fold = _fold(inputs, state, hp["eps"])
    deployed = {"x": inputs["x"], "weight": w_fold, "bias": b_fold}
    y_deploy, no_state = OP.apply(deployed, None, **hp, **MODES["deploy"])
    assert no_state == {}
    y_eval, _ = OP.apply(inputs, state, **hp, **MODES["eval"])
    scale = absolute_terms(inputs, state, hp, dy)
    K = fan_in(inputs)
    assert np.all(np.abs(y_deploy["y"] - y_eval["y"]) <= (K + 8) * U64 * scale["y"])
    dx_deploy = OP.vjp(deployed, None, {"y": dy}, **hp, **MODES["deploy"])["x"]
    dx_eval = OP.vjp(inputs, state, {"y": dy}, **hp, **MODES["eval"])["x"]
    assert np.all(np.abs(dx_deploy - dx_eval) <= (K + 8) * U64 * scale["x"])
    y_training, _ = OP.apply(deployed, None, **hp, fold="deploy", training=True)
    np.testing.assert_array_equal(y_training["y"], y_deploy["y"])


@pytest.mark.checks("deploy_gradients_are_eval_gradients_through_the_fold")
@given(seed=st.integers(0, 2**32 - 1), geo=geometries)
def test_deploy_gradients_are_eval_gradients_through_the_fold(seed, geo):
    """Deploy's gradients are w.r.t. W' and b'; Eval's (= Tune's) are those pulled back through
    the fold's Jacobian: dW = c dW', db = c db', dbeta = db', dgamma = (<dW', W>_o + db' (b - mu)) r
    with r = 1 / sqrt(var + eps), c = gamma r.  They differ by the per-channel factor c (an SGD
    step moves W' by c^2 times more in Eval than in Deploy), so Deploy's gradients are not Eval's
    wherever c != 1."""
    inputs, state, hp, dy = _drawn(seed, geo, True, True)
    w_fold, b_fold = _fold(inputs, state, hp["eps"])
    deploy = OP.vjp({"x": inputs["x"], "weight": w_fold, "bias": b_fold}, None, {"y": dy}, **hp,
                    **MODES["deploy"])
    evl = OP.vjp(inputs, state, {"y": dy}, **hp, **MODES["eval"])
    r = 1 / np.sqrt(state["running_var"] + hp["eps"])
    c = inputs["bn_weight"] * r
    pulled = {
        "weight": deploy["weight"] * c.reshape(-1, 1, 1, 1),
        "bias": c * deploy["bias"],
        "bn_bias": deploy["bias"],
        "bn_weight": r * (np.sum(deploy["weight"] * inputs["weight"], axis=(1, 2, 3))
                          + deploy["bias"] * (inputs["bias"] - state["running_mean"])),
    }
    for key, value in pulled.items():
        np.testing.assert_allclose(evl[key], value, rtol=1e-12, atol=1e-12 * np.max(np.abs(value)),
                                   err_msg=key)
    assert np.max(np.abs(deploy["weight"] - evl["weight"])) > 1e-3 * np.max(np.abs(evl["weight"]))


@pytest.mark.checks("train_is_batch_norm_of_the_conv")
@given(seed=st.integers(0, 2**32 - 1), geo=geometries, training=st.booleans(),
       momentum=st.sampled_from([0.1, 0.7, None]))
def test_train_is_batch_norm_of_the_conv(seed, geo, training, momentum):
    """Train and Eval are batch_norm (torch conventions) of t = conv(x, W) + b: outputs, state
    and, through the conv's VJP, every gradient (the conv bias's is 0 in Train)."""
    inputs, state, hp, dy = _drawn(seed, geo, True, True)
    hp = {**hp, "momentum": momentum, "training": training, "fold": "none"}
    out, new_state = OP.apply(inputs, state, **hp)
    g = geometry("t", inputs["x"], inputs["weight"], stride=hp["stride"], padding=hp["padding"],
                 dilation=hp["dilation"], groups=hp["groups"])
    t = conv2d(inputs["x"], inputs["weight"], g) + inputs["bias"].reshape(1, -1, 1, 1)
    bn_in = {"x": t, "weight": inputs["bn_weight"], "bias": inputs["bn_bias"]}
    bn_hp = {"training": training, "eps": hp["eps"], "momentum": momentum}
    ref, ref_state = BN.apply(bn_in, state, **bn_hp)
    np.testing.assert_array_equal(out["y"], ref["y"])
    for key in ref_state:
        np.testing.assert_array_equal(new_state[key], ref_state[key])
    grads, bn_grads = OP.vjp(inputs, state, {"y": dy}, **hp), BN.vjp(bn_in, state, {"y": dy}, **bn_hp)
    dx, dw = conv2d_vjp(bn_grads["x"], inputs["x"], inputs["weight"], g)
    np.testing.assert_array_equal(grads["x"], dx)
    np.testing.assert_array_equal(grads["weight"], dw)
    np.testing.assert_array_equal(grads["bn_weight"], bn_grads["weight"])
    np.testing.assert_array_equal(grads["bn_bias"], bn_grads["bias"])
    expected_db = np.zeros(len(inputs["bias"])) if training else bn_grads["x"].sum(axis=(0, 2, 3))
    np.testing.assert_array_equal(grads["bias"], expected_db)


@pytest.mark.checks("training_ignores_the_fold")
@given(seed=st.integers(0, 2**32 - 1), geo=geometries)
def test_training_ignores_the_fold(seed, geo):
    """The official code folds only while the BN is in eval mode: with training=True, fold='tune'
    is the Train mode bit for bit (outputs, state, gradients)."""
    inputs, state, hp, dy = _drawn(seed, geo, True, True)
    a, sa = OP.apply(inputs, state, **hp, training=True, fold="tune")
    b, sb = OP.apply(inputs, state, **hp, training=True, fold="none")
    np.testing.assert_array_equal(a["y"], b["y"])
    for key in sa:
        np.testing.assert_array_equal(sa[key], sb[key])
    ga = OP.vjp(inputs, state, {"y": dy}, **hp, training=True, fold="tune")
    gb = OP.vjp(inputs, state, {"y": dy}, **hp, training=True, fold="none")
    for key in gb:
        np.testing.assert_array_equal(ga[key], gb[key])


@pytest.mark.checks("conv_matches_its_definition")
@given(seed=st.integers(0, 2**32 - 1), geo=geometries)
def test_conv_matches_its_definition(seed, geo):
    """The im2col conv against the definition summed at 50 digits (every output within K u of the
    absolute terms), and its VJPs as the adjoints of the bilinear map: <dy, conv(dx_dir, W)> =
    <conv_vjp_x(dy), dx_dir> and <dy, conv(x, dW_dir)> = <conv_vjp_W(dy), dW_dir>."""
    inputs, _, hp, dy = _drawn(seed, geo, False, False)
    x, w = inputs["x"], inputs["weight"]
    conv_hp = {k: hp[k] for k in ("stride", "padding", "dilation", "groups")}
    g = geometry("t", x, w, **conv_hp)
    exact = mp_to_float(mp_conv(x, w, **conv_hp))
    y = conv2d(x, w, g)
    K = fan_in(inputs)
    assert np.all(np.abs(y - exact) <= K * U64 * conv2d(np.abs(x), np.abs(w), g))
    dx, dw = conv2d_vjp(dy, x, w, g)
    rng = np.random.default_rng(seed)
    vx, vw = rng.standard_normal(x.shape), rng.standard_normal(w.shape)
    for lhs, rhs in ((np.vdot(dy, conv2d(vx, w, g)), np.vdot(dx, vx)),
                     (np.vdot(dy, conv2d(x, vw, g)), np.vdot(dw, vw))):
        assert abs(lhs - rhs) <= 1e-13 * (abs(lhs) + np.sum(np.abs(dy)) * np.max(np.abs(dx)) + 1)


@pytest.mark.checks("conv_bias_gradient_vanishes_in_train")
def test_conv_bias_gradient_vanishes_in_train():
    """With batch statistics BN removes any per-channel shift of t, so y does not depend on the
    conv bias: y(b + 0.5) == y(b) to rounding, the oracle's gradient is exactly 0, and torch's
    autograd (Conv2d + BatchNorm2d) returns only the rounding noise of its cancelling sum."""
    inputs, state = block(RNG, n=3, c_in=2, hw=(4, 4), c_out=3, k=(3, 3))
    hp = {"padding": 1, **MODES["train"]}
    y0 = OP.apply(inputs, state, **hp)[0]["y"]
    y1 = OP.apply({**inputs, "bias": inputs["bias"] + 0.5}, state, **hp)[0]["y"]
    np.testing.assert_allclose(y1, y0, rtol=0, atol=1e-13)
    dy = RNG.standard_normal(y0.shape)
    db = OP.vjp(inputs, state, {"y": dy}, **hp)["bias"]
    np.testing.assert_array_equal(db, np.zeros(3))
    torch = torch_or_skip()
    conv, bn = _torch_block(torch, inputs, state, padding=1)
    bn.train()
    tb = torch.autograd.grad(bn(conv(t64(inputs["x"]))), conv.bias, t64(dy))[0].numpy()
    assert 0 < np.max(np.abs(tb)) < 1e-13 * np.sum(np.abs(dy))


@pytest.mark.checks("half_precision_fold_error_is_one_rounding")
def test_half_precision_fold_error_is_one_rounding():
    """Folding in float16 (the inputs float16 values, each of rsqrt, gamma r, W c, b - mu, c (b - mu),
    beta + ... rounded to float16, as torch's float16 fold computes) against the float64 fold of
    the same values: W' errs by at most 5 roundings (relative 5 u16 = 2.4e-3 to first order: r =
    1 / sqrt(v + eps) is three, then gamma r and W c), b' by 7 roundings of its terms' size (c's
    four, b - mu, the product, the sum); the Tune output computed
    from them (float32 accumulation, one rounding to float16) stays within (K + 8) u16 of the
    absolute terms.  Measured over 20 seeds of this block (K = 72): W' 2.95 u16, b' 2.5 u16
    (normwise), y 1.0e-3 normwise relative, against 6.6e-4 for Eval in float16 (conv rounded to
    float16, BN in float32) and 5.7e-4 for W', b' folded in float32 and stored once in float16."""
    rng = np.random.default_rng(7)
    inputs, state = block(rng, n=4, c_in=8, hw=(6, 6), c_out=16, k=(3, 3))
    state["running_var"] = rng.uniform(0.05, 20.0, 16)
    h = {k: v.astype(np.float16) for k, v in {**inputs, **state}.items()}
    exact = {k: v.astype(np.float64) for k, v in h.items()}
    eps = 1e-5
    r16 = (np.float16(1) / np.sqrt(h["running_var"] + np.float16(eps))).astype(np.float16)
    c16 = h["bn_weight"] * r16
    w16 = h["weight"] * c16.reshape(-1, 1, 1, 1)
    b16 = h["bn_bias"] + c16 * (h["bias"] - h["running_mean"])
    w64, b64 = fold_conv_bn(exact["weight"], exact["bias"], exact["bn_weight"], exact["bn_bias"],
                            exact["running_mean"], exact["running_var"], eps)
    w_err = np.max(np.abs(w16 - w64) / np.abs(w64))
    assert w_err <= 5.01 * U16
    b_terms = np.abs(exact["bn_bias"]) + np.abs(c16.astype(np.float64)) * (np.abs(exact["bias"])
                                                                          + np.abs(exact["running_mean"]))
    assert np.all(np.abs(b16 - b64) <= 7.01 * U16 * b_terms)
    hp = {"padding": 1, **MODES["tune"], "eps": eps}
    y_exact = OP.apply({k: exact[k] for k in inputs}, {k: exact[k] for k in state}, **hp)[0]["y"]
    g = geometry("t", exact["x"], w64, stride=1, padding=1, dilation=1, groups=1)
    y_tune16 = (conv2d(exact["x"].astype(np.float32), w16.astype(np.float32), g)
                + b16.astype(np.float32).reshape(1, -1, 1, 1)).astype(np.float16)
    K = fan_in(inputs)
    scale = rounding_scale({k: exact[k] for k in inputs}, {k: exact[k] for k in state}, eps, padding=1,
                           stride=1, dilation=1, groups=1)
    assert np.all(np.abs(y_tune16 - y_exact) <= (K + 8) * U16 * scale)


# --- PyTorch (float64) -------------------------------------------------------------------------


def _torch_block(torch, inputs, state, *, stride=1, padding=0, dilation=1, groups=1, eps=1e-5,
                 momentum=0.1):
    """nn.Conv2d and nn.BatchNorm2d (float64) holding the block's parameters and running stats."""
    w = inputs["weight"]
    conv = torch.nn.Conv2d(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=stride,
                           padding=padding, dilation=dilation, groups=groups,
                           bias=inputs.get("bias") is not None, dtype=torch.float64)
    bn = torch.nn.BatchNorm2d(w.shape[0], eps=eps, momentum=momentum, affine="bn_weight" in inputs,
                              dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(t64(w))
        if conv.bias is not None:
            conv.bias.copy_(t64(inputs["bias"]))
        if bn.affine:
            bn.weight.copy_(t64(inputs["bn_weight"]))
            bn.bias.copy_(t64(inputs["bn_bias"]))
        bn.running_mean.copy_(t64(state["running_mean"]))
        bn.running_var.copy_(t64(state["running_var"]))
        bn.num_batches_tracked.fill_(int(state["num_batches_tracked"]))
    return conv, bn


def _leaves(conv, bn, tx):
    return {"x": tx, "weight": conv.weight, "bias": conv.bias, "bn_weight": bn.weight, "bn_bias": bn.bias}


def _max_rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize(("geo", "bias"), [({"padding": 1}, True), ({"stride": 2, "dilation": 2, "padding": 2}, False),
                                           ({"groups": 2, "stride": 2}, True)])
def test_matches_torch_conv2d_then_batchnorm2d(geo, bias):
    """nn.Conv2d + nn.BatchNorm2d over train, train, eval, train steps: outputs, autograd
    gradients, running statistics and the batch count (max relative error 6e-16 measured)."""
    torch = torch_or_skip()
    groups = geo.get("groups", 1)
    inputs, state = block(RNG, n=3, c_in=4, hw=(7, 6), c_out=6, groups=groups, bias=bias)
    state = {"running_mean": np.zeros(6), "running_var": np.ones(6), "num_batches_tracked": np.float64(0)}
    conv, bn = _torch_block(torch, inputs, state, **geo)
    for step, training in enumerate((True, True, False, True)):
        x = RNG.standard_normal(inputs["x"].shape) * (step + 1) + step
        inputs = {**inputs, "x": x}
        bn.train(training)
        tx = t64(x, True)
        ty = bn(conv(tx))
        hp = {**geo, "training": training, "fold": "none"}
        out, new_state = OP.apply(inputs, state, **hp)
        dy = RNG.standard_normal(out["y"].shape)
        grads = OP.vjp(inputs, state, {"y": dy}, **hp)
        state = new_state
        assert _max_rel(out["y"], ty.detach().numpy()) <= 1e-14
        expected = torch_vjp(ty, _leaves(conv, bn, tx), dy)
        for key in expected:
            if key == "bias" and training:   # torch: the noise of a cancelling sum; the oracle: 0
                assert np.max(np.abs(expected[key])) <= 1e-13 * np.sum(np.abs(dy))
                continue
            assert _max_rel(grads[key], expected[key]) <= 1e-13, key
        np.testing.assert_allclose(state["running_mean"], bn.running_mean.numpy(), rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(state["running_var"], bn.running_var.numpy(), rtol=1e-13)
        assert int(state["num_batches_tracked"]) == int(bn.num_batches_tracked)


@pytest.mark.parametrize(("bias", "affine"), [(True, True), (False, True), (True, False)])
def test_tune_matches_torch_inductor_efficient_conv_bn_eval(bias, affine):
    """torch Inductor's efficient_conv_bn_eval(bn, conv, x) (the mmcv / official formula): y and
    the autograd gradients through its on-the-fly fold, against Tune (and, to rounding, Eval)."""
    torch = torch_or_skip()
    from torch._inductor.fx_passes.efficient_conv_bn_eval import efficient_conv_bn_eval

    inputs, state = block(RNG, n=2, c_in=3, hw=(6, 5), c_out=4, bias=bias, affine=affine)
    conv, bn = _torch_block(torch, inputs, state, padding=1, stride=2)
    bn.eval()
    tx = t64(inputs["x"], True)
    ty = efficient_conv_bn_eval(bn, conv, tx)
    hp = {"padding": 1, "stride": 2, **MODES["tune"]}
    out, _ = OP.apply(inputs, state, **hp)
    assert _max_rel(out["y"], ty.detach().numpy()) <= 1e-14
    dy = RNG.standard_normal(out["y"].shape)
    grads = OP.vjp(inputs, state, {"y": dy}, **hp)
    expected = torch_vjp(ty, _leaves(conv, bn, tx), dy)
    assert expected.keys() == grads.keys()
    for key in expected:
        assert _max_rel(grads[key], expected[key]) <= 1e-13, key


def test_fold_matches_torch_fuse_conv_bn_weights_and_deploy_matches_the_fused_conv():
    """fold_conv_bn against torch.nn.utils.fusion.fuse_conv_bn_weights (and fuse_conv_bn_eval's
    module), and Deploy against the fused nn.Conv2d: y and its gradients w.r.t. the fused
    weight and bias, which are new leaves (no gradient reaches the unfolded parameters)."""
    torch = torch_or_skip()
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_conv_bn_weights

    for bias, affine in ((True, True), (False, True), (True, False)):
        inputs, state = block(RNG, n=2, c_in=4, hw=(5, 5), c_out=6, groups=2, bias=bias, affine=affine)
        conv, bn = _torch_block(torch, inputs, state, padding=1, groups=2)
        w_fold, b_fold = _fold(inputs, state, 1e-5)
        tw, tb = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                      bn.weight, bn.bias)
        assert _max_rel(w_fold, tw.detach().numpy()) <= 4 * U64
        assert np.all(np.abs(b_fold - tb.detach().numpy()) <= 8 * U64 * (np.abs(b_fold) + np.abs(
            state["running_mean"]) * np.abs(w_fold).max()))
        fused = fuse_conv_bn_eval(conv.eval(), bn.eval())
        assert fused.weight.is_leaf and fused.weight.grad_fn is None
        tx = t64(inputs["x"], True)
        ty = fused(tx)
        deployed = {"x": inputs["x"], "weight": fused.weight.detach().numpy(), "bias": fused.bias.detach().numpy()}
        hp = {"padding": 1, "groups": 2, **MODES["deploy"]}
        out, _ = OP.apply(deployed, None, **hp)
        assert _max_rel(out["y"], ty.detach().numpy()) <= 1e-14
        dy = RNG.standard_normal(out["y"].shape)
        grads = OP.vjp(deployed, None, {"y": dy}, **hp)
        expected = torch_vjp(ty, {"x": tx, "weight": fused.weight, "bias": fused.bias}, dy)
        for key in expected:
            assert _max_rel(grads[key], expected[key]) <= 1e-13, key


# --- the harness on mutants (default profile, seed 0) --------------------------------------------


class _StaleFoldVariance(Mutant):
    """Tune mode folding with the running variance from before the last training update: a fold
    cached at the start of a training step (from the statistics the step receives) and reused,
    not refreshed, when the block switches to eval."""

    op = "conv_bn"

    def __init__(self) -> None:
        self.cached = None

    def forward(self, a, hp):
        if hp["training"] or hp["fold"] != "tune":
            if hp["training"] and "running_var" in a:
                self.cached = np.copy(a["running_var"])
            return self.oracle(a, hp)
        out, _ = self.oracle({**a, "running_var": self.cached}, hp)
        return out, {k: a[k] for k in ("running_mean", "running_var", "num_batches_tracked")}

    def backward(self, ct, a, hp):
        if hp["training"] or hp["fold"] != "tune":
            return self.oracle_vjp(ct, a, hp)
        return self.oracle_vjp(ct, {**a, "running_var": self.cached}, hp)


class _FoldForgetsConvBias(Mutant):
    """Tune mode's folded bias without the conv bias, b' = beta - c mu (fusion code written for
    the usual bias-free conv before a BN): forward and autograd-consistent backward."""

    op = "conv_bn"

    def _tune(self, hp):
        return not hp["training"] and hp["fold"] == "tune"

    def forward(self, a, hp):
        if not self._tune(hp) or "bias" not in a:
            return self.oracle(a, hp)
        return self.oracle({k: v for k, v in a.items() if k != "bias"}, hp)

    def backward(self, ct, a, hp):
        if not self._tune(hp) or "bias" not in a:
            return self.oracle_vjp(ct, a, hp)
        grads = self.oracle_vjp(ct, {k: v for k, v in a.items() if k != "bias"}, hp)
        return {**grads, "bias": np.zeros_like(a["bias"])}


class _FoldWithoutBias(Mutant):
    """Tune mode folding only the weight: conv(x, W') without b' (the folded bias term dropped);
    the backward is the oracle's (the bug sits in the forward kernel)."""

    op = "conv_bn"

    def forward(self, a, hp):
        if hp["training"] or hp["fold"] != "tune":
            return self.oracle(a, hp)
        g = geometry("t", a["x"], a["weight"], **{k: hp[k] for k in ("stride", "padding", "dilation", "groups")})
        w_fold, _ = fold_conv_bn(a["weight"], a.get("bias"), a.get("bn_weight"), a.get("bn_bias"),
                                 a["running_mean"], a["running_var"], hp["eps"])
        return {"y": conv2d(a["x"], w_fold, g)}, {k: a[k] for k in ("running_mean", "running_var",
                                                                     "num_batches_tracked")}


@pytest.mark.xdist_group("conv_bn")
@pytest.mark.parametrize("mutant", [_StaleFoldVariance, _FoldForgetsConvBias, _FoldWithoutBias],
                         ids=lambda m: m.__name__)
def test_fold_mutants_are_flagged_by_the_default_profile(mutant):
    flagged, results = flagged_cases(mutant())
    assert flagged >= MIN_FLAGGED, verdict_table(results)


@pytest.mark.xdist_group("conv_bn")
def test_the_unmutated_control_passes():
    results = flagged_cases(Control("conv_bn"))[1]
    assert not [r for r in results if r.verdict in ("FAIL", "ERROR")], verdict_table(results)
