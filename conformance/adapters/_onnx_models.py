"""One-node ONNX models for normref's ops: what the ``onnxruntime`` and ``onnx_reference``
adapters share (only how a model is run differs between them).

Each mapping reads a request's hyper-parameters (implemented or refused, never ignored), builds
the arrays an ONNX operator takes, and runs one node through the adapter's runner: a
:class:`Node` (operator, schema version, input names, dtypes and shapes, attributes) is the cache
key under which the adapter builds the model once and keeps its session.  Layout is adapted
exactly, outside the model: a channel axis is moved to 1 (ONNX's ``(N, C, D1, ...)``) and
normalized axes are permuted to the end, as an exporter's Transpose nodes would do; nothing is
computed outside the operator.

=======================  ====================================================================
op                       ONNX operator (default domain unless said)
=======================  ====================================================================
batch_norm               ``BatchNormalization`` (15): ``training_mode=1`` for batch statistics
                         (outputs Y, running_mean, running_var), 0 with the running statistics
layer_norm               ``LayerNormalization`` (17): ``axis`` = the first normalized axis
group_norm               ``GroupNormalization``: 21 for ``affine="per_channel"`` (scale, bias of
                         shape (C,)), 18 for ``affine="per_group"`` (shape (num_groups,))
instance_norm            ``InstanceNormalization`` (22 / 6)
rms_norm                 ``RMSNormalization`` (23)
l2_normalize             ``LpNormalization`` (22 / 1) with ``p=2``
adam                     ``ai.onnx.preview.training.Adam`` (1)
adagrad                  ``ai.onnx.preview.training.Adagrad`` (1)
sgd                      ``ai.onnx.preview.training.Momentum`` (1)
=======================  ====================================================================

Every model imports the highest opset the runtime supports (``max_opset``), except where an
older operator version is the point: GroupNormalization-18's per-group affine is imported at the
last opset before 21.  Float attributes (``epsilon``, ``momentum``, ``alpha``, ...) are float32 in
ONNX, so the adapters declare ``hparam_dtype="float32"`` and the harness rounds the
hyper-parameters to float32 for the oracle too.  ``stash_type`` is left at its default (1:
float32 statistics) except for GroupNormalization-21 on float64 inputs, whose first stage at
``stash_type=1`` casts the input to float32 (as its spec says; relative error 2e-7 on unit data
in both runtimes): the adapters pass 11 (double) there.  LayerNormalization and RMSNormalization
compute float64 inputs in float64 at the default (and the reference implements no other value).

Conventions the operators fix (each spec's ``onnx`` dialect table):

* BatchNormalization: ``running = momentum * running + (1 - momentum) * batch``
  (``momentum_convention="old_weight"``), the biased batch variance in the running variance
  (``running_var_correction=0``), one value per channel allowed; ``momentum`` is a constant
  attribute, so ``momentum=None`` (the cumulative average) is Unsupported, and the operator keeps
  no batch counter (``num_batches_tracked`` not kept).  ``scale`` and ``B`` are required inputs:
  without an affine the model gets ones and zeros (exact).
* LayerNormalization, GroupNormalization, InstanceNormalization, RMSNormalization: eps inside the
  root; a required scale is fed ones when the case has none, a required bias zeros.
  RMSNormalization has no bias, no partial RMS and no gain offset (Unsupported).
  InstanceNormalization keeps no running statistics (``track_running_stats=True`` Unsupported).
* LpNormalization has no eps (``eps=0``: a zero row gives 0 in ONNX 1.23's reference and in
  onnxruntime) and one axis (several axes are Unsupported).
* The training operators take the step count ``T`` as an input and return none: ``step`` is not
  kept (the harness supplies it).  ``T`` is "the number of training iterations conducted" (the
  Momentum text: "It should be zero in the first training iteration"; ONNX's own backend tests
  pass 0), so by default the adapters pass the steps taken before this one (0 at the first
  step).  With that count Momentum's first step applies ``beta=1`` (``first_step="clone"``, with
  ``beta = 1 - dampening``, a float32 attribute: a dampening whose ``1 - dampening`` is not a
  float32 value, such as 0.1, is Unsupported) and Adagrad's ``R / (1 + T decay_factor)`` is torch's
  ``lr / (1 + (t - 1) lr_decay)``; Adam's ``R sqrt(1 - beta^T) / (1 - alpha^T)`` (eps added to
  ``sqrt(H)``: ``adam_eps_mode="eps_hat"``) is Kingma and Ba's bias correction only with
  ``T = t`` (1-based), so with ``T = t - 1`` it is skipped at the first step and one step behind
  afterwards (a finding: see xfails/onnx_reference.toml).  ``step_count="one_based"`` passes
  ``T = t`` instead (then Momentum's first step applies ``beta``: ``first_step="zeros"``).
  ``norm_coefficient`` is the coupled L2 decay (``weight_decay_mode="l2"``); a
  ``weight_decay_mask`` becomes one node per group (the decayed parameters and the others,
  ``norm_coefficient=0``), each node optimizing its tensors together (the operators'
  multi-tensor form).  Adam's ``norm_coefficient_post`` scales the parameters *after* the update,
  ``(1 - c) (X - u)``, neither lr-scaled nor before it: no ``weight_decay_mode`` value expresses
  it, so decoupled decay (and ``adamw``, whose point it is) is Unsupported; nor is AMSGrad in
  ONNX.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from conformance.adapters import HyperParameters, OpSupport, Request, Response, Unsupported
from conformance.adapters.mapping import Mapping, OptimizerRequest

__all__ = ["MAPPINGS", "STEP_COUNTS", "TRAINING_DOMAIN", "Node", "OnnxCall", "OnnxStep", "Runner",
           "build_model", "declared", "probe_nodes", "runs"]

#: The domain of ONNX's optimizer operators.
TRAINING_DOMAIN = "ai.onnx.preview.training"

#: ONNX element types (``TensorProto`` values) of the dtypes the adapters use.  bfloat16 has no
#: NumPy dtype ONNX Runtime's Python binding accepts (and the CPU kernels lack it).
ELEMENT_TYPES = {"float64": 11, "float32": 1, "float16": 10, "int64": 7}

#: How the training operators' ``T`` input counts (see the module docstring).
STEP_COUNTS = ("taken", "one_based")


@dataclass(frozen=True)
class Node:
    """A one-node model, the key under which an adapter caches the model and its session.

    ``inputs`` and ``outputs``: ``(name, dtype, shape)`` (an output's shape None: inferred);
    ``attributes``: sorted ``(name, value)`` pairs; ``version``: the operator's schema version
    (None: the newest the runtime's opset has)."""

    op_type: str
    inputs: tuple[tuple[str, str, tuple[int, ...]], ...]
    outputs: tuple[tuple[str, str, tuple[int, ...] | None], ...]
    attributes: tuple[tuple[str, Any], ...] = ()
    version: int | None = None
    domain: str = ""


#: ``run(node, feeds) -> outputs`` (in ``node.outputs`` order): how an adapter executes a node.
Runner = Callable[[Node, dict[str, np.ndarray]], list[np.ndarray]]


@functools.cache
def opset_for(op_type: str, version: int | None, max_opset: int) -> int:
    """The highest default-domain opset <= ``max_opset`` in which ``op_type`` is ``version``."""
    import onnx

    for opset in range(max_opset, 0, -1):
        try:
            since = onnx.defs.get_schema(op_type, opset).since_version
        except onnx.defs.SchemaError:   # not in the installed onnx (RMSNormalization before 1.18)
            break
        if version is None or since == version:
            return opset
        if since < version:
            break
    raise Unsupported(f"{op_type}-{version} is not in any opset up to {max_opset}")


def build_model(node: Node, max_opset: int) -> Any:
    """The ``onnx.ModelProto`` of ``node``: one graph input per operator input, its outputs, the
    opset of the wanted operator version, the lowest IR version that opset needs."""
    from onnx import helper

    def info(name: str, dtype: str, shape: Sequence[int] | None) -> Any:
        return helper.make_tensor_value_info(name, ELEMENT_TYPES[dtype],
                                             None if shape is None else list(shape))

    onnx_node = helper.make_node(node.op_type, [n for n, _, _ in node.inputs],
                                 [n for n, _, _ in node.outputs], domain=node.domain or None,
                                 **dict(node.attributes))
    graph = helper.make_graph([onnx_node], f"normref_{node.op_type}",
                              [info(*i) for i in node.inputs], [info(*o) for o in node.outputs])
    if node.domain:
        imports = [helper.make_opsetid("", max_opset), helper.make_opsetid(node.domain, node.version or 1)]
    else:
        imports = [helper.make_opsetid("", opset_for(node.op_type, node.version, max_opset))]
    model = helper.make_model(graph, opset_imports=imports, producer_name="normref")
    model.ir_version = helper.find_min_ir_version_for(imports, ignore_unknown=True)
    return model


# --------------------------------------------------------------------------------------------
# One request
# --------------------------------------------------------------------------------------------


def _float_attributes(attributes: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """Attributes as a sorted, hashable tuple; floats as Python floats (ONNX stores FLOAT as
    float32: the harness has already rounded the hyper-parameters to it)."""
    out = []
    for name, value in sorted(attributes.items()):
        if isinstance(value, (float, np.floating)):
            value = float(value)
        out.append((name, value))
    return tuple(out)


def _dtype_name(array: np.ndarray) -> str:
    return "int64" if array.dtype == np.int64 else str(array.dtype)


def _node(op_type: str, inputs: Sequence[tuple[str, np.ndarray]], outputs: Sequence[str], dtype: str,
          attributes: dict[str, Any], version: int | None, domain: str) -> Node:
    """The :class:`Node` of ``op_type`` on ``inputs`` (its names, dtypes and shapes)."""
    return Node(op_type, tuple((n, _dtype_name(a), tuple(a.shape)) for n, a in inputs),
                tuple((n, dtype, None) for n in outputs), _float_attributes(attributes), version, domain)


class _Runs:
    """What a normalizer call and an optimizer step share: the runner and one node's call."""

    request: Request
    runner: Runner

    def array(self, value: Any, dtype: str | None = None) -> np.ndarray:
        """A C-contiguous array in the request's dtype (or ``dtype``)."""
        return np.ascontiguousarray(np.asarray(value, dtype=dtype or self.request.dtype))

    def node(self, op_type: str, inputs: Sequence[tuple[str, np.ndarray]], outputs: Sequence[str], *,
             version: int | None = None, domain: str = "", **attributes: Any) -> list[np.ndarray]:
        """Run one ``op_type`` node on ``inputs`` (name, array), returning ``outputs``."""
        arrays = [(name, self.array(a, _dtype_name(np.asarray(a)))) for name, a in inputs]
        key = _node(op_type, arrays, outputs, self.request.dtype, attributes, version, domain)
        return self.runner(key, dict(arrays))


class OnnxCall(HyperParameters, _Runs):
    """A normalizer request: its arrays in the request's dtype and its hyper-parameters to read."""

    def __init__(self, request: Request, runner: Runner, framework: str) -> None:
        super().__init__(request.hparams, op=request.op, framework=framework)
        self.request = request
        self.runner = runner
        self.unread = {k for k, v in request.inputs.items() if v is not None}

    def input(self, name: str) -> np.ndarray | None:
        self.unread.discard(name)
        value = self.request.inputs.get(name)
        return None if value is None else self.array(value)

    def state(self, name: str) -> np.ndarray | None:
        value = (self.request.state or {}).get(name)
        return None if value is None else self.array(value)

    def filled(self, value: np.ndarray | None, shape: tuple[int, ...], fill: float) -> np.ndarray:
        """A required ONNX input the case does not have: the neutral ``fill`` (1 for a scale,
        0 for a bias), so the op's math is the one without it."""
        return self.array(np.full(shape, fill)) if value is None else value

    def check_all_read(self, op: str | None = None) -> None:
        if self.unread:
            names = ", ".join(f"input {k}" for k in sorted(self.unread))
            raise Unsupported(f"the ONNX mapping of {op or self.op} does not implement its {names}")
        super().check_all_read(op)


def _axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise Unsupported(f"axis {axis} is out of range for {ndim} dims")
    return axis % ndim


def _channels_first(c: OnnxCall, x: np.ndarray, axis: int) -> tuple[np.ndarray, int]:
    """``x`` with the channel axis moved to 1 (ONNX's layout), and that axis."""
    axis = _axis(axis, x.ndim)
    if axis == 0:
        raise Unsupported(f"{c.op}: axis 0 is the batch axis of the ONNX layout (N, C, D1, ...)")
    return np.moveaxis(x, axis, 1), axis


def _trailing(x: np.ndarray, axes: Any) -> tuple[list[int], list[int] | None]:
    """The normalized axes in increasing order and the permutation moving them to the end
    (None when they are already the trailing axes): ONNX normalizes axes ``axis..r-1``."""
    axes = sorted(_axis(a, x.ndim) for a in (axes if isinstance(axes, (list, tuple)) else [axes]))
    if len(set(axes)) != len(axes):
        raise Unsupported(f"repeated normalized axes {axes}")
    perm = [a for a in range(x.ndim) if a not in axes] + axes
    return axes, (None if perm == list(range(x.ndim)) else perm)


def _unpermute(y: np.ndarray, perm: list[int] | None) -> np.ndarray:
    return y if perm is None else np.transpose(y, np.argsort(perm))


# --------------------------------------------------------------------------------------------
# The normalizers
# --------------------------------------------------------------------------------------------


def batch_norm(c: OnnxCall) -> Response:
    """BatchNormalization-15: ``training_mode=1`` (batch statistics; three outputs, the running
    statistics updated) or 0 (the running statistics normalize)."""
    for knob, value in MAPPINGS["batch_norm"].dialect.items():
        c.expect(knob, value)
    training, track = c.take("training"), c.take("track_running_stats")
    axis, eps, momentum = c.take("axis"), c.take("eps"), c.take("momentum")
    x, axis = _channels_first(c, c.input("x"), axis)
    channels = (int(x.shape[1]),)
    scale = c.filled(c.input("weight"), channels, 1.0)
    bias = c.filled(c.input("bias"), channels, 0.0)
    if track:
        mean, var = c.state("running_mean"), c.state("running_var")
        if mean is None or var is None:
            raise Unsupported("track_running_stats=True needs running_mean and running_var")
        if momentum is None and training:
            raise Unsupported("ONNX BatchNormalization's momentum is a constant attribute: "
                              "no cumulative average (momentum=None)")
    else:   # the running-statistics inputs are required but unused (no state is returned)
        mean, var = c.filled(None, channels, 0.0), c.filled(None, channels, 1.0)
    inputs = [("X", x), ("scale", scale), ("B", bias), ("input_mean", mean), ("input_var", var)]
    attributes = {"epsilon": eps, "momentum": 0.9 if momentum is None else momentum}
    c.check_all_read("batch_norm")
    if training or not track:   # batch statistics; training_mode=1 must name all three outputs
        y, running_mean, running_var = c.node("BatchNormalization", inputs,
                                              ["Y", "running_mean", "running_var"],
                                              training_mode=1, **attributes)
    else:
        (y,) = c.node("BatchNormalization", inputs, ["Y"], training_mode=0, **attributes)
        running_mean, running_var = mean, var   # inference leaves the running statistics as they are
    state = {"running_mean": running_mean, "running_var": running_var} if track else {}
    return Response(outputs={"y": np.moveaxis(y, 1, axis)}, state=state)


def layer_norm(c: OnnxCall) -> Response:
    """LayerNormalization-17 over ``axis..r-1`` (other normalized axes permuted to the end)."""
    axes, eps = c.take("axes"), c.take("eps")
    x, weight, bias = c.input("x"), c.input("weight"), c.input("bias")
    normalized, perm = _trailing(x, axes)
    xt = x if perm is None else np.transpose(x, perm)
    shape = tuple(int(x.shape[a]) for a in normalized)
    inputs = [("X", xt), ("Scale", c.filled(weight, shape, 1.0))]
    if bias is not None:
        inputs.append(("B", bias))
    c.check_all_read("layer_norm")
    (y,) = c.node("LayerNormalization", inputs, ["Y"], axis=x.ndim - len(normalized), epsilon=eps)
    return Response(outputs={"y": _unpermute(y, perm)})


def group_norm(c: OnnxCall) -> Response:
    """GroupNormalization-21 (scale, bias per channel) or -18 (per group), channels on axis 1."""
    affine, num_groups = c.take("affine"), c.take("num_groups")
    axis, eps = c.take("axis"), c.take("eps")
    x, axis = _channels_first(c, c.input("x"), axis)
    per_channel = affine == "per_channel"
    shape = (int(x.shape[1]) if per_channel else num_groups,)
    scale = c.filled(c.input("weight"), shape, 1.0)
    bias = c.filled(c.input("bias"), shape, 0.0)
    # GroupNormalization-21's first stage runs in stash_type's precision, float32 by default
    # (its spec: "casts all input variables to 32-bit float"): 11 (double) for float64 inputs.
    stash = {"stash_type": 11} if per_channel and c.request.dtype == "float64" else {}
    c.check_all_read("group_norm")
    (y,) = c.node("GroupNormalization", [("X", x), ("scale", scale), ("bias", bias)], ["Y"],
                  version=21 if per_channel else 18, num_groups=num_groups, epsilon=eps, **stash)
    return Response(outputs={"y": np.moveaxis(y, 1, axis)})


def instance_norm(c: OnnxCall) -> Response:
    """InstanceNormalization: the instance's statistics in training and inference alike."""
    c.expect("single_value", "allow")
    if c.take("track_running_stats"):
        raise Unsupported("ONNX InstanceNormalization keeps no running statistics "
                          "(track_running_stats=True)")
    # Without running statistics these have no effect: read, nothing to implement.
    for name in ("training", "momentum", "momentum_convention", "running_var_correction"):
        c.take(name)
    axis, eps = c.take("axis"), c.take("eps")
    x, axis = _channels_first(c, c.input("x"), axis)
    channels = (int(x.shape[1]),)
    scale = c.filled(c.input("weight"), channels, 1.0)
    bias = c.filled(c.input("bias"), channels, 0.0)
    c.check_all_read("instance_norm")
    (y,) = c.node("InstanceNormalization", [("input", x), ("scale", scale), ("B", bias)], ["output"],
                  epsilon=eps)
    return Response(outputs={"y": np.moveaxis(y, 1, axis)})


def rms_norm(c: OnnxCall) -> Response:
    """RMSNormalization-23 over ``axis..r-1``: ``X / sqrt(mean(X^2) + epsilon) * scale``."""
    c.expect("eps_placement", "inside")
    c.expect("weight_offset", 0.0, why="RMSNormalization multiplies by its scale input as it is")
    axes, eps, p = c.take("axes"), c.take("eps"), c.take("p")
    if p >= 0:
        raise Unsupported(f"ONNX RMSNormalization has no partial RMS (p={p})")
    if c.request.inputs.get("bias") is not None:
        raise Unsupported("ONNX RMSNormalization has no bias input")
    x, weight = c.input("x"), c.input("weight")
    normalized, perm = _trailing(x, axes)
    xt = x if perm is None else np.transpose(x, perm)
    shape = tuple(int(x.shape[a]) for a in normalized)
    c.check_all_read("rms_norm")
    (y,) = c.node("RMSNormalization", [("X", xt), ("scale", c.filled(weight, shape, 1.0))], ["Y"],
                  axis=x.ndim - len(normalized), epsilon=eps)
    return Response(outputs={"y": _unpermute(y, perm)})


def l2_normalize(c: OnnxCall) -> Response:
    """LpNormalization with ``p=2`` over one axis: ``x / ||x||``, no eps."""
    c.expect("eps", 0.0, why="LpNormalization has no eps")
    c.expect("eps_clamps", "norm")
    axes = c.take("axes")
    x = c.input("x")
    axes = axes if isinstance(axes, (list, tuple)) else [axes]
    if len(axes) != 1:
        raise Unsupported(f"ONNX LpNormalization normalizes over one axis, not {list(axes)}")
    c.check_all_read("l2_normalize")
    (y,) = c.node("LpNormalization", [("input", x)], ["output"], axis=_axis(axes[0], x.ndim), p=2)
    return Response(outputs={"y": y})


# --------------------------------------------------------------------------------------------
# The optimizers (ai.onnx.preview.training)
# --------------------------------------------------------------------------------------------


class OnnxStep(OptimizerRequest, _Runs):
    """An optimizer request as one node per parameter group."""

    def __init__(self, request: Request, runner: Runner, framework: str, step_count: str = "taken") -> None:
        super().__init__(request)
        self.framework = framework
        self.runner = runner
        if step_count not in STEP_COUNTS:
            raise ValueError(f"step_count must be one of {STEP_COUNTS}, got {step_count!r}")
        self.step_count_mode = step_count

    @property
    def T(self) -> np.ndarray:  # noqa: N802 - the operators' name for it
        """The operators' update count: the steps taken (0 at the first step), or the 1-based
        number of this step with ``step_count="one_based"``."""
        return np.asarray(self.step_count + (self.step_count_mode == "one_based"), dtype=np.int64)

    def decay_groups(self, weight_decay: float) -> list[tuple[list[str], float]]:
        """``(paths, norm_coefficient)`` per node: the masked parameters and the others."""
        where = self.mask("weight_decay_mask")
        groups = [([p for p in self.paths if where[p]], weight_decay),
                  ([p for p in self.paths if not where[p]], 0.0)]
        return [(paths, wd) for paths, wd in groups if paths]

    def multi(self, op_type: str, paths: list[str], lr: float,
              slots: Sequence[tuple[str, dict[str, np.ndarray]]], **attributes: Any) -> list[np.ndarray]:
        """One ``op_type`` node over ``paths``: inputs R, T, the X's, G's and each slot's tensors;
        outputs the new X's and each slot's new tensors (in that order)."""
        inputs: list[tuple[str, np.ndarray]] = [("R", self.array(lr)), ("T", self.T)]
        inputs += [(f"X{i}", self.params[p]) for i, p in enumerate(paths)]
        inputs += [(f"G{i}", self.grads[p]) for i, p in enumerate(paths)]
        names = ["X"]
        for slot, values in slots:
            inputs += [(f"{slot}{i}", values[p]) for i, p in enumerate(paths)]
            names.append(slot)
        outputs = [f"{n}{i}_new" for n in names for i in range(len(paths))]
        return self.node(op_type, inputs, outputs, domain=TRAINING_DOMAIN, version=1, **attributes)

    def slot_or_zeros(self, name: str) -> dict[str, np.ndarray]:
        found = self.slot(name) or {}
        return {p: found.get(p, np.zeros_like(self.params[p])) for p in self.paths}


def _split(outputs: list[np.ndarray], paths: list[str],
           names: Sequence[str]) -> dict[str, dict[str, np.ndarray]]:
    """A multi-tensor node's outputs (each name's tensors in ``paths`` order) by name and path."""
    n = len(paths)
    return {name: dict(zip(paths, outputs[k * n:(k + 1) * n], strict=True)) for k, name in enumerate(names)}


def _respond(c: OnnxStep, new: dict[str, dict[str, np.ndarray]], slots: Sequence[str]) -> Response:
    outputs = {f"params/{p}": v for p, v in new["X"].items()}
    state = {f"{slot}/{p}": v for slot in slots for p, v in new[slot].items()}
    return Response(outputs=outputs, state=state)


def sgd(c: OnnxStep) -> Response:
    """Momentum: ``V = alpha V + beta_T G``, ``X -= R V`` (Nesterov: ``X -= R (G + alpha V)``),
    with ``alpha = momentum``, ``beta = 1 - dampening`` and ``beta_0 = 1``."""
    c.expect("lr_placement", "outside")
    c.expect("first_step", "clone" if c.step_count_mode == "taken" else "zeros")
    c.expect("momentum_correction", False)
    c.expect("weight_decay_mode", "l2")
    wd, lr = c.take("weight_decay"), c.take("lr")
    momentum, dampening, nesterov = c.take("momentum"), c.take("dampening"), c.take("nesterov")
    groups = c.decay_groups(wd)
    c.check_all_read("sgd")
    # Without momentum the oracle keeps no buffer and ignores dampening (torch too): alpha = 0,
    # beta = 1 is plain SGD, X -= R G, and the zero buffer fed in is discarded.
    keep = momentum != 0.0
    beta = 1.0 - dampening if keep else 1.0
    if float(np.float32(beta)) != beta:
        # beta is a float32 attribute: 1 - dampening must be one (it is for dampening >= 0.5 or
        # dyadic, and for every dampening = 1 - beta of an ONNX model's float32 beta).
        raise Unsupported(f"ONNX Momentum's beta = 1 - dampening is a float32 attribute and "
                          f"1 - {dampening!r} is not a float32 value")
    buffers = c.slot_or_zeros("momentum_buffer")
    new: dict[str, dict[str, np.ndarray]] = {"X": {}, "V": {}}
    for paths, coefficient in groups:
        out = c.multi("Momentum", paths, lr, [("V", buffers)], alpha=momentum,
                      beta=beta, norm_coefficient=coefficient,
                      mode="nesterov" if nesterov and keep else "standard")
        for name, values in _split(out, paths, ["X", "V"]).items():
            new[name].update(values)
    new["momentum_buffer"] = new.pop("V")
    return _respond(c, new, ["momentum_buffer"] if keep else [])


def adam(c: OnnxStep) -> Response:
    """Adam: ``V``, ``H`` EMAs of ``G`` and ``G^2``, ``X -= R sqrt(1 - beta^T) / (1 - alpha^T)
    V / (sqrt(H) + epsilon)`` (``R`` alone at ``T = 0``)."""
    c.expect("adam_eps_mode", "eps_hat")
    c.expect("amsgrad", False, why="ONNX Adam has no AMSGrad")
    c.take("amsgrad_max_of")   # no effect without AMSGrad
    c.expect("weight_decay_mode", "l2",
             why="norm_coefficient is the coupled L2 decay; norm_coefficient_post scales the "
                 "parameters after the update, (1 - c)(X - u), which no weight_decay_mode expresses")
    wd, lr = c.take("weight_decay"), c.take("lr")
    beta1, beta2, eps = c.take("beta1"), c.take("beta2"), c.take("eps")
    groups = c.decay_groups(wd)
    c.check_all_read("adam")
    m, v = c.slot_or_zeros("exp_avg"), c.slot_or_zeros("exp_avg_sq")
    new: dict[str, dict[str, np.ndarray]] = {"X": {}, "V": {}, "H": {}}
    for paths, coefficient in groups:
        out = c.multi("Adam", paths, lr, [("V", m), ("H", v)], alpha=beta1, beta=beta2, epsilon=eps,
                      norm_coefficient=coefficient, norm_coefficient_post=0.0)
        for name, values in _split(out, paths, ["X", "V", "H"]).items():
            new[name].update(values)
    new["exp_avg"], new["exp_avg_sq"] = new.pop("V"), new.pop("H")
    return _respond(c, new, ["exp_avg", "exp_avg_sq"])


def adagrad(c: OnnxStep) -> Response:
    """Adagrad: ``H += G^2``, ``X -= R / (1 + T decay_factor) G / (sqrt(H) + epsilon)``; the
    accumulator starts as the caller's (the state's) ``H``."""
    c.expect("eps_placement", "outside")
    c.expect("empty_accumulator", "divide")
    c.expect("weight_decay_mode", "l2")
    c.take("initial_accumulator_value")   # the state's sum: the caller's initial H
    wd, lr, lr_decay, eps = c.take("weight_decay"), c.take("lr"), c.take("lr_decay"), c.take("eps")
    groups = c.decay_groups(wd)
    c.check_all_read("adagrad")
    sums = c.slot_or_zeros("sum")
    new: dict[str, dict[str, np.ndarray]] = {"X": {}, "H": {}}
    for paths, coefficient in groups:
        out = c.multi("Adagrad", paths, lr, [("H", sums)], decay_factor=lr_decay, epsilon=eps,
                      norm_coefficient=coefficient)
        for name, values in _split(out, paths, ["X", "H"]).items():
            new[name].update(values)
    new["sum"] = new.pop("H")
    return _respond(c, new, ["sum"])


# --------------------------------------------------------------------------------------------
# The records
# --------------------------------------------------------------------------------------------

#: The dtypes the ONNX schemas allow that a NumPy array can carry (the normalizers' T also
#: allows bfloat16; the training operators' T3 only float and double).
_FLOATS = ("float64", "float32", "float16")
_TRAINING_FLOATS = ("float64", "float32")

#: Each op: its mapping, the ONNX operator, the dtypes ONNX allows, the conventions the
#: operator fixes (the specs' ``onnx`` dialect tables without layout and numeric values) and the
#: state it does not keep.  A runtime declares the subset of dtypes it has kernels for.
MAPPINGS: dict[str, Mapping] = {
    "batch_norm": Mapping(batch_norm, api="BatchNormalization-15 (training_mode 1 / 0)", dtypes=_FLOATS,
                          dialect={"momentum_convention": "old_weight", "running_var_correction": 0,
                                   "single_value": "allow"},
                          not_kept=("num_batches_tracked",)),
    "layer_norm": Mapping(layer_norm, api="LayerNormalization-17", dtypes=_FLOATS),
    "group_norm": Mapping(group_norm, api="GroupNormalization-21 (per_channel) / -18 (per_group)",
                          dtypes=_FLOATS, dialect={"affine": {"per_channel", "per_group"}}),
    "instance_norm": Mapping(instance_norm, api="InstanceNormalization", dtypes=_FLOATS,
                             dialect={"single_value": "allow"}),
    "rms_norm": Mapping(rms_norm, api="RMSNormalization-23", dtypes=_FLOATS,
                        dialect={"eps_placement": "inside"}),
    "l2_normalize": Mapping(l2_normalize, api="LpNormalization (p=2)", dtypes=_FLOATS,
                            dialect={"eps": 0.0, "eps_clamps": "norm"}),
    "sgd": Mapping(sgd, api="ai.onnx.preview.training.Momentum-1", dtypes=_TRAINING_FLOATS,
                   dialect={"lr_placement": "outside", "first_step": "clone",
                            "momentum_correction": False, "weight_decay_mode": "l2"},
                   not_kept=("step",)),
    "adam": Mapping(adam, api="ai.onnx.preview.training.Adam-1", dtypes=_TRAINING_FLOATS,
                    dialect={"adam_eps_mode": "eps_hat", "weight_decay_mode": "l2"},
                    not_kept=("step",)),
    "adagrad": Mapping(adagrad, api="ai.onnx.preview.training.Adagrad-1", dtypes=_TRAINING_FLOATS,
                       dialect={"eps_placement": "outside", "empty_accumulator": "divide",
                                "weight_decay_mode": "l2"},
                       not_kept=("step",)),
}

OPTIMIZERS = ("sgd", "adam", "adagrad")


def declared(op: str, dtypes: Sequence[str], step_count: str = "taken") -> OpSupport:
    """The ``OpSupport`` an adapter declares for ``op`` in ``dtypes``: forward only, float32
    attributes; with ``step_count="one_based"`` Momentum's first step applies beta."""
    mapping = MAPPINGS[op]
    dialect = dict(mapping.dialect)
    if op == "sgd" and step_count == "one_based":
        dialect["first_step"] = "zeros"
    return dataclasses.replace(mapping.support(), dialect=dialect, dtypes=tuple(dtypes),
                               gradients=False, hparam_dtype="float32")


def evaluate(op: str, request: Request, runner: Runner, framework: str,
             step_count: str = "taken") -> Response:
    """``request`` through ``op``'s mapping with ``runner``."""
    mapping = MAPPINGS.get(op)
    if mapping is None:
        raise Unsupported(f"the {framework} adapter does not implement {op}")
    if op in OPTIMIZERS:
        return mapping.fn(OnnxStep(request, runner, framework, step_count))
    return mapping.fn(OnnxCall(request, runner, framework))


def runs(runner: Runner, op: str, dtype: str) -> bool:
    """Whether ``runner`` runs every ONNX operator ``op`` maps to in ``dtype`` (its
    :func:`probe_nodes`): how the adapters find what they declare."""
    try:
        for node, feeds in probe_nodes(op, dtype):
            runner(node, feeds)
    except Exception:   # no kernel or no schema (Unsupported), or one that fails: not declared
        return False
    return True


def probe_nodes(op: str, dtype: str) -> list[tuple[Node, dict[str, np.ndarray]]]:
    """Small nodes (with feeds) exercising each ONNX operator version ``op`` maps to in ``dtype``:
    a runtime implements ``op`` in ``dtype`` when all of them run."""
    rng = np.random.default_rng(0)

    def arr(*shape: int) -> np.ndarray:
        return np.ascontiguousarray((rng.random(shape) + 0.5).astype(dtype))

    def node(op_type: str, inputs: list[tuple[str, np.ndarray]], outputs: list[str], *,
             version: int | None = None, domain: str = "",
             **attributes: Any) -> tuple[Node, dict[str, np.ndarray]]:
        return _node(op_type, inputs, outputs, dtype, attributes, version, domain), dict(inputs)

    x, c3 = arr(2, 3, 4), arr(3)
    scalar_r, t = np.asarray(0.1, dtype=dtype), np.asarray(1, dtype=np.int64)
    probes = {
        "batch_norm": [node("BatchNormalization", [("X", x), ("scale", c3), ("B", c3), ("input_mean", c3),
                                                   ("input_var", c3)], ["Y"], training_mode=0),
                       node("BatchNormalization", [("X", x), ("scale", c3), ("B", c3), ("input_mean", c3),
                                                   ("input_var", c3)], ["Y", "running_mean", "running_var"],
                            training_mode=1)],
        "layer_norm": [node("LayerNormalization", [("X", x), ("Scale", arr(4)), ("B", arr(4))], ["Y"])],
        "group_norm": [node("GroupNormalization", [("X", arr(2, 4, 3)), ("scale", arr(4)), ("bias", arr(4))],
                            ["Y"], version=21, num_groups=2),
                       node("GroupNormalization", [("X", arr(2, 4, 3)), ("scale", arr(2)), ("bias", arr(2))],
                            ["Y"], version=18, num_groups=2)],
        "instance_norm": [node("InstanceNormalization", [("input", x), ("scale", c3), ("B", c3)],
                               ["output"])],
        "rms_norm": [node("RMSNormalization", [("X", x), ("scale", arr(4))], ["Y"])],
        "l2_normalize": [node("LpNormalization", [("input", x)], ["output"], axis=-1, p=2)],
        "sgd": [node("Momentum", [("R", scalar_r), ("T", t), ("X0", c3), ("G0", c3), ("V0", c3)],
                     ["X0_new", "V0_new"], domain=TRAINING_DOMAIN, version=1, alpha=0.9, beta=1.0,
                     norm_coefficient=0.0, mode="standard")],
        "adam": [node("Adam", [("R", scalar_r), ("T", t), ("X0", c3), ("G0", c3), ("V0", c3), ("H0", c3)],
                      ["X0_new", "V0_new", "H0_new"], domain=TRAINING_DOMAIN, version=1)],
        "adagrad": [node("Adagrad", [("R", scalar_r), ("T", t), ("X0", c3), ("G0", c3), ("H0", c3)],
                         ["X0_new", "H0_new"], domain=TRAINING_DOMAIN, version=1)],
    }
    return probes[op]
