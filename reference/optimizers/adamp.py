"""AdamP and SGDP: Adam and momentum SGD with the radial component of the step projected out.

Heo et al., "AdamP: Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant Weights"
(ICLR 2021, arXiv:2006.08217), Algorithm 1 (SGDP) and Algorithm 2 (AdamP), Sec. 3.2 Eq. 11-12.
The base steps, for one parameter w with gradient g and 1-based step t:

    AdamP:  m = beta1 m + (1 - beta1) g,   v = beta2 v + (1 - beta2) g^2
            p = m / denom        (nesterov: p = (beta1 m + (1 - beta1) g) / denom)
            denom = sqrt(v) / sqrt(1 - beta2^t) + eps        (adam_eps_mode = "corrected")
            step size s = eta / (1 - beta1^t)
    SGDP:   b = mu b + (1 - tau) g   (b_0 = 0, so b_1 = (1 - tau) g: no torch-style clone)
            p = b                    (nesterov: p = g + mu b);   step size s = eta

The projection (Eq. 12; only for tensors with ndim > 1).  Two views of w, g and p are tried in
order: the *channel* view, one row per output channel (``w.reshape(C_out, -1)``), then the
*layer* view, one row (``w.reshape(1, -1)``).  For the first view where every row is nearly
orthogonal to its gradient,

    max over rows |cos(g_row, w_row)| < delta / sqrt(row length),

the radial component is removed row by row and the decay is scaled by ``wd_ratio``:

    w_hat = w_row / (||w_row|| + eps),    p_row <- p_row - w_hat <w_hat, p_row>

The cosine is torch's ``F.cosine_similarity(g, w, dim=1, eps)`` (torch >= 1.12): each norm is
clamped below by eps, ``<g, w> / (max(||g||, eps) max(||w||, eps))``.  Then, with the projection's
ratio r (``wd_ratio`` if it fired, else 1) and the pre-step w used by the projection,

    w <- w (1 - eta lambda r)          AdamP (weight_decay_mode = "decoupled_lr")
    w <- w (1 - eta lambda r / (1 - mu))   SGDP
    w <- w - s p

"decoupled_nolr" drops eta from the decay factor (pytorch_optimizer's ``fixed_decay=True``).

Framework conventions (dialects.md 4h; read in clovaai/AdamP ``adamp/adamp.py``, ``sgdp.py``,
timm ``timm/optim/adamp.py``, ``sgdp.py`` and pytorch_optimizer 4.1 ``optimizer/adamp.py``):

* ``adam_eps_mode``: the official code and timm add eps to the bias-corrected root ("corrected");
  pytorch_optimizer's AdamP adds it to the raw root and multiplies by sqrt(1 - beta2^t) after
  (``inv_de_nom = sqrt(bc2) / (sqrt(v) + eps)``), which is the eps-hat form ("eps_hat").
* ``buffer_projection`` (SGDP without Nesterov): the official code and timm set ``d_p = buf`` and
  project ``d_p`` in place, so the *stored momentum buffer* is the projected direction
  ("projected"); Algorithm 1 keeps the raw buffer and projects only the step, as
  pytorch_optimizer does (``d_p = buf.clone()``: "raw").  With Nesterov both keep the raw buffer.
"""

from __future__ import annotations

import math
from typing import Any

from reference._backend import namespace
from reference.optimizers._common import bias_correction, ema, next_step, scalar
from reference.optimizers._tree import Mask, Params, mask_of, zeros_like
from reference.registry import oracle_optimizer

__all__ = ["cosine_rows", "init", "init_sgdp", "project_radial", "step", "step_sgdp"]

DECAY_MODES = ("decoupled_lr", "decoupled_nolr")


def _row_norms(x: Any) -> Any:
    xp = namespace(x)
    return xp.sqrt(xp.sum(x * x, axis=1, keepdims=True))


def cosine_rows(a: Any, b: Any, eps: float) -> Any:
    """|cos| between matching rows of 2-D ``a`` and ``b``, each norm clamped below by eps
    (torch's ``F.cosine_similarity(a, b, dim=1, eps=eps).abs()``)."""
    xp = namespace(a, b)
    na = xp.clip(_row_norms(a), min=eps)
    nb = xp.clip(_row_norms(b), min=eps)
    return xp.abs(xp.sum((a / na) * (b / nb), axis=1))


def project_radial(w: Any, g: Any, perturb: Any, *, delta: float, eps: float) -> tuple[Any, bool]:
    """``(perturb without its radial part, True)`` in the first view (channel, then layer) where
    every row of ``g`` is nearly orthogonal to ``w``; ``(perturb, False)`` when neither view is."""
    xp = namespace(w, g, perturb)
    if w.ndim <= 1:
        return perturb, False
    for rows in (w.shape[0], 1):
        w2 = xp.reshape(w, (rows, -1))
        cos = cosine_rows(xp.reshape(g, (rows, -1)), w2, eps)
        if float(xp.max(cos)) < delta / math.sqrt(w2.shape[1]):
            w_hat = w2 / (_row_norms(w2) + eps)
            p2 = xp.reshape(perturb, (rows, -1))
            p2 = p2 - w_hat * xp.sum(w_hat * p2, axis=1, keepdims=True)
            return xp.reshape(p2, w.shape), True
    return perturb, False


def _decay_factor(*, lr: float, weight_decay: float, mode: str, ratio: float) -> float:
    if mode == "decoupled_lr":
        return lr * weight_decay * ratio
    if mode == "decoupled_nolr":
        return weight_decay * ratio
    raise ValueError(f"weight_decay_mode must be one of {DECAY_MODES}, got {mode!r}")


def _check_delta_ratio(op: str, delta: float, wd_ratio: float) -> None:
    # The spec validates these for the decorated API; the raw functions check again.
    if not delta >= 0.0 or not 0.0 <= wd_ratio <= 1.0:
        raise ValueError(f"{op}: delta must be >= 0 and wd_ratio in [0, 1], "
                         f"got delta={delta}, wd_ratio={wd_ratio}")


# AdamP ---------------------------------------------------------------------------------------


@oracle_optimizer("adamp")
def init(
    params: Params, *, lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999,
    eps: float = 1e-8, weight_decay: float = 0.0, delta: float = 0.1, wd_ratio: float = 0.1,
    nesterov: bool = False, weight_decay_mode: str = "decoupled_lr",
    weight_decay_mask: Mask = "all", adam_eps_mode: str = "corrected",
) -> dict[str, Any]:
    """Step 0 and zero moments."""
    return {"step": scalar(next(iter(params.values())), 0.0),
            "exp_avg": zeros_like(params), "exp_avg_sq": zeros_like(params)}


@oracle_optimizer("adamp")
def step(
    params: Params, grads: Params, state: dict[str, Any], *, lr: float = 1e-3, beta1: float = 0.9,
    beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0, delta: float = 0.1,
    wd_ratio: float = 0.1, nesterov: bool = False, weight_decay_mode: str = "decoupled_lr",
    weight_decay_mask: Mask = "all", adam_eps_mode: str = "corrected",
) -> tuple[Params, dict[str, Any]]:
    """One AdamP step (module docstring)."""
    _check_delta_ratio("adamp", delta, wd_ratio)
    t_array, t = next_step(state, params)
    bc1, bc2 = bias_correction(beta1, t), bias_correction(beta2, t)
    step_size = lr / bc1
    decayed = mask_of(weight_decay_mask, params, name="weight_decay_mask")
    new = {"step": t_array, "exp_avg": {}, "exp_avg_sq": {}}
    new_params = {}
    for p, w in params.items():
        xp = namespace(w)
        g = grads[p]
        m = ema(state["exp_avg"][p], g, beta1)
        v = ema(state["exp_avg_sq"][p], g * g, beta2)
        if adam_eps_mode == "corrected":
            denom = xp.sqrt(v) / math.sqrt(bc2) + eps
        elif adam_eps_mode == "eps_hat":
            denom = (xp.sqrt(v) + eps) / math.sqrt(bc2)
        else:
            raise ValueError(f"adamp: adam_eps_mode must be 'corrected' or 'eps_hat', "
                             f"got {adam_eps_mode!r}")
        numer = beta1 * m + (1.0 - beta1) * g if nesterov else m
        perturb, fired = project_radial(w, g, numer / denom, delta=delta, eps=eps)
        if weight_decay != 0.0 and decayed[p]:
            w = w * (1.0 - _decay_factor(lr=lr, weight_decay=weight_decay, mode=weight_decay_mode,
                                         ratio=wd_ratio if fired else 1.0))
        new_params[p] = w - step_size * perturb
        new["exp_avg"][p], new["exp_avg_sq"][p] = m, v
    return new_params, new


# SGDP ----------------------------------------------------------------------------------------


@oracle_optimizer("sgdp")
def init_sgdp(
    params: Params, *, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
    nesterov: bool = False, weight_decay: float = 0.0, eps: float = 1e-8, delta: float = 0.1,
    wd_ratio: float = 0.1, weight_decay_mode: str = "decoupled_lr",
    weight_decay_mask: Mask = "all", buffer_projection: str = "projected",
) -> dict[str, Any]:
    """Step 0 and a zero momentum buffer (kept even with momentum 0: b = (1 - tau) g then)."""
    return {"step": scalar(next(iter(params.values())), 0.0),
            "momentum_buffer": zeros_like(params)}


@oracle_optimizer("sgdp")
def step_sgdp(
    params: Params, grads: Params, state: dict[str, Any], *, lr: float = 1e-3,
    momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False,
    weight_decay: float = 0.0, eps: float = 1e-8, delta: float = 0.1, wd_ratio: float = 0.1,
    weight_decay_mode: str = "decoupled_lr", weight_decay_mask: Mask = "all",
    buffer_projection: str = "projected",
) -> tuple[Params, dict[str, Any]]:
    """One SGDP step (module docstring)."""
    _check_delta_ratio("sgdp", delta, wd_ratio)
    if buffer_projection not in ("projected", "raw"):
        raise ValueError(f"sgdp: buffer_projection must be 'projected' or 'raw', "
                         f"got {buffer_projection!r}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"sgdp: momentum must be in [0, 1), got {momentum}")
    t_array, _ = next_step(state, params)
    decayed = mask_of(weight_decay_mask, params, name="weight_decay_mask")
    new = {"step": t_array, "momentum_buffer": {}}
    new_params = {}
    for p, w in params.items():
        g = grads[p]
        b = momentum * state["momentum_buffer"][p] + (1.0 - dampening) * g
        d = g + momentum * b if nesterov else b
        d, fired = project_radial(w, g, d, delta=delta, eps=eps)
        if fired and not nesterov and buffer_projection == "projected":
            b = d   # the official code projects the buffer itself (d_p is buf, edited in place)
        if weight_decay != 0.0 and decayed[p]:
            ratio = (wd_ratio if fired else 1.0) / (1.0 - momentum)
            w = w * (1.0 - _decay_factor(lr=lr, weight_decay=weight_decay, mode=weight_decay_mode,
                                         ratio=ratio))
        new_params[p] = w - lr * d
        new["momentum_buffer"][p] = b
    return new_params, new
