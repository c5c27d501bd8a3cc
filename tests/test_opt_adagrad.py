"""AdaGrad (reference/optimizers/adagrad.py): invariants, torch/optax trajectories, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optim_helpers as oh
import reference
from reference.optimizers import adagrad

SHAPES = oh.SHAPES_NO_BN_BIAS


# ------------------------------------------------------------------------------------------
# Invariants (hypothesis)
# ------------------------------------------------------------------------------------------

seeds = st.integers(0, 2**31 - 1)


@pytest.mark.checks("accumulator_never_decreases", "effective_lr_never_increases")
@settings(max_examples=30)
@given(seed=seeds, eps=st.sampled_from([0.0, 1e-10, 1e-3]), s0=st.sampled_from([0.0, 0.1, 2.0]),
       lr_decay=st.sampled_from([0.0, 0.1]), placement=st.sampled_from(["outside", "inside"]))
def test_accumulator_and_effective_lr_monotone(seed, eps, s0, lr_decay, placement):
    """s_t never decreases; eta_t / denominator never increases (per coordinate)."""
    rng = np.random.default_rng(seed)
    params = oh.tree(rng, SHAPES)
    hp = dict(lr=0.1, eps=eps, initial_accumulator_value=s0, lr_decay=lr_decay,
              eps_placement=placement, empty_accumulator="zero")
    trace = oh.trajectory(adagrad, params, oh.gradients(seed, 6, SHAPES), **hp)
    prev_s = {p: np.full(s, s0) for p, s in SHAPES.items()}
    prev_eff = None
    for t, (_, state) in enumerate(trace, start=1):
        clr = 0.1 / (1 + (t - 1) * lr_decay)
        eff = {}
        for p, s in state["sum"].items():
            assert np.all(s >= prev_s[p])
            denom = np.sqrt(s) + eps if placement == "outside" else np.sqrt(s + eps)
            with np.errstate(divide="ignore"):
                eff[p] = clr / denom
            if prev_eff is not None:
                assert np.all(eff[p] <= prev_eff[p] * (1 + 1e-15))
        prev_s, prev_eff = state["sum"], eff
        assert float(state["step"]) == t


@pytest.mark.checks("first_step_is_lr_sign")
@settings(max_examples=30)
@given(seed=seeds, c=st.floats(1e-3, 1e3), lr=st.floats(1e-3, 1.0))
def test_scale_invariant_eps0_init0(seed, c, lr):
    """eps = 0, s_0 = 0: the trajectory is invariant to g -> c g; the first step is lr sign(g)."""
    rng = np.random.default_rng(seed)
    params = oh.tree(rng, SHAPES)
    seq = oh.gradients(seed, 5, SHAPES)
    hp = dict(lr=lr, eps=0.0, initial_accumulator_value=0.0)
    base = oh.trajectory(adagrad, params, seq, **hp)
    scaled = oh.trajectory(adagrad, params, [{p: c * g for p, g in gs.items()} for gs in seq], **hp)
    for (w_a, _), (w_b, _) in zip(base, scaled, strict=True):
        assert oh.rel(w_b, w_a) < 1e-13
    first = base[0][0]
    for p, w in params.items():
        np.testing.assert_allclose(first[p], w - lr * np.sign(seq[0][p]), rtol=1e-14, atol=1e-15)


@settings(max_examples=20)
@given(seed=seeds, s0=st.sampled_from([0.1, 1.0]))
def test_eps_inside_equals_outside_at_eps0(seed, s0):
    rng = np.random.default_rng(seed)
    params = oh.tree(rng, SHAPES)
    seq = oh.gradients(seed, 4, SHAPES)
    a = oh.trajectory(adagrad, params, seq, eps=0.0, initial_accumulator_value=s0, eps_placement="outside")
    b = oh.trajectory(adagrad, params, seq, eps=0.0, initial_accumulator_value=s0, eps_placement="inside")
    for (w_a, _), (w_b, _) in zip(a, b, strict=True):
        assert oh.rel(w_b, w_a) == 0.0


@settings(max_examples=20)
@given(seed=seeds, eps=st.sampled_from([1e-10, 1e-7, 1e-2]))
def test_zero_rule_only_where_accumulator_empty(seed, eps):
    """optax's "update 0 where s == 0" equals plain division when eps > 0; with eps = 0 it keeps
    a never-updated tensor finite where division gives 0/0."""
    rng = np.random.default_rng(seed)
    params = oh.tree(rng, SHAPES)
    seq = oh.gradients(seed, 3, SHAPES)
    for g in seq:
        g["conv/bias"] = np.zeros(SHAPES["conv/bias"])
    a = oh.trajectory(adagrad, params, seq, eps=eps, empty_accumulator="divide")
    b = oh.trajectory(adagrad, params, seq, eps=eps, empty_accumulator="zero")
    for (w_a, _), (w_b, _) in zip(a, b, strict=True):
        assert oh.rel(w_b, w_a) == 0.0
    w_zero = oh.trajectory(adagrad, params, seq, eps=0.0, empty_accumulator="zero")[-1][0]
    np.testing.assert_array_equal(w_zero["conv/bias"], params["conv/bias"])
    with np.errstate(invalid="ignore"):
        w_div = oh.trajectory(adagrad, params, seq, eps=0.0, empty_accumulator="divide")[-1][0]
    assert np.all(np.isnan(w_div["conv/bias"]))


@settings(max_examples=20)
@given(seed=seeds, lr_decay=st.floats(0.0, 1.0))
def test_lr_decay_is_torch_schedule(seed, lr_decay):
    """lr_decay = d equals lr_decay = 0 with the caller's schedule lr / (1 + (t - 1) d)."""
    rng = np.random.default_rng(seed)
    params = oh.tree(rng, SHAPES)
    seq = oh.gradients(seed, 5, SHAPES)
    a = oh.trajectory(adagrad, params, seq, lr=0.1, lr_decay=lr_decay, weight_decay=0.01,
                      weight_decay_mode="decoupled_lr")
    b = oh.trajectory(adagrad, params, seq, lrs=[0.1 / (1 + t * lr_decay) for t in range(5)], lr=0.1,
                      weight_decay=0.01, weight_decay_mode="decoupled_lr")
    for (w_a, _), (w_b, _) in zip(a, b, strict=True):
        assert oh.rel(w_b, w_a) < 1e-15


def test_raw_function_keeps_float32():
    rng = np.random.default_rng(0)
    params = oh.as_float32(oh.tree(rng, SHAPES))
    grads = oh.as_float32(oh.tree(rng, SHAPES))
    state = adagrad.init.__wrapped__(params, initial_accumulator_value=0.1)
    new, state = adagrad.step.__wrapped__(params, grads, state, lr=0.1, eps=1e-10,
                                          initial_accumulator_value=0.1, lr_decay=0.0,
                                          eps_placement="inside", empty_accumulator="zero",
                                          weight_decay=0.0, weight_decay_mode="l2",
                                          weight_decay_mask="all")
    assert all(v.dtype == np.float32 for v in new.values())
    assert all(v.dtype == np.float32 for v in state["sum"].values())


# ------------------------------------------------------------------------------------------
# Framework trajectories (float64)
# ------------------------------------------------------------------------------------------

STEPS = 12
LRS = [0.1] * 6 + [0.03] * 6  # a mid-run lr change


def test_torch_trajectory():
    torch = pytest.importorskip("torch")
    params = oh.tree(np.random.default_rng(1), SHAPES)
    seq = oh.gradients(1, STEPS, SHAPES)
    hp = dict(lr_decay=0.05, eps=1e-10, initial_accumulator_value=0.1, weight_decay=0.02,
              weight_decay_mask="ndim>=2")
    tensors = oh.torch_tensors(params)
    opt = torch.optim.Adagrad(oh.decay_groups(tensors, 0.02), lr=LRS[0], lr_decay=0.05, eps=1e-10,
                              initial_accumulator_value=0.1, foreach=False)
    trace = oh.trajectory(adagrad, params, seq, lrs=LRS, **hp)
    theirs = oh.torch_steps(opt, tensors, seq, LRS, slots=("sum",))
    for (w, state), (w_ref, s_ref) in zip(theirs, trace, strict=True):
        assert oh.rel(w, w_ref) < 1e-12
        assert oh.rel(state["sum"], s_ref["sum"]) < 1e-12


def test_optax_trajectory():
    _, optax = oh.optax_x64()
    params = oh.tree(np.random.default_rng(2), SHAPES)
    seq = oh.gradients(2, STEPS, SHAPES)
    mask = {p: len(s) >= 2 for p, s in SHAPES.items()}
    tx = optax.chain(optax.add_decayed_weights(0.02, mask=mask),
                     optax.adagrad(oh.optax_schedule(LRS), initial_accumulator_value=0.1, eps=1e-7))
    hp = dict(reference.get("adagrad").dialect("optax"), weight_decay=0.02,
              weight_decay_mask="ndim>=2")
    hp.pop("lr")
    trace = oh.trajectory(adagrad, params, seq, lrs=LRS, **hp)
    for (w, state), (w_ref, s_ref) in zip(oh.optax_steps(tx, params, seq), trace, strict=True):
        assert oh.rel(w, w_ref) < 1e-12
        assert oh.rel(state[1][0].sum_of_squares, s_ref["sum"]) < 1e-12


# ------------------------------------------------------------------------------------------
# Bad input and the harness form
# ------------------------------------------------------------------------------------------


def test_harness_form_and_nested_params():
    op = reference.get("adagrad")
    _, state = oh.check_harness_form(op, "sum", **op.dialect("optax"))
    assert set(state) == {"step", "sum/fc/weight", "sum/fc/bias"}
    assert float(state["step"]) == 1.0
