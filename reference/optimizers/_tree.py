"""Dict pytrees for the optimizers: flat parameter dicts, masks, norms, parameter groups.

The optimizers take and return **flat** dicts ``{path: array}`` (``"block1/conv/weight"``); the
human API also accepts nested dicts and returns the structure it was given (the decorator in
``reference/registry.py`` flattens with ``/`` and restores).  Leaves are float64 arrays of any
array-API namespace; scalars in the state (the step count) are 0-d arrays.

Masks say which parameters a term applies to (weight decay, a trust ratio, clipping).  They are
the pytree predicates of optax's ``mask=`` and of torch's parameter groups: a name from
:data:`MASKS` (usable from a spec or a harness case) or any callable ``(path, array) -> bool``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from reference._backend import device, namespace, size

Params = dict[str, Any]
Mask = str | Callable[[str, Any], bool]

__all__ = [
    "MASKS",
    "Params",
    "flatten",
    "global_norm",
    "mask_of",
    "norm",
    "param_groups",
    "tree_map",
    "unflatten",
    "zeros_like",
]


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Params:
    """``{"a": {"b": x}}`` -> ``{"a/b": x}``; a flat dict is returned as a (shallow) copy."""
    out: Params = {}
    for key, value in tree.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"parameter names must be non-empty strings, got {key!r}")
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, path + "/"))
        else:
            out[path] = value
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`flatten`."""
    out: dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def tree_map(fn: Callable[..., Any], tree: Params, *rest: Params) -> Params:
    """``{path: fn(tree[path], *(r[path] for r in rest))}``."""
    return {path: fn(value, *(r[path] for r in rest)) for path, value in tree.items()}


def zeros_like(params: Params) -> Params:
    return {path: namespace(x).zeros_like(x) for path, x in params.items()}


def norm(x: Any) -> Any:
    """||x||_2 over every element (a 0-d array), scaled so squares of 1e200 do not overflow."""
    xp = namespace(x)
    big = xp.max(xp.abs(x)) if size(x) else xp.asarray(0.0, dtype=xp.float64, device=device(x))
    if not (0.0 < float(big) < math.inf):
        return xp.asarray(float(big), dtype=xp.float64, device=device(x))
    return big * xp.sqrt(xp.sum((x / big) ** 2))


def global_norm(params: Params) -> Any:
    """sqrt(sum over every leaf of ||leaf||^2) (0-d), overflow-safe like :func:`norm`."""
    norms = [norm(x) for x in params.values()]
    if not norms:
        raise ValueError("global_norm of an empty parameter dict")
    xp = namespace(norms[0])
    return norm(xp.stack([xp.reshape(n, ()) for n in norms]))


def _is_norm_or_bias(path: str, x: Any) -> bool:
    leaf = path.rsplit("/", 1)[-1].lower()
    parts = [p.lower() for p in path.split("/")]
    return leaf in ("bias", "beta", "gamma", "scale") or any(
        p.startswith(("norm", "bn", "ln", "gn")) or p.endswith("norm") for p in parts[:-1])


#: Named parameter predicates.  ``ndim>=2`` is timm's and most recipes' rule (1-D tensors — biases
#: and normalization gains — get no weight decay and no trust ratio: Goyal et al. Sec. 5.1
#: practice, Nado et al.); ``no_bias_no_norm`` the same by name (optax masks written by path).
MASKS: dict[str, Callable[[str, Any], bool]] = {
    "all": lambda path, x: True,
    "none": lambda path, x: False,
    "ndim>=2": lambda path, x: x.ndim >= 2,
    "no_bias_no_norm": lambda path, x: not _is_norm_or_bias(path, x),
}


def mask_of(mask: Mask, params: Params, *, name: str = "mask") -> dict[str, bool]:
    """``{path: bool}``: where the masked term applies."""
    if isinstance(mask, str):
        if mask not in MASKS:
            raise ValueError(f"{name} must be one of {sorted(MASKS)} or a callable, got {mask!r}")
        mask = MASKS[mask]
    return {path: bool(mask(path, x)) for path, x in params.items()}


def param_groups(
    step: Callable[..., tuple[Params, dict[str, Any]]],
    groups: list[tuple[Mask, dict[str, Any]]],
) -> Callable[..., tuple[Params, dict[str, Any]]]:
    """Parameter groups with per-group hyper-parameters, as torch's ``param_groups`` and optax's
    ``multi_transform``: each parameter belongs to the first group whose mask selects it (a
    parameter no group selects is an error) and is stepped with that group's hyper-parameters
    over the keyword arguments of the call.

    The returned function has the signature of ``step``; the state is the one ``init`` builds for
    all the parameters (per-parameter slots are split and merged; global slots such as the step
    count are shared, as torch keeps one per parameter and optax one per chain — equal here).
    """

    def grouped(params: Params, grads: Params, state: dict[str, Any], **hparams: Any):
        assignment: dict[str, int] = {}
        for index, (mask, _) in enumerate(groups):
            for path, selected in mask_of(mask, params).items():
                if selected and path not in assignment:
                    assignment[path] = index
        orphans = sorted(set(params) - set(assignment))
        if orphans:
            raise ValueError(f"param_groups: no group selects parameters {orphans}")
        new_params: Params = {}
        new_state: dict[str, Any] = {}
        for index, (_, overrides) in enumerate(groups):
            paths = [p for p in params if assignment[p] == index]
            if not paths:
                continue
            sub_state = {slot: ({p: v[p] for p in paths} if isinstance(v, Mapping) else v)
                         for slot, v in state.items()}
            p_out, s_out = step({p: params[p] for p in paths}, {p: grads[p] for p in paths},
                                sub_state, **{**hparams, **overrides})
            new_params.update(p_out)
            for slot, value in s_out.items():
                if isinstance(value, Mapping):
                    new_state.setdefault(slot, {}).update(value)
                else:
                    new_state[slot] = value
        return {p: new_params[p] for p in params}, new_state

    return grouped
