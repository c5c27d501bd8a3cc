"""A catalogue of mutant adapters: plausible real-world mistakes the harness must flag.

Each mutant is an adapter (see :mod:`conformance.adapters`) for ONE op.  It declares the *correct*
dialect of what it claims to be and evaluates the oracle's own formulas in the request dtype (the
undecorated functions, like ``conformance/adapters/numpy32.py``), except for one planted mistake.
Forward mistakes keep the oracle's backward (the bug sits in one kernel), backward mistakes keep the
oracle's forward, and mistakes that *are* another known convention compute that convention
consistently (forward and backward), as a framework following it would.

``expect`` records what the harness must say with the default profile and seed 0:

* ``("FAIL",)``: at least one case is FAIL or ERROR;
* ``("CONVENTION", "knob=value")``: the mistake is another dialect, so the cases that can see it
  are CONVENTION with exactly that diagnosis (quotes dropped, e.g. ``eps_placement=outside``).

``known_gap`` (a reason) marks a mutant the harness does not flag yet; its test is a strict xfail,
so it turns up once the gap is fixed.  ``Control`` is the unmutated base: it must produce no FAIL
and no ERROR, which proves that the flags come from the mutations.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

import reference
from conformance.adapters import OpSupport, Request, Response
from reference.normalizers._stats import (
    expand_to,
    other_axes,
    reduction_size,
    running_average,
    standardize,
    standardize_vjp,
)

Arrays = dict[str, np.ndarray]

# The dialects the mutants claim (values of the spec's convention knobs; layout and numeric
# hyper-parameters come from each case).
TORCH_BN = {"momentum_convention": "new_weight", "running_var_correction": 1, "single_value": "raise"}
TORCH_IN = dict(TORCH_BN)
RMS_INSIDE = {"eps_placement": "inside", "weight_offset": 0.0}
GEMMA_RMS = {"eps_placement": "inside", "weight_offset": 1.0}
TORCH_SN = {"normalize": "max", "iteration_order": "u_then_v", "eval_mode": "frozen",
            "gradient": "through_sigma"}
WS_README_TORCH = {"correction": 1, "eps_mode": "add_std"}
WN_TORCH = {"eps_mode": "add"}


def _raw(fn: Any) -> Any:
    """The undecorated oracle function: it computes in the dtype of its arguments."""
    return getattr(fn, "__wrapped__", fn)


class Mutant:
    """The protocol plumbing: the oracle's formulas in the request dtype, one op.

    A mutant overrides :meth:`forward` (outputs and new state) or :meth:`backward` (gradients)
    and calls :meth:`oracle` / :meth:`oracle_vjp` for everything it does not change.  ``a`` holds
    the inputs and the state (keyed by their spec names) in the compute dtype, ``hp`` the request's
    hyper-parameters, ``ct`` the cotangents of the outputs.
    """

    op: ClassVar[str]
    dialect: ClassVar[dict[str, Any]] = {}
    dtypes: ClassVar[tuple[str, ...]] = ("float64", "float32")
    expect: ClassVar[tuple[str, ...]] = ("FAIL",)
    known_gap: ClassVar[str | None] = None
    #: Compute half-precision requests in float32 (every framework's "opmath").
    upcast_half: ClassVar[bool] = True

    @property
    def name(self) -> str:
        return type(self).__name__

    def info(self) -> dict[str, str]:
        return {"framework": "mutant", "version": "0", "device": "cpu",
                "note": (type(self).__doc__ or "").strip().splitlines()[0]}

    def ops(self) -> dict[str, OpSupport]:
        return {self.op: OpSupport(dialect=dict(self.dialect), dtypes=self.dtypes,
                                   api=f"tests/mutants.py::{self.name}")}

    # -- the pieces a mutant overrides ------------------------------------------------------

    def forward(self, a: Arrays, hp: dict[str, Any]) -> tuple[Arrays, Arrays]:
        return self.oracle(a, hp)

    def backward(self, ct: Arrays, a: Arrays, hp: dict[str, Any]) -> Arrays | tuple[Arrays, Arrays]:
        """The gradients; for an op whose VJP updates state (``updated_in = "backward"``),
        ``(gradients, new backward-pass state)``, which the response carries like forward state."""
        return self.oracle_vjp(ct, a, hp)

    # -- the oracle's formulas, optionally under changed hyper-parameters -------------------

    def oracle(self, a: Arrays, hp: dict[str, Any], **changes: Any) -> tuple[Arrays, Arrays]:
        """``(outputs, new_state)`` of the oracle's function in the arrays' dtype."""
        bound = reference.get(self.op)
        spec = bound.spec
        result = _raw(bound.function)(**a, **{**hp, **changes})
        outputs, state = result if spec.state else (result, {})
        if len(spec.outputs) == 1:
            return {spec.outputs[0].name: outputs}, dict(state)
        return {t.name: v for t, v in zip(spec.outputs, outputs, strict=True)}, dict(state)

    def oracle_vjp(self, ct: Arrays, a: Arrays, hp: dict[str, Any], **changes: Any
                   ) -> Arrays | tuple[Arrays, Arrays]:
        """The oracle's VJP in the arrays' dtype: the gradients, or ``(gradients, new
        backward-pass state)`` for an op with backward-pass state (PowerNorm, Online Norm)."""
        bound = reference.get(self.op)
        cts = {"d" + t.name: ct.get(t.name) for t in bound.spec.outputs}
        result = _raw(bound.vjp_function)(**cts, **a, **{**hp, **changes})
        if bound.spec.backward_state:
            grads, updated = result
            return dict(grads), dict(updated)
        return dict(result)

    # -- the adapter protocol ---------------------------------------------------------------

    def _compute(self, value: np.ndarray) -> np.ndarray:
        value = np.asarray(value)
        # Only half-precision floats are widened (bfloat16's NumPy kind is "V"); a bool mask stays bool.
        if self.upcast_half and value.dtype.itemsize < 4 and value.dtype.kind != "b":
            return value.astype(np.float32)
        return value

    def evaluate(self, op: str, request: Request) -> Response:
        assert op == self.op, f"{self.name} implements {self.op}, not {op}"
        a = {k: self._compute(v) for k, v in {**request.inputs, **(request.state or {})}.items()}
        hp = dict(request.hparams)
        with np.errstate(all="ignore"):
            outputs, state = self.forward(a, hp)
            grads = {}
            if request.cotangents is not None:
                ct = {k: self._compute(v) for k, v in request.cotangents.items()}
                grads = self.backward(ct, a, hp)
                if isinstance(grads, tuple):  # the backward pass's state joins the step's state
                    grads, updated = grads
                    state = {**state, **updated}
        store = next(iter(request.inputs.values())).dtype

        def out(tree: Arrays) -> Arrays:
            return {k: np.asarray(v).astype(store) for k, v in tree.items()}

        return Response(outputs=out(outputs), state=out(state), grads=out(grads))


class Control(Mutant):
    """No mistake: the oracle's formulas in the request dtype (the catalogue's control)."""

    def __init__(self, op: str, dialect: dict[str, Any] | None = None,
                 dtypes: tuple[str, ...] = ("float64", "float32")) -> None:
        self.op = op  # type: ignore[misc]
        self.dialect = dict(dialect or {})  # type: ignore[misc]
        self.dtypes = dtypes  # type: ignore[misc]

    @property
    def name(self) -> str:
        return f"Control-{self.op}"


def _channel(p: np.ndarray | None, x: np.ndarray, axis: int) -> Any:
    """A per-channel parameter broadcast against x (1 when absent)."""
    return 1.0 if p is None else expand_to(p, x.ndim, axis % x.ndim)


def _affine(x_hat: np.ndarray, a: Arrays, axis: int) -> np.ndarray:
    y = x_hat * _channel(a.get("weight"), x_hat, axis)
    if a.get("bias") is not None:
        y = y + _channel(a["bias"], x_hat, axis)
    return y


def _norm_axes(x: np.ndarray, hp: dict[str, Any]) -> tuple[int, ...]:
    """The normalized axes of LayerNorm / RMSNorm, non-negative and in increasing order."""
    return tuple(sorted(int(a) % x.ndim for a in hp["axes"]))


# ============================================================================================
# BatchNorm (claims torch: new_weight momentum, unbiased running variance, raise on n = 1)
# ============================================================================================


class _BN(Mutant):
    op = "batch_norm"
    dialect = TORCH_BN

    @staticmethod
    def batch_stats(hp: dict[str, Any]) -> bool:
        return bool(hp["training"] or not hp["track_running_stats"])

    @staticmethod
    def axes(a: Arrays, hp: dict[str, Any]) -> tuple[int, tuple[int, ...]]:
        axis = int(hp["axis"]) % a["x"].ndim
        return axis, other_axes(a["x"].ndim, axis)


class BNUnbiasedForwardVar(_BN):
    """BN forward normalizes with the unbiased batch variance (``x.var(ddof=1)``, torch.var's
    default) instead of the biased one of Alg. 1; only the running variance should be unbiased."""

    def forward(self, a, hp):
        out, state = self.oracle(a, hp)
        if self.batch_stats(hp):
            x, (axis, R) = a["x"], self.axes(a, hp)
            var = x.var(axis=R, ddof=1, keepdims=True)  # the mistake: ddof=1
            out["y"] = _affine((x - x.mean(axis=R, keepdims=True)) / np.sqrt(var + hp["eps"]), a, axis)
        return out, state


class BNRunningVarNoBessel(_BN):
    """The running variance stores the biased batch variance (no n/(n-1)), Flax's and Keras's
    convention, in an implementation that claims torch's."""

    expect = ("CONVENTION", "running_var_correction=0")

    def forward(self, a, hp):
        return self.oracle(a, hp, running_var_correction=0)


class BNMomentumFlipped(_BN):
    """The momentum weights the old running value (``m*old + (1-m)*batch``, Keras/ONNX) in an
    implementation that claims torch's ``(1-m)*old + m*batch`` (a port that kept Keras's formula)."""

    expect = ("CONVENTION", "momentum_convention=old_weight")

    def forward(self, a, hp):
        return self.oracle(a, hp, momentum_convention="old_weight")


class BNEpsOutsideSqrt(_BN):
    """BN divides by ``std + eps`` instead of ``sqrt(var + eps)`` (in training and inference)."""

    def forward(self, a, hp):
        out, state = self.oracle(a, hp)
        x, (axis, R) = a["x"], self.axes(a, hp)
        if self.batch_stats(hp):
            mean, std = x.mean(axis=R, keepdims=True), x.std(axis=R, keepdims=True)
        else:
            mean, std = _channel(a["running_mean"], x, axis), np.sqrt(_channel(a["running_var"], x, axis))
        out["y"] = _affine((x - mean) / (std + hp["eps"]), a, axis)  # the mistake: eps outside
        return out, state


class BNStopGradMean(_BN):
    """The backward treats the batch mean as a constant (a ``stop_gradient``/``detach`` on mu, or
    a hand-written backward missing the ``- mean(dy)`` term)."""

    def backward(self, ct, a, hp):
        grads = self.oracle_vjp(ct, a, hp)
        if self.batch_stats(hp):
            x, (axis, R) = a["x"], self.axes(a, hp)
            x_hat, inv_std, _, _ = standardize(x, R, hp["eps"])
            h = ct["y"] * _channel(a.get("weight"), x, axis)
            grads["x"] = inv_std * (h - x_hat * np.mean(h * x_hat, axis=R, keepdims=True))  # no -mean(h)
        return grads


class BNStopGradVar(_BN):
    """The backward treats the batch variance as a constant (``detach`` on var): the
    ``- x_hat * mean(dy * x_hat)`` term is missing."""

    def backward(self, ct, a, hp):
        grads = self.oracle_vjp(ct, a, hp)
        if self.batch_stats(hp):
            x, (axis, R) = a["x"], self.axes(a, hp)
            _, inv_std, _, _ = standardize(x, R, hp["eps"])
            h = ct["y"] * _channel(a.get("weight"), x, axis)
            grads["x"] = inv_std * (h - np.mean(h, axis=R, keepdims=True))  # no x_hat term
        return grads


class BNEvalUsesBatchStats(_BN):
    """Inference normalizes with the batch statistics although running statistics are tracked
    (the ``training`` flag is not passed down: ``F.batch_norm(..., training=True)`` always)."""

    def forward(self, a, hp):
        out, state = self.oracle(a, hp)
        if not hp["training"]:
            out, _ = self.oracle(a, hp, track_running_stats=False)  # the mistake
        return out, state

    def backward(self, ct, a, hp):
        if not hp["training"]:
            return self.oracle_vjp(ct, a, hp, track_running_stats=False)
        return self.oracle_vjp(ct, a, hp)


class BNCounterNotIncremented(_BN):
    """``num_batches_tracked`` is never incremented (a functional port that updates the running
    mean and variance but returns the counter it was given)."""

    def forward(self, a, hp):
        out, state = self.oracle(a, hp)
        if "num_batches_tracked" in state:
            state["num_batches_tracked"] = a["num_batches_tracked"]  # the mistake
        return out, state


# ============================================================================================
# LayerNorm (spec defaults: torch / ONNX)
# ============================================================================================


class LNWrongAxes(Mutant):
    """LN statistics over every axis but the batch axis (the CNN-style "layer" of all features of
    a sample, GroupNorm(1)) instead of the requested normalized axes; the affine is right."""

    op = "layer_norm"

    def _parts(self, a, hp):
        x = a["x"]
        wrong = tuple(range(1, x.ndim)) or (0,)  # the mistake: ignores hp["axes"]
        x_hat, inv_std, _, _ = standardize(x, wrong, hp["eps"])
        return x, wrong, _norm_axes(x, hp), x_hat, inv_std

    def forward(self, a, hp):
        x, _, axes, x_hat, _ = self._parts(a, hp)
        y = x_hat if a.get("weight") is None else x_hat * expand_to(a["weight"], x.ndim, axes)
        if a.get("bias") is not None:
            y = y + expand_to(a["bias"], x.ndim, axes)
        return {"y": y}, {}

    def backward(self, ct, a, hp):  # the VJP of this (wrong) forward
        x, wrong, axes, x_hat, inv_std = self._parts(a, hp)
        dy, shared = ct["y"], other_axes(x.ndim, axes)
        h = dy if a.get("weight") is None else dy * expand_to(a["weight"], x.ndim, axes)
        grads = {"x": standardize_vjp(h, x_hat, inv_std, wrong)}
        if a.get("weight") is not None:
            grads["weight"] = np.sum(dy * x_hat, axis=shared)
        if a.get("bias") is not None:
            grads["bias"] = np.sum(dy, axis=shared)
        return grads


class LNBiasGradWrongReduction(Mutant):
    """The bias gradient sums the batch axis only and averages the other leading axes
    (``dy.sum(0).mean(...)``): right for 2-D (batch, features) input, wrong by the sequence
    length for (batch, tokens, features)."""

    op = "layer_norm"

    def backward(self, ct, a, hp):
        grads = self.oracle_vjp(ct, a, hp)
        shared = other_axes(ct["y"].ndim, _norm_axes(ct["y"], hp))
        if "bias" in grads and shared:
            grads["bias"] = ct["y"].sum(axis=shared[0], keepdims=True).mean(axis=shared)  # the mistake
        return grads


class LNFloat16NoUpcast(Mutant):
    """LayerNorm computed in float16 end to end (no float32 "opmath"): mean, variance, rsqrt and
    the affine are all rounded to half precision."""

    op = "layer_norm"
    dtypes = ("float16",)
    upcast_half = False  # the mistake


# ============================================================================================
# GroupNorm (spec defaults: paper / torch)
# ============================================================================================


class GNInterleavedGroups(Mutant):
    """GN puts channel c into group ``c % G`` (a reshape to (N, C/G, G, ...) instead of
    (N, G, C/G, ...), typical of channels-last ports) instead of contiguous blocks."""

    op = "group_norm"

    def _permuted(self, arrays, hp, channels):
        """Arrays with the channels reordered so that the interleaved groups become contiguous."""
        order = np.argsort(np.arange(channels) % hp["num_groups"], kind="stable")
        axis = int(hp["axis"]) % arrays["x"].ndim
        out = {k: np.take(v, order, axis=axis) for k, v in arrays.items() if k in ("x", "dy")}
        for k in ("weight", "bias"):
            if arrays.get(k) is not None:
                out[k] = arrays[k][order] if hp["affine"] == "per_channel" else arrays[k]
        return out, np.argsort(order), axis

    def forward(self, a, hp):
        p, back, axis = self._permuted(a, hp, a["x"].shape[int(hp["axis"])])
        out, _ = self.oracle(p, hp)
        return {"y": np.take(out["y"], back, axis=axis)}, {}

    def backward(self, ct, a, hp):  # the VJP of this (wrong) forward
        p, back, axis = self._permuted({**a, "dy": ct["y"]}, hp, a["x"].shape[int(hp["axis"])])
        dy = p.pop("dy")
        grads = self.oracle_vjp({"y": dy}, p, hp)
        grads["x"] = np.take(grads["x"], back, axis=axis)
        if hp["affine"] == "per_channel":
            grads.update({k: grads[k][back] for k in ("weight", "bias") if k in grads})
        return grads


class GNEpsAddedToStd(Mutant):
    """GN divides by ``std + eps`` instead of ``sqrt(var + eps)``."""

    op = "group_norm"

    def forward(self, a, hp):
        x, G = a["x"], hp["num_groups"]
        axis = int(hp["axis"]) % x.ndim
        xt = np.moveaxis(x, axis, 1)
        groups = xt.reshape(xt.shape[0], G, -1)
        centered = groups - groups.mean(axis=2, keepdims=True)
        x_hat = centered / (groups.std(axis=2, keepdims=True) + hp["eps"])  # the mistake
        x_hat = np.moveaxis(x_hat.reshape(xt.shape), 1, axis)
        per_channel = {k: a[k] if hp["affine"] == "per_channel" else np.repeat(a[k], x.shape[axis] // G)
                       for k in ("weight", "bias") if a.get(k) is not None}
        return {"y": _affine(x_hat, per_channel, axis)}, {}


# ============================================================================================
# InstanceNorm (claims torch)
# ============================================================================================


class _IN(Mutant):
    op = "instance_norm"
    dialect = TORCH_IN

    @staticmethod
    def axes(a: Arrays, hp: dict[str, Any]) -> tuple[int, tuple[int, ...]]:
        axis = int(hp["axis"]) % a["x"].ndim
        return axis, other_axes(a["x"].ndim, (0, axis))


class INBatchStats(_IN):
    """IN reduces over the batch axis too (batch statistics: BatchNorm), so samples leak into
    each other."""

    def _parts(self, a, hp):
        x, (axis, R) = a["x"], self.axes(a, hp)
        batch = (0,) + R  # the mistake: the batch axis joins the statistics
        x_hat, inv_std, _, _ = standardize(x, batch, hp["eps"])
        return x, axis, batch, x_hat, inv_std

    def forward(self, a, hp):
        out, state = self.oracle(a, hp)
        if hp["training"] or not hp["track_running_stats"]:
            x, axis, _, x_hat, _ = self._parts(a, hp)
            out["y"] = _affine(x_hat, a, axis)
        return out, state

    def backward(self, ct, a, hp):  # the VJP of this (wrong) forward
        grads = self.oracle_vjp(ct, a, hp)
        if hp["training"] or not hp["track_running_stats"]:
            x, axis, batch, x_hat, inv_std = self._parts(a, hp)
            h = ct["y"] * _channel(a.get("weight"), x, axis)
            grads["x"] = standardize_vjp(h, x_hat, inv_std, batch)
            if "weight" in grads:
                grads["weight"] = np.sum(ct["y"] * x_hat, axis=other_axes(x.ndim, axis))
        return grads


class INRunningVarBesselAllValues(_IN):
    """The running variance's Bessel factor uses the N * H * W values of a channel (BatchNorm's
    count) instead of the H * W values of each instance, as torch's instance_norm does."""

    def forward(self, a, hp):
        out, state = self.oracle(a, hp)
        if hp["training"] and hp["track_running_stats"]:
            x, (_, R) = a["x"], self.axes(a, hp)
            _, _, _, var = standardize(x, R, hp["eps"])  # biased, per instance
            m = reduction_size(x, (0,) + R)  # the mistake: should be reduction_size(x, R)
            batch_var = np.mean(var, axis=(0,) + R) * (m / (m - 1))
            state["running_var"] = running_average(
                a["running_var"], batch_var, a["num_batches_tracked"] + 1.0, hp["momentum"],
                hp["momentum_convention"])
        return out, state


# ============================================================================================
# RMSNorm (claims eps inside the root, no gain offset: the official TF code, torch, Flax, ...)
# ============================================================================================


class _RMS(Mutant):
    op = "rms_norm"
    dialect = RMS_INSIDE


class RMSNoEps(_RMS):
    """RMSNorm without eps: ``x / sqrt(mean(x^2))`` (divides by zero on an all-zero row)."""

    def forward(self, a, hp):
        return self.oracle(a, hp, eps=0.0)

    def backward(self, ct, a, hp):
        return self.oracle_vjp(ct, a, hp, eps=0.0)


class RMSSubtractsMean(_RMS):
    """RMSNorm centers the row first (a LayerNorm without bias, copied from the LN kernel)."""

    def _centered(self, a, hp):
        x = a["x"]
        return {**a, "x": x - x.mean(axis=_norm_axes(x, hp), keepdims=True)}  # the mistake

    def forward(self, a, hp):
        return self.oracle(self._centered(a, hp), hp)

    def backward(self, ct, a, hp):  # chain rule through the centering
        grads = self.oracle_vjp(ct, self._centered(a, hp), hp)
        grads["x"] = grads["x"] - grads["x"].mean(axis=_norm_axes(a["x"], hp), keepdims=True)
        return grads


class RMSEpsOutside(_RMS):
    """RMSNorm divides by ``rms + eps`` (the official rmsnorm_torch.py) in an implementation that
    claims ``rsqrt(mean(x^2) + eps)``."""

    expect = ("CONVENTION", "eps_placement=outside")

    def forward(self, a, hp):
        return self.oracle(a, hp, eps_placement="outside")

    def backward(self, ct, a, hp):
        return self.oracle_vjp(ct, a, hp, eps_placement="outside")


class RMSGemmaOffsetForgotten(_RMS):
    """A Gemma port that multiplies by ``w`` instead of ``(1 + w)`` (the zero-initialized gain
    then switches every feature off)."""

    dialect = GEMMA_RMS
    expect = ("CONVENTION", "weight_offset=0.0")

    def forward(self, a, hp):
        return self.oracle(a, hp, weight_offset=0.0)

    def backward(self, ct, a, hp):
        return self.oracle_vjp(ct, a, hp, weight_offset=0.0)


# ============================================================================================
# WeightNorm (claims torch: eps added inside the root, eps = 0 by default)
# ============================================================================================


class WNNormAlongDim(Mutant):
    """WN takes the norm *along* ``dim`` (``v.norm(dim=dim)``) instead of over every other axis
    (``norm_except_dim``): one norm per input unit instead of per output unit."""

    op = "weight_norm"
    dialect = WN_TORCH

    def _parts(self, a, hp):
        v, dim = a["v"], hp["dim"]
        wrong = tuple(range(v.ndim)) if dim is None else (int(dim) % v.ndim,)  # the mistake
        s = np.sqrt(np.sum(v * v, axis=wrong, keepdims=True) + hp["eps"])
        return v, wrong, s, (1.0 if a.get("g") is None else a["g"])

    def forward(self, a, hp):
        v, _, s, g = self._parts(a, hp)
        return {"w": g * v / s}, {}

    def backward(self, ct, a, hp):  # the VJP of this (wrong) forward
        v, wrong, s, g = self._parts(a, hp)
        G, v_hat = ct["w"], v / s
        grads = {"v": g * G / s - v_hat * np.sum(g * G * v_hat, axis=wrong, keepdims=True) / s}
        if a.get("g") is not None:
            keep = () if hp["dim"] is None else (int(hp["dim"]) % v.ndim,)
            dg = np.sum(G * v_hat, axis=other_axes(v.ndim, keep), keepdims=True)
            grads["g"] = dg.reshape(a["g"].shape)
        return grads


class WNGradGSignFlipped(Mutant):
    """The hand-written backward returns ``dg = -<G, v/||v||>``: Eq. 3 with its sign flipped."""

    op = "weight_norm"
    dialect = WN_TORCH

    def backward(self, ct, a, hp):
        grads = self.oracle_vjp(ct, a, hp)
        if "g" in grads:
            grads["g"] = -grads["g"]  # the mistake
        return grads


# ============================================================================================
# SpectralNorm (claims torch.nn.utils.parametrizations.spectral_norm)
# ============================================================================================


class _SN(Mutant):
    op = "spectral_norm"
    dialect = TORCH_SN


class SNNoUUpdateInTraining(_SN):
    """The power iteration runs on a copy (``u.clone()``) and the updated u, v are never written
    back to the buffers in training: every step restarts from the initial vectors."""

    def forward(self, a, hp):
        out, state = self.oracle(a, hp)
        if hp["training"]:
            state = {"u": a["u"], "v": a["v"]}  # the mistake
        return out, state


class SNSigmaBeforeUpdate(_SN):
    """sigma = u^T W v is evaluated with the u, v of the previous call, before the power
    iteration updates them (the update is stored, but one step late for the output)."""

    def forward(self, a, hp):
        out, state = self.oracle(a, hp)
        if hp["training"]:
            out, _ = self.oracle(a, hp, n_power_iterations=0)  # the mistake: stale u, v
        return out, state

    def backward(self, ct, a, hp):
        return self.oracle_vjp(ct, a, hp, n_power_iterations=0 if hp["training"] else
                               hp["n_power_iterations"])


class SNSigmaDetached(_SN):
    """sigma is computed under ``no_grad`` / ``stop_gradient`` (not just u and v): the gradient
    is ``dw / sigma`` without Eq. 12's ``- lambda u v^T`` term."""

    def backward(self, ct, a, hp):
        out, _ = self.oracle(a, hp)
        return {"weight": ct["w"] / out["sigma"]}  # the mistake


# ============================================================================================
# Weight Standardization (claims the official README PyTorch layer: unbiased std, std + eps)
# ============================================================================================


class _WS(Mutant):
    op = "weight_standardization"
    dialect = WS_README_TORCH


class WSBiasedStd(_WS):
    """WS uses the biased std (``np.std``, ``tf.keras.backend.std``) where the layer claims the
    README PyTorch snippet's unbiased ``torch.std_mean``."""

    expect = ("CONVENTION", "correction=0")

    def forward(self, a, hp):
        return self.oracle(a, hp, correction=0)

    def backward(self, ct, a, hp):
        return self.oracle_vjp(ct, a, hp, correction=0)


class WSEpsInsideRoot(_WS):
    """WS divides by ``sqrt(var + eps)`` (BCN, timm) where the layer claims the README's
    ``std + eps``."""

    expect = ("CONVENTION", "eps_mode=add_var")

    def forward(self, a, hp):
        return self.oracle(a, hp, eps_mode="add_var")

    def backward(self, ct, a, hp):
        return self.oracle_vjp(ct, a, hp, eps_mode="add_var")


# ============================================================================================
# The catalogue
# ============================================================================================

CATALOGUE: tuple[type[Mutant], ...] = tuple(
    cls for cls in list(globals().values())
    if isinstance(cls, type) and issubclass(cls, Mutant) and cls.__module__ == __name__
    and not cls.__name__.startswith("_") and cls not in (Mutant, Control)
)
