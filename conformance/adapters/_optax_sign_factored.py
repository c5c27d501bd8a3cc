"""optax lion, adafactor and novograd (the jax adapter loads this file's ``MAPPINGS``).

Built like ``_optax_optim``: the alias a user calls with a constant rate equal to this step's lr,
its state's fields replaced by the request's slots, one ``update`` and ``apply_updates``, the
fields read back.  Every state slot of the oracle is an optax field here; ``step`` is optax's
``count`` (``ScaleByLionState``, ``FactoredState`` and ``ScaleByEmaState``,
``ScaleByNovogradState``).

* ``lion`` -> ``optax.lion(lr, b1, b2, weight_decay, mask)``: ``mu`` = ``exp_avg``.  optax adds
  ``lambda w`` to the sign and multiplies by lr: ``weight_decay_mode = "decoupled_lr"``.
* ``adafactor`` -> ``optax.adafactor``: ``v_row`` / ``v_col`` / ``v`` = ``exp_avg_sq_row`` /
  ``_col`` / ``exp_avg_sq`` (optax keeps zero arrays of shape (1,) in the unused ones, as the
  oracle does), ``ema`` = ``exp_avg`` (momentum, with ``dtype_momentum`` set to the request's
  dtype: optax's default float32 accumulator would round a float64 run).  optax has no relative
  step (``relative_step = False``), factors the two largest dimensions
  (``factored_dims = "largest_two"``), adds ``weight_decay_rate * w`` after the lr scaling
  (``weight_decay_mode = "decoupled_nolr"``), has no beta2 cap and a fixed parameter-scale floor
  1e-3 (``eps2``).  optax computes beta2_t = 1 - (count - offset + 1)^-0.8 in float32 even with
  x64 enabled (``factorized._decay_rate_pow``), so its float64 runs carry a relative error of
  about 1e-8 in the decay rate, which the float64 comparison reports: that is optax's behaviour,
  not the mapping's.
* ``novograd`` -> ``optax.novograd(lr, b1, b2, eps, eps_root, weight_decay)``: ``mu`` =
  ``exp_avg``, ``nu`` = ``exp_avg_sq``.  ``eps_mode = "outside"`` is optax's ``eps``, ``"inside"``
  its ``eps_root`` (the other set to 0).  optax adds the decay inside the moment for every leaf
  (no mask: a mask selecting a strict subset with weight decay is Unsupported) and has no grad
  averaging; ``first_moment_init`` is "first_step" (``m_1 = g'_1``), which equals "zeros"
  whenever grad_averaging is off, so both are accepted then.
"""

from __future__ import annotations

import optax

from conformance.adapters import Response, Unsupported
from conformance.adapters._optax_optim import OptaxStep
from conformance.adapters.mapping import Mapping

#: What a request becomes before a mapping sees it.
STEP = OptaxStep


def lion(c: OptaxStep) -> Response:
    c.expect("weight_decay_mode", "decoupled_lr")
    tx = optax.lion(c.take("lr"), b1=c.take("beta1"), b2=c.take("beta2"),
                    weight_decay=c.take("weight_decay"), mask=c.mask_tree("weight_decay_mask"))
    return c.run(tx, "lion", {"mu": "exp_avg"})


def adafactor(c: OptaxStep) -> Response:
    c.expect("relative_step", False)
    c.expect("factored_dims", "largest_two")
    c.expect("beta2_cap", 1.0)
    c.expect("weight_decay_mode", "decoupled_nolr")
    scale = c.take("multiply_by_parameter_scale")
    eps2 = c.take("eps2")
    if scale and eps2 != 1e-3:
        raise Unsupported(f"optax's parameter-scale floor is 1e-3; it cannot express eps2={eps2!r}")
    beta1 = c.take("beta1")
    wd = c.take("weight_decay")
    mask = c.mask_tree("weight_decay_mask")
    tx = optax.adafactor(
        learning_rate=c.take("lr"), min_dim_size_to_factor=c.take("min_dim_size_to_factor"),
        decay_rate=c.take("decay_rate"), decay_offset=c.take("decay_offset"),
        multiply_by_parameter_scale=scale, clipping_threshold=c.take("clipping_threshold"),
        momentum=beta1 or None, dtype_momentum=c.dtype, weight_decay_rate=wd or None,
        eps=c.take("eps1"), factored=c.take("factored"), weight_decay_mask=mask)
    fields = {"v_row": "exp_avg_sq_row", "v_col": "exp_avg_sq_col", "v": "exp_avg_sq"}
    if beta1:
        fields["ema"] = "exp_avg"
    return c.run(tx, "adafactor", fields)


def novograd(c: OptaxStep) -> Response:
    c.expect("weight_decay_mode", "moment")
    c.expect("grad_averaging", False)
    c.take("first_moment_init")  # identical without grad averaging (module docstring)
    eps, inside = c.take("eps"), c.take("eps_mode") == "inside"
    wd = c.take("weight_decay")
    where = c.mask("weight_decay_mask")
    if wd and not all(where.values()):
        raise Unsupported("optax.novograd decays every parameter; it cannot express a mask")
    tx = optax.novograd(c.take("lr"), b1=c.take("beta1"), b2=c.take("beta2"),
                        eps=0.0 if inside else eps, eps_root=eps if inside else 0.0,
                        weight_decay=wd)
    return c.run(tx, "novograd", {"mu": "exp_avg", "nu": "exp_avg_sq"})


MAPPINGS: dict[str, Mapping] = {
    "lion": Mapping(lion, api="optax.lion", dtypes=OptaxStep.DTYPES,
                    dialect={"weight_decay_mode": "decoupled_lr"}),
    "adafactor": Mapping(adafactor, api="optax.adafactor (dtype_momentum = the run's dtype)",
                         dtypes=OptaxStep.DTYPES,
                         dialect={"relative_step": False, "factored_dims": "largest_two",
                                  "beta2_cap": 1.0, "weight_decay_mode": "decoupled_nolr"}),
    "novograd": Mapping(novograd, api="optax.novograd (eps or eps_root by eps_mode)",
                        dtypes=OptaxStep.DTYPES,
                        dialect={"weight_decay_mode": "moment", "first_moment_init": "first_step"}),
}
