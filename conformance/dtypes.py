"""The facts about the dtypes under test, in one place.

``DTYPES`` are the floating dtypes the harness judges.  For each: the unit roundoff u (half the
distance from 1 to the next value), the smallest positive normal, the largest finite value and
the boundary beyond which round-to-nearest gives infinity (``max + ulp(max) / 2``:
``2^(emax+1) (1 - u/2)``).  NumPy has no native bfloat16; arrays of it are ``ml_dtypes.bfloat16``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "DTYPES",
    "MAX_FINITE",
    "OVERFLOW_THRESHOLD",
    "SMALLEST_NORMAL",
    "UNIT_ROUNDOFF",
    "is_discrete",
    "is_half",
    "name_of",
    "np_dtype",
    "representable",
    "round_to",
    "widen",
]

DTYPES = ("float64", "float32", "float16", "bfloat16")

UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
SMALLEST_NORMAL = {"float64": 2.0**-1022, "float32": 2.0**-126, "float16": 2.0**-14, "bfloat16": 2.0**-126}
_EMAX = {"float64": 1023, "float32": 127, "float16": 15, "bfloat16": 127}
#: 2^emax (2 - 2u): the largest finite value.
MAX_FINITE = {d: 2.0**e * (2.0 - 2.0 * UNIT_ROUNDOFF[d]) for d, e in _EMAX.items()}
#: 2^(emax+1) (1 - u/2): exact values at or beyond it round to infinity.
OVERFLOW_THRESHOLD = {d: (2.0 ** (e + 1) if e < 1023 else float("inf")) * (1.0 - UNIT_ROUNDOFF[d] / 2)
                      for d, e in _EMAX.items()}
# float64's threshold is 2^1024 (1 - 2^-54), itself beyond float64: no float64 value exceeds it.
OVERFLOW_THRESHOLD["float64"] = float("inf")


def is_half(dtype: str) -> bool:
    """float16 and bfloat16: storage types that frameworks compute in float32 ("opmath")."""
    return UNIT_ROUNDOFF[dtype] > UNIT_ROUNDOFF["float32"]


def np_dtype(dtype: str) -> Any:
    """The NumPy dtype of a dtype name (``ml_dtypes.bfloat16`` for bfloat16)."""
    if dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(dtype)


def name_of(array: Any) -> str:
    """The dtype name of an array (``"bfloat16"`` for ml_dtypes' bfloat16, ``"int64"``, ...)."""
    return str(np.asarray(array).dtype)


def is_discrete(array: Any) -> bool:
    """An integer or boolean array (labels, indices, masks): never rounded, widened or perturbed."""
    return np.asarray(array).dtype.kind in "biu"


def round_to(arrays: dict[str, Any], dtype: str) -> dict[str, np.ndarray]:
    """Every float array rounded (to nearest) to ``dtype``; values beyond its range become inf.
    Integer and boolean arrays are passed unchanged."""
    target = np_dtype(dtype)
    with np.errstate(over="ignore"):
        return {k: np.asarray(v) if is_discrete(v) else np.asarray(v, dtype=np.float64).astype(target)
                for k, v in arrays.items()}


def widen(arrays: dict[str, Any]) -> dict[str, np.ndarray]:
    """Every float array converted (exactly) to float64; integer and boolean arrays unchanged."""
    return {k: np.asarray(v) if is_discrete(v) else np.asarray(v).astype(np.float64)
            for k, v in arrays.items()}


def representable(array: Any, dtype: str) -> bool:
    """Whether every value of ``array`` is exactly a ``dtype`` value (NaN and inf included)."""
    values = np.asarray(array, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        back = values.astype(np_dtype(dtype)).astype(np.float64)
    same = (back == values) | (np.isnan(back) & np.isnan(values))
    return bool(np.all(same))
