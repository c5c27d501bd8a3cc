"""NovoGrad (reference/optimizers/novograd.py): invariants, optax/pytorch_optimizer trajectories."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optim_helpers as oh
import reference
from reference.optimizers import novograd

SHAPES = oh.SHAPES_NO_BN_BIAS
STEPS = 12
LRS = [1e-2] * 6 + [3e-3] * 6  # a mid-run lr change


# ------------------------------------------------------------------------------------------
# Invariants (hypothesis)
# ------------------------------------------------------------------------------------------

seeds = st.integers(0, 2**31 - 1)
options = dict(wd=st.sampled_from([0.0, 0.01]), averaging=st.booleans(),
               init=st.sampled_from(["first_step", "zeros"]))


@settings(max_examples=30)
@given(seed=seeds, exps=st.lists(st.integers(-20, 20), min_size=4, max_size=4), **options)
def test_invariant_to_per_tensor_gradient_scale_at_eps0(seed, exps, wd, averaging, init):
    """eps = 0: g_p -> c_p g_p (one c > 0 per tensor) scales v_p by c_p^2 and leaves the update,
    momentum and parameters unchanged.  c = 2^e keeps every step exact: bitwise equal."""
    rng = np.random.default_rng(seed)
    params = oh.tree(rng, SHAPES)
    seq = oh.gradients(seed, 6, SHAPES)
    c = {p: 2.0**e for p, e in zip(SHAPES, exps, strict=True)}
    hp = dict(eps=0.0, weight_decay=wd, grad_averaging=averaging, first_moment_init=init)
    a = oh.trajectory(novograd, params, seq, lrs=LRS[:6], **hp)
    b = oh.trajectory(novograd, params, [{p: c[p] * g[p] for p in g} for g in seq], lrs=LRS[:6], **hp)
    for (w_a, s_a), (w_b, s_b) in zip(a, b, strict=True):
        for p in SHAPES:
            np.testing.assert_array_equal(w_a[p], w_b[p])
            np.testing.assert_array_equal(s_a["exp_avg"][p], s_b["exp_avg"][p])
            np.testing.assert_array_equal(c[p] ** 2 * s_a["exp_avg_sq"][p], s_b["exp_avg_sq"][p])


@settings(max_examples=20)
@given(seed=seeds, c=st.floats(1e-3, 1e3), **options)
def test_invariant_to_any_positive_scale_to_rounding(seed, c, wd, averaging, init):
    rng = np.random.default_rng(seed)
    params = oh.tree(rng, SHAPES)
    seq = oh.gradients(seed, 5, SHAPES)
    hp = dict(eps=0.0, weight_decay=wd, grad_averaging=averaging, first_moment_init=init)
    a = oh.trajectory(novograd, params, seq, lrs=LRS[:5], **hp)
    b = oh.trajectory(novograd, params, [{p: c * g[p] for p in g} for g in seq], lrs=LRS[:5], **hp)
    for (w_a, _), (w_b, _) in zip(a, b, strict=True):
        assert oh.rel(w_b, w_a) < 1e-13


@pytest.mark.checks("second_moment_is_one_scalar_per_tensor")
@settings(max_examples=20)
@given(seed=seeds, beta2=st.floats(0.0, 0.999), **options)
def test_second_moment_is_one_scalar_ema_of_squared_norm(seed, beta2, wd, averaging, init):
    rng = np.random.default_rng(seed)
    seq = oh.gradients(seed, 5, SHAPES)
    trace = oh.trajectory(novograd, oh.tree(rng, SHAPES), seq, lrs=LRS[:5], beta2=beta2, weight_decay=wd,
                          grad_averaging=averaging, first_moment_init=init)
    v = {p: float(np.sum(seq[0][p] ** 2)) for p in SHAPES}
    for k, (_, state) in enumerate(trace):
        if k:
            v = {p: beta2 * v[p] + (1 - beta2) * float(np.sum(seq[k][p] ** 2)) for p in SHAPES}
        for p in SHAPES:
            assert state["exp_avg_sq"][p].shape == ()
            np.testing.assert_allclose(state["exp_avg_sq"][p], v[p], rtol=1e-14)


@settings(max_examples=20)
@given(seed=seeds, eps=st.sampled_from([0.0, 1e-8, 1e-2]), beta1=st.floats(0.0, 0.99), **options)
def test_first_step_is_normalized_gradient(seed, eps, beta1, wd, averaging, init):
    """m_1 = g/(||g|| + eps) + d w; times (1 - beta1) only with grad averaging from zeros."""
    rng = np.random.default_rng(seed)
    params, g = oh.tree(rng, SHAPES), oh.gradients(seed, 1, SHAPES)[0]
    new, state = novograd.step(params, g, novograd.init(params), lr=0.1, beta1=beta1, eps=eps,
                               weight_decay=wd, grad_averaging=averaging, first_moment_init=init)
    factor = (1 - beta1) if (averaging and init == "zeros") else 1.0
    for p in SHAPES:
        m = factor * (g[p] / (np.linalg.norm(g[p]) + eps) + wd * params[p])
        np.testing.assert_allclose(state["exp_avg"][p], m, rtol=1e-14, atol=1e-300)
        np.testing.assert_allclose(new[p], params[p] - 0.1 * m, rtol=1e-14, atol=1e-300)


@settings(max_examples=20)
@given(seed=seeds, **options)
def test_eps_inside_equals_outside_at_eps0(seed, wd, averaging, init):
    rng = np.random.default_rng(seed)
    params, seq = oh.tree(rng, SHAPES), oh.gradients(seed, 4, SHAPES)
    hp = dict(eps=0.0, weight_decay=wd, grad_averaging=averaging, first_moment_init=init)
    a = oh.trajectory(novograd, params, seq, lrs=LRS[:4], eps_mode="outside", **hp)
    b = oh.trajectory(novograd, params, seq, lrs=LRS[:4], eps_mode="inside", **hp)
    for (w_a, _), (w_b, _) in zip(a, b, strict=True):
        for p in SHAPES:
            np.testing.assert_array_equal(w_a[p], w_b[p])


def test_raw_function_keeps_float32():
    rng = np.random.default_rng(0)
    params = oh.as_float32(oh.tree(rng, SHAPES))
    grads = oh.as_float32(oh.tree(rng, SHAPES))
    hp = reference.get("novograd").spec.defaults()
    state = novograd.init.__wrapped__(params, **hp)
    new, state = novograd.step.__wrapped__(params, grads, state, **{**hp, "weight_decay": 0.01})
    assert all(v.dtype == np.float32 for v in new.values())
    assert all(v.dtype == np.float32 for v in state["exp_avg"].values())
    assert all(v.dtype == np.float32 for v in state["exp_avg_sq"].values())


# ------------------------------------------------------------------------------------------
# Framework trajectories (float64)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps_mode", ["outside", "inside"])
def test_optax_trajectory(eps_mode):
    _, optax = oh.optax_x64()
    params = oh.tree(np.random.default_rng(2), SHAPES)
    seq = oh.gradients(2, STEPS, SHAPES)
    eps = 1e-3  # large enough for its placement to matter
    tx = optax.novograd(oh.optax_schedule(LRS), b1=0.9, b2=0.25, weight_decay=0.01,
                        eps=eps if eps_mode == "outside" else 0.0,
                        eps_root=eps if eps_mode == "inside" else 0.0)
    hp = dict(reference.get("novograd").dialect("optax"), weight_decay=0.01, eps=eps,
              eps_mode=eps_mode)
    hp.pop("lr")
    trace = oh.trajectory(novograd, params, seq, lrs=LRS, **hp)
    for (w, state), (w_ref, s_ref) in zip(oh.optax_steps(tx, params, seq), trace, strict=True):
        assert oh.rel(w, w_ref) < 1e-12
        assert oh.rel(state[0].mu, s_ref["exp_avg"]) < 1e-12
        assert oh.rel(state[0].nu, s_ref["exp_avg_sq"]) < 1e-12


@pytest.mark.parametrize(("mode", "decouple", "fixed"), [("moment", False, False),
                                                         ("decoupled_lr", True, False),
                                                         ("decoupled_nolr", True, True)])
@pytest.mark.parametrize("averaging", [False, True])
@pytest.mark.parametrize("foreach", [False, True])
def test_pytorch_optimizer_trajectory(mode, decouple, fixed, averaging, foreach):
    """pytorch_optimizer.NovoGrad follows first_moment_init = first_step, eps outside."""
    pytest.importorskip("torch")
    po = pytest.importorskip("pytorch_optimizer")
    params = oh.tree(np.random.default_rng(1), SHAPES)
    seq = oh.gradients(1, STEPS, SHAPES)
    hp = dict(reference.get("novograd").dialect("pytorch_optimizer"), weight_decay=0.02,
              weight_decay_mode=mode, weight_decay_mask="ndim>=2", grad_averaging=averaging,
              eps=1e-3)
    hp.pop("lr")
    trace = oh.trajectory(novograd, params, seq, lrs=LRS, **hp)
    tensors = oh.torch_tensors(params)
    opt = po.NovoGrad(oh.decay_groups(tensors, 0.02), lr=LRS[0], betas=(0.95, 0.98), eps=1e-3,
                      weight_decouple=decouple, fixed_decay=fixed, grad_averaging=averaging,
                      foreach=foreach)
    theirs = oh.torch_steps(opt, tensors, seq, LRS, slots=("moments", "grads_ema"))
    for (w, state), (w_ref, s_ref) in zip(theirs, trace, strict=True):
        assert oh.rel(w, w_ref) < 1e-12
        assert oh.rel(state["moments"], s_ref["exp_avg"]) < 1e-12
        assert oh.rel(state["grads_ema"], s_ref["exp_avg_sq"]) < 1e-12


@pytest.mark.parametrize("extra", [{"weight_decay": 0.01}, {"eps_mode": "inside", "eps": 1e-2}])
def test_optax_mapping_matches_the_oracle(extra):
    pytest.importorskip("optax")
    from conformance.adapters import load_adapter

    adapter = load_adapter("jax")
    hp = reference.get("novograd").spec.resolve({**adapter.ops()["novograd"].dialect, "lr": 1e-2, **extra})
    # from init, then from a non-trivial state
    for _, got, out, state in oh.adapter_steps(adapter, "novograd", hp, np.random.default_rng(4), SHAPES):
        oh.assert_adapter_agrees(got, out, state)


# ------------------------------------------------------------------------------------------
# Bad input and the harness form
# ------------------------------------------------------------------------------------------


def test_harness_form_and_nested_params():
    op = reference.get("novograd")
    _, state = oh.check_harness_form(op, "exp_avg_sq", **op.dialect("optax"))
    assert set(state) == {"step", "exp_avg/fc/weight", "exp_avg/fc/bias", "exp_avg_sq/fc/weight",
                          "exp_avg_sq/fc/bias"}
    assert np.shape(state["exp_avg_sq/fc/weight"]) == ()
