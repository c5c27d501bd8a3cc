"""RMSprop: plain, centered, with heavy-ball or Nesterov momentum.

Tieleman & Hinton 2012 (Coursera "Neural Networks for Machine Learning", lecture 6.5):
keep a moving average of the squared gradient and divide the gradient by its root.  Per
coordinate, with t the 1-based step:

    g  <- g + lambda w                                  (weight_decay_mode = "l2", coupled)
    s_t = alpha s_{t-1} + (1 - alpha) g^2,              s_0 = initial_accumulator_value
    v   = s_t                                           (plain)
    v   = s_t - gbar_t^2,  gbar_t = alpha gbar_{t-1} + (1 - alpha) g,  gbar_0 = 0   (centered:
                                                        Graves 2013, arXiv:1308.0850, Eq. 38-41)
    u   = g / (sqrt(v) + eps)                           (eps_placement = "outside": torch)
    u   = g / sqrt(v + eps)                             (eps_placement = "inside": optax default,
                                                        Keras, TF1, timm RMSpropTF, Graves' k)

With ``bias_correction`` (optax's option) s_t and gbar_t are divided by 1 - alpha^t before v is
formed.  The centered v is >= 0 in exact arithmetic (Cauchy-Schwarz: gbar_t^2 <= (1 - alpha^t)
sum_i w_i g_i^2 <= s_t for the EMA weights w_i); rounding can leave it a few ulps below 0, so the
oracle takes max(v, 0) (where a framework would take the root of a negative number).

Momentum mu (``momentum_buffer`` b, b_0 = 0):

    lr_placement = "outside" (torch):   b = mu b + u,            w <- w - eta b
    lr_placement = "inside"  (optax ``trace`` after ``scale_by_learning_rate``, Keras, TF1, timm
                             RMSpropTF, Graves Eq. 40):  b = mu b + eta u,   w <- w - b

Nesterov (optax ``trace(nesterov=True)``): the step is u + mu b (outside, times eta) or
eta u + mu b (inside) with the new b.  No momentum: w <- w - eta u.  The two placements agree
under a constant eta; after eta changes the inside buffer still carries the old rate
(dialects.md 4a, 4d).

Framework conventions (dialects.md 4d): torch alpha 0.99, eps 1e-8 outside, s_0 = 0, lr outside;
optax decay 0.9, eps 1e-8 inside (``eps_in_sqrt=True``), s_0 = ``initial_scale`` 0, lr inside;
Keras rho 0.9, eps 1e-7 inside, lr inside, decoupled weight decay; TF1 / timm ``RMSpropTF`` decay
0.9, eps 1e-10 inside, s_0 = **1**, lr inside.  Weight decay: "l2" (torch, timm), "decoupled_lr"
(Keras: w (1 - eta lambda) first), "decoupled_nolr" (w (1 - lambda) first).
"""

from __future__ import annotations

from typing import Any

from reference._backend import namespace
from reference.optimizers._common import apply_weight_decay, ema, next_step, scalar
from reference.optimizers._common import bias_correction as _bias_correction
from reference.optimizers._tree import Mask, Params, zeros_like
from reference.registry import oracle_optimizer

OP = "rmsprop"


@oracle_optimizer(OP)
def init(
    params: Params,
    *,
    lr: float = 1e-2,
    alpha: float = 0.99,
    eps: float = 1e-8,
    eps_placement: str = "outside",
    centered: bool = False,
    momentum: float = 0.0,
    nesterov: bool = False,
    lr_placement: str = "outside",
    initial_accumulator_value: float = 0.0,
    bias_correction: bool = False,
    weight_decay: float = 0.0,
    weight_decay_mode: str = "l2",
    weight_decay_mask: Mask = "all",
) -> dict[str, Any]:
    """Step 0, s_0 = ``initial_accumulator_value``, zero gbar (centered) and buffer (momentum)."""
    like = next(iter(params.values()))
    state: dict[str, Any] = {
        "step": scalar(like, 0.0),
        "square_avg": {p: namespace(x).full_like(x, initial_accumulator_value)
                       for p, x in params.items()},
    }
    if centered:
        state["grad_avg"] = zeros_like(params)
    if momentum != 0.0:
        state["momentum_buffer"] = zeros_like(params)
    return state


def denominator(s: Any, gbar: Any, *, eps: float, eps_placement: str) -> Any:
    """sqrt(v) + eps or sqrt(v + eps) with v = s (gbar None) or max(s - gbar^2, 0)."""
    xp = namespace(s)
    v = s if gbar is None else xp.maximum(s - gbar * gbar, xp.zeros_like(s))
    return xp.sqrt(v) + eps if eps_placement == "outside" else xp.sqrt(v + eps)


@oracle_optimizer(OP)
def step(
    params: Params,
    grads: Params,
    state: dict[str, Any],
    *,
    lr: float = 1e-2,
    alpha: float = 0.99,
    eps: float = 1e-8,
    eps_placement: str = "outside",
    centered: bool = False,
    momentum: float = 0.0,
    nesterov: bool = False,
    lr_placement: str = "outside",
    initial_accumulator_value: float = 0.0,
    bias_correction: bool = False,
    weight_decay: float = 0.0,
    weight_decay_mode: str = "l2",
    weight_decay_mask: Mask = "all",
) -> tuple[Params, dict[str, Any]]:
    """One RMSprop step (module docstring); ``initial_accumulator_value`` only shapes ``init``."""
    if nesterov and momentum <= 0.0:
        raise ValueError(f"{OP}: nesterov needs momentum > 0 (got momentum={momentum})")
    t_array, t = next_step(state, params)
    params, grads = apply_weight_decay(params, grads, lr=lr, weight_decay=weight_decay,
                                       mode=weight_decay_mode, mask=weight_decay_mask)
    bc = _bias_correction(alpha, t) if bias_correction else 1.0
    inside = lr_placement == "inside"
    new_state: dict[str, Any] = {"step": t_array, "square_avg": {}}
    if centered:
        new_state["grad_avg"] = {}
    if momentum != 0.0:
        new_state["momentum_buffer"] = {}
    new_params = {}
    for p, w in params.items():
        g = grads[p]
        s = ema(state["square_avg"][p], g * g, alpha)
        new_state["square_avg"][p] = s
        gbar = None
        if centered:
            gbar = ema(state["grad_avg"][p], g, alpha)
            new_state["grad_avg"][p] = gbar
            gbar = gbar / bc if bias_correction else gbar
        s_hat = s / bc if bias_correction else s
        u = g / denominator(s_hat, gbar, eps=eps, eps_placement=eps_placement)
        if momentum == 0.0:
            new_params[p] = w - lr * u
            continue
        scaled = lr * u if inside else u
        b = momentum * state["momentum_buffer"][p] + scaled
        new_state["momentum_buffer"][p] = b
        d = scaled + momentum * b if nesterov else b
        new_params[p] = w - d if inside else w - lr * d
    return new_params, new_state
