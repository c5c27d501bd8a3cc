"""The PyTorch adapter: torch's own normalization code paths, checked against the oracle.

Every op maps to the torch call a user would write, one small function each:

=======================  ====================================================================
op                       torch code path
=======================  ====================================================================
batch_norm               ``nn.BatchNorm{1,2,3}d`` (its Python forward owns num_batches_tracked
                         and momentum=None); untracked: the same module without buffers
layer_norm               ``F.layer_norm`` (non-trailing axes are permuted to the end first)
group_norm               ``F.group_norm``
instance_norm            ``F.instance_norm`` (what ``nn.InstanceNorm*d`` calls)
rms_norm                 ``F.rms_norm`` (Gemma's ``1 + w`` as the weight, formed in float32)
weight_norm              ``torch._weight_norm`` (what ``parametrizations.weight_norm`` calls)
spectral_norm            ``parametrizations.spectral_norm`` on a holder module, _u/_v set from
                         the state
weight_standardization   timm ``StdConv2d``: ``F.batch_norm(w.reshape(1, out, -1), None, None,
                         training=True, momentum=0., eps)``
conv_bn                  ``nn.Conv2d`` then ``nn.BatchNorm2d`` (Train, Eval); Tune: torch
                         Inductor's ``efficient_conv_bn_eval(bn, conv, x)`` (the fold on the fly,
                         differentiated by autograd) while the BN is in eval mode; Deploy: an
                         ``nn.Conv2d`` holding the folded W', b' (what ``fuse_conv_bn_eval``
                         returns)
split_batch_norm         timm ``SplitBatchNorm2d`` where timm is loadable (``_timm.py``) and the
                         cut is timm's, else ``nn.BatchNorm{1,2,3}d`` per contiguous part (row i
                         of weight, bias and running statistics) and ``torch.cat``; eval: the main
                         BN (row 0) alone
rep_bn                   SLAB's RepBN: ``nn.BatchNorm1d(C)`` on the (B, C, N) transpose +
                         ``alpha * x``; progressive: blended with ``nn.LayerNorm(C)`` as SLAB's
                         LinearNorm, its counters carried as state, lambda in float64
msg_norm                 PyG ``MessageNorm.forward``: ``F.normalize(msg, p=2, dim, eps) *
                         x.norm(p=2, dim, keepdim=True) * scale``
evo_norm                 timm ``EvoNorm2d{B0,B1,B2,S0,S0a,S1,S1a,S2,S2a}`` (``_timm.py`` loads
                         ``timm/layers/evo_norm.py`` without ``import timm``; SKIP without timm)
=======================  ====================================================================

Conventions.  ``ops()`` declares, per op (``MAPPINGS[op].dialect``), the values of the spec's
convention knobs that torch follows (from each spec's ``torch`` dialect table; the ``timm`` one
for weight standardization, for which torch has no core op, the ``pyg`` one for MsgNorm, and the
conventions all ``timm_*`` tables share for EvoNorm, whose variant and ``keep_denominator`` pick
the timm class).
Layout and mode hyper-parameters (``axis``, ``axes``, ``dim``, ``training``,
``track_running_stats``, ``progressive``) and numeric values (``eps``, ``momentum``,
``num_groups``, ``n_power_iterations``, ``weight_offset``, ``total_steps``) come from the case and
are implemented here (a channel axis is moved with ``movedim``, normalized axes are permuted to the
end); what torch cannot express raises :class:`Unsupported` (the case is SKIP) with the reason.
Every hyper-parameter of a request must be read by the op's mapping: one that is not (a knob
added to a spec later) is refused rather than ignored.

Gradients are torch's autograd VJP of the outputs with the given cotangents
(``torch.autograd.grad(outputs, inputs, grad_outputs=cotangents)``, i.e. the gradient of
``sum(cotangent * output)``) w.r.t. every differentiable input given.

Deviations from the oracle's bookkeeping, documented rather than hidden:

* ``instance_norm`` ``num_batches_tracked``: torch's InstanceNorm never increments its buffer
  (and ``F.instance_norm`` has none), so it is declared not kept (``not_kept``): the harness
  supplies the count and does not compare it.  Because torch cannot give the cumulative average
  that needs the count, ``momentum=None`` with tracked training is Unsupported
  (``nn.InstanceNorm*d(momentum=None)`` passes momentum 0.0: frozen statistics).
* ``spectral_norm`` ``sigma``: torch's parametrization returns only ``weight / sigma``; the
  adapter recomputes ``sigma = vdot(_u, mv(W_mat, _v))`` with torch's own expression from the
  buffers the forward used (the clones it divides by), so its gradient is torch's as well.
* ``weight_norm`` without ``g``: torch always has a magnitude; the adapter passes ``g = 1``.

Optimizers, clipping and schedules: the mapping files ``_torch_*.py`` next to this module
(``_torch_optim.py``: SGD, Adam, AdamW; ``_torch_adaptive.py``: Adagrad, RMSprop;
``_torch_clipping.py``: ``clip_grad_norm_``; ``_torch_schedules.py``: the ``lr_scheduler``s), each
with its own docstring and ``MAPPINGS``, are merged into ``ops()`` and dispatched by ``evaluate``.

Device: CPU by default; ``NORMREF_TORCH_DEVICE=cuda`` (or ``make_adapter(device="cuda")``) runs
on the GPU when ``torch.cuda.is_available()``.  Dtypes: float64, float32, float16 and bfloat16
(bfloat16 arrives as ``ml_dtypes.bfloat16`` NumPy arrays and returns as float32 arrays holding
the bfloat16 values).
"""

from __future__ import annotations

import os
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn

from conformance.adapters import OpSupport, Request, Response, Unsupported
from conformance.adapters.mapping import Mapping

__all__ = ["MAPPINGS", "TorchAdapter", "make_adapter"]

from conformance.adapters.torch_call import (
    _TORCH_DTYPES,
    DTYPES,
    _axis,
    _Call,
    _permuted,
    _single_value_guard,
    _trailing,
)

# --------------------------------------------------------------------------------------------
# The normalizers
# --------------------------------------------------------------------------------------------


def _batch_norm_module(ndim: int) -> type[nn.Module]:
    return {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(
        ndim, nn.BatchNorm1d)


def batch_norm(c: _Call) -> Response:
    """``nn.BatchNorm*d``: the module's forward counts batches and handles momentum=None."""
    for knob, value in MAPPINGS["batch_norm"].dialect.items():
        c.expect(knob, value)
    training, track = c.take("training"), c.take("track_running_stats")
    axis, eps, momentum = c.take("axis"), c.take("eps"), c.take("momentum")
    x, weight, bias = c.input("x"), c.input("weight", parameter=True), c.input("bias", parameter=True)
    axis = _axis(axis, x.ndim)
    xc = torch.movedim(x, axis, 1)
    channels = int(xc.shape[1])
    module = _batch_norm_module(xc.ndim)(channels, eps=eps, momentum=momentum, affine=False,
                                         track_running_stats=track, device=c.device, dtype=c.dtype)
    module.weight, module.bias = weight, bias   # Parameters (or None): partial affine allowed
    if track:
        for name in ("running_mean", "running_var"):
            value = c.state(name)
            if value is not None:
                setattr(module, name, value)
        module.num_batches_tracked = torch.tensor(c.count(), dtype=torch.long, device=c.device)
    module.train(training)
    flat = xc if xc.ndim <= 5 else xc.reshape(xc.shape[0], channels, -1)  # BatchNorm1d on (N, C, L)
    y = _single_value_guard(lambda: module(flat)).reshape(xc.shape)
    state = {}
    if track:
        state = {"running_mean": module.running_mean, "running_var": module.running_var,
                 "num_batches_tracked": float(module.num_batches_tracked.item())}
    c.check_all_read("batch_norm")
    return c.finish({"y": torch.movedim(y, 1, axis)}, state)


def ghost_batch_norm(c: _Call) -> Response:
    """Ghost BN as Hoffer's bigBatch, Composer and pytorch-tabnet build it: one ``nn.BatchNorm*d``
    applied to each contiguous chunk of the batch (``x.chunk(k)``, or ``x.split(vbs)``), so the
    running statistics are updated once per chunk (Composer divides the momentum by k)."""
    for knob, value in MAPPINGS["ghost_batch_norm"].dialect.items():
        c.expect(knob, value)
    vbs, split, small = c.take("virtual_batch_size"), c.take("split"), c.take("small_batch")
    update, divided = c.take("running_update"), c.take("chunk_momentum") == "divided"
    training, track = c.take("training"), c.take("track_running_stats")
    axis, eps, momentum = c.take("axis"), c.take("eps"), c.take("momentum")
    if update != "sequential" or split == "strided":
        raise Unsupported("BatchNorm per chunk: contiguous chunks, one running-statistics update per chunk "
                          f"(not split={split!r} with running_update={update!r}, tf.keras's construction)")
    x, weight, bias = c.input("x"), c.input("weight", parameter=True), c.input("bias", parameter=True)
    xc = torch.movedim(x, _axis(axis, x.ndim), 1)
    n, channels = int(xc.shape[0]), int(xc.shape[1])
    if n < vbs and small == "raise":
        raise Unsupported(f"{n} samples, fewer than virtual_batch_size={vbs} (Composer refuses)")
    if split == "fixed":
        chunks = list(xc.split(vbs))
        requested = len(chunks)
    else:
        requested = n // vbs if split == "chunk_floor" else -(-n // vbs)
        if requested == 0:
            raise Unsupported(f"x.chunk({n} // {vbs}) = x.chunk(0)")
        chunks = list(xc.chunk(requested))
    m = momentum / requested if divided and momentum is not None else momentum
    module = _batch_norm_module(xc.ndim)(channels, eps=eps, momentum=m, affine=False,
                                         track_running_stats=track, device=c.device, dtype=c.dtype)
    module.weight, module.bias = weight, bias
    if track:
        for name in ("running_mean", "running_var"):
            value = c.state(name)
            if value is not None:
                setattr(module, name, value)
        module.num_batches_tracked = torch.tensor(c.count(), dtype=torch.long, device=c.device)
    module.train(training)

    def run(t: torch.Tensor) -> torch.Tensor:
        flat = t if t.ndim <= 5 else t.reshape(t.shape[0], channels, -1)
        return _single_value_guard(lambda: module(flat)).reshape(t.shape)

    y = torch.cat([run(t) for t in chunks]) if training or not track else run(xc)
    state = {}
    if track:
        state = {"running_mean": module.running_mean, "running_var": module.running_var,
                 "num_batches_tracked": float(module.num_batches_tracked.item())}
    c.check_all_read("ghost_batch_norm")
    return c.finish({"y": torch.movedim(y, 1, _axis(axis, x.ndim))}, state)


def layer_norm(c: _Call) -> Response:
    """``F.layer_norm`` over the trailing axes (other normalized axes are permuted there)."""
    axes, eps = c.take("axes"), c.take("eps")
    x, weight, bias = c.input("x"), c.input("weight"), c.input("bias")
    shape, perm = _trailing(x, axes)
    y = _permuted(lambda t: F.layer_norm(t, shape, weight, bias, eps), x, perm)
    c.check_all_read("layer_norm")
    return c.finish({"y": y})


def group_norm(c: _Call) -> Response:
    """``F.group_norm`` with the channel axis moved to 1 (torch's (N, C, *) layout)."""
    c.expect("affine", "per_channel")   # torch's weight/bias are (C,); ONNX-18's (G,) is not
    num_groups, axis, eps = c.take("num_groups"), c.take("axis"), c.take("eps")
    x, weight, bias = c.input("x"), c.input("weight"), c.input("bias")
    axis = _axis(axis, x.ndim)
    if axis == 0:
        raise Unsupported("axis 0 is the batch axis")
    xc = torch.movedim(x, axis, 1)
    y = _single_value_guard(lambda: F.group_norm(xc, num_groups, weight, bias, eps))
    c.check_all_read("group_norm")
    return c.finish({"y": torch.movedim(y, 1, axis)})


def instance_norm(c: _Call) -> Response:
    """``F.instance_norm`` exactly as ``nn.InstanceNorm*d.forward`` calls it."""
    for knob, value in MAPPINGS["instance_norm"].dialect.items():
        c.expect(knob, value)
    training, track = c.take("training"), c.take("track_running_stats")
    axis, eps, momentum = c.take("axis"), c.take("eps"), c.take("momentum")
    x, weight, bias = c.input("x"), c.input("weight"), c.input("bias")
    axis = _axis(axis, x.ndim)
    if axis == 0:
        raise Unsupported("axis 0 is the batch axis")
    updates = training and track
    if momentum is None and updates:
        raise Unsupported("torch's InstanceNorm has no cumulative average: "
                          "nn.InstanceNorm*d(momentum=None) passes momentum 0.0 (frozen stats)")
    running_mean = c.state("running_mean") if track else None
    running_var = c.state("running_var") if track else None
    if track and (running_mean is None or running_var is None):
        raise Unsupported("track_running_stats=True needs running_mean and running_var")
    xc = torch.movedim(x, axis, 1)
    use_input_stats = training or not track
    y = _single_value_guard(lambda: F.instance_norm(
        xc, running_mean, running_var, weight, bias, use_input_stats,
        momentum if momentum is not None else 0.0, eps))
    state = {}
    if track:
        # torch updates the running stats in place and keeps no batch count (not_kept).
        state = {"running_mean": running_mean, "running_var": running_var}
    c.check_all_read("instance_norm")
    return c.finish({"y": torch.movedim(y, 1, axis)}, state)


def rms_norm(c: _Call) -> Response:
    """``F.rms_norm`` (eps inside the root); a weight offset is added to the weight passed."""
    c.expect("eps_placement", "inside")
    axes, eps, offset, p = c.take("axes"), c.take("eps"), c.take("weight_offset"), c.take("p")
    if p >= 0:
        raise Unsupported(f"torch has no partial RMSNorm (p={p})")
    if c.request.inputs.get("bias") is not None:
        raise Unsupported("torch's RMSNorm has no bias (the official code's offset)")
    x, weight = c.input("x"), c.input("weight")
    shape, perm = _trailing(x, axes)
    if weight is None or offset == 0:
        y = _permuted(lambda t: F.rms_norm(t, shape, weight, eps), x, perm)
    else:
        # Gemma: ``_norm(x.float()) * (1.0 + weight.float())``, cast back: the gain is formed
        # in float32 (exact for half weights), not rounded to the half type.
        opmath = torch.float32 if x.element_size() < 4 else x.dtype
        y = _permuted(lambda t: F.rms_norm(t.to(opmath), shape, weight.to(opmath) + offset, eps),
                      x, perm).to(x.dtype)
    c.check_all_read("rms_norm")
    return c.finish({"y": y})


def l2_normalize(c: _Call) -> Response:
    """``F.normalize(x, p=2, dim=axes, eps)``: ``x / max(||x||, eps)`` (eps clamps the norm)."""
    c.expect("eps_clamps", "norm")
    axes, eps = c.take("axes"), c.take("eps")
    x = c.input("x")
    dims = tuple(_axis(a, x.ndim) for a in axes)
    y = F.normalize(x, p=2.0, dim=dims if len(dims) > 1 else dims[0], eps=eps)
    c.check_all_read("l2_normalize")
    return c.finish({"y": y})


def weight_norm(c: _Call) -> Response:
    """``torch._weight_norm(v, g, dim)``; the oracle's dim=None is torch's -1 (whole tensor)."""
    c.expect("eps", 0.0)
    c.expect("eps_mode", "add")
    dim = c.take("dim")
    v, g = c.input("v"), c.input("g")
    torch_dim = -1 if dim is None else _axis(dim, v.ndim)
    if g is None:   # no magnitude parameter: torch's weight norm with g = 1
        shape = [1] * v.ndim
        if dim is not None:
            shape[torch_dim] = int(v.shape[torch_dim])
        g = torch.ones(shape, dtype=c.dtype, device=c.device)
    w = torch._weight_norm(v, g, torch_dim)
    c.check_all_read("weight_norm")
    return c.finish({"w": w})


def spectral_norm(c: _Call) -> Response:
    """``parametrizations.spectral_norm`` on a holder module with _u, _v from the state."""
    for knob, value in MAPPINGS["spectral_norm"].dialect.items():
        c.expect(knob, value)
    training, dim = c.take("training"), c.take("dim")
    n_power_iterations, eps = c.take("n_power_iterations"), c.take("eps")
    if n_power_iterations < 1:
        raise Unsupported(f"torch's spectral_norm requires n_power_iterations >= 1, got "
                          f"{n_power_iterations}")
    weight = c.input("weight", parameter=True)
    if weight.ndim < 2:
        raise Unsupported("torch's spectral_norm keeps no u, v for a 1-D weight "
                          "(it returns F.normalize(weight) in every mode)")
    holder = nn.Module()
    holder.weight = weight
    cuda = [] if c.device.type != "cuda" else [
        c.device.index if c.device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda):
        # registration draws random u, v and runs 15 power iterations; both are replaced below
        torch.nn.utils.parametrizations.spectral_norm(
            holder, "weight", n_power_iterations=n_power_iterations, eps=eps, dim=dim)
    sn = holder.parametrizations.weight[0]
    original = holder.parametrizations.weight.original
    c.leaves["weight"] = original   # the registered parameter is the one autograd reaches
    for name in ("u", "v"):
        value = c.state(name)
        if value is not None:
            getattr(sn, f"_{name}").copy_(value)
    holder.train(training)
    w = holder.weight                     # torch's forward: power iteration (training), W / sigma
    sigma = torch.vdot(sn._u, torch.mv(sn._reshape_weight_to_matrix(original), sn._v))
    c.check_all_read("spectral_norm")
    return c.finish({"w": w, "sigma": sigma}, {"u": sn._u, "v": sn._v})


def weight_standardization(c: _Call) -> Response:
    """timm ``StdConv2d``: batch norm of the (1, out, fan_in) view, biased var, eps inside."""
    c.expect("correction", 0)
    c.expect("eps_mode", "add_var")
    axis, eps = c.take("axis"), c.take("eps")
    weight = c.input("weight")
    axis = _axis(axis, weight.ndim)
    w = torch.movedim(weight, axis, 0)
    out = int(w.shape[0])
    w_hat = _single_value_guard(lambda: F.batch_norm(
        w.reshape(1, out, -1), None, None, training=True, momentum=0.0, eps=eps).reshape_as(w))
    c.check_all_read("weight_standardization")
    return c.finish({"w_hat": torch.movedim(w_hat, 0, axis)})


def conv_bn(c: _Call) -> Response:
    """A ConvBN block as torch users run it: ``nn.Conv2d`` then ``nn.BatchNorm2d`` (Train, Eval);
    Tune as torch Inductor's ``efficient_conv_bn_eval`` pass calls it (mmcv's and the official
    code's formula: the fold on the fly, autograd through it), only while the BN is in eval mode;
    Deploy as the ``nn.Conv2d`` that ``fuse_conv_bn_eval`` returns, whose parameters are W', b'."""
    stride, padding = c.take("stride"), c.take("padding")
    dilation, groups = c.take("dilation"), c.take("groups")
    training, fold, eps, momentum = c.take("training"), c.take("fold"), c.take("eps"), c.take("momentum")
    x, weight, bias = c.input("x"), c.input("weight", parameter=True), c.input("bias", parameter=True)
    c_out, c_group, kh, kw = (int(s) for s in weight.shape)
    conv = nn.Conv2d(c_group * groups, c_out, (kh, kw), stride=stride, padding=padding, dilation=dilation,
                     groups=groups, bias=bias is not None, device=c.device, dtype=c.dtype)
    conv.weight = weight
    if bias is not None:
        conv.bias = bias
    if fold == "deploy":   # training has no effect: a deployed block has no BN left
        y = conv(x)
        c.check_all_read("conv_bn")
        return c.finish({"y": y}, {})
    bn = nn.BatchNorm2d(c_out, eps=eps, momentum=momentum, affine=False, device=c.device, dtype=c.dtype)
    bn.weight, bn.bias = c.input("bn_weight", parameter=True), c.input("bn_bias", parameter=True)
    for name in ("running_mean", "running_var"):
        setattr(bn, name, c.state(name))
    bn.num_batches_tracked = torch.tensor(c.count(), dtype=torch.long, device=c.device)
    bn.train(training)
    conv.train(training)
    if fold == "tune" and not training:
        from torch._inductor.fx_passes.efficient_conv_bn_eval import efficient_conv_bn_eval

        y = efficient_conv_bn_eval(bn, conv, x)
    else:
        y = _single_value_guard(lambda: bn(conv(x)))
    state = {"running_mean": bn.running_mean, "running_var": bn.running_var,
             "num_batches_tracked": float(bn.num_batches_tracked.item())}
    c.check_all_read("conv_bn")
    return c.finish({"y": y}, state)


def _replace_parameter(module: nn.Module, name: str, value: torch.Tensor | None) -> None:
    """Set ``module.<name>`` to ``value``, a tensor computed from a request's leaf (a row of a
    (k, C) weight, say): a registered parameter is dropped first, so the module reads the tensor
    and autograd reaches the leaf through it; None keeps the module's own value."""
    if value is None:
        return
    if name in module._parameters:
        del module._parameters[name]
    setattr(module, name, value)


def _split_parts(n: int, k: int, training: bool, uneven: str) -> list[int]:
    """The part sizes of a batch of n: N // k each, the remainder in the last (MixBatchNorm2d's
    cut; timm's when N % k == 0, which its assert requires), or [n] for the main BN alone."""
    if not training:
        return [n]
    if n % k and uneven == "raise":
        raise Unsupported(f"{n} samples are not a multiple of num_splits={k} (timm asserts)")
    size = n // k
    if size == 0:
        raise Unsupported(f"num_splits={k} parts of {n} samples leave the first parts empty")
    return [size] * (k - 1) + [n - size * (k - 1)]


def split_batch_norm(c: _Call) -> Response:
    """timm's ``SplitBatchNorm2d`` (the main BN on part 0, ``aux_bn[i-1]`` on part i,
    ``torch.cat``; the main BN alone in eval) where timm is loadable and the cut is timm's; else
    the same construction from ``nn.BatchNorm{1,2,3}d``, one module per contiguous part with row i
    of the weight, bias and running statistics.  timm's class gets a 4-D view (N, C, L, 1) of
    other ranks: the statistics are over the same values."""
    for knob, value in MAPPINGS["split_batch_norm"].dialect.items():
        c.expect(knob, value)
    k, uneven = c.take("num_splits"), c.take("uneven")
    training, track = c.take("training"), c.take("track_running_stats")
    axis, eps, momentum = c.take("axis"), c.take("eps"), c.take("momentum")
    x, weight, bias = c.input("x"), c.input("weight"), c.input("bias")
    axis = _axis(axis, x.ndim)
    if axis == 0:
        raise Unsupported("axis 0 is the batch axis")
    xc = torch.movedim(x, axis, 1)
    n, channels = int(xc.shape[0]), int(xc.shape[1])
    sizes = _split_parts(n, k, training, uneven)
    options = {"eps": eps, "momentum": momentum, "affine": False, "track_running_stats": track}
    timm = _split_batchnorm_class() if k >= 2 and (not training or n % k == 0) else None
    if timm is not None:
        # SplitBatchNorm2d(dtype=float64) builds a float32 main BN (its super().__init__ is not
        # given the dtype): .to() makes every BN the request's dtype.
        layer = timm(channels, num_splits=k, **options).to(device=c.device, dtype=c.dtype)
        modules = [layer, *layer.aux_bn]
    else:
        layer = None
        modules = [_batch_norm_module(xc.ndim)(channels, **options, device=c.device, dtype=c.dtype)
                   for _ in range(k if training else 1)]
    running = {name: c.state(name) if track else None for name in ("running_mean", "running_var")}
    for i, module in enumerate(modules):
        _replace_parameter(module, "weight", None if weight is None else weight[i])
        _replace_parameter(module, "bias", None if bias is None else bias[i])
        if track:
            for name, value in running.items():
                if value is not None:
                    setattr(module, name, value[i].clone())
            module.num_batches_tracked = torch.tensor(c.count(), dtype=torch.long, device=c.device)
    if layer is not None:
        layer.train(training)
        y = _single_value_guard(lambda: layer(xc if xc.ndim == 4 else xc.reshape(n, channels, -1, 1)))
    else:
        def run(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
            module.train(training)
            flat = t if t.ndim <= 5 else t.reshape(t.shape[0], channels, -1)
            return _single_value_guard(lambda: module(flat))

        y = torch.cat([run(m, t).reshape(t.shape) for m, t in zip(modules, xc.split(sizes), strict=True)])
    state: dict[str, torch.Tensor | float] = {}
    if track:
        for name, value in running.items():
            if value is not None:
                rows = [getattr(m, name) for m in modules] + list(value[len(modules):])
                state[name] = torch.stack(rows)
        state["num_batches_tracked"] = float(modules[0].num_batches_tracked.item())
    c.check_all_read("split_batch_norm")
    return c.finish({"y": torch.movedim(y.reshape(xc.shape), 1, axis)}, state)


def _split_batchnorm_class() -> type[nn.Module] | None:
    """timm's ``SplitBatchNorm2d`` when timm is loadable (``_timm.py``), else None."""
    from conformance.adapters import _timm

    try:
        return _timm.layers("split_batchnorm").SplitBatchNorm2d
    except Unsupported:
        return None


def rep_bn(c: _Call) -> Response:
    """SLAB's RepBN as ``prepbn.py`` builds it, ``nn.BatchNorm1d(C)`` on the (B, C, N) transpose
    plus ``alpha * x``, and Progressive RepBN as its ``LinearNorm``: ``nn.LayerNorm(C)`` alone
    during the warm-up, then ``lambda * LN(x) + (1 - lambda) * RepBN(x)`` with
    ``lambda = r0 * iter / total_steps`` before ``iter`` is decremented, RepBN alone in eval.  The
    counters ``warm`` and ``decay_iter`` (LinearNorm's buffers ``warm``, ``iter``) come and go as
    state; lambda is formed in float64, as the spec defines it (the official buffers are int64
    and their quotient float32: a documented finding, not this mapping's)."""
    progressive, warmup, total_steps = c.take("progressive"), c.take("warmup"), c.take("total_steps")
    r0, training = c.take("r0"), c.take("training")
    eps, momentum, ln_eps = c.take("eps"), c.take("momentum"), c.take("ln_eps")
    del warmup   # the initial value of the state's warm: the request carries the current one
    x = c.input("x")
    weight, bias = c.input("weight", parameter=True), c.input("bias", parameter=True)
    alpha = c.input("alpha", parameter=True)
    ln_weight, ln_bias = c.input("ln_weight", parameter=True), c.input("ln_bias", parameter=True)
    if alpha is None:
        raise Unsupported("RepBN needs its alpha")
    channels = int(x.shape[-1])
    bn = nn.BatchNorm1d(channels, eps=eps, momentum=momentum, affine=False, device=c.device, dtype=c.dtype)
    bn.weight, bn.bias = weight, bias
    for name in ("running_mean", "running_var"):
        value = c.state(name)
        if value is not None:
            setattr(bn, name, value)
    bn.num_batches_tracked = torch.tensor(c.count(), dtype=torch.long, device=c.device)
    bn.train(training)

    def rep(t: torch.Tensor) -> torch.Tensor:   # RepBN.forward on (B, N, C) tokens
        tokens = t if t.ndim == 2 else t.reshape(t.shape[0], -1, channels).transpose(1, 2)
        y_bn = _single_value_guard(lambda: bn(tokens))
        y_bn = y_bn if t.ndim == 2 else y_bn.transpose(1, 2).reshape(t.shape)
        return y_bn + alpha * t

    ln = nn.LayerNorm(channels, eps=ln_eps, elementwise_affine=False, device=c.device, dtype=c.dtype)
    ln.weight, ln.bias = ln_weight, ln_bias
    old = c.request.state or {}
    counters = {k: int(round(float(old[k]))) for k in ("warm", "decay_iter") if old.get(k) is not None}
    if progressive and len(counters) < 2:
        raise Unsupported("Progressive RepBN needs the counters warm and decay_iter in the state")
    if not training:
        y = rep(x)
    elif not progressive:
        y = rep(x)
    elif counters["warm"] > 0:   # LinearNorm's warm-up: LayerNorm alone, BatchNorm not run
        counters["warm"] -= 1
        y = ln(x)
    else:
        lam = _progressive_lambda(r0, counters["decay_iter"], total_steps)   # before the decrement
        if counters["decay_iter"] > 0:
            counters["decay_iter"] -= 1
        y = lam * ln(x) + (1.0 - lam) * rep(x)
    state: dict[str, torch.Tensor | float] = {"running_mean": bn.running_mean, "running_var": bn.running_var,
                                              "num_batches_tracked": float(bn.num_batches_tracked.item())}
    if progressive:
        state.update({k: float(v) for k, v in counters.items()})
    c.check_all_read("rep_bn")
    return c.finish({"y": y}, state)


def _progressive_lambda(r0: float, decay_iter: int, total_steps: int) -> float:
    """LinearNorm's ``lamda = r0 * iter / total_step``, in float64 (Python floats)."""
    return r0 * decay_iter / total_steps


def msg_norm(c: _Call) -> Response:
    """DeeperGCN's MsgNorm as PyG's ``MessageNorm.forward`` writes it (deep_gcns_torch's
    ``MsgNorm`` alike): ``F.normalize(msg, p=2, dim, eps) * x.norm(p=2, dim, keepdim=True) *
    scale``, the feature axes as ``dim`` (PyG: -1); without ``scale`` s = 1 (a frozen scale)."""
    c.expect("eps_clamps", "norm")
    axes, eps = c.take("axes"), c.take("eps")
    x, msg, scale = c.input("x"), c.input("msg"), c.input("scale")
    dims = tuple(_axis(a, x.ndim) for a in axes)
    if len(set(dims)) != len(dims):
        raise Unsupported(f"repeated feature axes {axes}")
    dim = dims if len(dims) > 1 else dims[0]
    y = F.normalize(msg, p=2.0, dim=dim, eps=eps) * x.norm(p=2, dim=dim, keepdim=True)
    if scale is not None:
        y = y * scale
    c.check_all_read("msg_norm")
    return c.finish({"y": y})


#: timm's EvoNorm class per (variant, keep_denominator): the "a" classes keep the group
#: denominator with apply_act=False (with it, they compute S0, S1, S2); B variants have none.
_EVO_CLASSES = {("b0", False): "EvoNorm2dB0", ("b1", False): "EvoNorm2dB1", ("b2", False): "EvoNorm2dB2",
                ("s0", False): "EvoNorm2dS0", ("s0", True): "EvoNorm2dS0a",
                ("s1", False): "EvoNorm2dS1", ("s1", True): "EvoNorm2dS1a",
                ("s2", False): "EvoNorm2dS2", ("s2", True): "EvoNorm2dS2a"}


def evo_norm(c: _Call) -> Response:
    """timm's ``EvoNorm2d{B0,B1,B2,S0,S0a,S1,S1a,S2,S2a}`` (``timm/layers/evo_norm.py``, loaded
    without ``import timm`` by ``_timm.py``): the class of the variant (the "a" class for
    keep_denominator), ``apply_act`` = nonlinearity, eps, momentum and groups from the request,
    weight, bias, v and the running variance set from it; other layouts as the (N, C, L, 1) view
    timm's 4-D layers take (the same statistics)."""
    from conformance.adapters import _timm

    evo = _timm.layers("evo_norm")   # Unsupported (one line) without timm
    for knob, value in MAPPINGS["evo_norm"].dialect.items():
        c.expect(knob, value)
    variant, keep = c.take("variant"), c.take("keep_denominator")
    training, nonlinearity = c.take("training"), c.take("nonlinearity")
    axis, eps, momentum, groups = c.take("axis"), c.take("eps"), c.take("momentum"), c.take("num_groups")
    x = c.input("x")
    params = {name: c.input(name, parameter=True) for name in ("weight", "bias", "v")}
    axis = _axis(axis, x.ndim)
    if axis == 0:
        raise Unsupported("axis 0 is the batch axis")
    xc = torch.movedim(x, axis, 1)
    n, channels = int(xc.shape[0]), int(xc.shape[1])
    b_variant = variant.startswith("b")
    cls = getattr(evo, _EVO_CLASSES[(variant, keep and not b_variant)])
    options = {"momentum": momentum} if b_variant else {"groups": groups}
    if not b_variant and channels % groups:
        raise Unsupported(f"timm asserts num_groups={groups} divides the {channels} channels")
    layer = cls(channels, apply_act=nonlinearity, eps=eps, **options, device=c.device, dtype=c.dtype)
    for name, value in params.items():
        if value is not None and getattr(layer, name, None) is not None:
            setattr(layer, name, value)   # v only where the layer reads one (b0, s0 with apply_act)
    running_var = c.state("running_var")
    if b_variant and running_var is not None:
        layer.running_var = running_var
    layer.train(training)
    x4 = xc if xc.ndim == 4 else xc.reshape(n, channels, -1, 1)
    try:
        y = layer(x4)
    except ZeroDivisionError:
        raise Unsupported("timm's running-variance update divides by n - 1 = 0 (one value per channel)") \
            from None
    state = {} if running_var is None else {"running_var": layer.running_var if b_variant else running_var}
    c.check_all_read("evo_norm")
    return c.finish({"y": torch.movedim(y.reshape(xc.shape), 1, axis)}, state)


#: The normalizers: each mapping with the convention knobs torch follows (the specs' ``torch``
#: dialect tables without their layout and numeric entries; weight standardization: timm's
#: StdConv2d; MsgNorm: PyG's; EvoNorm: timm's), the torch call, and the state torch does not keep
#: (supplied by the harness, not compared).
MAPPINGS: dict[str, Mapping] = {
    "batch_norm": Mapping(
        batch_norm, api="torch.nn.BatchNorm{1,2,3}d (F.batch_norm)", dtypes=DTYPES,
        dialect={"momentum_convention": "new_weight", "running_var_correction": 1,
                 "single_value": "raise"}),
    "ghost_batch_norm": Mapping(
        ghost_batch_norm, api="torch.nn.BatchNorm{1,2,3}d per chunk (bigBatch, Composer, tabnet)",
        dtypes=DTYPES, dialect={"momentum_convention": "new_weight", "running_var_correction": 1,
                                "single_value": "raise"}),
    "layer_norm": Mapping(layer_norm, api="torch.nn.functional.layer_norm", dtypes=DTYPES),
    "group_norm": Mapping(group_norm, api="torch.nn.functional.group_norm", dtypes=DTYPES,
                          dialect={"affine": "per_channel"}),
    "instance_norm": Mapping(
        instance_norm, api="torch.nn.functional.instance_norm", dtypes=DTYPES,
        dialect={"momentum_convention": "new_weight", "running_var_correction": 1,
                 "single_value": "raise"},
        not_kept=("num_batches_tracked",)),
    "rms_norm": Mapping(rms_norm, api="torch.nn.functional.rms_norm", dtypes=DTYPES,
                        dialect={"eps_placement": "inside"}),
    # torch has no eps in weight norm at all: eps = 0 is a convention, not a chosen value.
    "weight_norm": Mapping(weight_norm, api="torch._weight_norm (parametrizations.weight_norm)",
                           dtypes=DTYPES, dialect={"eps": 0.0, "eps_mode": "add"}),
    "spectral_norm": Mapping(
        spectral_norm, api="torch.nn.utils.parametrizations.spectral_norm", dtypes=DTYPES,
        dialect={"normalize": "max", "iteration_order": "u_then_v", "eval_mode": "frozen",
                 "gradient": "through_sigma"}),
    "l2_normalize": Mapping(l2_normalize, api="torch.nn.functional.normalize", dtypes=DTYPES,
                            dialect={"eps_clamps": "norm"}),
    "weight_standardization": Mapping(
        weight_standardization, dtypes=DTYPES,
        api="timm StdConv2d: F.batch_norm(w.reshape(1, out, -1), training=True)",
        dialect={"correction": 0, "eps_mode": "add_var"}),
    "conv_bn": Mapping(
        conv_bn, dtypes=DTYPES,
        api="nn.Conv2d + nn.BatchNorm2d; Tune: torch._inductor efficient_conv_bn_eval; "
            "Deploy: the fused nn.Conv2d"),
    # torch's BatchNorm conventions (the spec's torch table); the cut is the caller's, so both
    # values of `uneven` are implemented (timm's class for its own cut).
    "split_batch_norm": Mapping(
        split_batch_norm, dtypes=DTYPES,
        api="timm.layers.SplitBatchNorm2d where timm is loadable, else torch.nn.BatchNorm{1,2,3}d "
            "per contiguous part + torch.cat; eval: the main BN",
        dialect={"momentum_convention": "new_weight", "running_var_correction": 1,
                 "single_value": "raise"}),
    # No convention knob is fixed: progressive, the step counts, r0 and both eps are the case's.
    "rep_bn": Mapping(
        rep_bn, dtypes=DTYPES,
        api="torch.nn.BatchNorm1d on the (B, C, N) transpose + alpha * x (SLAB RepBN); "
            "progressive: blended with torch.nn.LayerNorm as SLAB's LinearNorm"),
    # PyG MessageNorm's formula (the spec's pyg table).
    "msg_norm": Mapping(
        msg_norm, dtypes=DTYPES,
        api="F.normalize(msg, p=2, dim) * x.norm(p=2, dim, keepdim=True) * scale "
            "(torch_geometric.nn.MessageNorm.forward)",
        dialect={"eps_clamps": "norm"}),
    # The conventions every timm_* table of the spec shares; `variant` and `keep_denominator`
    # (which class) are the case's: every value has its timm class.
    "evo_norm": Mapping(
        evo_norm, dtypes=DTYPES,
        api="timm.layers.EvoNorm2d{B0,B1,B2,S0,S0a,S1,S1a,S2,S2a} (timm/layers/evo_norm.py, "
            "loaded without import timm)",
        dialect={"momentum_convention": "new_weight", "running_var_correction": 1,
                 "group_fallback": "raise", "max_tie": "split"}),
}


# --------------------------------------------------------------------------------------------
# The adapter
# --------------------------------------------------------------------------------------------


def device_of(device: str | None) -> torch.device:
    """The device from the argument or ``NORMREF_TORCH_DEVICE``; ValueError naming it if unusable."""
    name = device or os.environ.get("NORMREF_TORCH_DEVICE", "") or "cpu"
    where = f"device {name!r}" if device else f"NORMREF_TORCH_DEVICE={name!r}"
    try:
        resolved = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{where} is not a torch device (expected cpu, cuda or cuda:N)") from None
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"{where}: unsupported torch device type {resolved.type!r} (expected cpu or cuda)")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{where} but torch.cuda.is_available() is False (no GPU, or a CPU build of torch)")
    return resolved


def _extensions() -> MappingProxyType[str, Mapping]:
    """The ops of the other families' mapping files (``_torch_*.py`` next to this module), each
    record's ``fn(request, device) -> Response``."""
    from conformance.adapters.mapping import load_extensions

    return load_extensions("_torch_")


class TorchAdapter:
    name = "torch"

    def __init__(self, device: str | None = None) -> None:
        self.device = device_of(device)

    def info(self) -> dict[str, str]:
        from conformance.adapters import _timm

        info = {"framework": "torch", "version": torch.__version__, "device": str(self.device),
                "timm": _timm.version()}   # evo_norm's layers (SKIP when "absent")
        if self.device.type == "cuda":
            info["device_name"] = torch.cuda.get_device_name(self.device)
            info["cuda"] = str(torch.version.cuda)
        return info

    def ops(self) -> dict[str, OpSupport]:
        return {op: mapping.support() for op, mapping in {**MAPPINGS, **_extensions()}.items()}

    def evaluate(self, op: str, request: Request) -> Response:
        extension = _extensions().get(op)
        if extension is not None:
            if request.dtype not in extension.dtypes:
                raise Unsupported(f"dtype {request.dtype}")
            return extension.fn(request, self.device)
        if op not in MAPPINGS:
            raise Unsupported(f"the torch adapter does not implement {op}")
        if request.dtype not in _TORCH_DTYPES:
            raise Unsupported(f"dtype {request.dtype}")
        return MAPPINGS[op].fn(_Call(request, self.device))


def make_adapter(device: str | None = None) -> TorchAdapter:
    return TorchAdapter(device)

