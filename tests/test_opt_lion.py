"""Lion (reference/optimizers/lion.py): invariants, optax/pytorch_optimizer trajectories, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optim_helpers as oh
import reference
from reference.optimizers import lion

SHAPES = oh.SHAPES_NO_BN_BIAS
STEPS = 12
LRS = [1e-2] * 6 + [3e-3] * 6  # a mid-run lr change


# ------------------------------------------------------------------------------------------
# Invariants (hypothesis)
# ------------------------------------------------------------------------------------------

seeds = st.integers(0, 2**31 - 1)


@settings(max_examples=30)
@given(seed=seeds, k=st.integers(3, 12), beta1=st.sampled_from([0.0, 0.5, 0.9]),
       sparse=st.booleans())
def test_lambda0_moves_every_coordinate_by_lr_or_0(seed, k, beta1, sparse):
    """lambda = 0: |w_{t+1} - w_t| is exactly lr or 0 (dyadic weights and lr = 2^-k make the
    subtraction exact); 0 exactly where the interpolation c is 0."""
    rng = np.random.default_rng(seed)
    lr = 2.0**-k
    params = {p: np.round(rng.standard_normal(s) * 64) / 64 for p, s in SHAPES.items()}
    seq = oh.gradients(seed, 4, SHAPES)
    if sparse:
        seq = [{p: np.where(rng.random(g.shape) < 0.5, 0.0, g) for p, g in gs.items()} for gs in seq]
    state = lion.init(params)
    for g in seq:
        new, state_new = lion.step(params, g, state, lr=lr, beta1=beta1)
        for p in params:
            delta = np.abs(new[p] - params[p])
            c = beta1 * state["exp_avg"][p] + (1 - beta1) * g[p]
            assert np.all((delta == lr) | (delta == 0.0))
            np.testing.assert_array_equal(delta == 0.0, c == 0.0)
        params, state = new, state_new


@settings(max_examples=30)
@given(seed=seeds, e=st.integers(-30, 30), wd=st.sampled_from([0.0, 0.1]),
       mode=st.sampled_from(["decoupled_lr", "decoupled_nolr"]))
def test_invariant_to_positive_gradient_scale(seed, e, wd, mode):
    """g -> c g with c > 0 leaves the parameters unchanged (sign is scale-free; the momentum
    scales by c).  c = 2^e keeps the scaling exact, so the trajectories agree bit for bit."""
    rng = np.random.default_rng(seed)
    params = oh.tree(rng, SHAPES)
    seq = oh.gradients(seed, 6, SHAPES)
    c = 2.0**e
    hp = dict(beta1=0.8, beta2=0.95, weight_decay=wd, weight_decay_mode=mode)
    a = oh.trajectory(lion, params, seq, lrs=[1e-2] * 6, **hp)
    b = oh.trajectory(lion, params, [{p: c * g for p, g in gs.items()} for gs in seq], lrs=[1e-2] * 6,
                      **hp)
    for (w_a, s_a), (w_b, s_b) in zip(a, b, strict=True):
        for p in SHAPES:
            np.testing.assert_array_equal(w_a[p], w_b[p])
            np.testing.assert_array_equal(c * s_a["exp_avg"][p], s_b["exp_avg"][p])


@pytest.mark.checks("sign_of_zero_is_zero", "decay_forms_official_and_optax_agree")
@settings(max_examples=20)
@given(seed=seeds, wd=st.floats(0.0, 0.5), lr=st.floats(1e-4, 1e-1))
def test_sign_of_zero_is_zero_and_decay_forms_agree(seed, wd, lr):
    """A zero gradient from a zero momentum moves only by the decay; the official form
    w (1 - lr lambda) - lr sign(c) equals optax's w - lr (sign(c) + lambda w) to rounding."""
    rng = np.random.default_rng(seed)
    params = oh.tree(rng, SHAPES)
    zeros = {p: np.zeros(s) for p, s in SHAPES.items()}
    new, _ = lion.step(params, zeros, lion.init(params), lr=lr, weight_decay=wd)
    for p in SHAPES:
        np.testing.assert_allclose(new[p], params[p] * (1 - lr * wd), rtol=1e-15, atol=0)
    g = oh.gradients(seed, 1, SHAPES)[0]
    state = {"step": np.asarray(3.0), "exp_avg": oh.tree(rng, SHAPES, 0.3)}
    new, _ = lion.step(params, g, state, lr=lr, weight_decay=wd)
    for p in SHAPES:
        s = np.sign(0.9 * state["exp_avg"][p] + 0.1 * g[p])
        official = params[p] * (1 - lr * wd) - lr * s
        optax_form = params[p] - lr * (s + wd * params[p])
        scale = np.max(np.abs(params[p])) + lr
        assert np.max(np.abs(new[p] - official)) <= 4e-16 * scale
        assert np.max(np.abs(new[p] - optax_form)) <= 4e-16 * scale


def test_raw_function_keeps_float32():
    rng = np.random.default_rng(0)
    params = oh.as_float32(oh.tree(rng, SHAPES))
    grads = oh.as_float32(oh.tree(rng, SHAPES))
    state = lion.init.__wrapped__(params)
    new, state = lion.step.__wrapped__(params, grads, state, lr=1e-3, beta1=0.9, beta2=0.99,
                                       weight_decay=0.1, weight_decay_mode="decoupled_lr",
                                       weight_decay_mask="all")
    assert all(v.dtype == np.float32 for v in new.values())
    assert all(v.dtype == np.float32 for v in state["exp_avg"].values())


# ------------------------------------------------------------------------------------------
# Framework trajectories (float64)
# ------------------------------------------------------------------------------------------


def test_optax_trajectory():
    _, optax = oh.optax_x64()
    params = oh.tree(np.random.default_rng(2), SHAPES)
    seq = oh.gradients(2, STEPS, SHAPES)
    mask = {p: len(s) >= 2 for p, s in SHAPES.items()}
    tx = optax.lion(oh.optax_schedule(LRS), b1=0.9, b2=0.99, weight_decay=0.1, mask=mask)
    hp = dict(reference.get("lion").dialect("optax"), weight_decay=0.1, weight_decay_mask="ndim>=2")
    hp.pop("lr")
    trace = oh.trajectory(lion, params, seq, lrs=LRS, **hp)
    for (w, state), (w_ref, s_ref) in zip(oh.optax_steps(tx, params, seq), trace, strict=True):
        assert oh.rel(w, w_ref) < 1e-12
        assert oh.rel(state[0].mu, s_ref["exp_avg"]) < 1e-12


@pytest.mark.parametrize(("mode", "decouple", "fixed"), [("decoupled_lr", True, False),
                                                         ("decoupled_nolr", True, True),
                                                         ("l2", False, False)])
@pytest.mark.parametrize("foreach", [False, True])
def test_pytorch_optimizer_trajectory(mode, decouple, fixed, foreach):
    """pytorch_optimizer.Lion: its default (decay before the step, times lr) is the official
    google/automl form; fixed_decay and weight_decouple=False are the other two modes."""
    pytest.importorskip("torch")
    po = pytest.importorskip("pytorch_optimizer")
    params = oh.tree(np.random.default_rng(1), SHAPES)
    seq = oh.gradients(1, STEPS, SHAPES)
    trace = oh.trajectory(lion, params, seq, lrs=LRS, weight_decay=0.05, weight_decay_mode=mode,
                          weight_decay_mask="ndim>=2")
    tensors = oh.torch_tensors(params)
    opt = po.Lion(oh.decay_groups(tensors, 0.05), lr=LRS[0], betas=(0.9, 0.99), weight_decouple=decouple,
                  fixed_decay=fixed, foreach=foreach)
    theirs = oh.torch_steps(opt, tensors, seq, LRS, slots=("exp_avg",))
    for (w, state), (w_ref, s_ref) in zip(theirs, trace, strict=True):
        assert oh.rel(w, w_ref) < 1e-12
        assert oh.rel(state["exp_avg"], s_ref["exp_avg"]) < 1e-12


def test_optax_mapping_matches_the_oracle():
    pytest.importorskip("optax")
    from conformance.adapters import load_adapter

    adapter = load_adapter("jax")
    hp = reference.get("lion").spec.resolve({**adapter.ops()["lion"].dialect, "lr": 1e-2,
                                             "weight_decay": 0.1, "weight_decay_mask": "ndim>=2"})
    # from init, then from a non-trivial state
    for _, got, out, state in oh.adapter_steps(adapter, "lion", hp, np.random.default_rng(4), SHAPES):
        oh.assert_adapter_agrees(got, out, state)


# ------------------------------------------------------------------------------------------
# Bad input and the harness form
# ------------------------------------------------------------------------------------------


def test_harness_form_and_nested_params():
    op = reference.get("lion")
    _, state = oh.check_harness_form(op, "exp_avg", **op.dialect("optax"))
    assert set(state) == {"step", "exp_avg/fc/weight", "exp_avg/fc/bias"}
    assert float(state["step"]) == 1.0
