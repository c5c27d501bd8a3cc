"""Ranger21 (Wright & Demeure 2021, arXiv:2106.13731): AdamW with eight add-ons, each switchable.

One step, with t the 1-based step, g the raw gradients and every component optional:

1. Gradient pre-processing, parameter by parameter:
   AGC (Brock et al., ``clipping.adaptive_grad_clip``; lambda = ``agc_clipping_value`` 1e-2, eps
   ``agc_eps`` 1e-3), then **gradient centralization** (Yong et al. 2020, arXiv:2004.01461:
   ``g - mean(g over dims 1..)`` for ndim > 1, or ndim > 3 with ``gc_conv_only``), then **gradient
   normalization** (``g / (std(g) + 1e-8)``, unbiased std of the whole tensor, when numel > 2).
2. Second moment ``v = beta2 v + (1 - beta2) g^2``; with ``amsgrad`` the denominator uses the
   running maximum ``vmax = max(vmax, v)`` (raw v, like torch/PNM's AdaPNM).
   ``variance_normalized = sqrt((s0 + sum over every element of every tensor of v / (1 - beta2^t)) / N)``
   with N the number of elements of all the parameters and s0 = ``variance_sum_init`` (0).
3. The learning rate of the step, from the base ``lr`` and the internal schedule:
   linear **warm-up** ``lr min(1, t / W)`` for t <= W, W = ``warmup_iterations`` or, when None,
   ``ceil(2 / (1 - beta2))`` (Ma & Yarats' rule of thumb) unless that exceeds 45% of
   ``num_iterations``, then ``int(0.22 num_iterations)`` (``warmup_pct_default``); linear
   **warm-down** from S = ``int(0.72 num_iterations)``: for t >= S
   ``max(lr - (lr - min_lr) min((t + 1 - S) / (num_iterations - S + 1), 1), min_lr)`` (it overrides
   the warm-up where both apply).
4. Per parameter: **stable weight decay** (Xie et al., arXiv:2011.11152)
   ``w <- w (1 - lambda lr_t / variance_normalized)`` (``stable_decay = False``: AdamW's
   ``w (1 - lambda lr_t)``); **norm loss** (Georgiou et al., arXiv:2103.06583, the gradient of
   ``nu (1 - ||w_i||)^2`` per unit) ``w <- w (1 - lr_t 2 nu (1 - 1 / (||w_i|| + eps)))``; then the step
   ``w <- w - lr_t / (1 - beta1^t) m_hat / denom`` with ``denom = sqrt(v or vmax) / sqrt(1 - beta2^t) + eps``,
   passed through a **softplus** ``(1/beta_sp) log(1 + exp(beta_sp denom))`` (Tong et al.,
   arXiv:1908.00700; beta_sp = 50), and m_hat from **positive-negative momentum** (Xie et al. 2021,
   arXiv:2103.17182): two buffers, the one of the step's parity updated
   ``m <- beta1^2 m + (1 - beta1^2) g``, ``m_hat = ((1 + beta0) m - beta0 m_other) /
   sqrt((1 + beta0)^2 + beta0^2)`` (beta0 = ``pnm_momentum_factor``).  Without PNM, Adam's
   ``m <- beta1 m + (1 - beta1) g``, ``m_hat = m``.
5. **Lookahead** (Zhang et al. 2019, arXiv:1907.08610): every k steps (t % k == 0)
   ``w <- alpha w + (1 - alpha) w_slow`` and ``w_slow <- w``; ``w_slow`` starts at the initial
   parameters.

With AGC, centralization, normalization, PNM, AMSGrad, softplus, norm loss, lookahead, warm-up and
warm-down all off and ``stable_decay = False`` this is exactly torch's AdamW (Adam with
``weight_decay = 0``); each component alone is its standalone definition (tests/test_opt_ranger21).
The README of the official code says softplus and gradient normalization were added after the
paper; they are on by default there and here.

Knobs that reproduce implementations (see the spec's dialects and citation notes):

* ``bug_compatible`` — the official code (lessw2020/Ranger21 ``ranger21/ranger21.py``): (a) the
  decay and norm loss run at parameter-group level on the loop variable left over from the first
  loop, i.e. only on the **last** parameter (the last path of the dict); (b) the PNM noise norm is
  ``sqrt((1 + beta2)^2 + beta2^2)``; (c) beta0 = 1 whatever ``pnm_momentum_factor`` says (the code
  uses the boolean ``momentum_pnm``); (d) ``torch.max(max_variance_ma, v, out=v)`` never updates the
  maximum, so AMSGrad is a no-op; (e) the in-place pre-processing of p.grad in loop 1 is applied
  again in loop 2, so the momentum sees the gradient centralized and normalized twice.
* ``preprocess_twice`` — (e) alone (pytorch_optimizer does the same: its ``_preprocess_gradient``
  runs in both loops on p.grad).
* ``variance_sum_init`` — pytorch_optimizer starts the sum at 1.0.
* ``unit_layout`` — the official code and pytorch_optimizer reduce dim 1 only for 3-D tensors in
  both AGC and norm loss (``out_first_3d_dim1``).
* ``agc_compare_guarded`` — pytorch_optimizer's ``agc`` compares max(||G_i||, 1e-6).
* ``softplus_form`` — ``torch`` is ``F.softplus``'s threshold: the identity where beta x > 20.
"""

from __future__ import annotations

import math
from typing import Any

from reference._backend import device, namespace, size
from reference.optimizers._common import bias_correction, ema, next_step, scalar
from reference.optimizers._tree import Mask, Params, mask_of
from reference.optimizers.clipping import adaptive_grad_clip, unitwise_norm
from reference.registry import oracle_optimizer

OP = "ranger21"

__all__ = [
    "SOFTPLUS_FORMS",
    "centralize_gradient",
    "init",
    "normalize_gradient",
    "norm_loss_factor_of",
    "ranger21_lr",
    "softplus",
    "step",
    "warmup_length",
]

SOFTPLUS_FORMS = ("exact", "torch")
#: torch.nn.functional.softplus's default threshold: above it (in beta x) the result is x.
TORCH_SOFTPLUS_THRESHOLD = 20.0
#: The epsilon of gradient normalization (official code, pytorch_optimizer).
GRAD_NORM_EPS = 1e-8


# ------------------------------------------------------------------------------------------
# Components
# ------------------------------------------------------------------------------------------


def centralize_gradient(g: Any, *, conv_only: bool = False) -> Any:
    """Gradient centralization: ``g - mean(g over dims 1..)`` for ndim > 1 (> 3 with conv_only)."""
    if g.ndim <= (3 if conv_only else 1):
        return g
    xp = namespace(g)
    return g - xp.mean(g, axis=tuple(range(1, g.ndim)), keepdims=True)


def normalize_gradient(g: Any, *, eps: float = GRAD_NORM_EPS) -> Any:
    """``g / (std(g) + eps)`` with the unbiased std of the whole tensor, when it has > 2 elements."""
    if size(g) <= 2:
        return g
    xp = namespace(g)
    return g / (xp.std(g, correction=1) + eps)


def softplus(x: Any, beta: float, form: str = "exact") -> Any:
    """``(1/beta) log(1 + exp(beta x))``; ``form="torch"`` returns x where beta x > 20."""
    xp = namespace(x)
    z = beta * x
    if form == "exact":
        return (xp.maximum(z, xp.zeros_like(z)) + xp.log1p(xp.exp(-xp.abs(z)))) / beta
    if form == "torch":
        below = xp.where(z > TORCH_SOFTPLUS_THRESHOLD, xp.zeros_like(z), z)
        return xp.where(z > TORCH_SOFTPLUS_THRESHOLD, x, xp.log1p(xp.exp(below)) / beta)
    raise ValueError(f"softplus_form must be one of {SOFTPLUS_FORMS}, got {form!r}")


def norm_loss_factor_of(w: Any, *, lr: float, factor: float, eps: float, layout: str) -> Any:
    """The multiplier of norm loss, ``1 - lr 2 nu (1 - 1 / (||w_i|| + eps))``, per unit of ``w``."""
    return 1.0 - lr * (2.0 * factor * (1.0 - 1.0 / (unitwise_norm(w, layout) + eps)))


def warmup_length(num_iterations: int, beta2: float, warmup_iterations: int | None,
                  warmup_pct_default: float) -> int:
    """W: the given number, or ceil(2/(1 - beta2)) unless that is > 45% of the run (then 22%)."""
    if warmup_iterations is not None:
        return warmup_iterations
    by_beta = math.ceil(2.0 / (1.0 - beta2))
    if by_beta / num_iterations > 0.45:
        return int(warmup_pct_default * num_iterations)
    return by_beta


def ranger21_lr(lr: float, t: int, *, beta2: float, num_iterations: int, warmup: bool,
                warmup_iterations: int | None, warmup_pct_default: float, warmdown: bool,
                warmdown_start_pct: float, warmdown_min_lr: float) -> float:
    """The learning rate Ranger21 uses at step t (1-based) for the base rate ``lr`` (docstring 3)."""
    out = lr
    if warmup:
        length = warmup_length(num_iterations, beta2, warmup_iterations, warmup_pct_default)
        if length > 0 and t <= length:
            out = lr * min(1.0, t / length)
    if warmdown:
        start = int(warmdown_start_pct * num_iterations)
        if t >= start:
            pct = min((t + 1 - start) / (num_iterations - start + 1), 1.0)
            out = max(lr - (lr - warmdown_min_lr) * pct, warmdown_min_lr)
    return out


# ------------------------------------------------------------------------------------------
# The optimizer
# ------------------------------------------------------------------------------------------


def _init(params: Params, hp: dict[str, Any]) -> dict[str, Any]:
    first = next(iter(params.values()))
    zeros = {p: namespace(w).zeros_like(w) for p, w in params.items()}
    state: dict[str, Any] = {"step": scalar(first, 0.0), "grad_ma": dict(zeros),
                             "variance_ma": dict(zeros)}
    if hp["pnm"]:
        state["neg_grad_ma"] = dict(zeros)
    if hp["amsgrad"]:
        state["max_variance_ma"] = dict(zeros)
    if hp["lookahead"]:
        state["lookahead_params"] = {p: namespace(w).asarray(w, copy=True) for p, w in params.items()}
    return state


def _preprocess(g: Any, hp: dict[str, Any]) -> Any:
    if hp["gradient_centralization"]:
        g = centralize_gradient(g, conv_only=hp["gc_conv_only"])
    if hp["gradient_normalization"]:
        g = normalize_gradient(g)
    return g


def _step(params: Params, grads: Params, state: dict[str, Any], hp: dict[str, Any]):
    for slot, on in (("neg_grad_ma", hp["pnm"]), ("max_variance_ma", hp["amsgrad"]),
                     ("lookahead_params", hp["lookahead"])):
        if on and slot not in state:
            raise ValueError(f"{OP}: the state has no {slot!r}; it was built by init with other "
                             "switches than this step's (pnm, amsgrad, lookahead)")
    t_array, t = next_step(state, params)
    bug = hp["bug_compatible"]
    beta1, beta2, eps = hp["beta1"], hp["beta2"], hp["eps"]
    bc1, bc2 = bias_correction(beta1, t), bias_correction(beta2, t)

    # 1-2. Pre-processed gradients, second moments and their global mean.
    if hp["agc"]:
        grads = adaptive_grad_clip(params, grads, clipping=hp["agc_clipping_value"],
                                   eps=hp["agc_eps"], layout=hp["unit_layout"],
                                   compare_guarded=hp["agc_compare_guarded"])
    grads = {p: _preprocess(g, hp) for p, g in grads.items()}
    variance = {p: ema(state["variance_ma"][p], g * g, beta2) for p, g in grads.items()}
    first = next(iter(variance.values()))
    xp = namespace(first)
    total = xp.asarray(hp["variance_sum_init"], dtype=first.dtype, device=device(first))
    for v in variance.values():
        total = total + xp.sum(v / bc2)
    count = sum(size(w) for w in params.values())
    variance_normalized = xp.sqrt(total / count)

    # 3. The learning rate of this step.
    lr_t = ranger21_lr(hp["lr"], t, beta2=beta2, num_iterations=hp["num_iterations"],
                       warmup=hp["warmup"], warmup_iterations=hp["warmup_iterations"],
                       warmup_pct_default=hp["warmup_pct_default"], warmdown=hp["warmdown"],
                       warmdown_start_pct=hp["warmdown_start_pct"],
                       warmdown_min_lr=hp["warmdown_min_lr"])

    # 4. Decay, norm loss and the (PNM) Adam step, parameter by parameter.
    decayed = mask_of(hp["weight_decay_mask"], params, name="weight_decay_mask")
    last = list(params)[-1]
    beta0 = 1.0 if bug else hp["pnm_momentum_factor"]
    noise_base = beta2 if bug else beta0
    noise_norm = math.sqrt((1.0 + noise_base) ** 2 + noise_base**2)
    odd = t % 2 == 1
    new_state: dict[str, Any] = {"step": t_array, "grad_ma": {}, "variance_ma": variance}
    if hp["pnm"]:
        new_state["neg_grad_ma"] = {}
    if hp["amsgrad"]:
        new_state["max_variance_ma"] = {}
    new_params: Params = {}
    for p, w in params.items():
        touched = (p == last) if bug else True
        if hp["weight_decay"] != 0.0 and touched and decayed[p]:
            if hp["stable_decay"]:
                if not float(variance_normalized) > 0.0:
                    raise ValueError(f"{OP}: stable weight decay divides by sqrt(mean v_hat) = 0 "
                                     "(every second moment is zero)")
                w = w * (1.0 - hp["weight_decay"] * lr_t / variance_normalized)
            else:
                w = w * (1.0 - hp["weight_decay"] * lr_t)
        if hp["norm_loss"] and touched:
            w = w * norm_loss_factor_of(w, lr=lr_t, factor=hp["norm_loss_factor"], eps=eps,
                                        layout=hp["unit_layout"])
        g = grads[p]
        if bug or hp["preprocess_twice"]:
            g = _preprocess(g, hp)
        v = variance[p]
        if hp["amsgrad"]:
            vmax = state["max_variance_ma"][p]
            if bug:  # (d): the maximum is written into v's place; the stored maximum stays as is
                v = xp.maximum(vmax, v)
            else:
                vmax = xp.maximum(vmax, v)
                v = vmax
            new_state["max_variance_ma"][p] = vmax
        denom = xp.sqrt(v) / math.sqrt(bc2) + eps
        if hp["softplus"]:
            denom = softplus(denom, hp["beta_softplus"], hp["softplus_form"])
        if hp["pnm"]:
            pos, neg = state["grad_ma"][p], state["neg_grad_ma"][p]
            if odd:
                pos = ema(pos, g, beta1**2)
                direction = ((1.0 + beta0) * pos - beta0 * neg) / noise_norm
            else:
                neg = ema(neg, g, beta1**2)
                direction = ((1.0 + beta0) * neg - beta0 * pos) / noise_norm
            new_state["grad_ma"][p], new_state["neg_grad_ma"][p] = pos, neg
        else:
            direction = new_state["grad_ma"][p] = ema(state["grad_ma"][p], g, beta1)
        new_params[p] = w - (lr_t / bc1) * direction / denom

    # 5. Lookahead.
    if hp["lookahead"]:
        slow = state["lookahead_params"]
        if t % hp["lookahead_k"] == 0:
            alpha = hp["lookahead_alpha"]
            new_params = {p: alpha * w + (1.0 - alpha) * slow[p] for p, w in new_params.items()}
            new_state["lookahead_params"] = dict(new_params)
        else:
            new_state["lookahead_params"] = dict(slow)
    return new_params, new_state


@oracle_optimizer(OP)
def init(
    params: Params, *, lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999,
    eps: float = 1e-8, weight_decay: float = 1e-4, weight_decay_mask: Mask = "all",
    stable_decay: bool = True, num_iterations: int = 10000, warmup: bool = True,
    warmup_iterations: int | None = None, warmup_pct_default: float = 0.22,
    warmdown: bool = True, warmdown_start_pct: float = 0.72, warmdown_min_lr: float = 3e-5,
    agc: bool = True, agc_clipping_value: float = 1e-2, agc_eps: float = 1e-3,
    agc_compare_guarded: bool = False, unit_layout: str = "out_first",
    gradient_centralization: bool = True, gc_conv_only: bool = False,
    gradient_normalization: bool = True, pnm: bool = True, pnm_momentum_factor: float = 1.0,
    amsgrad: bool = True, softplus: bool = True, beta_softplus: float = 50.0,
    softplus_form: str = "exact", norm_loss: bool = True, norm_loss_factor: float = 1e-4,
    lookahead: bool = True, lookahead_k: int = 5, lookahead_alpha: float = 0.5,
    variance_sum_init: float = 0.0, preprocess_twice: bool = False, bug_compatible: bool = False,
) -> dict[str, Any]:
    """Step 0: zero moments (two with PNM, a zero maximum with AMSGrad), slow weights = params."""
    return _init(params, dict(locals()))


@oracle_optimizer(OP)
def step(
    params: Params, grads: Params, state: dict[str, Any], *, lr: float = 1e-3, beta1: float = 0.9,
    beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 1e-4,
    weight_decay_mask: Mask = "all", stable_decay: bool = True, num_iterations: int = 10000,
    warmup: bool = True, warmup_iterations: int | None = None, warmup_pct_default: float = 0.22,
    warmdown: bool = True, warmdown_start_pct: float = 0.72, warmdown_min_lr: float = 3e-5,
    agc: bool = True, agc_clipping_value: float = 1e-2, agc_eps: float = 1e-3,
    agc_compare_guarded: bool = False, unit_layout: str = "out_first",
    gradient_centralization: bool = True, gc_conv_only: bool = False,
    gradient_normalization: bool = True, pnm: bool = True, pnm_momentum_factor: float = 1.0,
    amsgrad: bool = True, softplus: bool = True, beta_softplus: float = 50.0,
    softplus_form: str = "exact", norm_loss: bool = True, norm_loss_factor: float = 1e-4,
    lookahead: bool = True, lookahead_k: int = 5, lookahead_alpha: float = 0.5,
    variance_sum_init: float = 0.0, preprocess_twice: bool = False, bug_compatible: bool = False,
) -> tuple[Params, dict[str, Any]]:
    """One Ranger21 step (module docstring); ``lr`` is the base rate the internal schedule scales."""
    return _step(params, grads, state, dict(locals()))
