"""Array namespace selection and the dtype policy of the oracle.

The oracle is written against the Python array API standard: every op asks for the namespace of
its inputs (``xp = namespace(x)``) and uses only standard functions on it.  NumPy is the default;
CuPy arrays compute on the GPU; ``array_api_strict`` arrays prove in CI that no NumPy-only call
slipped in.  This module is the only place in ``reference/`` that imports NumPy directly.

Dtype policy: the oracle computes in float64.  Real floating inputs of lower precision are
promoted (exactly: every float16/bfloat16/float32 value is a float64 value) and the promotion is
recorded so that the result can say so (:class:`Outputs.promoted`).  Integer, boolean and complex
inputs are rejected with a ``TypeError`` naming the argument.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "Outputs",
    "as_discrete",
    "as_float64",
    "device",
    "is_array",
    "namespace",
    "size",
    "to_numpy",
]


def namespace(*arrays: Any) -> Any:
    """The array-API namespace shared by ``arrays`` (``None`` entries are ignored).

    NumPy arrays map to ``array_api_compat.numpy``, CuPy arrays to ``array_api_compat.cupy``,
    ``array_api_strict`` arrays to ``array_api_strict``.  Mixing namespaces is an error.
    """
    present = [a for a in arrays if a is not None]
    # The common case, asked for on every operation of every op: plain NumPy arrays (a fast
    # path with the answer array_namespace gives them).
    if all(type(a) is np.ndarray for a in present):
        import array_api_compat.numpy as xp_numpy

        return xp_numpy
    from array_api_compat import array_namespace

    return array_namespace(*present)


def device(x: Any) -> Any:
    """The device ``x`` lives on, for the creation functions that make arrays beside it
    (``xp.zeros(shape, dtype=..., device=device(x))``): without it a new array lands on the
    namespace's default device ("cpu" for torch, the current device for CuPy) and the next
    operation mixes devices."""
    if type(x) is np.ndarray:
        return "cpu"
    from array_api_compat import device as device_of

    return device_of(x)


def size(x: Any) -> int:
    """The number of elements of ``x`` (``x.size`` is a method on torch tensors)."""
    n = 1
    for extent in x.shape:
        n *= int(extent)
    return n


def is_array(value: Any) -> bool:
    """True for anything the array API treats as an array (NumPy, CuPy, strict, ...)."""
    if type(value) is np.ndarray:
        return True
    from array_api_compat import is_array_api_obj

    return is_array_api_obj(value)


def _dtype_name(xp: Any, dtype: Any) -> str:
    for name in ("float16", "float32", "float64", "bfloat16"):
        if getattr(xp, name, None) is not None and dtype == getattr(xp, name):
            return name
    return str(dtype).replace("<class '", "").replace("'>", "")


def as_float64(value: Any, name: str, *, op: str = "", xp: Any = None) -> tuple[Any, str | None]:
    """Return ``(value as a float64 array, original dtype name or None if it was float64)``.

    Python scalars and lists are accepted and converted with NumPy (or ``xp`` if given).
    Raises ``TypeError`` for non-floating dtypes, naming ``op``, ``name``, the expected and the
    actual dtype.
    """
    if type(value) is np.ndarray and value.dtype == np.float64:
        return value, None  # the common case, on every call of every op
    where = f"{op}: " if op else ""
    if not is_array(value):
        if isinstance(value, (bool, np.bool_)) or (
            isinstance(value, (list, tuple)) and np.asarray(value).dtype == np.bool_
        ):
            raise TypeError(f"{where}{name} must be a real floating array, got a boolean")
        try:
            value = np.asarray(value) if xp is None else xp.asarray(value)
        except Exception as exc:  # pragma: no cover - message path
            raise TypeError(
                f"{where}{name} must be a real floating array, got {type(value).__name__}"
            ) from exc
        if value.dtype.kind in "iu":
            value = value.astype(np.float64)
    xp = namespace(value)
    dtype = value.dtype
    if getattr(dtype, "name", "") == "bfloat16":
        # bfloat16 (ml_dtypes) is not an array-API dtype in NumPy: convert through NumPy.
        return xp.asarray(np.asarray(value).astype(np.float64)), "bfloat16"
    if not xp.isdtype(dtype, "real floating"):
        raise TypeError(
            f"{where}{name} must have a real floating dtype (float16/bfloat16/float32/float64), "
            f"got {_dtype_name(xp, dtype)}"
        )
    if dtype == xp.float64:
        return value, None
    return xp.astype(value, xp.float64), _dtype_name(xp, dtype)


def as_discrete(value: Any, name: str, dtype: str, *, op: str = "") -> Any:
    """An integer (``dtype="int64"``: class labels, indices) or boolean (``"bool"``: masks) input,
    as an int64 or bool array of its own namespace; never promoted to float (so never rounded to
    the dtype under test, never differentiated).  ``TypeError`` naming ``op``, ``name``, what
    was expected and what came: a float array holding whole numbers is refused too (labels that
    went through a float tensor are a bug the caller should see)."""
    where = f"{op}: " if op else ""
    if not is_array(value):
        value = np.asarray(value)
    xp = namespace(value)
    kind = "integral" if dtype == "int64" else "bool"
    if not xp.isdtype(value.dtype, kind):
        wanted = "an integer array (int8 ... int64, uint8 ...)" if dtype == "int64" else "a boolean array"
        raise TypeError(f"{where}{name} must be {wanted}, got {_dtype_name(xp, value.dtype)}")
    return xp.astype(value, xp.int64) if dtype == "int64" and value.dtype != xp.int64 else value


def to_numpy(value: Any) -> np.ndarray:
    """Copy any array-API array to a NumPy array (CuPy via ``.get()``; others via DLPack/asarray)."""
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "get") and type(value).__module__.startswith("cupy"):
        return value.get()
    try:
        return np.from_dlpack(value)
    except Exception:
        return np.asarray(value)


class Outputs(dict):
    """A dict of output arrays that also records dtype promotion.

    ``promoted`` maps each input or state name whose dtype was not float64 to its original dtype
    name: the oracle computed in float64 from exactly those values.
    """

    promoted: dict[str, str]

    def __init__(self, *args: Any, promoted: dict[str, str] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.promoted = dict(promoted or {})

    def __repr__(self) -> str:
        extra = f", promoted={self.promoted}" if self.promoted else ""
        return f"Outputs({dict.__repr__(self)}{extra})"
