"""What the jax adapter's Flax mappings share (conformance/adapters/jax.py): the builder types,
the half-precision upcast variant, the jit cache's keys, a one-variable Flax module for the
layers that transform a kernel (WeightNorm, SpectralNorm), and conversions back to NumPy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from conformance.adapters import Unsupported

# compute(primals, state) -> (outputs, aux); an op builder returns (compute, state, finish).
_Compute = Callable[[dict[str, Any], dict[str, Any]], tuple[dict[str, Any], dict[str, Any]]]
_Built = tuple[_Compute, dict[str, Any], Callable[[dict[str, Any]], dict[str, Any]]]


def _axis(axis: int, ndim: int, what: str = "axis") -> int:
    if not -ndim <= axis < ndim:
        raise Unsupported(f"{what}={axis} is out of range for an input of rank {ndim}")
    return axis % ndim


def _upcast(compute: _Compute) -> _Compute:
    """The diagnostic variant: half-precision inputs converted to float32 once, outputs rounded
    back once (so the cotangents of the layer's several uses of an input are summed in float32)."""
    import jax.numpy as jnp

    def wrapped(p: dict[str, Any], s: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        dtype = next(iter(p.values())).dtype
        outputs, aux = compute({k: v.astype(jnp.promote_types(v.dtype, jnp.float32))
                                for k, v in p.items()}, s)
        return {k: v.astype(dtype) for k, v in outputs.items()}, aux

    return wrapped


def _no_state(_: dict[str, Any]) -> dict[str, Any]:
    return {}


def _frozen(value: Any) -> Any:
    """A hashable copy of a hyper-parameter dict (lists become tuples)."""
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


def _signature(arrays: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in arrays.items()))


def _kernel_module() -> Any:
    import flax.linen as nn

    class Kernel(nn.Module):
        """A layer whose only variable is ``kernel`` (what WeightNorm/SpectralNorm transform)."""

        shape: tuple[int, ...]

        @nn.compact
        def __call__(self) -> Any:
            return self.param("kernel", nn.initializers.zeros, self.shape)

    return Kernel


_KERNEL_CLASS: Any = None


def _Kernel(shape: tuple[int, ...]) -> Any:  # noqa: N802 - reads as the module it builds
    global _KERNEL_CLASS
    if _KERNEL_CLASS is None:
        _KERNEL_CLASS = _kernel_module()
    return _KERNEL_CLASS(shape)


def _np_dtype(dtype: str) -> Any:
    if dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(dtype)


def _numpy(tree: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in tree.items()}
