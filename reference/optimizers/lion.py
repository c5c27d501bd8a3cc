"""Lion (EvoLved Sign Momentum).

Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", arXiv:2302.06675, Program 1
and Algorithm 2, per parameter with g the gradient of this step and m the momentum:

    c  = beta1 m + (1 - beta1) g                (the interpolation the sign is taken of)
    w <- w - eta (sign(c) + lambda w)           (weight_decay_mode = "decoupled_lr")
    m <- beta2 m + (1 - beta2) g                (the momentum, updated *after* the step)

sign(0) = 0 (``torch.sign``, ``jnp.sign``): a coordinate whose interpolation is exactly 0 does not
move (apart from decay).  With lambda = 0 every coordinate moves by exactly eta or 0.

Weight-decay forms.  The official PyTorch code (google/automl ``lion/lion_pytorch.py``) decays
first, ``w <- w (1 - eta lambda)``, then ``w <- w - eta sign(c)``; optax.lion adds ``lambda w`` to
the sign inside the update and multiplies the sum by eta (``add_decayed_weights`` then
``scale_by_learning_rate``).  Both equal w - eta sign(c) - eta lambda w: algebraically identical,
they differ by one rounding.  pytorch_optimizer.Lion also offers ``fixed_decay`` (w (1 - lambda):
"decoupled_nolr") and ``weight_decouple=False`` (lambda w added to g before the interpolation and
the momentum: "l2").  ``weight_decay_mask`` selects the decayed parameters.
"""

from __future__ import annotations

from typing import Any

from reference._backend import namespace
from reference.optimizers._common import apply_weight_decay, ema, next_step, scalar
from reference.optimizers._tree import Mask, Params, zeros_like
from reference.registry import oracle_optimizer

OP = "lion"


@oracle_optimizer(OP)
def init(
    params: Params, *, lr: float = 1e-4, beta1: float = 0.9, beta2: float = 0.99,
    weight_decay: float = 0.0, weight_decay_mode: str = "decoupled_lr",
    weight_decay_mask: Mask = "all",
) -> dict[str, Any]:
    """Step 0 and a zero momentum."""
    return {"step": scalar(next(iter(params.values())), 0.0), "exp_avg": zeros_like(params)}


@oracle_optimizer(OP)
def step(
    params: Params, grads: Params, state: dict[str, Any], *, lr: float = 1e-4, beta1: float = 0.9,
    beta2: float = 0.99, weight_decay: float = 0.0, weight_decay_mode: str = "decoupled_lr",
    weight_decay_mask: Mask = "all",
) -> tuple[Params, dict[str, Any]]:
    """One Lion step (module docstring)."""
    t_array, _ = next_step(state, params)
    params, grads = apply_weight_decay(params, grads, lr=lr, weight_decay=weight_decay,
                                       mode=weight_decay_mode, mask=weight_decay_mask)
    new_params, momenta = {}, {}
    for p, w in params.items():
        g, m = grads[p], state["exp_avg"][p]
        xp = namespace(w)
        c = beta1 * m + (1.0 - beta1) * g
        new_params[p] = w - lr * xp.sign(c)
        momenta[p] = ema(m, g, beta2)
    return new_params, {"step": t_array, "exp_avg": momenta}
