"""Lion (reference/optimizers/lion.py): invariants, optax/pytorch_optimizer trajectories, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reference
from reference.optimizers import lion

SHAPES = {"conv/weight": (4, 3, 3, 3), "conv/bias": (4,), "bn/weight": (4,), "fc/weight": (5, 6)}
STEPS = 12
LRS = [1e-2] * 6 + [3e-3] * 6  # a mid-run lr change


def _tree(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {p: scale * rng.standard_normal(s) for p, s in SHAPES.items()}


def _grads(seed: int, steps: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    scales = {p: 10.0 ** rng.uniform(-1, 1) for p in SHAPES}
    return [{p: scales[p] * rng.standard_normal(s) for p, s in SHAPES.items()} for _ in range(steps)]


def _run(params, grads_seq, lrs=None, **hp):
    state = lion.init(params, **hp)
    trace = []
    for k, g in enumerate(grads_seq):
        step_hp = dict(hp, lr=lrs[k]) if lrs is not None else hp
        params, state = lion.step(params, g, state, **step_hp)
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
@given(seed=seeds, k=st.integers(3, 12), beta1=st.sampled_from([0.0, 0.5, 0.9]),
       sparse=st.booleans())
def test_lambda0_moves_every_coordinate_by_lr_or_0(seed, k, beta1, sparse):
    """lambda = 0: |w_{t+1} - w_t| is exactly lr or 0 (dyadic weights and lr = 2^-k make the
    subtraction exact); 0 exactly where the interpolation c is 0."""
    rng = np.random.default_rng(seed)
    lr = 2.0**-k
    params = {p: np.round(rng.standard_normal(s) * 64) / 64 for p, s in SHAPES.items()}
    seq = _grads(seed, 4)
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
    params = _tree(rng)
    seq = _grads(seed, 6)
    c = 2.0**e
    hp = dict(beta1=0.8, beta2=0.95, weight_decay=wd, weight_decay_mode=mode)
    a = _run(params, seq, lrs=[1e-2] * 6, **hp)
    b = _run(params, [{p: c * g for p, g in gs.items()} for gs in seq], lrs=[1e-2] * 6, **hp)
    for (w_a, s_a), (w_b, s_b) in zip(a, b, strict=True):
        for p in SHAPES:
            np.testing.assert_array_equal(w_a[p], w_b[p])
            np.testing.assert_array_equal(c * s_a["exp_avg"][p], s_b["exp_avg"][p])


@settings(max_examples=20)
@given(seed=seeds, wd=st.floats(0.0, 0.5), lr=st.floats(1e-4, 1e-1))
def test_sign_of_zero_is_zero_and_decay_forms_agree(seed, wd, lr):
    """A zero gradient from a zero momentum moves only by the decay; the official form
    w (1 - lr lambda) - lr sign(c) equals optax's w - lr (sign(c) + lambda w) to rounding."""
    rng = np.random.default_rng(seed)
    params = _tree(rng)
    zeros = {p: np.zeros(s) for p, s in SHAPES.items()}
    new, _ = lion.step(params, zeros, lion.init(params), lr=lr, weight_decay=wd)
    for p in SHAPES:
        np.testing.assert_allclose(new[p], params[p] * (1 - lr * wd), rtol=1e-15, atol=0)
    g = _grads(seed, 1)[0]
    state = {"step": np.asarray(3.0), "exp_avg": _tree(rng, 0.3)}
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
    params = {p: v.astype(np.float32) for p, v in _tree(rng).items()}
    grads = {p: v.astype(np.float32) for p, v in _tree(rng).items()}
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
    tx = optax.lion(schedule, b1=0.9, b2=0.99, weight_decay=0.1, mask=mask)
    hp = dict(reference.get("lion").dialect("optax"), weight_decay=0.1, weight_decay_mask="ndim>=2")
    hp.pop("lr")
    trace = _run(params, seq, lrs=LRS, **hp)
    jp = {p: jnp.asarray(v) for p, v in params.items()}
    state = tx.init(jp)
    for k, g in enumerate(seq):
        updates, state = tx.update({p: jnp.asarray(v) for p, v in g.items()}, state, jp)
        jp = optax.apply_updates(jp, updates)
        w_ref, s_ref = trace[k]
        assert _rel({p: np.asarray(v) for p, v in jp.items()}, w_ref) < 1e-12
        assert _rel({p: np.asarray(v) for p, v in state[0].mu.items()}, s_ref["exp_avg"]) < 1e-12


@pytest.mark.parametrize(("mode", "decouple", "fixed"), [("decoupled_lr", True, False),
                                                         ("decoupled_nolr", True, True),
                                                         ("l2", False, False)])
@pytest.mark.parametrize("foreach", [False, True])
def test_pytorch_optimizer_trajectory(mode, decouple, fixed, foreach):
    """pytorch_optimizer.Lion: its default (decay before the step, times lr) is the official
    google/automl form; fixed_decay and weight_decouple=False are the other two modes."""
    torch = pytest.importorskip("torch")
    po = pytest.importorskip("pytorch_optimizer")
    rng = np.random.default_rng(1)
    params = _tree(rng)
    seq = _grads(1, STEPS)
    trace = _run(params, seq, lrs=LRS, weight_decay=0.05, weight_decay_mode=mode,
                 weight_decay_mask="ndim>=2")
    tensors = {p: torch.nn.Parameter(torch.tensor(v, dtype=torch.float64)) for p, v in params.items()}
    groups = [{"params": [tensors[p] for p in SHAPES if len(SHAPES[p]) >= 2], "weight_decay": 0.05},
              {"params": [tensors[p] for p in SHAPES if len(SHAPES[p]) < 2], "weight_decay": 0.0}]
    opt = po.Lion(groups, lr=LRS[0], betas=(0.9, 0.99), weight_decouple=decouple,
                  fixed_decay=fixed, foreach=foreach)
    for k, g in enumerate(seq):
        for group in opt.param_groups:
            group["lr"] = LRS[k]
        for p, t in tensors.items():
            t.grad = torch.tensor(g[p], dtype=torch.float64)
        opt.step()
        w_ref, s_ref = trace[k]
        assert _rel({p: t.detach().numpy() for p, t in tensors.items()}, w_ref) < 1e-12
        assert _rel({p: opt.state[t]["exp_avg"].numpy() for p, t in tensors.items()},
                    s_ref["exp_avg"]) < 1e-12


def test_optax_mapping_matches_the_oracle():
    pytest.importorskip("optax")
    from conformance.adapters import Request, load_adapter

    adapter = load_adapter("jax")
    op = reference.get("lion")
    hp = op.spec.resolve({**adapter.ops()["lion"].dialect, "lr": 1e-2, "weight_decay": 0.1,
                          "weight_decay_mask": "ndim>=2"})
    rng = np.random.default_rng(4)
    inputs = {f"params/{p}": v for p, v in _tree(rng).items()}
    state = op.init_state(inputs, **hp)
    for _ in range(2):  # from init, then from a non-trivial state
        inputs.update({f"grads/{p}": v for p, v in _tree(rng).items()})
        got = adapter.evaluate("lion", Request("lion", "float64", inputs, state, hp, None))
        out, new_state = op.apply(inputs, state, **hp)
        assert set(got.state) == set(new_state)
        for key, value in {**out, **new_state}.items():
            actual = got.outputs.get(key, got.state.get(key))
            assert _rel({key: actual}, {key: np.asarray(value)}) < 1e-12, key
        inputs.update(out)
        state = new_state


# ------------------------------------------------------------------------------------------
# Bad input and the harness form
# ------------------------------------------------------------------------------------------


def test_bad_hparams_name_the_argument():
    params = {"w": np.ones((2, 2))}
    with pytest.raises(ValueError, match="beta1"):
        lion.init(params, beta1=1.5)
    with pytest.raises(ValueError, match="beta2"):
        lion.init(params, beta2=-0.1)
    with pytest.raises(ValueError, match="weight_decay_mode"):
        lion.init(params, weight_decay_mode="coupled")
    with pytest.raises(TypeError, match="eps"):
        lion.init(params, eps=1e-8)
    state = lion.init(params)
    with pytest.raises(ValueError, match="grads"):
        lion.step(params, {"w": np.ones((3, 2))}, state)


def test_harness_form_and_nested_params():
    op = reference.get("lion")
    rng = np.random.default_rng(3)
    inputs = {"params/fc/weight": rng.standard_normal((3, 4)), "params/fc/bias": rng.standard_normal(3),
              "grads/fc/weight": rng.standard_normal((3, 4)), "grads/fc/bias": rng.standard_normal(3)}
    hp = op.dialect("optax")
    out, state = op.apply(inputs, None, **hp)
    assert set(state) == {"step", "exp_avg/fc/weight", "exp_avg/fc/bias"}
    assert float(state["step"]) == 1.0
    _, state2 = op.apply(inputs, state, **hp)
    assert float(state2["step"]) == 2.0
    nested = {"fc": {"weight": inputs["params/fc/weight"], "bias": inputs["params/fc/bias"]}}
    grads = {"fc": {"weight": inputs["grads/fc/weight"], "bias": inputs["grads/fc/bias"]}}
    new, st_nested = op.step(nested, grads, None, **hp)
    np.testing.assert_array_equal(new["fc"]["weight"], out["params/fc/weight"])
    np.testing.assert_array_equal(st_nested["exp_avg"]["fc"]["bias"], state["exp_avg/fc/bias"])
