"""Split (auxiliary) BatchNorm (Xie et al., 2020, arXiv:1911.09665, "Adversarial Examples Improve
Image Recognition", AdvProp; timm's SplitBatchNorm2d).

AdvProp trains on clean images and their adversarial examples; since the two come from different
distributions, the adversarial half goes through *auxiliary* BatchNorm layers with their own
statistics and affine parameters, the clean half through the main ones, and only the main BNs are
kept for inference (Sec. 4.2, "Disentangled Learning via An Auxiliary BN").  timm generalizes it to
k = ``num_splits`` parts (its training script uses it for AugMix's clean + augmented splits too).

Training.  The batch (axis 0, N samples) is cut into k contiguous parts x_0, ..., x_{k-1}; part i
is batch-normalized (Alg. 1 of BatchNorm) with its own statistics and its own gamma_i, beta_i, and
updates its own running statistics; part 0 is the main BN, parts 1..k-1 the auxiliary ones:

    y = concat_i BN_train(x_i; gamma_i, beta_i, running_mean_i, running_var_i)

Inference.  The main BN alone, on the whole batch: ``y = BN_eval(x; gamma_0, beta_0, running_0)``
(with running statistics; without them, the whole batch's statistics).  The auxiliary rows are
untouched and receive no gradient.

Layout of the per-split tensors: ``weight``, ``bias``, ``running_mean``, ``running_var`` have shape
(k, C), row 0 the main BN (timm: the module's own ``weight``, ``running_mean``, ...), row i the
auxiliary BN i (timm: ``aux_bn[i - 1]``).  Every BN is called once per training step, so their
batch counters are equal: one ``num_batches_tracked`` stands for all of them.

Cuts (``uneven``; the frameworks differ, read from their sources):

* ``"raise"`` (timm SplitBatchNorm2d.forward): in training N must be a multiple of k
  (``assert input.shape[0] == split_size * num_splits``), parts of N / k; inference takes any N.
* ``"last_larger"`` (the MixBatchNorm2d of the AdvProp reproductions, e.g.
  LiYingwei/ShapeTextureDebiasedTraining aux_bn.py: ``input[:N // 2]`` main, ``input[N // 2:]``
  auxiliary): parts of N // k samples, the last one takes the remainder.

Each BN follows ``batch_norm``'s conventions (``momentum_convention``, ``running_var_correction``,
``momentum=None`` a cumulative average, ``single_value``); this module calls ``batch_norm`` itself
on each part.

Backward.  The parts do not interact: the Jacobian is block-diagonal, each block BatchNorm's
training VJP (VJP-STD over the part with h = gamma_i dy); ``dgamma_i = sum_{part i} dy x_hat``,
``dbeta_i = sum_{part i} dy`` (rows of the (k, C) gradients).  Inference: BatchNorm's eval VJP with
row 0; rows 1..k-1 of dgamma, dbeta are 0.
"""

from __future__ import annotations

from typing import Any

from reference._backend import device, namespace, size
from reference._common import check_ndim, check_nonempty, check_shape, fail, normalize_axis
from reference.normalizers import batch_norm as _bn
from reference.normalizers._stats import running_state
from reference.registry import oracle_function, oracle_vjp

OP = "split_batch_norm"
_PER_SPLIT = ("weight", "bias", "running_mean", "running_var")


def _raw(fn: Any) -> Any:
    """The undecorated function (arrays stay in their dtype; the spec was validated already)."""
    return getattr(fn, "__wrapped__", fn)


def split_bounds(n: int, num_splits: int, uneven: str = "raise") -> tuple[tuple[int, int], ...]:
    """``[(start, stop)]`` of the k contiguous parts of a batch of ``n`` samples (module docstring)."""
    size = n // num_splits
    if uneven == "raise" and n % num_splits:
        fail(OP, f"the batch size must be a multiple of num_splits={num_splits} in training "
                 f"(uneven='raise', timm's assert), got {n} samples")
    if size == 0:
        fail(OP, f"num_splits={num_splits} parts of a batch of {n} samples leave the first parts "
                 f"empty; every part needs at least one sample")
    return tuple((i * size, (i + 1) * size if i < num_splits - 1 else n) for i in range(num_splits))


def _check(x: Any, tensors: dict[str, Any], axis: int, num_splits: int) -> int:
    check_ndim(OP, "x", x, min_ndim=2)
    check_nonempty(OP, "x", x)
    axis = normalize_axis(OP, "axis", axis, x.ndim)
    if axis == 0:
        fail(OP, f"axis=0 is the batch axis; the channel axis must be one of 1..{x.ndim - 1} "
                 f"(or negative), x has shape {tuple(x.shape)}")
    expected = (num_splits, int(x.shape[axis]))
    why = f"one row per split: num_splits={num_splits}, x has {expected[1]} channels on axis {axis}"
    for name, value in tensors.items():
        check_shape(OP, name, value, expected, why)
    return axis


def init_state(x: Any, *, num_splits: int = 2, axis: int = 1, track_running_stats: bool = True
               ) -> dict[str, Any]:
    """Every BN's running mean 0 and variance 1 (rows of (k, C)), no batches seen."""
    if not track_running_stats:
        return {}
    xp = namespace(x)
    axis = _check(x, {}, axis, num_splits)
    shape = (num_splits, int(x.shape[axis]))
    return {
        "running_mean": xp.zeros(shape, dtype=xp.float64, device=device(x)),
        "running_var": xp.ones(shape, dtype=xp.float64, device=device(x)),
        "num_batches_tracked": xp.asarray(0.0, dtype=xp.float64, device=device(x)),
    }


def _row(v: Any, i: int) -> Any:
    return None if v is None else v[i, ...]


def _parts(x: Any, num_splits: int, uneven: str, R_size: int, single_value: str
           ) -> tuple[tuple[int, int], ...]:
    """The training parts, refusing a part with one value per channel like each BN would."""
    bounds = split_bounds(int(x.shape[0]), num_splits, uneven)
    for i, (a, b) in enumerate(bounds):
        if (b - a) * R_size == 1 and single_value == "raise":
            fail(OP, f"expected more than 1 value per channel when training, got part {i} of shape "
                     f"{(b - a, *tuple(x.shape[1:]))} (set single_value='allow' for the Keras/TF behaviour)")
    return bounds


@oracle_function(OP)
def split_batch_norm(
    x: Any,
    weight: Any = None,
    bias: Any = None,
    running_mean: Any = None,
    running_var: Any = None,
    num_batches_tracked: Any = None,
    *,
    num_splits: int = 2,
    uneven: str = "raise",
    training: bool = True,
    track_running_stats: bool = True,
    axis: int = 1,
    eps: float = 1e-5,
    momentum: float | None = 0.1,
    momentum_convention: str = "new_weight",
    running_var_correction: int = 1,
    single_value: str = "raise",
) -> tuple[Any, dict[str, Any]]:
    """Split batch normalization; returns ``(y, new_state)`` like ``batch_norm``."""
    xp = namespace(x)
    tensors = {"weight": weight, "bias": bias, "running_mean": running_mean, "running_var": running_var}
    axis = _check(x, tensors, axis, num_splits)
    tracked = (running_state(OP, x, running_mean, running_var, num_batches_tracked)
               if track_running_stats else {})
    count = tracked.get("num_batches_tracked", num_batches_tracked)
    bn = _raw(_bn.batch_norm)
    conventions = {"axis": axis, "eps": eps, "momentum": momentum, "momentum_convention": momentum_convention,
                   "running_var_correction": running_var_correction, "single_value": single_value}
    if not training:
        # Inference: the main BN alone on the whole batch (running statistics, or the batch's).
        y, _ = bn(x, _row(weight, 0), _row(bias, 0), _row(running_mean, 0), _row(running_var, 0), count,
                  training=False, track_running_stats=track_running_stats, **conventions)
        state = {"running_mean": running_mean, "running_var": running_var, "num_batches_tracked": count}
        return y, state if track_running_stats else {}
    per_channel = size(x) // int(x.shape[0]) // int(x.shape[axis])
    ys, means, variances = [], [], []
    for i, (a, b) in enumerate(_parts(x, num_splits, uneven, per_channel, single_value)):
        y_i, s_i = bn(x[a:b, ...], _row(weight, i), _row(bias, i), _row(running_mean, i),
                      _row(running_var, i), count, training=True, track_running_stats=track_running_stats,
                      **conventions)
        ys.append(y_i)
        if track_running_stats:
            means.append(s_i["running_mean"])
            variances.append(s_i["running_var"])
    y = xp.concat(ys, axis=0)
    if not track_running_stats:
        return y, {}
    return y, {"running_mean": xp.stack(means, axis=0), "running_var": xp.stack(variances, axis=0),
               "num_batches_tracked": count + 1.0}


@oracle_vjp(OP)
def split_batch_norm_vjp(
    dy: Any,
    x: Any,
    weight: Any = None,
    bias: Any = None,
    running_mean: Any = None,
    running_var: Any = None,
    num_batches_tracked: Any = None,
    *,
    num_splits: int = 2,
    uneven: str = "raise",
    training: bool = True,
    track_running_stats: bool = True,
    axis: int = 1,
    eps: float = 1e-5,
    momentum: float | None = 0.1,
    momentum_convention: str = "new_weight",
    running_var_correction: int = 1,
    single_value: str = "raise",
) -> dict[str, Any]:
    """Gradients of ``<dy, y>`` w.r.t. x and the (k, C) weight and bias (those given): block-diagonal
    BatchNorm VJPs in training, the main BN's in inference."""
    xp = namespace(x)
    tensors = {"weight": weight, "bias": bias, "running_mean": running_mean, "running_var": running_var}
    axis = _check(x, tensors, axis, num_splits)
    check_shape(OP, "dy", dy, tuple(x.shape), "the cotangent of y has the shape of x")
    bn_vjp = _raw(_bn.batch_norm_vjp)
    conventions = {"axis": axis, "eps": eps, "momentum": momentum, "momentum_convention": momentum_convention,
                   "running_var_correction": running_var_correction, "single_value": single_value}
    if not training:
        g = bn_vjp(dy, x, _row(weight, 0), _row(bias, 0), _row(running_mean, 0), _row(running_var, 0), None,
                   training=False, track_running_stats=track_running_stats, **conventions)
        pieces = [g]
        pieces += [{k: xp.zeros_like(v) for k, v in g.items() if k != "x"}] * (num_splits - 1)
        bounds = None
    else:
        per_channel = size(x) // int(x.shape[0]) // int(x.shape[axis])
        bounds = _parts(x, num_splits, uneven, per_channel, single_value)
        pieces = [bn_vjp(dy[a:b, ...], x[a:b, ...], _row(weight, i), _row(bias, i), _row(running_mean, i),
                         _row(running_var, i), None, training=True, track_running_stats=track_running_stats,
                         **conventions)
                  for i, (a, b) in enumerate(bounds)]
    grads = {"x": pieces[0]["x"] if bounds is None else xp.concat([p["x"] for p in pieces], axis=0)}
    for name, value in (("weight", weight), ("bias", bias)):
        if value is not None:
            grads[name] = xp.stack([p[name] for p in pieces], axis=0)
    return grads
