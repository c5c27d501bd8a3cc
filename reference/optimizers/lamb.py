"""LAMB (layer-wise adaptive moments for batch training).

You et al. 2019/2020, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes",
arXiv:1904.00962, Algorithm 2.  Per parameter tensor w with gradient g and 1-based step t:

    m = beta1 m + (1 - beta1) g,     v = beta2 v + (1 - beta2) g^2
    m_hat = m / (1 - beta1^t),       v_hat = v / (1 - beta2^t)
    r = m_hat / (sqrt(v_hat) + eps),  u = r + lambda w
    w <- w - eta_t phi(||w||) / ||u|| u                  (phi(z) = min(max(z, gamma_l), gamma_u))

so with lambda = 0 every tensor moves by exactly eta_t ||w|| along the Adam direction.

Conventions (knobs; dialects.md 4e, estimators-optimizers.md A4):

* ``bias_correction``: "adam" (Alg. 2 as above; optax, TFA, apex, timm), "none" (the paper's
  v1 and apex/timm ``bias_correction=False``: r = m / (sqrt(v) + eps)), "m_step"
  (pytorch_optimizer's default: r = m / (sqrt(v) + eps) from the raw moments, and the *step*
  is multiplied by 1 / (1 - beta1^t) outside the trust ratio, so it is not cancelled by it).
* ``weight_decay_mode``: "update" (lambda w added to r inside the ratio: the paper, optax, TFA,
  apex ``adam_w_mode=True``, timm), "l2" (g + lambda w into the moments: apex
  ``adam_w_mode=False``), "decoupled_lr" (``w <- w (1 - eta_t lambda)`` first, u = r and ||w||
  of the decayed w: timm ``decoupled_decay``, Keras, pytorch_optimizer ``weight_decouple``),
  "decoupled_nolr" (``w (1 - lambda)``: pytorch_optimizer ``fixed_decay``).
* ``global_clip`` (apex FusedLAMB, timm: ``max_grad_norm = 1.0``): before anything,
  ``g <- g min(1, c / (N + global_clip_eps))`` with N the global norm of all gradients
  (``global_clip_eps``: pytorch_optimizer's ``pre_norm`` adds its eps to N).  None or 0: off.
* ``trust_scope``: "all" (optax, TFA, apex ``use_nvlamb``, timm ``always_adapt``) or
  "decayed_only" (apex, timm: only tensors with nonzero weight decay get the ratio; with their
  factories' wd = 0 group for 1-D tensors, those move as plain Adam).  ``trust_mask``: TFA's
  ``exclude_from_layer_adaptation``.  ``grad_averaging``: False makes m = beta1 m + g (apex,
  timm).  ``trust_clip``: LAMBC, ratio <- min(ratio, 1) (timm).  ``trust_eps``: added to ||u||
  (pytorch_optimizer uses its eps there).  ``phi_min`` / ``phi_max``: the clipping bounds of phi
  (pytorch_optimizer clamps ||w|| at 10).  ``eps_root``: inside the root, sqrt(v_hat + eps_root)
  (optax).

The ratio is 1 when phi(||w||) or ||u|| is 0 (every implementation).
"""

from __future__ import annotations

from typing import Any

from reference._backend import device, namespace
from reference.optimizers import _common
from reference.optimizers._common import apply_weight_decay, next_step, scalar
from reference.optimizers._tree import Mask, Params, global_norm, mask_of, norm, zeros_like
from reference.registry import oracle_optimizer

OP = "lamb"


def _clip_global(grads: Params, clip: float | None, clip_eps: float) -> Params:
    if clip is None or clip == 0.0:
        return dict(grads)
    total = float(global_norm(grads)) + clip_eps
    if not total > clip:  # also N = 0: nothing to clip
        return dict(grads)
    factor = clip / total
    return {p: g * factor for p, g in grads.items()}


def _trust_ratio(w: Any, u: Any, *, trust_eps: float, trust_clip: bool, phi_min: float,
                 phi_max: float | None) -> Any:
    xp = namespace(w)
    phi = min(max(float(norm(w)), phi_min), phi_max if phi_max is not None else float("inf"))
    u_norm = norm(u)
    one = xp.asarray(1.0, dtype=w.dtype, device=device(w))
    if phi == 0.0 or float(u_norm) == 0.0:
        return one
    ratio = xp.astype(phi / (u_norm + trust_eps), w.dtype)
    return xp.minimum(ratio, one) if trust_clip else ratio


@oracle_optimizer(OP)
def init(
    params: Params,
    *,
    lr: float = 1e-3,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-6,
    eps_root: float = 0.0,
    weight_decay: float = 0.01,
    weight_decay_mode: str = "update",
    weight_decay_mask: Mask = "all",
    bias_correction: str = "adam",
    grad_averaging: bool = True,
    global_clip: float | None = None,
    global_clip_eps: float = 0.0,
    trust_scope: str = "all",
    trust_mask: Mask = "all",
    trust_clip: bool = False,
    trust_eps: float = 0.0,
    phi_min: float = 0.0,
    phi_max: float | None = None,
) -> dict[str, Any]:
    """Step 0 and zero moments."""
    return {"step": scalar(next(iter(params.values())), 0.0),
            "exp_avg": zeros_like(params), "exp_avg_sq": zeros_like(params)}


@oracle_optimizer(OP)
def step(
    params: Params,
    grads: Params,
    state: dict[str, Any],
    *,
    lr: float = 1e-3,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-6,
    eps_root: float = 0.0,
    weight_decay: float = 0.01,
    weight_decay_mode: str = "update",
    weight_decay_mask: Mask = "all",
    bias_correction: str = "adam",
    grad_averaging: bool = True,
    global_clip: float | None = None,
    global_clip_eps: float = 0.0,
    trust_scope: str = "all",
    trust_mask: Mask = "all",
    trust_clip: bool = False,
    trust_eps: float = 0.0,
    phi_min: float = 0.0,
    phi_max: float | None = None,
) -> tuple[Params, dict[str, Any]]:
    """One LAMB step (module docstring)."""
    if phi_max is not None and phi_max < phi_min:
        raise ValueError(f"{OP}: phi_min must be <= phi_max, got phi_min={phi_min}, "
                         f"phi_max={phi_max}")
    t_array, t = next_step(state, params)
    grads = _clip_global(grads, global_clip, global_clip_eps)
    decayed = mask_of(weight_decay_mask, params, name="weight_decay_mask")
    trusted = mask_of(trust_mask, params, name="trust_mask")
    if weight_decay_mode != "update":
        params, grads = apply_weight_decay(params, grads, lr=lr, weight_decay=weight_decay,
                                           mode=weight_decay_mode, mask=weight_decay_mask)
    bc1 = _common.bias_correction(beta1, t) if bias_correction == "adam" else 1.0
    bc2 = _common.bias_correction(beta2, t) if bias_correction == "adam" else 1.0
    # m_step (pytorch_optimizer): lr / (1 - beta1^t) multiplies the step outside the ratio
    step_lr = lr / _common.bias_correction(beta1, t) if bias_correction == "m_step" else lr
    beta3 = 1.0 - beta1 if grad_averaging else 1.0
    new = {"step": t_array, "exp_avg": {}, "exp_avg_sq": {}}
    new_params: Params = {}
    for p, w in params.items():
        xp = namespace(w)
        g = grads[p]
        wd = weight_decay if decayed[p] else 0.0
        m = beta1 * state["exp_avg"][p] + beta3 * g
        v = beta2 * state["exp_avg_sq"][p] + (1.0 - beta2) * (g * g)
        u = (m / bc1) / (xp.sqrt(v / bc2 + eps_root) + eps)
        if weight_decay_mode == "update" and wd != 0.0:
            u = u + wd * w
        if trusted[p] and (trust_scope == "all" or wd != 0.0):
            u = u * _trust_ratio(w, u, trust_eps=trust_eps, trust_clip=trust_clip,
                                 phi_min=phi_min, phi_max=phi_max)
        new_params[p] = w - step_lr * u
        new["exp_avg"][p], new["exp_avg_sq"][p] = m, v
    return new_params, new
