"""NovoGrad: SGD with momentum on gradients normalized by a per-tensor second moment.

Ginsburg et al. 2019, "Stochastic Gradient Methods with Layer-wise Adaptive Moments for Training
of Deep Networks" (v3: "Training Deep Networks with Stochastic Gradient Normalized by Layerwise
Adaptive Second Moments"), arXiv:1905.11286, Algorithm 1.  Per parameter tensor ("layer") with
g the gradient of step t (1-based) and ||.|| the L2 norm over the whole tensor:

    v_1 = ||g_1||^2,             v_t = beta2 v_{t-1} + (1 - beta2) ||g_t||^2     (one scalar)
    g'_t = g_t / (sqrt(v_t) + eps) + d w_t                  (eps_mode = "outside")
    m_1 = g'_1,                  m_t = beta1 m_{t-1} + g'_t                 (first_moment_init = "first_step")
    w <- w - eta m_t

No bias correction: initializing v with the first squared norm removes it.  Conventions:

* ``eps_mode``: "outside" ``sqrt(v) + eps`` (paper v3, timm NvNovoGrad, optax ``eps``,
  pytorch_optimizer) or "inside" ``sqrt(v + eps)`` (OpenSeq2Seq NovoGrad2; optax ``eps_root``).
* ``grad_averaging``: ``g'`` is multiplied by ``1 - beta1`` (after the decay term is added)
  before it enters the momentum (OpenSeq2Seq, timm, pytorch_optimizer option; optax has none).
* ``first_moment_init``: "first_step" sets m_1 = g'_1 with no beta1 and no (1 - beta1) factor
  (Alg. 1's moment initialization; optax, pytorch_optimizer), "zeros" starts from m_0 = 0 and
  applies the recursion on step 1, so m_1 = (1 - beta1) g'_1 under grad_averaging (timm,
  OpenSeq2Seq's TF momentum accumulator).  The two differ only with grad_averaging.
* ``weight_decay_mode``: "moment" adds d w to the normalized gradient, inside the momentum (the
  paper, optax, timm, OpenSeq2Seq); "decoupled_lr" / "decoupled_nolr": ``w <- w (1 - eta d)`` /
  ``w (1 - d)`` before the step (pytorch_optimizer ``weight_decouple``, ``fixed_decay``).

Not modeled (documented): timm and OpenSeq2Seq initialize v when it is *exactly zero* rather than
at step 1 (different only if the first gradients of a tensor are all exactly zero);
OpenSeq2Seq keeps v in float32 whatever the variable's dtype; apex FusedNovoGrad is a different
algorithm (the moment of the raw gradient, then normalized, with bias correction).
"""

from __future__ import annotations

from typing import Any

from reference._backend import device, namespace
from reference.optimizers._common import decoupled_decay, next_step, scalar
from reference.optimizers._tree import Mask, Params, mask_of, zeros_like
from reference.registry import oracle_optimizer

OP = "novograd"


def _sum_sq(g: Any) -> Any:
    """||g||^2 as a 0-d array (the plain sum of squares, as every implementation computes it)."""
    xp = namespace(g)
    return xp.sum(g * g)


@oracle_optimizer(OP)
def init(
    params: Params, *, lr: float = 1e-3, beta1: float = 0.95, beta2: float = 0.98,
    eps: float = 1e-8, weight_decay: float = 0.0, weight_decay_mode: str = "moment",
    weight_decay_mask: Mask = "all", grad_averaging: bool = False, eps_mode: str = "outside",
    first_moment_init: str = "first_step",
) -> dict[str, Any]:
    """Step 0, zero momentum and a zero (0-d) second moment per tensor."""
    like = next(iter(params.values()))
    return {"step": scalar(like, 0.0), "exp_avg": zeros_like(params),
            "exp_avg_sq": {p: namespace(w).zeros((), dtype=w.dtype, device=device(w))
                           for p, w in params.items()}}


@oracle_optimizer(OP)
def step(
    params: Params, grads: Params, state: dict[str, Any], *, lr: float = 1e-3,
    beta1: float = 0.95, beta2: float = 0.98, eps: float = 1e-8, weight_decay: float = 0.0,
    weight_decay_mode: str = "moment", weight_decay_mask: Mask = "all",
    grad_averaging: bool = False, eps_mode: str = "outside", first_moment_init: str = "first_step",
) -> tuple[Params, dict[str, Any]]:
    """One NovoGrad step (module docstring)."""
    t_array, t = next_step(state, params)
    decay_in_moment = weight_decay_mode == "moment"
    if not decay_in_moment:
        factor = {"decoupled_lr": lr * weight_decay, "decoupled_nolr": weight_decay}
        if weight_decay_mode not in factor:
            raise ValueError(f"{OP}: weight_decay_mode must be 'moment', 'decoupled_lr' or "
                             f"'decoupled_nolr', got {weight_decay_mode!r}")
        params = decoupled_decay(params, factor[weight_decay_mode], weight_decay_mask)
    decayed = mask_of(weight_decay_mask, params, name="weight_decay_mask")
    new_params, momenta, second = {}, {}, {}
    for p, w in params.items():
        g = grads[p]
        xp = namespace(w)
        sq = _sum_sq(g)
        v = sq if t == 1 else beta2 * state["exp_avg_sq"][p] + (1.0 - beta2) * sq
        denom = xp.sqrt(v) + eps if eps_mode == "outside" else xp.sqrt(v + eps)
        gn = g / denom
        if decay_in_moment and weight_decay != 0.0 and decayed[p]:
            gn = gn + weight_decay * w
        if t == 1 and first_moment_init == "first_step":
            m = gn
        else:
            if grad_averaging:
                gn = (1.0 - beta1) * gn
            m = beta1 * state["exp_avg"][p] + gn
        new_params[p] = w - lr * m
        momenta[p], second[p] = m, v
    return new_params, {"step": t_array, "exp_avg": momenta, "exp_avg_sq": second}
