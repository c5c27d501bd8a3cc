"""The ONNX Runtime adapter: one-node ONNX models run by ``onnxruntime.InferenceSession``.

The models and the mappings are shared with the ``onnx_reference`` adapter
(``_onnx_models.py``, where the per-op table and the ONNX conventions are documented); this
module only runs them.  It is forward-only (``OpSupport(gradients=False)``: an inference runtime
has no autodiff), and ONNX's float attributes are float32 (``hparam_dtype="float32"``).

Which ops and dtypes it declares is found by trying: when ``ops()`` is first called, each op's
ONNX operators (every version the op maps to: GroupNormalization-21 and -18, BatchNormalization
in both modes) are built in a small model per dtype (float64, float32, float16) and run once; a
dtype is declared only where all of them run.  What ONNX Runtime 1.32.0's CPU provider has
(``onnxruntime.capi.onnxruntime_pybind11_state.get_all_opkernel_def()``): BatchNormalization,
LpNormalization and InstanceNormalization kernels in float (and double, except
InstanceNormalization, so float64 InstanceNorm is not declared), their float16 nodes computed in
float32 between casts the runtime inserts; LayerNormalization and RMSNormalization kernels in
float, double and float16; no GroupNormalization kernel: the runtime inlines the operator's ONNX
function body; no kernel of the ``ai.onnx.preview.training`` optimizers ("not a registered
function/op"), so none is declared.  bfloat16 is not declared (the Python binding takes no
bfloat16 NumPy array).  A request whose model the runtime cannot build for lack of a kernel is
Unsupported with the runtime's message.

Each model is built once per (operator, dtypes, shapes, attributes) and its session kept.
Models import the highest opset both ``onnx`` and the runtime support (found by trying too).

Device: the CPU execution provider by default; ``NORMREF_ORT_DEVICE=cuda`` (or
``make_adapter(device="cuda")``) uses ``CUDAExecutionProvider`` only (CPU fallback disabled,
so every node runs on the GPU or the case is Unsupported).  Sessions use one intra-op thread
(the harness runs one worker process per core).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

try:
    import onnx  # the models are built with onnx.helper
except ImportError as exc:  # pragma: no cover - the extra installs both
    raise ImportError("the onnxruntime adapter builds its models with the onnx package: "
                      "pip install 'normref[onnx]'") from exc
import onnxruntime as ort

from conformance.adapters import OpSupport, Request, Response, Unsupported
from conformance.adapters._onnx_models import (
    MAPPINGS,
    STEP_COUNTS,
    Node,
    build_model,
    declared,
    evaluate,
    runs,
)

__all__ = ["OnnxRuntimeAdapter", "make_adapter"]

#: The dtypes tried for every op.
CANDIDATE_DTYPES = ("float64", "float32", "float16")

#: What ONNX Runtime's messages say when it has no kernel for a node (or type).
_NO_KERNEL = ("NOT_IMPLEMENTED", "Could not find an implementation", "is invalid",
              "not supported", "Unrecognized attribute", "No Op registered",
              "is not a registered function/op")

_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def _device(device: str | None) -> str:
    name = (device or os.environ.get("NORMREF_ORT_DEVICE", "") or "cpu").lower()
    where = f"device {name!r}" if device else f"NORMREF_ORT_DEVICE={name!r}"
    if name not in _PROVIDERS:
        raise ValueError(f"{where}: expected cpu or cuda")
    if _PROVIDERS[name] not in ort.get_available_providers():
        raise ValueError(f"{where} but {_PROVIDERS[name]} is not available in this onnxruntime "
                         f"build (available: {', '.join(ort.get_available_providers())})")
    return name


class OnnxRuntimeAdapter:
    name = "onnxruntime"

    def __init__(self, device: str | None = None, step_count: str = "taken") -> None:
        if step_count not in STEP_COUNTS:
            raise ValueError(f"step_count must be one of {STEP_COUNTS}, got {step_count!r}")
        self.device = _device(device)
        self.step_count = step_count
        self._sessions: dict[Node, Any] = {}
        self._max_opset: int | None = None
        self._dtypes: dict[str, tuple[str, ...]] | None = None

    # the runtime ----------------------------------------------------------------------------

    def _options(self) -> Any:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        if self.device != "cpu":
            options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        return options

    def _create(self, model: Any) -> Any:
        return ort.InferenceSession(model.SerializeToString(), self._options(),
                                    providers=[_PROVIDERS[self.device]])

    @property
    def max_opset(self) -> int:
        """The highest default-domain opset both onnx and the runtime support."""
        if self._max_opset is None:
            from onnx import defs

            for opset in range(defs.onnx_opset_version(), 0, -1):
                identity = Node("Identity", (("x", "float32", (1,)),), (("y", "float32", (1,)),))
                try:
                    self._create(build_model(identity, opset))
                except Exception:
                    continue
                self._max_opset = opset
                break
            else:  # pragma: no cover
                raise RuntimeError("onnxruntime accepts no opset of the installed onnx")
        return self._max_opset

    def _session(self, node: Node) -> Any:
        session = self._sessions.get(node)
        if session is None:
            try:
                session = self._create(build_model(node, self.max_opset))
            except Exception as exc:
                message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                if any(m in str(exc) for m in _NO_KERNEL):
                    raise Unsupported(f"onnxruntime ({self.device}) cannot run {node.op_type} "
                                      f"here: {message}") from None
                raise
            self._sessions[node] = session
        return session

    def run(self, node: Node, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The node's outputs for ``feeds`` (the session built once per node)."""
        return self._session(node).run([name for name, _, _ in node.outputs], feeds)

    # the protocol ---------------------------------------------------------------------------

    def info(self) -> dict[str, str]:
        info = {"framework": "onnxruntime", "version": ort.__version__, "device": self.device,
                "providers": _PROVIDERS[self.device], "onnx": onnx.__version__,
                "opset": str(self.max_opset)}
        if self.step_count != "taken":
            info["step_count"] = self.step_count
        return info

    def ops(self) -> dict[str, OpSupport]:
        if self._dtypes is None:
            self._dtypes = {op: tuple(dt for dt in CANDIDATE_DTYPES
                                      if dt in MAPPINGS[op].dtypes and runs(self.run, op, dt))
                            for op in MAPPINGS}
        return {op: declared(op, dtypes, self.step_count) for op, dtypes in self._dtypes.items() if dtypes}

    def evaluate(self, op: str, request: Request) -> Response:
        if request.dtype not in self.ops().get(op, OpSupport(dtypes=())).dtypes:
            raise Unsupported(f"onnxruntime has no {request.dtype} kernel for {op}")
        return evaluate(op, request, self.run, "onnxruntime", self.step_count)


def make_adapter(device: str | None = None, step_count: str = "taken") -> OnnxRuntimeAdapter:
    return OnnxRuntimeAdapter(device, step_count)
