"""The ONNX reference adapter: one-node ONNX models run by ``onnx.reference.ReferenceEvaluator``,
the ONNX project's own NumPy implementation of its operators.

The models and mappings are the ``onnxruntime`` adapter's (``_onnx_models.py``, where the
per-op table and the ONNX conventions are documented), plus the training operators of the
``ai.onnx.preview.training`` domain that have a reference implementation, as optimizer steps:
``Momentum`` -> ``sgd``, ``Adam`` -> ``adam``, ``Adagrad`` -> ``adagrad``.  Forward-only
(``gradients=False``), float32 attributes (``hparam_dtype="float32"``).

Dtypes: what each operator's ONNX type constraints allow among float64, float32 and float16
(the training operators: float and double), an op declared where its operators run in the
installed onnx (found by trying, as the onnxruntime adapter does).  The evaluator computes with
NumPy in the input's dtype; its results are judged like any framework's.  Each model and its
evaluator are built once per (operator, dtypes, shapes, attributes).  Models import the installed
onnx's highest opset.

``make_adapter(step_count="one_based")`` passes the training operators ``T`` = the 1-based
number of this step instead of the steps taken before it (see ``_onnx_models.py``): the
diagnosis of the Adam finding (xfails/onnx_reference.toml).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator

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

__all__ = ["OnnxReferenceAdapter", "make_adapter"]


class OnnxReferenceAdapter:
    name = "onnx_reference"

    def __init__(self, step_count: str = "taken") -> None:
        if step_count not in STEP_COUNTS:
            raise ValueError(f"step_count must be one of {STEP_COUNTS}, got {step_count!r}")
        self.step_count = step_count
        self.max_opset = onnx.defs.onnx_opset_version()
        self._evaluators: dict[Node, Any] = {}
        self._dtypes: dict[str, tuple[str, ...]] | None = None

    def run(self, node: Node, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The node's outputs for ``feeds`` (the evaluator built once per node)."""
        evaluator = self._evaluators.get(node)
        if evaluator is None:
            evaluator = self._evaluators[node] = ReferenceEvaluator(build_model(node, self.max_opset))
        with np.errstate(all="ignore"):   # the operators' own overflow and 0/0 are results here
            return [np.asarray(y) for y in evaluator.run([name for name, _, _ in node.outputs], feeds)]

    def info(self) -> dict[str, str]:
        info = {"framework": "onnx", "version": onnx.__version__, "device": "cpu",
                "evaluator": "onnx.reference.ReferenceEvaluator", "opset": str(self.max_opset)}
        if self.step_count != "taken":
            info["step_count"] = self.step_count
        return info

    def ops(self) -> dict[str, OpSupport]:
        if self._dtypes is None:   # what the installed onnx has (RMSNormalization needs opset 23)
            self._dtypes = {op: tuple(dt for dt in mapping.dtypes if runs(self.run, op, dt))
                            for op, mapping in MAPPINGS.items()}
        return {op: declared(op, dtypes, self.step_count) for op, dtypes in self._dtypes.items() if dtypes}

    def evaluate(self, op: str, request: Request) -> Response:
        support = self.ops().get(op)
        if support is not None and request.dtype not in support.dtypes:
            raise Unsupported(f"ONNX's {support.api} does not take {request.dtype}")
        return evaluate(op, request, self.run, "onnx_reference", self.step_count)


def make_adapter(step_count: str = "taken") -> OnnxReferenceAdapter:
    return OnnxReferenceAdapter(step_count)
