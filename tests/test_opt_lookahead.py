"""Lookahead (reference/optimizers/lookahead.py): the invariants of Algorithm 1, optax and
pytorch_optimizer trajectories, the optax adapter mapping, a bad state (other bad input: the spec's
[[error_cases]])."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optim_helpers as oh
import reference
from reference.optimizers import adam, lookahead, sgd

OP = reference.get("lookahead")
SHAPES = {"conv/weight": (4, 3, 3, 3), "conv/bias": (4,), "fc/weight": (5, 6)}
LR_FACTORS = [1.0] * 7 + [0.1] * 7   # a mid-run lr change

seeds = st.integers(0, 2**31 - 1)
inners = st.sampled_from([
    {"inner": "sgd", "lr": 0.05},
    {"inner": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-2},
    {"inner": "adam", "lr": 1e-2},
    {"inner": "adam", "lr": 1e-2, "weight_decay": 1e-2, "weight_decay_mode": "decoupled_lr"},
])


def _params(seed: int) -> dict[str, np.ndarray]:
    return oh.tree(np.random.default_rng([seed, 1]), SHAPES)


def _grads(seed: int, k: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, 2, k])
    return {p: 10.0 ** rng.uniform(-1, 1) * rng.standard_normal(s) for p, s in SHAPES.items()}


def _inner_module(inner: str):
    return sgd if inner == "sgd" else adam


def _inner_hp(hp: dict) -> dict:
    keys = ["lr", "weight_decay", "weight_decay_mode"]
    keys += ["momentum"] if hp["inner"] == "sgd" else ["beta1", "beta2", "eps"]
    return {k: hp[k] for k in keys}


# ------------------------------------------------------------------------------------------
# Invariants (hypothesis)
# ------------------------------------------------------------------------------------------


@settings(max_examples=15)
@given(seed=seeds, base=inners, k=st.integers(1, 4), steps=st.integers(1, 9))
def test_alpha1_equals_inner_optimizer(seed, base, k, steps):
    """alpha = 1: the slow weights jump to the fast ones, so syncing changes nothing."""
    hp = OP.spec.resolve({**base, "k": k, "alpha": 1.0})
    module, ihp = _inner_module(hp["inner"]), _inner_hp(hp)
    params = _params(seed)
    la_p, la_s = params, lookahead.init(params, **hp)
    in_p, in_s = params, module.init(params, **ihp)
    for t in range(steps):
        g = _grads(seed, t)
        la_p, la_s = lookahead.step(la_p, g, la_s, **hp)
        in_p, in_s = module.step(in_p, g, in_s, **ihp)
        # phi + 1 (theta - phi) is theta up to one rounding (the paper's form, as optax/timm)
        for p in params:
            np.testing.assert_allclose(la_p[p], in_p[p], rtol=1e-12, atol=1e-14)
        for slot, value in in_s.items():
            mine = la_s["inner_" + slot]
            if isinstance(value, dict):
                for p in params:
                    np.testing.assert_allclose(mine[p], value[p], rtol=1e-12, atol=1e-14)
            else:
                assert float(mine) == float(value)


@settings(max_examples=15)
@given(seed=seeds, base=inners, alpha=st.floats(0.05, 0.95), steps=st.integers(1, 6))
def test_k1_slow_is_ema_of_inner_steps(seed, base, alpha, steps):
    """k = 1: every step syncs, phi_t = (1 - alpha) phi_{t-1} + alpha A(phi_{t-1})."""
    hp = OP.spec.resolve({**base, "k": 1, "alpha": alpha})
    module, ihp = _inner_module(hp["inner"]), _inner_hp(hp)
    params = _params(seed)
    state = lookahead.init(params, **hp)
    for t in range(steps):
        g = _grads(seed, t)
        inner_state = {key[len("inner_"):]: v for key, v in state.items() if key.startswith("inner_")}
        proposed, _ = module.step(params, g, inner_state, **ihp)
        slow_before = state["slow"]
        params, state = lookahead.step(params, g, state, **hp)
        for p in params:
            expect = (1 - alpha) * slow_before[p] + alpha * proposed[p]
            np.testing.assert_allclose(state["slow"][p], expect, rtol=1e-13, atol=1e-15)
            np.testing.assert_array_equal(params[p], state["slow"][p])


@settings(max_examples=15)
@given(seed=seeds, base=inners, k=st.integers(1, 5), alpha=st.floats(0.0, 1.0),
       steps=st.integers(1, 12), reset=st.booleans())
def test_fast_equals_slow_after_sync(seed, base, k, alpha, steps, reset):
    """After the steps k, 2k, ... fast == slow exactly; between them slow does not move; with
    reset_state the inner optimizer restarts from its initial state after each sync."""
    hp = OP.spec.resolve({**base, "k": k, "alpha": alpha, "reset_state": reset})
    params = _params(seed)
    state = lookahead.init(params, **hp)
    for t in range(1, steps + 1):
        slow_before = state["slow"]
        params, state = lookahead.step(params, _grads(seed, t), state, **hp)
        assert float(state["step"]) == t
        if t % k == 0:
            for p in params:
                np.testing.assert_array_equal(params[p], state["slow"][p])
            assert float(state["inner_step"]) == (0 if reset else t)
            if reset and hp["inner"] == "adam":
                assert not np.any(state["inner_exp_avg"]["fc/weight"])
        else:
            for p in params:
                np.testing.assert_array_equal(state["slow"][p], slow_before[p])
            assert float(state["inner_step"]) == (t % k if reset else t)


@settings(max_examples=15)
@given(seed=seeds, base=inners, k=st.integers(1, 4), alpha=st.floats(0.0, 0.99))
def test_first_sync_is_noop_with_first_sync_init(seed, base, k, alpha):
    """timm's lazily created slow buffer: the first k steps are the inner optimizer's, the first
    sync leaves everything where it is, the second interpolates from the weights at step k."""
    hp = OP.spec.resolve({**base, "k": k, "alpha": alpha, "slow_init": "first_sync"})
    module, ihp = _inner_module(hp["inner"]), _inner_hp(hp)
    params = _params(seed)
    la_p, la_s = params, lookahead.init(params, **hp)
    in_p, in_s = params, module.init(params, **ihp)
    for t in range(1, 2 * k + 1):
        g = _grads(seed, t)
        la_p, la_s = lookahead.step(la_p, g, la_s, **hp)
        in_p, in_s = module.step(in_p, g, in_s, **ihp)
        if t == k:
            at_k = dict(in_p)
            for p in params:
                np.testing.assert_array_equal(la_p[p], in_p[p])
                np.testing.assert_array_equal(la_s["slow"][p], in_p[p])
    for p in params:
        np.testing.assert_allclose(la_p[p], at_k[p] + alpha * (in_p[p] - at_k[p]), rtol=1e-13,
                                   atol=1e-15)


@settings(max_examples=10)
@given(seed=seeds, base=inners, k=st.integers(1, 4))
def test_alpha0_returns_to_the_initial_weights(seed, base, k):
    """alpha = 0 with slow = the initial params: every sync puts the fast weights back."""
    hp = OP.spec.resolve({**base, "k": k, "alpha": 0.0})
    params0 = _params(seed)
    params, state = params0, lookahead.init(params0, **hp)
    for t in range(1, 2 * k + 1):
        params, state = lookahead.step(params, _grads(seed, t), state, **hp)
        if t % k == 0:
            for p in params0:
                np.testing.assert_array_equal(params[p], params0[p])


# ------------------------------------------------------------------------------------------
# Framework trajectories (float64)
# ------------------------------------------------------------------------------------------


def _torch_trajectory(make, hp, seed=3):
    pytest.importorskip("torch")
    return oh.torch_vs_oracle(make, lookahead, hp, _params(seed), lambda t, _: _grads(seed, t), LR_FACTORS)


def _torch_inner(hp):
    import torch

    if hp["inner"] == "sgd":
        return lambda ps: torch.optim.SGD(ps, lr=hp["lr"], momentum=hp["momentum"],
                                          weight_decay=hp["weight_decay"])
    cls = torch.optim.AdamW if hp["weight_decay_mode"] == "decoupled_lr" else torch.optim.Adam
    return lambda ps: cls(ps, lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"],
                          weight_decay=hp["weight_decay"])


@pytest.mark.parametrize("base", [
    {"inner": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3},
    {"inner": "adam", "lr": 1e-2, "weight_decay": 1e-2},
    {"inner": "adam", "lr": 1e-2, "weight_decay": 1e-2, "weight_decay_mode": "decoupled_lr"},
])
def test_matches_pytorch_optimizer(base):
    po = pytest.importorskip("pytorch_optimizer")
    hp = OP.spec.resolve({**base, "k": 3, "alpha": 0.6}, dialect="pytorch_optimizer")
    inner = _torch_inner(hp)
    assert _torch_trajectory(lambda ps: po.Lookahead(inner(ps), k=3, alpha=0.6), hp) < 1e-12
    # the lazily initialized slow weights of timm are a different trajectory
    assert _torch_trajectory(lambda ps: po.Lookahead(inner(ps), k=3, alpha=0.6),
                             {**hp, "slow_init": "first_sync"}) > 1e-6
    if hp["inner"] == "sgd":   # pullback_momentum="reset" zeroes the SGD buffer at each sync
        assert _torch_trajectory(
            lambda ps: po.Lookahead(inner(ps), k=3, alpha=0.6, pullback_momentum="reset"),
            {**hp, "reset_state": True}) < 1e-12


def test_matches_timm():
    """timm's Lookahead (slow buffer created at the first sync), when timm is installed."""
    timm_optim = pytest.importorskip("timm.optim")
    hp = OP.spec.resolve({"inner": "sgd", "lr": 0.05, "momentum": 0.9, "k": 3, "alpha": 0.6},
                         dialect="timm")
    assert hp["slow_init"] == "first_sync"
    inner = _torch_inner(hp)
    assert _torch_trajectory(lambda ps: timm_optim.Lookahead(inner(ps), alpha=0.6, k=3), hp) < 1e-12


def _optax_fast(optax, hp, lr):
    decay = [optax.add_decayed_weights(hp["weight_decay"])] if hp["weight_decay"] else []
    if hp["inner"] == "sgd":
        return optax.chain(*decay, optax.sgd(lr, momentum=hp["momentum"] or None))
    return optax.chain(*decay, optax.adam(lr, b1=hp["beta1"], b2=hp["beta2"], eps=hp["eps"]))


@pytest.mark.parametrize("base", [
    {"inner": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3},
    {"inner": "sgd", "lr": 0.05, "momentum": 0.9, "reset_state": True},
    {"inner": "adam", "lr": 1e-2, "weight_decay": 1e-2, "reset_state": True},
    {"inner": "adam", "lr": 1e-2, "k": 1},
])
def test_matches_optax(base):
    _, optax = oh.optax_x64()
    import jax.numpy as jnp

    hp = OP.spec.resolve({"k": 3, "alpha": 0.6, **base}, dialect="optax")
    seed = 5
    params = _params(seed)
    state = lookahead.init(params, **hp)
    lp = optax.LookaheadParams.init_synced({p: jnp.asarray(v) for p, v in params.items()})

    def make(lr):   # lr is a constant of the transform: rebuilt per step, same state layout
        return optax.lookahead(_optax_fast(optax, hp, lr), sync_period=hp["k"],
                               slow_step_size=hp["alpha"], reset_state=hp["reset_state"])

    ostate = make(hp["lr"]).init(lp)
    worst = 0.0
    for t in range(14):
        lr = hp["lr"] * LR_FACTORS[t]
        g = _grads(seed, t)
        updates, ostate = make(lr).update({p: jnp.asarray(v) for p, v in g.items()}, ostate, lp)
        lp = optax.apply_updates(lp, updates)
        params, state = lookahead.step(params, g, state, **{**hp, "lr": lr})
        worst = max(worst, oh.rel(lp.fast, params), oh.rel(lp.slow, state["slow"]))
        assert int(ostate.steps_since_sync) == (t + 1) % hp["k"]
    assert worst < 1e-12


def test_optax_adapter_mapping():
    """conformance/adapters/_optax_lookahead.py: from init and from non-trivial states (through
    syncs and resets), float64, every output and state slot."""
    pytest.importorskip("optax")
    from conformance.adapters import Request, load_adapter

    adapter = load_adapter("jax")
    support = adapter.ops()["lookahead"]
    assert support.dialect == {"slow_init": "params"}
    rng = np.random.default_rng(11)
    for base in ({"inner": "sgd", "momentum": 0.9, "weight_decay": 1e-2},
                 {"inner": "sgd", "weight_decay": 1e-2, "weight_decay_mode": "decoupled_lr",
                  "momentum": 0.5, "reset_state": True},
                 {"inner": "adam", "weight_decay": 1e-2, "weight_decay_mode": "decoupled_lr",
                  "reset_state": True}):
        hp = OP.spec.resolve({**support.dialect, "lr": 0.1, "k": 2, "alpha": 0.3, **base})
        steps = oh.adapter_steps(adapter, "lookahead", hp, rng, {"w": (4, 3), "b": (4,)}, steps=5)
        assert support.not_kept == ("step", "inner_step")
        for step_inputs, r, out, new_state in steps:
            assert set(r.state) == set(oh.kept(new_state, support.not_kept))
            assert oh.rel(r.outputs, out) < 1e-13
            assert oh.rel(r.state, oh.kept(new_state, support.not_kept)) < 1e-13
            inputs = {**step_inputs, **out}
    with pytest.raises(Exception, match="slow_init"):
        hp = OP.spec.resolve({"slow_init": "first_sync"})
        adapter.evaluate("lookahead", Request("lookahead", "float64", dict(inputs), None, hp, None))


# ------------------------------------------------------------------------------------------
# The harness form, lower precision, bad input
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("inner", ["sgd", "adam"])
def test_flat_apply_and_float32(inner):
    params = _params(0)
    flat = oh.flat(params, _grads(0, 0))
    hp = {"lr": 0.01, "inner": inner, "momentum": 0.9 if inner == "sgd" else 0.0, "k": 2}
    out, state = OP.apply(flat, None, **hp)
    out, state = OP.apply({**flat, **out}, state, **hp)
    assert set(out) == {f"params/{p}" for p in params}
    assert state["step"] == 2.0
    expected_slots = {"slow", "inner_momentum_buffer"} if inner == "sgd" else {
        "slow", "inner_exp_avg", "inner_exp_avg_sq"}
    assert {k.split("/")[0] for k in state} == {"step", "inner_step"} | expected_slots
    full = OP.spec.resolve(hp)
    p32, g32 = oh.as_float32(params), oh.as_float32(_grads(0, 0))
    s32 = lookahead.init.__wrapped__(p32, **full)
    for _ in range(2):
        p32, s32 = lookahead.step.__wrapped__(p32, g32, s32, **full)
    for p in params:
        assert p32[p].dtype == np.float32 and s32["slow"][p].dtype == np.float32
        np.testing.assert_allclose(p32[p], out[f"params/{p}"], rtol=1e-5, atol=1e-6)


# The rest of the bad input is the spec's [[error_cases]]; this one needs a specific state.
def test_state_of_another_inner_optimizer_is_rejected():
    params = {"w": np.ones((2, 3))}
    state = lookahead.init(params, inner="sgd")     # no inner_exp_avg
    with pytest.raises(ValueError, match="inner='adam'"):
        lookahead.step(params, {"w": np.ones((2, 3))}, state, inner="adam")
