"""AdaGrad, the diagonal form.

Duchi, Hazan & Singer 2011 (JMLR 12, "Adaptive Subgradient Methods for Online Learning and
Stochastic Optimization"), Eq. (1) and Figure 1 with the diagonal matrix
``H_t = delta I + diag(G_t)^{1/2}``, per coordinate with t the 1-based step:

    g  <- g + lambda w                                 (weight_decay_mode = "l2", coupled)
    s_t = s_{t-1} + g^2,                               s_0 = initial_accumulator_value
    eta_t = eta / (1 + (t - 1) lr_decay)               (torch's built-in decay; 0: constant)
    w  <- w - eta_t g / (sqrt(s_t) + eps)              (eps_placement = "outside": the paper's
                                                         delta, torch, ONNX)
    w  <- w - eta_t g / sqrt(s_t + eps)                (eps_placement = "inside": optax's
                                                         ``rsqrt(s + eps)``, Keras 3)

Framework conventions (dialects.md 4c): torch starts the accumulator at 0 with eps = 1e-10
outside; optax (``scale_by_rss``), Keras and TF1 start it at 0.1, optax and Keras with eps = 1e-7
inside, TF1 with no eps.  optax also sets the update to 0 wherever ``s_t == 0``
(``empty_accumulator = "zero"``); torch and Keras divide (``"divide"``: 0/0 = NaN when eps = 0
and a coordinate has seen only zero gradients; with eps > 0 the two agree, as s_t = 0 means
g = 0 there, up to gradients so small that g^2 underflows).

Weight decay (``weight_decay_mode``): "l2" adds lambda w to g before the accumulator (torch
``weight_decay``, optax ``add_decayed_weights`` first); "decoupled_lr" multiplies w by
``1 - eta_t lambda`` first (Keras); "decoupled_nolr" by ``1 - lambda``.  The rate used by the
decoupled form is eta_t, the one this step applies (lr_decay included).

Invariants (tests/test_opt_adagrad.py): s_t never decreases, so the per-coordinate step size
eta_t / (sqrt(s_t) + eps) never increases; with eps = 0 and s_0 = 0 the trajectory is invariant
to g -> c g (c > 0) and the first step is eta sign(g).
"""

from __future__ import annotations

from typing import Any

from reference._backend import namespace
from reference.optimizers._common import apply_weight_decay, next_step, scalar
from reference.optimizers._tree import Mask, Params
from reference.registry import oracle_optimizer

OP = "adagrad"


@oracle_optimizer(OP)
def init(
    params: Params,
    *,
    lr: float = 1e-2,
    lr_decay: float = 0.0,
    eps: float = 1e-10,
    initial_accumulator_value: float = 0.0,
    eps_placement: str = "outside",
    empty_accumulator: str = "divide",
    weight_decay: float = 0.0,
    weight_decay_mode: str = "l2",
    weight_decay_mask: Mask = "all",
) -> dict[str, Any]:
    """Step 0 and the accumulator filled with ``initial_accumulator_value``."""
    like = next(iter(params.values()))
    return {
        "step": scalar(like, 0.0),
        "sum": {p: namespace(x).full_like(x, initial_accumulator_value) for p, x in params.items()},
    }


def scale(g: Any, s: Any, *, eps: float, eps_placement: str, empty_accumulator: str) -> Any:
    """``g / (sqrt(s) + eps)`` or ``g / sqrt(s + eps)``; 0 where s == 0 with ``"zero"``."""
    xp = namespace(g, s)
    denom = xp.sqrt(s) + eps if eps_placement == "outside" else xp.sqrt(s + eps)
    if empty_accumulator == "divide":
        return g / denom
    empty = s == 0
    safe = xp.where(empty, xp.ones_like(denom), denom)
    return xp.where(empty, xp.zeros_like(g), g / safe)


@oracle_optimizer(OP)
def step(
    params: Params,
    grads: Params,
    state: dict[str, Any],
    *,
    lr: float = 1e-2,
    lr_decay: float = 0.0,
    eps: float = 1e-10,
    initial_accumulator_value: float = 0.0,
    eps_placement: str = "outside",
    empty_accumulator: str = "divide",
    weight_decay: float = 0.0,
    weight_decay_mode: str = "l2",
    weight_decay_mask: Mask = "all",
) -> tuple[Params, dict[str, Any]]:
    """One AdaGrad step (module docstring); ``initial_accumulator_value`` only shapes ``init``."""
    t_array, t = next_step(state, params)
    clr = lr / (1.0 + (t - 1) * lr_decay)
    params, grads = apply_weight_decay(params, grads, lr=clr, weight_decay=weight_decay,
                                       mode=weight_decay_mode, mask=weight_decay_mask)
    sums = {}
    new_params = {}
    for p, w in params.items():
        g = grads[p]
        s = state["sum"][p] + g * g
        new_params[p] = w - clr * scale(g, s, eps=eps, eps_placement=eps_placement,
                                        empty_accumulator=empty_accumulator)
        sums[p] = s
    return new_params, {"step": t_array, "sum": sums}
