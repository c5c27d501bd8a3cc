"""The pytorch_optimizer adapter: kozistr's ``pytorch_optimizer`` package, checked against the oracle.

Every op maps to the class (or function) a user of the package writes, built like the torch
adapter's optimizer mappings (:class:`conformance.adapters.torch_step.TorchStep`): the
parameters become ``nn.Parameter`` tensors with ``.grad`` set, a fresh optimizer is built over
parameter groups (masks become groups), the request's state is loaded into ``optimizer.state``
under the package's own keys (and the group step counter ``group["step"]`` set), ``step()`` is
called once and parameters and state are read back.  ``foreach=False`` selects the package's
per-parameter loop (``make_adapter(foreach=True)`` its batched path).

=========  ======================================================  ==============================
op         pytorch_optimizer call                                  oracle slot <- package key
=========  ======================================================  ==============================
lars       ``LARS(lr, weight_decay, momentum, dampening,           momentum_buffer <-
           trust_coefficient, nesterov)``                          momentum_buffer
lamb       ``Lamb(lr, betas, weight_decay, weight_decouple,        exp_avg, exp_avg_sq
           fixed_decay, grad_averaging, eps, pre_norm,
           max_grad_norm)``; groups with ``adam=True`` are left
           unadapted, ``adam_debias`` is bias_correction "none"
lion       ``Lion(lr, betas, weight_decay, weight_decouple,        exp_avg
           fixed_decay)``
novograd   ``NovoGrad(lr, betas, weight_decay, weight_decouple,    exp_avg <- moments,
           fixed_decay, grad_averaging, eps)``                     exp_avg_sq <- grads_ema (0-d)
adafactor  ``AdaFactor(lr, betas=(beta1 or None, beta2_cap),       exp_avg_sq_row, exp_avg_sq_col,
           decay_rate=-c, weight_decay, weight_decouple,           exp_avg_sq, exp_avg
           fixed_decay, clip_threshold, scale_parameter,
           relative_step, eps1, eps2, momentum_dtype)``
ranger21   ``Ranger21(num_iterations, lr, beta0, betas, ...)``     grad_ma, neg_grad_ma,
           (every switch the package has, see ``ranger21``)        variance_ma, max_variance_ma,
                                                                   lookahead_params
agc        ``pytorch_optimizer.agc(p, grad, eps, clipping)`` per   (none: plain SGD)
           clipped parameter, then ``torch.optim.SGD``
adamp      ``AdamP(lr, betas, weight_decay, weight_decouple,       exp_avg, exp_avg_sq
           fixed_decay, delta, wd_ratio, nesterov, eps)``
sgdp       ``SGDP(lr, momentum, dampening, weight_decay, ...)``    momentum_buffer <- momentum
lookahead  ``Lookahead(inner, k, alpha, pullback_momentum)`` with  slow <- slow_params; inner_*
           ``torch.optim.SGD`` / ``Adam`` / ``AdamW`` inside        <- the inner optimizer's keys
=========  ======================================================  ==============================

Conventions.  ``ops()`` declares, per op (``MAPPINGS[op].dialect``), the values of the spec's
convention knobs that the package follows (the specs' ``pytorch_optimizer`` dialect tables): the
knobs with an ``allowed`` list, the boolean / string switches the package has no argument for,
and the constants it hard-codes (LARS has no eps: ``eps = 0``; Lamb clamps ``||w||`` at 10 and
uses its eps in the trust ratio; Adafactor factors every tensor with ndim >= 2:
``min_dim_size_to_factor = 0``).
Masks and numeric hyper-parameters the package takes as arguments come from the case; what the
package cannot express raises :class:`Unsupported` (the case is SKIP) with the reason:

* LARS applies its trust ratio and its decay to the tensors with ndim > 1 only (hard-coded): a
  request whose trust/decay masks select otherwise is Unsupported.
* Lamb's pre-clip (``pre_norm``) adds its eps to the global norm (``global_clip_eps`` must equal
  ``eps``), and its trust ratio uses the same eps (``trust_eps == eps``).  Its global norm is
  computed in float32 whatever the dtype (see xfails/pytorch_optimizer.toml).
* AdaFactor's relative step ignores the given lr (its cap is the constant 1e-2): with
  ``relative_step`` the request's lr must be 1e-2.  ``beta2_cap = 1`` (no cap) is passed as the
  largest double below 1 (the package requires ``betas[1] < 1``), which caps no step t with
  t^-c > 2^-53 (t < 2^66 for c = 0.8).  The momentum is kept in the request's dtype
  (``momentum_dtype``; the package's default is bfloat16, which the oracle does not model).
* Ranger21 always uses PNM, AMSGrad, Lookahead, stable decay and the AGC; beta0 must be < 1.

State the package does not keep, declared (``not_kept``: supplied by the harness in every
request, not compared) rather than synthesized:

* ``step``: read back from the package's group counter (``group["step"]``) after the step;
  ``agc`` (plain torch SGD) keeps none, and ``Lookahead`` keeps only its counter modulo k.
* lookahead's ``inner_step``: torch's SGD keeps no step count.
* AdaFactor: the slots an unfactored (factored) parameter does not have come back as the (1,)
  zeros the oracle keeps for them (structural placeholders, not a computed quantity).

Device: CPU by default; ``NORMREF_TORCH_DEVICE=cuda`` (or ``make_adapter(device="cuda")``) runs
on the GPU.  Dtypes: float64 and float32.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytorch_optimizer as po
import torch

from conformance.adapters import OpSupport, Request, Response, Unsupported
from conformance.adapters.mapping import Mapping
from conformance.adapters.torch import device_of
from conformance.adapters.torch_step import TorchStep

__all__ = ["MAPPINGS", "PytorchOptimizerAdapter", "make_adapter"]

#: The dtypes the package's optimizers are run in (what :class:`TorchStep` runs).
DTYPES = TorchStep.DTYPES


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


class _Step(TorchStep):
    """:class:`TorchStep` with the package's group-level step counter and option groups."""

    def __init__(self, request: Request, device: torch.device, foreach: bool) -> None:
        super().__init__(request, device)
        self.foreach = foreach

    def option_groups(self, options: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        """Parameter groups of the paths with equal ``options[path]`` (in path order)."""
        groups: list[dict[str, Any]] = []
        for path in self.paths:
            for group in groups:
                if all(group.get(k) == v for k, v in options[path].items()):
                    group["params"].append(self.tensors[path])
                    break
            else:
                groups.append({"params": [self.tensors[path]], **options[path]})
        return groups

    def decay_groups(self, wd: float, **common: Any) -> list[dict[str, Any]]:
        """Groups from ``weight_decay_mask``: the undecayed parameters get ``weight_decay=0``."""
        where = self.mask("weight_decay_mask")
        return self.option_groups({p: {"weight_decay": wd if where[p] else 0.0, **common}
                                   for p in self.paths})

    def set_group_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The package counts steps per group (``group["step"]``, incremented before use)."""
        for group in optimizer.param_groups:
            group["step"] = self.step_count


def _slots(optimizer: torch.optim.Optimizer, c: _Step, slots: dict[str, str]) -> Response:
    """Set the group step, step and read back (``TorchStep.finish``)."""
    c.set_group_step(optimizer)
    return c.finish(optimizer, slots, c.request.op)


def _decay_flags(c: _Step, *modes: str) -> tuple[float, dict[str, bool]]:
    """``weight_decay`` and the package's ``weight_decouple`` / ``fixed_decay`` for the mode."""
    mode = c.expect("weight_decay_mode", *modes)
    flags = {"l2": {"weight_decouple": False, "fixed_decay": False},
             "moment": {"weight_decouple": False, "fixed_decay": False},
             "update": {"weight_decouple": False, "fixed_decay": False},
             "decoupled_lr": {"weight_decouple": True, "fixed_decay": False},
             "decoupled_nolr": {"weight_decouple": True, "fixed_decay": True}}[mode]
    return c.take("weight_decay"), flags


# --------------------------------------------------------------------------------------------
# The mappings
# --------------------------------------------------------------------------------------------


def lars(c: _Step) -> Response:
    """``LARS``: ratio ``tc ||w|| / (||g|| + wd ||w||)`` (1 if a norm is 0) on ndim > 1 only."""
    c.expect("trust_denominator", "sum_of_norms")
    c.expect("zero_norm_rule", "denominator")
    c.expect("lr_placement", "outside")
    c.expect("first_step", "zeros")
    c.expect("trust_clip", False)
    c.expect("eps", 0.0)
    wd = c.take("weight_decay")
    decay_mask, trust_mask = c.mask("weight_decay_mask"), c.mask("trust_mask")
    always = c.take("always_adapt")
    options = {}
    for p in c.paths:
        matrix = c.tensors[p].ndim > 1
        decayed = decay_mask[p] and wd != 0.0
        adapted = trust_mask[p] and (always or decayed)
        if adapted != matrix or (decayed and not matrix):
            raise Unsupported("pytorch_optimizer.LARS adapts and decays exactly the tensors with "
                              f"ndim > 1; the request treats {p!r} (ndim {c.tensors[p].ndim}) "
                              f"otherwise (adapted={adapted}, decayed={decayed})")
        options[p] = {"weight_decay": wd if decayed else 0.0}
    momentum = c.take("momentum")
    opt = po.LARS(c.option_groups(options), lr=c.take("lr"), momentum=momentum,
                  dampening=c.take("dampening"), trust_coefficient=c.take("trust_coefficient"),
                  nesterov=c.take("nesterov"), foreach=c.foreach)
    slots = {"momentum_buffer": "momentum_buffer"} if momentum > 0.0 else {}
    c.load(opt, slots, step=None)
    return _slots(opt, c, slots)


def lamb(c: _Step) -> Response:
    """``Lamb``; trust mask / decayed-only scope as groups with ``adam=True`` (ratio 1)."""
    bias = c.expect("bias_correction", "m_step", "none")
    wd, flags = _decay_flags(c, "decoupled_lr", "decoupled_nolr", "update")
    c.expect("trust_clip", False)
    c.expect("phi_min", 0.0)
    c.expect("phi_max", float(po.Lamb.clamp))
    c.expect("eps_root", 0.0)
    eps = c.take("eps")
    if c.take("trust_eps") != eps:
        raise Unsupported("pytorch_optimizer.Lamb adds its eps to the update norm: trust_eps "
                          "must equal eps")
    clip, clip_eps = c.take("global_clip"), c.take("global_clip_eps")
    pre_norm = clip is not None and clip != 0.0
    if pre_norm and clip_eps != eps:
        raise Unsupported("pytorch_optimizer.Lamb's pre_norm adds its eps to the global norm: "
                          "global_clip_eps must equal eps")
    decay_mask, trust_mask = c.mask("weight_decay_mask"), c.mask("trust_mask")
    scope = c.take("trust_scope")
    options = {}
    for p in c.paths:
        decayed = decay_mask[p] and wd != 0.0
        adapted = trust_mask[p] and (scope == "all" or decayed)
        options[p] = {"weight_decay": wd if decayed else 0.0, "adam": not adapted,
                      "adam_debias": bias == "none"}
    opt = po.Lamb(c.option_groups(options), lr=c.take("lr"), betas=(c.take("beta1"), c.take("beta2")),
                  grad_averaging=c.take("grad_averaging"), eps=eps, pre_norm=pre_norm,
                  max_grad_norm=clip if pre_norm else 1.0, foreach=c.foreach, **flags)
    slots = {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}
    c.load(opt, slots, step=None)
    return _slots(opt, c, slots)


def lion(c: _Step) -> Response:
    wd, flags = _decay_flags(c, "decoupled_lr", "decoupled_nolr", "l2")
    opt = po.Lion(c.decay_groups(wd), lr=c.take("lr"), betas=(c.take("beta1"), c.take("beta2")),
                  foreach=c.foreach, **flags)
    slots = {"exp_avg": "exp_avg"}
    c.load(opt, slots, step=None)
    return _slots(opt, c, slots)


def novograd(c: _Step) -> Response:
    c.expect("eps_mode", "outside")
    c.expect("first_moment_init", "first_step")
    wd, flags = _decay_flags(c, "moment", "decoupled_lr", "decoupled_nolr")
    opt = po.NovoGrad(c.decay_groups(wd), lr=c.take("lr"), betas=(c.take("beta1"), c.take("beta2")),
                      grad_averaging=c.take("grad_averaging"), eps=c.take("eps"),
                      foreach=c.foreach, **flags)
    slots = {"exp_avg": "moments", "exp_avg_sq": "grads_ema"}
    c.load(opt, slots, step=None)
    return _slots(opt, c, slots)


_ADAFACTOR_SLOTS = ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq")


def adafactor(c: _Step) -> Response:
    """``AdaFactor``: every tensor with ndim >= 2 factored over its last two dims."""
    c.expect("factored_dims", "last_two")
    c.expect("min_dim_size_to_factor", 0)
    c.expect("decay_offset", 0)
    factored = c.take("factored")
    if not factored and any(t.ndim >= 2 for t in c.tensors.values()):
        raise Unsupported("pytorch_optimizer.AdaFactor factors every tensor with ndim >= 2")
    wd, flags = _decay_flags(c, "decoupled_lr", "decoupled_nolr", "l2")
    lr, relative = c.take("lr"), c.take("relative_step")
    if relative and lr != 1e-2:
        raise Unsupported("pytorch_optimizer.AdaFactor's relative step ignores lr (its cap is "
                          f"1e-2); got lr={lr}")
    beta1, cap = c.take("beta1"), c.take("beta2_cap")
    if cap == 1.0:   # no cap: the package requires betas[1] < 1; the largest double below 1
        cap = math.nextafter(1.0, 0.0)   # caps nothing before step 2^66
    clipping = c.take("clipping_threshold")
    opt = po.AdaFactor(
        c.decay_groups(wd), lr=lr, betas=(beta1 if beta1 != 0.0 else None, cap),
        decay_rate=-c.take("decay_rate"), clip_threshold=math.inf if clipping is None else clipping,
        scale_parameter=c.take("multiply_by_parameter_scale"), relative_step=relative,
        eps1=c.take("eps1"), eps2=c.take("eps2"), momentum_dtype=c.dtype, foreach=c.foreach,
        **flags)
    slots = {s: s for s in _ADAFACTOR_SLOTS}
    if beta1 != 0.0:
        slots["exp_avg"] = "exp_avg"
    c.load(opt, slots, step=None)
    if c.step_count > 0:
        for t in c.tensors.values():   # the slots the package does not keep for this tensor
            state = opt.state[t]
            unused = ("exp_avg_sq",) if t.ndim >= 2 else ("exp_avg_sq_row", "exp_avg_sq_col")
            for key in unused:
                state.pop(key, None)
            state["RMS"] = 0.0
    response = _slots(opt, c, slots)
    unused = np.zeros((1,), dtype=np.dtype(c.request.dtype))
    for p in c.paths:
        for slot in _ADAFACTOR_SLOTS:
            response.state.setdefault(f"{slot}/{p}", unused.copy())
    return response


def ranger21(c: _Step) -> Response:
    """``Ranger21`` with its learning-rate schedule, AGC, GC, GN, PNM, softplus, norm loss and
    Lookahead; the request's count sets the group step and the Lookahead counter."""
    c.expect("bug_compatible", False)
    c.expect("preprocess_twice", True)
    c.expect("variance_sum_init", 1.0)
    c.expect("unit_layout", "out_first_3d_dim1")
    c.expect("softplus_form", "torch")
    c.expect("agc_compare_guarded", True)
    for switch in ("pnm", "amsgrad", "lookahead", "agc"):
        c.expect(switch, True)   # always on in pytorch_optimizer.Ranger21
    c.expect("gc_conv_only", False)
    wd = c.take("weight_decay")
    stable = c.take("stable_decay")
    if wd != 0.0 and not stable:
        raise Unsupported("pytorch_optimizer.Ranger21 always divides the decay by "
                          "sqrt(mean v_hat) (stable_decay)")
    beta0 = c.take("pnm_momentum_factor")
    if not 0.0 <= beta0 < 1.0:
        raise Unsupported(f"pytorch_optimizer.Ranger21 requires beta0 in [0, 1); got {beta0}")
    n_iter, beta2 = c.take("num_iterations"), c.take("beta2")
    warmup, warmdown = c.take("warmup"), c.take("warmdown")
    warmup_iterations, warmup_pct = c.take("warmup_iterations"), c.take("warmup_pct_default")
    warmdown_pct = c.take("warmdown_start_pct")
    t = c.step_count + 1
    if warmup and warmup_iterations is None and warmup_pct != 0.22:
        raise Unsupported("pytorch_optimizer.Ranger21's default warm-up falls back to 22% of the "
                          f"run; warmup_pct_default={warmup_pct}")
    if warmup and not warmdown and t >= n_iter:
        raise Unsupported("pytorch_optimizer.Ranger21 always warms down after num_iterations")
    if warmdown_pct == 0.72:
        warm_down = None
    else:
        warm_down = n_iter - int(warmdown_pct * n_iter)
    norm_loss = c.take("norm_loss")
    norm_loss_factor = c.take("norm_loss_factor")
    opt = po.Ranger21(
        c.decay_groups(wd), num_iterations=n_iter, lr=c.take("lr"), beta0=beta0,
        betas=(c.take("beta1"), beta2), use_softplus=c.take("softplus"),
        beta_softplus=c.take("beta_softplus"), disable_lr_scheduler=not (warmup or warmdown),
        num_warm_up_iterations=warmup_iterations if warmup else 0,
        num_warm_down_iterations=warm_down if warmdown else 0,
        warm_down_min_lr=c.take("warmdown_min_lr"), agc_clipping_value=c.take("agc_clipping_value"),
        agc_eps=c.take("agc_eps"), centralize_gradients=c.take("gradient_centralization"),
        normalize_gradients=c.take("gradient_normalization"),
        lookahead_merge_time=c.take("lookahead_k"),
        lookahead_blending_alpha=c.take("lookahead_alpha"), weight_decouple=True,
        fixed_decay=False, norm_loss_factor=norm_loss_factor if norm_loss else 0.0,
        eps=c.take("eps"), foreach=c.foreach)
    opt.lookahead_step = c.step_count % opt.lookahead_merge_time
    slots = {s: s for s in ("grad_ma", "neg_grad_ma", "variance_ma", "max_variance_ma",
                            "lookahead_params")}
    c.load(opt, slots, step=None)
    return _slots(opt, c, slots)


def agc(c: _Step) -> Response:
    """``pytorch_optimizer.agc`` on each clipped parameter's gradient, then ``SGD``."""
    c.expect("layout", "out_first_3d_dim1")
    c.expect("compare_guarded", True)
    clipping, eps = c.take("clipping"), c.take("eps")
    clip = c.mask("clip_mask")
    opt = torch.optim.SGD(c.decay_groups(c.take("weight_decay")), lr=c.take("lr"), foreach=False)
    c.check_all_read("agc")
    for p, t in c.tensors.items():
        if clip[p]:
            t.grad.copy_(po.agc(t.detach(), t.grad, eps, clipping))
    return c.finish(opt, {}, "agc")


def adamp(c: _Step) -> Response:
    c.expect("adam_eps_mode", "eps_hat")
    wd, flags = _decay_flags(c, "decoupled_lr", "decoupled_nolr")
    opt = po.AdamP(c.decay_groups(wd), lr=c.take("lr"), betas=(c.take("beta1"), c.take("beta2")),
                   delta=c.take("delta"), wd_ratio=c.take("wd_ratio"), nesterov=c.take("nesterov"),
                   eps=c.take("eps"), foreach=c.foreach, **flags)
    slots = {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}
    c.load(opt, slots, step=None)
    return _slots(opt, c, slots)


def sgdp(c: _Step) -> Response:
    nesterov = c.take("nesterov")
    if nesterov:
        c.take("buffer_projection")   # with Nesterov the buffer is never projected
    else:
        c.expect("buffer_projection", "raw")
    wd, flags = _decay_flags(c, "decoupled_lr", "decoupled_nolr")
    opt = po.SGDP(c.decay_groups(wd), lr=c.take("lr"), momentum=c.take("momentum"),
                  dampening=c.take("dampening"), delta=c.take("delta"), wd_ratio=c.take("wd_ratio"),
                  nesterov=nesterov, eps=c.take("eps"), foreach=c.foreach, **flags)
    slots = {"momentum_buffer": "momentum"}
    c.load(opt, slots, step=None)
    return _slots(opt, c, slots)


def lookahead(c: _Step) -> Response:
    """``Lookahead(inner, k, alpha)`` over torch's SGD (L2) or Adam / AdamW."""
    c.expect("slow_init", "params")
    inner, lr, wd = c.take("inner"), c.take("lr"), c.take("weight_decay")
    mode = c.take("weight_decay_mode")
    momentum, b1, b2, eps = c.take("momentum"), c.take("beta1"), c.take("beta2"), c.take("eps")
    k, alpha, reset = c.take("k"), c.take("alpha"), c.take("reset_state")
    params = list(c.tensors.values())
    if inner == "sgd":
        if mode != "l2":
            raise Unsupported(f"torch.optim.SGD has L2 decay only, not {mode}")
        base: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum,
                                                      weight_decay=wd, foreach=False)
        slots = {"inner_momentum_buffer": "momentum_buffer"} if momentum else {}
    elif inner == "adam":
        if reset:
            raise Unsupported("pytorch_optimizer.Lookahead resets only a momentum_buffer "
                              "(pullback_momentum='reset'), not Adam's moments")
        if mode not in ("l2", "decoupled_lr"):
            raise Unsupported(f"torch.optim.Adam/AdamW cannot express weight_decay_mode={mode}")
        cls = torch.optim.AdamW if mode == "decoupled_lr" else torch.optim.Adam
        base = cls(params, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, foreach=False)
        slots = {"inner_exp_avg": "exp_avg", "inner_exp_avg_sq": "exp_avg_sq"}
    else:
        raise Unsupported(f"no torch inner optimizer for inner={inner!r}")
    opt = po.Lookahead(base, k=k, alpha=alpha, pullback_momentum="reset" if reset else "none")
    c.check_all_read("lookahead")
    t = c.step_count
    inner_t = int(round(float(np.asarray(c.state.get("inner_step", 0.0)))))
    if t > 0 or inner_t > 0:
        for path, p in c.tensors.items():
            entry: dict[str, Any] = {}
            if inner == "adam":
                entry["step"] = torch.tensor(float(inner_t), dtype=torch.float32)
            for slot, key in slots.items():
                value = c.slot(slot)
                if value is not None:
                    entry[key] = c.tensor(value[path])
            if entry and (inner == "sgd" or inner_t > 0):
                base.state[p] = entry
    slow = c.slot("slow")
    if slow is not None:
        for path, p in c.tensors.items():
            opt.state[p]["slow_params"] = c.tensor(slow[path])
    for group in opt.param_groups:
        group["counter"] = t % k
    opt.step()
    outputs = {f"params/{p}": _numpy(v) for p, v in c.tensors.items()}
    state: dict[str, np.ndarray] = {}  # step and inner_step: not kept
    for path, p in c.tensors.items():
        state[f"slow/{path}"] = _numpy(opt.state[p]["slow_params"])
        for slot, key in slots.items():
            value = base.state.get(p, {}).get(key)
            if value is not None:
                state[f"{slot}/{path}"] = _numpy(value)
    return Response(outputs=outputs, state=state)


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu").numpy().copy()


#: Each op's mapping with the conventions the package follows, its call and the state it does not
#: keep (module docstring).
MAPPINGS: dict[str, Mapping] = {
    "lars": Mapping(
        lars, api="pytorch_optimizer.LARS", dtypes=DTYPES,
        dialect={"trust_denominator": "sum_of_norms", "zero_norm_rule": "denominator",
                 "lr_placement": "outside", "first_step": "zeros", "trust_clip": False,
                 "always_adapt": True, "eps": 0.0}),
    "lamb": Mapping(
        lamb, api="pytorch_optimizer.Lamb", dtypes=DTYPES,
        dialect={"bias_correction": "m_step", "weight_decay_mode": "decoupled_lr",
                 "trust_scope": "all", "trust_clip": False, "trust_eps": 1e-6, "phi_min": 0.0,
                 "phi_max": 10.0}),
    "lion": Mapping(lion, api="pytorch_optimizer.Lion", dtypes=DTYPES,
                    dialect={"weight_decay_mode": "decoupled_lr"}),
    "novograd": Mapping(
        novograd, api="pytorch_optimizer.NovoGrad", dtypes=DTYPES,
        dialect={"eps_mode": "outside", "first_moment_init": "first_step",
                 "weight_decay_mode": "moment"}),
    "adafactor": Mapping(
        adafactor, api="pytorch_optimizer.AdaFactor", dtypes=DTYPES,
        dialect={"factored_dims": "last_two", "min_dim_size_to_factor": 0,
                 "weight_decay_mode": "decoupled_lr"}),
    "ranger21": Mapping(
        ranger21, api="pytorch_optimizer.Ranger21", dtypes=DTYPES,
        dialect={"bug_compatible": False, "preprocess_twice": True, "variance_sum_init": 1.0,
                 "unit_layout": "out_first_3d_dim1", "softplus_form": "torch",
                 "agc_compare_guarded": True}),
    "agc": Mapping(agc, api="pytorch_optimizer.agc (per parameter) then torch.optim.SGD",
                   dtypes=DTYPES, dialect={"layout": "out_first_3d_dim1", "compare_guarded": True},
                   not_kept=("step",)),
    "adamp": Mapping(adamp, api="pytorch_optimizer.AdamP", dtypes=DTYPES,
                     dialect={"adam_eps_mode": "eps_hat"}),
    "sgdp": Mapping(sgdp, api="pytorch_optimizer.SGDP", dtypes=DTYPES,
                    dialect={"buffer_projection": "raw"}),
    "lookahead": Mapping(
        lookahead, api="pytorch_optimizer.Lookahead(torch.optim.SGD / Adam / AdamW)",
        dtypes=DTYPES, dialect={"slow_init": "params"}, not_kept=("step", "inner_step")),
}


# --------------------------------------------------------------------------------------------
# The adapter
# --------------------------------------------------------------------------------------------


def _available(op: str) -> bool:
    """Whether the oracle has the op (adamp, sgdp and lookahead arrived later)."""
    import reference

    try:
        reference.get(op)
    except (KeyError, ValueError):
        return False
    return True


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pytorch_optimizer")
    except PackageNotFoundError:  # pragma: no cover - an unpackaged checkout
        return "unknown"


class PytorchOptimizerAdapter:
    name = "pytorch_optimizer"

    def __init__(self, device: str | None = None, foreach: bool = False) -> None:
        self.device = device_of(device)
        self.foreach = foreach

    def info(self) -> dict[str, str]:
        info = {"framework": "pytorch_optimizer", "version": _version(),
                "torch": torch.__version__, "device": str(self.device),
                "foreach": str(self.foreach)}
        if self.device.type == "cuda":
            info["device_name"] = torch.cuda.get_device_name(self.device)
        return info

    def ops(self) -> dict[str, OpSupport]:
        return {op: mapping.support() for op, mapping in MAPPINGS.items() if _available(op)}

    def evaluate(self, op: str, request: Request) -> Response:
        if op not in MAPPINGS:
            raise Unsupported(f"the pytorch_optimizer adapter does not implement {op}")
        if request.dtype not in MAPPINGS[op].dtypes:
            raise Unsupported(f"dtype {request.dtype}")
        return MAPPINGS[op].fn(_Step(request, self.device, self.foreach))


def make_adapter(device: str | None = None, foreach: bool = False) -> PytorchOptimizerAdapter:
    return PytorchOptimizerAdapter(device, foreach)
