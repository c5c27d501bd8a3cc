"""The simple gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018).

Per-example gradients have mean G and covariance Sigma; a gradient averaged over B examples has
``E |G_B|^2 = |G|^2 + tr(Sigma) / B`` (Sec. 2.2).  Two gradients of the same model, averaged over
B_small and B_big examples, give unbiased estimates of both terms (App. A.1):

    |G|^2  ~  G2 = (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) ~ S = (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)

Each estimate is noisy, so both are averaged over steps with exponential moving averages
(EMA_t = beta EMA_{t-1} + (1 - beta) x_t, EMA_0 = 0) and the noise scale is the *ratio of the
averages*, ``B_simple = EMA(S) / EMA(G2)`` (App. A.1: an average of the ratio is biased, the
ratio of averages is consistent).  The reported averages are bias-corrected, ``EMA_t / (1 -
beta^t)``, like Adam's moments; the correction is the same factor for both and cancels in
B_simple.  ``bias_correction``:

* ``estimates``: t counts the estimates (the steps of this stream);
* ``small_batches``: t counts small batches, ``n = B_big / B_small`` per estimate, as the
  gpt-neox implementation does (G_big is the average of n sequential small batches and its step
  counter advances on each of them), so after k estimates the factor is ``1 - beta^(n k)``;
* ``none``: the raw EMAs.

One call is one estimate: inputs the two averaged gradients (any shape, flattened), state the two
EMAs and the number of estimates so far; outputs the noise scale and the corrected averages.
"""

from __future__ import annotations

from typing import Any

from reference._backend import device, namespace
from reference.registry import oracle_function

OP = "gradient_noise_scale"


def _check(b_small: int, b_big: int, bias_correction: str) -> None:
    if b_big <= b_small:
        raise ValueError(f"{OP}: b_big must exceed b_small (two batch sizes for two equations), got "
                         f"b_small={b_small}, b_big={b_big}")
    if bias_correction == "small_batches" and b_big % b_small:
        raise ValueError(f"{OP}: bias_correction='small_batches' counts b_big / b_small small batches "
                         f"per estimate: b_big must be a multiple of b_small, got b_small={b_small}, "
                         f"b_big={b_big}")


def estimates(g_small: Any, g_big: Any, b_small: int, b_big: int) -> tuple[Any, Any]:
    """(G2, S): the unbiased two-batch estimates of |G|^2 and tr(Sigma) (App. A.1)."""
    xp = namespace(g_small)
    sq_small, sq_big = xp.sum(g_small * g_small), xp.sum(g_big * g_big)
    g2 = (b_big * sq_big - b_small * sq_small) / (b_big - b_small)
    s = (sq_small - sq_big) / (1.0 / b_small - 1.0 / b_big)
    return g2, s


@oracle_function(OP)
def gradient_noise_scale(g_small: Any, g_big: Any, ema_g2: Any, ema_s: Any, step: Any, *, b_small: int = 32,
                         b_big: int = 320, beta: float = 0.99, bias_correction: str = "estimates"
                         ) -> tuple[tuple[Any, Any, Any], dict[str, Any]]:
    _check(b_small, b_big, bias_correction)
    if g_small.shape != g_big.shape:
        raise ValueError(f"{OP}: g_small and g_big must have the same shape, got {tuple(g_small.shape)} "
                         f"and {tuple(g_big.shape)}")
    xp = namespace(g_small)
    g2, s = estimates(g_small, g_big, b_small, b_big)
    new_g2 = beta * ema_g2 + (1.0 - beta) * g2
    new_s = beta * ema_s + (1.0 - beta) * s
    t = step + 1.0
    if bias_correction == "none":
        correction = xp.ones_like(new_g2)
    else:
        per_estimate = b_big // b_small if bias_correction == "small_batches" else 1
        correction = 1.0 - beta ** (per_estimate * t)
    b_simple = new_s / new_g2
    state = {"ema_g2": new_g2, "ema_s": new_s, "step": t}
    return (b_simple, new_g2 / correction, new_s / correction), state


def init_state(g_small: Any) -> dict[str, Any]:
    """Both averages 0 and no estimate yet."""
    xp = namespace(g_small)
    zero = xp.zeros((), dtype=xp.float64, device=device(g_small))
    return {"ema_g2": zero, "ema_s": zero, "step": zero}
