"""The Keras 3 adapter: ``keras.layers`` normalization layers and ``keras.optimizers``, gradients
from the backend's own autodiff.

Backend.  Keras picks its backend from ``KERAS_BACKEND`` when it is first imported; without it,
Keras defaults to TensorFlow.  Creating this adapter sets ``KERAS_BACKEND=jax`` unless the variable
is already set (a user's choice is respected; ``KERAS_BACKEND=torch`` runs the same mappings on the
torch backend) and, for JAX, enables ``jax_enable_x64`` (process-global, see the jax adapter)
before Keras is imported, so that float64 layers and optimizers compute in float64.  Importing this
module imports neither Keras nor a backend.  Other backends (numpy: no autodiff; tensorflow)
are refused when the adapter is created.

Which Keras call serves each op (Keras 3.15.1 when written):

============================  ==============================================================
batch_norm                    ``keras.layers.BatchNormalization(axis, momentum, epsilon,
                              center, scale)``; moving statistics are its non-trainable
                              variables (``training=True`` updates them, ``False`` reads them)
layer_norm                    ``keras.layers.LayerNormalization(axis=axes)``
group_norm                    ``keras.layers.GroupNormalization(groups, axis)``
instance_norm                 ``keras.layers.GroupNormalization(groups=-1)`` (Keras 3 has no
                              InstanceNorm layer; its docstring points there)
rms_norm                      ``keras.layers.RMSNormalization(axis=axes)``
l2_normalize                  ``keras.ops.normalize(x, axis, order=2, epsilon=eps)``, which is
                              ``keras.layers.UnitNormalization``'s whole ``call`` (with eps
                              fixed at 1e-12 there)
============================  ==============================================================

Every layer is built with ``dtype=`` the request's dtype (a float16 layer has float16 variables:
gamma, beta and the moving statistics) and called through ``layer.stateless_call(trainable,
non_trainable, x, training=...)`` with the spec's inputs as its variables' values; the
gradients are ``jax.vjp`` (jax backend, the forward and its VJP in one ``jax.jit``, compiled
once per op, hyper-parameters, shapes and dtypes) or ``torch.autograd.grad`` (torch backend,
eager) of exactly that call.  The layers compute half-precision inputs in float32 (each casts
its input once with ``result_type(x, "float32")`` and the output back once), so their float16 and
bfloat16 gradients accumulate in float32 too; ``keras.ops.normalize`` does not upcast.

What a layer cannot express raises :class:`~conformance.adapters.Unsupported` (the case is SKIP):
BatchNormalization's cumulative average (``momentum=None``) and batch statistics in inference
(``track_running_stats=False, training=False``: Keras always normalizes with its moving
statistics then); InstanceNorm's running statistics; RMSNorm's bias, ``1 + w`` offset and
pRMSNorm; GroupNormalization's per-group affine; a batch axis 0 for GroupNormalization.  Without
a ``weight`` input, RMSNormalization (which always has a scale) runs with its initial scale of
ones.  ``track_running_stats=False`` in training reads Keras's batch statistics and discards the
moving averages it updates.

Optimizers, gradient clipping (``clipnorm``, ``global_clipnorm``): ``_keras_optim.py`` next to
this module (its docstring), dispatched by ``evaluate`` under the adapter's lock.

Known Keras numerics this adapter reports (not adapter faults; numbers in ``xfails/keras.toml``):

* float64 is float32 inside: ``keras.backend.result_type`` maps 64-bit results to 32 bits on the
  jax and torch backends, and the layers compute in ``result_type(x.dtype, "float32")``, so a
  ``dtype="float64"`` layer computes in float32 (so does ``keras.ops.mean``, hence Adafactor).
* The layers' affine form ``x * inv + (beta - mean * inv)`` cancels where x equals the mean (a
  single value per channel or group).
* ``keras.ops.normalize``: NaN gradients on zero rows (rsqrt's infinite derivative times the zero
  cotangent of the branch ``minimum`` discards), and no upcast of float16 (its squares overflow).

Not mapped: the deprecated ``LayerNormalization(rms_scaling=True)`` computes ``x * rsqrt(var(x) +
eps) * gamma``, the *variance* without centring, which no registered op computes (``layer_norm``
centres, ``rms_norm`` uses the mean square); Keras's own deprecation warning says it "incorrectly
scales the input by the variance, not the root mean square".
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from conformance.adapters import HyperParameters, OpSupport, Request, Response, Unsupported

# Framework-free helpers (jax is imported inside its functions only): the axis check, the
# builders' stateless finish and the compile cache's keys, shared with the jax adapter.
from conformance.adapters.jax_support import _axis, _frozen, _no_state, _signature
from conformance.adapters.mapping import Mapping

__all__ = ["MAPPINGS", "KerasAdapter", "import_keras", "make_adapter"]

DTYPES = ("float64", "float32", "float16", "bfloat16")
#: The backends the adapter runs (both have autodiff and float64).
BACKENDS = ("jax", "torch")


def import_keras() -> Any:
    """Keras with its backend chosen: ``KERAS_BACKEND`` if set, else jax (with x64 enabled first)."""
    backend = os.environ.setdefault("KERAS_BACKEND", "jax")
    if backend not in BACKENDS:
        raise ValueError(f"the keras adapter runs the {' and '.join(BACKENDS)} backends; "
                         f"KERAS_BACKEND={backend!r}")
    if backend == "jax":
        import jax

        # Process-global, and needed before any array is made (see the module docstring).
        jax.config.update("jax_enable_x64", True)
    import keras

    if keras.backend.backend() != backend:
        raise ValueError(f"keras was already imported with the {keras.backend.backend()!r} backend; "
                         f"KERAS_BACKEND={backend!r} takes effect only before the first import")
    return keras


# --------------------------------------------------------------------------------------------
# Backends: arrays in and out, and the forward with its VJP
# --------------------------------------------------------------------------------------------

# compute(primals, state) -> (outputs, new_state); a builder returns (compute, state, finish).
_Compute = Callable[[dict[str, Any], dict[str, Any]], tuple[dict[str, Any], dict[str, Any]]]
_Built = tuple[_Compute, dict[str, Any], Callable[[dict[str, Any]], dict[str, Any]]]


def _np_dtype(dtype: str) -> Any:
    from conformance.dtypes import np_dtype

    return np_dtype(dtype)


class JaxBackend:
    """jax arrays, ``jax.jit`` of the forward and its ``jax.vjp``."""

    name = "jax"

    def __init__(self) -> None:
        import jax

        self.jax = jax
        self.version = jax.__version__

    def tensor(self, value: Any, dtype: str | None = None) -> Any:
        jnp = self.jax.numpy
        return jnp.asarray(value) if dtype is None else jnp.asarray(value, dtype=_np_dtype(dtype))

    def numpy(self, value: Any) -> np.ndarray:
        return np.asarray(value)

    def device(self) -> str:
        device = self.jax.devices()[0]
        return f"{device.platform}:{getattr(device, 'device_kind', '')}"

    def differentiate(self, compute: _Compute) -> Callable[..., Any]:
        jax, jnp = self.jax, self.jax.numpy

        def run(primals: dict[str, Any], state: dict[str, Any], cts: dict[str, Any] | None) -> Any:
            if cts is None:
                outputs, aux = compute(primals, state)
                return outputs, aux, {}
            outputs, pullback, aux = jax.vjp(lambda p: compute(p, state), primals, has_aux=True)
            full = {k: cts[k].astype(v.dtype) if k in cts else jnp.zeros_like(v) for k, v in outputs.items()}
            (grads,) = pullback(full)
            return outputs, aux, grads

        return jax.jit(run)

    def compile(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        return self.jax.jit(fn)


class TorchBackend:
    """torch tensors (CPU), eager calls and ``torch.autograd.grad``."""

    name = "torch"

    def __init__(self) -> None:
        import torch

        self.torch = torch
        self.version = torch.__version__

    def tensor(self, value: Any, dtype: str | None = None) -> Any:
        torch = self.torch
        if isinstance(value, torch.Tensor):
            return value if dtype is None else value.to(getattr(torch, dtype))
        array = np.asarray(value)
        if dtype is None:
            dtype = "bfloat16" if array.dtype == _np_dtype("bfloat16") else str(array.dtype)
        if array.dtype.kind == "f" or array.dtype == _np_dtype("bfloat16"):
            # NumPy has no bfloat16: its values travel exactly as float32.
            array = array.astype(np.float32 if dtype == "bfloat16" else _np_dtype(dtype))
        return torch.from_numpy(np.array(array, order="C")).to(getattr(torch, dtype))  # 0-d stays 0-d

    def numpy(self, value: Any) -> np.ndarray:
        torch = self.torch
        if not isinstance(value, torch.Tensor):
            return np.asarray(value)
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            return value.float().numpy()  # float32 holding bfloat16 values
        return value.numpy().copy()

    def device(self) -> str:
        return "cpu"

    def differentiate(self, compute: _Compute) -> Callable[..., Any]:
        torch = self.torch

        def run(primals: dict[str, Any], state: dict[str, Any], cts: dict[str, Any] | None) -> Any:
            if cts is None:
                with torch.no_grad():
                    outputs, aux = compute(primals, state)
                return outputs, aux, {}
            leaves = {k: v.detach().clone().requires_grad_(True) for k, v in primals.items()}
            with torch.enable_grad():
                outputs, aux = compute(leaves, state)
                keys = [k for k in outputs if k in cts]
                found = torch.autograd.grad([outputs[k] for k in keys], list(leaves.values()),
                                            grad_outputs=[cts[k].to(outputs[k].dtype) for k in keys],
                                            allow_unused=True)
            grads = {k: torch.zeros_like(v) if g is None else g
                     for (k, v), g in zip(leaves.items(), found, strict=True)}
            return ({k: v.detach() for k, v in outputs.items()}, {k: v.detach() for k, v in aux.items()},
                    grads)

        return run

    def compile(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        return fn


def make_backend(name: str) -> JaxBackend | TorchBackend:
    return JaxBackend() if name == "jax" else TorchBackend()


# --------------------------------------------------------------------------------------------
# The adapter
# --------------------------------------------------------------------------------------------


@dataclass
class _Layer:
    """A built layer and which spec name each of its variables holds."""

    layer: Any
    trainable: list[str]        # spec input name per layer.trainable_variables entry
    non_trainable: list[str]    # spec state name per layer.non_trainable_variables entry


class KerasAdapter:
    """Keras 3 adapter (see the module docstring)."""

    name = "keras"
    #: Compiled evaluations kept (one per op, hyper-parameters, shapes and dtypes).
    CACHE_SIZE = 512

    def __init__(self) -> None:
        self.keras = import_keras()
        self.backend = make_backend(self.keras.backend.backend())
        self._compiled: OrderedDict[Any, Any] = OrderedDict()
        # The runner calls evaluate from a worker thread (per-case timeout); one that timed out
        # may still be running when the next case starts.
        self._lock = threading.Lock()

    # ----------------------------------------------------------------------------------------
    # Protocol
    # ----------------------------------------------------------------------------------------

    def info(self) -> dict[str, str]:
        backend = self.backend
        return {
            "framework": "keras",
            "version": self.keras.__version__,
            "backend": f"{backend.name} {backend.version}",
            "device": backend.device(),
            "floatx": self.keras.config.floatx(),
            "x64": "enabled (process-global)" if backend.name == "jax" else "n/a",
            "execution": ("jax.jit of layer.stateless_call + jax.vjp; jax.jit of "
                          "optimizer.stateless_apply" if backend.name == "jax" else
                          "eager layer.stateless_call + torch.autograd; optimizer.apply"),
        }

    def ops(self) -> dict[str, OpSupport]:
        found = {op: mapping.support() for op, mapping in MAPPINGS.items()}
        # The optimizers' learning_rate is a floatx (float32 by default) variable whatever the
        # parameters' dtype (_keras_optim.py): their hyper-parameters are float32 values.
        found.update({op: dataclasses.replace(mapping.support(), hparam_dtype=self.keras.config.floatx())
                      for op, mapping in self._extensions().items()})
        return found

    def _extensions(self) -> MappingProxyType[str, Mapping]:
        """The optimizer ops (``_keras_optim.py`` next to this module), each ``fn(request, adapter)``."""
        from conformance.adapters.mapping import load_extensions

        return load_extensions("_keras_")

    def evaluate(self, op: str, request: Request) -> Response:
        extension = self._extensions().get(op)
        if extension is not None:
            if request.dtype not in extension.dtypes:
                raise Unsupported(f"dtype {request.dtype}")
            with self._lock:
                return extension.fn(request, self)
        if op not in MAPPINGS:
            raise Unsupported(f"the keras adapter does not implement {op}")
        hp = HyperParameters(request.hparams, op=op, framework="Keras")
        for knob, value in MAPPINGS[op].dialect.items():   # conventions Keras has no switch for
            hp.expect(knob, value)
        b = self.backend
        primals = {k: b.tensor(v, request.dtype) for k, v in request.inputs.items()}
        compute, state, finish = MAPPINGS[op].fn(self, request, primals, hp)
        hp.check_all_read()   # implemented or refused, never ignored
        cts = None
        if request.cotangents is not None:
            cts = {k: b.tensor(v, request.dtype) for k, v in request.cotangents.items() if v is not None}
        key = (op, request.dtype, _frozen(request.hparams), _signature(request.inputs),
               _signature(request.state or {}), None if cts is None else _signature(request.cotangents))
        with self._lock:
            run = self._compiled.get(key)
            if run is None:
                run = b.differentiate(compute)
                self._compiled[key] = run
                if len(self._compiled) > self.CACHE_SIZE:
                    self._compiled.popitem(last=False)
            else:
                self._compiled.move_to_end(key)
            outputs, aux, grads = run(primals, state, cts)
        new_state = finish(aux)
        return Response(outputs=self._numpy(outputs), state=self._numpy(new_state), grads=self._numpy(grads))

    def _numpy(self, tree: dict[str, Any]) -> dict[str, np.ndarray]:
        return {k: self.backend.numpy(v) for k, v in tree.items()}

    # ----------------------------------------------------------------------------------------
    # Layers
    # ----------------------------------------------------------------------------------------

    def _layer(self, cls: Any, shape: tuple[int, ...], dtype: str, names: dict[str, str],
               **kwargs: Any) -> _Layer:
        """``cls(dtype=dtype, **kwargs)`` built for ``shape``; ``names`` maps the attribute of each
        variable (``gamma``, ``moving_mean``, ...) to the spec's name for it."""
        layer = cls(dtype=dtype, **kwargs)
        layer.build(shape)
        by_id = {id(getattr(layer, attr)): spec for attr, spec in names.items()
                 if getattr(layer, attr, None) is not None}
        return _Layer(layer, [by_id[id(v)] for v in layer.trainable_variables],
                      [by_id[id(v)] for v in layer.non_trainable_variables])

    def _call(self, built: _Layer, p: dict[str, Any], s: dict[str, Any], **kwargs: Any
              ) -> tuple[Any, dict[str, Any]]:
        """``stateless_call`` with the variables' values from the primals ``p`` (inputs) and ``s``
        (state, and initial values the request does not give); returns y and the new state."""
        trainable = [p[name] if name in p else s[name] for name in built.trainable]
        non_trainable = [s[name] for name in built.non_trainable]
        y, new = built.layer.stateless_call(trainable, non_trainable, p["x"], **kwargs)
        return y, dict(zip(built.non_trainable, new, strict=True))

    def _initial(self, built: _Layer, given: dict[str, Any], dtype: str) -> dict[str, Any]:
        """The initial values of the layer variables the request does not give (as Keras
        initializes them), as backend arrays in ``dtype``."""
        layer, b = built.layer, self.backend
        out = {}
        for v, name in [*zip(layer.trainable_variables, built.trainable, strict=True),
                        *zip(layer.non_trainable_variables, built.non_trainable, strict=True)]:
            if name not in given:
                out[name] = b.tensor(b.numpy(v.value), dtype)
        return out

    def _batch_norm(self, req: Request, x_in: dict[str, Any], hp: HyperParameters) -> _Built:
        ndim = len(req.inputs["x"].shape)
        axis = _axis(hp.take("axis"), ndim)
        momentum = hp.take("momentum")
        if momentum is None:
            raise Unsupported("momentum=None (cumulative average): keras.layers.BatchNormalization has "
                              "only an exponential moving average")
        track, training = bool(hp.take("track_running_stats")), bool(hp.take("training"))
        if not track and not training:
            raise Unsupported("track_running_stats=False in inference: keras.layers.BatchNormalization "
                              "always normalizes with its moving statistics when training=False")
        built = self._layer(self.keras.layers.BatchNormalization, tuple(req.inputs["x"].shape), req.dtype,
                            {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean",
                             "moving_variance": "running_var"},
                            axis=axis, momentum=float(momentum), epsilon=float(hp.take("eps")),
                            scale="weight" in x_in, center="bias" in x_in)
        given = {k: self.backend.tensor(v, req.dtype) for k, v in (req.state or {}).items()
                 if k in ("running_mean", "running_var")} if track else {}
        state = {**given, **self._initial(built, {**x_in, **given}, req.dtype)}

        def compute(p: dict[str, Any], s: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
            y, new = self._call(built, p, s, training=training)
            return {"y": y}, new

        def finish(new: dict[str, Any]) -> dict[str, Any]:
            # Keras keeps no batch counter: num_batches_tracked is not kept (not_kept).  Without
            # tracking the moving averages Keras updated are discarded (never read).
            return new if track else {}

        return compute, state, finish

    def _layer_norm(self, req: Request, x_in: dict[str, Any], hp: HyperParameters) -> _Built:
        shape = tuple(req.inputs["x"].shape)
        axes = sorted({_axis(a, len(shape), "axes") for a in hp.take("axes")})
        built = self._layer(self.keras.layers.LayerNormalization, shape, req.dtype,
                            {"gamma": "weight", "beta": "bias"}, axis=axes,
                            epsilon=float(hp.take("eps")), scale="weight" in x_in, center="bias" in x_in)

        def compute(p: dict[str, Any], s: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
            return {"y": self._call(built, p, s)[0]}, {}

        return compute, {}, _no_state

    def _group_layer(self, req: Request, x_in: dict[str, Any], hp: HyperParameters, groups: int) -> _Built:
        shape = tuple(req.inputs["x"].shape)
        axis = _axis(hp.take("axis"), len(shape))
        if axis == 0:
            raise Unsupported("axis 0 is the batch axis of keras.layers.GroupNormalization")
        if groups != -1 and (groups < 1 or shape[axis] % groups):
            raise Unsupported(f"keras.layers.GroupNormalization needs groups dividing the {shape[axis]} "
                              f"channels, got {groups}")
        built = self._layer(self.keras.layers.GroupNormalization, shape, req.dtype,
                            {"gamma": "weight", "beta": "bias"}, groups=groups, axis=axis,
                            epsilon=float(hp.take("eps")), scale="weight" in x_in, center="bias" in x_in)

        def compute(p: dict[str, Any], s: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
            return {"y": self._call(built, p, s)[0]}, {}

        return compute, {}, _no_state

    def _group_norm(self, req: Request, x_in: dict[str, Any], hp: HyperParameters) -> _Built:
        return self._group_layer(req, x_in, hp, int(hp.take("num_groups")))

    def _instance_norm(self, req: Request, x_in: dict[str, Any], hp: HyperParameters) -> _Built:
        if hp.take("track_running_stats"):
            raise Unsupported("track_running_stats=True: keras.layers.GroupNormalization(groups=-1) keeps "
                              "no running statistics")
        # Without running statistics these have no effect (training and eval both normalize by
        # the instance's own statistics): read, and nothing to implement.
        for name in ("training", "momentum", "momentum_convention", "running_var_correction"):
            hp.take(name)
        return self._group_layer(req, x_in, hp, -1)

    def _rms_norm(self, req: Request, x_in: dict[str, Any], hp: HyperParameters) -> _Built:
        shape = tuple(req.inputs["x"].shape)
        axes = sorted({_axis(a, len(shape), "axes") for a in hp.take("axes")})
        p_frac = float(hp.take("p"))
        if p_frac >= 0:
            n = math.prod(shape[a] for a in axes)
            if len(axes) != 1 or int(n * p_frac) != n:
                raise Unsupported(f"pRMSNorm (p={p_frac}): keras.layers.RMSNormalization takes the RMS "
                                  "over every normalized feature")
        if hp.take("weight_offset") != 0.0:
            raise Unsupported("weight_offset=1 (Gemma's 1 + w): keras.layers.RMSNormalization multiplies "
                              "by its scale as it is")
        if "bias" in x_in:
            raise Unsupported("keras.layers.RMSNormalization has no bias")
        built = self._layer(self.keras.layers.RMSNormalization, shape, req.dtype, {"scale": "weight"},
                            axis=axes, epsilon=float(hp.take("eps")))
        # Without a weight input the layer's own scale (initialized to ones) is used.
        state = self._initial(built, x_in, req.dtype)

        def compute(p: dict[str, Any], s: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
            return {"y": self._call(built, p, s)[0]}, {}

        return compute, state, _no_state

    def _l2_normalize(self, req: Request, x_in: dict[str, Any], hp: HyperParameters) -> _Built:
        ndim = len(req.inputs["x"].shape)
        axes = sorted({_axis(a, ndim, "axes") for a in hp.take("axes")})
        eps = float(hp.take("eps"))
        if eps <= 0.0:
            raise Unsupported("eps=0: keras.ops.normalize bounds rsqrt(sum x^2) by 1/epsilon")
        normalize = self.keras.ops.normalize

        def compute(p: dict[str, Any], s: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
            return {"y": normalize(p["x"], axis=axes, order=2, epsilon=eps)}, {}

        return compute, {}, _no_state


#: The Keras normalizers: each op's builder (a :class:`KerasAdapter` method), the convention knobs
#: of the specs' ``keras`` dialect tables (layout and numeric values deliberately absent), the
#: Keras call, and the state Keras does not keep (BatchNormalization has no batch counter).
MAPPINGS: dict[str, Mapping] = {
    "batch_norm": Mapping(
        KerasAdapter._batch_norm, api="keras.layers.BatchNormalization", dtypes=DTYPES,
        dialect={"momentum_convention": "old_weight", "running_var_correction": 0,
                 "single_value": "allow"},
        not_kept=("num_batches_tracked",)),
    "layer_norm": Mapping(KerasAdapter._layer_norm, api="keras.layers.LayerNormalization", dtypes=DTYPES),
    "group_norm": Mapping(KerasAdapter._group_norm, api="keras.layers.GroupNormalization", dtypes=DTYPES,
                          dialect={"affine": "per_channel"}),
    "instance_norm": Mapping(KerasAdapter._instance_norm, api="keras.layers.GroupNormalization(groups=-1)",
                             dtypes=DTYPES, dialect={"single_value": "allow"}),
    "rms_norm": Mapping(KerasAdapter._rms_norm, api="keras.layers.RMSNormalization", dtypes=DTYPES,
                        dialect={"eps_placement": "inside"}),
    "l2_normalize": Mapping(
        KerasAdapter._l2_normalize, dtypes=DTYPES,
        api="keras.ops.normalize(order=2) (keras.layers.UnitNormalization's call, eps 1e-12 there)",
        dialect={"eps_clamps": "norm"}),
}


def make_adapter() -> KerasAdapter:
    """The keras adapter; sets ``KERAS_BACKEND`` (default jax) and, for jax, ``jax_enable_x64``."""
    return KerasAdapter()
