"""Weight Standardization (Qiao et al., 2019, arXiv:1903.10520).

A reparametrization of a convolution (or linear) weight, no activations involved.  Each output
filter ``W_i`` is standardized over its fan-in, the ``n`` entries of every other axis
(``C_in * kh * kw`` for a ``(out, in, kh, kw)`` weight):

    W_hat_ij = (W_ij - mu_i) / sigma_i,   mu_i = mean_j W_ij              (Eq. 5-6)
    y = W_hat * x                                                         (Eq. 6)

The paper writes ``sigma_i`` from the biased variance, with eps in the subscript
``sigma_{W_i,.+eps}``; the official snippets and the libraries disagree on the variance and on
where eps goes (normalizers.md §1.8, dialects.md §3c), so both are knobs:

* ``correction``: 1 = unbiased variance ``sum c^2 / (n - 1)`` (WS README PyTorch snippet,
  ``torch.std_mean`` default; BCN repo ``.var``), 0 = biased (README TF snippet
  ``tf.keras.backend.std``, timm ``F.batch_norm``, NFNets ``jnp.var``, Chainer).
* ``eps_mode``:
  - ``"add_std"``: ``sigma = sqrt(var) + eps`` (README snippets; Chainer's WeightStandardization)
  - ``"add_var"``: ``sigma = sqrt(var + eps)`` (BCN ``imagenet/models/layers.py``; timm StdConv2d)
  - ``"max_fanin_var"``: ``sigma = sqrt(max(n * var, eps))`` (NFNets ``WSConv2D`` with its
    gain at its initial value 1).  This is the *scaled* WS of NF-ResNets: each filter gets unit
    L2 norm (``n * var(W_hat) = 1``), not unit variance, and eps is a floor, not an addend.
* ``axis``: the output axis (0 for PyTorch's ``(out, in, kh, kw)``, -1 for TF/Haiku ``HWIO``).

The default is the official README PyTorch snippet (unbiased, ``std + 1e-5``), the code the
authors ship as "the" WS layer.

Backward.  With ``c = W - mu`` (per filter), ``d = n - correction``, ``var = sum c^2 / d``,
``W_hat = c / sigma(var)`` and ``G = dL/dW_hat``: the mean's derivative projects out the filter
mean of G, and ``d var / d W_j = 2 c_j / d`` (the mean term vanishes since ``sum c = 0``), so

    dW = (G - mean(G)) / sigma  -  W_hat * sum(G * W_hat) * k,    k = 2 sigma'(var) / d

    add_var:        sigma = sqrt(var + eps),   k = 1 / (d sigma)
                    (correction 0: VJP-STD, ``(G - mean G - W_hat mean(G W_hat)) / sigma``)
    add_std:        sigma = sqrt(var) + eps,   k = 1 / (d sqrt(var))
                    (= normalizers.md §1.8: ``c (sum G c) / (sigma^2 d sqrt(var))``)
    max_fanin_var:  sigma = sqrt(max(n var, eps)),  k = n / (d sigma) where n var > eps,
                    0 where the floor eps is chosen (sigma is then a constant),
                    1/2 of it at the exact tie (JAX's ``maximum`` splits the gradient there).

Constant filters (var = 0): ``W_hat = 0`` in every mode (the centered data are exactly 0), and
the gradient is ``(G - mean G) / sigma(0)`` with sigma(0) = sqrt(eps) (add_var, max_fanin_var)
or eps (add_std).  For add_std, ``c / (||c|| / sqrt(d) + eps)`` is differentiable at c = 0 with
derivative ``1/eps``, so the second term (whose ``k = 1/(d sqrt(var))`` is infinite there while
``W_hat = 0``) is taken as its limit 0, as torch's ``std`` backward does (it masks std = 0).

Accuracy: the centered filter comes from ``_stats.centered_moments`` (shifted two-pass mean), so
the offset families (mean 1e8, std 1e-3) keep full relative accuracy.  Squares are not rescaled:
``|W - mu|`` must stay below ~1e154.
"""

from __future__ import annotations

from typing import Any

from reference._backend import namespace
from reference._common import check_ndim, check_nonempty, check_shape, fail, normalize_axis
from reference.normalizers._stats import centered_moments, other_axes, reduction_size
from reference.registry import oracle_function, oracle_vjp

OP = "weight_standardization"


def _check(weight: Any, axis: int, correction: int) -> tuple[int, ...]:
    check_ndim(OP, "weight", weight, min_ndim=2)
    check_nonempty(OP, "weight", weight)
    out_axis = normalize_axis(OP, "axis", axis, weight.ndim)
    fan_in = other_axes(weight.ndim, out_axis)
    n = reduction_size(weight, fan_in)
    if n <= correction:
        # The unbiased variance of a single value divides 0 by 0.
        fail(OP, f"correction={correction} needs more than {correction} fan-in value per filter, "
                 f"got weight of shape {tuple(weight.shape)} (fan-in {n} on axes {fan_in})")
    return fan_in


def _standardize(
    weight: Any, fan_in: tuple[int, ...], eps: float, correction: int, eps_mode: str
) -> tuple[Any, Any, Any, Any]:
    """``(W_hat, sigma, k, n)`` with ``k`` the backward coefficient of the module docstring."""
    xp = namespace(weight)
    n = reduction_size(weight, fan_in)
    d = n - correction
    _, centered, var = centered_moments(weight, fan_in, correction=correction)
    if eps_mode == "add_var":
        sigma = xp.sqrt(var + eps)
        k = 1.0 / (d * sigma)
    elif eps_mode == "add_std":
        std = xp.sqrt(var)
        sigma = std + eps
        # k = 1/(d std) multiplies W_hat = 0 where std = 0; use 0 there (the limit) not 0 * inf.
        k = xp.where(std > 0, 1.0 / (d * xp.where(std > 0, std, xp.ones_like(std))),
                     xp.zeros_like(std))
    else:  # "max_fanin_var"
        fan_var = n * var
        floor = xp.full_like(fan_var, eps)
        sigma = xp.sqrt(xp.maximum(fan_var, floor))
        # Which branch of max(n var, eps) carries the gradient: the variance, the floor, or
        # (at an exact tie, like jnp.maximum) half of each.
        branch = xp.where(fan_var > floor, xp.ones_like(var),
                          xp.where(fan_var == floor, 0.5 * xp.ones_like(var), xp.zeros_like(var)))
        k = branch * n / (d * sigma)
    return centered / sigma, sigma, k, n


@oracle_function(OP)
def weight_standardization(
    weight: Any,
    *,
    eps: float = 1e-5,
    correction: int = 1,
    eps_mode: str = "add_std",
    axis: int = 0,
) -> Any:
    """``W_hat``: every output filter of ``weight`` standardized over its fan-in (Eq. 5)."""
    fan_in = _check(weight, axis, correction)
    w_hat, _, _, _ = _standardize(weight, fan_in, eps, correction, eps_mode)
    return w_hat


@oracle_vjp(OP)
def weight_standardization_vjp(
    dw_hat: Any,
    weight: Any,
    *,
    eps: float = 1e-5,
    correction: int = 1,
    eps_mode: str = "add_std",
    axis: int = 0,
) -> dict[str, Any]:
    """Gradient of ``<dw_hat, W_hat>`` w.r.t. weight (derivation in the module docstring)."""
    xp = namespace(weight)
    fan_in = _check(weight, axis, correction)
    check_shape(OP, "dw_hat", dw_hat, tuple(weight.shape),
                "the cotangent of w_hat has the shape of weight")
    w_hat, sigma, k, _ = _standardize(weight, fan_in, eps, correction, eps_mode)
    mean_g = xp.mean(dw_hat, axis=fan_in, keepdims=True)
    g_dot_w = xp.sum(dw_hat * w_hat, axis=fan_in, keepdims=True)
    return {"weight": (dw_hat - mean_g) / sigma - w_hat * (g_dot_w * k)}
