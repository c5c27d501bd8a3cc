"""A catalogue of optimizer mutants: real-world update-rule mistakes the harness must flag.

Each mutant is an adapter for ONE optimizer op (see tests/mutants.py for the normalizer
catalogue and the meaning of ``expect``).  It declares the *correct* dialect of what it claims to
be and runs the oracle's own step in the request dtype (the undecorated function), except for one
planted mistake in :meth:`OptimizerMutant.step`.  A mistake that *is* another known convention
(the lr kept inside the momentum buffer, AMSGrad's maximum of the corrected moment) must be
diagnosed as that CONVENTION; every other mistake must FAIL.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

import reference
from conformance.adapters import OpSupport, Request, Response
from reference.optimizers import mask_of
from reference.optimizers._common import apply_weight_decay, bias_correction, ema, next_step

Tree = dict[str, Any]

TORCH_SGD = {"lr_placement": "outside", "first_step": "clone", "momentum_correction": False,
             "weight_decay_mode": "l2"}
TORCH_ADAM = {"adam_eps_mode": "corrected", "amsgrad_max_of": "raw", "weight_decay_mode": "l2"}
TORCH_ADAMW = {"adam_eps_mode": "corrected", "amsgrad_max_of": "raw",
               "weight_decay_mode": "decoupled_lr"}


def _raw(fn: Any) -> Any:
    return getattr(fn, "__wrapped__", fn)


class OptimizerMutant:
    """The protocol plumbing: the oracle's step in the request dtype, one optimizer op."""

    op: ClassVar[str]
    dialect: ClassVar[dict[str, Any]] = {}
    dtypes: ClassVar[tuple[str, ...]] = ("float64",)
    expect: ClassVar[tuple[str, ...]] = ("FAIL",)
    known_gap: ClassVar[str | None] = None

    @property
    def name(self) -> str:
        return type(self).__name__

    def info(self) -> dict[str, str]:
        return {"framework": "mutant", "version": "0", "device": "cpu",
                "note": (type(self).__doc__ or "").strip().splitlines()[0]}

    def ops(self) -> dict[str, OpSupport]:
        return {self.op: OpSupport(dialect=dict(self.dialect), dtypes=self.dtypes,
                                   api=f"tests/optimizer_mutants.py::{self.name}")}

    def oracle(self, params: Tree, grads: Tree, state: Tree, hp: dict[str, Any],
               **changes: Any) -> tuple[Tree, Tree]:
        """The oracle's step (raw: in the arrays' dtype), optionally under changed hyper-parameters."""
        return _raw(reference.get(self.op).function)(params, grads, state, **{**hp, **changes})

    def step(self, params: Tree, grads: Tree, state: Tree, hp: dict[str, Any]) -> tuple[Tree, Tree]:
        return self.oracle(params, grads, state, hp)

    def evaluate(self, op: str, request: Request) -> Response:
        assert op == self.op, f"{self.name} implements {self.op}, not {op}"
        bound = reference.get(self.op)
        params, grads = bound.split_flat({k: np.asarray(v) for k, v in request.inputs.items()})
        state = bound.tree_state({k: np.asarray(v) for k, v in (request.state or {}).items()})
        with np.errstate(all="ignore"):
            new_params, new_state = self.step(params, grads, state, dict(request.hparams))
        store = next(iter(request.inputs.values())).dtype
        return Response(outputs={f"params/{p}": np.asarray(v).astype(store) for p, v in new_params.items()},
                        state={k: np.asarray(v).astype(store if np.ndim(v) else np.float64)
                               for k, v in bound.flat_state(new_state).items()})


class OptimizerControl(OptimizerMutant):
    """No mistake: the oracle's step in the request dtype (the catalogue's control)."""

    def __init__(self, op: str, dialect: dict[str, Any], dtypes: tuple[str, ...]) -> None:
        self.op = op  # type: ignore[misc]
        self.dialect = dialect  # type: ignore[misc]
        self.dtypes = dtypes  # type: ignore[misc]

    @property
    def name(self) -> str:
        return f"control-{self.op}"


# -- Adam family ---------------------------------------------------------------------------------


def _adam_like(params: Tree, grads: Tree, state: Tree, hp: dict[str, Any], direction: Any,
               *, decay_after: bool = False, t_override: int | None = None,
               square: Any = np.square) -> tuple[Tree, Tree]:
    """Adam's bookkeeping with a replaceable ``direction(m, v, t, hp) -> d`` and second-moment
    input ``square(g)`` (for the mutants)."""
    t_array, t = next_step(state, params)
    t = t_override or t
    if not decay_after:
        params, grads = apply_weight_decay(params, grads, lr=hp["lr"], weight_decay=hp["weight_decay"],
                                           mode=hp["weight_decay_mode"], mask=hp["weight_decay_mask"])
    new: Tree = {"step": t_array, "exp_avg": {}, "exp_avg_sq": {}}
    if hp["amsgrad"]:
        new["max_exp_avg_sq"] = {}
    out = {}
    for p, w in params.items():
        m = ema(state["exp_avg"][p], grads[p], hp["beta1"])
        v = ema(state["exp_avg_sq"][p], square(grads[p]), hp["beta2"])
        new["exp_avg"][p], new["exp_avg_sq"][p] = m, v
        if hp["amsgrad"]:  # torch's raw maximum, the mistake under test applied to it
            v = new["max_exp_avg_sq"][p] = np.maximum(state["max_exp_avg_sq"][p], v)
        out[p] = w - hp["lr"] * direction(m, v, t, hp)
    if decay_after:
        out, _ = apply_weight_decay(out, grads, lr=hp["lr"], weight_decay=hp["weight_decay"],
                                    mode=hp["weight_decay_mode"], mask=hp["weight_decay_mask"])
    return out, new


def _corrected(m: Any, v: Any, t: int, hp: dict[str, Any]) -> Any:
    bc1, bc2 = bias_correction(hp["beta1"], t), bias_correction(hp["beta2"], t)
    return (m / bc1) / (np.sqrt(v) / np.sqrt(bc2) + hp["eps"])


class AdamEpsInsideRoot(OptimizerMutant):
    """Adam with eps inside the square root: m_hat / sqrt(v_hat + eps)."""

    op, dialect = "adam", TORCH_ADAM

    def step(self, params, grads, state, hp):
        def direction(m, v, t, hp):
            bc1, bc2 = bias_correction(hp["beta1"], t), bias_correction(hp["beta2"], t)
            return (m / bc1) / np.sqrt(v / bc2 + hp["eps"])

        return _adam_like(params, grads, state, hp, direction)


class AdamNoBiasCorrection(OptimizerMutant):
    """Adam without bias correction (the moments' zero start is never undone)."""

    op, dialect = "adam", TORCH_ADAM

    def step(self, params, grads, state, hp):
        return _adam_like(params, grads, state, hp,
                          lambda m, v, t, hp: m / (np.sqrt(v) + hp["eps"]))


class AdamStepCountFrozen(OptimizerMutant):
    """Adam whose bias correction always uses t = 1 (the step counter is not threaded through)."""

    op, dialect = "adam", TORCH_ADAM

    def step(self, params, grads, state, hp):
        return _adam_like(params, grads, state, hp, _corrected, t_override=1)


class AdamSecondMomentOfAbs(OptimizerMutant):
    """Adam whose second moment averages |g| instead of g^2 (an AdaMax/RMS mix-up)."""

    op, dialect = "adam", TORCH_ADAM

    def step(self, params, grads, state, hp):
        return _adam_like(params, grads, state, hp, _corrected, square=np.abs)


class AdamKerasEpsHat(OptimizerMutant):
    """Adam with Keras's eps-hat (eps added to the uncorrected root) while claiming torch's form."""

    op, dialect = "adam", TORCH_ADAM
    expect = ("CONVENTION", "adam_eps_mode=eps_hat")

    def step(self, params, grads, state, hp):
        return self.oracle(params, grads, state, hp, adam_eps_mode="eps_hat")


class AMSGradMaxAfterBiasCorrection(OptimizerMutant):
    """AMSGrad keeping the maximum of the bias-corrected v_hat while claiming torch's raw maximum."""

    op, dialect = "adam", TORCH_ADAM
    expect = ("CONVENTION", "amsgrad_max_of=corrected")

    def step(self, params, grads, state, hp):
        return self.oracle(params, grads, state, hp, amsgrad_max_of="corrected")


class AMSGradMaxNeverStored(OptimizerMutant):
    """AMSGrad whose running maximum is computed but never written back (Ranger21's bug (d))."""

    op, dialect = "adam", TORCH_ADAM

    def step(self, params, grads, state, hp):
        new_params, new_state = self.oracle(params, grads, state, hp)
        if hp["amsgrad"]:
            new_state["max_exp_avg_sq"] = dict(state["max_exp_avg_sq"])
        return new_params, new_state


class AdamWDecayNotScaledByLr(OptimizerMutant):
    """AdamW decaying w by (1 - lambda) instead of (1 - lr lambda) while claiming torch's AdamW."""

    op, dialect = "adamw", TORCH_ADAMW
    expect = ("CONVENTION", "weight_decay_mode=decoupled_nolr")

    def step(self, params, grads, state, hp):
        return self.oracle(params, grads, state, hp, weight_decay_mode="decoupled_nolr")


class AdamWDecayAfterUpdate(OptimizerMutant):
    """AdamW applying the decoupled decay after the Adam update instead of before it."""

    op, dialect = "adamw", TORCH_ADAMW

    def step(self, params, grads, state, hp):
        return _adam_like(params, grads, state, hp, _corrected, decay_after=True)


class AdamWDecayIgnoresMask(OptimizerMutant):
    """AdamW decaying biases and normalization gains too (the no-decay group is ignored)."""

    op, dialect = "adamw", TORCH_ADAMW

    def step(self, params, grads, state, hp):
        return self.oracle(params, grads, state, hp, weight_decay_mask="all")


class AdamWDecayCoupled(OptimizerMutant):
    """AdamW folding the decay into the gradient (Adam's L2) while claiming decoupled decay."""

    op, dialect = "adamw", TORCH_ADAMW
    expect = ("CONVENTION", "weight_decay_mode=l2")

    def step(self, params, grads, state, hp):
        return self.oracle(params, grads, state, hp, weight_decay_mode="l2")


# -- SGD -------------------------------------------------------------------------------------------


class SGDNesterovLookAheadTwice(OptimizerMutant):
    """Nesterov applied twice: the look-ahead mu b_t is added to a buffer that already holds it."""

    op, dialect = "sgd", TORCH_SGD

    def step(self, params, grads, state, hp):
        new_params, new_state = self.oracle(params, grads, state, hp)
        if hp["nesterov"]:
            buf = new_state["momentum_buffer"]
            new_params = {p: w - hp["lr"] * hp["momentum"] * hp["momentum"] * buf[p]
                          for p, w in new_params.items()}
        return new_params, new_state


class SGDDampeningOnFirstStep(OptimizerMutant):
    """Momentum SGD damping the first gradient (zero buffer start) while claiming torch's clone."""

    op, dialect = "sgd", TORCH_SGD
    expect = ("CONVENTION", "first_step=zeros")

    def step(self, params, grads, state, hp):
        return self.oracle(params, grads, state, hp, first_step="zeros")


class SGDLrInsideBuffer(OptimizerMutant):
    """Momentum SGD keeping the lr inside the buffer (Keras/Caffe2) while claiming torch's form."""

    op, dialect = "sgd", TORCH_SGD
    expect = ("CONVENTION", "lr_placement=inside")

    def step(self, params, grads, state, hp):
        return self.oracle(params, grads, state, hp, lr_placement="inside")


class SGDWeightDecayOutsideMomentum(OptimizerMutant):
    """SGD subtracting lr lambda w outside the momentum buffer instead of adding lambda w to the
    gradient: the decoupled (Keras) form, while claiming torch's L2."""

    op, dialect = "sgd", TORCH_SGD
    expect = ("CONVENTION", "weight_decay_mode=decoupled_lr")

    def step(self, params, grads, state, hp):
        new_params, new_state = self.oracle(params, grads, state, {**hp, "weight_decay": 0.0})
        wd = hp["weight_decay"]
        where = mask_of(hp["weight_decay_mask"], params)
        return {p: w - hp["lr"] * wd * params[p] if where[p] else w
                for p, w in new_params.items()}, new_state


class SGDMomentumBufferNotStored(OptimizerMutant):
    """Momentum SGD that returns the previous buffer (the in-place update went to a copy)."""

    op, dialect = "sgd", TORCH_SGD

    def step(self, params, grads, state, hp):
        new_params, new_state = self.oracle(params, grads, state, hp)
        if "momentum_buffer" in state and float(state["step"]) > 0:
            new_state["momentum_buffer"] = dict(state["momentum_buffer"])
        return new_params, new_state


# -- AdaGrad, RMSprop ----------------------------------------------------------------------------

TORCH_ADAGRAD = {"eps_placement": "outside", "empty_accumulator": "divide", "weight_decay_mode": "l2"}
TORCH_RMSPROP = {"eps_placement": "outside", "lr_placement": "outside", "weight_decay_mode": "l2"}
KERAS_RMSPROP = {"eps_placement": "inside", "lr_placement": "inside", "weight_decay_mode": "decoupled_lr"}


class AdagradEpsInsideRoot(OptimizerMutant):
    """AdaGrad with eps inside the root, sqrt(s + eps) (optax's form), while claiming torch's."""

    op, dialect = "adagrad", TORCH_ADAGRAD
    expect = ("CONVENTION", "eps_placement=inside")

    def step(self, params, grads, state, hp):
        return self.oracle(params, grads, state, hp, eps_placement="inside")


class AdagradAccumulatorOverwritten(OptimizerMutant):
    """AdaGrad overwriting its accumulator with g^2 every step instead of adding to it."""

    op, dialect = "adagrad", TORCH_ADAGRAD

    def step(self, params, grads, state, hp):
        empty = {p: np.zeros_like(v) for p, v in state["sum"].items()}
        return self.oracle(params, grads, {**state, "sum": empty}, hp)


class RMSpropCenteredIgnored(OptimizerMutant):
    """Centered RMSprop that never subtracts the mean gradient (centered=True is accepted, ignored)."""

    op, dialect = "rmsprop", TORCH_RMSPROP

    def step(self, params, grads, state, hp):
        if not hp["centered"]:
            return self.oracle(params, grads, state, hp)
        new_params, new_state = self.oracle(params, grads, state, {**hp, "centered": False})
        kept = {k: v for k, v in self.oracle(params, grads, state, hp)[1].items() if k not in new_state}
        return new_params, {**new_state, **kept}


class RMSpropLrInsideBuffer(OptimizerMutant):
    """Momentum RMSprop keeping the lr inside the buffer (TF, optax) while claiming torch's form."""

    op, dialect = "rmsprop", TORCH_RMSPROP
    expect = ("CONVENTION", "lr_placement=inside")

    def step(self, params, grads, state, hp):
        return self.oracle(params, grads, state, hp, lr_placement="inside")


class RMSpropKerasUnderTorchName(OptimizerMutant):
    """Keras's RMSprop (eps inside the root, lr inside the momentum buffer, decoupled weight decay)
    shipped as torch's: three knobs at once, which no single knob or pair explains."""

    op, dialect = "rmsprop", TORCH_RMSPROP
    expect = ("CONVENTION", "the keras dialect")

    def step(self, params, grads, state, hp):
        return self.oracle(params, grads, state, hp, **KERAS_RMSPROP)


class RMSpropKerasKeepsLrOutside(OptimizerMutant):
    """Declares Keras's three-knob dialect but keeps torch's lr placement: one knob ignored."""

    op, dialect = "rmsprop", KERAS_RMSPROP
    expect = ("CONVENTION", "lr_placement=outside")

    def step(self, params, grads, state, hp):
        return self.oracle(params, grads, state, hp, lr_placement="outside")


# -- large-batch optimizers -------------------------------------------------------------------------

OPTAX_LARS = {"trust_denominator": "norm_of_sum", "zero_norm_rule": "one", "lr_placement": "inside",
              "first_step": "zeros", "trust_clip": False, "always_adapt": True}
PAPER_LARS = {**OPTAX_LARS, "trust_denominator": "sum_of_norms"}
OPTAX_LAMB = {"bias_correction": "adam", "weight_decay_mode": "update", "trust_scope": "all",
              "trust_clip": False}


class LARSExcludesNothing(OptimizerMutant):
    """LARS adapting every tensor: the trust-ratio exclusion mask (biases, norms) is ignored."""

    op, dialect = "lars", OPTAX_LARS

    def step(self, params, grads, state, hp):
        return self.oracle(params, grads, state, hp, trust_mask="all", weight_decay_mask="all")


class LARSNormOfSumClaimingPaper(OptimizerMutant):
    """LARS with optax's ||g + lambda w|| denominator while claiming the paper's ||g|| + lambda ||w||."""

    op, dialect = "lars", PAPER_LARS
    expect = ("CONVENTION", "trust_denominator=norm_of_sum")

    def step(self, params, grads, state, hp):
        return self.oracle(params, grads, state, hp, trust_denominator="norm_of_sum")


class LAMBTrustRatioOnRawGradient(OptimizerMutant):
    """LAMB computing the trust ratio ||w|| / ||g|| from the raw gradient instead of the update."""

    op, dialect = "lamb", OPTAX_LAMB

    def step(self, params, grads, state, hp):
        plain, new_state = self.oracle(params, grads, state, hp, trust_mask="none")
        trusted = mask_of(hp["trust_mask"], params)
        out = {}
        for p, w in params.items():
            wn, gn = float(np.linalg.norm(w)), float(np.linalg.norm(grads[p]))
            ratio = wn / gn if trusted[p] and wn > 0 and gn > 0 else 1.0
            out[p] = w - (w - plain[p]) * ratio
        return out, new_state


class LionSignOfMomentum(OptimizerMutant):
    """Lion taking sign(m) of the stored momentum instead of the interpolation c = b1 m + (1-b1) g."""

    op, dialect = "lion", {"weight_decay_mode": "decoupled_lr"}

    def step(self, params, grads, state, hp):
        new_params, _ = self.oracle(params, grads, state, {**hp, "beta1": 1.0})
        _, new_state = self.oracle(params, grads, state, hp)
        return new_params, new_state


class NovoGradSecondMomentFromZero(OptimizerMutant):
    """NovoGrad starting its layer-wise second moment at 0 (v_1 = (1-b2)||g||^2, not ||g||^2)."""

    op, dialect = "novograd", {"eps_mode": "outside", "first_moment_init": "first_step",
                               "weight_decay_mode": "moment"}

    def step(self, params, grads, state, hp):
        if float(state["step"]) == 0:
            # the oracle's "later step" branch from a zero second moment: v_1 = (1 - b2) ||g||^2
            new_params, new_state = self.oracle(params, grads, {**state, "step": np.asarray(1.0)}, hp)
            return new_params, {**new_state, "step": np.asarray(1.0)}
        return self.oracle(params, grads, state, hp)


class GlobalNormClipPerTensor(OptimizerMutant):
    """Global-norm clipping that clips each tensor by its own norm (the global norm never formed)."""

    op, dialect = "global_norm_clip", {}

    def step(self, params, grads, state, hp):
        out, new_state = {}, None
        for p in params:
            o, new_state = self.oracle({p: params[p]}, {p: grads[p]}, state, hp)
            out.update(o)
        return out, new_state


class AGCOutputUnitsOnTheLastAxis(OptimizerMutant):
    """AGC reducing over the JAX (HWIO, output last) axes on PyTorch-layout weights."""

    op, dialect = "agc", {"layout": "out_first", "compare_guarded": False}
    expect = ("CONVENTION", "layout=out_last")

    def step(self, params, grads, state, hp):
        return self.oracle(params, grads, state, hp, layout="out_last")


class Ranger21OfficialBugsClaimingPaper(OptimizerMutant):
    """Ranger21 with the official code's deviations (decay on the last parameter only, beta2 in the
    noise norm, ...) while claiming the paper's algorithm."""

    op = "ranger21"
    dialect = {"bug_compatible": False, "preprocess_twice": False, "variance_sum_init": 0.0,
               "unit_layout": "out_first", "softplus_form": "exact", "agc_compare_guarded": False}
    expect = ("CONVENTION", "bug_compatible=True")

    def step(self, params, grads, state, hp):
        return self.oracle(params, grads, state, hp, bug_compatible=True)


class LookaheadSyncsEveryKPlus1(OptimizerMutant):
    """Lookahead syncing the slow weights every k+1 inner steps (an off-by-one in the counter)."""

    op, dialect = "lookahead", {"slow_init": "params", "reset_state": False}

    def step(self, params, grads, state, hp):
        return self.oracle(params, grads, state, hp, k=hp["k"] + 1)


CATALOGUE: list[type[OptimizerMutant]] = [
    AdamEpsInsideRoot, AdamNoBiasCorrection, AdamStepCountFrozen, AdamSecondMomentOfAbs,
    AdamKerasEpsHat, AMSGradMaxAfterBiasCorrection, AMSGradMaxNeverStored,
    AdamWDecayNotScaledByLr, AdamWDecayAfterUpdate, AdamWDecayIgnoresMask, AdamWDecayCoupled,
    SGDNesterovLookAheadTwice, SGDDampeningOnFirstStep, SGDLrInsideBuffer,
    SGDWeightDecayOutsideMomentum, SGDMomentumBufferNotStored,
    AdagradEpsInsideRoot, AdagradAccumulatorOverwritten, RMSpropCenteredIgnored, RMSpropLrInsideBuffer,
    RMSpropKerasUnderTorchName, RMSpropKerasKeepsLrOutside,
    LARSExcludesNothing, LARSNormOfSumClaimingPaper, LAMBTrustRatioOnRawGradient, LionSignOfMomentum,
    NovoGradSecondMomentFromZero, GlobalNormClipPerTensor, AGCOutputUnitsOnTheLastAxis,
    Ranger21OfficialBugsClaimingPaper, LookaheadSyncsEveryKPlus1,
]
