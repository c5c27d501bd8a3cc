"""AdaGrad (reference/optimizers/adagrad.py): invariants, torch/optax trajectories, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reference
from reference.optimizers import adagrad

SHAPES = {"conv/weight": (4, 3, 3, 3), "conv/bias": (4,), "bn/weight": (4,), "fc/weight": (5, 6)}


def _tree(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {p: scale * rng.standard_normal(s) for p, s in SHAPES.items()}


def _grads(seed: int, steps: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    # each tensor with its own scale, over two decades
    scales = {p: 10.0 ** rng.uniform(-1, 1) for p in SHAPES}
    return [{p: scales[p] * rng.standard_normal(s) for p, s in SHAPES.items()} for _ in range(steps)]


def _run(params, grads_seq, lrs=None, **hp):
    state = adagrad.init(params, **hp)
    trace = []
    for k, g in enumerate(grads_seq):
        step_hp = dict(hp, lr=lrs[k]) if lrs is not None else hp
        params, state = adagrad.step(params, g, state, **step_hp)
        trace.append((params, state))
    return trace


def _rel(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """max over tensors of ||a - b||_inf / ||b||_inf."""
    return max(float(np.max(np.abs(a[p] - b[p])) / max(np.max(np.abs(b[p])), 1e-300)) for p in b)


# ------------------------------------------------------------------------------------------
# Invariants (hypothesis)
# ------------------------------------------------------------------------------------------

seeds = st.integers(0, 2**31 - 1)


@settings(max_examples=30)
@given(seed=seeds, eps=st.sampled_from([0.0, 1e-10, 1e-3]), s0=st.sampled_from([0.0, 0.1, 2.0]),
       lr_decay=st.sampled_from([0.0, 0.1]), placement=st.sampled_from(["outside", "inside"]))
def test_accumulator_and_effective_lr_monotone(seed, eps, s0, lr_decay, placement):
    """s_t never decreases; eta_t / denominator never increases (per coordinate)."""
    rng = np.random.default_rng(seed)
    params = _tree(rng)
    hp = dict(lr=0.1, eps=eps, initial_accumulator_value=s0, lr_decay=lr_decay,
              eps_placement=placement, empty_accumulator="zero")
    trace = _run(params, _grads(seed, 6), **hp)
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


@settings(max_examples=30)
@given(seed=seeds, c=st.floats(1e-3, 1e3), lr=st.floats(1e-3, 1.0))
def test_scale_invariant_eps0_init0(seed, c, lr):
    """eps = 0, s_0 = 0: the trajectory is invariant to g -> c g; the first step is lr sign(g)."""
    rng = np.random.default_rng(seed)
    params = _tree(rng)
    seq = _grads(seed, 5)
    hp = dict(lr=lr, eps=0.0, initial_accumulator_value=0.0)
    base = _run(params, seq, **hp)
    scaled = _run(params, [{p: c * g for p, g in gs.items()} for gs in seq], **hp)
    for (w_a, _), (w_b, _) in zip(base, scaled, strict=True):
        assert _rel(w_b, w_a) < 1e-13
    first = base[0][0]
    for p, w in params.items():
        np.testing.assert_allclose(first[p], w - lr * np.sign(seq[0][p]), rtol=1e-14, atol=1e-15)


@settings(max_examples=20)
@given(seed=seeds, s0=st.sampled_from([0.1, 1.0]))
def test_eps_inside_equals_outside_at_eps0(seed, s0):
    rng = np.random.default_rng(seed)
    params = _tree(rng)
    seq = _grads(seed, 4)
    a = _run(params, seq, eps=0.0, initial_accumulator_value=s0, eps_placement="outside")
    b = _run(params, seq, eps=0.0, initial_accumulator_value=s0, eps_placement="inside")
    for (w_a, _), (w_b, _) in zip(a, b, strict=True):
        assert _rel(w_b, w_a) == 0.0


@settings(max_examples=20)
@given(seed=seeds, eps=st.sampled_from([1e-10, 1e-7, 1e-2]))
def test_zero_rule_only_where_accumulator_empty(seed, eps):
    """optax's "update 0 where s == 0" equals plain division when eps > 0; with eps = 0 it keeps
    a never-updated tensor finite where division gives 0/0."""
    rng = np.random.default_rng(seed)
    params = _tree(rng)
    seq = _grads(seed, 3)
    for g in seq:
        g["conv/bias"] = np.zeros(SHAPES["conv/bias"])
    a = _run(params, seq, eps=eps, empty_accumulator="divide")
    b = _run(params, seq, eps=eps, empty_accumulator="zero")
    for (w_a, _), (w_b, _) in zip(a, b, strict=True):
        assert _rel(w_b, w_a) == 0.0
    w_zero = _run(params, seq, eps=0.0, empty_accumulator="zero")[-1][0]
    np.testing.assert_array_equal(w_zero["conv/bias"], params["conv/bias"])
    with np.errstate(invalid="ignore"):
        w_div = _run(params, seq, eps=0.0, empty_accumulator="divide")[-1][0]
    assert np.all(np.isnan(w_div["conv/bias"]))


@settings(max_examples=20)
@given(seed=seeds, lr_decay=st.floats(0.0, 1.0))
def test_lr_decay_is_torch_schedule(seed, lr_decay):
    """lr_decay = d equals lr_decay = 0 with the caller's schedule lr / (1 + (t - 1) d)."""
    rng = np.random.default_rng(seed)
    params = _tree(rng)
    seq = _grads(seed, 5)
    a = _run(params, seq, lr=0.1, lr_decay=lr_decay, weight_decay=0.01,
             weight_decay_mode="decoupled_lr")
    b = _run(params, seq, lrs=[0.1 / (1 + t * lr_decay) for t in range(5)], lr=0.1,
             weight_decay=0.01, weight_decay_mode="decoupled_lr")
    for (w_a, _), (w_b, _) in zip(a, b, strict=True):
        assert _rel(w_b, w_a) < 1e-15


def test_raw_function_keeps_float32():
    rng = np.random.default_rng(0)
    params = {p: v.astype(np.float32) for p, v in _tree(rng).items()}
    grads = {p: v.astype(np.float32) for p, v in _tree(rng).items()}
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
    rng = np.random.default_rng(1)
    params = _tree(rng)
    seq = _grads(1, STEPS)
    hp = dict(lr_decay=0.05, eps=1e-10, initial_accumulator_value=0.1, weight_decay=0.02,
              weight_decay_mask="ndim>=2")
    tensors = {p: torch.nn.Parameter(torch.tensor(v, dtype=torch.float64)) for p, v in params.items()}
    decayed = [tensors[p] for p in SHAPES if len(SHAPES[p]) >= 2]
    plain = [tensors[p] for p in SHAPES if len(SHAPES[p]) < 2]
    opt = torch.optim.Adagrad([{"params": decayed, "weight_decay": 0.02},
                               {"params": plain, "weight_decay": 0.0}],
                              lr=LRS[0], lr_decay=0.05, eps=1e-10, initial_accumulator_value=0.1,
                              foreach=False)
    trace = _run(params, seq, lrs=LRS, **hp)
    for k, g in enumerate(seq):
        for group in opt.param_groups:
            group["lr"] = LRS[k]
        for p, t in tensors.items():
            t.grad = torch.tensor(g[p], dtype=torch.float64)
        opt.step()
        w_ref, s_ref = trace[k]
        assert _rel({p: t.detach().numpy() for p, t in tensors.items()}, w_ref) < 1e-12
        assert _rel({p: opt.state[t]["sum"].numpy() for p, t in tensors.items()}, s_ref["sum"]) < 1e-12


def test_optax_trajectory():
    pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    rng = np.random.default_rng(2)
    params = _tree(rng)
    seq = _grads(2, STEPS)
    mask = {p: len(s) >= 2 for p, s in SHAPES.items()}
    schedule = lambda count: jnp.where(count < 6, LRS[0], LRS[-1])  # noqa: E731
    tx = optax.chain(optax.add_decayed_weights(0.02, mask=mask),
                     optax.adagrad(schedule, initial_accumulator_value=0.1, eps=1e-7))
    hp = dict(reference.get("adagrad").dialect("optax"), weight_decay=0.02,
              weight_decay_mask="ndim>=2")
    hp.pop("lr")
    trace = _run(params, seq, lrs=LRS, **hp)
    jp = {p: jnp.asarray(v) for p, v in params.items()}
    state = tx.init(jp)
    for k, g in enumerate(seq):
        updates, state = tx.update({p: jnp.asarray(v) for p, v in g.items()}, state, jp)
        jp = optax.apply_updates(jp, updates)
        w_ref, s_ref = trace[k]
        assert _rel({p: np.asarray(v) for p, v in jp.items()}, w_ref) < 1e-12
        assert _rel({p: np.asarray(v) for p, v in state[1][0].sum_of_squares.items()},
                    s_ref["sum"]) < 1e-12


# ------------------------------------------------------------------------------------------
# Bad input and the harness form
# ------------------------------------------------------------------------------------------


def test_bad_hparams_name_the_argument():
    params = {"w": np.ones((2, 2))}
    with pytest.raises(ValueError, match="eps_placement"):
        adagrad.init(params, eps_placement="middle")
    with pytest.raises(ValueError, match="lr_decay"):
        adagrad.init(params, lr_decay=-0.1)
    with pytest.raises(ValueError, match="initial_accumulator_value"):
        adagrad.init(params, initial_accumulator_value=-1.0)
    with pytest.raises(ValueError, match="empty_accumulator"):
        adagrad.init(params, empty_accumulator="skip")
    with pytest.raises(TypeError, match="momentum"):
        adagrad.init(params, momentum=0.9)
    state = adagrad.init(params)
    with pytest.raises(ValueError, match="grads"):
        adagrad.step(params, {"w": np.ones((3, 2))}, state)


def test_harness_form_and_nested_params():
    op = reference.get("adagrad")
    rng = np.random.default_rng(3)
    inputs = {"params/fc/weight": rng.standard_normal((3, 4)), "params/fc/bias": rng.standard_normal(3),
              "grads/fc/weight": rng.standard_normal((3, 4)), "grads/fc/bias": rng.standard_normal(3)}
    hp = op.dialect("optax")
    out, state = op.apply(inputs, None, **hp)
    assert set(state) == {"step", "sum/fc/weight", "sum/fc/bias"}
    assert float(state["step"]) == 1.0
    out2, state2 = op.apply(inputs, state, **hp)
    assert float(state2["step"]) == 2.0
    nested = {"fc": {"weight": inputs["params/fc/weight"], "bias": inputs["params/fc/bias"]}}
    grads = {"fc": {"weight": inputs["grads/fc/weight"], "bias": inputs["grads/fc/bias"]}}
    new, st_nested = op.step(nested, grads, None, **hp)
    np.testing.assert_array_equal(new["fc"]["weight"], out["params/fc/weight"])
    np.testing.assert_array_equal(st_nested["sum"]["fc"]["bias"], state["sum/fc/bias"])
