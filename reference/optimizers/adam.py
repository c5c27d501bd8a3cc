"""Adam, AdamW and AMSGrad.

Adam (Kingma & Ba 2015, arXiv:1412.6980, Algorithm 1), per parameter with t the 1-based step:

    m_t = beta1 m_{t-1} + (1 - beta1) g,        v_t = beta2 v_{t-1} + (1 - beta2) g^2
    m_hat = m_t / (1 - beta1^t),                v_hat = v_t / (1 - beta2^t)
    w <- w - eta m_hat / (sqrt(v_hat) + eps)                  (adam_eps_mode = "corrected")

"corrected" is PyTorch's and optax's placement (eps added to the bias-corrected root).  The
paper's Sec. 2 efficiency remark and Keras/TF1 use "eps-hat" (``adam_eps_mode = "eps_hat"``):

    alpha_t = eta sqrt(1 - beta2^t) / (1 - beta1^t),   w <- w - alpha_t m_t / (sqrt(v_t) + eps_hat)

i.e. eps enters as eps / sqrt(1 - beta2^t) in the corrected form: a step-dependent difference no
constant eps can absorb (dialects.md 4b).

AMSGrad (Reddi et al. 2018, arXiv:1904.09237, Alg. 2): the denominator uses the running maximum
of the second moment.  ``amsgrad_max_of = "raw"`` keeps ``max(vmax, v_t)`` of the raw v and
divides by sqrt(1 - beta2^t) afterwards (PyTorch, Keras); ``"corrected"`` keeps the maximum of
``v_hat`` (optax ``scale_by_amsgrad``), which differs because 1 - beta2^t grows with t.

Weight decay (``weight_decay_mode``): "l2" adds lambda w to g before the moments (torch Adam's
``weight_decay``); "decoupled_lr" is AdamW (Loshchilov & Hutter 2019, arXiv:1711.05101, Alg. 2
line 12 with the schedule multiplier folded into eta): ``w <- w (1 - eta lambda)`` before the
Adam step (torch AdamW, Keras; optax's ``add_decayed_weights`` then ``scale_by_learning_rate``
is the same product); "decoupled_nolr": ``w <- w (1 - lambda)`` (the paper's lambda not
multiplied by alpha).  The ``adamw`` spec is this module with AdamW's defaults.
"""

from __future__ import annotations

from typing import Any

from reference._backend import namespace
from reference.optimizers._common import apply_weight_decay, bias_correction, ema, next_step, scalar
from reference.optimizers._tree import Mask, Params, zeros_like
from reference.registry import oracle_optimizer


def _init(params: Params, amsgrad: bool) -> dict[str, Any]:
    state: dict[str, Any] = {"step": scalar(next(iter(params.values())), 0.0),
                             "exp_avg": zeros_like(params), "exp_avg_sq": zeros_like(params)}
    if amsgrad:
        state["max_exp_avg_sq"] = zeros_like(params)
    return state


def adam_direction(
    m: Any, v: Any, vmax: Any, t: int, *, beta1: float, beta2: float, eps: float,
    amsgrad: bool, amsgrad_max_of: str, adam_eps_mode: str,
) -> tuple[Any, Any]:
    """``(step direction d, new vmax)`` with w <- w - eta d, from the updated moments m, v."""
    xp = namespace(m)
    bc1, bc2 = bias_correction(beta1, t), bias_correction(beta2, t)
    if amsgrad:
        # The maximum of the raw v (torch, Keras) or of v_hat (optax): v_hat's divisor shrinks
        # with t, so the two keep different maxima.
        vmax = xp.maximum(vmax, v if amsgrad_max_of == "raw" else v / bc2)
        v_raw = vmax if amsgrad_max_of == "raw" else vmax * bc2
    else:
        v_raw = v
    if adam_eps_mode == "corrected":
        return (m / bc1) / (xp.sqrt(v_raw) / bc2**0.5 + eps), vmax
    alpha = bc2**0.5 / bc1
    return alpha * m / (xp.sqrt(v_raw) + eps), vmax


def _step(params: Params, grads: Params, state: dict[str, Any], hp: dict[str, Any]):
    t_array, t = next_step(state, params)
    params, grads = apply_weight_decay(params, grads, lr=hp["lr"], weight_decay=hp["weight_decay"],
                                       mode=hp["weight_decay_mode"], mask=hp["weight_decay_mask"])
    new = {"step": t_array, "exp_avg": {}, "exp_avg_sq": {}}
    if hp["amsgrad"]:
        new["max_exp_avg_sq"] = {}
    new_params = {}
    for p, w in params.items():
        g = grads[p]
        m = ema(state["exp_avg"][p], g, hp["beta1"])
        v = ema(state["exp_avg_sq"][p], g * g, hp["beta2"])
        vmax = state["max_exp_avg_sq"][p] if hp["amsgrad"] else None
        d, vmax = adam_direction(m, v, vmax, t, beta1=hp["beta1"], beta2=hp["beta2"], eps=hp["eps"],
                                 amsgrad=hp["amsgrad"], amsgrad_max_of=hp["amsgrad_max_of"],
                                 adam_eps_mode=hp["adam_eps_mode"])
        new_params[p] = w - hp["lr"] * d
        new["exp_avg"][p], new["exp_avg_sq"][p] = m, v
        if hp["amsgrad"]:
            new["max_exp_avg_sq"][p] = vmax
    return new_params, new


@oracle_optimizer("adam")
def init(
    params: Params, *, lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999,
    eps: float = 1e-8, weight_decay: float = 0.0, weight_decay_mode: str = "l2",
    weight_decay_mask: Mask = "all", amsgrad: bool = False, amsgrad_max_of: str = "raw",
    adam_eps_mode: str = "corrected",
) -> dict[str, Any]:
    """Step 0, zero moments (and a zero AMSGrad maximum)."""
    return _init(params, amsgrad)


@oracle_optimizer("adam")
def step(
    params: Params, grads: Params, state: dict[str, Any], *, lr: float = 1e-3, beta1: float = 0.9,
    beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
    weight_decay_mode: str = "l2", weight_decay_mask: Mask = "all", amsgrad: bool = False,
    amsgrad_max_of: str = "raw", adam_eps_mode: str = "corrected",
) -> tuple[Params, dict[str, Any]]:
    """One Adam step (module docstring)."""
    return _step(params, grads, state, dict(locals()))


@oracle_optimizer("adamw")
def init_adamw(
    params: Params, *, lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999,
    eps: float = 1e-8, weight_decay: float = 1e-2, weight_decay_mode: str = "decoupled_lr",
    weight_decay_mask: Mask = "all", amsgrad: bool = False, amsgrad_max_of: str = "raw",
    adam_eps_mode: str = "corrected",
) -> dict[str, Any]:
    """Step 0, zero moments (and a zero AMSGrad maximum)."""
    return _init(params, amsgrad)


@oracle_optimizer("adamw")
def step_adamw(
    params: Params, grads: Params, state: dict[str, Any], *, lr: float = 1e-3, beta1: float = 0.9,
    beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 1e-2,
    weight_decay_mode: str = "decoupled_lr", weight_decay_mask: Mask = "all", amsgrad: bool = False,
    amsgrad_max_of: str = "raw", adam_eps_mode: str = "corrected",
) -> tuple[Params, dict[str, Any]]:
    """One AdamW step: Adam with decoupled weight decay by default (module docstring)."""
    return _step(params, grads, state, dict(locals()))
