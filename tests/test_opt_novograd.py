"""NovoGrad (reference/optimizers/novograd.py): invariants, optax/pytorch_optimizer trajectories."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reference
from reference.optimizers import novograd

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
    state = novograd.init(params, **hp)
    trace = []
    for k, g in enumerate(grads_seq):
        step_hp = dict(hp, lr=lrs[k]) if lrs is not None else hp
        params, state = novograd.step(params, g, state, **step_hp)
        trace.append((params, state))
    return trace


def _rel(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """max over tensors of ||a - b||_inf / ||b||_inf."""
    return max(float(np.max(np.abs(a[p] - b[p])) / max(np.max(np.abs(b[p])), 1e-300)) for p in b)


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
    params = _tree(rng)
    seq = _grads(seed, 6)
    c = {p: 2.0**e for p, e in zip(SHAPES, exps, strict=True)}
    hp = dict(eps=0.0, weight_decay=wd, grad_averaging=averaging, first_moment_init=init)
    a = _run(params, seq, lrs=LRS[:6], **hp)
    b = _run(params, [{p: c[p] * g[p] for p in g} for g in seq], lrs=LRS[:6], **hp)
    for (w_a, s_a), (w_b, s_b) in zip(a, b, strict=True):
        for p in SHAPES:
            np.testing.assert_array_equal(w_a[p], w_b[p])
            np.testing.assert_array_equal(s_a["exp_avg"][p], s_b["exp_avg"][p])
            np.testing.assert_array_equal(c[p] ** 2 * s_a["exp_avg_sq"][p], s_b["exp_avg_sq"][p])


@settings(max_examples=20)
@given(seed=seeds, c=st.floats(1e-3, 1e3), **options)
def test_invariant_to_any_positive_scale_to_rounding(seed, c, wd, averaging, init):
    rng = np.random.default_rng(seed)
    params = _tree(rng)
    seq = _grads(seed, 5)
    hp = dict(eps=0.0, weight_decay=wd, grad_averaging=averaging, first_moment_init=init)
    a = _run(params, seq, lrs=LRS[:5], **hp)
    b = _run(params, [{p: c * g[p] for p in g} for g in seq], lrs=LRS[:5], **hp)
    for (w_a, _), (w_b, _) in zip(a, b, strict=True):
        assert _rel(w_b, w_a) < 1e-13


@settings(max_examples=20)
@given(seed=seeds, beta2=st.floats(0.0, 0.999), **options)
def test_second_moment_is_one_scalar_ema_of_squared_norm(seed, beta2, wd, averaging, init):
    rng = np.random.default_rng(seed)
    seq = _grads(seed, 5)
    trace = _run(_tree(rng), seq, lrs=LRS[:5], beta2=beta2, weight_decay=wd,
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
    params, g = _tree(rng), _grads(seed, 1)[0]
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
    params, seq = _tree(rng), _grads(seed, 4)
    hp = dict(eps=0.0, weight_decay=wd, grad_averaging=averaging, first_moment_init=init)
    a = _run(params, seq, lrs=LRS[:4], eps_mode="outside", **hp)
    b = _run(params, seq, lrs=LRS[:4], eps_mode="inside", **hp)
    for (w_a, _), (w_b, _) in zip(a, b, strict=True):
        for p in SHAPES:
            np.testing.assert_array_equal(w_a[p], w_b[p])


def test_raw_function_keeps_float32():
    rng = np.random.default_rng(0)
    params = {p: v.astype(np.float32) for p, v in _tree(rng).items()}
    grads = {p: v.astype(np.float32) for p, v in _tree(rng).items()}
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
    pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    rng = np.random.default_rng(2)
    params = _tree(rng)
    seq = _grads(2, STEPS)
    eps = 1e-3  # large enough for its placement to matter
    schedule = lambda count: jnp.where(count < 6, LRS[0], LRS[-1])  # noqa: E731
    tx = optax.novograd(schedule, b1=0.9, b2=0.25, weight_decay=0.01,
                        eps=eps if eps_mode == "outside" else 0.0,
                        eps_root=eps if eps_mode == "inside" else 0.0)
    hp = dict(reference.get("novograd").dialect("optax"), weight_decay=0.01, eps=eps,
              eps_mode=eps_mode)
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
        assert _rel({p: np.asarray(v) for p, v in state[0].nu.items()}, s_ref["exp_avg_sq"]) < 1e-12


@pytest.mark.parametrize(("mode", "decouple", "fixed"), [("moment", False, False),
                                                         ("decoupled_lr", True, False),
                                                         ("decoupled_nolr", True, True)])
@pytest.mark.parametrize("averaging", [False, True])
@pytest.mark.parametrize("foreach", [False, True])
def test_pytorch_optimizer_trajectory(mode, decouple, fixed, averaging, foreach):
    """pytorch_optimizer.NovoGrad follows first_moment_init = first_step, eps outside."""
    torch = pytest.importorskip("torch")
    po = pytest.importorskip("pytorch_optimizer")
    rng = np.random.default_rng(1)
    params = _tree(rng)
    seq = _grads(1, STEPS)
    hp = dict(reference.get("novograd").dialect("pytorch_optimizer"), weight_decay=0.02,
              weight_decay_mode=mode, weight_decay_mask="ndim>=2", grad_averaging=averaging,
              eps=1e-3)
    hp.pop("lr")
    trace = _run(params, seq, lrs=LRS, **hp)
    tensors = {p: torch.nn.Parameter(torch.tensor(v, dtype=torch.float64)) for p, v in params.items()}
    groups = [{"params": [tensors[p] for p in SHAPES if len(SHAPES[p]) >= 2], "weight_decay": 0.02},
              {"params": [tensors[p] for p in SHAPES if len(SHAPES[p]) < 2], "weight_decay": 0.0}]
    opt = po.NovoGrad(groups, lr=LRS[0], betas=(0.95, 0.98), eps=1e-3, weight_decouple=decouple,
                      fixed_decay=fixed, grad_averaging=averaging, foreach=foreach)
    for k, g in enumerate(seq):
        for group in opt.param_groups:
            group["lr"] = LRS[k]
        for p, t in tensors.items():
            t.grad = torch.tensor(g[p], dtype=torch.float64)
        opt.step()
        w_ref, s_ref = trace[k]
        assert _rel({p: t.detach().numpy() for p, t in tensors.items()}, w_ref) < 1e-12
        assert _rel({p: opt.state[t]["moments"].numpy() for p, t in tensors.items()},
                    s_ref["exp_avg"]) < 1e-12
        assert _rel({p: opt.state[t]["grads_ema"].numpy() for p, t in tensors.items()},
                    s_ref["exp_avg_sq"]) < 1e-12


@pytest.mark.parametrize("extra", [{"weight_decay": 0.01}, {"eps_mode": "inside", "eps": 1e-2}])
def test_optax_mapping_matches_the_oracle(extra):
    pytest.importorskip("optax")
    from conformance.adapters import Request, load_adapter

    adapter = load_adapter("jax")
    op = reference.get("novograd")
    hp = op.spec.resolve({**adapter.ops()["novograd"].dialect, "lr": 1e-2, **extra})
    rng = np.random.default_rng(4)
    inputs = {f"params/{p}": v for p, v in _tree(rng).items()}
    state = op.init_state(inputs, **hp)
    for _ in range(2):  # from init, then from a non-trivial state
        inputs.update({f"grads/{p}": v for p, v in _tree(rng).items()})
        got = adapter.evaluate("novograd", Request("novograd", "float64", inputs, state, hp, None))
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
    with pytest.raises(ValueError, match="beta2"):
        novograd.init(params, beta2=1.0)
    with pytest.raises(ValueError, match="eps_mode"):
        novograd.init(params, eps_mode="both")
    with pytest.raises(ValueError, match="first_moment_init"):
        novograd.init(params, first_moment_init="ones")
    with pytest.raises(ValueError, match="weight_decay_mode"):
        novograd.init(params, weight_decay_mode="l2")
    with pytest.raises(TypeError, match="grad_averaging"):
        novograd.init(params, grad_averaging="yes")
    state = novograd.init(params)
    with pytest.raises(ValueError, match="grads"):
        novograd.step(params, {"w": np.ones((3, 2))}, state)


def test_harness_form_and_nested_params():
    op = reference.get("novograd")
    rng = np.random.default_rng(3)
    inputs = {"params/fc/weight": rng.standard_normal((3, 4)), "params/fc/bias": rng.standard_normal(3),
              "grads/fc/weight": rng.standard_normal((3, 4)), "grads/fc/bias": rng.standard_normal(3)}
    hp = op.dialect("optax")
    out, state = op.apply(inputs, None, **hp)
    assert set(state) == {"step", "exp_avg/fc/weight", "exp_avg/fc/bias", "exp_avg_sq/fc/weight",
                          "exp_avg_sq/fc/bias"}
    assert np.shape(state["exp_avg_sq/fc/weight"]) == ()
    _, state2 = op.apply(inputs, state, **hp)
    assert float(state2["step"]) == 2.0
    nested = {"fc": {"weight": inputs["params/fc/weight"], "bias": inputs["params/fc/bias"]}}
    grads = {"fc": {"weight": inputs["grads/fc/weight"], "bias": inputs["grads/fc/bias"]}}
    new, st_nested = op.step(nested, grads, None, **hp)
    np.testing.assert_array_equal(new["fc"]["weight"], out["params/fc/weight"])
    np.testing.assert_array_equal(st_nested["exp_avg_sq"]["fc"]["bias"], state["exp_avg_sq/fc/bias"])
