"""Small adapters for testing the harness itself (not mutants of real ops: see tests/mutants.py)."""

from __future__ import annotations

import time

import numpy as np

from conformance.adapters import OpSupport, Request, Response, Unsupported
from conformance.adapters.numpy32 import NumPy32Adapter
from reference.normalizers._stats import expand_to


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


# -- adapters for the gate (tests/test_gate.py) ------------------------------------------------------


class TypoAdapter(OracleAdapter):
    """Declares a misspelt op (or, with ``field``, a misspelt dtype, knob, value or state)."""

    name = "typo"

    def __init__(self, field: str = "op") -> None:
        self.field = field

    def ops(self) -> dict[str, OpSupport]:
        if self.field == "op":
            return {"layer_nrom": OpSupport({}, ("float64",))}
        if self.field == "dtype":
            return {"layer_norm": OpSupport({}, ("float33",))}
        if self.field == "knob":
            return {"batch_norm": OpSupport({"momentum_conventoin": "new_weight"}, ("float64",))}
        if self.field == "value":
            return {"batch_norm": OpSupport({"momentum_convention": "newest_weight"}, ("float64",))}
        return {"batch_norm": OpSupport({}, ("float64",), not_kept=("num_batches",))}


class BatchNormOnly(OracleAdapter):
    name = "bnonly"

    def ops(self) -> dict[str, OpSupport]:
        return {"batch_norm": OpSupport({}, ("float64",))}


class AlwaysUnsupported(BatchNormOnly):
    name = "refuses"

    def evaluate(self, op: str, request: Request) -> Response:
        raise Unsupported("this backend refuses everything")


class ForwardOnlyAdapter(OracleAdapter):
    """An inference runtime: forward only; it fails if it is ever sent cotangents."""

    name = "forward"

    def ops(self) -> dict[str, OpSupport]:
        return {k: OpSupport(v.dialect, ("float64", "float32"), gradients=False)
                for k, v in super().ops().items() if k in ("batch_norm", "layer_norm")}

    def evaluate(self, op: str, request: Request) -> Response:
        assert request.cotangents is None, "a forward-only adapter was sent cotangents"
        response = super().evaluate(op, request)
        response.grads = {}
        return response


class WideResultAdapter(OracleAdapter):
    """Claims float16 but computes and returns float64 (the oracle's own values)."""

    name = "wide"

    def ops(self) -> dict[str, OpSupport]:
        return {"layer_norm": OpSupport({}, ("float16",))}

    def evaluate(self, op: str, request: Request) -> Response:
        wide = Request(op, "float64", _cast(request.inputs, np.float64), None, request.hparams,
                       _cast(request.cotangents, np.float64))
        return super().evaluate(op, wide)


class NarrowResultAdapter(OracleAdapter):
    """Returns float32 arrays for a float64 request (computes in float32)."""

    name = "narrow"

    def ops(self) -> dict[str, OpSupport]:
        return {"layer_norm": OpSupport({}, ("float64",))}

    def evaluate(self, op: str, request: Request) -> Response:
        narrow = Request(op, "float32", _cast(request.inputs, np.float32), None, request.hparams,
                         _cast(request.cotangents, np.float32))
        return super().evaluate(op, narrow)


class Float32ArithmeticAdapter(NarrowResultAdapter):
    """Computes float64 requests in float32 and returns them as float64 (a silent downcast)."""

    name = "f32math"

    def evaluate(self, op: str, request: Request) -> Response:
        response = super().evaluate(op, request)
        for tree in (response.outputs, response.grads, response.state):
            tree.update(_cast(tree, np.float64))
        return response


class CounterAdapter(OracleAdapter):
    """A batch norm whose framework keeps no batch counter.  ``fabricate``: it invents one (one
    more per call, eval calls included); otherwise it declares the slot not kept."""

    name = "counter"

    def __init__(self, fabricate: bool) -> None:
        self.fabricate = fabricate

    def ops(self) -> dict[str, OpSupport]:
        return {"batch_norm": OpSupport({}, ("float64",),
                                        not_kept=() if self.fabricate else ("num_batches_tracked",))}

    def evaluate(self, op: str, request: Request) -> Response:
        response = super().evaluate(op, request)
        count = (request.state or {}).get("num_batches_tracked")
        response.state.pop("num_batches_tracked", None)
        if self.fabricate and count is not None:
            response.state["num_batches_tracked"] = np.asarray(float(count) + 1.0)
        return response


class Float32HyperParameters(OracleAdapter):
    """Adam whose lr and betas are float32 variables whatever the parameters' dtype (as in
    frameworks that keep optimizer hyper-parameters as float32 tensors)."""

    name = "f32hp"

    def __init__(self, declared: bool) -> None:
        self.declared = declared

    def ops(self) -> dict[str, OpSupport]:
        return {"adam": OpSupport({}, ("float64",), hparam_dtype="float32" if self.declared else "float64")}

    def evaluate(self, op: str, request: Request) -> Response:
        hp = dict(request.hparams)
        for name in ("lr", "beta1", "beta2"):
            hp[name] = float(np.float32(hp[name]))
        return super().evaluate(op, Request(op, request.dtype, request.inputs, request.state, hp, None))


class GroupNormBothAffines(OracleAdapter):
    """A runtime with both GroupNorm scale/bias semantics (per group and per channel, by opset)."""

    name = "gnboth"

    def ops(self) -> dict[str, OpSupport]:
        return {"group_norm": OpSupport({"affine": {"per_group", "per_channel"}}, ("float64",))}


class ExitingAdapter(_Faulty):
    """Calls sys.exit inside evaluate for layer_norm."""

    name = "exiting"

    def evaluate(self, op: str, request: Request) -> Response:
        if op == "layer_norm":
            raise SystemExit(3)
        return super().evaluate(op, request)


def _cast(tree: dict[str, np.ndarray] | None, dtype: type) -> dict[str, np.ndarray] | None:
    return None if tree is None else {k: np.asarray(v).astype(dtype) for k, v in tree.items()}


class HalfStatisticsLayerNorm(OracleAdapter):
    """LayerNorm as PyTorch's CPU kernels compute half-precision data: float32 arithmetic, but the
    mean and 1/std the backward reads are saved in the half type (bit-for-bit torch's bfloat16
    backward on twelve-decade data).  A design the error model must accept."""

    name = "halfstats"

    def ops(self) -> dict[str, OpSupport]:
        return {"layer_norm": OpSupport({}, ("float16", "bfloat16"))}

    def evaluate(self, op: str, request: Request) -> Response:
        with np.errstate(all="ignore"):  # the non-finite family: NaN stays where the oracle has it
            return self._evaluate(op, request)

    def _evaluate(self, op: str, request: Request) -> Response:
        response = super().evaluate(op, request)
        hp = request.hparams
        x = np.asarray(request.inputs["x"], dtype=np.float32)
        axes = tuple(sorted(a % x.ndim for a in hp["axes"]))
        store = np.asarray(request.inputs["x"]).dtype

        def half(v: np.ndarray) -> np.ndarray:
            return np.asarray(v, np.float32).astype(store).astype(np.float32)

        mean = x.mean(axis=axes, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
        mean, rstd = half(mean), half(1.0 / np.sqrt(var + np.float32(hp["eps"])))
        xhat = (x - mean) * rstd
        w = request.inputs.get("weight")
        dy = np.asarray(request.cotangents["y"], dtype=np.float32)
        g = dy * (expand_to(np.asarray(w, np.float32), x.ndim, axes) if w is not None else np.float32(1.0))
        dx = rstd * (g - g.mean(axis=axes, keepdims=True) - xhat * (g * xhat).mean(axis=axes, keepdims=True))
        response.grads["x"] = dx.astype(store)
        return response
