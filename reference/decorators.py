"""The decorators binding an oracle function to its spec (the human API).

``@oracle_function(name)`` / ``@oracle_vjp(name)`` wrap an op's forward and VJP, and
``@oracle_optimizer(name)`` an optimizer's ``init`` and ``step``: the keyword hyper-parameters
are validated against the spec (its defaults, types and domains), array arguments promoted to
float64 (labels and masks checked as int64 / bool), and the raw function stays reachable as
``__wrapped__`` (the harness's same-precision baseline calls it on float32 arrays).  Binding a
spec to its functions for the harness is :mod:`reference.registry`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from reference._backend import as_discrete, as_float64, is_array
from reference.spec import Spec, all_specs

__all__ = ["oracle_function", "oracle_optimizer", "oracle_vjp"]


# --------------------------------------------------------------------------------------------
# Decorators for the human API
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Signature:
    """A decorated function's parameters, read once (binding a call is on every oracle call)."""

    sig: inspect.Signature
    positional: tuple[str, ...]   # positional-or-keyword, in order
    kw_only: tuple[str, ...]      # the hyper-parameters
    required: frozenset[str]      # parameters without a default

    @classmethod
    def of(cls, fn: Callable[..., Any]) -> _Signature:
        sig = inspect.signature(fn)
        params = sig.parameters.values()
        return cls(sig, tuple(p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD),
                   tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY),
                   frozenset(p.name for p in params if p.default is p.empty))

    def arguments(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any] | None:
        """What ``sig.bind`` would give for a well-formed call; None for any other call (then
        ``sig.bind`` runs and raises its own message)."""
        if len(args) > len(self.positional):
            return None
        out = dict(zip(self.positional, args, strict=False))
        for key, value in kwargs.items():
            if key in out or (key not in self.kw_only and key not in self.positional):
                return None
            out[key] = value
        return out if self.required.issubset(out) else None


def _bind(op_name: str, signature: _Signature, args: tuple[Any, ...], kwargs: dict[str, Any]
          ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The call's arguments, and its keyword hyper-parameters validated by the op's spec."""
    arguments = signature.arguments(args, kwargs)
    if arguments is None:
        try:
            arguments = dict(signature.sig.bind(*args, **kwargs).arguments)
        except TypeError as exc:
            raise TypeError(f"{op_name}: {exc}") from None
    spec = all_specs()[op_name]
    return arguments, spec.resolve({k: arguments[k] for k in signature.kw_only if k in arguments})


def _wrap(op_name: str, kind: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        signature = _Signature.of(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            arguments, hp = _bind(op_name, signature, args, kwargs)
            discrete = {t.name: t.dtype for t in all_specs()[op_name].inputs if t.dtype != "float64"}
            arrays = {}
            for key, value in arguments.items():
                if key in hp:
                    continue
                if value is None:
                    arrays[key] = None
                elif key in discrete:
                    arrays[key] = as_discrete(value, key, discrete[key], op=op_name)
                elif is_array(value) or isinstance(value, (list, tuple, float, int)):
                    arrays[key], _ = as_float64(value, key, op=op_name)
                else:
                    raise TypeError(
                        f"{op_name}: {key} must be an array, got {type(value).__name__}"
                    )
            return fn(**arrays, **hp)

        wrapper.__normref_op__ = (op_name, kind)  # type: ignore[attr-defined]
        return wrapper

    return decorate


def oracle_optimizer(op_name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate an optimizer's ``init(params, *, hp)`` or ``step(params, grads, state, *, hp)``.

    Validates the keyword hyper-parameters against the spec, accepts nested dict pytrees
    (flattened with ``/``; results come back in the structure given), and promotes every leaf of
    params, grads and the state's per-parameter slots to float64.  Parameter and gradient paths
    and shapes must agree.  The raw function (no promotion) is ``__wrapped__``.
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        signature = _Signature.of(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            from reference.optimizers._tree import flatten, unflatten

            arguments, hp = _bind(op_name, signature, args, kwargs)
            spec = all_specs()[op_name]
            given = arguments["params"]
            if not isinstance(given, Mapping) or not given:
                raise TypeError(f"{op_name}: params must be a non-empty dict of arrays, "
                                f"got {type(given).__name__}")
            nested = any(isinstance(v, Mapping) for v in given.values())
            params = _promote_tree(op_name, "params", flatten(given))
            call = {"params": params}
            if "grads" in arguments:
                grads_in = arguments["grads"]
                if not isinstance(grads_in, Mapping):
                    raise TypeError(f"{op_name}: grads must be a dict of arrays, got "
                                    f"{type(grads_in).__name__}")
                grads = _promote_tree(op_name, "grads", flatten(grads_in))
                if set(grads) != set(params):
                    raise ValueError(f"{op_name}: grads must have the parameters' paths "
                                     f"{sorted(params)}, got {sorted(grads)}")
                for path, g in grads.items():
                    if tuple(g.shape) != tuple(params[path].shape):
                        raise ValueError(f"{op_name}: grads[{path!r}] must have shape "
                                         f"{tuple(params[path].shape)}, got {tuple(g.shape)}")
                call["grads"] = grads
            if "state" in arguments:
                call["state"] = _promote_state(spec, arguments["state"], params)
            result = fn(**call, **hp)
            if not nested:
                return result
            if isinstance(result, tuple):
                new_params, new_state = result
                return unflatten(new_params), _nest_state(spec, new_state)
            return _nest_state(spec, result)

        wrapper.__normref_op__ = (op_name, "optimizer")  # type: ignore[attr-defined]
        return wrapper

    return decorate


def _promote_tree(op: str, name: str, tree: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for path, value in tree.items():
        if value is None:
            raise TypeError(f"{op}: {name}[{path!r}] is None")
        out[path], _ = as_float64(value, f"{name}[{path!r}]", op=op)
    return out


def _promote_state(spec: Spec, state: Any, params: Mapping[str, Any]) -> dict[str, Any]:
    from reference.optimizers._tree import flatten

    if not isinstance(state, Mapping):
        raise TypeError(f"{spec.name}: state must be a dict (from init), got {type(state).__name__}")
    slots = {s.name: s for s in spec.state}
    out: dict[str, Any] = {}
    for key, value in state.items():
        if key not in slots:
            raise TypeError(f"{spec.name}: unknown state slot {key!r}; slots are {sorted(slots)}")
        if slots[key].per == "param":
            if not isinstance(value, Mapping):
                raise TypeError(f"{spec.name}: state[{key!r}] must be a dict per parameter")
            flat = _promote_tree(spec.name, f"state[{key!r}]", flatten(value))
            if set(flat) != set(params):
                raise ValueError(f"{spec.name}: state[{key!r}] must have the parameters' paths "
                                 f"{sorted(params)}, got {sorted(flat)}")
            out[key] = flat
        else:
            out[key], _ = as_float64(value, f"state[{key!r}]", op=spec.name)
    return out


def _nest_state(spec: Spec, state: Mapping[str, Any]) -> dict[str, Any]:
    from reference.optimizers._tree import unflatten

    per = {s.name for s in spec.state if s.per == "param"}
    return {k: (unflatten(v) if k in per else v) for k, v in state.items()}


def oracle_function(op_name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a human-API forward: validate hyper-parameters by the spec, promote arrays."""
    return _wrap(op_name, "function")


def oracle_vjp(op_name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a hand-written VJP the same way."""
    return _wrap(op_name, "vjp")
