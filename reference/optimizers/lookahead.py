"""Lookahead: k steps of an inner optimizer, then one interpolation step of slow weights.

Zhang et al., "Lookahead Optimizer: k steps forward, 1 step back" (NeurIPS 2019,
arXiv:1907.08610), Algorithm 1.  The parameters the caller holds are the *fast* weights theta;
the slow weights phi are a state slot.  Written as one call per inner step, with t the 1-based
number of Lookahead steps taken:

    theta <- A(theta, g)                                   the inner optimizer's step
    if t mod k == 0:   phi <- phi + alpha (theta - phi),   theta <- phi

so right after a synchronization fast == slow.  phi_0 = theta_0 (``slow_init = "params"``: the
paper, optax ``LookaheadParams.init_synced``, pytorch_optimizer, which clones the parameters
when the wrapper is built).  timm's ``Lookahead`` creates the slow buffer lazily *at the first
synchronization* as a copy of the fast weights, which makes that first synchronization a no-op
(``slow_init = "first_sync"``); here the slot holds theta_0 until then, unused.

The counters agree everywhere: optax syncs when ``steps_since_sync == sync_period - 1`` before
its increment (``steps_since_sync = t mod k`` after it), pytorch_optimizer when its counter
reaches k, timm when ``lookahead_step % k == 0`` — all after the inner steps k, 2k, ...; the
state keeps t (``step``).  ``reset_state`` (optax's option; pytorch_optimizer's
``pullback_momentum="reset"`` for an SGD inner optimizer) puts the inner optimizer's state back
to its initial value after every synchronization, step count included.

The inner optimizer (``inner``) is ``reference.optimizers.sgd`` or ``reference.optimizers.adam``
with the few hyper-parameters exposed here (lr, momentum for sgd, beta1/beta2/eps for adam,
weight_decay and weight_decay_mode) and the defaults of those modules otherwise (PyTorch's
conventions, which optax's ``sgd``/``adam`` share at dampening 0).  Its state slots are kept
under ``inner_<slot>``.
"""

from __future__ import annotations

from typing import Any

from reference.optimizers import adam as _adam
from reference.optimizers import sgd as _sgd
from reference.optimizers._common import next_step, scalar
from reference.optimizers._tree import Params
from reference.registry import oracle_optimizer

__all__ = ["init", "step"]

INNER = ("sgd", "adam")
PREFIX = "inner_"


def _inner(inner: str, hp: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    """``(raw init, raw step, their hyper-parameters)`` of the inner optimizer."""
    common = {"lr": hp["lr"], "weight_decay": hp["weight_decay"],
              "weight_decay_mode": hp["weight_decay_mode"]}
    if inner == "sgd":
        return (_sgd.init.__wrapped__, _sgd.step.__wrapped__,
                {**common, "momentum": hp["momentum"]})
    if inner == "adam":
        return (_adam.init.__wrapped__, _adam.step.__wrapped__,
                {**common, "beta1": hp["beta1"], "beta2": hp["beta2"], "eps": hp["eps"]})
    raise ValueError(f"lookahead: inner must be one of {INNER}, got {inner!r}")


def _check(hp: dict[str, Any]) -> None:
    # Validated by the spec for the decorated API; the raw functions check again.
    if hp["k"] < 1 or not 0.0 <= hp["alpha"] <= 1.0:
        raise ValueError(f"lookahead: k must be >= 1 and alpha in [0, 1], got k={hp['k']}, "
                         f"alpha={hp['alpha']}")
    if hp["slow_init"] not in ("params", "first_sync"):
        raise ValueError(f"lookahead: slow_init must be 'params' or 'first_sync', "
                         f"got {hp['slow_init']!r}")


def _wrap_state(inner_state: dict[str, Any]) -> dict[str, Any]:
    return {PREFIX + k: v for k, v in inner_state.items()}


def _unwrap_state(state: dict[str, Any]) -> dict[str, Any]:
    return {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}


@oracle_optimizer("lookahead")
def init(
    params: Params, *, lr: float = 1e-3, inner: str = "sgd", momentum: float = 0.0,
    beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
    weight_decay_mode: str = "l2", k: int = 5, alpha: float = 0.5, slow_init: str = "params",
    reset_state: bool = False,
) -> dict[str, Any]:
    """Step 0, the slow weights = the initial parameters, and the inner optimizer's state."""
    hp = dict(locals())
    hp.pop("params")
    _check(hp)
    inner_init, _, inner_hp = _inner(inner, hp)
    like = next(iter(params.values()))
    return {"step": scalar(like, 0.0), "slow": dict(params),
            **_wrap_state(inner_init(params, **inner_hp))}


@oracle_optimizer("lookahead")
def step(
    params: Params, grads: Params, state: dict[str, Any], *, lr: float = 1e-3, inner: str = "sgd",
    momentum: float = 0.0, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
    weight_decay: float = 0.0, weight_decay_mode: str = "l2", k: int = 5, alpha: float = 0.5,
    slow_init: str = "params", reset_state: bool = False,
) -> tuple[Params, dict[str, Any]]:
    """One inner step, then the synchronization when t is a multiple of k (module docstring)."""
    hp = dict(locals())
    for key in ("params", "grads", "state"):
        hp.pop(key)
    _check(hp)
    inner_init, inner_step, inner_hp = _inner(inner, hp)
    expected = inner_init(params, **inner_hp)
    missing = sorted(PREFIX + slot for slot in expected if PREFIX + slot not in state)
    if missing or "slow" not in state:
        raise ValueError(f"lookahead: the state lacks {missing or ['slow']}: it was not made by "
                         f"init with inner={inner!r} and these hyper-parameters")
    t_array, t = next_step(state, params)
    fast, inner_state = inner_step(params, grads, _unwrap_state(state), **inner_hp)
    slow = dict(state["slow"])
    if t % k == 0:
        first = slow_init == "first_sync" and t == k
        for p, theta in fast.items():
            phi = theta if first else slow[p]
            slow[p] = phi + alpha * (theta - phi)
        fast = dict(slow)
        if reset_state:
            inner_state = inner_init(fast, **inner_hp)
    return fast, {"step": t_array, "slow": slow, **_wrap_state(inner_state)}
