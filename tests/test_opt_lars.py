"""LARS / LARC (reference/optimizers/lars.py): invariants, optax / pytorch_optimizer trajectories,
the zero-norm rules (bad input: the spec's [[error_cases]])."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optim_helpers as oh
import reference
from reference.optimizers import lars, sgd

SHAPES = {**oh.SHAPES_NO_BN_BIAS, "fc/bias": (5,)}
OP = reference.get("lars")


def _hp(dialect: str | None = None, **overrides):
    return OP.spec.resolve(overrides, dialect=dialect)


LRS = [1.0] * 6 + [0.1] * 6  # a mid-run drop: lr inside vs outside the buffer shows


# ------------------------------------------------------------------------------------------
# Invariants (hypothesis)
# ------------------------------------------------------------------------------------------

seeds = st.integers(0, 2**31 - 1)


@settings(max_examples=20)
@given(seed=seeds, lr=st.floats(1e-3, 10.0), tc=st.floats(1e-4, 1.0),
       denominator=st.sampled_from(["sum_of_norms", "norm_of_sum"]),
       placement=st.sampled_from(["inside", "outside"]))
def test_step_norm_is_lr_tc_weight_norm(seed, lr, tc, denominator, placement):
    """momentum 0, wd 0, eps 0, adapted: ||delta w|| = lr tc ||w|| per tensor, whatever ||g||."""
    rng = np.random.default_rng(seed)
    params = oh.tree(rng, SHAPES)
    g = oh.gradients(seed, 1, SHAPES)[0]
    hp = _hp(lr=lr, momentum=0.0, weight_decay=0.0, eps=0.0, trust_coefficient=tc,
             trust_denominator=denominator, lr_placement=placement, always_adapt=True)
    new, _ = lars.step(params, g, lars.init(params, **hp), **hp)
    for p in SHAPES:
        got = np.linalg.norm(new[p] - params[p])
        # w - new loses the digits of w the small step does not reach: ulp(w) / ||delta w||
        assert got == pytest.approx(lr * tc * np.linalg.norm(params[p]),
                                    rel=1e-12 + 2.3e-16 / (lr * tc))


@settings(max_examples=20)
@given(seed=seeds, c=st.floats(1e-3, 1e3), nesterov=st.booleans(),
       placement=st.sampled_from(["inside", "outside"]))
def test_gradient_scale_invariance(seed, c, nesterov, placement):
    """wd 0, eps 0: scaling every gradient by c > 0 leaves the trajectory unchanged."""
    rng = np.random.default_rng(seed)
    params = oh.tree(rng, SHAPES)
    grads = oh.gradients(seed, 4, SHAPES)
    hp = _hp(lr=0.5, momentum=0.9, nesterov=nesterov, weight_decay=0.0, eps=0.0,
             lr_placement=placement)
    ref = oh.trajectory(lars, params, grads, **hp)
    scaled = oh.trajectory(lars, params, [{p: c * g[p] for p in g} for g in grads], **hp)
    assert oh.rel(scaled[-1][0], ref[-1][0]) < 1e-12


@settings(max_examples=20)
@given(seed=seeds, c=st.floats(1e-3, 1e3), momentum=st.sampled_from([0.0, 0.9]),
       clone=st.booleans())
def test_weight_scale_equivariance(seed, c, momentum, clone):
    """wd 0, eps 0: w -> c w scales the first update by c (the ratio is linear in ||w||)."""
    rng = np.random.default_rng(seed)
    params = oh.tree(rng, SHAPES)
    g = oh.gradients(seed, 1, SHAPES)[0]
    hp = _hp(lr=0.7, momentum=momentum, weight_decay=0.0, eps=0.0,
             first_step="clone" if clone else "zeros", lr_placement="outside")
    new, _ = lars.step(params, g, lars.init(params, **hp), **hp)
    big = {p: c * w for p, w in params.items()}
    new_big, _ = lars.step(big, g, lars.init(big, **hp), **hp)
    delta = {p: c * (new[p] - params[p]) for p in SHAPES}
    assert oh.rel({p: new_big[p] - big[p] for p in SHAPES}, delta) < 1e-12


@settings(max_examples=20)
@given(seed=seeds, lr=st.floats(1e-4, 10.0), tc=st.floats(1e-3, 1.0), wd=st.floats(0.0, 0.1),
       eps=st.sampled_from([0.0, 1e-8]))
def test_larc_clip_effective_lr_at_most_lr(seed, lr, tc, wd, eps):
    """trust_clip: delta w = -min(ratio, lr) (g + wd w), so the per-layer rate is <= lr."""
    rng = np.random.default_rng(seed)
    params = oh.tree(rng, SHAPES)
    g = oh.gradients(seed, 1, SHAPES)[0]
    hp = _hp("apex_larc", lr=lr, momentum=0.0, weight_decay=wd, trust_coefficient=tc, eps=eps)
    new, _ = lars.step(params, g, lars.init(params, **hp), **hp)
    for p, w in params.items():
        d = g[p] + wd * w
        ratio = tc * np.linalg.norm(w) / (np.linalg.norm(g[p]) + wd * np.linalg.norm(w) + eps)
        step = np.linalg.norm(new[p] - w)
        tol = 1e-12 + 2.3e-16 * np.linalg.norm(w) / step  # the rounding of w - lr d itself
        rate = step / np.linalg.norm(d)
        assert rate <= lr * (1 + tol)
        assert rate == pytest.approx(min(ratio, lr), rel=tol)


@settings(max_examples=20)
@given(seed=seeds)
def test_denominators_agree_without_decay(seed):
    rng = np.random.default_rng(seed)
    params = oh.tree(rng, SHAPES)
    grads = oh.gradients(seed, 5, SHAPES)
    a = oh.trajectory(lars, params, grads, **_hp(weight_decay=0.0, trust_denominator="sum_of_norms"))
    b = oh.trajectory(lars, params, grads, **_hp(weight_decay=0.0, trust_denominator="norm_of_sum"))
    assert oh.rel(a[-1][0], b[-1][0]) < 1e-13
    # ... and differ with decay (the optax / timm disagreement, estimators-optimizers.md A3)
    a = oh.trajectory(lars, params, grads, **_hp(weight_decay=0.05, trust_denominator="sum_of_norms"))
    b = oh.trajectory(lars, params, grads, **_hp(weight_decay=0.05, trust_denominator="norm_of_sum"))
    assert oh.rel(a[-1][0], b[-1][0]) > 1e-9


@settings(max_examples=20)
@given(seed=seeds, nesterov=st.booleans())
def test_lr_inside_equals_outside_constant_lr(seed, nesterov):
    rng = np.random.default_rng(seed)
    params = oh.tree(rng, SHAPES)
    grads = oh.gradients(seed, 8, SHAPES)
    base = dict(lr=0.3, momentum=0.9, nesterov=nesterov, weight_decay=1e-2)
    a = oh.trajectory(lars, params, grads, **_hp(lr_placement="inside", **base))
    b = oh.trajectory(lars, params, grads, **_hp(lr_placement="outside", **base))
    assert oh.rel(a[-1][0], b[-1][0]) < 1e-12
    # the buffers differ by the factor lr; after a rate change the trajectories part
    assert oh.rel({p: a[-1][1]["momentum_buffer"][p] / 0.3 for p in SHAPES},
                  b[-1][1]["momentum_buffer"]) < 1e-12
    lrs = [0.3] * 4 + [0.03] * 4
    a = oh.trajectory(lars, params, grads, lrs, **_hp(lr_placement="inside", **base))
    b = oh.trajectory(lars, params, grads, lrs, **_hp(lr_placement="outside", **base))
    assert oh.rel(a[-1][0], b[-1][0]) > 1e-9


@settings(max_examples=20)
@given(seed=seeds, wd=st.sampled_from([0.0, 1e-2]), dampening=st.sampled_from([0.0, 0.3]))
def test_no_adaptation_equals_sgd(seed, wd, dampening):
    """trust_mask = none: LARS is torch SGD with L2 decay (same buffer, clone or zeros)."""
    rng = np.random.default_rng(seed)
    params = oh.tree(rng, SHAPES)
    grads = oh.gradients(seed, 6, SHAPES)
    for first in ("clone", "zeros"):
        a = oh.trajectory(lars, params, grads, **_hp(lr=0.05, momentum=0.9, dampening=dampening,
                                                     weight_decay=wd, trust_mask="none",
                                                     lr_placement="outside", first_step=first))
        hp_sgd = reference.get("sgd").spec.resolve(
            dict(lr=0.05, momentum=0.9, dampening=dampening, weight_decay=wd, first_step=first),
            dialect="torch")
        b = oh.trajectory(sgd, params, grads, **hp_sgd)
        assert oh.rel(a[-1][0], b[-1][0]) < 1e-13
        assert oh.rel(a[-1][1]["momentum_buffer"], b[-1][1]["momentum_buffer"]) < 1e-13


# ------------------------------------------------------------------------------------------
# Deterministic conventions
# ------------------------------------------------------------------------------------------


def test_zero_gradient_rules():
    """||g|| = 0, wd > 0: ratio 1 (timm, optax), untouched (apex LARC), tc/wd (pytorch_optimizer)."""
    w = {"w": np.array([[1.0, -2.0], [3.0, 0.5]])}
    g = {"w": np.zeros((2, 2))}
    lr, wd, tc = 0.5, 0.1, 0.01
    expected = {"one": lr * wd * w["w"], "skip": 0.0 * w["w"], "denominator": lr * tc * w["w"]}
    for rule, delta in expected.items():
        hp = _hp(lr=lr, momentum=0.0, weight_decay=wd, trust_coefficient=tc, zero_norm_rule=rule)
        new, _ = lars.step(w, g, lars.init(w, **hp), **hp)
        np.testing.assert_allclose(new["w"], w["w"] - delta, rtol=1e-15, atol=0)
    # ||w|| = 0: the ratio is 1 for every rule (the decay term is 0 anyway)
    w0, g1 = {"w": np.zeros((2, 2))}, {"w": np.ones((2, 2))}
    for rule in expected:
        hp = _hp(lr=lr, momentum=0.0, weight_decay=wd, zero_norm_rule=rule)
        new, _ = lars.step(w0, g1, lars.init(w0, **hp), **hp)
        np.testing.assert_allclose(new["w"], -lr * g1["w"], rtol=1e-15)


def test_always_adapt_false_skips_undecayed_tensors():
    """timm: with wd = 0 on a tensor (the factory's no-decay group) the step is plain SGD."""
    rng = np.random.default_rng(3)
    params = oh.tree(rng, SHAPES)
    g = oh.gradients(3, 1, SHAPES)[0]
    hp = _hp("timm", lr=0.1, momentum=0.0, weight_decay=1e-2, weight_decay_mask="ndim>=2")
    new, _ = lars.step(params, g, lars.init(params, **hp), **hp)
    for p, w in params.items():
        if w.ndim < 2:
            np.testing.assert_allclose(new[p], w - 0.1 * g[p], rtol=1e-15)
        else:
            assert np.linalg.norm(new[p] - w) < 1e-2 * np.linalg.norm(0.1 * g[p])


def test_raw_function_keeps_float32_and_harness_form():
    rng = np.random.default_rng(0)
    params = oh.as_float32(oh.tree(rng, SHAPES))
    g = oh.as_float32(oh.gradients(0, 1, SHAPES)[0])
    for dialect in ("paper", "timm", "apex_larc", "optax", "pytorch_optimizer"):
        hp = _hp(dialect, lr=0.5, weight_decay=1e-3)
        state = lars.init.__wrapped__(params, **hp)
        new, state = lars.step.__wrapped__(params, g, state, **hp)
        new, state = lars.step.__wrapped__(new, g, state, **hp)
        assert all(v.dtype == np.float32 for v in new.values()), dialect
    flat = oh.flat(params, g)
    out, state = OP.apply(flat, None, lr=0.5, weight_decay=1e-3)
    assert set(out) == {f"params/{p}" for p in SHAPES}
    assert set(state) == {"step", *(f"momentum_buffer/{p}" for p in SHAPES)}
    out2, _ = OP.apply(flat, state, lr=0.5, weight_decay=1e-3)
    assert all(out2[k].dtype == np.float64 for k in out2)


# ------------------------------------------------------------------------------------------
# Frameworks (float64 trajectories)
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def optax_x64():
    return oh.optax_x64()


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_optax_lars_trajectory(optax_x64, nesterov, masked):
    _, optax = optax_x64
    params = oh.tree(np.random.default_rng(11), SHAPES)
    grads = oh.gradients(11, len(LRS), SHAPES)
    mask = "ndim>=2" if masked else "all"
    hp = _hp("optax", momentum=0.9, nesterov=nesterov, weight_decay=1e-2, eps=1e-9,
             trust_coefficient=2e-3, weight_decay_mask=mask, trust_mask=mask)
    ours = oh.trajectory(lars, params, grads, LRS, **hp)
    tree_mask = {p: (len(s) >= 2 or not masked) for p, s in SHAPES.items()}
    tx = optax.lars(oh.optax_schedule(LRS), weight_decay=1e-2, weight_decay_mask=tree_mask,
                    trust_coefficient=2e-3, eps=1e-9, trust_ratio_mask=tree_mask, momentum=0.9,
                    nesterov=nesterov)
    theirs = oh.optax_steps(tx, params, grads, jit=True)
    for (p_ours, s_ours), (p_theirs, s_theirs) in zip(ours, theirs, strict=True):
        assert oh.rel(p_theirs, p_ours) < 1e-12
        trace = {p: -np.asarray(v) for p, v in s_theirs[-1].trace.items()}
        assert oh.rel(trace, s_ours["momentum_buffer"]) < 1e-12
    # optax's ||g + wd w|| is not the paper's ||g|| + wd ||w||
    paper = oh.trajectory(lars, params, grads, LRS, **dict(hp, trust_denominator="sum_of_norms"))
    assert oh.rel(paper[-1][0], ours[-1][0]) > 1e-9


def test_optax_lars_through_the_adapter_mapping(optax_x64):
    from conformance.adapters import load_adapter

    adapter = load_adapter("jax")
    support = adapter.ops()["lars"]
    params = oh.tree(np.random.default_rng(5), SHAPES)
    grads = oh.gradients(5, len(LRS), SHAPES)
    for extra in (dict(momentum=0.9, weight_decay=1e-2),
                  dict(momentum=0.9, nesterov=True, weight_decay=1e-2, weight_decay_mask="ndim>=2",
                       always_adapt=False),
                  dict(momentum=0.0, weight_decay=1e-3, eps=1e-6)):
        hp = OP.spec.resolve({**support.dialect, **extra})
        steps = oh.adapter_trajectory(adapter, "lars", hp, params, grads, LRS)
        assert support.not_kept == ("step",)  # optax.lars keeps no count: the harness supplies it
        for theirs, state_theirs, ours, state_ours in steps:
            assert set(state_theirs) == set(state_ours)
            assert oh.rel(theirs, ours) < 1e-12
            if "momentum_buffer/fc/weight" in state_ours:
                buf = {p: state_ours[f"momentum_buffer/{p}"] for p in SHAPES}
                assert oh.rel({p: state_theirs[f"momentum_buffer/{p}"] for p in SHAPES}, buf) < 1e-12


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("nesterov,dampening", [(False, 0.0), (True, 0.0), (False, 0.2)])
def test_pytorch_optimizer_lars_trajectory(foreach, nesterov, dampening):
    pytest.importorskip("torch")
    po = pytest.importorskip("pytorch_optimizer")
    params = oh.tree(np.random.default_rng(7), SHAPES)
    grads = oh.gradients(7, len(LRS), SHAPES)
    hp = _hp("pytorch_optimizer", momentum=0.9, nesterov=nesterov, dampening=dampening,
             weight_decay=1e-2, trust_coefficient=1e-2)
    ours = oh.trajectory(lars, params, grads, LRS, **hp)
    tensors = oh.torch_tensors(params)
    opt = po.LARS(list(tensors.values()), lr=1.0, momentum=0.9, nesterov=nesterov,
                  dampening=dampening, weight_decay=1e-2, trust_coefficient=1e-2, foreach=foreach)
    theirs = oh.torch_steps(opt, tensors, grads, LRS, slots=("momentum_buffer",))
    for (w, state), (w_ours, s_ours) in zip(theirs, ours, strict=True):
        assert oh.rel(w, w_ours) < 1e-12
        assert oh.rel(state["momentum_buffer"], s_ours["momentum_buffer"]) < 1e-12


def test_pytorch_optimizer_is_not_timm():
    """Its 1-D tensors get no decay and no ratio; timm's defaults decay and adapt every tensor."""
    rng = np.random.default_rng(9)
    params = oh.tree(rng, SHAPES)
    grads = oh.gradients(9, 4, SHAPES)
    a = oh.trajectory(lars, params, grads, **_hp("pytorch_optimizer", weight_decay=1e-2))
    b = oh.trajectory(lars, params, grads, **_hp("timm", weight_decay=1e-2))
    assert oh.rel(a[-1][0], b[-1][0]) > 1e-6
