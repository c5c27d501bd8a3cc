"""SGD with heavy-ball momentum, dampening and Nesterov momentum.

PyTorch form (``torch.optim.SGD``; Sutskever et al. 2013 Eq. 1-2 as written by Goyal et al. 2017
Sec. 2, "Accurate, Large Minibatch SGD", arXiv:1706.02677), with g_t the gradient of step t:

    g  <- g + lambda w                       (weight_decay_mode = "l2", the coupled form)
    b_1 = g,   b_t = mu b_{t-1} + (1 - tau) g     (first_step = "clone": no dampening on step 1)
    d  = g + mu b_t   (Nesterov)   or   d = b_t
    w  <- w - eta_t d                          (lr_placement = "outside")

The learning rate inside the buffer (Goyal et al. Eq. 9-10; Keras ``SGD``, Caffe2):

    u_t = mu u_{t-1} + (1 - tau) eta_t g,     w <- w - u_t     (Nesterov: w <- w - (mu u_t + eta_t g))

Under a constant eta the two are the same trajectory (u_t = eta b_t).  After eta changes, u still
carries the old rate; Goyal's *momentum correction* (Eq. 10, ``momentum_correction=True``) rescales
it, ``u_t = mu (eta_t / eta_{t-1}) u_{t-1} + eta_t g``, which restores the PyTorch trajectory
exactly.  ``first_step = "zeros"`` starts from b_0 = 0 (optax ``trace``, Keras, timm SGDP), which
differs from "clone" only when tau != 0.

Conventions: ``weight_decay_mode`` "l2" (torch), "decoupled_lr" (Keras: ``w <- w - lr lambda w``
before the step), "decoupled_nolr"; ``weight_decay_mask`` selects the decayed parameters.
"""

from __future__ import annotations

from typing import Any

from reference.optimizers._common import apply_weight_decay, next_step, scalar
from reference.optimizers._tree import Mask, Params, zeros_like
from reference.registry import oracle_optimizer

OP = "sgd"


@oracle_optimizer(OP)
def init(
    params: Params,
    *,
    lr: float = 1e-3,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    weight_decay_mode: str = "l2",
    weight_decay_mask: Mask = "all",
    lr_placement: str = "outside",
    momentum_correction: bool = False,
    first_step: str = "clone",
) -> dict[str, Any]:
    """Step 0, a zero momentum buffer (when momentum != 0) and the previous lr (lr inside)."""
    like = next(iter(params.values()))
    state: dict[str, Any] = {"step": scalar(like, 0.0)}
    if momentum != 0.0:
        state["momentum_buffer"] = zeros_like(params)
    if lr_placement == "inside" and momentum_correction:
        state["lr_prev"] = scalar(like, lr)
    return state


@oracle_optimizer(OP)
def step(
    params: Params,
    grads: Params,
    state: dict[str, Any],
    *,
    lr: float = 1e-3,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    weight_decay_mode: str = "l2",
    weight_decay_mask: Mask = "all",
    lr_placement: str = "outside",
    momentum_correction: bool = False,
    first_step: str = "clone",
) -> tuple[Params, dict[str, Any]]:
    """One SGD step; see the module docstring for the update."""
    if nesterov and dampening != 0.0:
        # Sutskever's Nesterov form has no dampening (torch refuses the combination too).  torch
        # also refuses momentum = 0 with Nesterov; mathematically d = g then: plain SGD.
        raise ValueError(f"{OP}: nesterov needs dampening = 0, got dampening={dampening}")
    t_array, t = next_step(state, params)
    params, grads = apply_weight_decay(params, grads, lr=lr, weight_decay=weight_decay,
                                       mode=weight_decay_mode, mask=weight_decay_mask)
    new_state: dict[str, Any] = {"step": t_array}
    if momentum == 0.0:
        return {p: w - lr * grads[p] for p, w in params.items()}, new_state
    inside = lr_placement == "inside"
    # eta inside the buffer: with the correction, the old buffer is rescaled to the new rate.
    rescale = lr / float(state["lr_prev"]) if inside and momentum_correction and t > 1 else 1.0
    scale = lr if inside else 1.0
    buffers = {}
    new_params = {}
    for p, w in params.items():
        g = grads[p]
        if t == 1 and first_step == "clone":
            b = scale * g
        else:
            b = momentum * rescale * state["momentum_buffer"][p] + (1.0 - dampening) * scale * g
        d = (scale * g + momentum * b) if nesterov else b
        new_params[p] = w - d if inside else w - lr * d
        buffers[p] = b
    new_state["momentum_buffer"] = buffers
    if inside and momentum_correction:
        new_state["lr_prev"] = scalar(t_array, lr)
    return new_params, new_state
