"""The JAX adapter: Flax layers where they exist, jax.numpy formulas otherwise, jax.vjp gradients.

Which framework call serves each op (Flax 0.12.8, JAX 0.10.2 when written):

============================  ==============================================================
batch_norm                    ``flax.linen.BatchNorm`` (channels-last: the channel axis is moved
                              to the end with ``jnp.moveaxis``; ``use_running_average = not
                              (training or not track_running_stats)``)
layer_norm                    ``flax.linen.LayerNorm(reduction_axes=axes, feature_axes=axes)``
group_norm                    ``flax.linen.GroupNorm`` (channels-last, as BatchNorm)
instance_norm                 ``flax.linen.InstanceNorm`` (channels-last; no running statistics)
rms_norm                      ``flax.linen.RMSNorm(reduction_axes=axes, feature_axes=axes)``
                              with ``scale = weight_offset + weight`` (Gemma's ``1 + w``) and the
                              optional bias added after the layer
weight_norm                   ``flax.linen.WeightNorm`` wrapping a module whose ``kernel`` is v
spectral_norm                 ``flax.linen.SpectralNorm`` wrapping a module whose ``kernel`` is
                              the weight (channels-last: ``dim`` moved to the end)
weight_standardization        jax.numpy: deepmind-research ``nfnets/base.py``
                              ``WSConv2D.standardize_weight`` (Flax has no such layer)
============================  ==============================================================

Gradients are ``jax.vjp`` of exactly that computation with respect to every differentiable input
the request gives (Flax's ``scale``/``bias`` params are the spec's ``weight``/``bias``).

Dialects.  Each op declares (``MAPPINGS[op].dialect``) the convention knobs of the spec's
``flax`` dialect table (for weight standardization the ``nfnets`` table); layouts (``axis``,
``axes``, ``dim``), modes (``training``, ``track_running_stats``) and values (``eps``,
``momentum``, ``num_groups``, ...) come from the case and are passed to the layer.  What Flax
cannot express raises :class:`~conformance.adapters.Unsupported` (the case is SKIP) with the
reason.

Process-global float64.  JAX computes float64 only with ``jax_enable_x64``, a *process-global*
switch that must be set before arrays are made: :func:`make_adapter` (creating the adapter) sets
it, importing this module does not.  Any other JAX code in the same process then sees 64-bit
default dtypes (``jnp.arange(3)`` is int64, ``jnp.zeros(3)`` float64).

``use_fast_variance``.  Flax's BatchNorm, LayerNorm, GroupNorm and InstanceNorm default to
``use_fast_variance=True``: ``var = max(0, E[x^2] - E[x]^2)``, which cancels catastrophically when
|mean| >> std (the adversarial ``offset_*`` families).  That is an accuracy choice, not a
convention, so this adapter measures the two-pass formula (``fast_variance=False``) by default;
``JaxAdapter(fast_variance=True)`` measures Flax's default (save ``ADAPTER =
JaxAdapter(fast_variance=True)`` in a file and run ``normref check that_file.py``).

State and precision.  BatchNorm's ``batch_stats`` and SpectralNorm's ``u`` are kept in at least
float32 (Flax's ``force_float32_reductions`` and ``param_dtype=float32`` defaults) even for
half-precision inputs; params (weight, bias, scale) are held in the request's dtype.  Where the
adapter composes something itself (RMSNorm's bias and ``1 + w`` offset, the weight
standardization formula) it computes in at least float32 and rounds once, so it adds no rounding
of its own.  Everything is one ``jax.jit`` of the forward and its ``jax.vjp`` (the way Flax
models run), compiled once per op, hyper-parameters, shapes and dtypes.

Known Flax/JAX numerics this adapter reports (not adapter faults):

* Half precision, gradients: Flax consumes a half-precision input more than once
  (``_compute_stats`` converts it to float32, ``_normalize`` promotes it again in ``x - mean``;
  SpectralNorm's matmuls and division; WeightNorm's ``x * rsqrt(sum x*x)``) and ``jax.vjp``
  rounds the cotangent of each use to the half type and adds them there (``add_any`` in
  float16), so ``dx`` errs by u(half) times the partial terms, which cancel.
  ``JaxAdapter(upcast_half_inputs=True)`` converts each input to float32 once before the layer
  (a diagnostic, not what Flax does): then every quick-profile half-precision case passes.
* ``flax.linen.WeightNorm`` computes ``sum(x*x)`` in the kernel's dtype: a float16 kernel with
  |v| >= 256 overflows (w = 0, zero or NaN gradients).
* ``lax.rsqrt``'s derivative is ``-0.5 * rsqrt(x) / x``: it underflows to 0 for x ~ 1e300 (the
  gradient through the variance vanishes) and overflows for x ~ 1e-300 (inf gradients).

Optimizers, clipping and schedules (optax): the mapping files ``_optax_*.py`` next to this module
(sgd/adam/adamw/amsgrad, adagrad/rmsprop, lars/lamb, lion/adafactor/novograd, lookahead,
clip_by_global_norm/clip_by_block_rms/adaptive_grad_clip, the schedules), each with its own
docstring and ``MAPPINGS``, are merged into ``ops()`` and dispatched by ``evaluate`` (under the
adapter's lock).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from types import MappingProxyType
from typing import Any

import numpy as np

from conformance.adapters import HyperParameters, OpSupport, Request, Response, Unsupported
from conformance.adapters.jax_support import (
    _axis,
    _Built,
    _Compute,
    _frozen,
    _Kernel,
    _no_state,
    _np_dtype,
    _numpy,
    _signature,
    _upcast,
)
from conformance.adapters.mapping import Mapping

__all__ = ["MAPPINGS", "JaxAdapter", "make_adapter"]

DTYPES = ("float64", "float32", "float16", "bfloat16")


class JaxAdapter:
    """Flax/JAX adapter (see the module docstring)."""

    name = "jax"
    #: Compiled evaluations kept (one per op, hyper-parameters, shapes and dtypes).
    CACHE_SIZE = 512

    def __init__(self, *, fast_variance: bool = False, upcast_half_inputs: bool = False) -> None:
        import jax

        # Process-global (see the module docstring): float64 needs it before any array is made.
        jax.config.update("jax_enable_x64", True)
        import flax
        import flax.linen  # noqa: F401 - fail at creation, not per case, if Flax is missing

        self.fast_variance = bool(fast_variance)
        self.upcast_half_inputs = bool(upcast_half_inputs)
        self._jax = jax
        self._flax_version = flax.__version__
        self._compiled: OrderedDict[Any, Any] = OrderedDict()
        # The runner calls evaluate from a worker thread (per-case timeout); one that timed out
        # may still be running when the next case starts.
        self._lock = threading.Lock()

    # ----------------------------------------------------------------------------------------
    # Protocol
    # ----------------------------------------------------------------------------------------

    def info(self) -> dict[str, str]:
        jax = self._jax
        device = jax.devices()[0]
        return {
            "framework": "jax",
            "version": jax.__version__,
            "flax": self._flax_version,
            "device": f"{device.platform}:{getattr(device, 'device_kind', '')}",
            "x64": "enabled (process-global)",
            "use_fast_variance": str(self.fast_variance),
            "upcast_half_inputs": str(self.upcast_half_inputs),
            "execution": "jax.jit of forward + jax.vjp",
        }

    def ops(self) -> dict[str, OpSupport]:
        return {op: mapping.support() for op, mapping in {**MAPPINGS, **self._extensions()}.items()}

    def _extensions(self) -> MappingProxyType[str, Mapping]:
        """The ops of the other families' mapping files (``_optax_*.py`` next to this module), each
        record's ``fn(request) -> Response``."""
        from conformance.adapters.mapping import load_extensions

        return load_extensions("_optax_")

    def evaluate(self, op: str, request: Request) -> Response:
        extension = self._extensions().get(op)
        if extension is not None:
            if request.dtype not in extension.dtypes:
                raise Unsupported(f"dtype {request.dtype}")
            with self._lock:
                return extension.fn(request)
        if op not in MAPPINGS:
            raise Unsupported(f"the jax adapter does not implement {op}")
        hp = HyperParameters(request.hparams, op=op, framework="Flax")
        for knob, value in MAPPINGS[op].dialect.items():   # conventions Flax has no switch for
            hp.expect(knob, value)
        jnp = self._jax.numpy
        primals = {k: jnp.asarray(v) for k, v in request.inputs.items()}
        compute, state, finish = MAPPINGS[op].fn(self, request, primals, hp)
        hp.check_all_read()   # implemented or refused, never ignored
        cts = None
        if request.cotangents is not None:
            cts = {k: jnp.asarray(v) for k, v in request.cotangents.items() if v is not None}
        key = (op, request.dtype, _frozen(request.hparams), _signature(primals), _signature(state),
               None if cts is None else _signature(cts))
        with self._lock:
            run = self._compiled.get(key)
            if run is None:
                run = self._compile(compute)
                self._compiled[key] = run
                if len(self._compiled) > self.CACHE_SIZE:
                    self._compiled.popitem(last=False)
            else:
                self._compiled.move_to_end(key)
        outputs, aux, grads = run(primals, state, cts)
        return Response(outputs=_numpy(outputs), state=_numpy(finish(aux)), grads=_numpy(grads))

    def _compile(self, compute: _Compute) -> Any:
        """``jit`` of the forward and, given cotangents, its ``jax.vjp`` (one XLA computation)."""
        jax, jnp = self._jax, self._jax.numpy
        if self.upcast_half_inputs:
            compute = _upcast(compute)

        def run(primals: dict[str, Any], state: dict[str, Any], cts: dict[str, Any] | None) -> Any:
            if cts is None:
                outputs, aux = compute(primals, state)
                return outputs, aux, {}
            outputs, pullback, aux = jax.vjp(lambda p: compute(p, state), primals, has_aux=True)
            full = {k: cts[k].astype(v.dtype) if k in cts else jnp.zeros_like(v)
                    for k, v in outputs.items()}
            (grads,) = pullback(full)
            return outputs, aux, grads

        return jax.jit(run)

    # ----------------------------------------------------------------------------------------
    # Helpers
    # ----------------------------------------------------------------------------------------

    def _stat_dtype(self, dtype: str) -> Any:
        """Flax keeps statistics (batch_stats, SpectralNorm's u) in at least float32."""
        jnp = self._jax.numpy
        return jnp.promote_types(_np_dtype(dtype), jnp.float32)

    @staticmethod
    def _params(primals: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
        """Flax params from the spec's inputs that are given ({spec name: flax name})."""
        return {flax: primals[spec] for spec, flax in names.items() if spec in primals}

    # Each op builder returns (compute, state, finish): ``compute(primals, state)`` is a pure
    # function of arrays giving (outputs, aux) and is traced once per shape; ``state`` the arrays
    # it reads besides the inputs; ``finish(aux)`` the new state in the spec's names.

    # ----------------------------------------------------------------------------------------
    # Standardizers
    # ----------------------------------------------------------------------------------------

    def _batch_norm(self, req: Request, x_in: dict[str, Any], hp: HyperParameters) -> _Built:
        import flax.linen as nn

        jnp = self._jax.numpy
        ndim = x_in["x"].ndim
        axis = _axis(hp.take("axis"), ndim)
        momentum = hp.take("momentum")
        if momentum is None:
            raise Unsupported("momentum=None (cumulative average): flax.linen.BatchNorm has only an "
                              "exponential moving average")
        track, training = bool(hp.take("track_running_stats")), bool(hp.take("training"))
        use_batch_stats = training or not track
        channels = x_in["x"].shape[axis]
        stat = self._stat_dtype(req.dtype)
        state_in = req.state or {}
        if track:
            stats = {"mean": jnp.asarray(state_in["running_mean"]).astype(stat),
                     "var": jnp.asarray(state_in["running_var"]).astype(stat)}
        else:  # Flax always has batch_stats; without tracking they are scratch, never returned
            stats = {"mean": jnp.zeros((channels,), stat), "var": jnp.ones((channels,), stat)}
        module = nn.BatchNorm(
            axis=-1, momentum=float(momentum), epsilon=float(hp.take("eps")),
            use_scale="weight" in x_in, use_bias="bias" in x_in,
            use_fast_variance=self.fast_variance, param_dtype=x_in["x"].dtype,
        )

        def compute(p: dict[str, Any], s: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
            variables = {"params": self._params(p, {"weight": "scale", "bias": "bias"}),
                         "batch_stats": s}
            y, updates = module.apply(variables, jnp.moveaxis(p["x"], axis, -1),
                                      use_running_average=not use_batch_stats,
                                      mutable=["batch_stats"])
            return {"y": jnp.moveaxis(y, -1, axis)}, dict(updates["batch_stats"])

        def finish(new: dict[str, Any]) -> dict[str, Any]:
            # Flax keeps no batch counter: num_batches_tracked is not kept (not_kept).
            return {"running_mean": new["mean"], "running_var": new["var"]} if track else {}

        return compute, stats, finish

    def _layer_norm(self, req: Request, x_in: dict[str, Any], hp: HyperParameters) -> _Built:
        import flax.linen as nn

        x = x_in["x"]
        axes = tuple(sorted({_axis(a, x.ndim, "axes") for a in hp.take("axes")}))
        module = nn.LayerNorm(
            epsilon=float(hp.take("eps")), reduction_axes=axes, feature_axes=axes,
            use_scale="weight" in x_in, use_bias="bias" in x_in,
            use_fast_variance=self.fast_variance, param_dtype=x.dtype,
        )

        def compute(p: dict[str, Any], s: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
            params = self._params(p, {"weight": "scale", "bias": "bias"})
            return {"y": module.apply({"params": params}, p["x"])}, {}

        return compute, {}, _no_state

    def _group_norm(self, req: Request, x_in: dict[str, Any], hp: HyperParameters) -> _Built:
        import flax.linen as nn

        jnp = self._jax.numpy
        x = x_in["x"]
        axis = _axis(hp.take("axis"), x.ndim)
        if axis == 0:
            raise Unsupported("axis 0 is the batch axis of flax.linen.GroupNorm")
        module = nn.GroupNorm(
            num_groups=int(hp.take("num_groups")), epsilon=float(hp.take("eps")),
            use_scale="weight" in x_in, use_bias="bias" in x_in,
            use_fast_variance=self.fast_variance, param_dtype=x.dtype,
        )

        def compute(p: dict[str, Any], s: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
            params = self._params(p, {"weight": "scale", "bias": "bias"})
            y = module.apply({"params": params}, jnp.moveaxis(p["x"], axis, -1))
            return {"y": jnp.moveaxis(y, -1, axis)}, {}

        return compute, {}, _no_state

    def _instance_norm(self, req: Request, x_in: dict[str, Any], hp: HyperParameters) -> _Built:
        import flax.linen as nn

        jnp = self._jax.numpy
        x = x_in["x"]
        axis = _axis(hp.take("axis"), x.ndim)
        if hp.take("track_running_stats"):
            raise Unsupported("track_running_stats=True: flax.linen.InstanceNorm keeps no running "
                              "statistics")
        # Without running statistics these have no effect (training and eval both normalize by
        # the instance's own statistics): read, and nothing to implement.
        for name in ("training", "momentum", "momentum_convention", "running_var_correction"):
            hp.take(name)
        if axis == 0:
            raise Unsupported("axis 0 is the batch axis of flax.linen.InstanceNorm")
        module = nn.InstanceNorm(
            epsilon=float(hp.take("eps")), feature_axes=-1,
            use_scale="weight" in x_in, use_bias="bias" in x_in,
            use_fast_variance=self.fast_variance, param_dtype=x.dtype,
        )

        def compute(p: dict[str, Any], s: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
            params = self._params(p, {"weight": "scale", "bias": "bias"})
            y = module.apply({"params": params}, jnp.moveaxis(p["x"], axis, -1))
            return {"y": jnp.moveaxis(y, -1, axis)}, {}

        # Instance statistics in training and in eval alike (no state either way).
        return compute, {}, _no_state

    def _rms_norm(self, req: Request, x_in: dict[str, Any], hp: HyperParameters) -> _Built:
        import flax.linen as nn

        x = x_in["x"]
        axes = tuple(sorted({_axis(a, x.ndim, "axes") for a in hp.take("axes")}))
        p_frac = float(hp.take("p"))
        if p_frac >= 0:
            n = math.prod(int(x.shape[a]) for a in axes)
            if len(axes) != 1 or int(n * p_frac) != n:
                raise Unsupported(f"pRMSNorm (p={p_frac}): flax.linen.RMSNorm takes the RMS over "
                                  f"every normalized feature")
        offset = float(hp.take("weight_offset"))
        wide = self._stat_dtype(req.dtype)
        has_bias = "bias" in x_in
        # Without a bias the layer rounds once to x's dtype; with one, the sum is rounded once
        # after the (at least float32) bias add, so the adapter adds no rounding of its own.
        module = nn.RMSNorm(
            epsilon=float(hp.take("eps")), reduction_axes=axes, feature_axes=axes,
            use_scale="weight" in x_in, use_fast_variance=self.fast_variance,
            param_dtype=x.dtype, dtype=wide if has_bias else None,
        )
        shape = [1] * x.ndim
        for a in axes:
            shape[a] = x.shape[a]

        def compute(p: dict[str, Any], s: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
            params = {}
            if "weight" in p:
                # Gemma's ``1 + w`` (HF computes it in float32): Flax code writes a scale param
                # ``offset + w``; formed in at least float32 so w keeps its bits.
                params["scale"] = (p["weight"].astype(wide) + offset if offset != 0.0
                                   else p["weight"])
            y = module.apply({"params": params}, p["x"])
            if has_bias:  # flax RMSNorm has no bias: the official code's offset, added after
                y = (y + p["bias"].astype(wide).reshape(shape)).astype(p["x"].dtype)
            return {"y": y.astype(p["x"].dtype)}, {}

        return compute, {}, _no_state

    # ----------------------------------------------------------------------------------------
    # Weight reparametrizations
    # ----------------------------------------------------------------------------------------

    def _weight_norm(self, req: Request, x_in: dict[str, Any], hp: HyperParameters) -> _Built:
        import flax.linen as nn

        v = x_in["v"]
        dim = hp.take("dim")
        feature_axes = None if dim is None else _axis(dim, v.ndim, "dim")
        module = nn.WeightNorm(
            _Kernel(tuple(v.shape)), epsilon=float(hp.take("eps")), use_scale="g" in x_in,
            feature_axes=feature_axes, param_dtype=v.dtype,
        )
        scale_shape = () if feature_axes is None else (v.shape[feature_axes],)

        def compute(p: dict[str, Any], s: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
            params: dict[str, Any] = {"layer_instance": {"kernel": p["v"]}}
            if "g" in p:  # g is v-shaped with ones off `dim`; Flax's scale is (v.shape[dim],)
                params["layer_instance/kernel/scale"] = p["g"].reshape(scale_shape)
            return {"w": module.apply({"params": params})}, {}

        return compute, {}, _no_state

    def _spectral_norm(self, req: Request, x_in: dict[str, Any], hp: HyperParameters) -> _Built:
        import flax.linen as nn
        from flax.linen.normalization import _l2_normalize

        jax, jnp = self._jax, self._jax.numpy
        weight = x_in["weight"]
        if weight.ndim < 2:
            raise Unsupported("flax.linen.SpectralNorm returns weights with ndim <= 1 unchanged "
                              "(not normalized)")
        steps = int(hp.take("n_power_iterations"))
        if steps < 1:
            raise Unsupported("n_power_iterations=0: flax.linen.SpectralNorm returns the weight "
                              "unchanged when n_steps < 1 (it never uses the stored u as is)")
        dim = _axis(hp.take("dim"), weight.ndim, "dim")
        training = bool(hp.take("training"))
        eps = float(hp.take("eps"))
        state_in = req.state or {}
        if "u" not in state_in:
            raise Unsupported("flax.linen.SpectralNorm needs the stored u (the runner always gives "
                              "it)")
        stat = self._stat_dtype(req.dtype)
        rows = weight.shape[dim]
        # Flax's value = reshape(kernel, (-1, out)) with `dim` moved last is W_mat^T, and its
        # u of shape (1, out) is the spec's u (length rows); it stores no v.
        u_in = jnp.asarray(state_in["u"]).astype(stat).reshape(1, rows)
        moved_shape = tuple(np.moveaxis(np.empty(weight.shape, dtype=np.bool_), dim, -1).shape)
        out_dtype = weight.dtype

        def make(n_steps: int) -> Any:
            return nn.SpectralNorm(_Kernel(moved_shape), n_steps=n_steps, epsilon=eps,
                                   dtype=out_dtype, param_dtype=stat)

        def apply(module: Any, kernel: Any, u: Any) -> tuple[Any, Any, Any]:
            stats = {"layer_instance/kernel/u": u, "layer_instance/kernel/sigma": jnp.ones((), stat)}
            # update_stats=True always: it only decides whether u and sigma are written back,
            # and Flax's sigma is read from what it writes.  Eval (update_stats=False) is
            # reproduced by discarding the written u (see finish).
            w, updates = module.apply(
                {"params": {"layer_instance": {"kernel": kernel}}, "batch_stats": stats},
                update_stats=True, mutable=["batch_stats"])
            new = updates["batch_stats"]
            return w, new["layer_instance/kernel/u"], new["layer_instance/kernel/sigma"]

        module = make(steps)
        previous = make(steps - 1) if steps > 1 else None

        def compute(p: dict[str, Any], s: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
            kernel = jnp.moveaxis(p["weight"], dim, -1)
            w, u_new, sigma = apply(module, kernel, s["u"])
            # Flax discards v.  The v of the last step is l2n(u_prev value^T), u_prev the u
            # before that step: the stored u for one step, else what Flax returns after
            # n_steps - 1 steps; normalized with Flax's own _l2_normalize.
            u_prev = s["u"] if previous is None else apply(previous, kernel, s["u"])[1]
            value = jax.lax.stop_gradient(kernel).reshape(-1, kernel.shape[-1])
            v_new = _l2_normalize(jnp.matmul(u_prev, value.transpose([1, 0])), eps=eps)
            return ({"w": jnp.moveaxis(w, -1, dim), "sigma": sigma.astype(out_dtype)},
                    {"u": u_new.reshape(-1), "v": v_new.reshape(-1)})

        def finish(new: dict[str, Any]) -> dict[str, Any]:
            if not training:  # update_stats=False: Flax iterates but stores nothing
                return {"u": state_in["u"], "v": state_in["v"]}
            return new

        return compute, {"u": u_in}, finish

    def _weight_standardization(self, req: Request, x_in: dict[str, Any], hp: HyperParameters) -> _Built:
        jax, jnp = self._jax, self._jax.numpy
        weight = x_in["weight"]
        if weight.ndim < 2:
            raise Unsupported("weight standardization needs a weight with at least 2 dims")
        axis = _axis(hp.take("axis"), weight.ndim)
        eps = float(hp.take("eps"))

        wide = self._stat_dtype(req.dtype)

        def compute(p: dict[str, Any], s: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
            # nfnets/base.py WSConv2D.standardize_weight (gain = 1), the output axis moved last
            # as in its HWIO kernels.  Half-precision weights are computed in float32 and the
            # result rounded once, as Flax's normalization layers do with their statistics.
            w = jnp.moveaxis(p["weight"], axis, -1).astype(wide)
            red = tuple(range(w.ndim - 1))
            mean = jnp.mean(w, axis=red, keepdims=True)
            var = jnp.var(w, axis=red, keepdims=True)
            fan_in = math.prod(w.shape[:-1])
            scale = jax.lax.rsqrt(jnp.maximum(var * fan_in, eps))
            shift = mean * scale
            w_hat = (w * scale - shift).astype(p["weight"].dtype)
            return {"w_hat": jnp.moveaxis(w_hat, -1, axis)}, {}

        return compute, {}, _no_state


#: The Flax normalizers: each op's builder (a :class:`JaxAdapter` method), the convention knobs of
#: the specs' ``flax`` dialect tables (``nfnets`` for weight standardization; layout/mode switches
#: and numeric values deliberately absent), the Flax call, the state Flax does not keep (supplied
#: by the harness, not compared: BatchNorm has no batch counter) and the dtype of the state it
#: keeps for half-precision data (BatchNorm's batch_stats and SpectralNorm's u, and so the v
#: derived from it, are float32 variables: module docstring, "State and precision").
MAPPINGS: dict[str, Mapping] = {
    "batch_norm": Mapping(
        JaxAdapter._batch_norm, api="flax.linen.BatchNorm", dtypes=DTYPES,
        dialect={"momentum_convention": "old_weight", "running_var_correction": 0,
                 "single_value": "allow"},
        not_kept=("num_batches_tracked",), state_dtype="float32"),
    "layer_norm": Mapping(JaxAdapter._layer_norm, api="flax.linen.LayerNorm", dtypes=DTYPES),
    "group_norm": Mapping(JaxAdapter._group_norm, api="flax.linen.GroupNorm", dtypes=DTYPES,
                          dialect={"affine": "per_channel"}),
    "instance_norm": Mapping(JaxAdapter._instance_norm, api="flax.linen.InstanceNorm",
                             dtypes=DTYPES, dialect={"single_value": "allow"}),
    "rms_norm": Mapping(JaxAdapter._rms_norm, api="flax.linen.RMSNorm", dtypes=DTYPES,
                        dialect={"eps_placement": "inside"}),
    "weight_norm": Mapping(JaxAdapter._weight_norm, api="flax.linen.WeightNorm", dtypes=DTYPES,
                           dialect={"eps_mode": "add"}),
    "spectral_norm": Mapping(
        JaxAdapter._spectral_norm, api="flax.linen.SpectralNorm", dtypes=DTYPES,
        dialect={"normalize": "rsqrt", "iteration_order": "v_then_u",
                 "eval_mode": "iterate_no_store", "gradient": "through_sigma"},
        state_dtype="float32"),
    "weight_standardization": Mapping(
        JaxAdapter._weight_standardization, dtypes=DTYPES,
        api="jax.numpy (deepmind-research nfnets WSConv2D.standardize_weight)",
        dialect={"correction": 0, "eps_mode": "max_fanin_var"}),
}


def make_adapter(*, fast_variance: bool = False, upcast_half_inputs: bool = False) -> JaxAdapter:
    """The jax adapter; enables ``jax_enable_x64`` for the whole process (see the module doc)."""
    return JaxAdapter(fast_variance=fast_variance, upcast_half_inputs=upcast_half_inputs)
