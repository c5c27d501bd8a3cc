"""RepBN and Progressive RepBN (Guo, Chen, Tang & Wang, ICML 2024, arXiv:2405.11582, "SLAB: Efficient
Transformers with Simplified Linear Attention and Progressive Re-parameterized BatchNorm").

RepBN.  Tokens x of shape (B, N, C) (any rank >= 2 here, channels on the last axis):

    RepBN(x) = BN(x) + alpha * x

with BN a BatchNorm over every axis but the channel one (the official code transposes to (B, C, N)
and applies ``nn.BatchNorm1d(C)``: statistics over the B*N tokens per channel; torch defaults eps
1e-5, momentum 0.1, unbiased running variance) and alpha one learnable scalar (shape (1,),
initialized to 1).  In inference BN is an affine map, so RepBN is too, and it folds into the next
linear layer (the "re-parameterization", the official ``merge_bn``; :func:`merge_into_linear`):

    RepBN_eval(x) = a * x + b,   a = gamma / sqrt(running_var + eps) + alpha,
                                 b = beta - gamma * running_mean / sqrt(running_var + eps)
    Linear(W, c)(RepBN_eval(x)) = x W'^T + c',   W' = W diag(a),   c' = W b + c.

Progressive RepBN (``progressive=True``, the official ``LinearNorm(norm1=LayerNorm, norm2=RepBN)``,
every SLAB model): a LayerNorm over the channels (its own gain and bias, ``ln_eps``) is blended into
RepBN during training, with a weight lambda that decays linearly with the number of training calls:

    training, warm > 0:  y = LN(x); warm -= 1                 (RepBN is not run: BN state kept)
    training, else:      lambda = r0 * decay_iter / total_steps   (before the decrement)
                         y = lambda * LN(x) + (1 - lambda) * RepBN(x)   (BN state updated)
                         decay_iter -= 1 while it is > 0
    inference:           y = RepBN(x)  (BN with running statistics), whatever lambda is

The state holds the step counters of the official buffers (``warm``, and ``decay_iter`` for its
``iter``, initialized to ``warmup`` and ``total_steps``): lambda runs r0, r0 (S-1)/S, ..., r0/S, 0, 0,
... over the calls after the warm-up.  The first decay call has lambda = r0 (1 with the defaults):
its output is LN(x) alone, yet RepBN runs and its BN updates the running statistics.  Inference
never blends: a model evaluated before lambda reaches 0 is evaluated as the pure-RepBN network
it is converging to, not as the function it trains.  ``progressive=False`` is RepBN alone (the
official ``norm_layer=RepBN`` models), without LayerNorm inputs or counters.

Backward (h = dy; the blend is linear in the two branches):

    dx = lambda * VJP_LN(dy) + (1 - lambda) * (VJP_BN(dy) + alpha * dy)
    dalpha = (1 - lambda) * sum(dy * x);   dgamma, dbeta = (1 - lambda) * BN's;   dln_* = lambda * LN's

with VJP_BN BatchNorm's training VJP (VJP-STD over the tokens, h = gamma dy) and VJP_LN LayerNorm's
(VJP-STD over the channels).  In inference ``dx = dy * a`` (a as above), ``dalpha = sum(dy * x)``;
during the warm-up only the LayerNorm gradients are nonzero.  The two branches are computed by
``batch_norm`` and ``layer_norm`` themselves.
"""

from __future__ import annotations

from typing import Any

from reference._backend import device, namespace, size
from reference._common import check_ndim, check_nonempty, check_shape, fail
from reference.normalizers import batch_norm as _bn
from reference.normalizers import layer_norm as _ln
from reference.normalizers._stats import running_state
from reference.registry import oracle_function, oracle_vjp

OP = "rep_bn"


def _raw(fn: Any) -> Any:
    """The undecorated function (arrays stay in their dtype; the spec was validated already)."""
    return getattr(fn, "__wrapped__", fn)


def _check(x: Any, per_channel: dict[str, Any], alpha: Any, progressive: bool, ln: dict[str, Any],
           counters: dict[str, Any]) -> None:
    check_ndim(OP, "x", x, min_ndim=2)
    check_nonempty(OP, "x", x)
    c = int(x.shape[-1])
    why = f"x has {c} channels on its last axis"
    for name, value in {**per_channel, **ln}.items():
        check_shape(OP, name, value, (c,), why)
    if alpha is None:
        fail(OP, "alpha (the learnable scalar of BN(x) + alpha * x, shape (1,)) is required")
    check_shape(OP, "alpha", alpha, (1,), "one scalar, the official nn.Parameter(torch.ones(1))")
    if not progressive:
        given = [name for name, value in {**ln, **counters}.items() if value is not None]
        if given:
            fail(OP, f"{', '.join(given)} belong to Progressive RepBN; with progressive=False "
                     f"(RepBN alone) they must be absent")
    for name, value in counters.items():
        if value is not None and float(value) < 0:
            fail(OP, f"the step counter {name} must be >= 0, got {float(value)}")


def init_state(x: Any, *, progressive: bool = True, warmup: int = 0, total_steps: int = 300000
               ) -> dict[str, Any]:
    """BatchNorm's initial state (running mean 0, variance 1, no batches) and, for PRepBN, the
    official buffers ``warm = warmup`` and ``iter = total_steps`` (here ``decay_iter``)."""
    xp = namespace(x)
    check_ndim(OP, "x", x, min_ndim=2)
    c = int(x.shape[-1])
    state = {
        "running_mean": xp.zeros((c,), dtype=xp.float64, device=device(x)),
        "running_var": xp.ones((c,), dtype=xp.float64, device=device(x)),
        "num_batches_tracked": xp.asarray(0.0, dtype=xp.float64, device=device(x)),
    }
    if progressive:
        state["warm"] = xp.asarray(float(warmup), dtype=xp.float64, device=device(x))
        state["decay_iter"] = xp.asarray(float(total_steps), dtype=xp.float64, device=device(x))
    return state


def _phase(training: bool, progressive: bool, warm: Any, decay_iter: Any, r0: float, total_steps: int
           ) -> tuple[str, float]:
    """``("eval" | "warmup" | "blend", lambda)``: which branches run, and LN's weight."""
    if not training:
        return "eval", 0.0
    if not progressive:
        return "blend", 0.0
    if float(warm) > 0:
        return "warmup", 1.0
    # lambda from the counter before its decrement (LinearNorm.forward).
    return "blend", r0 * float(decay_iter) / total_steps


def _bn_hp(training: bool, eps: float, momentum: float | None) -> dict[str, Any]:
    # torch BatchNorm1d's conventions, the official code's; channels on the last axis.
    return {"training": training, "track_running_stats": True, "axis": -1, "eps": eps, "momentum": momentum,
            "momentum_convention": "new_weight", "running_var_correction": 1, "single_value": "raise"}


def _counters(warm: Any, decay_iter: Any) -> dict[str, Any]:
    return {"warm": warm, "decay_iter": decay_iter}


def _single_value_check(x: Any) -> None:
    if size(x) // int(x.shape[-1]) == 1:
        fail(OP, f"expected more than 1 value per channel when training, got x of shape {tuple(x.shape)} "
                 f"(BatchNorm over the tokens of a single token)")


@oracle_function(OP)
def rep_bn(
    x: Any,
    weight: Any = None,
    bias: Any = None,
    alpha: Any = None,
    ln_weight: Any = None,
    ln_bias: Any = None,
    running_mean: Any = None,
    running_var: Any = None,
    num_batches_tracked: Any = None,
    warm: Any = None,
    decay_iter: Any = None,
    *,
    progressive: bool = True,
    warmup: int = 0,
    total_steps: int = 300000,
    r0: float = 1.0,
    training: bool = True,
    eps: float = 1e-5,
    momentum: float | None = 0.1,
    ln_eps: float = 1e-5,
) -> tuple[Any, dict[str, Any]]:
    """RepBN / PRepBN; returns ``(y, new_state)`` (module docstring)."""
    ln = {"ln_weight": ln_weight, "ln_bias": ln_bias}
    _check(x, {"weight": weight, "bias": bias, "running_mean": running_mean, "running_var": running_var},
           alpha, progressive, ln, _counters(warm, decay_iter))
    state = running_state(OP, x, running_mean, running_var, num_batches_tracked,
                          "needs running_mean and running_var (RepBN's BatchNorm tracks running statistics)")
    if progressive and (warm is None or decay_iter is None):
        fail(OP, "progressive=True needs the step counters warm and decay_iter in the state")
    count = state["num_batches_tracked"]
    if progressive:
        state.update(_counters(warm, decay_iter))
    phase, lam = _phase(training, progressive, warm, decay_iter, r0, total_steps)
    if phase == "warmup":
        state["warm"] = warm - 1.0
        return _raw(_ln.layer_norm)(x, ln_weight, ln_bias, axes=(-1,), eps=ln_eps), state
    if training:
        _single_value_check(x)
    y_bn, bn_state = _raw(_bn.batch_norm)(x, weight, bias, running_mean, running_var, count,
                                          **_bn_hp(training, eps, momentum))
    rep = y_bn + alpha * x  # RepBN(x) = BN(x) + alpha x
    if phase == "eval":
        return rep, state
    state.update(bn_state)
    if not progressive:
        return rep, state
    if float(decay_iter) > 0:
        state["decay_iter"] = decay_iter - 1.0
    y_ln = _raw(_ln.layer_norm)(x, ln_weight, ln_bias, axes=(-1,), eps=ln_eps)
    return lam * y_ln + (1.0 - lam) * rep, state


@oracle_vjp(OP)
def rep_bn_vjp(
    dy: Any,
    x: Any,
    weight: Any = None,
    bias: Any = None,
    alpha: Any = None,
    ln_weight: Any = None,
    ln_bias: Any = None,
    running_mean: Any = None,
    running_var: Any = None,
    num_batches_tracked: Any = None,
    warm: Any = None,
    decay_iter: Any = None,
    *,
    progressive: bool = True,
    warmup: int = 0,
    total_steps: int = 300000,
    r0: float = 1.0,
    training: bool = True,
    eps: float = 1e-5,
    momentum: float | None = 0.1,
    ln_eps: float = 1e-5,
) -> dict[str, Any]:
    """Gradients of ``<dy, y>`` w.r.t. x, weight, bias, alpha, ln_weight, ln_bias (those given)."""
    xp = namespace(x)
    ln = {"ln_weight": ln_weight, "ln_bias": ln_bias}
    _check(x, {"weight": weight, "bias": bias, "running_mean": running_mean, "running_var": running_var},
           alpha, progressive, ln, _counters(warm, decay_iter))
    check_shape(OP, "dy", dy, tuple(x.shape), "the cotangent of y has the shape of x")
    if running_mean is None or running_var is None:
        fail(OP, "needs running_mean and running_var (RepBN's BatchNorm tracks running statistics)")
    if progressive and (warm is None or decay_iter is None):
        fail(OP, "progressive=True needs the step counters warm and decay_iter in the state")
    phase, lam = _phase(training, progressive, warm, decay_iter, r0, total_steps)
    grads: dict[str, Any] = {}
    if phase != "warmup":  # the RepBN branch, weighted 1 - lambda
        if training:
            _single_value_check(x)
        g_bn = _raw(_bn.batch_norm_vjp)(dy, x, weight, bias, running_mean, running_var, None,
                                        **_bn_hp(training, eps, momentum))
        w = 1.0 - lam
        grads["x"] = w * (g_bn["x"] + alpha * dy)
        grads["alpha"] = w * xp.reshape(xp.sum(dy * x), (1,))
        grads.update({k: w * v for k, v in g_bn.items() if k != "x"})
    if progressive and phase != "eval":  # the LayerNorm branch, weighted lambda
        g_ln = _raw(_ln.layer_norm_vjp)(dy, x, ln_weight, ln_bias, axes=(-1,), eps=ln_eps)
        grads["x"] = lam * g_ln["x"] + grads["x"] if "x" in grads else lam * g_ln["x"]
        grads.update({f"ln_{k}": lam * v for k, v in g_ln.items() if k != "x"})
    # An input the active branches do not read has a zero gradient.
    given = {"weight": weight, "bias": bias, "alpha": alpha, "ln_weight": ln_weight, "ln_bias": ln_bias}
    for name, value in given.items():
        if value is not None and name not in grads:
            grads[name] = xp.zeros_like(value)
    return grads


def merge_into_linear(linear_weight: Any, linear_bias: Any, weight: Any, bias: Any, alpha: Any,
                      running_mean: Any, running_var: Any, *, eps: float = 1e-5) -> tuple[Any, Any]:
    """The inference re-parameterization (the official ``merge_bn``): ``(W', c')`` with
    ``Linear(W, c)(RepBN_eval(x)) = x W'^T + c'`` for a following linear layer of weight W (out, C)
    and bias c (out,) or None; weight/bias None mean BN without affine (gamma 1, beta 0)."""
    xp = namespace(linear_weight)
    if linear_weight.ndim != 2:
        fail(OP, f"merge_into_linear: linear_weight must be (out, C), got shape {tuple(linear_weight.shape)}")
    c = int(linear_weight.shape[1])
    for name, value in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                        ("running_var", running_var)):
        check_shape(OP, name, value, (c,), f"the linear layer reads {c} channels")
    check_shape(OP, "alpha", alpha, (1,), "one scalar")
    inv_std = 1.0 / xp.sqrt(running_var + eps)
    gamma = inv_std if weight is None else weight * inv_std
    a = gamma + alpha  # per-channel scale of RepBN_eval
    b = -gamma * running_mean if bias is None else bias - gamma * running_mean
    merged_w = linear_weight * xp.reshape(a, (1, c))  # W diag(a)
    merged_b = xp.sum(linear_weight * xp.reshape(b, (1, c)), axis=1)  # W b
    if linear_bias is not None:
        merged_b = merged_b + linear_bias
    return merged_w, merged_b
