"""LARS (layer-wise adaptive rate scaling) and LARC (its clipped form).

You, Gitman & Ginsburg 2017, "Large Batch Training of Convolutional Networks", arXiv:1708.03888,
Eq. 6 and Algorithm 1.  Per parameter tensor ("layer") w with gradient g, global rate eta_t:

    lambda_l = eta_tc ||w|| / (||g|| + beta ||w|| + eps)            (local lr, Eq. 6; eta_tc the
                                                                      trust coefficient, beta the
                                                                      weight decay)
    d  = lambda_l (g + beta w)
    v <- m v + eta_t d,   w <- w - v                                 (Algorithm 1)

Conventions (knobs; dialects.md 4f, estimators-optimizers.md A3):

* ``trust_denominator``: "sum_of_norms" ``||g|| + beta ||w||`` (paper, apex LARC, timm,
  pytorch_optimizer) or "norm_of_sum" ``||g + beta w||`` (optax ``scale_by_trust_ratio`` after
  ``add_decayed_weights``).  They differ whenever beta > 0.
* ``trust_clip`` (LARC, apex ``LARC(clip=True)``, timm ``trust_clip``): the ratio becomes
  ``min(lambda_l / eta_t, 1)``, i.e. a per-layer effective rate ``min(lambda_l, eta_t)`` <= eta_t.
* ``lr_placement``: "inside" the momentum buffer as in Algorithm 1 (optax: ``trace`` after
  ``scale_by_learning_rate``) or "outside" (torch SGD under apex LARC, timm, pytorch_optimizer:
  ``b = m b + d``, ``w <- w - eta_t b``).  Equal under a constant rate; after a rate change the
  inside buffer still carries the old rate.  ``first_step``: "clone" (torch SGD, timm: the first
  buffer is a copy of d, no dampening) or "zeros" (b_0 = 0: Algorithm 1, optax ``trace``,
  pytorch_optimizer); they differ only with ``dampening`` != 0.
* ``zero_norm_rule`` (a norm of 0 would make the ratio 0 or 0/0): "one" sets the ratio to 1 when
  ||w|| = 0 or the gradient-side norm (||g||, or ||g + beta w|| for "norm_of_sum") is 0 (timm,
  optax); "skip" leaves that tensor's gradient unscaled *and undecayed* (apex LARC only touches
  the gradient when both norms are nonzero, and it has zeroed the inner optimizer's decay);
  "denominator" sets it to 1 when ||w|| = 0 or the whole denominator is 0 (pytorch_optimizer, so
  ||g|| = 0 with beta > 0 gives the ratio eta_tc / beta).
* ``trust_mask`` / ``weight_decay_mask``: where the ratio / the decay apply (the paper adapts
  and decays every layer: "all"; recipes exclude 1-D tensors: "ndim>=2").  ``always_adapt``:
  False reproduces timm, which adapts a tensor only when its weight decay is nonzero (its
  factory puts biases and norm gains in a wd = 0 group, so they get neither).

Per tensor with beta_p = weight_decay where ``weight_decay_mask`` selects p (else 0):
adapted = trust_mask(p) and (always_adapt or beta_p != 0); d = ratio (g + beta_p w) if adapted
else g + beta_p w; then heavy-ball / Nesterov momentum as in ``sgd`` with the chosen placement.
"""

from __future__ import annotations

from typing import Any

from reference._backend import device, namespace
from reference.optimizers._common import next_step, scalar
from reference.optimizers._tree import Mask, Params, mask_of, norm, zeros_like
from reference.registry import oracle_optimizer

OP = "lars"


def _ratio(w: Any, g: Any, wd: float, *, lr: float, trust_coefficient: float, eps: float,
           trust_denominator: str, trust_clip: bool, zero_norm_rule: str) -> Any | None:
    """The layer's trust ratio as a 0-d array of w's dtype (None: "skip", leave g as it is)."""
    xp = namespace(w)
    w_norm = norm(w)
    if trust_denominator == "sum_of_norms":
        g_norm = norm(g)
        denom = g_norm + wd * w_norm + eps
    else:
        g_norm = norm(g + wd * w)
        denom = g_norm + eps
    if zero_norm_rule == "denominator":
        degenerate = float(w_norm) == 0.0 or float(denom) == 0.0
    else:
        degenerate = float(w_norm) == 0.0 or float(g_norm) == 0.0
    if degenerate:
        if zero_norm_rule == "skip":
            return None
        ratio = xp.asarray(1.0, dtype=w.dtype, device=device(w))
    else:
        ratio = xp.astype(trust_coefficient * w_norm / denom, w.dtype)
    if trust_clip:
        # LARC: lr * min(ratio / lr, 1) = min(ratio, lr); at lr = 0 the limit is 1.
        one = xp.asarray(1.0, dtype=w.dtype, device=device(w))
        ratio = xp.minimum(ratio / lr, one) if lr > 0.0 else one
    return ratio


@oracle_optimizer(OP)
def init(
    params: Params,
    *,
    lr: float = 1.0,
    momentum: float = 0.9,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    weight_decay_mask: Mask = "all",
    trust_coefficient: float = 1e-3,
    eps: float = 0.0,
    trust_denominator: str = "sum_of_norms",
    trust_clip: bool = False,
    trust_mask: Mask = "all",
    always_adapt: bool = True,
    zero_norm_rule: str = "one",
    lr_placement: str = "inside",
    first_step: str = "zeros",
) -> dict[str, Any]:
    """Step 0 and a zero momentum buffer (when momentum != 0)."""
    state: dict[str, Any] = {"step": scalar(next(iter(params.values())), 0.0)}
    if momentum != 0.0:
        state["momentum_buffer"] = zeros_like(params)
    return state


@oracle_optimizer(OP)
def step(
    params: Params,
    grads: Params,
    state: dict[str, Any],
    *,
    lr: float = 1.0,
    momentum: float = 0.9,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    weight_decay_mask: Mask = "all",
    trust_coefficient: float = 1e-3,
    eps: float = 0.0,
    trust_denominator: str = "sum_of_norms",
    trust_clip: bool = False,
    trust_mask: Mask = "all",
    always_adapt: bool = True,
    zero_norm_rule: str = "one",
    lr_placement: str = "inside",
    first_step: str = "zeros",
) -> tuple[Params, dict[str, Any]]:
    """One LARS / LARC step (module docstring)."""
    if nesterov and (momentum <= 0.0 or dampening != 0.0):
        raise ValueError(f"{OP}: nesterov needs momentum > 0 and dampening = 0 "
                         f"(got momentum={momentum}, dampening={dampening})")
    t_array, t = next_step(state, params)
    decayed = mask_of(weight_decay_mask, params, name="weight_decay_mask")
    trusted = mask_of(trust_mask, params, name="trust_mask")
    inside = lr_placement == "inside"
    new_params: Params = {}
    buffers: Params = {}
    for p, w in params.items():
        g = grads[p]
        wd = weight_decay if decayed[p] else 0.0
        d = g + wd * w if wd != 0.0 else g
        if trusted[p] and (always_adapt or wd != 0.0):
            ratio = _ratio(w, g, wd, lr=lr, trust_coefficient=trust_coefficient, eps=eps,
                           trust_denominator=trust_denominator, trust_clip=trust_clip,
                           zero_norm_rule=zero_norm_rule)
            d = g if ratio is None else d * ratio
        if inside:
            d = lr * d
        if momentum == 0.0:
            direction = d
        else:
            if t == 1 and first_step == "clone":
                b = d
            else:
                b = momentum * state["momentum_buffer"][p] + (1.0 - dampening) * d
            buffers[p] = b
            direction = d + momentum * b if nesterov else b
        new_params[p] = w - direction if inside else w - lr * direction
    new_state: dict[str, Any] = {"step": t_array}
    if momentum != 0.0:
        new_state["momentum_buffer"] = buffers
    return new_params, new_state
