"""The optimizers and update rules of the seed papers, as pure functions over dict pytrees.

Contract (every module; its spec is ``specs/optimizers/<name>.toml``, ``kind = "optimizer"``)::

    state = init(params, *, <hyper-parameters>)
    new_params, new_state = step(params, grads, state, *, <hyper-parameters>)

* ``params`` and ``grads``: dicts ``{path: array}`` (nested dicts are accepted and returned in
  the structure given), float64 (lower precision is promoted exactly).  Nothing is modified in
  place.
* ``state``: ``{slot: {path: array}}`` for per-parameter slots (``exp_avg``) and ``{slot: 0-d
  array}`` for global ones (``step``, the number of steps taken).  The slots are the spec's
  ``[[slots]]``; an optional slot (AMSGrad's maximum) is present only when the mode uses it.
* hyper-parameters are keyword-only with the spec's defaults and validated by it; ``lr`` is the
  learning rate *of this step*: a schedule is applied by the caller (``reference.optimizers.
  schedules``), which is what makes the lr-inside-the-buffer forms (Keras, Caffe2, optax's
  ``trace`` after ``scale_by_learning_rate``) and Goyal's momentum correction expressible.
* masks (``weight_decay_mask``, ``trust_mask``, ...) are names from ``_tree.MASKS`` or callables
  ``(path, array) -> bool``; :func:`mask_of` (public) resolves one to ``{path: bool}``.
* :func:`param_groups` (public: ``from reference.optimizers import param_groups``) gives
  per-group hyper-parameters, as torch's ``param_groups`` and optax's ``multi_transform``:
  ``param_groups(sgd.step, [("ndim>=2", {}), ("all", {"weight_decay": 0.0})])`` is a step
  function that steps each parameter with the hyper-parameters of the first group whose mask
  selects it.

Shared pieces: ``_tree`` (pytrees, masks, norms, groups) and ``_common`` (weight decay, EMAs, bias
correction).  Each function is written from its paper's equations; the module docstring names
them and the framework conventions its knobs reproduce.
"""

from reference.optimizers._tree import mask_of, param_groups

__all__ = ["mask_of", "param_groups"]
