"""Region Normalization, basic form RN-B (Yu et al., AAAI 2020, arXiv:1911.10375).

A boolean mask splits each feature map into two regions, the mask's True positions (the
"foreground", label 1 of the official code: the corrupted region, the holes, in the official
inpainting network) and its False positions (the "background", the uncorrupted pixels).  Each
region is standardized with its own mean and variance, then given its own affine map:

    S_r     = #{positions of region r in the reduction group}
    mu_r    = (1/S_r) sum_{i in r} x_i,      var_r = (1/S_r) sum_{i in r} (x_i - mu_r)^2
    x_hat_i = (x_i - mu_r) / sqrt(var_r + eps_r)                for i in region r
    y_i     = gamma_{r,c} x_hat_i + beta_{r,c}                  (one gamma, beta per region and channel)

The reduction group is set by ``statistics``:

* ``"sample"`` (the paper, IN-style): per sample and channel, over the spatial positions of the
  region, as Instance Normalization restricted to a region (a full mask *is* instance_norm);
* ``"batch"`` (the official code, BN-style): per channel over the batch and the spatial
  positions, ``torch.sum(region, dim=[0, 2, 3])`` with the comment "(B, C) -> (C)" (a full mask
  *is* batch_norm with batch statistics).  The authors' README (issue #12) says RN "can be both
  BN-style or IN-style" and that the paper did not discuss it; the code is BN-style, in training
  and evaluation alike (its BatchNorm2d has ``track_running_stats=False``).

``eps_scaling`` (the official code's effective eps).  The official ``rn(region, mask)`` does not
compute var_r: it fills the positions outside the region with mu_r, runs BatchNorm2d(affine=False,
eps) over the filled tensor, and multiplies by sqrt(S_r / T), T = N*H*W the positions of the
channel.  The filled tensor has mean mu_r and variance (S_r / T) var_r, so inside the region

    BN(filled) * sqrt(S_r / T) = (x - mu_r) sqrt(S_r/T) / sqrt((S_r/T) var_r + eps)
                               = (x - mu_r) / sqrt(var_r + eps T / S_r)

and 0 outside.  ``"none"``: eps_r = eps (the paper's form); ``"inverse_region_fraction"``:
eps_r = eps T / S_r, T the positions of the reduction group (the official code): the smaller the
region, the larger the effective eps (a region of 1% of the batch's pixels has eps_r = 100 eps).

``bias_placement``.  ``"per_region"``: beta_r is added in region r only (the paper's
region-wise affine).  ``"summed"``: the official ``RN_B.forward`` masks the scaled terms,
``(rn_x * mask) * (1 + gamma_f) + beta_f + (rn_x * (1 - mask)) * (1 + gamma_b) + beta_b``, but
not the betas: both are added at every position, so the bias is beta_f + beta_b everywhere.
The official gamma is the offset of a scale initialized at 0: its ``1 + foreground_gamma`` is the
oracle's ``foreground_weight`` (a reparametrization: the gradients are the same).

Empty regions.  A region with no position in a reduction group (an all-True or all-False mask,
or a sample without holes under ``"sample"``) has nothing to normalize: it contributes no output
and its statistics are never formed (S_r = 0 is replaced by 1 only to keep the division finite,
as the official code does, ``Sr[Sr == 0] = 1``).  Its weight and bias get zero gradient, except
the bias under ``"summed"``, which is added everywhere.  A one-position region has var_r = 0 and
x_hat = 0.

What is the caller's.  The official RN-B resizes the input mask to the feature map with
``F.interpolate(mask, size=x.shape[2:], mode="nearest")``: the oracle takes the mask at the
feature map's size (N, 1 or C, *spatial).  RN-L (learnable RN, the paper's second form) builds its
mask from the features, ``mask = [sigmoid(conv([mean_C x, max_C x])) >= threshold]`` (threshold
0.8 in the official ``RN_L`` and main.py), detached, expanded to every channel, then applies
``rn`` without region affine and a spatial affine ``rn_x * (1 + gamma_map) + beta_map`` whose
maps are convolutions of the same sigmoid map.  That mask step is a convolution and a threshold,
not a normalization: RN-L is this op with that mask and no affine, followed by the caller's
spatial affine (tests/test_region_norm.py composes the official RN_L this way, forward and
gradient).  Keeping the convolutions and the threshold out keeps the jump where it is: the
threshold acts on a convolution of many inputs, so no single input value lies next to it.

Non-finite inputs: a NaN or inf spreads to its own region's statistics only (``where``, not
``x * mask``: the official code's ``x * (1 - label)`` turns an inf of the other region into a NaN).

Backward.  The mask is constant (bool, never differentiated), and so are S_r and eps_r.  Inside
each region the op is a standardizer over that region's positions, so VJP-STD (normalizers/_stats)
with the region's means: with h = gamma_r dy,

    dx_i = inv_std_r (h_i - mean_r(h) - x_hat_i mean_r(h x_hat))          for i in region r,

dgamma_{r,c} = sum_{i in r} dy_i x_hat_i and dbeta_{r,c} = sum_{i in r} dy_i (``"summed"``: the
sum over every position).  Sums of dx over each region vanish (the mean is subtracted).

Accuracy: the region mean is taken as a shift plus the mean of the shifted data, as in
``_stats.centered_moments``, so data near a large offset (mean 1e8, std 1e-3) are centered to a
few ulps of their spread.
"""

from __future__ import annotations

from typing import Any

from reference._backend import device, namespace
from reference._common import check_channel_params, check_shape, fail
from reference.normalizers._stats import expand_to, reduction_size
from reference.registry import oracle_function, oracle_vjp

OP = "region_norm"
_PARAMS = ("foreground_weight", "foreground_bias", "background_weight", "background_bias")


def _check(x: Any, mask: Any, params: dict[str, Any]) -> None:
    """x is (N, C, *spatial) with a spatial axis; mask is (N, 1 or C, *spatial); params are (C,)."""
    check_channel_params(OP, x, 1, params, min_ndim=3)
    n, c, *spatial = (int(s) for s in x.shape)
    if mask.ndim != x.ndim or int(mask.shape[0]) != n or int(mask.shape[1]) not in (1, c) \
            or tuple(int(s) for s in mask.shape[2:]) != tuple(spatial):
        fail(OP, f"mask must have shape {(n, 1, *spatial)} or {(n, c, *spatial)} (x has shape "
                 f"{tuple(x.shape)}; resize the mask to the feature map first), got {tuple(mask.shape)}")


def _axes(ndim: int, statistics: str) -> tuple[int, ...]:
    """The reduction group's axes: spatial (per sample and channel) or batch and spatial (per channel)."""
    spatial = tuple(range(2, ndim))
    return spatial if statistics == "sample" else (0, *spatial)


def _region_mean(v: Any, inside: Any, count: Any, axes: tuple[int, ...]) -> Any:
    """Mean of v over the positions ``inside`` the region, per reduction group (keepdims).
    ``where``, not ``v * inside``: a NaN or inf of the other region stays out."""
    xp = namespace(v)
    return xp.sum(xp.where(inside, v, xp.zeros_like(v)), axis=axes, keepdims=True) / count


class _Regions:
    """Both regions' masks, counts and inverse standard deviations, and x_hat over all of x."""

    def __init__(self, x: Any, mask: Any, axes: tuple[int, ...], eps: float, eps_scaling: str) -> None:
        xp = namespace(x)
        foreground = xp.broadcast_to(mask, x.shape)
        self.axes = axes
        self.masks = (foreground, xp.logical_not(foreground))
        total = reduction_size(x, axes)  # T: the positions of one reduction group
        self.counts, self.inv_stds = [], []
        x_hat = xp.zeros_like(x)
        for inside in self.masks:
            count = xp.sum(xp.astype(inside, x.dtype), axis=axes, keepdims=True)  # S_r
            count = xp.where(count > 0, count, xp.ones_like(count))  # an empty region: never used
            # The mean as a shift plus the mean of the shifted data (_stats.centered_moments).
            shift = _region_mean(x, inside, count, axes)
            shifted = x - shift
            centered = shifted - _region_mean(shifted, inside, count, axes)
            var = _region_mean(centered * centered, inside, count, axes)
            eps_r = eps if eps_scaling == "none" else eps * (total / count)
            inv_std = 1.0 / xp.sqrt(var + eps_r)
            x_hat = xp.where(inside, centered * inv_std, x_hat)
            self.counts.append(count)
            self.inv_stds.append(inv_std)
        self.x_hat = x_hat

    def select(self, foreground: Any, background: Any) -> Any:
        """Per position: ``foreground`` in the mask's True region, ``background`` elsewhere."""
        return namespace(self.x_hat).where(self.masks[0], foreground, background)


def _channel(v: Any, ndim: int, default: float, like: Any) -> Any:
    """A per-channel parameter broadcast over (N, C, *spatial), or the constant ``default``."""
    xp = namespace(like)
    if v is None:
        return xp.full((1,) * ndim, default, dtype=like.dtype, device=device(like))
    return expand_to(v, ndim, 1)


@oracle_function(OP)
def region_norm(
    x: Any,
    mask: Any,
    foreground_weight: Any = None,
    foreground_bias: Any = None,
    background_weight: Any = None,
    background_bias: Any = None,
    *,
    eps: float = 1e-5,
    statistics: str = "sample",
    eps_scaling: str = "none",
    bias_placement: str = "per_region",
) -> Any:
    """RN-B: each region of ``mask`` (True: foreground, False: background) standardized with its
    own statistics and mapped by its own per-channel affine."""
    weights = dict(zip(_PARAMS, (foreground_weight, foreground_bias, background_weight,
                                 background_bias), strict=True))
    _check(x, mask, weights)
    regions = _Regions(x, mask, _axes(x.ndim, statistics), eps, eps_scaling)
    d = x.ndim
    gamma = regions.select(_channel(foreground_weight, d, 1.0, x), _channel(background_weight, d, 1.0, x))
    fg_bias, bg_bias = _channel(foreground_bias, d, 0.0, x), _channel(background_bias, d, 0.0, x)
    beta = regions.select(fg_bias, bg_bias) if bias_placement == "per_region" else fg_bias + bg_bias
    return regions.x_hat * gamma + beta


@oracle_vjp(OP)
def region_norm_vjp(
    dy: Any,
    x: Any,
    mask: Any,
    foreground_weight: Any = None,
    foreground_bias: Any = None,
    background_weight: Any = None,
    background_bias: Any = None,
    *,
    eps: float = 1e-5,
    statistics: str = "sample",
    eps_scaling: str = "none",
    bias_placement: str = "per_region",
) -> dict[str, Any]:
    """Gradients of ``<dy, y>`` w.r.t. x and the given weights and biases."""
    xp = namespace(x)
    given = dict(zip(_PARAMS, (foreground_weight, foreground_bias, background_weight,
                               background_bias), strict=True))
    _check(x, mask, given)
    check_shape(OP, "dy", dy, tuple(x.shape), "the cotangent of y has the shape of x")
    axes = _axes(x.ndim, statistics)
    regions = _Regions(x, mask, axes, eps, eps_scaling)
    d, x_hat = x.ndim, regions.x_hat
    h = dy * regions.select(_channel(foreground_weight, d, 1.0, x), _channel(background_weight, d, 1.0, x))
    # VJP-STD inside each region, with the region's own means (the statistics see no other position).
    dx = xp.zeros_like(x)
    for inside, count, inv_std in zip(regions.masks, regions.counts, regions.inv_stds, strict=True):
        mean_h = _region_mean(h, inside, count, axes)
        mean_hx = _region_mean(h * x_hat, inside, count, axes)
        dx = xp.where(inside, inv_std * (h - mean_h - x_hat * mean_hx), dx)
    grads = {"x": dx}
    not_channel = (0, *range(2, d))

    def per_channel(v: Any, inside: Any | None) -> Any:
        kept = v if inside is None else xp.where(inside, v, xp.zeros_like(v))
        return xp.sum(kept, axis=not_channel)

    fg, bg = regions.masks
    summed = bias_placement == "summed"
    wanted = {
        "foreground_weight": lambda: per_channel(dy * x_hat, fg),
        "background_weight": lambda: per_channel(dy * x_hat, bg),
        "foreground_bias": lambda: per_channel(dy, None if summed else fg),
        "background_bias": lambda: per_channel(dy, None if summed else bg),
    }
    grads.update({name: wanted[name]() for name, value in given.items() if value is not None})
    return grads
