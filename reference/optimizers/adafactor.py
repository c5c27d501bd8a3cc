"""Adafactor: factored second moments, update clipping, relative step sizes.

Shazeer & Stern 2018, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost",
arXiv:1804.04235, Algorithms 4 (matrices) and 5 (vectors) with the paper's update clipping,
increasing decay (``beta2_t = 1 - t^-c``) and relative step size.  Per parameter with t the
1-based step and g the gradient:

    rho_t   = min(eta, 1/sqrt(t))  if relative_step  else  eta          (paper: eta = 1e-2)
    alpha_t = max(eps2, RMS(w)) rho_t  if multiply_by_parameter_scale else rho_t
    beta_t  = min(beta2_cap, 1 - (t - decay_offset)^-c)                 (c = decay_rate = 0.8)
    factored (a matrix; see factored_dims):
        R_t = beta_t R_{t-1} + (1 - beta_t) mean_cols(g^2 + eps1)        (one value per row)
        C_t = beta_t C_{t-1} + (1 - beta_t) mean_rows(g^2 + eps1)        (one value per column)
        V_t = R_t C_t^T / mean(R_t)        (1/sqrt(V_t) formed factor by factor)
    otherwise:  V_t = beta_t V_{t-1} + (1 - beta_t) (g^2 + eps1)
    U_t = g / sqrt(V_t);   U_t <- U_t / max(1, RMS(U_t) / d)             (d = clipping_threshold)
    w  <- w - alpha_t U_t           (beta1 = 0)
    m  <- beta1 m + (1 - beta1) alpha_t U_t;   w <- w - m               (beta1 > 0)

The paper writes R and C as row and column *sums* and divides by ``1^T R``; every implementation
(T2T, fairseq, transformers, timm, optax, pytorch_optimizer) keeps *means*, which gives the same V
(the factors n and m cancel) and is what the slots ``exp_avg_sq_row`` / ``exp_avg_sq_col`` hold.
eps1 is added to every g^2 before the means (paper, all implementations).  The learning rate
``lr`` is this step's eta: with ``relative_step`` it caps the relative step (the paper's 1e-2; a
caller's schedule ``eta_t = 1e-6 t`` reproduces transformers' ``warmup_init``), without it it is
the step size itself (optax, transformers ``relative_step=False``).

Which dimensions are factored (``factored_dims``; a parameter with fewer than 2 dimensions, or
``factored = False``, keeps the full V):

* "last_two": the last two dimensions, R over shape[:-1], C over shape[:-2] + shape[-1:]
  (fairseq, transformers, timm, pytorch_optimizer): the statistics of a conv kernel are kept per
  leading index.
* "largest_two": the two largest dimensions, and only when the smaller of them has at least
  ``min_dim_size_to_factor`` elements (optax; stable order on ties, so a square matrix factors
  as "last_two").  R is the mean over the *largest* dimension, C over the second largest.
* "matrix_only": only 2-D parameters are factored (T2T's ``len(shape) == 2``, the authors' code).

``min_dim_size_to_factor`` applies in every mode (0 = no minimum).  ``clipping_threshold = None``
disables update clipping.  Momentum holds the lr-scaled update (T2T, fairseq, transformers, optax
``ema(momentum, debias=False)`` after the lr scaling, pytorch_optimizer).

Weight decay (``weight_decay_mode``): "decoupled_lr" ``w <- w (1 - alpha_t lambda)`` with this
parameter's step size alpha_t, applied to the weights the step was computed from (transformers,
fairseq, timm, pytorch_optimizer); "decoupled_nolr" ``w <- w (1 - lambda)`` (optax's
``weight_decay_rate``, added after the lr scaling); "l2" ``g <- g + lambda w`` before everything
(pytorch_optimizer ``weight_decouple=False``).  ``beta2_cap`` is pytorch_optimizer's
``min(betas[1], 1 - t^decay_rate)`` (Big Vision / Zhai et al. 2021); 1.0 leaves the schedule as is.

Unused per-parameter slots hold a zero array of shape (1,), as optax's state does (a factored
parameter has no ``exp_avg_sq``, an unfactored one no row/column statistics).
"""

from __future__ import annotations

import math
from typing import Any

from reference._backend import device, namespace
from reference.optimizers._common import next_step, scalar
from reference.optimizers._tree import Mask, Params, mask_of, zeros_like
from reference.registry import oracle_optimizer

OP = "adafactor"
FACTORED_DIMS = ("last_two", "largest_two", "matrix_only")


def factored_axes(shape: tuple[int, ...], *, factored: bool, factored_dims: str,
                  min_dim_size_to_factor: int) -> tuple[int, int] | None:
    """``(d_col, d_row)`` or None: R is the mean of g^2 over axis ``d_row``, C over ``d_col``."""
    if not factored or len(shape) < 2:
        return None
    if factored_dims == "last_two":
        axes = (len(shape) - 2, len(shape) - 1)
    elif factored_dims == "matrix_only":
        if len(shape) != 2:
            return None
        axes = (0, 1)
    elif factored_dims == "largest_two":
        order = sorted(range(len(shape)), key=lambda i: shape[i])  # stable: ties keep index order
        axes = (order[-2], order[-1])
    else:
        raise ValueError(f"{OP}: factored_dims must be one of {FACTORED_DIMS}, got {factored_dims!r}")
    if min(shape[axes[0]], shape[axes[1]]) < min_dim_size_to_factor:
        return None
    return axes


def factored_rsqrt(row: Any, col: Any, d_col: int, d_row: int) -> Any:
    """``1 / sqrt(V)`` for ``V = R C^T / mean(R)``, broadcast to the parameter's shape (the mean is
    over the factored axis R keeps, separately for every index of the other axes).

    Formed as ``rsqrt(R / mean(R)) rsqrt(C)^T`` (as T2T and optax do) rather than from V itself:
    the same value, but a row and a column that saw only ``eps1`` (1e-30) make V ~ 1e-57, which
    underflows to 0 in float32 and turns ``0 / sqrt(V)`` into NaN for a same-precision evaluation.
    """
    xp = namespace(row)
    kept = d_col if d_col < d_row else d_col - 1
    row_mean = xp.mean(row, axis=kept, keepdims=True)
    return xp.expand_dims(1.0 / xp.sqrt(row / row_mean), axis=d_row) * xp.expand_dims(
        1.0 / xp.sqrt(col), axis=d_col)


def _rms(x: Any) -> Any:
    xp = namespace(x)
    return xp.sqrt(xp.mean(x * x))


def _placeholder(w: Any) -> Any:
    xp = namespace(w)
    return xp.zeros((1,), dtype=w.dtype, device=device(w))


def _shapes(w: Any, axes: tuple[int, int] | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    shape = tuple(w.shape)
    d_col, d_row = axes
    return (tuple(n for i, n in enumerate(shape) if i != d_row),
            tuple(n for i, n in enumerate(shape) if i != d_col))


@oracle_optimizer(OP)
def init(
    params: Params, *, lr: float = 1e-2, beta1: float = 0.0, decay_rate: float = 0.8,
    decay_offset: int = 0, beta2_cap: float = 1.0, eps1: float = 1e-30, eps2: float = 1e-3,
    clipping_threshold: float | None = 1.0, relative_step: bool = True,
    multiply_by_parameter_scale: bool = True, factored: bool = True,
    factored_dims: str = "last_two", min_dim_size_to_factor: int = 0, weight_decay: float = 0.0,
    weight_decay_mode: str = "decoupled_lr", weight_decay_mask: Mask = "all",
) -> dict[str, Any]:
    """Step 0, zero statistics (row/column means for factored parameters), zero momentum."""
    state: dict[str, Any] = {"step": scalar(next(iter(params.values())), 0.0),
                             "exp_avg_sq_row": {}, "exp_avg_sq_col": {}, "exp_avg_sq": {}}
    for p, w in params.items():
        xp = namespace(w)
        axes = factored_axes(tuple(w.shape), factored=factored, factored_dims=factored_dims,
                             min_dim_size_to_factor=min_dim_size_to_factor)
        if axes is None:
            state["exp_avg_sq_row"][p] = state["exp_avg_sq_col"][p] = _placeholder(w)
            state["exp_avg_sq"][p] = xp.zeros_like(w)
        else:
            row_shape, col_shape = _shapes(w, axes)
            state["exp_avg_sq_row"][p] = xp.zeros(row_shape, dtype=w.dtype, device=device(w))
            state["exp_avg_sq_col"][p] = xp.zeros(col_shape, dtype=w.dtype, device=device(w))
            state["exp_avg_sq"][p] = _placeholder(w)
    if beta1 != 0.0:
        state["exp_avg"] = zeros_like(params)
    return state


@oracle_optimizer(OP)
def step(
    params: Params, grads: Params, state: dict[str, Any], *, lr: float = 1e-2, beta1: float = 0.0,
    decay_rate: float = 0.8, decay_offset: int = 0, beta2_cap: float = 1.0, eps1: float = 1e-30,
    eps2: float = 1e-3, clipping_threshold: float | None = 1.0, relative_step: bool = True,
    multiply_by_parameter_scale: bool = True, factored: bool = True,
    factored_dims: str = "last_two", min_dim_size_to_factor: int = 0, weight_decay: float = 0.0,
    weight_decay_mode: str = "decoupled_lr", weight_decay_mask: Mask = "all",
) -> tuple[Params, dict[str, Any]]:
    """One Adafactor step (module docstring)."""
    t_array, t = next_step(state, params)
    t_decay = t - decay_offset
    if t_decay < 1:
        raise ValueError(f"{OP}: decay_offset={decay_offset} must be below the step number {t} "
                         f"(beta2_t = 1 - (t - decay_offset)^-decay_rate needs t - offset >= 1)")
    beta = min(beta2_cap, 1.0 - float(t_decay) ** (-decay_rate))
    rho = min(lr, 1.0 / math.sqrt(t)) if relative_step else lr
    if weight_decay_mode not in ("decoupled_lr", "decoupled_nolr", "l2"):
        raise ValueError(f"{OP}: weight_decay_mode must be 'decoupled_lr', 'decoupled_nolr' or "
                         f"'l2', got {weight_decay_mode!r}")
    decayed = mask_of(weight_decay_mask, params, name="weight_decay_mask")
    new = {"step": t_array, "exp_avg_sq_row": {}, "exp_avg_sq_col": {}, "exp_avg_sq": {}}
    if beta1 != 0.0:
        new["exp_avg"] = {}
    new_params = {}
    for p, w in params.items():
        xp = namespace(w)
        g = grads[p]
        decay = weight_decay if decayed[p] else 0.0
        if weight_decay_mode == "l2" and decay != 0.0:
            g = g + decay * w
        alpha = rho
        if multiply_by_parameter_scale:
            rms_w = _rms(w)
            alpha = rho * xp.maximum(rms_w, xp.full_like(rms_w, eps2))
        g2 = g * g + eps1
        axes = factored_axes(tuple(w.shape), factored=factored, factored_dims=factored_dims,
                             min_dim_size_to_factor=min_dim_size_to_factor)
        if axes is None:
            v = beta * state["exp_avg_sq"][p] + (1.0 - beta) * g2
            u = g / xp.sqrt(v)
            new["exp_avg_sq"][p] = v
            new["exp_avg_sq_row"][p] = new["exp_avg_sq_col"][p] = _placeholder(w)
        else:
            d_col, d_row = axes
            row = beta * state["exp_avg_sq_row"][p] + (1.0 - beta) * xp.mean(g2, axis=d_row)
            col = beta * state["exp_avg_sq_col"][p] + (1.0 - beta) * xp.mean(g2, axis=d_col)
            u = g * factored_rsqrt(row, col, d_col, d_row)
            new["exp_avg_sq_row"][p], new["exp_avg_sq_col"][p] = row, col
            new["exp_avg_sq"][p] = _placeholder(w)
        if clipping_threshold is not None:
            ratio = _rms(u) / clipping_threshold
            u = u / xp.maximum(ratio, xp.ones_like(ratio))
        update = alpha * u
        if beta1 != 0.0:
            update = beta1 * state["exp_avg"][p] + (1.0 - beta1) * update
            new["exp_avg"][p] = update
        if decay != 0.0 and weight_decay_mode != "l2":
            w = w * (1.0 - decay * (alpha if weight_decay_mode == "decoupled_lr" else 1.0))
        new_params[p] = w - update
    return new_params, new
