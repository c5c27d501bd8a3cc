"""LAMB (reference/optimizers/lamb.py): invariants, optax / pytorch_optimizer trajectories, the
trust scope and pre-clip conventions (bad input: the spec's [[error_cases]])."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optim_helpers as oh
import reference
from reference.optimizers import adam, lamb

SHAPES = {**oh.SHAPES_NO_BN_BIAS, "fc/bias": (5,)}
OP = reference.get("lamb")


def _hp(dialect: str | None = None, **overrides):
    return OP.spec.resolve(overrides, dialect=dialect)


LRS = [1e-2] * 6 + [1e-3] * 6  # a mid-run drop


# ------------------------------------------------------------------------------------------
# Invariants (hypothesis)
# ------------------------------------------------------------------------------------------

seeds = st.integers(0, 2**31 - 1)
corrections = st.sampled_from(["adam", "none"])


@settings(max_examples=20)
@given(seed=seeds, lr=st.floats(1e-2, 1.0), correction=corrections, averaging=st.booleans(),
       eps=st.sampled_from([0.0, 1e-6, 1e-2]))
def test_step_norm_is_lr_weight_norm(seed, lr, correction, averaging, eps):
    """wd 0, every tensor adapted, no clip: ||delta w|| = lr ||w|| per tensor at every step."""
    rng = np.random.default_rng(seed)
    params = oh.tree(rng, SHAPES)
    hp = _hp(lr=lr, weight_decay=0.0, eps=eps, bias_correction=correction, grad_averaging=averaging)
    prev = params
    for new, _ in oh.trajectory(lamb, params, oh.gradients(seed, 4, SHAPES), **hp):
        for p in SHAPES:
            tol = 1e-12 + 2.3e-16 / lr  # ulp(w) / ||delta w|| of the subtraction w - new
            assert np.linalg.norm(new[p] - prev[p]) == pytest.approx(
                lr * np.linalg.norm(prev[p]), rel=tol)
        prev = new


@settings(max_examples=20)
@given(seed=seeds, eps=st.sampled_from([1e-8, 1e-6, 1e-2]), beta1=st.sampled_from([0.0, 0.9]))
def test_direction_is_adam_direction(seed, eps, beta1):
    """wd 0: delta w_t = -lr ||w_t|| d_t / ||d_t|| with d_t the Adam direction of the same
    gradients (with wd = 0 the moments do not depend on the parameters)."""
    rng = np.random.default_rng(seed)
    params = oh.tree(rng, SHAPES)
    grads = oh.gradients(seed, 5, SHAPES)
    hp = _hp(lr=0.05, weight_decay=0.0, eps=eps, beta1=beta1)
    ours = oh.trajectory(lamb, params, grads, **hp)
    hp_adam = reference.get("adam").spec.resolve(dict(lr=1.0, eps=eps, beta1=beta1), dialect="torch")
    adam_trace = oh.trajectory(adam, params, grads, **hp_adam)
    prev_lamb, prev_adam = params, params
    for (new, _), (new_adam, _) in zip(ours, adam_trace, strict=True):
        for p in SHAPES:
            d = prev_adam[p] - new_adam[p]  # lr = 1: the Adam direction itself
            expected = prev_lamb[p] - 0.05 * np.linalg.norm(prev_lamb[p]) * d / np.linalg.norm(d)
            np.testing.assert_allclose(new[p], expected, rtol=1e-12, atol=1e-14)
        prev_lamb, prev_adam = new, new_adam


@settings(max_examples=20)
@given(seed=seeds, wd=st.sampled_from([0.0, 1e-2, 0.1]), mask=st.sampled_from(["all", "ndim>=2"]))
def test_no_adaptation_equals_adamw(seed, wd, mask):
    """trust_mask = none with the update-form decay is AdamW (decoupled, lr-scaled)."""
    rng = np.random.default_rng(seed)
    params = oh.tree(rng, SHAPES)
    grads = oh.gradients(seed, 6, SHAPES)
    a = oh.trajectory(lamb, params, grads, LRS, **_hp(weight_decay=wd, weight_decay_mask=mask,
                                                      trust_mask="none", eps=1e-8))
    hp_w = reference.get("adamw").spec.resolve(dict(weight_decay=wd, weight_decay_mask=mask,
                                                    eps=1e-8), dialect="torch")
    b = oh.trajectory(adam, params, grads, LRS, **hp_w)
    assert oh.rel(a[-1][0], b[-1][0]) < 1e-13
    assert oh.rel(a[-1][1]["exp_avg_sq"], b[-1][1]["exp_avg_sq"]) < 1e-14


@settings(max_examples=20)
@given(seed=seeds, w_scale=st.floats(1e-2, 1e2), wd=st.sampled_from([0.0, 0.1]))
def test_trust_clip_ratio_at_most_one(seed, w_scale, wd):
    """LAMBC: ||delta w|| <= lr ||u||, with equality when ||w|| >= ||u||."""
    rng = np.random.default_rng(seed)
    params = oh.tree(rng, SHAPES, w_scale)
    g = oh.gradients(seed, 1, SHAPES)[0]
    lr = 1e-2
    hp = _hp(lr=lr, weight_decay=wd, trust_clip=True, weight_decay_mode="update")
    new, _ = lamb.step(params, g, lamb.init(params, **hp), **hp)
    no_trust = dict(hp, trust_mask="none")
    plain, _ = lamb.step(params, g, lamb.init(params, **no_trust), **no_trust)
    for p, w in params.items():
        u_norm = np.linalg.norm(w - plain[p]) / lr
        step = np.linalg.norm(w - new[p])
        tol = 1e-12 + 2.3e-16 * np.linalg.norm(w) / step
        assert step <= lr * u_norm * (1 + tol)
        assert step == pytest.approx(lr * min(np.linalg.norm(w), u_norm), rel=max(tol, 1e-11))


@settings(max_examples=20)
@given(seed=seeds, clip=st.floats(1e-2, 10.0), c=st.floats(1.0, 1e3))
def test_global_clip_bounds_gradient_norm(seed, clip, c):
    """apex/timm pre-clip: the moments see g min(1, clip / N); once N > clip, scaling every
    gradient changes nothing."""
    rng = np.random.default_rng(seed)
    params = oh.tree(rng, SHAPES)
    g = oh.gradients(seed, 1, SHAPES)[0]
    hp = _hp("timm", global_clip=clip)
    new, state = lamb.step(params, g, lamb.init(params, **hp), **hp)
    n = np.sqrt(sum(np.sum(v**2) for v in g.values()))
    seen = np.sqrt(sum(np.sum((m / 0.1) ** 2) for m in state["exp_avg"].values()))
    assert seen == pytest.approx(min(n, clip), rel=1e-12)
    if n > clip:
        big = {p: c * v for p, v in g.items()}
        new_big, _ = lamb.step(params, big, lamb.init(params, **hp), **hp)
        assert oh.rel(new_big, new) < 1e-13


# ------------------------------------------------------------------------------------------
# Deterministic conventions
# ------------------------------------------------------------------------------------------


def test_trust_scope_decayed_only_moves_undecayed_as_adam():
    rng = np.random.default_rng(1)
    params = oh.tree(rng, SHAPES)
    g = oh.gradients(1, 1, SHAPES)[0]
    hp = _hp("apex", lr=1e-2, weight_decay_mask="ndim>=2", global_clip=None)
    new, _ = lamb.step(params, g, lamb.init(params, **hp), **hp)
    for p, w in params.items():
        if w.ndim < 2:  # Adam's first step: lr sign(g) up to eps
            np.testing.assert_allclose(new[p], w - 1e-2 * g[p] / (np.abs(g[p]) + 1e-6), rtol=1e-14)
        else:
            assert np.linalg.norm(new[p] - w) == pytest.approx(1e-2 * np.linalg.norm(w), rel=1e-12)


def test_m_step_and_phi_bounds():
    """pytorch_optimizer: ||delta w|| = lr / (1 - beta1^t) min(||w||, 10) ||u|| / (||u|| + eps)."""
    rng = np.random.default_rng(2)
    params = oh.tree(rng, SHAPES, 5.0)  # ||conv/weight|| ~ 30 > 10: clamped
    grads = oh.gradients(2, 3, SHAPES)
    hp = _hp("pytorch_optimizer", lr=1e-2, weight_decay=0.0, trust_eps=0.0)
    prev = params
    for t, (new, _) in enumerate(oh.trajectory(lamb, params, grads, **hp), start=1):
        for p in SHAPES:
            phi = min(np.linalg.norm(prev[p]), 10.0)
            assert np.linalg.norm(new[p] - prev[p]) == pytest.approx(
                1e-2 / (1 - 0.9**t) * phi, rel=1e-11)
        prev = new


def test_raw_function_keeps_float32_and_harness_form():
    rng = np.random.default_rng(0)
    params = oh.as_float32(oh.tree(rng, SHAPES))
    g = oh.as_float32(oh.gradients(0, 1, SHAPES)[0])
    for dialect in OP.spec.dialects:
        hp = _hp(dialect, lr=1e-2, weight_decay=1e-2)
        state = lamb.init.__wrapped__(params, **hp)
        new, state = lamb.step.__wrapped__(params, g, state, **hp)
        new, state = lamb.step.__wrapped__(new, g, state, **hp)
        assert all(v.dtype == np.float32 for v in new.values()), dialect
        assert all(v.dtype == np.float32 for v in state["exp_avg_sq"].values()), dialect
    flat = oh.flat(params, g)
    out, state = OP.apply(flat, None, lr=1e-2)
    assert set(out) == {f"params/{p}" for p in SHAPES}
    assert set(state) == {"step", *(f"{s}/{p}" for s in ("exp_avg", "exp_avg_sq") for p in SHAPES)}
    out2, _ = OP.apply(flat, state, lr=1e-2, global_clip=1.0)
    assert all(out2[k].dtype == np.float64 for k in out2)


# ------------------------------------------------------------------------------------------
# Frameworks (float64 trajectories)
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def optax_x64():
    return oh.optax_x64()


@pytest.mark.parametrize("masked,clip,eps_root", [(False, None, 0.0), (True, None, 1e-10),
                                                  (True, 0.5, 0.0)])
def test_optax_lamb_trajectory(optax_x64, masked, clip, eps_root):
    _, optax = optax_x64
    params = oh.tree(np.random.default_rng(11), SHAPES)
    grads = oh.gradients(11, len(LRS), SHAPES)
    mask = "ndim>=2" if masked else "all"
    hp = _hp("optax", weight_decay=1e-2, weight_decay_mask=mask, eps_root=eps_root, global_clip=clip)
    ours = oh.trajectory(lamb, params, grads, LRS, **hp)
    tree_mask = {p: (len(s) >= 2 or not masked) for p, s in SHAPES.items()}
    tx = optax.lamb(oh.optax_schedule(LRS), eps_root=eps_root, weight_decay=1e-2, mask=tree_mask)
    if clip is not None:
        tx = optax.chain(optax.clip_by_global_norm(clip), tx)
    for (w, state), (w_ours, s_ours) in zip(oh.optax_steps(tx, params, grads, jit=True), ours, strict=True):
        assert oh.rel(w, w_ours) < 1e-12
        adam_state = state[-1][0] if clip is not None else state[0]
        assert oh.rel(adam_state.mu, s_ours["exp_avg"]) < 1e-12
        assert oh.rel(adam_state.nu, s_ours["exp_avg_sq"]) < 1e-12


def test_optax_lamb_through_the_adapter_mapping(optax_x64):
    from conformance.adapters import Request, Unsupported, load_adapter

    adapter = load_adapter("jax")
    support = adapter.ops()["lamb"]
    params = oh.tree(np.random.default_rng(5), SHAPES)
    grads = oh.gradients(5, len(LRS), SHAPES)
    for extra in (dict(weight_decay=1e-2), dict(weight_decay=1e-2, weight_decay_mask="ndim>=2",
                                                global_clip=1.0, eps_root=1e-12)):
        hp = OP.spec.resolve({**support.dialect, **extra})
        steps = oh.adapter_trajectory(adapter, "lamb", hp, params, grads, LRS)
        for theirs, state_theirs, ours, state_ours in steps:
            assert set(state_theirs) == set(state_ours)
            assert oh.rel(theirs, ours) < 1e-12
            for slot in ("exp_avg", "exp_avg_sq"):
                assert oh.rel({p: state_theirs[f"{slot}/{p}"] for p in SHAPES},
                              {p: state_ours[f"{slot}/{p}"] for p in SHAPES}) < 1e-12
    # optax.lamb adapts every tensor: a decayed-only scope with a wd mask is not expressible
    hp = OP.spec.resolve({**support.dialect, "trust_scope": "decayed_only",
                          "weight_decay_mask": "ndim>=2"})
    req_in = oh.flat(params, grads[0])
    with pytest.raises(Unsupported, match="trust ratio"):
        adapter.evaluate("lamb", Request("lamb", "float64", req_in,
                                         OP.init_state(req_in, **hp), hp, None))


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("variant", ["default", "update_decay", "fixed_decay", "no_averaging"])
def test_pytorch_optimizer_lamb_trajectory(foreach, variant):
    pytest.importorskip("torch")
    po = pytest.importorskip("pytorch_optimizer")
    params = oh.tree(np.random.default_rng(7), SHAPES)
    grads = oh.gradients(7, len(LRS), SHAPES)
    kwargs, knobs = {}, {}
    if variant == "update_decay":
        kwargs, knobs = {"weight_decouple": False}, {"weight_decay_mode": "update"}
    elif variant == "fixed_decay":
        kwargs, knobs = {"fixed_decay": True}, {"weight_decay_mode": "decoupled_nolr"}
    elif variant == "no_averaging":
        kwargs, knobs = {"grad_averaging": False}, {"grad_averaging": False}
    hp = _hp("pytorch_optimizer", weight_decay=1e-2, **knobs)
    ours = oh.trajectory(lamb, params, grads, LRS, **hp)
    tensors = oh.torch_tensors(params)
    opt = po.Lamb(list(tensors.values()), lr=LRS[0], weight_decay=1e-2, foreach=foreach, **kwargs)
    theirs = oh.torch_steps(opt, tensors, grads, LRS, slots=("exp_avg_sq",))
    for (w, state), (w_ours, s_ours) in zip(theirs, ours, strict=True):
        assert oh.rel(w, w_ours) < 1e-12
        assert oh.rel(state["exp_avg_sq"], s_ours["exp_avg_sq"]) < 1e-12


def test_pytorch_optimizer_lamb_pre_norm():
    """pre_norm: g min(1, c / (N + eps)), N computed in float32 by pytorch_optimizer (so ~1e-7)."""
    pytest.importorskip("torch")
    po = pytest.importorskip("pytorch_optimizer")
    params = oh.tree(np.random.default_rng(8), SHAPES)
    grads = oh.gradients(8, 6, SHAPES)
    hp = _hp("pytorch_optimizer", lr=1e-2, weight_decay=1e-2, global_clip=1.0, global_clip_eps=1e-6)
    ours = oh.trajectory(lamb, params, grads, **hp)
    tensors = oh.torch_tensors(params)
    opt = po.Lamb(list(tensors.values()), lr=1e-2, weight_decay=1e-2, pre_norm=True,
                  max_grad_norm=1.0, foreach=False)
    for (_, state), (_, s_ours) in zip(oh.torch_steps(opt, tensors, grads, slots=("exp_avg",)), ours,
                                       strict=True):
        assert oh.rel(state["exp_avg"], s_ours["exp_avg"]) < 1e-6
    unclipped = oh.trajectory(lamb, params, grads, **dict(hp, global_clip=None))
    assert oh.rel(unclipped[-1][1]["exp_avg"], ours[-1][1]["exp_avg"]) > 1e-2


def test_dialects_disagree_where_the_notes_say():
    """apex/timm (pre-clip, decayed-only scope) vs optax/TFA (neither) vs pytorch_optimizer."""
    rng = np.random.default_rng(4)
    params = oh.tree(rng, SHAPES)
    grads = oh.gradients(4, 5, SHAPES)
    common = dict(lr=1e-2, weight_decay=1e-2, weight_decay_mask="ndim>=2", eps=1e-6)
    runs = {d: oh.trajectory(lamb, params, grads, **_hp(d, **common))[-1][0]
            for d in ("optax", "timm", "pytorch_optimizer", "paper_v1")}
    names = list(runs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert oh.rel(runs[a], runs[b]) > 1e-6, (a, b)
