"""Group Normalization (Wu & He, 2018, arXiv:1803.08494).

The channels of each sample are split into G groups of C/G *contiguous* channels (channel c belongs
to group c // (C/G)), and each (sample, group) is standardized over its C/G channels and all
spatial positions:

    x_hat_i = (x_i - mu_i) / sigma_i                                        (Eq. 1)
    mu_i = 1/m sum_{k in S_i} x_k,  sigma_i = sqrt(1/m sum_{k in S_i} (x_k - mu_i)^2 + eps)  (Eq. 2)
    S_i = {k | k_N = i_N, floor(k_C / (C/G)) = floor(i_C / (C/G))}            (Eq. 3)
    y_i = gamma_c x_hat_i + beta_c        (Sec. 3.1, per-channel gamma/beta)

with m = (C/G) * prod(spatial) the group size and the biased variance.  The paper's Figure 3
(TensorFlow) reshapes x to [N, G, C//G, H, W], takes ``tf.nn.moments`` over axes [2, 3, 4] and
adds eps = 1e-5 inside the square root; this module does exactly that reshape (after moving the
channel axis next to the batch axis for channels-last layouts).  There is no state and training
equals inference.

Conventions (keyword hyper-parameters, paper default first):

* ``num_groups`` G (paper and Flax/Keras default 32); C must be divisible by G.  G = 1 is
  LayerNorm over (C, *) with a per-channel affine; G = C is InstanceNorm.
* ``axis``: the channel axis (1 for NC*, -1 for Flax/Keras channels-last).  Axis 0 is the batch.
* ``eps``: inside the square root everywhere (torch/ONNX 1e-5, Flax 1e-6, Keras 1e-3).
* ``affine``: ``"per_channel"`` gamma/beta of shape (C,) (the paper, torch, Flax, Keras,
  ONNX GroupNormalization-21) or ``"per_group"`` of shape (G,) (the deprecated ONNX
  GroupNormalization-18).
* One element per group (C/G = 1 and no spatial extent) is legal here: var = 0, x_hat = 0,
  y = beta.  ``torch.nn.functional.group_norm`` refuses N * C/G * prod(spatial) == 1 ("Expected
  more than 1 value per channel when training"), even though nothing is trained.

Backward.  Per (sample, group) the forward is a standardizer over R = (C/G, spatial), so with
``h = dy * gamma_c`` applied elementwise *before* the group reductions (gamma varies inside a
group), VJP-STD(R) gives

    dx = inv_std * (h - mean_R h - x_hat * mean_R(h * x_hat)),

derived from d x_hat_i/d x_j = inv_std (delta_ij - 1/m) - inv_std x_hat_i x_hat_j / m.
``dgamma_c = sum_{N, spatial} dy * x_hat`` and ``dbeta_c = sum_{N, spatial} dy`` (per channel), or
the same sums also taken over the C/G channels of each group for ``affine="per_group"``.
"""

from __future__ import annotations

from typing import Any

from reference._backend import namespace
from reference._common import check_ndim, check_nonempty, check_shape, fail, normalize_axis
from reference.normalizers._stats import standardize, standardize_vjp
from reference.registry import oracle_function, oracle_vjp

OP = "group_norm"

# Statistics live on the grouped view (N, G, C/G, S) with S = prod(spatial): reduce over these.
GROUP_AXES = (2, 3)


def _check(
    x: Any, weight: Any, bias: Any, num_groups: int, axis: int, affine: str
) -> tuple[int, int]:
    """Validate shapes; return ``(channel axis in [1, ndim), number of channels C)``."""
    check_ndim(OP, "x", x, min_ndim=2)
    check_nonempty(OP, "x", x)
    axis = normalize_axis(OP, "axis", axis, x.ndim)
    if axis == 0:
        fail(OP, f"axis={axis} is the batch axis; the channel axis must be one of 1..{x.ndim - 1} "
                 f"(or negative), x has shape {tuple(x.shape)}")
    channels = int(x.shape[axis])
    if channels % num_groups != 0:
        fail(OP, f"num_groups={num_groups} must divide the {channels} channels of x on axis "
                 f"{axis} (shape {tuple(x.shape)})")
    if affine == "per_channel":
        expected, why = (channels,), f"affine='per_channel': x has {channels} channels on axis {axis}"
    else:
        expected, why = (num_groups,), f"affine='per_group': num_groups={num_groups}"
    check_shape(OP, "weight", weight, expected, why)
    check_shape(OP, "bias", bias, expected, why)
    return axis, channels


def _channels_first(ndim: int, axis: int) -> tuple[int, ...]:
    """The permutation that moves the channel axis to position 1 (batch stays at 0)."""
    return (0, axis) + tuple(a for a in range(1, ndim) if a != axis)


def _inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    inv = [0] * len(perm)
    for position, a in enumerate(perm):
        inv[a] = position
    return tuple(inv)


def _to_groups(x: Any, num_groups: int, axis: int) -> tuple[Any, tuple[int, ...], tuple[int, ...]]:
    """The grouped view (N, G, C/G, S) of x, plus what :func:`_from_groups` needs to undo it.

    Contiguous channel blocks: after moving the channel axis to position 1, a C-major reshape
    of (N, C, ...) into (N, G, C/G, ...) puts channel c into group c // (C/G) (Figure 3).
    """
    xp = namespace(x)
    perm = _channels_first(x.ndim, axis)
    xt = xp.permute_dims(x, perm) if perm != tuple(range(x.ndim)) else x
    n, c = int(xt.shape[0]), int(xt.shape[1])
    spatial = 1
    for s in xt.shape[2:]:
        spatial *= int(s)
    grouped = xp.reshape(xt, (n, num_groups, c // num_groups, spatial))
    return grouped, tuple(int(s) for s in xt.shape), perm


def _from_groups(v: Any, shape_cf: tuple[int, ...], perm: tuple[int, ...]) -> Any:
    xp = namespace(v)
    out = xp.reshape(v, shape_cf)
    return xp.permute_dims(out, _inverse(perm)) if perm != tuple(range(len(perm))) else out


def _param_view(p: Any, num_groups: int, channels: int, affine: str) -> Any:
    """gamma or beta shaped to broadcast over the grouped view (N, G, C/G, S)."""
    xp = namespace(p)
    if affine == "per_channel":
        return xp.reshape(p, (1, num_groups, channels // num_groups, 1))
    return xp.reshape(p, (1, num_groups, 1, 1))


@oracle_function(OP)
def group_norm(
    x: Any,
    weight: Any = None,
    bias: Any = None,
    *,
    num_groups: int = 32,
    axis: int = 1,
    eps: float = 1e-5,
    affine: str = "per_channel",
) -> Any:
    """Group normalization of x (channels on ``axis``); returns y with the shape of x."""
    axis, channels = _check(x, weight, bias, num_groups, axis, affine)
    grouped, shape_cf, perm = _to_groups(x, num_groups, axis)
    x_hat, _, _, _ = standardize(grouped, GROUP_AXES, eps)  # Eqs. 1-3 (Figure 3's moments)
    y = x_hat
    if weight is not None:
        y = y * _param_view(weight, num_groups, channels, affine)
    if bias is not None:
        y = y + _param_view(bias, num_groups, channels, affine)
    return _from_groups(y, shape_cf, perm)


@oracle_vjp(OP)
def group_norm_vjp(
    dy: Any,
    x: Any,
    weight: Any = None,
    bias: Any = None,
    *,
    num_groups: int = 32,
    axis: int = 1,
    eps: float = 1e-5,
    affine: str = "per_channel",
) -> dict[str, Any]:
    """Gradients of ``<dy, y>`` w.r.t. x, weight and bias (those given)."""
    xp = namespace(x)
    axis, channels = _check(x, weight, bias, num_groups, axis, affine)
    check_shape(OP, "dy", dy, tuple(x.shape), "the cotangent of y has the shape of x")
    grouped, shape_cf, perm = _to_groups(x, num_groups, axis)
    g_dy, _, _ = _to_groups(dy, num_groups, axis)
    x_hat, inv_std, _, _ = standardize(grouped, GROUP_AXES, eps)
    # gamma varies across the channels of one group: scale before the group reductions.
    h = g_dy if weight is None else g_dy * _param_view(weight, num_groups, channels, affine)
    grads = {"x": _from_groups(standardize_vjp(h, x_hat, inv_std, GROUP_AXES), shape_cf, perm)}
    # Parameter gradients: per channel sum over (N, S); per group also over the C/G channels.
    param_axes = (0, 3) if affine == "per_channel" else (0, 2, 3)
    if weight is not None:
        grads["weight"] = xp.reshape(xp.sum(g_dy * x_hat, axis=param_axes), tuple(weight.shape))
    if bias is not None:
        grads["bias"] = xp.reshape(xp.sum(g_dy, axis=param_axes), tuple(bias.shape))
    return grads
