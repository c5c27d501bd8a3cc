"""normref's oracle: readable float64 reference implementations bound to their specs.

>>> import reference
>>> op = reference.get("batch_norm")
>>> outputs, new_state = op.apply({"x": x}, None, training=True)      # doctest: +SKIP
>>> grads = op.vjp({"x": x}, None, {"y": dy})                          # doctest: +SKIP
"""

from reference.registry import Op, Spec, SpecError, get, load_spec, ops

__all__ = ["Op", "Spec", "SpecError", "get", "load_spec", "ops"]
__version__ = "0.1.0"
