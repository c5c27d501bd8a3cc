"""The op registry: the specs (reference/spec.py, data) bound to the reference functions (math).

:class:`Op` is one spec bound to its functions: ``apply`` (forward, with state), ``vjp``,
``init_state``, and for optimizers the pytree ``init``/``step`` and the flat form the harness
speaks.  Public entry points: :func:`ops`, :func:`get`, and the decorators
:func:`oracle_function` / :func:`oracle_vjp` / :func:`oracle_optimizer` that make the human API
validate its hyper-parameters against the same spec and promote its arrays to float64.  The spec
schema and loader (and the names ``Spec``, ``SpecError``, ``load_spec``, re-exported here) live in
:mod:`reference.spec`.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from reference._backend import Outputs, as_discrete, as_float64
from reference.decorators import oracle_function, oracle_optimizer, oracle_vjp
from reference.spec import (
    Citation,
    HParam,
    Spec,
    SpecError,
    TensorSpec,
    all_specs,
    load_spec,
    specs_dir,
)

__all__ = [
    "Citation",
    "HParam",
    "Op",
    "Spec",
    "SpecError",
    "TensorSpec",
    "get",
    "load_spec",
    "ops",
    "oracle_function",
    "oracle_optimizer",
    "oracle_vjp",
    "specs_dir",
]



def _resolve_callable(ref: str, where: str) -> Callable[..., Any]:
    module_name, _, attr = ref.partition(":")
    if not attr:
        raise SpecError(f"{where}: {ref!r} must have the form 'module:callable'")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise SpecError(f"{where}: cannot import {ref!r}: {exc}") from None


# --------------------------------------------------------------------------------------------
# Bound ops
# --------------------------------------------------------------------------------------------


def _split_state_result(spec: Spec, result: Any) -> tuple[Any, dict[str, Any]]:
    if spec.state:
        outputs, new_state = result
        return outputs, dict(new_state)
    return result, {}


def _as_output_dict(spec: Spec, outputs: Any) -> dict[str, Any]:
    if len(spec.outputs) == 1:
        return {spec.outputs[0].name: outputs}
    return {t.name: v for t, v in zip(spec.outputs, outputs, strict=True)}


@dataclass(frozen=True)
class Op:
    """An op: its parsed spec bound to its reference functions."""

    spec: Spec

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def function(self) -> Callable[..., Any]:
        return _resolve_callable(self.spec.function, f"{self.spec.path} function")

    @property
    def discontinuity_counter(self) -> Callable[..., Any] | None:
        """The spec's ``discontinuities`` function, marking input values next to a jump (None for an
        op without jumps)."""
        if not self.spec.discontinuities:
            return None
        return _resolve_callable(self.spec.discontinuities, f"{self.spec.path} discontinuities")

    @property
    def expectation(self) -> Callable[..., Any] | None:
        """The spec's ``expectation`` over the random draws, ``(inputs without the draws, hparams)
        -> {output: (mean, low, high)}`` (None for an op without draws)."""
        if not self.spec.expectation:
            return None
        return _resolve_callable(self.spec.expectation, f"{self.spec.path} expectation")

    @property
    def vjp_function(self) -> Callable[..., Any]:
        if not self.spec.vjp:
            raise TypeError(f"{self.name} has no VJP: backward = {self.spec.backward!r}, no input is "
                            "differentiable")
        return _resolve_callable(self.spec.vjp, f"{self.spec.path} vjp")

    def dialect(self, name: str) -> dict[str, Any]:
        """The full hyper-parameter dict (defaults overlaid by the dialect's values)."""
        return self.spec.resolve({}, dialect=name)

    def _arrays(
        self, inputs: Mapping[str, Any], state: Mapping[str, Any] | None, hp: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, str]]:
        spec = self.spec
        if not isinstance(inputs, Mapping):
            raise TypeError(f"{spec.name}: inputs must be a dict of arrays, got {type(inputs).__name__}")
        known_in = {t.name for t in spec.inputs}
        for key in inputs:
            if key not in known_in:
                raise TypeError(
                    f"{spec.name}: unknown input {key!r}; expected some of {sorted(known_in)}"
                )
        arrays: dict[str, Any] = {}
        promoted: dict[str, str] = {}
        for t in spec.inputs:
            if inputs.get(t.name) is None:
                if not t.optional:
                    raise ValueError(f"{spec.name}: input {t.name!r} is required ({t.shape})")
                continue
            if t.dtype != "float64":
                arrays[t.name] = as_discrete(inputs[t.name], t.name, t.dtype, op=spec.name)
                continue
            arrays[t.name], orig = as_float64(inputs[t.name], t.name, op=spec.name)
            if orig:
                promoted[t.name] = orig
        if spec.state:
            if state is None or len(state) == 0:
                state = self.init_state(arrays, **hp)
            known_st = {t.name for t in spec.state}
            for key in state:
                if key not in known_st:
                    raise TypeError(
                        f"{spec.name}: unknown state {key!r}; expected some of {sorted(known_st)}"
                    )
            for t in spec.state:
                if state.get(t.name) is None:
                    if not t.optional:
                        raise ValueError(f"{spec.name}: state {t.name!r} is required ({t.shape})")
                    continue
                arrays[t.name], orig = as_float64(state[t.name], t.name, op=spec.name)
                if orig:
                    promoted[t.name] = orig
        elif state:
            raise TypeError(f"{spec.name}: this op has no state, got state keys {sorted(state)}")
        return arrays, promoted

    # Optimizers: the pytree API and the flat form the harness speaks ------------------------

    def init(self, params: Mapping[str, Any], **hparams: Any) -> dict[str, Any]:
        """An optimizer's initial state for ``params`` (a dict pytree)."""
        self._need_optimizer("init")
        return _resolve_callable(self.spec.init_state, f"{self.spec.path} init")(params, **hparams)

    def step(self, params: Mapping[str, Any], grads: Mapping[str, Any],
             state: Mapping[str, Any] | None = None, **hparams: Any) -> tuple[Any, dict[str, Any]]:
        """One optimizer step: ``(new_params, new_state)``; ``state=None`` starts from ``init``."""
        self._need_optimizer("step")
        if state is None:
            state = self.init(params, **hparams)
        return self.function(params, grads, state, **hparams)

    @property
    def spec_init(self) -> Callable[..., Any]:
        """An optimizer's decorated ``init`` function."""
        return _resolve_callable(self.spec.init_state, f"{self.spec.path} init")

    def _need_optimizer(self, what: str) -> None:
        if not self.spec.is_optimizer:
            raise TypeError(f"{self.name} is not an optimizer; {what}() is for optimizers")

    def flat_state(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """Pytree state -> ``{"<slot>/<path>": array, "<global slot>": array}``."""
        out: dict[str, Any] = {}
        for slot in self.spec.state:
            if slot.name not in state:
                continue
            value = state[slot.name]
            if slot.per == "param":
                out.update({f"{slot.name}/{p}": v for p, v in value.items()})
            else:
                out[slot.name] = value
        return out

    def tree_state(self, flat: Mapping[str, Any]) -> dict[str, Any]:
        """The inverse of :meth:`flat_state`."""
        out: dict[str, Any] = {}
        slots = {s.name: s for s in self.spec.state}
        for key, value in flat.items():
            name, _, path = key.partition("/")
            if name not in slots:
                raise TypeError(f"{self.name}: unknown state {key!r}; slots are {sorted(slots)}")
            if slots[name].per == "param":
                out.setdefault(name, {})[path] = value
            else:
                out[name] = value
        return out

    @staticmethod
    def split_flat(inputs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """``{"params/p": w, "grads/p": g}`` -> ``({p: w}, {p: g})``."""
        parts: dict[str, dict[str, Any]] = {"params": {}, "grads": {}}
        for key, value in inputs.items():
            kind, _, path = key.partition("/")
            if kind not in parts or not path:
                raise TypeError(f"optimizer inputs are 'params/<path>' and 'grads/<path>', got {key!r}")
            parts[kind][path] = value
        return parts["params"], parts["grads"]

    def _apply_optimizer(self, inputs: Mapping[str, Any], state: Mapping[str, Any] | None,
                         hp: dict[str, Any]) -> tuple[Outputs, dict[str, Any]]:
        params, grads = self.split_flat(inputs)
        tree = self.tree_state(state) if state else None
        new_params, new_state = self.step(params, grads, tree, **hp)
        return (Outputs({f"params/{p}": v for p, v in new_params.items()}),
                self.flat_state(new_state))

    def init_state(self, inputs: Mapping[str, Any], **hparams: Any) -> dict[str, Any]:
        """The initial state for these inputs (empty for stateless ops; flat for optimizers)."""
        if self.spec.is_optimizer:
            params, _ = self.split_flat({k: v for k, v in inputs.items() if k.startswith("params/")})
            return self.flat_state(self.init(params, **hparams))
        if not self.spec.state:
            return {}
        hp = self.spec.resolve(hparams)
        fn = _resolve_callable(self.spec.init_state, f"{self.spec.path} init_state")
        params = inspect.signature(fn).parameters
        kwargs = {k: v for k, v in {**inputs, **hp}.items() if k in params}
        return dict(fn(**kwargs))

    def apply(
        self,
        inputs: Mapping[str, Any],
        state: Mapping[str, Any] | None = None,
        **hparams: Any,
    ) -> tuple[Outputs, dict[str, Any]]:
        """Forward: ``(outputs, new_state)``, both dicts keyed by the spec's names.

        Missing hyper-parameters take the spec's defaults; ``state=None`` starts from
        ``init_state``.  ``outputs.promoted`` records inputs that were not float64.
        """
        hp = self.spec.resolve(hparams)
        if self.spec.is_optimizer:
            return self._apply_optimizer(inputs, state, hp)
        arrays, promoted = self._arrays(inputs, state, hp)
        result = self.function(**arrays, **hp)
        outputs, new_state = _split_state_result(self.spec, result)
        return Outputs(_as_output_dict(self.spec, outputs), promoted=promoted), new_state

    def vjp(
        self,
        inputs: Mapping[str, Any],
        state: Mapping[str, Any] | None,
        cotangents: Mapping[str, Any],
        **hparams: Any,
    ) -> dict[str, Any]:
        """Gradient of ``<cotangents, outputs>`` w.r.t. each differentiable input given.

        Outputs absent from ``cotangents`` get a zero cotangent.
        """
        return self.backward(inputs, state, cotangents, **hparams)[0]

    def backward(
        self,
        inputs: Mapping[str, Any],
        state: Mapping[str, Any] | None,
        cotangents: Mapping[str, Any],
        **hparams: Any,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The backward pass: :meth:`vjp`'s gradients and the state it updates (the slots with
        ``updated_in = "backward"``; ``{}`` for ops without)."""
        spec = self.spec
        if spec.is_optimizer or not spec.differentiable:
            raise TypeError(f"{spec.name} has no VJP: it has no differentiable input")
        hp = spec.resolve(hparams)
        arrays, _ = self._arrays(inputs, state, hp)
        names = {t.name for t in spec.outputs}
        if not isinstance(cotangents, Mapping):
            raise TypeError(f"{spec.name}: cotangents must be a dict output -> array, "
                            f"got {type(cotangents).__name__}")
        for key in cotangents:
            if key not in names:
                raise TypeError(f"{spec.name}: unknown cotangent {key!r}; outputs are {sorted(names)}")
        if all(v is None for v in cotangents.values()):
            raise ValueError(f"{spec.name}: vjp needs the cotangent of at least one output "
                             f"({', '.join(sorted(names))}), got {dict(cotangents) or 'none'}")
        cts = {}
        for t in spec.outputs:
            if cotangents.get(t.name) is not None:
                cts["d" + t.name], _ = as_float64(cotangents[t.name], "d" + t.name, op=spec.name)
            else:
                cts["d" + t.name] = None
        result = self.vjp_function(**cts, **arrays, **hp)
        if spec.backward_state:
            grads, new_state = result
            return dict(grads), dict(new_state)
        return dict(result), {}


def ops(family: str | None = None) -> list[str]:
    """Names of the registered ops (of one ``family``: "normalizers", "optimizers"), sorted."""
    specs = all_specs()
    if family is not None:
        families = sorted({s.family for s in specs.values()})
        if family not in families:
            raise ValueError(f"unknown family {family!r}; known: {', '.join(families)}")
    return sorted(n for n, s in specs.items() if family is None or s.family == family)


def get(name: str) -> Op:
    """The bound op called ``name``; ``KeyError`` naming the known ops if there is none."""
    specs = all_specs()
    if name not in specs:
        raise KeyError(f"unknown op {name!r}; known ops: {', '.join(sorted(specs))}")
    return Op(specs[name])
