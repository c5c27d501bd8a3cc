"""Gradient clipping: global norm, per tensor, and unit-wise adaptive (AGC).

Pure helpers (also used by other update rules: LAMB's pre-clip, Ranger21's AGC):

* :func:`clip_by_global_norm` — Pascanu et al. 2013 (arXiv:1211.5063) Alg. 1 applied to all the
  parameters at once::

      G <- G min(1, c / (||G||_global + eps_add))

  ``eps_add = 0`` is the paper, optax ``clip_by_global_norm`` (``where(n < c, g, g / n * c)``) and
  Keras ``global_clipnorm`` (``g c min(1/n, 1/c)``); torch ``clip_grad_norm_`` multiplies by
  ``clamp(c / (n + 1e-6), max=1)``, i.e. ``eps_add = 1e-6``: it already shrinks gradients whose norm
  lies in (c - 1e-6, c].
* :func:`clip_per_tensor` — the same rule with each tensor's own norm (``measure = "norm"``:
  torch ``clip_grad_norm_`` called on one tensor at a time, Keras ``clipnorm``) or its RMS,
  ``||g|| / sqrt(numel)`` (``measure = "rms"``: optax ``clip_by_block_rms``, which divides by
  ``max(1, rms / c)``).
* :func:`adaptive_grad_clip` — Brock et al. 2021 (NFNets, arXiv:2102.06171) Sec. 4.1 Eq. 3, unit by
  unit (a unit is one output row of a weight)::

      G_i <- lambda max(||W_i||, eps) G_i / max(||G_i||, 1e-6)   if ||G_i|| > lambda max(||W_i||, eps)
      G_i <- G_i                                                 otherwise

  The 1e-6 guard is the official code's (google-deepmind/deepmind-research nfnets/optim.py
  ``SGD_AGC``), also optax's ``div_eps`` and timm's.  Which axes make a unit depends on the
  storage layout (:func:`unitwise_norm`); pytorch_optimizer compares the *guarded* gradient norm
  ``max(||G_i||, 1e-6)`` with the threshold (``compare_guarded``), which differs only when the
  threshold is below 1e-6.

Each rule is also an optimizer op (specs ``global_norm_clip``, ``per_tensor_clip``, ``agc``):
plain SGD on the clipped gradient, ``w <- w - lr (clip(g) + lambda w)``, where the optional coupled
weight decay ``lambda w`` is added *after* clipping as in torch (``clip_grad_norm_`` then
``SGD(weight_decay)``), optax (``chain(clip..., add_decayed_weights, sgd)``) and NFNets' ``SGD_AGC``.
This lets the trajectory harness check a framework's clipping exactly.
"""

from __future__ import annotations

import math
from typing import Any

from reference._backend import device, namespace, size
from reference.optimizers._common import coupled_decay, next_step, scalar
from reference.optimizers._tree import Mask, Params, global_norm, mask_of, norm
from reference.registry import oracle_optimizer

__all__ = [
    "CLIP_MEASURES",
    "UNIT_LAYOUTS",
    "adaptive_grad_clip",
    "agc_tensor",
    "clip_by_global_norm",
    "clip_per_tensor",
    "unit_axes",
    "unitwise_norm",
]

#: Which axes of a tensor form one "unit" (the reduced axes of its unit-wise norm):
#:
#: * ``out_first`` — PyTorch weights (out, in, kH, kW): reduce dims 1..n-1 (timm
#:   ``unitwise_norm``); 0-d and 1-D tensors use the whole-vector norm.
#: * ``out_last`` — JAX/Haiku weights (in, out) and HWIO: reduce axis 0 for 2-D and 3-D, axes
#:   (0, 1, 2) for 4-D, (0, 1, 2, 3) for 5-D (optax ``unitwise_norm``; NFNets' code stops at 4-D);
#:   a tensor with at most one non-unit dimension (``squeeze(x).ndim <= 1``) is a vector and uses
#:   the whole norm.  Generalized here to all axes but the last for ndim > 5 (optax raises).
#: * ``out_first_3d_dim1`` — lessw2020/Ranger21 and pytorch_optimizer ``unit_norm``: as
#:   ``out_first`` except that 2-D **and 3-D** tensors reduce dim 1 only (a Conv1d weight (O, I, K)
#:   gets O*K units of length I).
UNIT_LAYOUTS = ("out_first", "out_last", "out_first_3d_dim1")

#: What per-tensor clipping bounds: the L2 norm, or the RMS ``||g|| / sqrt(numel)``.
CLIP_MEASURES = ("norm", "rms")

#: The guard of the division by the gradient's unit norm (NFNets code, optax, timm).
AGC_DIV_EPS = 1e-6


# ------------------------------------------------------------------------------------------
# Norms
# ------------------------------------------------------------------------------------------


def unit_axes(shape: tuple[int, ...], layout: str = "out_first") -> tuple[int, ...] | None:
    """The reduced axes of the unit-wise norm of a tensor of ``shape`` (None: the whole tensor)."""
    nd = len(shape)
    if layout == "out_first":
        return None if nd <= 1 else tuple(range(1, nd))
    if layout == "out_first_3d_dim1":
        if nd <= 1:
            return None
        return (1,) if nd in (2, 3) else tuple(range(1, nd))
    if layout == "out_last":
        if sum(1 for d in shape if d != 1) <= 1:
            return None
        return (0,) if nd in (2, 3) else tuple(range(nd - 1))
    raise ValueError(f"layout must be one of {UNIT_LAYOUTS}, got {layout!r}")


def _norm_over(x: Any, axes: tuple[int, ...] | None) -> Any:
    """||x|| over ``axes`` (kept as size-1 dims), overflow-safe; ``axes=None``: a 0-d whole norm."""
    if axes is None:
        return norm(x)
    xp = namespace(x)
    big = xp.max(xp.abs(x), axis=axes, keepdims=True)
    safe = xp.where((big > 0) & (big < math.inf), big, xp.ones_like(big))
    return safe * xp.sqrt(xp.sum((x / safe) ** 2, axis=axes, keepdims=True))


def unitwise_norm(x: Any, layout: str = "out_first") -> Any:
    """The L2 norm of each unit of ``x`` (see :data:`UNIT_LAYOUTS`), broadcastable against ``x``:
    reduced axes are kept with size 1; a tensor treated as one vector gives a 0-d norm."""
    return _norm_over(x, unit_axes(tuple(x.shape), layout))


# ------------------------------------------------------------------------------------------
# Clipping rules (pure helpers)
# ------------------------------------------------------------------------------------------


def _scale_if_above(g: Any, n: Any, max_norm: float, eps_add: float) -> Any:
    """``g min(1, c / (n + eps_add))``: ``g`` itself (bit-identical) when no clipping happens.

    A NaN norm makes every element NaN, as in torch, optax and Keras (the comparison is false).
    """
    if float(n) + eps_add <= max_norm:
        return g
    return g * (max_norm / (n + eps_add))


def clip_by_global_norm(grads: Params, max_norm: float, *, eps_add: float = 0.0) -> Params:
    """Every gradient times ``min(1, max_norm / (||grads||_global + eps_add))`` (module docstring).

    Unclipped gradients come back as the same arrays; the direction of the whole gradient never
    changes and its global norm is at most ``max_norm`` (up to rounding) afterwards.
    """
    if not max_norm > 0.0:
        raise ValueError(f"clip_by_global_norm: max_norm must be > 0, got {max_norm!r}")
    if not eps_add >= 0.0:
        raise ValueError(f"clip_by_global_norm: eps_add must be >= 0, got {eps_add!r}")
    n = global_norm(grads)
    return {p: _scale_if_above(g, n, max_norm, eps_add) for p, g in grads.items()}


def clip_per_tensor(grads: Params, max_norm: float, *, eps_add: float = 0.0,
                    measure: str = "norm") -> Params:
    """Each tensor by its own norm (or RMS): ``g min(1, c / (m(g) + eps_add))``."""
    if not max_norm > 0.0:
        raise ValueError(f"clip_per_tensor: max_norm must be > 0, got {max_norm!r}")
    if measure not in CLIP_MEASURES:
        raise ValueError(f"clip_per_tensor: measure must be one of {CLIP_MEASURES}, got {measure!r}")
    out = {}
    for p, g in grads.items():
        n = norm(g)
        if measure == "rms":
            n = n / math.sqrt(max(size(g), 1))
        out[p] = _scale_if_above(g, n, max_norm, eps_add)
    return out


def agc_tensor(w: Any, g: Any, *, clipping: float = 0.01, eps: float = 1e-3,
               layout: str = "out_first", compare_guarded: bool = False) -> Any:
    """Unit-wise adaptive gradient clipping of one tensor (Brock et al. Eq. 3, module docstring)."""
    xp = namespace(g)
    w_norm = unitwise_norm(w, layout)
    g_norm = unitwise_norm(g, layout)
    on = device(w_norm)
    max_norm = clipping * xp.maximum(w_norm, xp.asarray(eps, dtype=w_norm.dtype, device=on))
    guarded = xp.maximum(g_norm, xp.asarray(AGC_DIV_EPS, dtype=g_norm.dtype, device=on))
    trigger = (guarded if compare_guarded else g_norm) > max_norm
    if not bool(xp.any(trigger)):
        return g
    return xp.where(trigger, g * (max_norm / guarded), g)


def adaptive_grad_clip(params: Params, grads: Params, *, clipping: float = 0.01, eps: float = 1e-3,
                       layout: str = "out_first", mask: Mask = "all",
                       compare_guarded: bool = False) -> Params:
    """AGC of every gradient the mask selects (others are returned as they are).

    After clipping ``||G_i|| <= clipping max(||W_i||, eps)`` for every unit (up to rounding); units
    under the threshold are bit-identical.
    """
    if not clipping >= 0.0:
        raise ValueError(f"adaptive_grad_clip: clipping must be >= 0, got {clipping!r}")
    if not eps >= 0.0:
        raise ValueError(f"adaptive_grad_clip: eps must be >= 0, got {eps!r}")
    if layout not in UNIT_LAYOUTS:
        raise ValueError(f"adaptive_grad_clip: layout must be one of {UNIT_LAYOUTS}, got {layout!r}")
    where = mask_of(mask, params, name="mask")
    return {p: agc_tensor(params[p], g, clipping=clipping, eps=eps, layout=layout,
                          compare_guarded=compare_guarded) if where[p] else g
            for p, g in grads.items()}


# ------------------------------------------------------------------------------------------
# The optimizer ops: SGD on the clipped gradient
# ------------------------------------------------------------------------------------------


def _sgd(params: Params, clipped: Params, state: dict[str, Any], lr: float, weight_decay: float,
         weight_decay_mask: Mask) -> tuple[Params, dict[str, Any]]:
    t_array, _ = next_step(state, params)
    direction = coupled_decay(params, clipped, weight_decay, weight_decay_mask)
    return {p: w - lr * direction[p] for p, w in params.items()}, {"step": t_array}


def _init(params: Params) -> dict[str, Any]:
    return {"step": scalar(next(iter(params.values())), 0.0)}


@oracle_optimizer("global_norm_clip")
def init_global_norm_clip(
    params: Params, *, lr: float = 1e-3, max_norm: float = 1.0, eps_add: float = 0.0,
    weight_decay: float = 0.0, weight_decay_mask: Mask = "all",
) -> dict[str, Any]:
    """Step 0 (no other state)."""
    return _init(params)


@oracle_optimizer("global_norm_clip")
def step_global_norm_clip(
    params: Params, grads: Params, state: dict[str, Any], *, lr: float = 1e-3,
    max_norm: float = 1.0, eps_add: float = 0.0, weight_decay: float = 0.0,
    weight_decay_mask: Mask = "all",
) -> tuple[Params, dict[str, Any]]:
    """``w <- w - lr (clip_by_global_norm(g) + lambda w)``."""
    clipped = clip_by_global_norm(grads, max_norm, eps_add=eps_add)
    return _sgd(params, clipped, state, lr, weight_decay, weight_decay_mask)


@oracle_optimizer("per_tensor_clip")
def init_per_tensor_clip(
    params: Params, *, lr: float = 1e-3, max_norm: float = 1.0, measure: str = "norm",
    eps_add: float = 0.0, weight_decay: float = 0.0, weight_decay_mask: Mask = "all",
) -> dict[str, Any]:
    """Step 0 (no other state)."""
    return _init(params)


@oracle_optimizer("per_tensor_clip")
def step_per_tensor_clip(
    params: Params, grads: Params, state: dict[str, Any], *, lr: float = 1e-3,
    max_norm: float = 1.0, measure: str = "norm", eps_add: float = 0.0,
    weight_decay: float = 0.0, weight_decay_mask: Mask = "all",
) -> tuple[Params, dict[str, Any]]:
    """``w <- w - lr (clip_per_tensor(g) + lambda w)``."""
    clipped = clip_per_tensor(grads, max_norm, eps_add=eps_add, measure=measure)
    return _sgd(params, clipped, state, lr, weight_decay, weight_decay_mask)


@oracle_optimizer("agc")
def init_agc(
    params: Params, *, lr: float = 1e-3, clipping: float = 0.01, eps: float = 1e-3,
    layout: str = "out_first", compare_guarded: bool = False, clip_mask: Mask = "all",
    weight_decay: float = 0.0, weight_decay_mask: Mask = "all",
) -> dict[str, Any]:
    """Step 0 (no other state)."""
    return _init(params)


@oracle_optimizer("agc")
def step_agc(
    params: Params, grads: Params, state: dict[str, Any], *, lr: float = 1e-3,
    clipping: float = 0.01, eps: float = 1e-3, layout: str = "out_first",
    compare_guarded: bool = False, clip_mask: Mask = "all", weight_decay: float = 0.0,
    weight_decay_mask: Mask = "all",
) -> tuple[Params, dict[str, Any]]:
    """``w <- w - lr (adaptive_grad_clip(w, g) + lambda w)`` (NFNets' ``SGD_AGC`` without momentum)."""
    clipped = adaptive_grad_clip(params, grads, clipping=clipping, eps=eps, layout=layout,
                                 mask=clip_mask, compare_guarded=compare_guarded)
    return _sgd(params, clipped, state, lr, weight_decay, weight_decay_mask)
