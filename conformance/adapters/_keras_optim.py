"""keras.optimizers: one mapping per optimizer op (the keras adapter loads this file's ``MAPPINGS``).

Each step builds (once per op, hyper-parameters other than the lr, dtype and parameter shapes) the
optimizer a user writes, e.g. ``keras.optimizers.Adam(learning_rate, beta_1, beta_2, epsilon,
amsgrad, weight_decay)``, with ``keras.Variable`` parameters of the request's dtype (parameters a
weight-decay mask leaves out go to ``exclude_from_weight_decay``) and ``optimizer.build``.  The
optimizer's own variables are then loaded from the request: ``iteration`` from the state's
``step``, ``learning_rate`` set to this step's lr (the schedule runs in the harness: one optimizer
and one compiled step serve every lr), and every slot variable from the state slot of the same
meaning; at step 0 the slots keep the values Keras initialized them to (Adagrad's 0.1, zeros
elsewhere).  One step is ``optimizer.stateless_apply(optimizer_variables, grads, params)`` under
``jax.jit`` (jax backend) or ``optimizer.apply(grads)`` on the loaded variables (torch backend,
whose optimizers update their variables in place), and everything is read back.

Keras keeps ``iterations`` (int32 under JAX, int64 under torch) for every optimizer, so ``step``
is kept everywhere.  The ``learning_rate`` variable has dtype ``keras.config.floatx()`` (float32
by default) whatever the parameters' dtype: the lr of a float64 run is a float32 value, so the
mappings declare ``hparam_dtype = "float32"`` (the harness rounds every float hyper-parameter to
float32 before the oracle and the adapter see it; the others, Python floats in Keras, are then
exact in float64).  Slot variables have the parameter's dtype.  Weight decay is the base
optimizer's ``variable - variable * wd * lr`` before the update (``weight_decay_mode =
"decoupled_lr"``).

Slots (oracle slot -> Keras variable list):

* ``sgd``: ``momentum_buffer`` <- ``-momentums``: Keras keeps ``m = mu m - lr g`` and adds it
  (lr inside the buffer, Sutskever's sign), the oracle's lr-inside buffer is ``u = mu u + lr g``
  subtracted; Nesterov ``w + mu m - lr g``.  No dampening.
* ``adam`` / ``adamw``: ``exp_avg`` / ``exp_avg_sq`` / ``max_exp_avg_sq`` <- ``_momentums`` /
  ``_velocities`` / ``_velocity_hats``; ``alpha = lr sqrt(1 - b2^t) / (1 - b1^t)``, ``w -= alpha m
  / (sqrt(v) + eps)`` (eps-hat), AMSGrad's maximum of the raw v.
* ``adagrad``: ``sum`` <- ``_accumulators``; ``w -= lr g / sqrt(acc + eps)``.
* ``rmsprop``: ``square_avg`` / ``grad_avg`` / ``momentum_buffer`` <- ``_velocities`` /
  ``_average_gradients`` / ``_momentums``; eps inside the root, lr inside the momentum buffer.
* ``lion``: ``exp_avg`` <- ``_momentums``.
* ``lamb``: ``exp_avg`` / ``exp_avg_sq`` <- ``_momentums`` / ``_velocities``; the ratio
  ``||w|| / ||m_hat / (sqrt(v_hat) + eps)||`` (1 if a norm is 0) on every tensor, of the weights
  after the decoupled decay; ``global_clip`` is the optimizer's ``global_clipnorm``.
* ``adafactor``: ``exp_avg_sq_row`` / ``exp_avg_sq_col`` / ``exp_avg_sq`` <- ``_r`` / ``_c`` /
  ``_v``.  Keras factors every parameter with 2 or more dimensions over its last two
  (``factored_dims = "last_two"``).  Where the oracle's slot is its (1,)-shaped zero placeholder
  ("this parameter has no such statistic") Keras keeps a scalar 0 (``_r``, ``_c`` of a vector,
  returned reshaped) or, for ``_v`` of a factored parameter, a full-size buffer it overwrites
  with ``R C / mean(R)`` before reading it in every step (scratch, not state): the placeholder is
  returned for it and the buffer is loaded with its initial zeros.  Keras always takes
  ``rho_t = min(lr, 1/sqrt(t))`` (its ``relative_step`` argument changes nothing else) and
  ``alpha_t = max(eps2, RMS(w)) rho_t``, and has no momentum (beta1 = 0).  Its weight decay,
  ``w - w wd lr`` with the lr variable before the step (so RMS(w) is taken of the decayed
  weights), is none of the oracle's Adafactor modes (which scale by alpha_t or 1): a request with
  weight decay is Unsupported.
* ``per_tensor_clip`` / ``global_norm_clip``: ``keras.optimizers.SGD(clipnorm=c)`` /
  ``SGD(global_clipnorm=c)``: ``g c / max(||g||, c)`` per tensor, ``g c min(1/N, 1/c)`` over all;
  the weight decay is Keras's decoupled ``w (1 - lr wd) - lr clip(g)``, which equals the specs'
  SGD on ``clip(g) + wd w`` (plain SGD: the two forms are one update).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from conformance.adapters import Request, Response, Unsupported
from conformance.adapters.mapping import Mapping, OptimizerRequest

_DTYPES = ("float64", "float32")


@dataclass
class _Built:
    """A built optimizer: its parameter variables, what each optimizer variable holds, their
    initial values, and the compiled step (jax) or None (torch: eager ``apply``)."""

    optimizer: Any
    params: list[Any]
    # per optimizer variable: ("step",), ("lr",) or ("slot", slot, path, sign)
    holds: list[tuple[Any, ...]]
    initial: list[np.ndarray]
    step: Callable[..., Any] | None


#: Built optimizers per key (see KerasStep.run): the lr is not in the key, so a trajectory under
#: any schedule reuses one optimizer and one compiled step.
_BUILT: OrderedDict[tuple[Any, ...], _Built] = OrderedDict()
_CACHE_SIZE = 128


class KerasStep(OptimizerRequest):
    """One optimizer step in Keras."""

    #: The dtypes a step runs in (any other request is Unsupported).
    DTYPES: tuple[str, ...] = _DTYPES

    def __init__(self, request: Request, adapter: Any) -> None:
        super().__init__(request)
        if request.dtype not in _DTYPES:
            raise Unsupported(f"keras.optimizers mappings run float64 and float32, not {request.dtype}")
        self.keras = adapter.keras
        self.backend = adapter.backend

    def run(self, cls: Any, op: str, slots: dict[str, tuple[str, float]], *,
            excluded: tuple[str, ...] = (), **kwargs: Any) -> Response:
        """One step of ``cls(learning_rate=lr, **kwargs)``; ``slots``: oracle slot -> (the Keras
        variable list attribute, the sign the oracle's value has in it); ``excluded``: the
        parameters ``exclude_from_weight_decay`` gets."""
        lr = float(self.take("lr"))
        self.check_all_read(op)
        built = self._built(cls, op, slots, excluded, kwargs, lr)
        b = self.backend
        values = []
        for holds, initial in zip(built.holds, built.initial, strict=True):
            values.append(b.tensor(self._load(holds, initial, lr), str(initial.dtype)))
        params = [b.tensor(self.params[p], self.request.dtype) for p in self.paths]
        grads = [b.tensor(self.grads[p], self.request.dtype) for p in self.paths]
        if built.step is not None:
            new_params, new_values = built.step(values, grads, params)
        else:
            new_params, new_values = self._apply_eagerly(built, values, grads, params)
        outputs = {f"params/{p}": b.numpy(v) for p, v in zip(self.paths, new_params, strict=True)}
        state: dict[str, np.ndarray] = {}
        for holds, value in zip(built.holds, new_values, strict=True):
            value = b.numpy(value)
            if holds[0] == "step":
                state["step"] = np.asarray(float(value))
            elif holds[0] == "slot":
                _, slot, path, sign = holds
                key = f"{slot}/{path}"
                shape = np.shape(self.state[key]) if key in self.state else value.shape
                if value.size == int(np.prod(shape)):
                    state[key] = (sign * value.astype(self.request.dtype)).reshape(shape)
                else:  # Adafactor's scratch V of a factored parameter: the oracle's placeholder
                    state[key] = np.zeros(shape, dtype=self.request.dtype)
        return Response(outputs=outputs, state=state)

    def _load(self, holds: tuple[Any, ...], initial: np.ndarray, lr: float) -> np.ndarray:
        """The value of one optimizer variable for this step."""
        if holds[0] == "step":
            return np.asarray(self.step_count, dtype=initial.dtype)
        if holds[0] == "lr":
            return np.asarray(lr, dtype=initial.dtype)
        _, slot, path, sign = holds
        value = self.state.get(f"{slot}/{path}")
        if self.step_count == 0 or value is None or np.size(value) != initial.size:
            return initial  # Keras's own initial value (or Adafactor's scratch V: never read)
        return (sign * np.asarray(value, dtype=np.float64)).reshape(initial.shape).astype(initial.dtype)

    def _apply_eagerly(self, built: _Built, values: list[Any], grads: list[Any], params: list[Any]
                       ) -> tuple[list[Any], list[Any]]:
        """The torch backend: load the variables, ``optimizer.apply``, read them back (copies: the
        next request assigns into the same variables)."""
        b = self.backend
        for variable, value in zip(built.params, params, strict=True):
            variable.assign(value)
        for variable, value in zip(built.optimizer.variables, values, strict=True):
            variable.assign(value)
        built.optimizer.apply(grads)
        return ([b.numpy(v.value) for v in built.params],
                [b.numpy(v.value) for v in built.optimizer.variables])

    def _built(self, cls: Any, op: str, slots: dict[str, tuple[str, float]], excluded: tuple[str, ...],
               kwargs: dict[str, Any], lr: float) -> _Built:
        shapes = tuple((p, tuple(np.shape(self.params[p]))) for p in self.paths)
        key = (self.backend.name, op, cls.__name__, self.request.dtype, shapes, tuple(sorted(excluded)),
               tuple(sorted((k, repr(v)) for k, v in kwargs.items())), tuple(slots.items()))
        found = _BUILT.get(key)
        if found is not None:
            _BUILT.move_to_end(key)
            return found
        keras, b = self.keras, self.backend
        params = [keras.Variable(np.zeros(shape), dtype=self.request.dtype, name=_name(p))
                  for p, shape in shapes]
        optimizer = cls(learning_rate=lr, **kwargs)
        if excluded:
            optimizer.exclude_from_weight_decay(var_list=[params[self.paths.index(p)] for p in excluded])
        optimizer.build(params)
        holds_of: dict[int, tuple[Any, ...]] = {id(optimizer.iterations): ("step",)}
        holds_of[id(optimizer._learning_rate)] = ("lr",)
        for slot, (attr, sign) in slots.items():
            for path, variable in zip(self.paths, getattr(optimizer, attr), strict=True):
                if variable is not None:
                    holds_of[id(variable)] = ("slot", slot, path, sign)
        unknown = [v.path for v in optimizer.variables if id(v) not in holds_of]
        if unknown:
            raise Unsupported(f"{cls.__name__} has variables the mapping does not load: {unknown}")
        holds = [holds_of[id(v)] for v in optimizer.variables]
        initial = [b.numpy(v.value).copy() for v in optimizer.variables]
        step = None
        if b.name == "jax":
            step = b.compile(optimizer.stateless_apply)
        found = _BUILT[key] = _Built(optimizer, params, holds, initial, step)
        if len(_BUILT) > _CACHE_SIZE:
            _BUILT.popitem(last=False)
        return found

    def excluded_from_decay(self, mask_name: str = "weight_decay_mask") -> tuple[str, ...]:
        """The parameters a weight-decay mask leaves out (``exclude_from_weight_decay``)."""
        where = self.mask(mask_name)
        return tuple(p for p in self.paths if not where[p])


def _name(path: str) -> str:
    """A Keras variable name for a parameter path (Keras names cannot contain '/')."""
    return re.sub(r"[^A-Za-z0-9_]", "_", path)


def _decay(c: KerasStep) -> tuple[float | None, tuple[str, ...]]:
    """The base optimizer's ``weight_decay`` (None for 0: Keras then skips the decay) and the
    parameters the mask excludes."""
    c.expect("weight_decay_mode", "decoupled_lr")
    wd = float(c.take("weight_decay"))
    excluded = c.excluded_from_decay()
    return (wd or None), (excluded if wd else ())


def sgd(c: KerasStep) -> Response:
    keras = c.keras
    c.expect("lr_placement", "inside")
    c.expect("first_step", "zeros")
    c.expect("momentum_correction", False)
    c.expect("dampening", 0.0, why="keras.optimizers.SGD has no dampening")
    wd, excluded = _decay(c)
    momentum = float(c.take("momentum"))
    nesterov = bool(c.take("nesterov"))
    slots = {"momentum_buffer": ("momentums", -1.0)} if momentum else {}
    return c.run(keras.optimizers.SGD, "sgd", slots, excluded=excluded, momentum=momentum,
                 nesterov=nesterov, weight_decay=wd)


def _adam(c: KerasStep, op: str, cls: Any) -> Response:
    c.expect("adam_eps_mode", "eps_hat")
    amsgrad = bool(c.take("amsgrad"))
    if amsgrad:
        c.expect("amsgrad_max_of", "raw")
    else:
        c.take("amsgrad_max_of")  # no maximum without AMSGrad
    wd, excluded = _decay(c)
    slots = {"exp_avg": ("_momentums", 1.0), "exp_avg_sq": ("_velocities", 1.0)}
    if amsgrad:
        slots["max_exp_avg_sq"] = ("_velocity_hats", 1.0)
    kwargs = {"beta_1": float(c.take("beta1")), "beta_2": float(c.take("beta2")),
              "epsilon": float(c.take("eps")), "amsgrad": amsgrad}
    if cls is c.keras.optimizers.AdamW:
        return c.run(cls, op, slots, excluded=excluded, weight_decay=wd or 0.0, **kwargs)
    return c.run(cls, op, slots, excluded=excluded, weight_decay=wd, **kwargs)


def adam(c: KerasStep) -> Response:
    return _adam(c, "adam", c.keras.optimizers.Adam)


def adamw(c: KerasStep) -> Response:
    return _adam(c, "adamw", c.keras.optimizers.AdamW)


def adagrad(c: KerasStep) -> Response:
    c.expect("eps_placement", "inside")
    c.expect("empty_accumulator", "divide")
    c.expect("lr_decay", 0.0, why="keras.optimizers.Adagrad has no lr decay")
    wd, excluded = _decay(c)
    return c.run(c.keras.optimizers.Adagrad, "adagrad", {"sum": ("_accumulators", 1.0)}, excluded=excluded,
                 initial_accumulator_value=float(c.take("initial_accumulator_value")),
                 epsilon=float(c.take("eps")), weight_decay=wd)


def rmsprop(c: KerasStep) -> Response:
    c.expect("eps_placement", "inside")
    c.expect("lr_placement", "inside")
    c.expect("nesterov", False, why="keras.optimizers.RMSprop has no Nesterov momentum")
    c.expect("initial_accumulator_value", 0.0)
    c.expect("bias_correction", False)
    wd, excluded = _decay(c)
    momentum, centered = float(c.take("momentum")), bool(c.take("centered"))
    slots = {"square_avg": ("_velocities", 1.0)}
    if centered:
        slots["grad_avg"] = ("_average_gradients", 1.0)
    if momentum:
        slots["momentum_buffer"] = ("_momentums", 1.0)
    return c.run(c.keras.optimizers.RMSprop, "rmsprop", slots, excluded=excluded, rho=float(c.take("alpha")),
                 momentum=momentum, epsilon=float(c.take("eps")), centered=centered, weight_decay=wd)


def lion(c: KerasStep) -> Response:
    wd, excluded = _decay(c)
    beta1 = float(c.take("beta1"))
    if not 0.0 < beta1 <= 1.0:
        raise Unsupported(f"keras.optimizers.Lion requires 0 < beta_1 <= 1, got {beta1}")
    return c.run(c.keras.optimizers.Lion, "lion", {"exp_avg": ("_momentums", 1.0)}, excluded=excluded,
                 beta_1=beta1, beta_2=float(c.take("beta2")), weight_decay=wd)


def lamb(c: KerasStep) -> Response:
    c.expect("bias_correction", "adam")
    c.expect("grad_averaging", True)
    c.expect("eps_root", 0.0)
    c.expect("trust_clip", False)
    c.expect("trust_eps", 0.0)
    c.expect("phi_min", 0.0)
    c.expect("phi_max", None)
    c.expect("global_clip_eps", 0.0)
    wd, excluded = _decay(c)
    trust = c.mask("trust_mask")
    scope = c.take("trust_scope")
    decayed = set(c.paths) - set(excluded) if wd else set()
    adapted = {p: trust[p] and (scope == "all" or p in decayed) for p in c.paths}
    if not all(adapted.values()):
        raise Unsupported("keras.optimizers.Lamb applies the trust ratio to every tensor; it cannot leave "
                          f"{sorted(p for p, a in adapted.items() if not a)} unadapted")
    clip = c.take("global_clip")
    return c.run(c.keras.optimizers.Lamb, "lamb", {"exp_avg": ("_momentums", 1.0),
                                                   "exp_avg_sq": ("_velocities", 1.0)},
                 excluded=excluded, beta_1=float(c.take("beta1")), beta_2=float(c.take("beta2")),
                 epsilon=float(c.take("eps")), weight_decay=wd,
                 global_clipnorm=float(clip) if clip else None)


def adafactor(c: KerasStep) -> Response:
    c.expect("relative_step", True, why="Keras always takes rho_t = min(lr, 1/sqrt(t))")
    c.expect("multiply_by_parameter_scale", True)
    c.expect("factored", True)
    c.expect("factored_dims", "last_two")
    c.expect("min_dim_size_to_factor", 0)
    c.expect("beta1", 0.0, why="keras.optimizers.Adafactor has no momentum")
    c.expect("decay_offset", 0)
    c.expect("beta2_cap", 1.0)
    wd = float(c.take("weight_decay"))
    c.take("weight_decay_mode")
    c.take("weight_decay_mask")
    if wd:
        raise Unsupported("keras.optimizers.Adafactor decays w - w wd lr with the lr variable before the "
                          "step; the oracle's Adafactor modes scale the decay by alpha_t or by 1")
    threshold = c.take("clipping_threshold")
    if threshold is None:
        raise Unsupported("keras.optimizers.Adafactor always clips the update (clip_threshold)")
    slots = {"exp_avg_sq_row": ("_r", 1.0), "exp_avg_sq_col": ("_c", 1.0), "exp_avg_sq": ("_v", 1.0)}
    return c.run(c.keras.optimizers.Adafactor, "adafactor", slots,
                 beta_2_decay=-float(c.take("decay_rate")), epsilon_1=float(c.take("eps1")),
                 epsilon_2=float(c.take("eps2")), clip_threshold=float(threshold), relative_step=True)


def _clipped_sgd(c: KerasStep, op: str, **clip: float) -> Response:
    wd = float(c.take("weight_decay"))
    excluded = c.excluded_from_decay()
    return c.run(c.keras.optimizers.SGD, op, {}, excluded=excluded if wd else (), weight_decay=wd or None,
                 **clip)


def per_tensor_clip(c: KerasStep) -> Response:
    c.expect("measure", "norm")
    c.expect("eps_add", 0.0)
    return _clipped_sgd(c, "per_tensor_clip", clipnorm=float(c.take("max_norm")))


def global_norm_clip(c: KerasStep) -> Response:
    c.expect("eps_add", 0.0)
    return _clipped_sgd(c, "global_norm_clip", global_clipnorm=float(c.take("max_norm")))


#: What a request becomes before a mapping sees it (``KerasStep(request, adapter)``).
STEP = KerasStep

_DECOUPLED = {"weight_decay_mode": "decoupled_lr"}
MAPPINGS: dict[str, Mapping] = {
    "sgd": Mapping(sgd, api="keras.optimizers.SGD", dtypes=_DTYPES,
                   dialect={"lr_placement": "inside", "first_step": "zeros", "momentum_correction": False,
                            **_DECOUPLED}),
    "adam": Mapping(adam, api="keras.optimizers.Adam", dtypes=_DTYPES,
                    dialect={"adam_eps_mode": "eps_hat", "amsgrad_max_of": "raw", **_DECOUPLED}),
    "adamw": Mapping(adamw, api="keras.optimizers.AdamW", dtypes=_DTYPES,
                     dialect={"adam_eps_mode": "eps_hat", "amsgrad_max_of": "raw", **_DECOUPLED}),
    "adagrad": Mapping(adagrad, api="keras.optimizers.Adagrad", dtypes=_DTYPES,
                       dialect={"eps_placement": "inside", "empty_accumulator": "divide", **_DECOUPLED}),
    "rmsprop": Mapping(rmsprop, api="keras.optimizers.RMSprop", dtypes=_DTYPES,
                       dialect={"eps_placement": "inside", "lr_placement": "inside", "nesterov": False,
                                "bias_correction": False, **_DECOUPLED}),
    "lion": Mapping(lion, api="keras.optimizers.Lion", dtypes=_DTYPES, dialect=dict(_DECOUPLED)),
    "lamb": Mapping(lamb, api="keras.optimizers.Lamb (global_clip: global_clipnorm)", dtypes=_DTYPES,
                    dialect={"bias_correction": "adam", "trust_scope": "all", "trust_clip": False,
                             "trust_eps": 0.0, "phi_max": None, **_DECOUPLED}),
    "adafactor": Mapping(adafactor, api="keras.optimizers.Adafactor", dtypes=_DTYPES,
                         dialect={"relative_step": True, "factored_dims": "last_two", "beta2_cap": 1.0}),
    "per_tensor_clip": Mapping(per_tensor_clip, api="keras.optimizers.SGD(clipnorm=c)", dtypes=_DTYPES,
                               dialect={"measure": "norm", "eps_add": 0.0}),
    "global_norm_clip": Mapping(global_norm_clip, api="keras.optimizers.SGD(global_clipnorm=c)",
                                dtypes=_DTYPES, dialect={"eps_add": 0.0}),
}
