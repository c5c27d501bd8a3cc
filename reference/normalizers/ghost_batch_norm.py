"""Ghost Batch Normalization (Hoffer, Hubara & Soudry, 2017, arXiv:1705.08741, "Train longer,
generalize better"; Goyal et al.'s per-worker BatchNorm, arXiv:1706.02677, has the same semantics).

The batch (axis 0, N samples) is cut into ghost batches G_1, ..., G_k of about
``virtual_batch_size`` samples and each is batch-normalized on its own.  Per ghost batch g and
channel c, over R_g = the samples of G_g and every axis but the channel axis (n_g values):

    mu_gc = mean_{R_g} x,   var_gc = mean_{R_g} (x - mu_gc)^2              (biased, as BN Alg. 1)
    x_hat = (x - mu_gc) / sqrt(var_gc + eps),   y = gamma_c x_hat + beta_c  (gamma, beta shared)

so ``y = concat_g batch_norm_train(x[G_g])``.  Inference with running statistics is BatchNorm's
affine map (no ghost batches: every framework's eval is plain BN eval).

Which samples form a ghost batch (``split``; the frameworks differ, read from their sources):

* ``chunk_floor`` (Hoffer's bigBatch main_gbn.py): ``x.chunk(N // vbs)``, i.e. k = N // vbs
  contiguous chunks of ceil(N / k) samples, the last one smaller.  torch.chunk may return fewer
  than k chunks (N = 9, vbs = 2: chunk(4) gives 3 chunks of 3).  N < vbs is an error (chunk(0)).
* ``chunk_ceil`` (Composer, pytorch-tabnet): ``x.chunk(ceil(N / vbs))``: exactly k = ceil(N / vbs)
  contiguous chunks of ceil(N / k) <= vbs samples, the last one smaller (N = 9, vbs = 4: 3, 3, 3).
* ``fixed``: ``x.split(vbs)``, chunks of exactly vbs samples and a smaller last one (several
  third-party TabNet ports; no framework dialect).
* ``strided`` (tf.keras ``virtual_batch_size``, cifar10-fast ``GhostBatchNorm``): N must be a
  multiple of vbs; tf.keras reshapes x to (vbs, N // vbs, ...) and reduces over the first axis, so
  ghost batch j holds the samples i with i mod k = j (k = N // vbs): strided, not contiguous.
  cifar10-fast's ``view(-1, C * k, H, W)`` makes the same groups.

``small_batch = "raise"`` refuses N < vbs in every mode, training or not (Composer's
``ValueError``); ``"allow"`` makes such a batch one ghost batch where the split allows it.

Running statistics (``running_update``): with b_g = (mu_g, var_g * n_g / max(n_g - correction, 1))
the ghost batches' statistics and ``update(r, b, m)`` BatchNorm's recurrence (``_stats.running_average``,
its ``momentum_convention``, ``momentum=None`` a cumulative average over ``num_batches_tracked``):

* ``sequential``: ``r <- update(r, b_g, m)`` for g = 1..k in order, num_batches_tracked += k (what
  calling a torch BatchNorm module once per chunk does: Hoffer, Composer, tabnet).  With
  ``chunk_momentum = "divided"`` every update uses m / k_requested (Composer divides the momentum
  by its ``nchunks`` before the per-chunk calls).  Closed form, new_weight convention:
  ``r_k = (1 - m)^k r_0 + sum_g m (1 - m)^(k - g) b_g``.
* ``averaged``: one ``r <- update(r, mean_g b_g, m)``, num_batches_tracked += 1 (tf.keras: "more
  efficient to just update in one step"; cifar10-fast keeps one EMA per ghost batch and averages
  them when switching to eval, the same thing since the EMA is linear).  The mean over ghost
  batches is unweighted (tf.keras ``reduce_mean`` over the ghost axis), and mean_g var_g is the
  within-ghost-batch variance: it lacks the spread of the ghost means that a whole-batch variance
  has.

Backward.  The ghost batches do not interact, so the Jacobian is block-diagonal over them: per
ghost batch, VJP-STD(R_g) with ``h = gamma * dy`` (from d x_hat_i / d x_j = inv_std (delta_ij - 1/n_g)
- inv_std x_hat_i x_hat_j / n_g for i, j in the same ghost batch, 0 across ghost batches):

    dx|G_g = inv_std_g (h - mean_{R_g} h - x_hat mean_{R_g}(h x_hat))

``dgamma_c = sum_{N, R} dy x_hat`` and ``dbeta_c = sum_{N, R} dy`` over the whole batch (gamma, beta
are shared).  Inference with running statistics: ``dx = dy gamma / sqrt(running_var + eps)``.
Hoffer's training loop backpropagates each chunk's loss and divides the summed gradients by the
number of chunks: that scales the loss, upstream of this layer, and does not change its VJP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from reference._backend import device, namespace
from reference._common import check_channel_params, check_shape, fail
from reference.normalizers._stats import (
    affine,
    expand_to,
    other_axes,
    reduction_size,
    running_average,
    running_standardize,
    running_state,
    standardize,
    standardize_vjp,
)
from reference.normalizers.batch_norm import _uses_batch_stats
from reference.normalizers.batch_norm import init_state as batch_norm_init_state
from reference.registry import oracle_function, oracle_vjp

OP = "ghost_batch_norm"


@dataclass(frozen=True)
class GhostLayout:
    """Which samples form each ghost batch.

    ``order`` (None: the identity) lists the samples ghost batch by ghost batch; ghost batch g is
    ``order[bounds[g][0]:bounds[g][1]]``.  ``requested`` is the chunk count the framework asked
    for (torch.chunk's argument), which Composer divides the momentum by.
    """

    order: tuple[int, ...] | None
    bounds: tuple[tuple[int, int], ...]
    requested: int

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in self.bounds)


def _contiguous(n: int, size: int) -> tuple[tuple[int, int], ...]:
    return tuple((a, min(a + size, n)) for a in range(0, n, size))


def ghost_layout(n: int, virtual_batch_size: int, split: str, small_batch: str = "allow") -> GhostLayout:
    """The ghost batches of a batch of ``n`` samples (module docstring, ``split``)."""
    vbs = int(virtual_batch_size)
    if vbs < 1:
        fail(OP, f"virtual_batch_size must be a positive int, got {virtual_batch_size}")
    if n < vbs and small_batch == "raise":
        fail(OP, f"the batch has {n} samples, fewer than virtual_batch_size={vbs} "
                 f"(small_batch='raise', Composer's check)")
    if split == "chunk_floor":
        k = n // vbs
        if k == 0:
            fail(OP, f"split='chunk_floor' makes {n} // {vbs} = 0 ghost batches: the batch needs "
                     f"at least virtual_batch_size={vbs} samples, got {n}")
        return GhostLayout(None, _contiguous(n, -(-n // k)), k)
    if split == "chunk_ceil":
        k = -(-n // vbs)
        return GhostLayout(None, _contiguous(n, -(-n // k)), k)
    if split == "fixed":
        bounds = _contiguous(n, vbs)
        return GhostLayout(None, bounds, len(bounds))
    if split == "strided":
        if n % vbs:
            fail(OP, f"split='strided' needs virtual_batch_size={vbs} to divide the batch size, "
                     f"got {n} samples")
        k = n // vbs
        order = tuple(j + a * k for j in range(k) for a in range(vbs))
        return GhostLayout(order, tuple((j * vbs, (j + 1) * vbs) for j in range(k)), k)
    fail(OP, f"unknown split {split!r}")
    raise AssertionError  # unreachable: fail raises


def _check(x: Any, weight: Any, bias: Any, running_mean: Any, running_var: Any, axis: int) -> int:
    params = {"weight": weight, "bias": bias, "running_mean": running_mean, "running_var": running_var}
    return check_channel_params(OP, x, axis, params, min_ndim=2, not_batch=True)


def _reorder(xp: Any, v: Any, order: tuple[int, ...] | None, *, inverse: bool = False) -> Any:
    """``v`` with its samples in ghost-batch order (or back, ``inverse``)."""
    if order is None:
        return v
    if inverse:
        back = [0] * len(order)
        for pos, i in enumerate(order):
            back[i] = pos
        order = tuple(back)
    return xp.take(v, xp.asarray(order, dtype=xp.int64, device=device(v)), axis=0)


def _per_ghost(xp: Any, x: Any, layout: GhostLayout, R: tuple[int, ...], eps: float, training: bool,
               single_value: str) -> list[tuple[Any, Any, Any, Any, int]]:
    """``[(x_hat, inv_std, mean, biased_var, n)]`` per ghost batch, x in ghost-batch order."""
    out = []
    for a, b in layout.bounds:
        xg = x[a:b, ...]
        n = reduction_size(xg, R)
        if training and n == 1 and single_value == "raise":
            fail(OP, f"expected more than 1 value per channel when training, got a ghost batch of "
                     f"shape {tuple(xg.shape)} (ghost batch sizes {layout.sizes}; set "
                     f"single_value='allow' for the Keras/TF behaviour)")
        x_hat, inv_std, mean, var = standardize(xg, R, eps)
        out.append((x_hat, inv_std, mean, var, n))
    return out


def init_state(x: Any, *, axis: int = 1, track_running_stats: bool = True) -> dict[str, Any]:
    """BatchNorm's initial state (running mean 0, variance 1, no batches), after Ghost BN's own
    checks (so a bad ``x`` is reported under this op's name)."""
    _check(x, None, None, None, None, axis)
    return batch_norm_init_state(x, axis=axis, track_running_stats=track_running_stats)


def _update_running(
    xp: Any, state: dict[str, Any], ghosts: list[tuple[Any, Any, Any, Any, int]], layout: GhostLayout,
    running_update: str, chunk_momentum: str, momentum: float | None, momentum_convention: str,
    running_var_correction: int,
) -> dict[str, Any]:
    means = [xp.reshape(g[2], (-1,)) for g in ghosts]
    variances = [xp.reshape(g[3], (-1,)) * (g[4] / max(g[4] - running_var_correction, 1)) for g in ghosts]
    rm, rv, count = state["running_mean"], state["running_var"], state["num_batches_tracked"]
    if running_update == "averaged":
        count = count + 1.0
        k = len(ghosts)
        rm = running_average(rm, sum(means[1:], means[0]) / k, count, momentum, momentum_convention)
        rv = running_average(rv, sum(variances[1:], variances[0]) / k, count, momentum,
                             momentum_convention)
    else:
        m = momentum
        if chunk_momentum == "divided" and momentum is not None:
            m = momentum / layout.requested
        for mean, var in zip(means, variances, strict=True):
            count = count + 1.0
            rm = running_average(rm, mean, count, m, momentum_convention)
            rv = running_average(rv, var, count, m, momentum_convention)
    return {"running_mean": rm, "running_var": rv, "num_batches_tracked": count}


@oracle_function(OP)
def ghost_batch_norm(
    x: Any,
    weight: Any = None,
    bias: Any = None,
    running_mean: Any = None,
    running_var: Any = None,
    num_batches_tracked: Any = None,
    *,
    virtual_batch_size: int = 32,
    split: str = "chunk_ceil",
    small_batch: str = "allow",
    running_update: str = "sequential",
    chunk_momentum: str = "same",
    training: bool = True,
    track_running_stats: bool = True,
    axis: int = 1,
    eps: float = 1e-5,
    momentum: float | None = 0.1,
    momentum_convention: str = "new_weight",
    running_var_correction: int = 1,
    single_value: str = "raise",
) -> tuple[Any, dict[str, Any]]:
    """Ghost batch normalization; returns ``(y, new_state)`` like ``batch_norm``."""
    xp = namespace(x)
    axis = _check(x, weight, bias, running_mean, running_var, axis)
    n_samples = int(x.shape[0])
    if n_samples < virtual_batch_size and small_batch == "raise":
        ghost_layout(n_samples, virtual_batch_size, split, small_batch)  # raises, in eval too
    state = (running_state(OP, x, running_mean, running_var, num_batches_tracked)
             if track_running_stats else {})
    if not _uses_batch_stats(training, track_running_stats):
        x_hat, _ = running_standardize(x, running_mean, running_var, eps, axis)
        return affine(x_hat, weight, bias, axis), state

    layout = ghost_layout(n_samples, virtual_batch_size, split, small_batch)
    R = other_axes(x.ndim, axis)
    ghosts = _per_ghost(xp, _reorder(xp, x, layout.order), layout, R, eps, training, single_value)
    x_hat = _reorder(xp, xp.concat([g[0] for g in ghosts], axis=0), layout.order, inverse=True)
    if training and track_running_stats:
        state = _update_running(xp, state, ghosts, layout, running_update, chunk_momentum, momentum,
                                momentum_convention, running_var_correction)
    return affine(x_hat, weight, bias, axis), state


@oracle_vjp(OP)
def ghost_batch_norm_vjp(
    dy: Any,
    x: Any,
    weight: Any = None,
    bias: Any = None,
    running_mean: Any = None,
    running_var: Any = None,
    num_batches_tracked: Any = None,
    *,
    virtual_batch_size: int = 32,
    split: str = "chunk_ceil",
    small_batch: str = "allow",
    running_update: str = "sequential",
    chunk_momentum: str = "same",
    training: bool = True,
    track_running_stats: bool = True,
    axis: int = 1,
    eps: float = 1e-5,
    momentum: float | None = 0.1,
    momentum_convention: str = "new_weight",
    running_var_correction: int = 1,
    single_value: str = "raise",
) -> dict[str, Any]:
    """Gradients of ``<dy, y>`` w.r.t. x, weight and bias (those given): block-diagonal VJP-STD."""
    xp = namespace(x)
    axis = _check(x, weight, bias, running_mean, running_var, axis)
    check_shape(OP, "dy", dy, tuple(x.shape), "the cotangent of y has the shape of x")
    n_samples = int(x.shape[0])
    if n_samples < virtual_batch_size and small_batch == "raise":
        ghost_layout(n_samples, virtual_batch_size, split, small_batch)
    R = other_axes(x.ndim, axis)
    gamma = 1.0 if weight is None else expand_to(weight, x.ndim, axis)
    if _uses_batch_stats(training, track_running_stats):
        layout = ghost_layout(n_samples, virtual_batch_size, split, small_batch)
        ghosts = _per_ghost(xp, _reorder(xp, x, layout.order), layout, R, eps, training, single_value)
        dys = _reorder(xp, dy, layout.order)
        pieces = [
            standardize_vjp(gamma * dys[a:b, ...], x_hat, inv_std, R)
            for (a, b), (x_hat, inv_std, _, _, _) in zip(layout.bounds, ghosts, strict=True)
        ]
        dx = _reorder(xp, xp.concat(pieces, axis=0), layout.order, inverse=True)
        x_hat = _reorder(xp, xp.concat([g[0] for g in ghosts], axis=0), layout.order, inverse=True)
    else:
        x_hat, inv_std = running_standardize(x, running_mean, running_var, eps, axis)
        dx = dy * (gamma * inv_std)
    grads = {"x": dx}
    if weight is not None:
        grads["weight"] = xp.reshape(xp.sum(dy * x_hat, axis=R), (-1,))
    if bias is not None:
        grads["bias"] = xp.reshape(xp.sum(dy, axis=R), (-1,))
    return grads
