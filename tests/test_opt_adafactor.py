"""Adafactor (reference/optimizers/adafactor.py): invariants, optax/pytorch_optimizer trajectories."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optim_helpers as oh
import reference
from reference.optimizers import adafactor

SMALL = {"conv/weight": (4, 3, 3, 3), "conv/bias": (4,), "fc/weight": (5, 6)}
# optax factors only when the second largest dimension has >= 128 elements: "embed" is not
# factored there, "proj" is, over its axes 0 and 2 (the two largest).
LARGE = {**SMALL, "embed": (130, 8), "proj": (128, 2, 130)}
STEPS = 12
LRS = [1e-2] * 6 + [3e-3] * 6  # a mid-run lr change
PLAIN = dict(relative_step=False, multiply_by_parameter_scale=False, clipping_threshold=None)


# ------------------------------------------------------------------------------------------
# Invariants (hypothesis)
# ------------------------------------------------------------------------------------------

seeds = st.integers(0, 2**31 - 1)


@settings(max_examples=30)
@given(seed=seeds, n=st.integers(2, 7), m=st.integers(2, 7), lead=st.sampled_from([(), (3,)]),
       mode=st.sampled_from(["last_two", "largest_two"]))
def test_factored_equals_full_for_rank_one_g2(seed, n, m, lead, mode):
    """g_t = s_t u v^T over the two factored axes (the same rank-one direction every step, for
    every index of the other axes): the EMA of g^2 stays rank one there, and the factored
    V = R C^T / mean(R) equals the full second moment (eps1 = 0)."""
    rng = np.random.default_rng(seed)
    shape = (*lead, n, m)
    d_col, d_row = adafactor.factored_axes(shape, factored=True, factored_dims=mode,
                                           min_dim_size_to_factor=0)
    u = rng.standard_normal(tuple(1 if i == d_row else k for i, k in enumerate(shape)))
    v = rng.standard_normal(tuple(1 if i == d_col else k for i, k in enumerate(shape)))
    seq = [{"w": rng.uniform(0.1, 10) * u * v} for _ in range(5)]
    params = {"w": rng.standard_normal(shape)}
    hp = dict(PLAIN, eps1=0.0, factored_dims=mode)
    a = oh.trajectory(adafactor, params, seq, lrs=[1e-2] * 5, factored=True, **hp)
    b = oh.trajectory(adafactor, params, seq, lrs=[1e-2] * 5, factored=False, **hp)
    for (w_a, s_a), (w_b, s_b) in zip(a, b, strict=True):
        np.testing.assert_allclose(w_a["w"], w_b["w"], rtol=1e-13, atol=1e-300)
        assert s_a["exp_avg_sq"]["w"].shape == (1,) and s_b["exp_avg_sq_row"]["w"].shape == (1,)


@settings(max_examples=30)
@given(seed=seeds, d=st.floats(0.05, 3.0), factored=st.booleans())
def test_update_clipping_bounds_rms(seed, d, factored):
    """RMS(U_hat) <= d per tensor: the step divided by lr (no momentum, no scales)."""
    rng = np.random.default_rng(seed)
    params = oh.tree(rng, SMALL)
    hp = dict(PLAIN, clipping_threshold=d, factored=factored)
    state = adafactor.init(params, **hp)
    for g in oh.gradients(seed, 4, SMALL):
        new, state = adafactor.step(params, g, state, lr=0.5, **{**hp})
        for p in SMALL:
            u = (params[p] - new[p]) / 0.5
            assert math.sqrt(np.mean(u * u)) <= d * (1 + 1e-12)
        params = new


@settings(max_examples=20)
@given(seed=seeds, lr=st.floats(1e-3, 1.0), scale=st.booleans(), beta1=st.sampled_from([0.0, 0.9]))
def test_relative_step_is_min_lr_inv_sqrt_t(seed, lr, scale, beta1):
    """relative_step with cap lr equals relative_step=False with lr_t = min(lr, 1/sqrt(t))."""
    rng = np.random.default_rng(seed)
    params, seq = oh.tree(rng, SMALL), oh.gradients(seed, 6, SMALL)
    hp = dict(multiply_by_parameter_scale=scale, beta1=beta1, weight_decay=0.1)
    a = oh.trajectory(adafactor, params, seq, lrs=[lr] * 6, relative_step=True, **hp)
    b = oh.trajectory(adafactor, params, seq, lrs=[min(lr, 1 / math.sqrt(t)) for t in range(1, 7)],
                      relative_step=False, **hp)
    for (w_a, _), (w_b, _) in zip(a, b, strict=True):
        for p in SMALL:
            np.testing.assert_array_equal(w_a[p], w_b[p])


@settings(max_examples=20)
@given(seed=seeds, eps1=st.sampled_from([0.0, 1e-30, 1e-3]))
def test_first_step_slots_are_row_and_column_means(seed, eps1):
    """beta2_1 = 0: the state after step 1 is the row/column means of g^2 + eps1 (last_two:
    R over the last axis, C over the second to last); the unfactored slot is g^2 + eps1."""
    rng = np.random.default_rng(seed)
    params, g = oh.tree(rng, SMALL), oh.gradients(seed, 1, SMALL)[0]
    _, state = adafactor.step(params, g, adafactor.init(params), eps1=eps1)
    for p in ("conv/weight", "fc/weight"):
        g2 = g[p] ** 2 + eps1
        np.testing.assert_allclose(state["exp_avg_sq_row"][p], g2.mean(axis=-1), rtol=1e-14)
        np.testing.assert_allclose(state["exp_avg_sq_col"][p], g2.mean(axis=-2), rtol=1e-14)
    np.testing.assert_allclose(state["exp_avg_sq"]["conv/bias"], g["conv/bias"] ** 2 + eps1,
                               rtol=1e-15)


def test_factored_axes_rules():
    axes = adafactor.factored_axes
    kw = dict(factored=True, min_dim_size_to_factor=0)
    assert axes((4, 3, 3, 3), factored_dims="last_two", **kw) == (2, 3)
    assert axes((4, 3, 3, 3), factored_dims="matrix_only", **kw) is None
    assert axes((128, 2, 130), factored_dims="largest_two", **kw) == (0, 2)
    assert axes((128, 128), factored_dims="largest_two", **kw) == (0, 1)  # stable on ties
    assert axes((130, 8), factored_dims="largest_two", factored=True, min_dim_size_to_factor=128) is None
    assert axes((7,), factored_dims="last_two", **kw) is None
    assert axes((5, 6), factored_dims="last_two", factored=False, min_dim_size_to_factor=0) is None


def test_raw_function_keeps_float32():
    rng = np.random.default_rng(0)
    params = oh.as_float32(oh.tree(rng, SMALL))
    grads = oh.as_float32(oh.tree(rng, SMALL))
    hp = {**reference.get("adafactor").spec.defaults(), "beta1": 0.9, "weight_decay": 0.1}
    state = adafactor.init.__wrapped__(params, **hp)
    new, state = adafactor.step.__wrapped__(params, grads, state, **hp)
    assert all(v.dtype == np.float32 for v in new.values())
    for slot in ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq", "exp_avg"):
        assert all(v.dtype == np.float32 for v in state[slot].values()), slot


# ------------------------------------------------------------------------------------------
# Framework trajectories (float64)
# ------------------------------------------------------------------------------------------


def _float64_decay_rate(monkeypatch):
    """optax computes beta2_t = 1 - (count + 1)^-c in float32 even under x64
    (``factorized._decay_rate_pow``); this swaps in the same formula in float64 (for the
    transformations built afterwards) so that the rest of the algorithm can be compared at
    float64 accuracy."""
    import jax.numpy as jnp
    from optax._src import factorized

    fn = factorized.scale_by_factored_rms
    defaults = list(fn.__defaults__)
    assert defaults[-1] is factorized._decay_rate_pow
    defaults[-1] = lambda i, exponent: 1.0 - jnp.asarray(i + 1, jnp.float64) ** (-exponent)
    monkeypatch.setattr(fn, "__defaults__", tuple(defaults))


def _optax_run(optax, params, seq):
    """optax.adafactor over the trajectory: lr schedule with a mid-run change, momentum 0.9 in
    float64 (dtype_momentum), decay 1e-2 on the parameters with >= 2 dims."""
    import jax.numpy as jnp

    mask = {p: len(s) >= 2 for p, s in LARGE.items()}
    tx = optax.adafactor(oh.optax_schedule(LRS), momentum=0.9, dtype_momentum=jnp.float64,
                         weight_decay_rate=1e-2, weight_decay_mask=mask)
    return oh.optax_steps(tx, params, seq, jit=True)


def test_optax_trajectory(monkeypatch):
    """As shipped, optax's float32 beta2_t leaves a relative error of order 1e-8 (a float32 ulp,
    far above float64 rounding: a framework deviation, bounded here); with the decay rate in
    float64 every parameter and slot agrees to 1e-12 (optax dialect: largest_two factoring with
    min 128, no relative step, decay not times lr)."""
    _, optax = oh.optax_x64()
    params, seq = oh.tree(np.random.default_rng(2), LARGE), oh.gradients(2, STEPS, LARGE)
    hp = dict(reference.get("adafactor").dialect("optax"), beta1=0.9, weight_decay=1e-2,
              weight_decay_mask="ndim>=2")
    hp.pop("lr")
    trace = oh.trajectory(adafactor, params, seq, lrs=LRS, **hp)
    shipped = _optax_run(optax, params, seq)
    assert oh.rel(shipped[0][0], trace[0][0]) < 1e-12  # step 1: beta2_1 = 0 exactly in float32 too
    assert max(oh.rel(w, w_ref) for (w, _), (w_ref, _) in zip(shipped, trace, strict=True)) < 1e-6
    _float64_decay_rate(monkeypatch)
    for (w, state), (w_ref, s_ref) in zip(_optax_run(optax, params, seq), trace, strict=True):
        factored, ema = state[0], next(s for s in state if hasattr(s, "ema"))
        assert oh.rel(w, w_ref) < 1e-12
        assert oh.rel(factored.v_row, s_ref["exp_avg_sq_row"]) < 1e-12
        assert oh.rel(factored.v_col, s_ref["exp_avg_sq_col"]) < 1e-12
        assert oh.rel(factored.v, s_ref["exp_avg_sq"]) < 1e-12
        assert oh.rel(ema.ema, s_ref["exp_avg"]) < 1e-12
    assert trace[-1][1]["exp_avg_sq_row"]["proj"].shape == (128, 2)   # R: mean over axis 2 (130)
    assert trace[-1][1]["exp_avg_sq_col"]["proj"].shape == (2, 130)   # C: mean over axis 0 (128)
    assert trace[-1][1]["exp_avg_sq"]["embed"].shape == (130, 8)      # 8 < 128: not factored


@pytest.mark.parametrize("momentum", [True, False])
@pytest.mark.parametrize("foreach", [False, True])
def test_pytorch_optimizer_relative_step_trajectory(momentum, foreach):
    """pytorch_optimizer.AdaFactor: relative step (lr ignored, cap 1e-2), parameter scale,
    beta2 cap 0.999, momentum 0.9 (float64 buffer), decoupled decay with the effective lr."""
    torch = pytest.importorskip("torch")
    po = pytest.importorskip("pytorch_optimizer")
    params, seq = oh.tree(np.random.default_rng(1), SMALL), oh.gradients(1, STEPS, SMALL)
    beta1 = 0.9 if momentum else 0.0
    hp = dict(reference.get("adafactor").dialect("pytorch_optimizer"), beta1=beta1,
              weight_decay=0.05, weight_decay_mask="ndim>=2")
    trace = oh.trajectory(adafactor, params, seq, **hp)
    tensors = oh.torch_tensors(params)
    opt = po.AdaFactor(oh.decay_groups(tensors, 0.05), lr=1e-2, betas=(beta1 if momentum else None, 0.999),
                       momentum_dtype=torch.float64, foreach=foreach)
    _compare_torch(opt, tensors, seq, trace, momentum)


@pytest.mark.parametrize(("mode", "decouple", "fixed"), [("decoupled_lr", True, False),
                                                         ("decoupled_nolr", True, True),
                                                         ("l2", False, False)])
def test_pytorch_optimizer_external_lr_trajectory(mode, decouple, fixed):
    """relative_step=False: the given lr (changed mid-run), every weight-decay form."""
    torch = pytest.importorskip("torch")
    po = pytest.importorskip("pytorch_optimizer")
    params, seq = oh.tree(np.random.default_rng(5), SMALL), oh.gradients(5, STEPS, SMALL)
    hp = dict(reference.get("adafactor").dialect("pytorch_optimizer"), relative_step=False,
              weight_decay=0.05, weight_decay_mode=mode, clipping_threshold=0.5)
    hp.pop("lr")
    trace = oh.trajectory(adafactor, params, seq, lrs=LRS, **hp)
    tensors = oh.torch_tensors(params)
    opt = po.AdaFactor(list(tensors.values()), lr=LRS[0], betas=(0.9, 0.999), weight_decay=0.05,
                       weight_decouple=decouple, fixed_decay=fixed, relative_step=False,
                       clip_threshold=0.5, momentum_dtype=torch.float64, foreach=False)
    _compare_torch(opt, tensors, seq, trace, True, lrs=LRS)


def _compare_torch(opt, tensors, seq, trace, momentum, lrs=None):
    slots = ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq", "exp_avg")
    for (w, state), (w_ref, s_ref) in zip(oh.torch_steps(opt, tensors, seq, lrs, slots), trace, strict=True):
        assert oh.rel(w, w_ref) < 1e-12
        for p, w_p in w.items():
            keys = ["exp_avg_sq_row", "exp_avg_sq_col"] if w_p.ndim >= 2 else ["exp_avg_sq"]
            keys += ["exp_avg"] if momentum else []
            for key in keys:
                assert oh.rel({p: state[key][p]}, {p: s_ref[key][p]}) < 1e-12, (p, key)


def test_optax_mapping_matches_the_oracle(monkeypatch):
    oh.optax_x64()
    _float64_decay_rate(monkeypatch)
    from conformance.adapters import load_adapter

    adapter = load_adapter("jax")
    hp = reference.get("adafactor").spec.resolve({**adapter.ops()["adafactor"].dialect, "lr": 1e-2,
                                                  "beta1": 0.9, "weight_decay": 1e-3,
                                                  "min_dim_size_to_factor": 4})
    shapes = {"w": (6, 2, 5), "v": (3, 4), "b": (5,)}
    # from init, then from a non-trivial state
    for _, got, out, state in oh.adapter_steps(adapter, "adafactor", hp, np.random.default_rng(4), shapes):
        oh.assert_adapter_agrees(got, out, state)


# ------------------------------------------------------------------------------------------
# Bad input and the harness form
# ------------------------------------------------------------------------------------------


def test_harness_form_and_nested_params():
    op = reference.get("adafactor")
    _, state = oh.check_harness_form(op, "exp_avg", **{**op.dialect("transformers"), "beta1": 0.9})
    assert set(state) == {"step"} | {f"{s}/fc/{p}" for s in ("exp_avg_sq_row", "exp_avg_sq_col",
                                                              "exp_avg_sq", "exp_avg")
                                     for p in ("weight", "bias")}
    assert state["exp_avg_sq_row/fc/weight"].shape == (3,)
    assert state["exp_avg_sq_col/fc/weight"].shape == (4,)
