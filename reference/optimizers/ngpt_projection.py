"""nGPT's weight normalization after every optimizer step (Loshchilov et al., arXiv:2410.01131).

nGPT keeps the embedding vectors and the vectors of every matrix on the unit hypersphere: after
each optimizer step the official training loop (NVIDIA/ngpt ``train.py``, ``normalize_matrices()``
right after ``optimizer.step()``, commit ed19eb2) divides each of them by its L2 norm, eps-free:

    W <- W / ||W||_axis        along the embedding dimension of each matrix

``axis`` is where the embedding dimension lies: the token embedding ``wte`` and the output
embedding ``lm_head`` (V x d), and the input projections ``query``, ``key``, ``value``, ``c_fc``
(torch ``Linear`` weights, out x d) are normalized along dim 1, each row a vector of the
embedding space; the output projections ``att_c_proj`` and ``mlp_c_proj`` (d x in) along dim 0,
each column.  Nothing else (the eigen learning rates, the scaling vectors s_qk, s_uv, s_z) is
projected.  The optimizer itself is unchanged (AdamW with weight decay 0 in the official nGPT
configuration); the projection is a separate map applied to its result, so it composes with any
step of ``reference.optimizers`` (:func:`projected`).

This is not a registered op: it has no gradient, no state and no hyper-parameter of its own; it is
a post-step rule over a parameter pytree, written with the optimizers' pytree conventions
(``reference/optimizers/_tree.py``: flat or nested dicts, a rule per path like the masks).  The
vector map is ``reference.normalizers.ngpt_norm.justnorm`` (the overflow-safe norm of
``l2_normalize``; a zero vector gives NaN, as the official code).

Precision: the official ``train.py`` justnorm computes ``x.float()`` first, so it normalizes in
float32 whatever the parameter's dtype (bfloat16 matrices, float32 embeddings; float64 weights
too); the oracle computes in the parameters' own (float64) precision.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from reference._backend import as_float64
from reference.normalizers.ngpt_norm import justnorm
from reference.optimizers._tree import Params, flatten, unflatten

__all__ = ["NGPT_AXES", "ngpt_axis", "project_to_sphere", "projected"]

AxisRule = Callable[[str, Any], "int | None"] | Mapping[str, int]

#: The official rule, by the module a weight belongs to (train.py ``normalize_matrices``).
NGPT_AXES: dict[str, int] = {"wte": 1, "lm_head": 1, "query": 1, "key": 1, "value": 1, "c_fc": 1,
                             "att_c_proj": 0, "mlp_c_proj": 0}


def ngpt_axis(path: str, x: Any) -> int | None:
    """The official nGPT rule: the axis of a ``<...>/<module>/weight`` path whose module is one
    of :data:`NGPT_AXES`, None (left alone) for every other parameter."""
    parts = path.split("/")
    if len(parts) < 2 or parts[-1] != "weight":
        return None
    return NGPT_AXES.get(parts[-2])


def _axes(rule: AxisRule, flat: Params) -> dict[str, int]:
    """``{path: axis}`` for the parameters the rule projects, each axis checked against its array."""
    if isinstance(rule, Mapping):
        unknown = sorted(set(rule) - set(flat))
        if unknown:
            raise ValueError(f"project_to_sphere: axes names parameters {unknown} that are not in params "
                             f"(known: {sorted(flat)})")
        chosen = dict(rule)
    elif callable(rule):
        chosen = {path: rule(path, x) for path, x in flat.items()}
    else:
        raise TypeError(f"project_to_sphere: axes must be a dict path -> axis or a callable (path, array) -> "
                        f"axis | None, got {type(rule).__name__}")
    out = {}
    for path, axis in chosen.items():
        if axis is None:
            continue
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise TypeError(f"project_to_sphere: the axis of {path!r} must be an int or None, got {axis!r}")
        ndim = flat[path].ndim
        if not -ndim <= axis < ndim:
            raise ValueError(f"project_to_sphere: axis={axis} of {path!r} is out of range for an array with "
                             f"{ndim} dimensions (shape {tuple(flat[path].shape)})")
        out[path] = axis % ndim
    return out


def project_to_sphere(params: Mapping[str, Any], axes: AxisRule = ngpt_axis) -> dict[str, Any]:
    """Each parameter the rule selects divided by its L2 norm along its axis (unit vectors along
    it; a zero vector gives NaN); the others returned as they are (the same arrays).  ``params``
    flat ``{path: array}`` or nested (returned in the structure given), promoted to float64."""
    nested = any(isinstance(v, Mapping) for v in params.values())
    flat = {path: as_float64(x, path, op="project_to_sphere")[0] for path, x in flatten(params).items()}
    chosen = _axes(axes, flat)
    out = {path: (justnorm(x, chosen[path])[0] if path in chosen else x) for path, x in flat.items()}
    return unflatten(out) if nested else out


def projected(step: Callable[..., tuple[Params, dict[str, Any]]], axes: AxisRule = ngpt_axis
              ) -> Callable[..., tuple[Params, dict[str, Any]]]:
    """``step`` followed by :func:`project_to_sphere`: the official ``optimizer.step();
    normalize_matrices()``.  The returned function has ``step``'s signature; the optimizer state is
    its own, untouched by the projection (the moments of AdamW are not projected)."""

    def stepped(params: Params, grads: Params, state: dict[str, Any], **hparams: Any):
        new_params, new_state = step(params, grads, state, **hparams)
        return project_to_sphere(new_params, axes), new_state

    return stepped
