"""optax: one mapping per optimizer op (the jax adapter loads this file's ``MAPPINGS``).

Each step builds the optax ``GradientTransformation`` a user would write for the request's
hyper-parameters (a constant ``learning_rate`` equal to this step's lr: the schedule is applied by
the harness, which is exact for every optax optimizer since the rate never enters the state
except through the updates themselves), initializes its state for the parameters, replaces the
state's fields (``count``, ``mu``, ``nu``, ``trace``, ...) with the request's values, calls
``update`` and ``optax.apply_updates`` (jitted, as in a training step, and cached per
hyper-parameters and shapes), and reads the same fields back.  The jax adapter
enables x64 when it is created, so float64 runs in float64.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import jax.numpy as jnp
import numpy as np
import optax

from conformance.adapters import Request, Response, Unsupported
from conformance.adapters.mapping import Mapping, OptimizerRequest

_DTYPES = {"float64": jnp.float64, "float32": jnp.float32}


class OptaxStep(OptimizerRequest):
    """One optimizer step in optax."""

    #: The dtypes a step runs in (any other request is Unsupported).
    DTYPES: tuple[str, ...] = tuple(_DTYPES)

    def __init__(self, request: Request) -> None:
        super().__init__(request)
        if request.dtype not in _DTYPES:
            raise Unsupported(f"optax mappings run float64 and float32, not {request.dtype}")
        self.dtype = _DTYPES[request.dtype]
        self.jparams = {p: self.array(v) for p, v in self.params.items()}
        self.jgrads = {p: self.array(v) for p, v in self.grads.items()}

    def array(self, value: np.ndarray) -> Any:
        return jnp.asarray(np.asarray(value), dtype=self.dtype)

    def mask_tree(self, name: str) -> dict[str, bool]:
        """A mask hyper-parameter as optax's pytree of bools."""
        return self.mask(name)

    def slot_tree(self, slot: str) -> dict[str, Any] | None:
        values = self.slot(slot)
        return None if values is None else {p: self.array(v) for p, v in values.items()}

    def run(self, tx: optax.GradientTransformation, op: str, fields: dict[str, str], *,
            count: str | None = "count") -> Response:
        """Set the state's ``fields`` (optax field -> oracle slot) and ``count`` from the request,
        update, apply, and read them back."""
        self.check_all_read(op)
        state = tx.init(self.jparams)
        values: dict[str, Any] = {f: self.slot_tree(s) for f, s in fields.items()}
        values = {f: v for f, v in values.items() if v is not None}
        if count is not None:
            values[count] = jnp.asarray(self.step_count, dtype=jnp.int32)
        state = replace_fields(state, values)
        new_params, new_state = _compiled(self._key(op, fields, count), tx)(self.jgrads, state, self.jparams)
        outputs = {f"params/{p}": np.asarray(v) for p, v in new_params.items()}
        read = read_fields(new_state, [*fields, *([count] if count else [])])
        # optax's own count where the transformation keeps one; without it (sgd, adagrad, lars,
        # clipping) ``step`` is not kept (``not_kept`` of each mapping).
        out_state: dict[str, np.ndarray] = {}
        if count and read.get(count) is not None:
            out_state["step"] = np.asarray(float(np.asarray(read[count])))
        for field, slot in fields.items():
            tree = read.get(field)
            if isinstance(tree, dict):
                out_state.update({f"{slot}/{p}": np.asarray(v) for p, v in tree.items()})
        return Response(outputs=outputs, state=out_state)


    def _key(self, op: str, fields: dict[str, str], count: str | None) -> tuple[Any, ...]:
        """What determines the transformation a mapping builds: op, dtype, hyper-parameters
        (this step's lr included), parameter shapes, and the fields it reads."""
        hp = tuple(sorted((k, v if isinstance(v, (int, float, str, bool, type(None))) else repr(v))
                          for k, v in self.request.hparams.items()))
        shapes = tuple((p, tuple(np.shape(v))) for p, v in self.params.items())
        return (op, self.request.dtype, hp, shapes, tuple(fields.items()), count)


#: Jitted ``update`` + ``apply_updates`` per key (see OptaxStep._key): optax runs jitted in a
#: training step, and eager dispatch of a whole chain costs ~0.1 s a call.  The lr enters the key,
#: so a step under a constant (or piecewise constant) rate reuses the compiled step.
_COMPILED: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
_CACHE_SIZE = 256


def _compiled(key: tuple[Any, ...], tx: optax.GradientTransformation) -> Any:
    found = _COMPILED.get(key)
    if found is None:
        import jax

        def step(grads: Any, state: Any, params: Any) -> tuple[Any, Any]:
            updates, new_state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), new_state

        found = _COMPILED[key] = jax.jit(step)
        if len(_COMPILED) > _CACHE_SIZE:
            _COMPILED.popitem(last=False)
    else:
        _COMPILED.move_to_end(key)
    return found


def replace_fields(state: Any, values: dict[str, Any]) -> Any:
    """``state`` with every NamedTuple field named in ``values`` replaced (recursively)."""
    if hasattr(state, "_fields"):
        changes = {f: values[f] for f in state._fields if f in values}
        inner = {f: replace_fields(getattr(state, f), values) for f in state._fields
                 if f not in values}
        return state._replace(**changes, **inner)
    if isinstance(state, tuple):
        return tuple(replace_fields(s, values) for s in state)
    return state


def read_fields(state: Any, names: list[str]) -> dict[str, Any]:
    """The first value of each NamedTuple field in ``names`` found in ``state``."""
    found: dict[str, Any] = {}

    def walk(node: Any) -> None:
        if hasattr(node, "_fields"):
            for f in node._fields:
                if f in names and f not in found:
                    found[f] = getattr(node, f)
                else:
                    walk(getattr(node, f))
        elif isinstance(node, tuple):
            for s in node:
                walk(s)

    walk(state)
    return found


def _decay_first(c: OptaxStep, modes: tuple[str, ...] = ("l2",)) -> list[Any]:
    """``add_decayed_weights`` before the optimizer: L2 folded into the gradient."""
    c.expect("weight_decay_mode", *modes)
    wd = c.take("weight_decay")
    mask = c.mask_tree("weight_decay_mask")
    return [optax.add_decayed_weights(wd, mask=mask)] if wd else []


def sgd(c: OptaxStep) -> Response:
    c.expect("lr_placement", "outside")
    c.expect("first_step", "zeros")
    c.expect("momentum_correction", False)
    c.expect("dampening", 0.0)
    chain = _decay_first(c)
    momentum = c.take("momentum")
    tx = optax.chain(*chain, optax.sgd(c.take("lr"), momentum=momentum or None,
                                       nesterov=c.take("nesterov")))
    return c.run(tx, "sgd", {"trace": "momentum_buffer"}, count=None)


def _adam_core(c: OptaxStep) -> tuple[Any, dict[str, str]]:
    c.expect("adam_eps_mode", "corrected")
    amsgrad = c.take("amsgrad")
    b1, b2, eps = c.take("beta1"), c.take("beta2"), c.take("eps")
    if amsgrad:
        c.expect("amsgrad_max_of", "corrected")
        core = optax.scale_by_amsgrad(b1=b1, b2=b2, eps=eps)
        return core, {"mu": "exp_avg", "nu": "exp_avg_sq", "nu_max": "max_exp_avg_sq"}
    c.take("amsgrad_max_of")
    return optax.scale_by_adam(b1=b1, b2=b2, eps=eps), {"mu": "exp_avg", "nu": "exp_avg_sq"}


def adam(c: OptaxStep) -> Response:
    """optax.adam (optax.amsgrad with amsgrad); L2 decay: add_decayed_weights first."""
    chain = _decay_first(c)
    core, fields = _adam_core(c)
    tx = optax.chain(*chain, core, optax.scale_by_learning_rate(c.take("lr")))
    return c.run(tx, "adam", fields)


def adamw(c: OptaxStep) -> Response:
    """optax.adamw: scale_by_adam -> add_decayed_weights(wd, mask) -> scale_by_learning_rate."""
    c.expect("weight_decay_mode", "decoupled_lr")
    core, fields = _adam_core(c)
    wd, mask = c.take("weight_decay"), c.mask_tree("weight_decay_mask")
    tx = optax.chain(core, optax.add_decayed_weights(wd, mask=mask),
                     optax.scale_by_learning_rate(c.take("lr")))
    return c.run(tx, "adamw", fields)


#: What a request becomes before a mapping sees it.
STEP = OptaxStep

MAPPINGS: dict[str, Mapping] = {
    "sgd": Mapping(sgd, api="optax.sgd (+ add_decayed_weights)", dtypes=OptaxStep.DTYPES,
                   dialect={"lr_placement": "outside", "first_step": "zeros",
                            "momentum_correction": False, "weight_decay_mode": "l2"},
                   not_kept=("step",)),  # optax.sgd keeps no count
    "adam": Mapping(adam, api="optax.adam / optax.amsgrad", dtypes=OptaxStep.DTYPES,
                    dialect={"adam_eps_mode": "corrected", "amsgrad_max_of": "corrected",
                             "weight_decay_mode": "l2"}),
    "adamw": Mapping(adamw, api="optax.adamw (scale_by_amsgrad with amsgrad)", dtypes=OptaxStep.DTYPES,
                     dialect={"adam_eps_mode": "corrected", "amsgrad_max_of": "corrected",
                              "weight_decay_mode": "decoupled_lr"}),
}
