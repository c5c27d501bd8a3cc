"""Spectral Normalization (Miyato, Kataoka, Koyama & Yoshida, 2018, arXiv:1802.05957).

A reparametrization of a weight tensor, no activations involved.  The layer uses

    W_SN(W) = W / sigma(W),   sigma(W) = max_{||h|| = 1} ||W h||_2      (Eq. 7-8)

the weight divided by its largest singular value, estimated by power iteration.  The weight is
viewed as a matrix ``W_mat``: the axis ``dim`` moved to the front, the rest flattened,
``(rows, cols) = (W.shape[dim], W.size / W.shape[dim])`` (``dim=0`` for ``(out, in, ...)``
weights; ``dim=1`` for PyTorch's ConvTranspose ``(in, out, ...)``; ``dim=-1`` for Flax/Keras
``(..., in, out)`` kernels, whose ``reshape(-1, out)`` matrix is the transpose of ours).  A 1-D
weight of length n is the ``(n, 1)`` matrix, whose spectral norm is its Euclidean norm.

State: ``u`` (length rows) and ``v`` (length cols), the estimates of the first left and right
singular vectors, carried from call to call.  One call runs ``n_power_iterations`` steps of
Algorithm 1 from the stored vectors and then

    sigma = u^T W_mat v,   w = W / sigma                                (Alg. 1, Eq. 8)

Power-iteration conventions (dialects.md §3b), all explicit keywords:

* ``iteration_order="v_then_u"`` (Algorithm 1, the official Chainer ``max_singular_value``,
  torch's legacy ``utils.spectral_norm``, Flax, Keras): ``v <- N(W^T u); u <- N(W v)``, u last.
  ``"u_then_v"`` (torch ``parametrizations.spectral_norm``): ``u <- N(W v); v <- N(W^T u)``,
  v last.  The two give different u, v and sigma after a finite number of steps (they agree only
  at the fixed point), so a knob is needed.  Flax/Keras write ``v0 = N(u0 K^T); u0 = N(v0 K)``
  with ``K = reshape(kernel, (-1, out))``; since ``K = W_mat^T`` for ``dim=-1`` this is exactly
  ``v <- N(W_mat^T u); u <- N(W_mat v)``: their u is ours, their order is v_then_u.
* ``normalize`` N: ``"add"`` ``x / (||x|| + eps)`` (official Chainer ``_l2normalize``);
  ``"max"`` ``x / max(||x||, eps)`` (torch ``F.normalize``, Keras ``ops.normalize``);
  ``"rsqrt"`` ``x * rsqrt(sum x^2 + eps)`` (Flax ``_l2_normalize``).
* ``eval_mode`` (``training=False``): ``"frozen"`` uses the stored u, v without iterating and
  keeps them (torch); ``"iterate_no_store"`` iterates from the stored vectors but returns the
  state unchanged (Flax ``update_stats=False``, Chainer ``SNConvolution2D``);
  ``"iterate_store"`` iterates and stores as in training (Chainer ``SNLinear``/``SNConvolutionND``,
  which update u on every access); ``"stored_kernel"`` applies no normalization (Keras, whose
  training call overwrites the kernel variable with W/sigma, so that eval uses it as is):
  ``w = W``, ``sigma = 1``.
* ``gradient``: ``"through_sigma"`` (Eq. 12; every framework but Keras) or
  ``"straight_through"`` (Keras: the kernel is overwritten outside the tape and the layer is
  differentiated w.r.t. that variable, so ``dW = dw`` and sigma is not differentiated).
* ``training=True`` always iterates and stores.  ``n_power_iterations=0`` uses the stored vectors.

Backward (Eq. 9-12).  Every implementation treats u and v as constants (Chainer passes raw
arrays, torch computes them under ``no_grad``, Flax/Keras ``stop_gradient``), and so does the
paper's derivation, where u_1, v_1 are the exact singular vectors.  With ``G = dL/dw`` in matrix
form, ``d sigma / dW_ij = u_i v_j`` (sigma = u^T W v is linear in W), hence

    dW = G / sigma - (<G, W_mat> / sigma^2) u v^T + dsigma u v^T          (Eq. 12)

(Eq. 12's lambda = <G, W_SN> = <G, W>/sigma), reshaped back to W's shape, where ``dsigma`` is the
cotangent of the ``sigma`` output (absent = 0).  ``<dW, W> = dsigma * sigma``: without dsigma
the gradient is orthogonal to W, as the scale invariance W_SN(aW) = W_SN(W) demands.  This is
the exact derivative of the forward only when u, v are exact singular vectors (then du, dv drop
out to first order); after a finite number of steps from other vectors the forward's true
derivative also has terms through u(W), v(W), which every framework drops.  The spec therefore
declares ``backward = "custom"``.

Initial state (:func:`init_state`).  torch draws u, v from N(0, 1), normalizes them and runs 15
power iterations at registration to approach the singular vectors; Chainer, Flax and Keras start
from a random u with no warm-up.  The oracle uses the limit of that warm-up: the exact first
singular pair from an SVD, signed so that v's largest-magnitude entry is positive (LAPACK's sign
is arbitrary).  It is deterministic, gives ``sigma = ||W_mat||_2`` at the start, and makes the
detached backward the exact derivative (so finite differences can judge it).  Harnesses that
compare a framework pass that framework's u, v as explicit state instead.

Accuracy.  ``||x||`` is scaled by max|x| (the LAPACK dnrm2 idea): NumPy's
``linalg.vector_norm`` (2.4) squares unscaled and overflows once |x| ~ 1e154, so the array-API
norm is not used.  For ``"rsqrt"`` the root ``sqrt(||x||^2 + eps)`` is ``hypot(||x||, sqrt eps)``.
sigma is evaluated as the inner product with the vector the last step produced
(``<W^T u, v>`` after u_then_v, ``<u, W v>`` after v_then_u), whose terms are all >= 0, so it
has no cancellation; it equals ``u^T W v`` exactly in exact arithmetic.
"""

from __future__ import annotations

import math
from typing import Any

from reference._backend import device, namespace
from reference._common import check_ndim, check_nonempty, check_shape, fail, normalize_axis
from reference.normalizers._stats import l2_norm
from reference.registry import oracle_function, oracle_vjp

OP = "spectral_norm"


# --------------------------------------------------------------------------------------------
# The weight as a matrix
# --------------------------------------------------------------------------------------------


def _permutation(ndim: int, dim: int) -> tuple[int, ...]:
    """Axes order that moves ``dim`` to the front (torch ``_reshape_weight_to_matrix``)."""
    return (dim,) + tuple(a for a in range(ndim) if a != dim)


def as_matrix(weight: Any, dim: int) -> Any:
    """``W_mat``: ``dim`` moved to the front, the other axes flattened (C order)."""
    xp = namespace(weight)
    moved = xp.permute_dims(weight, _permutation(weight.ndim, dim))
    return xp.reshape(moved, (int(weight.shape[dim]), -1))


def from_matrix(mat: Any, shape: tuple[int, ...], dim: int) -> Any:
    """Inverse of :func:`as_matrix` for a weight of ``shape``."""
    xp = namespace(mat)
    perm = _permutation(len(shape), dim)
    moved = xp.reshape(mat, tuple(shape[a] for a in perm))
    inverse = tuple(perm.index(a) for a in range(len(shape)))
    return xp.permute_dims(moved, inverse)


def _check(weight: Any, u: Any, v: Any, dim: int) -> int:
    check_ndim(OP, "weight", weight, min_ndim=1)
    check_nonempty(OP, "weight", weight)
    dim = normalize_axis(OP, "dim", dim, weight.ndim)
    rows = int(weight.shape[dim])
    cols = math.prod(int(size) for size in weight.shape) // rows
    why = f"weight of shape {tuple(weight.shape)} is a ({rows}, {cols}) matrix with dim={dim}"
    check_shape(OP, "u", u, (rows,), why)
    check_shape(OP, "v", v, (cols,), why)
    return dim


# --------------------------------------------------------------------------------------------
# Power iteration (Algorithm 1)
# --------------------------------------------------------------------------------------------


def vector_norm(x: Any) -> Any:
    """``||x||_2`` of a vector as a 0-d array, overflow-safe (see ``_stats.l2_norm``)."""
    return namespace(x).reshape(l2_norm(x), ())


def l2_normalize(x: Any, normalize: str, eps: float) -> Any:
    """The normalization N(x) of one power-iteration step, in the chosen convention."""
    xp = namespace(x)
    norm = vector_norm(x)
    if normalize == "max":  # torch F.normalize, Keras ops.normalize
        return x / xp.maximum(norm, xp.asarray(eps, dtype=norm.dtype, device=device(norm)))
    if normalize == "add":  # official Chainer _l2normalize: eps outside the norm
        return x / (norm + eps)
    # Flax: x * rsqrt(sum x^2 + eps) = x / hypot(||x||, sqrt(eps)), without squaring ||x||.
    return x / xp.hypot(norm, xp.sqrt(xp.asarray(eps, dtype=norm.dtype, device=device(norm))))


def power_iteration(
    W_mat: Any, u: Any, v: Any, steps: int, *, iteration_order: str, normalize: str, eps: float
) -> tuple[Any, Any, Any]:
    """``steps`` steps of Algorithm 1 from ``(u, v)``; returns ``(u, v, sigma = u^T W_mat v)``."""
    xp = namespace(W_mat)
    W_T = xp.matrix_transpose(W_mat)
    last_product = None  # the un-normalized vector the last half-step produced
    for _ in range(steps):
        if iteration_order == "u_then_v":  # torch parametrizations: u first, v last
            u = l2_normalize(xp.matmul(W_mat, v), normalize, eps)
            last_product = xp.matmul(W_T, u)
            v = l2_normalize(last_product, normalize, eps)
        else:  # Algorithm 1 / Chainer / Flax / Keras: v first, u last
            v = l2_normalize(xp.matmul(W_T, u), normalize, eps)
            last_product = xp.matmul(W_mat, v)
            u = l2_normalize(last_product, normalize, eps)
    # sigma = u^T W v, evaluated against the last product: each term is a square (no cancellation).
    if last_product is None:
        sigma = xp.vecdot(u, xp.matmul(W_mat, v))
    elif iteration_order == "u_then_v":
        sigma = xp.vecdot(last_product, v)  # (W^T u)^T v
    else:
        sigma = xp.vecdot(u, last_product)  # u^T (W v)
    return u, v, xp.asarray(sigma)


def init_state(weight: Any, *, dim: int = 0) -> dict[str, Any]:
    """The exact first singular pair of ``W_mat`` (the limit of torch's warm-up iterations).

    Signed so that the largest-magnitude entry of v is positive (then u = W v / sigma).
    """
    xp = namespace(weight)
    dim = _check(weight, None, None, dim)
    W_mat = as_matrix(weight, dim)
    U, _, Vh = xp.linalg.svd(W_mat, full_matrices=False)
    u, v = U[:, 0], Vh[0, :]
    sign = xp.sign(v[int(xp.argmax(xp.abs(v)))])
    return {"u": sign * u, "v": sign * v}


# --------------------------------------------------------------------------------------------
# Forward and backward
# --------------------------------------------------------------------------------------------


def _forward(weight: Any, u: Any, v: Any, hp: dict[str, Any]) -> tuple[Any, ...]:
    """``(w, sigma, u_used, v_used, new_state, W_mat, dim, normalized)`` of one call."""
    xp = namespace(weight)
    dim = _check(weight, u, v, hp["dim"])
    if u is None or v is None:  # a missing vector starts at the exact singular vector
        start = init_state(weight, dim=dim)
        u = start["u"] if u is None else u
        v = start["v"] if v is None else v
    W_mat = as_matrix(weight, dim)
    training, eval_mode = hp["training"], hp["eval_mode"]
    if not training and eval_mode == "stored_kernel":
        # Keras: the kernel variable already holds W / sigma from the last training call.
        one = xp.asarray(1.0, dtype=weight.dtype, device=device(weight))
        return weight, one, u, v, {"u": u, "v": v}, W_mat, dim, False
    iterate = training or eval_mode in ("iterate_no_store", "iterate_store")
    store = training or eval_mode == "iterate_store"
    steps = hp["n_power_iterations"] if iterate else 0
    u_new, v_new, sigma = power_iteration(
        W_mat, u, v, steps, iteration_order=hp["iteration_order"], normalize=hp["normalize"],
        eps=hp["eps"])
    if bool(sigma == 0):
        fail(OP, "sigma = u^T W v is 0 (a zero weight, or u, v orthogonal to it), so W / sigma "
                 "is undefined (torch returns NaN; Flax and Keras return the weight unchanged)")
    state = {"u": u_new, "v": v_new} if store else {"u": u, "v": v}
    return weight / sigma, sigma, u_new, v_new, state, W_mat, dim, True


@oracle_function(OP)
def spectral_norm(
    weight: Any,
    u: Any = None,
    v: Any = None,
    *,
    training: bool = True,
    dim: int = 0,
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    normalize: str = "add",
    iteration_order: str = "v_then_u",
    eval_mode: str = "frozen",
    gradient: str = "through_sigma",
) -> tuple[tuple[Any, Any], dict[str, Any]]:
    """Spectral normalization; returns ``((w, sigma), new_state)``.

    ``w = weight / sigma`` has the weight's shape, ``sigma`` is 0-d, ``new_state`` holds ``u``
    and ``v`` (updated when the call stores, the given vectors otherwise).  A missing u or v
    starts at the exact singular vector (:func:`init_state`).
    """
    hp = dict(training=training, dim=dim, n_power_iterations=n_power_iterations,
              eval_mode=eval_mode, iteration_order=iteration_order, normalize=normalize, eps=eps)
    w, sigma, _, _, state, _, _, _ = _forward(weight, u, v, hp)
    return (w, sigma), state


@oracle_vjp(OP)
def spectral_norm_vjp(
    dw: Any,
    dsigma: Any,
    weight: Any,
    u: Any = None,
    v: Any = None,
    *,
    training: bool = True,
    dim: int = 0,
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    normalize: str = "add",
    iteration_order: str = "v_then_u",
    eval_mode: str = "frozen",
    gradient: str = "through_sigma",
) -> dict[str, Any]:
    """Gradient w.r.t. the weight of ``<dw, w> + dsigma * sigma``, u and v held constant."""
    xp = namespace(weight)
    hp = dict(training=training, dim=dim, n_power_iterations=n_power_iterations,
              eval_mode=eval_mode, iteration_order=iteration_order, normalize=normalize, eps=eps)
    if dw is not None:
        check_shape(OP, "dw", dw, tuple(weight.shape), "the cotangent of w has the weight's shape")
    if dsigma is not None:
        check_shape(OP, "dsigma", dsigma, (), "the cotangent of sigma is a scalar")
    _, sigma, u_used, v_used, _, W_mat, dim, normalized = _forward(weight, u, v, hp)
    G = dw if dw is not None else xp.zeros_like(weight)
    if not normalized or gradient == "straight_through":
        # stored_kernel: w = W, sigma = 1 (constant).  Keras training: dW = dw, sigma not
        # differentiated.
        return {"weight": G}
    G_mat = as_matrix(G, dim)
    # Eq. 12: lambda / sigma = <G, W_SN> / sigma = <G, W> / sigma^2, minus dsigma (d sigma/dW = u v^T).
    coeff = xp.sum(G_mat * W_mat) / (sigma * sigma)
    if dsigma is not None:
        coeff = coeff - dsigma
    u_vT = xp.reshape(u_used, (-1, 1)) * xp.reshape(v_used, (1, -1))
    dW_mat = G_mat / sigma - coeff * u_vT
    return {"weight": from_matrix(dW_mat, tuple(weight.shape), dim)}
