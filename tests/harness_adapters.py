"""Small adapters for testing the harness itself (not mutants of real ops: see tests/mutants.py)."""

from __future__ import annotations

import time

import numpy as np

from conformance.adapters import OpSupport, Request, Response, Unsupported
from conformance.adapters.numpy32 import NumPy32Adapter


class OracleAdapter(NumPy32Adapter):
    """The oracle's formulas in the test dtype, float64 included: in float64 it *is* the oracle."""

    name = "oracle"

    def ops(self) -> dict[str, OpSupport]:
        return {k: OpSupport(v.dialect, ("float64", "float32"), v.api) for k, v in super().ops().items()}


class _Faulty(OracleAdapter):
    fault = ""

    def ops(self) -> dict[str, OpSupport]:
        return {k: v for k, v in super().ops().items() if k in ("batch_norm", "layer_norm")}


class RaisingAdapter(_Faulty):
    """Raises on layer_norm only: its cases are ERROR, batch_norm's still PASS."""

    name = "raising"

    def evaluate(self, op: str, request: Request) -> Response:
        if op == "layer_norm":
            raise RuntimeError("kernel exploded")
        return super().evaluate(op, request)


class HangingAdapter(_Faulty):
    name = "hanging"

    def evaluate(self, op: str, request: Request) -> Response:
        if op == "layer_norm":
            time.sleep(5.0)
        return super().evaluate(op, request)


class WrongShapeAdapter(_Faulty):
    name = "wrongshape"

    def evaluate(self, op: str, request: Request) -> Response:
        response = super().evaluate(op, request)
        response.outputs = {k: v[..., :-1] for k, v in response.outputs.items()}
        return response


class NaNAdapter(_Faulty):
    name = "nan"

    def evaluate(self, op: str, request: Request) -> Response:
        response = super().evaluate(op, request)
        y = response.outputs["y"].copy()
        y.flat[0] = np.nan
        response.outputs = {"y": y}
        return response


class UnsupportedAdapter(_Faulty):
    name = "unsupported"

    def evaluate(self, op: str, request: Request) -> Response:
        if request.hparams.get("eps", 0) != 1e-5:
            raise Unsupported("only eps=1e-5")
        return super().evaluate(op, request)


class FlaxMomentumAdapter(_Faulty):
    """Declares PyTorch's momentum convention but updates the running stats like Flax."""

    name = "flaxmomentum"

    def ops(self) -> dict[str, OpSupport]:
        return {"batch_norm": OpSupport({"momentum_convention": "new_weight"}, ("float64",))}

    def evaluate(self, op: str, request: Request) -> Response:
        flipped = Request(op, request.dtype, request.inputs, request.state,
                          {**request.hparams, "momentum_convention": "old_weight"}, request.cotangents)
        return super().evaluate(op, flipped)


class BadGradientAdapter(_Faulty):
    """The BN input gradient is 1% off: a plain FAIL that no dialect knob explains."""

    name = "badgrad"

    def ops(self) -> dict[str, OpSupport]:
        return {"batch_norm": OpSupport({}, ("float64", "float32"))}

    def evaluate(self, op: str, request: Request) -> Response:
        response = super().evaluate(op, request)
        if "x" in response.grads:
            response.grads["x"] = response.grads["x"] * 1.01
        return response


def make_adapter() -> BadGradientAdapter:
    """Lets `normref check tests/harness_adapters.py` load the failing adapter."""
    return BadGradientAdapter()
