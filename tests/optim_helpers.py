"""Shared pieces of the optimizer tests: parameter trees, gradient sequences, trajectories of the
oracle, torch optimizers and optax over the same steps, their relative difference, the adapter
and harness-form checks (bad inputs are each spec's [[error_cases]]: tests/test_error_cases.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import reference

Tree = dict[str, np.ndarray]

#: A small network's parameters: a conv layer, its bias, a normalization gain and bias, a linear layer.
SHAPES = {"conv/weight": (4, 3, 3, 3), "conv/bias": (4,), "bn/weight": (4,), "bn/bias": (4,),
          "fc/weight": (5, 6)}
#: The same network without the normalization bias.
SHAPES_NO_BN_BIAS = {p: s for p, s in SHAPES.items() if p != "bn/bias"}
#: Twelve steps with the learning rate changed mid-run (x0.1 from step 6 on).
LR_MULTIPLIERS = [1.0] * 6 + [0.1] * 6


def tree(rng: np.random.Generator, shapes: dict[str, tuple[int, ...]] = SHAPES, scale: float = 1.0) -> Tree:
    """Standard normal tensors of the given shapes, times ``scale``."""
    return {p: scale * rng.standard_normal(s) for p, s in shapes.items()}


def gradients(seed: int, steps: int = 12, shapes: dict[str, tuple[int, ...]] = SHAPES) -> list[Tree]:
    """A fixed gradient sequence, each tensor with its own scale over two decades."""
    rng = np.random.default_rng(seed)
    scales = {p: 10.0 ** rng.uniform(-1, 1) for p in shapes}
    return [{p: scales[p] * rng.standard_normal(s) for p, s in shapes.items()} for _ in range(steps)]


def as_float32(params: Tree) -> Tree:
    """The same tree in float32 (for the dtype checks of the raw functions)."""
    return {p: v.astype(np.float32) for p, v in params.items()}


def flat(params: Tree, grads: Tree) -> dict[str, np.ndarray]:
    """One step's inputs in the harness form: ``params/<path>`` and ``grads/<path>``."""
    return {**{f"params/{p}": v for p, v in params.items()}, **{f"grads/{p}": v for p, v in grads.items()}}


def oracle_run(name: str, params: Tree, grads: list[Tree], lrs: list[float], **hp: Any) -> list[Tree]:
    """The oracle's parameters after each step (``lrs[k]``: the lr of step k)."""
    op = reference.get(name)
    state = op.init(params, **{**hp, "lr": lrs[0]})
    out = []
    for g, lr in zip(grads, lrs, strict=True):
        params, state = op.step(params, g, state, **{**hp, "lr": lr})
        out.append(params)
    return out


def trajectory(module: Any, params: Tree, grads: list[Tree], lrs: list[float] | None = None,
               **hp: Any) -> list[tuple[Tree, dict[str, Any]]]:
    """The oracle's parameters and state after each step of ``module`` (an optimizer module such
    as ``reference.optimizers.lion``, or a registered op): ``init(params, **hp)``, then ``step``
    with ``hp``, its lr replaced by ``lrs[k]`` at step k where ``lrs`` is given."""
    state = module.init(params, **hp)
    out = []
    for k, g in enumerate(grads):
        params, state = module.step(params, g, state, **(hp if lrs is None else {**hp, "lr": lrs[k]}))
        out.append((params, state))
    return out


def torch_run(make: Callable[[list[dict[str, Any]]], Any], params: Tree, grads: list[Tree],
              lrs: list[float], groups: Callable[[dict[str, Any]], list[dict[str, Any]]] | None = None) -> list[Tree]:
    """A torch.optim trajectory in float64: ``make(param_groups)`` builds the optimizer,
    ``groups(tensors)`` the parameter groups (default: one)."""
    import torch

    tensors = torch_tensors(params)
    opt = make(groups(tensors) if groups else [{"params": list(tensors.values())}])
    scale = [g["lr"] for g in opt.param_groups]
    out = []
    for g, lr in zip(grads, lrs, strict=True):
        for group, base in zip(opt.param_groups, scale, strict=True):
            group["lr"] = base * lr / lrs[0]
        for p, t in tensors.items():
            t.grad = torch.tensor(g[p], dtype=torch.float64)
        opt.step()
        out.append({p: t.detach().numpy().copy() for p, t in tensors.items()})
    return out


def optax_run(make: Callable[[float], Any], params: Tree, grads: list[Tree], lrs: list[float]) -> list[Tree]:
    """An optax trajectory in float64: ``make(lr)`` builds the transformation of one step (the
    lr of optax's optimizers never enters their state, so rebuilding it per step is exact)."""
    import jax
    import optax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    p = {k: jnp.asarray(v, dtype=jnp.float64) for k, v in params.items()}
    state = make(lrs[0]).init(p)
    out = []
    for g, lr in zip(grads, lrs, strict=True):
        updates, state = make(lr).update({k: jnp.asarray(v) for k, v in g.items()}, state, p)
        p = optax.apply_updates(p, updates)
        out.append({k: np.asarray(v) for k, v in p.items()})
    return out


def rel(a: Tree, b: Tree) -> float:
    """max over tensors of max|a - b| / max|b| (a's tensors may be jax arrays or scalars)."""
    return max(float(np.max(np.abs(np.asarray(a[p]) - b[p])) / max(float(np.max(np.abs(b[p]))), 1e-300))
               for p in b)


def worst(traj_a: list[Tree], traj_b: list[Tree]) -> float:
    return max(rel(a, b) for a, b in zip(traj_a, traj_b, strict=True))


def rel_elementwise(a: Tree, b: Tree) -> float:
    """max over tensors and elements of |a - b| / |b| (elementwise, not normwise)."""
    return max(float(np.max(np.abs(a[p] - b[p]) / np.maximum(np.abs(b[p]), 1e-300))) for p in b)


# ------------------------------------------------------------------------------------------
# torch
# ------------------------------------------------------------------------------------------


def torch_tensors(params: Tree) -> dict[str, Any]:
    """One float64 ``torch.nn.Parameter`` per path."""
    import torch

    return {p: torch.nn.Parameter(torch.tensor(v, dtype=torch.float64)) for p, v in params.items()}


def decay_groups(tensors: dict[str, Any], weight_decay: float) -> list[dict[str, Any]]:
    """torch parameter groups for ``weight_decay_mask="ndim>=2"``: ``weight_decay`` on the
    tensors with two or more dims, none on the others."""
    return [{"params": [t for t in tensors.values() if t.ndim >= 2], "weight_decay": weight_decay},
            {"params": [t for t in tensors.values() if t.ndim < 2], "weight_decay": 0.0}]


def torch_steps(opt: Any, tensors: dict[str, Any], grads: list[Tree], lrs: list[float] | None = None,
                slots: tuple[str, ...] = (), before_step: Callable[[list[Any]], None] | None = None,
                ) -> list[tuple[Tree, dict[str, Tree]]]:
    """Step a torch optimizer over ``tensors`` (from ``torch_tensors``): at step k every group's
    lr is set to ``lrs[k]`` (where given), the gradients to ``grads[k]`` in float64, then
    ``before_step(tensors)`` is called (e.g. to clip them).  Returns, after each step, copies of
    the parameters and of the state slots named in ``slots`` (for the tensors that have them)."""
    import torch

    out = []
    for k, g in enumerate(grads):
        if lrs is not None:
            for group in opt.param_groups:
                group["lr"] = lrs[k]
        for p, t in tensors.items():
            t.grad = torch.tensor(g[p], dtype=torch.float64)
        if before_step is not None:
            before_step(list(tensors.values()))
        opt.step()
        params = {p: t.detach().numpy().copy() for p, t in tensors.items()}
        state = {s: {p: opt.state[t][s].detach().numpy().copy() for p, t in tensors.items()
                     if s in opt.state[t]} for s in slots}
        out.append((params, state))
    return out


def torch_vs_oracle(make: Callable[[list[Any]], Any], op: Any, hp: dict[str, Any], params: Tree,
                    grads_at: Callable[[int, Tree], Tree], lr_factors: list[float]) -> float:
    """A torch optimizer (``make(parameters)``) and the oracle ``op`` (init/step) side by side:
    step k uses the lr ``hp["lr"] * lr_factors[k]`` and the gradients ``grads_at(k, params)``
    (params: the oracle's before the step).  Returns the worst ``rel`` over the steps."""
    import torch

    tensors = torch_tensors(params)
    opt = make(list(tensors.values()))
    state = op.init(params, **hp)
    worst_rel = 0.0
    for k, factor in enumerate(lr_factors):
        lr = hp["lr"] * factor
        for group in opt.param_groups:
            group["lr"] = lr
        g = grads_at(k, params)
        for p, t in tensors.items():
            t.grad = torch.tensor(g[p], dtype=torch.float64)
        opt.step()
        params, state = op.step(params, g, state, **{**hp, "lr": lr})
        worst_rel = max(worst_rel, rel({p: t.detach().numpy() for p, t in tensors.items()}, params))
    return worst_rel


# ------------------------------------------------------------------------------------------
# optax
# ------------------------------------------------------------------------------------------


def optax_x64() -> tuple[Any, Any]:
    """``(jax, optax)`` with jax's float64 enabled; skips the test where either is missing."""
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    jax.config.update("jax_enable_x64", True)
    return jax, optax


def optax_schedule(lrs: list[float]) -> Callable[[Any], Any]:
    """The optax schedule (step count -> lr) of a list of lrs that changes once."""
    import jax.numpy as jnp

    change = lrs.index(lrs[-1])
    assert lrs == [lrs[0]] * change + [lrs[-1]] * (len(lrs) - change), "one change only"
    return lambda count: jnp.where(count < change, lrs[0], lrs[-1])


def optax_steps(tx: Any, params: Tree, grads: list[Tree], jit: bool = False) -> list[tuple[Tree, Any]]:
    """An optax transformation over the gradients in float64 (enable it first: ``optax_x64``),
    its update jitted where ``jit``: after each step the parameters (numpy) and tx's state."""
    import jax
    import jax.numpy as jnp
    import optax

    p = {k: jnp.asarray(v) for k, v in params.items()}
    state = tx.init(p)
    update = jax.jit(tx.update) if jit else tx.update
    out = []
    for g in grads:
        updates, state = update({k: jnp.asarray(v) for k, v in g.items()}, state, p)
        p = optax.apply_updates(p, updates)
        out.append(({k: np.asarray(v) for k, v in p.items()}, state))
    return out


# ------------------------------------------------------------------------------------------
# Conformance adapters and the harness form
# ------------------------------------------------------------------------------------------


def adapter_steps(adapter: Any, name: str, hp: dict[str, Any], rng: np.random.Generator,
                  shapes: dict[str, tuple[int, ...]], steps: int = 2) -> Iterator[tuple[Any, ...]]:
    """Op ``name`` through a conformance adapter and the oracle from the same flat inputs:
    params drawn from ``rng``, then at each step fresh gradients, both from the oracle's state
    of the step before.  Yields per step a copy of the inputs, the adapter's result, the oracle's
    outputs and state."""
    from conformance.adapters import Request

    op = reference.get(name)
    inputs = {f"params/{p}": v for p, v in tree(rng, shapes).items()}
    state = op.init_state(inputs, **hp)
    for _ in range(steps):
        inputs.update({f"grads/{p}": v for p, v in tree(rng, shapes).items()})
        got = adapter.evaluate(name, Request(name, "float64", dict(inputs), dict(state), hp, None))
        out, state = op.apply(inputs, state, **hp)
        yield dict(inputs), got, out, state
        inputs.update(out)


def kept(state: dict[str, Any], not_kept: tuple[str, ...]) -> dict[str, Any]:
    """The flat state without the slots a framework declares not kept (``OpSupport.not_kept``)."""
    return {k: v for k, v in state.items() if k.split("/", 1)[0] not in not_kept}


def assert_adapter_agrees(got: Any, out: dict[str, Any], state: dict[str, Any], tol: float = 1e-12,
                          not_kept: tuple[str, ...] = ()) -> None:
    """The adapter's result has the oracle's state slots (but those it does not keep), and each
    output and slot within ``tol``."""
    state = kept(state, not_kept)
    assert set(got.state) == set(state)
    for key, value in {**out, **state}.items():
        actual = got.outputs.get(key, got.state.get(key))
        assert rel({key: actual}, {key: np.asarray(value)}) < tol, key


def adapter_trajectory(adapter: Any, name: str, hp: dict[str, Any], params: Tree, grads: list[Tree],
                       lrs: list[float]) -> Iterator[tuple[Any, ...]]:
    """Op ``name`` through a conformance adapter over a trajectory (fed back its own parameters
    and state) beside the oracle's.  Yields per step the adapter's parameters (by path) and flat
    state, then the oracle's."""
    from conformance.adapters import Request

    op = reference.get(name)
    not_kept = adapter.ops()[name].not_kept
    ours = {f"params/{p}": v for p, v in params.items()}
    state_ours = op.init_state(ours, **hp)
    theirs, state_theirs = dict(params), dict(state_ours)
    for lr, g in zip(lrs, grads, strict=True):
        step_hp = dict(hp, lr=lr)
        out, state_ours = op.apply({**ours, **{f"grads/{p}": v for p, v in g.items()}}, state_ours, **step_hp)
        ours = {k: np.asarray(v) for k, v in out.items()}
        r = adapter.evaluate(name, Request(name, "float64", flat(theirs, g), state_theirs, step_hp, None))
        theirs = {p: np.asarray(r.outputs[f"params/{p}"]) for p in params}
        assert set(r.state) == set(kept(state_ours, not_kept))
        # What the framework does not keep is supplied, as the harness does (OpSupport.not_kept).
        supplied = {k: v for k, v in state_ours.items() if k not in kept(state_ours, not_kept)}
        state_theirs = {**supplied, **{k: np.asarray(v) for k, v in r.state.items()}}
        yield theirs, kept(state_theirs, not_kept), {p: ours[f"params/{p}"] for p in params}, \
            kept(state_ours, not_kept)


def harness_inputs(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Flat inputs of a small linear layer: fc/weight (3, 4) and fc/bias (3,), params then grads."""
    return {"params/fc/weight": rng.standard_normal((3, 4)), "params/fc/bias": rng.standard_normal(3),
            "grads/fc/weight": rng.standard_normal((3, 4)), "grads/fc/bias": rng.standard_normal(3)}


def check_harness_form(op: Any, slot: str | None, **hp: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``op.apply`` on ``harness_inputs`` (seed 3) from no state, then from its own state (the
    step counter reaches 2); where ``slot`` is given, ``op.step`` on the nested form
    ``{"fc": {"weight", "bias"}}`` (from no state) gives the first step's parameters and ``slot``.
    Returns the inputs and the first step's state."""
    inputs = harness_inputs(np.random.default_rng(3))
    out, state = op.apply(inputs, None, **hp)
    _, state2 = op.apply(inputs, state, **hp)
    assert float(state2["step"]) == 2.0
    if slot is not None:
        nested = {"fc": {"weight": inputs["params/fc/weight"], "bias": inputs["params/fc/bias"]}}
        grads = {"fc": {"weight": inputs["grads/fc/weight"], "bias": inputs["grads/fc/bias"]}}
        new, st_nested = op.step(nested, grads, None, **hp)
        np.testing.assert_array_equal(new["fc"]["weight"], out["params/fc/weight"])
        np.testing.assert_array_equal(st_nested[slot]["fc"]["bias"], state[f"{slot}/fc/bias"])
    return inputs, state
