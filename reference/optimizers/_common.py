"""Pieces every optimizer shares: weight decay forms, moving averages, bias correction, steps."""

from __future__ import annotations

from typing import Any

from reference._backend import device, namespace
from reference.optimizers._tree import Mask, Params, mask_of

__all__ = ["WEIGHT_DECAY_MODES", "apply_weight_decay", "bias_correction", "coupled_decay",
           "decoupled_decay", "ema",
           "next_step", "scalar"]

#: ``l2``: the gradient gets ``+ lambda w`` (coupled, torch SGD/Adam ``weight_decay``);
#: ``decoupled_lr``: ``w <- w (1 - lr lambda)`` before the step (torch AdamW, Keras, optax
#: ``add_decayed_weights`` before ``scale_by_learning_rate``); ``decoupled_nolr``: ``w <- w (1 -
#: lambda)`` (Loshchilov & Hutter Alg. 2 with the schedule multiplier eta_t = 1: lambda is not
#: multiplied by the learning rate alpha).
WEIGHT_DECAY_MODES = ("l2", "decoupled_lr", "decoupled_nolr")


def scalar(like: Any, value: float) -> Any:
    """A 0-d float64 array in the namespace of ``like``."""
    xp = namespace(like)
    return xp.asarray(value, dtype=xp.float64, device=device(like))


def next_step(state: dict[str, Any], params: Params) -> tuple[Any, int]:
    """``(t as a 0-d array, t as an int)`` with t = state["step"] + 1 (steps are 1-based)."""
    t = int(round(float(state["step"]))) + 1
    return scalar(next(iter(params.values())), float(t)), t


def ema(old: Any, new: Any, beta: float) -> Any:
    """``beta old + (1 - beta) new``: the exponential moving average of every Adam-type moment."""
    return beta * old + (1.0 - beta) * new


def bias_correction(beta: float, t: int) -> float:
    """``1 - beta^t``: the mass an EMA started at 0 has after t steps (Kingma & Ba Sec. 3)."""
    return 1.0 - beta**t


def coupled_decay(params: Params, grads: Params, weight_decay: float, mask: Mask) -> Params:
    """L2 regularization folded into the gradient: ``g + lambda w`` where the mask selects."""
    if weight_decay == 0.0:
        return dict(grads)
    where = mask_of(mask, params, name="weight_decay_mask")
    return {p: g + weight_decay * params[p] if where[p] else g for p, g in grads.items()}


def decoupled_decay(params: Params, factor: float, mask: Mask) -> Params:
    """``w (1 - factor)`` where the mask selects (factor = lr lambda, or lambda)."""
    if factor == 0.0:
        return dict(params)
    where = mask_of(mask, params, name="weight_decay_mask")
    return {p: w * (1.0 - factor) if where[p] else w for p, w in params.items()}


def apply_weight_decay(params: Params, grads: Params, *, lr: float, weight_decay: float,
                       mode: str, mask: Mask) -> tuple[Params, Params]:
    """``(params, grads)`` after the weight-decay form ``mode`` (see :data:`WEIGHT_DECAY_MODES`)."""
    if mode == "l2":
        return dict(params), coupled_decay(params, grads, weight_decay, mask)
    if mode == "decoupled_lr":
        return decoupled_decay(params, lr * weight_decay, mask), dict(grads)
    if mode == "decoupled_nolr":
        return decoupled_decay(params, weight_decay, mask), dict(grads)
    raise ValueError(f"weight_decay_mode must be one of {WEIGHT_DECAY_MODES}, got {mode!r}")
