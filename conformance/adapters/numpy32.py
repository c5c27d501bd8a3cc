"""The same-precision baseline: the oracle's own formulas evaluated in the dtype under test.

The oracle's functions are called on float32 arrays (NumPy keeps float32 through every
operation) and gradients come from the oracle's hand-written VJPs in the same dtype.  Half
precision (float16, bfloat16) is a storage type: like every framework's "opmath", the baseline
computes it in float32 and rounds the results once to the half type; float64 is the oracle's own
arithmetic.  It declares every op in every dtype.  It needs no framework, so it is the default
adapter when none is installed, and the runner uses it as the same-precision
baseline of the error model (conformance/tolerance.py).  Its dialect is the spec's defaults.
"""

from __future__ import annotations

import numpy as np

import reference
from conformance import baseline
from conformance.adapters import OpSupport, Request, Response
from conformance.dtypes import DTYPES


class NumPy32Adapter:
    """``saved_statistics``: a half-precision backward reads its mean and 1/std rounded to the
    half type (the design of PyTorch's CPU kernels), for the error model's second baseline."""

    name = "numpy32"
    # A class default too: subclasses (user adapters built on this one) need not call __init__.
    saved_statistics = False

    def __init__(self, saved_statistics: bool = False) -> None:
        self.saved_statistics = saved_statistics

    def info(self) -> dict[str, str]:
        return {"framework": "numpy", "version": np.__version__, "device": "cpu",
                "note": "oracle formulas in the test dtype"}

    def ops(self) -> dict[str, OpSupport]:
        return {name: OpSupport(dialect={}, dtypes=DTYPES, api="reference (same dtype)")
                for name in reference.ops()}

    def evaluate(self, op: str, request: Request) -> Response:
        return baseline.evaluate(op, request, self.saved_statistics)


def make_adapter() -> NumPy32Adapter:
    return NumPy32Adapter()
