"""Shared pieces of the optimizer tests: parameter trees, gradient sequences, trajectories of the
oracle, torch.optim and optax over the same steps, and their relative difference."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

import reference

Tree = dict[str, np.ndarray]

#: A small network's parameters: a conv layer, its bias, a normalization gain and bias, a linear layer.
SHAPES = {"conv/weight": (4, 3, 3, 3), "conv/bias": (4,), "bn/weight": (4,), "bn/bias": (4,),
          "fc/weight": (5, 6)}
#: Twelve steps with the learning rate changed mid-run (x0.1 from step 6 on).
LR_MULTIPLIERS = [1.0] * 6 + [0.1] * 6


def tree(rng: np.random.Generator, shapes: dict[str, tuple[int, ...]] = SHAPES, scale: float = 1.0) -> Tree:
    return {p: scale * rng.standard_normal(s) for p, s in shapes.items()}


def gradients(seed: int, steps: int = 12, shapes: dict[str, tuple[int, ...]] = SHAPES) -> list[Tree]:
    """A fixed gradient sequence, each tensor with its own scale over two decades."""
    rng = np.random.default_rng(seed)
    scales = {p: 10.0 ** rng.uniform(-1, 1) for p in shapes}
    return [{p: scales[p] * rng.standard_normal(s) for p, s in shapes.items()} for _ in range(steps)]


def oracle_run(name: str, params: Tree, grads: list[Tree], lrs: list[float], **hp: Any) -> list[Tree]:
    """The oracle's parameters after each step (``lrs[k]``: the lr of step k)."""
    op = reference.get(name)
    state = op.init(params, **{**hp, "lr": lrs[0]})
    out = []
    for g, lr in zip(grads, lrs, strict=True):
        params, state = op.step(params, g, state, **{**hp, "lr": lr})
        out.append(params)
    return out


def torch_run(make: Callable[[list[dict[str, Any]]], Any], params: Tree, grads: list[Tree],
              lrs: list[float], groups: Callable[[dict[str, Any]], list[dict[str, Any]]] | None = None) -> list[Tree]:
    """A torch.optim trajectory in float64: ``make(param_groups)`` builds the optimizer,
    ``groups(tensors)`` the parameter groups (default: one)."""
    import torch

    tensors = {p: torch.nn.Parameter(torch.tensor(v, dtype=torch.float64)) for p, v in params.items()}
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
    """max over tensors of max|a - b| / max|b|."""
    return max(float(np.max(np.abs(a[p] - b[p])) / max(float(np.max(np.abs(b[p]))), 1e-300)) for p in b)


def worst(traj_a: list[Tree], traj_b: list[Tree]) -> float:
    return max(rel(a, b) for a, b in zip(traj_a, traj_b, strict=True))
