"""ConvBN blocks in the four modes of You et al., "Efficient ConvBN Blocks for Transfer Learning
and Beyond" (ICLR 2024, arXiv:2305.11624; first titled "Tune-Mode ConvBN Blocks For Efficient
Transfer Learning").

A ConvBN block is a 2-D convolution (``reference/normalizers/_conv.py``: NCHW, stride, zero
padding, dilation, groups) followed by a BatchNorm over its output channels:

    t = conv(x, W) + b                                          (b = 0 without a conv bias)
    y = gamma (t - mu) / sqrt(var + eps) + beta                 (gamma = 1, beta = 0 without affine)

The modes differ in which statistics (mu, var) are used and in what the trained parameters are:

* **Train** (``training=True``): batch statistics of t over (N, H_out, W_out), the running
  statistics updated (BatchNorm's Alg. 1 and PyTorch's running average: ``batch_norm``).
* **Eval** (``training=False, fold="none"``): the running statistics, conv then BN.
* **Tune** (``training=False, fold="tune"``): the same function as Eval, computed by folding the
  BN into the conv on the fly, every forward (the paper's proposal):

      c  = gamma / sqrt(running_var + eps)                      (per output channel)
      W' = W c           (W's output channel o scaled by c_o)
      b' = beta + c (b - running_mean)
      y  = conv(x, W') + b'

  Gradients flow into W, b, gamma and beta *through the fold*, so Tune's parameter gradients are
  Eval's (the paper's claim; a property test) while the conv runs once on the folded weight.
* **Deploy** (``fold="deploy"``): the weights were folded once (:func:`fold_conv_bn`,
  ``torch.nn.utils.fusion.fuse_conv_bn_eval``); the parameters *are* W' and b', passed here as
  ``weight`` and ``bias``, and there is no BN left (no gamma, beta or running statistics;
  ``training`` has no effect).  The forward is Eval's on the unfolded parameters; the gradients
  are w.r.t. W' and b', which differ from Eval's by the fold's Jacobian: with the same loss,

      dL/dW  = c dL/dW'                     dL/db = c dL/db'         dL/dbeta = dL/db'
      dL/dgamma = (<dL/dW', W>_o + dL/db' (b - running_mean)) / sqrt(running_var + eps)

  (``<., .>_o`` summed over one output channel).  An SGD step of size lr on W in Eval mode moves
  W' by ``lr c^2 dL/dW'``, in Deploy mode by ``lr dL/dW'``: the same data give per-channel
  steps differing by c^2.  (The paper derives Deploy's reduced training stability from this
  change of the gradients [unverified: the paper's text was not available here; the relation
  above is derived from the fold and checked by a property test].)

With ``training=True`` the ``tune`` fold runs the Train mode: the official code
(apple/ml-tune-mode-convbn ``efficient_conv_bn_eval_control``, mmcv ``ConvModule.forward``) folds
only while ``bn.training`` is False and otherwise calls conv then BN.

The BatchNorm is PyTorch's (every framework with these modes is built on it: mmcv, the torch
Inductor pass, torch.nn.utils.fusion): new = (1 - m) old + m batch, the running variance
unbiased (n / (n - 1)), ``momentum=None`` a cumulative average, one value per channel in training
refused.

Backward (hand-derived; the conv's VJP is in ``_conv.py``, BN's in ``batch_norm``):

* Train / Eval: ``dt, dgamma, dbeta = batch_norm_vjp(dy)``; ``dx, dW = conv_vjp(dt)``;
  ``db = sum_{n,a,b} dt`` in Eval and exactly 0 in Train (the batch mean cancels any per-channel
  shift of t: y does not depend on b).
* Tune: ``db' = sum_{n,a,b} dy``; ``dx, dW' = conv_vjp(dy)`` with W'; then the fold's VJP,
  from ``W' = W c``, ``b' = beta + c (b - mu)`` and ``c = gamma r`` with ``r = 1 / sqrt(var + eps)``:
  ``dW = c dW'``, ``db = c db'``, ``dbeta = db'``, ``dc = <dW', W>_o + db' (b - mu)``,
  ``dgamma = r dc``.  (The running statistics are state: constants, no gradient.)
* Deploy: ``db' = sum dy``, ``dx, dW' = conv_vjp(dy)``.
"""

from __future__ import annotations

from typing import Any

from reference._backend import device, namespace
from reference._common import check_shape, fail
from reference.normalizers import batch_norm as _bn
from reference.normalizers._conv import ConvGeometry, conv2d, conv2d_vjp, geometry
from reference.registry import oracle_function, oracle_vjp

OP = "conv_bn"

#: The paper's four modes as (training, fold) hyper-parameters.
MODES: dict[str, dict[str, Any]] = {
    "train": {"training": True, "fold": "none"},
    "eval": {"training": False, "fold": "none"},
    "tune": {"training": False, "fold": "tune"},
    "deploy": {"training": False, "fold": "deploy"},
}

# torch's BatchNorm conventions (module docstring), passed to batch_norm.
_TORCH_BN = {"momentum_convention": "new_weight", "running_var_correction": 1, "single_value": "raise"}


def _raw(fn: Any) -> Any:
    return getattr(fn, "__wrapped__", fn)


def _channel(xp: Any, v: Any) -> Any:
    """A per-output-channel vector as (1, C, 1, 1)."""
    return xp.reshape(v, (1, -1, 1, 1))


def _check(x: Any, weight: Any, bias: Any, bn_weight: Any, bn_bias: Any, running_mean: Any,
           running_var: Any, fold: str, stride: int, padding: int, dilation: int, groups: int
           ) -> ConvGeometry:
    geo = geometry(OP, x, weight, stride=stride, padding=padding, dilation=dilation, groups=groups)
    channels = (geo.c_out,)
    why = f"one per output channel: weight has {geo.c_out} on axis 0"
    if fold == "deploy":
        given = [name for name, v in (("bn_weight", bn_weight), ("bn_bias", bn_bias),
                                      ("running_mean", running_mean), ("running_var", running_var))
                 if v is not None]
        if given:
            fail(OP, f"fold='deploy' has no BatchNorm left: weight and bias are the folded W', b' "
                     f"(fold_conv_bn), so {', '.join(given)} must be absent")
    elif running_mean is None or running_var is None:
        fail(OP, "needs running_mean and running_var (a ConvBN block tracks running statistics)")
    for name, value in (("bias", bias), ("bn_weight", bn_weight), ("bn_bias", bn_bias),
                        ("running_mean", running_mean), ("running_var", running_var)):
        check_shape(OP, name, value, channels, why)
    return geo


def init_state(weight: Any, *, fold: str = "tune") -> dict[str, Any]:
    """BatchNorm's initial state for the conv's output channels; none for a deployed block."""
    if fold == "deploy":
        return {}
    xp = namespace(weight)
    if weight.ndim != 4:
        fail(OP, f"weight must have 4 dimensions (C_out, C_in / groups, kh, kw), got shape "
                 f"{tuple(weight.shape)}")
    c, on = int(weight.shape[0]), device(weight)   # beside the weight: the state meets its channels
    return {"running_mean": xp.zeros((c,), dtype=xp.float64, device=on),
            "running_var": xp.ones((c,), dtype=xp.float64, device=on),
            "num_batches_tracked": xp.asarray(0.0, dtype=xp.float64, device=on)}


def fold_conv_bn(weight: Any, bias: Any, bn_weight: Any, bn_bias: Any, running_mean: Any,
                 running_var: Any, eps: float) -> tuple[Any, Any]:
    """The folded ``(W', b')`` of a ConvBN block (module docstring; Deploy's parameters, what
    ``torch.nn.utils.fusion.fuse_conv_bn_weights`` returns), in the arrays' dtype.

    The operations are in the official code's order (``coeff = gamma * rsqrt(var + eps)``,
    ``W * coeff``, ``beta + coeff * (b - mean)``); ``bias``, ``bn_weight``, ``bn_bias`` may be None
    (0, 1, 0).
    """
    xp = namespace(weight, running_var)
    coeff = 1.0 / xp.sqrt(running_var + eps)
    if bn_weight is not None:
        coeff = bn_weight * coeff
    w_fold = weight * xp.reshape(coeff, (-1, 1, 1, 1))
    centered = -running_mean if bias is None else bias - running_mean
    b_fold = coeff * centered
    if bn_bias is not None:
        b_fold = bn_bias + b_fold
    return w_fold, b_fold


def _conv_out(x: Any, weight: Any, bias: Any, geo: ConvGeometry) -> Any:
    xp = namespace(x, weight)
    t = conv2d(x, weight, geo)
    return t if bias is None else t + _channel(xp, bias)


def _bn_hparams(training: bool, eps: float, momentum: float | None) -> dict[str, Any]:
    return {"training": training, "track_running_stats": True, "axis": 1, "eps": eps, "momentum": momentum,
            **_TORCH_BN}


def _check_values_per_channel(geo: ConvGeometry, training: bool, fold: str) -> None:
    if training and fold != "deploy" and geo.n * geo.h_out * geo.w_out == 1:
        fail(OP, f"expected more than 1 value per channel when training, got a conv output of shape "
                 f"{geo.out_shape} (BatchNorm's batch statistics over N, H_out, W_out)")


@oracle_function(OP)
def conv_bn(
    x: Any,
    weight: Any,
    bias: Any = None,
    bn_weight: Any = None,
    bn_bias: Any = None,
    running_mean: Any = None,
    running_var: Any = None,
    num_batches_tracked: Any = None,
    *,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    groups: int = 1,
    training: bool = True,
    fold: str = "tune",
    eps: float = 1e-5,
    momentum: float | None = 0.1,
) -> tuple[Any, dict[str, Any]]:
    """A ConvBN block in the mode ``(training, fold)`` selects (module docstring); returns
    ``(y, new_state)``, the state updated in training."""
    geo = _check(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, fold, stride, padding,
                 dilation, groups)
    _check_values_per_channel(geo, training, fold)
    xp = namespace(x, weight)
    if fold == "deploy":                                    # a plain conv with W', b'
        return _conv_out(x, weight, bias, geo), {}
    state = {"running_mean": running_mean, "running_var": running_var,
             "num_batches_tracked": num_batches_tracked if num_batches_tracked is not None
             else xp.asarray(0.0, dtype=x.dtype, device=device(x))}
    if fold == "tune" and not training:                     # Tune: fold on the fly, one conv
        w_fold, b_fold = fold_conv_bn(weight, bias, bn_weight, bn_bias, running_mean, running_var, eps)
        return _conv_out(x, w_fold, b_fold, geo), state
    t = _conv_out(x, weight, bias, geo)                     # Train / Eval: conv then BN
    return _raw(_bn.batch_norm)(t, bn_weight, bn_bias, **state, **_bn_hparams(training, eps, momentum))


@oracle_vjp(OP)
def conv_bn_vjp(
    dy: Any,
    x: Any,
    weight: Any,
    bias: Any = None,
    bn_weight: Any = None,
    bn_bias: Any = None,
    running_mean: Any = None,
    running_var: Any = None,
    num_batches_tracked: Any = None,
    *,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    groups: int = 1,
    training: bool = True,
    fold: str = "tune",
    eps: float = 1e-5,
    momentum: float | None = 0.1,
) -> dict[str, Any]:
    """Gradients of ``<dy, y>`` w.r.t. x, weight and the given bias, bn_weight, bn_bias (module
    docstring, "Backward")."""
    geo = _check(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, fold, stride, padding,
                 dilation, groups)
    check_shape(OP, "dy", dy, geo.out_shape, "the cotangent of y has the conv output's shape")
    _check_values_per_channel(geo, training, fold)
    xp = namespace(x, weight)
    grads: dict[str, Any] = {}
    if fold == "deploy" or (fold == "tune" and not training):
        w_used = weight
        if fold == "tune":
            w_used, _ = fold_conv_bn(weight, bias, bn_weight, bn_bias, running_mean, running_var, eps)
        dx, dw_used = conv2d_vjp(dy, x, w_used, geo)
        db_used = xp.sum(dy, axis=(0, 2, 3))
        grads["x"] = dx
        if fold == "deploy":
            grads["weight"] = dw_used
            if bias is not None:
                grads["bias"] = db_used
            return grads
        # The fold's VJP: W' = W c, b' = beta + c (b - mu), c = gamma r.
        r = 1.0 / xp.sqrt(running_var + eps)
        c = r if bn_weight is None else bn_weight * r
        grads["weight"] = dw_used * xp.reshape(c, (-1, 1, 1, 1))
        if bias is not None:
            grads["bias"] = c * db_used
        if bn_weight is not None:
            centered = -running_mean if bias is None else bias - running_mean
            dc = xp.sum(dw_used * weight, axis=(1, 2, 3)) + db_used * centered
            grads["bn_weight"] = r * dc
        if bn_bias is not None:
            grads["bn_bias"] = db_used
        return grads
    t = _conv_out(x, weight, bias, geo)
    state = {"running_mean": running_mean, "running_var": running_var,
             "num_batches_tracked": num_batches_tracked}
    bn_grads = _raw(_bn.batch_norm_vjp)(dy, t, bn_weight, bn_bias, **state,
                                        **_bn_hparams(training, eps, momentum))
    dt = bn_grads["x"]
    grads["x"], grads["weight"] = conv2d_vjp(dt, x, weight, geo)
    if bias is not None:
        # Eval: db = sum dt.  Train: the batch mean removes any per-channel shift of t, so y does
        # not depend on b and db is exactly 0 (sum dt is only the rounding noise of terms that
        # cancel; the harness judges an exact zero as a structural zero).  0 * sum dt keeps the
        # NaN of a non-finite input, as the sum would.
        db = xp.sum(dt, axis=(0, 2, 3))
        grads["bias"] = 0.0 * db if training else db
    if bn_weight is not None:
        grads["bn_weight"] = bn_grads["weight"]
    if bn_bias is not None:
        grads["bn_bias"] = bn_grads["bias"]
    return grads
