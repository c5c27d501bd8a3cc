"""RMSprop (reference/optimizers/rmsprop.py): invariants, torch/optax trajectories, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optim_helpers as oh
import reference
from reference.optimizers import rmsprop

SHAPES = oh.SHAPES_NO_BN_BIAS
MASK = {p: len(s) >= 2 for p, s in SHAPES.items()}  # "ndim>=2"


# ------------------------------------------------------------------------------------------
# Invariants (hypothesis)
# ------------------------------------------------------------------------------------------

seeds = st.integers(0, 2**31 - 1)
alphas = st.floats(0.0, 0.999)


@settings(max_examples=30)
@given(seed=seeds, alpha=alphas, s0=st.sampled_from([0.0, 1.0]), centered=st.booleans())
def test_square_avg_is_closed_form_ema(seed, alpha, s0, centered):
    """s_T = alpha^T s_0 + (1 - alpha) sum_i alpha^(T-i) g_i^2 (and gbar likewise from 0)."""
    rng = np.random.default_rng(seed)
    seq = oh.gradients(seed, 6, SHAPES)
    state = oh.trajectory(rmsprop, oh.tree(rng, SHAPES), seq, alpha=alpha, initial_accumulator_value=s0,
                          centered=centered)[-1][1]
    T = len(seq)
    for p in SHAPES:
        s = alpha**T * s0 + (1 - alpha) * sum(alpha ** (T - i) * seq[i - 1][p] ** 2
                                              for i in range(1, T + 1))
        np.testing.assert_allclose(state["square_avg"][p], s, rtol=1e-13)
        if centered:
            m = (1 - alpha) * sum(alpha ** (T - i) * seq[i - 1][p] for i in range(1, T + 1))
            np.testing.assert_allclose(state["grad_avg"][p], m, rtol=1e-10,
                                       atol=1e-13 * float(np.max(np.abs(seq[-1][p]))))
    assert set(state) == ({"step", "square_avg", "grad_avg"} if centered else {"step", "square_avg"})


@settings(max_examples=20)
@given(seed=seeds, lr=st.floats(1e-4, 1.0))
def test_alpha0_is_sign_like(seed, lr):
    """alpha = 0, eps = 0: s = g^2, so every step is w - lr sign(g)."""
    rng = np.random.default_rng(seed)
    params = oh.tree(rng, SHAPES)
    seq = oh.gradients(seed, 3, SHAPES)
    trace = oh.trajectory(rmsprop, params, seq, lr=lr, alpha=0.0, eps=0.0)
    w = params
    for (w_new, _), g in zip(trace, seq, strict=True):
        for p in SHAPES:
            np.testing.assert_allclose(w_new[p], w[p] - lr * np.sign(g[p]), rtol=1e-14, atol=1e-15)
        w = w_new


@settings(max_examples=30)
@given(seed=seeds, alpha=alphas, s0=st.sampled_from([0.0, 1.0]), bias=st.booleans())
def test_centered_variance_nonnegative(seed, alpha, s0, bias):
    """s_t - gbar_t^2 >= 0 (Cauchy-Schwarz over the EMA weights), bias-corrected or not."""
    rng = np.random.default_rng(seed)
    seq = oh.gradients(seed, 5, SHAPES)
    for t, (w, state) in enumerate(oh.trajectory(rmsprop, oh.tree(rng, SHAPES), seq, alpha=alpha,
                                                 initial_accumulator_value=s0, centered=True,
                                                 bias_correction=bias), start=1):
        bc = 1 - alpha**t if bias else 1.0
        for p in SHAPES:
            s, m = state["square_avg"][p] / bc, state["grad_avg"][p] / bc
            assert np.all(s - m * m >= -1e-13 * s)
            assert np.all(np.isfinite(w[p]))


@settings(max_examples=20)
@given(seed=seeds, centered=st.booleans(), momentum=st.sampled_from([0.0, 0.9]))
def test_eps_inside_equals_outside_at_eps0(seed, centered, momentum):
    rng = np.random.default_rng(seed)
    params = oh.tree(rng, SHAPES)
    seq = oh.gradients(seed, 4, SHAPES)
    hp = dict(eps=0.0, alpha=0.9, centered=centered, momentum=momentum)
    a = oh.trajectory(rmsprop, params, seq, eps_placement="outside", **hp)
    b = oh.trajectory(rmsprop, params, seq, eps_placement="inside", **hp)
    for (w_a, _), (w_b, _) in zip(a, b, strict=True):
        assert oh.rel(w_b, w_a) == 0.0


@settings(max_examples=20)
@given(seed=seeds, lr=st.floats(1e-3, 0.1), nesterov=st.booleans(), centered=st.booleans())
def test_lr_inside_equals_outside_constant_lr(seed, lr, nesterov, centered):
    """Constant lr: the same trajectory, with buffers b_inside = lr b_outside."""
    rng = np.random.default_rng(seed)
    params = oh.tree(rng, SHAPES)
    seq = oh.gradients(seed, 6, SHAPES)
    hp = dict(lr=lr, momentum=0.9, nesterov=nesterov, centered=centered, weight_decay=0.01,
              weight_decay_mask="ndim>=2")
    out = oh.trajectory(rmsprop, params, seq, lr_placement="outside", **hp)
    ins = oh.trajectory(rmsprop, params, seq, lr_placement="inside", **hp)
    for (w_o, s_o), (w_i, s_i) in zip(out, ins, strict=True):
        assert oh.rel(w_i, w_o) < 1e-13
        scaled = {p: lr * b for p, b in s_o["momentum_buffer"].items()}
        assert oh.rel(s_i["momentum_buffer"], scaled) < 1e-13


def test_lr_inside_differs_after_change():
    rng = np.random.default_rng(5)
    params = oh.tree(rng, SHAPES)
    seq = oh.gradients(5, 4, SHAPES)
    lrs = [0.1, 0.1, 0.01, 0.01]
    out = oh.trajectory(rmsprop, params, seq, lrs=lrs, momentum=0.9, lr_placement="outside")
    ins = oh.trajectory(rmsprop, params, seq, lrs=lrs, momentum=0.9, lr_placement="inside")
    assert oh.rel(ins[1][0], out[1][0]) < 1e-13
    assert oh.rel(ins[2][0], out[2][0]) > 1e-3  # the inside buffer still carries 0.1


@settings(max_examples=20)
@given(seed=seeds, centered=st.booleans(), bias=st.booleans(),
       eps_placement=st.sampled_from(["outside", "inside"]))
def test_momentum0_has_no_buffer(seed, centered, bias, eps_placement):
    """momentum = 0: no momentum_buffer slot, at init or after any step; with no buffer nothing
    carries an old lr, so lr inside and outside it are the same trajectory bit for bit, lr
    changes included (with a buffer they part ways: test_lr_inside_differs_after_change)."""
    rng = np.random.default_rng(seed)
    params = oh.tree(rng, SHAPES)
    seq = oh.gradients(seed, 4, SHAPES)
    lrs = [0.1, 0.1, 0.01, 0.03]
    hp = dict(momentum=0.0, centered=centered, bias_correction=bias, eps_placement=eps_placement)
    slots = {"step", "square_avg", "grad_avg"} if centered else {"step", "square_avg"}
    assert set(rmsprop.init(params, **hp)) == slots
    out = oh.trajectory(rmsprop, params, seq, lrs=lrs, lr_placement="outside", **hp)
    ins = oh.trajectory(rmsprop, params, seq, lrs=lrs, lr_placement="inside", **hp)
    for (w_o, s_o), (w_i, s_i) in zip(out, ins, strict=True):
        assert set(s_o) == set(s_i) == slots
        for p in SHAPES:
            np.testing.assert_array_equal(w_i[p], w_o[p])


def test_momentum0_has_no_buffer_at_init():
    # (nesterov without momentum is rejected: error case nesterov_without_momentum in the spec)
    params = {"w": np.ones((2, 3))}
    assert set(rmsprop.init(params)) == {"step", "square_avg"}
    assert set(rmsprop.init(params, momentum=0.5, centered=True)) == {
        "step", "square_avg", "grad_avg", "momentum_buffer"}


def test_raw_function_keeps_float32():
    rng = np.random.default_rng(0)
    params = oh.as_float32(oh.tree(rng, SHAPES))
    grads = oh.as_float32(oh.tree(rng, SHAPES))
    hp = reference.get("rmsprop").spec.resolve({"centered": True, "momentum": 0.9,
                                                 "bias_correction": True})
    state = rmsprop.init.__wrapped__(params, **hp)
    new, state = rmsprop.step.__wrapped__(params, grads, state, **hp)
    assert all(v.dtype == np.float32 for v in new.values())
    for slot in ("square_avg", "grad_avg", "momentum_buffer"):
        assert all(v.dtype == np.float32 for v in state[slot].values())


# ------------------------------------------------------------------------------------------
# Framework trajectories (float64)
# ------------------------------------------------------------------------------------------

STEPS = 12
LRS = [1e-2] * 6 + [3e-3] * 6  # a mid-run lr change


@pytest.mark.parametrize("centered,momentum", [(False, 0.0), (True, 0.0), (False, 0.9),
                                               (True, 0.8)])
def test_torch_trajectory(centered, momentum):
    torch = pytest.importorskip("torch")
    params = oh.tree(np.random.default_rng(1), SHAPES)
    seq = oh.gradients(1, STEPS, SHAPES)
    hp = dict(reference.get("rmsprop").dialect("torch"), alpha=0.95, eps=1e-6, centered=centered,
              momentum=momentum, weight_decay=0.02, weight_decay_mask="ndim>=2")
    hp.pop("lr")
    tensors = oh.torch_tensors(params)
    opt = torch.optim.RMSprop(oh.decay_groups(tensors, 0.02), lr=LRS[0], alpha=0.95, eps=1e-6,
                              centered=centered, momentum=momentum, foreach=False)
    trace = oh.trajectory(rmsprop, params, seq, lrs=LRS, **hp)
    slots = tuple(slot for slot in trace[0][1] if slot != "step")
    for (w, state), (w_ref, s_ref) in zip(oh.torch_steps(opt, tensors, seq, LRS, slots), trace, strict=True):
        assert oh.rel(w, w_ref) < 1e-12
        for slot in slots:
            assert oh.rel(state[slot], s_ref[slot]) < 1e-12, slot


OPTAX_VARIANTS = [
    # (optax.rmsprop keywords, oracle overrides)
    (dict(eps_in_sqrt=True), {}),
    (dict(eps_in_sqrt=False, centered=True), dict(eps_placement="outside", centered=True)),
    (dict(momentum=0.9), dict(momentum=0.9)),
    (dict(momentum=0.9, nesterov=True, centered=True),
     dict(momentum=0.9, nesterov=True, centered=True)),
    (dict(momentum=0.9, bias_correction=True), dict(momentum=0.9, bias_correction=True)),
    # bias-corrected and centered, the variance estimate of step 1 is exactly 0 (one sample):
    # its rounding noise ~1e-16 g^2 is amplified by g^2 / eps, so eps must not be tiny here
    (dict(bias_correction=True, centered=True, eps=0.1),
     dict(bias_correction=True, centered=True, eps=0.1)),
    # the TF1 / timm RMSpropTF form: s_0 = 1, eps inside, lr inside the buffer
    (dict(initial_scale=1.0, momentum=0.9, eps=1e-10), dict(initial_accumulator_value=1.0,
                                                            momentum=0.9, eps=1e-10)),
]


@pytest.mark.parametrize("kwargs,overrides", OPTAX_VARIANTS)
def test_optax_trajectory(kwargs, overrides):
    _, optax = oh.optax_x64()
    params = oh.tree(np.random.default_rng(2), SHAPES)
    seq = oh.gradients(2, STEPS, SHAPES)
    tx = optax.chain(optax.add_decayed_weights(0.02, mask=MASK),
                     optax.rmsprop(oh.optax_schedule(LRS), **{"decay": 0.9, "eps": 1e-6, **kwargs}))
    hp = {**reference.get("rmsprop").dialect("optax"), "eps": 1e-6, "weight_decay": 0.02,
          "weight_decay_mask": "ndim>=2", **overrides}
    hp.pop("lr")
    trace = oh.trajectory(rmsprop, params, seq, lrs=LRS, **hp)
    for (w, state), (w_ref, s_ref) in zip(oh.optax_steps(tx, params, seq, jit=True), trace, strict=True):
        assert oh.rel(w, w_ref) < 1e-12
        rms_state = state[1][0]
        assert oh.rel(rms_state.nu, s_ref["square_avg"]) < 1e-12
        if hp["centered"]:
            assert oh.rel(rms_state.mu, s_ref["grad_avg"]) < 1e-12
        if hp["momentum"]:
            trace_state = state[1][2].trace  # after scale_by_learning_rate: holds -b
            assert oh.rel({p: -np.asarray(v) for p, v in trace_state.items()},
                          s_ref["momentum_buffer"]) < 1e-12


# ------------------------------------------------------------------------------------------
# Bad input and the harness form
# ------------------------------------------------------------------------------------------


def test_harness_form():
    op = reference.get("rmsprop")
    hp = op.spec.resolve({"momentum": 0.9, "centered": True}, dialect="tf1")
    inputs, state = oh.check_harness_form(op, None, **hp)
    assert set(state) == {"step", *(f"{s}/fc/{p}" for s in ("square_avg", "grad_avg",
                                                             "momentum_buffer")
                                    for p in ("weight", "bias"))}
    # s_0 = 1 (TF1): one step from init
    g = inputs["grads/fc/bias"]
    np.testing.assert_allclose(state["square_avg/fc/bias"], 0.9 + 0.1 * g * g, rtol=1e-15)
