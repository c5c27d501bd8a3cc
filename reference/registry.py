"""The op registry: specs/ (data) bound to reference functions (math).

A spec is one TOML file, ``specs/<family>/<name>.toml``.  Its keys (all validated on load; a
malformed spec raises :class:`SpecError` naming the file and the key):

``name``, ``family``, ``summary``
``function``      ``"module:callable"`` of the human API.  Its positional-or-keyword parameters
                  are the spec's inputs then its state (same names, same order); its keyword-only
                  parameters are exactly the spec's hyper-parameters with the spec's defaults.
                  It returns the output array (one output), a tuple of outputs (several), and for
                  ops with state ``(outputs, new_state_dict)``.
``vjp``           ``"module:callable"``: parameters ``d<output>`` for each output, then the inputs
                  and state, then the same keyword-only hyper-parameters; returns a dict with one
                  gradient per differentiable input that was given.
``init_state``    (ops with state) ``"module:callable"`` building the initial state from inputs.
``backward``      ``exact`` | ``custom`` | ``surrogate``
``tolerance``     the op's error class, for documentation and ``normref show`` (e.g.
                  ``standardizer``, ``rms_normalizer``, ``l2_normalizer``).  The harness's bounds do
                  not depend on it: conformance/tolerance.py derives them per case from the
                  measured sensitivity, for every op alike.
``properties``    names of the invariants the property tests check
``[citation]``    ``title``, ``arxiv``, ``equations``, ``code`` (official code path), ``notes``
``[[inputs]]`` / ``[[state]]`` / ``[[outputs]]``: ``name``, ``shape`` (a rule in words),
                  ``differentiable`` (inputs), ``optional``, ``doc``
``[hparams.<name>]``  ``type`` (float|int|bool|str|axes), ``default``, optional ``allowed``,
                  ``min``/``max`` (inclusive) or ``gt``/``lt`` (exclusive), ``nullable``, ``doc``.
                  TOML has no null: the string ``"None"`` stands for Python ``None`` where
                  ``nullable = true``.
``[dialects.<framework>]``  ``api`` (the framework call), ``source`` (file it was read from),
                  ``notes``, and ``hparams`` = the values that reproduce that framework.
``[[cases]]``     seeded default cases: ``name``, ``shapes`` (input name -> list of ints),
                  optional ``hparams`` (overrides) and ``dialect``.  The harness and the generic
                  tests draw standard-normal values for these shapes (conformance/cases.py).

Optimizer specs (``kind = "optimizer"``, family ``optimizers``) differ in four keys: ``step`` and
``init`` (``"module:callable"``) replace ``function``/``vjp``/``init_state``; ``[[slots]]``
(``name``, ``per`` = ``"param"`` | ``"global"``, ``shape``, ``doc``) replace ``[[state]]``; there are
no ``[[inputs]]``/``[[outputs]]`` (they are always ``params`` and ``grads`` -> ``params``); and a
case gives ``params`` (path -> shape), ``gradients`` (``fixed`` | ``quadratic`` | ``rosenbrock``),
optional ``steps``, ``schedule`` (``constant`` | ``drop`` | ``warmup`` | ``cosine`` | ``one_cycle``:
conformance/trajectory.py) and ``tags`` instead of ``shapes``.  The functions are pure
functions over flat dict pytrees (see ``reference/optimizers/__init__.py``).  For the harness an
optimizer op is also an ordinary op over *flat* arrays: inputs ``params/<path>`` and
``grads/<path>``, state ``<slot>/<path>`` (per-param slots) or ``<slot>`` (global ones), output
``params/<path>``; :meth:`Op.apply` and :meth:`Op.init_state` speak that form.

Public entry points: :func:`ops`, :func:`get`, :func:`load_spec`, and the decorators
:func:`oracle_function` / :func:`oracle_vjp` that make the human API validate its
hyper-parameters against the same spec and promote its arrays to float64.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reference._backend import Outputs, as_float64, is_array

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "Citation",
    "HParam",
    "Op",
    "Spec",
    "SpecError",
    "TensorSpec",
    "get",
    "load_spec",
    "ops",
    "oracle_function",
    "oracle_optimizer",
    "oracle_vjp",
    "specs_dir",
]

BACKWARD_KINDS = ("exact", "custom", "surrogate")
HPARAM_TYPES = ("float", "int", "bool", "str", "axes", "mask")
KINDS = ("op", "optimizer")
GRADIENT_SOURCES = ("fixed", "quadratic", "rosenbrock")
NONE_SENTINEL = "None"


class SpecError(ValueError):
    """A spec file is malformed; the message names the file and the key."""


def specs_dir() -> Path:
    """The folder holding the specs: ``$NORMREF_SPECS`` or ``specs/`` next to the package."""
    env = os.environ.get("NORMREF_SPECS")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "specs"


# --------------------------------------------------------------------------------------------
# Spec data classes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Citation:
    title: str
    arxiv: str
    equations: str
    code: str
    notes: str = ""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: str
    differentiable: bool = False
    optional: bool = False
    doc: str = ""
    per: str = ""   # optimizer slots: "param" (one array per parameter) or "global" (a scalar)
    exact: bool = False  # integer-valued (a step count): read exactly, never rounding-perturbed
    #: outputs: the name of another output this one is multiplied or divided by (spectral norm's
    #: ``w = W / sigma``): that output's own rounding error enters this one relatively
    scaled_by: str = ""


@dataclass(frozen=True)
class HParam:
    name: str
    type: str
    default: Any
    allowed: tuple[Any, ...] | None = None
    min: float | None = None
    max: float | None = None
    gt: float | None = None
    lt: float | None = None
    nullable: bool = False
    doc: str = ""

    def domain(self) -> str:
        """The allowed values in words, for error messages and ``normref show``."""
        parts = []
        if self.allowed is not None:
            parts.append("one of " + ", ".join(repr(a) for a in self.allowed))
        if self.gt is not None:
            parts.append(f"> {self.gt}")
        if self.min is not None:
            parts.append(f">= {self.min}")
        if self.lt is not None:
            parts.append(f"< {self.lt}")
        if self.max is not None:
            parts.append(f"<= {self.max}")
        text = f"{self.type} " + " and ".join(parts) if parts else self.type
        return text + (" or None" if self.nullable else "")

    def check(self, op: str, value: Any) -> Any:
        """Return ``value`` (axes normalized to a tuple) or raise naming op, key and domain."""
        where = f"{op}: hyper-parameter {self.name!r}"
        if value is None:
            if self.nullable:
                return None
            raise ValueError(f"{where} must be {self.domain()}, got None")
        value = _check_type(where, self.type, value)
        if self.allowed is not None and not callable(value) and value not in self.allowed:
            raise ValueError(f"{where} must be {self.domain()}, got {value!r}")
        if self.type in ("float", "int"):
            bad = (
                (self.type == "float" and not math.isfinite(value))
                or (self.gt is not None and not value > self.gt)
                or (self.min is not None and not value >= self.min)
                or (self.lt is not None and not value < self.lt)
                or (self.max is not None and not value <= self.max)
            )
            if bad:
                raise ValueError(f"{where} must be {self.domain()}, got {value!r}")
        return value


def _check_type(where: str, kind: str, value: Any) -> Any:
    if kind == "bool":
        if not isinstance(value, bool):
            raise TypeError(f"{where} must be a bool, got {type(value).__name__} {value!r}")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise TypeError(f"{where} must be a str, got {type(value).__name__} {value!r}")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            if not (hasattr(value, "__index__") and not isinstance(value, bool)):
                raise TypeError(f"{where} must be an int, got {type(value).__name__} {value!r}")
        return int(value)
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                return float(value)  # NumPy scalars
            except (TypeError, ValueError):
                raise TypeError(
                    f"{where} must be a float, got {type(value).__name__} {value!r}"
                ) from None
        return float(value)
    if kind == "mask":
        # A parameter mask: the name of a predicate of reference.optimizers._tree.MASKS, or a
        # callable (path, array) -> bool (Python API only; TOML cannot hold one).
        if isinstance(value, str) or callable(value):
            return value
        raise TypeError(f"{where} must be a mask name or a callable (path, array) -> bool, "
                        f"got {type(value).__name__} {value!r}")
    if kind == "axes":
        items = (value,) if isinstance(value, int) and not isinstance(value, bool) else value
        try:
            items = tuple(items)
        except TypeError:
            raise TypeError(
                f"{where} must be an int or a sequence of ints, got {type(value).__name__}"
            ) from None
        if not items or any(isinstance(a, bool) or not isinstance(a, int) for a in items):
            raise TypeError(f"{where} must be an int or a non-empty sequence of ints, got {value!r}")
        return items
    raise AssertionError(kind)  # pragma: no cover


@dataclass(frozen=True)
class Spec:
    name: str
    family: str
    summary: str
    path: Path
    citation: Citation
    function: str
    vjp: str
    init_state: str | None
    backward: str
    tolerance: str
    properties: tuple[str, ...]
    inputs: tuple[TensorSpec, ...]
    state: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    hparams: dict[str, HParam]
    dialects: dict[str, dict[str, Any]] = field(default_factory=dict)
    cases: tuple[dict[str, Any], ...] = ()
    kind: str = "op"
    #: resolve()'s validated results, keyed by the call (the harness resolves the same few
    #: hyper-parameter sets hundreds of thousands of times per run)
    _resolved: dict[Any, dict[str, Any]] = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_optimizer(self) -> bool:
        return self.kind == "optimizer"

    @property
    def differentiable(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs if t.differentiable)

    def defaults(self) -> dict[str, Any]:
        return {k: p.default for k, p in self.hparams.items()}

    def resolve(self, hparams: Mapping[str, Any], *, dialect: str | None = None) -> dict[str, Any]:
        """Defaults, overlaid by a dialect's values, overlaid by ``hparams``; all validated."""
        # The type names keep True, 1 and 1.0 apart (equal as keys); unhashable values (a list)
        # are resolved every time.
        key = (dialect, tuple(sorted((k, type(v).__name__, v) for k, v in hparams.items())))
        try:
            found = self._resolved.get(key)
        except TypeError:
            return self._resolve(hparams, dialect)
        if found is None:
            found = self._resolve(hparams, dialect)
            if len(self._resolved) < 4096:
                self._resolved[key] = found
        return dict(found)

    def _resolve(self, hparams: Mapping[str, Any], dialect: str | None) -> dict[str, Any]:
        values = self.defaults()
        if dialect is not None:
            if dialect not in self.dialects:
                known = ", ".join(sorted(self.dialects)) or "none"
                raise ValueError(f"{self.name}: unknown dialect {dialect!r}; known: {known}")
            values.update(self.dialects[dialect]["hparams"])
        for key, value in hparams.items():
            if key not in self.hparams:
                known = ", ".join(self.hparams)
                raise TypeError(
                    f"{self.name}: unknown hyper-parameter {key!r}; expected one of: {known}"
                )
            values[key] = value
        return {k: self.hparams[k].check(self.name, v) for k, v in values.items()}


# --------------------------------------------------------------------------------------------
# Spec loading
# --------------------------------------------------------------------------------------------


def _need(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in data:
        raise SpecError(f"{where}: missing key {key!r}")
    value = data[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise SpecError(f"{where}: key {key!r} must be {names}, got {type(value).__name__}")
    return value


def _tensors(data: Mapping[str, Any], key: str, where: str) -> tuple[TensorSpec, ...]:
    out = []
    allowed = {"name", "shape", "differentiable", "optional", "doc", "exact"}
    if key == "outputs":
        allowed.add("scaled_by")
    for i, item in enumerate(data.get(key, [])):
        w = f"{where} [[{key}]] #{i}"
        if not isinstance(item, dict):
            raise SpecError(f"{w}: must be a table")
        extra = set(item) - allowed
        if extra:
            raise SpecError(f"{w}: unknown keys {sorted(extra)}; allowed {sorted(allowed)}")
        out.append(
            TensorSpec(
                name=_need(item, "name", str, w),
                shape=_need(item, "shape", str, w),
                differentiable=bool(item.get("differentiable", False)),
                optional=bool(item.get("optional", False)),
                doc=str(item.get("doc", "")),
                exact=bool(item.get("exact", False)),
                scaled_by=str(item.get("scaled_by", "")),
            )
        )
    names = {t.name for t in out}
    for t in out:
        if t.scaled_by and (t.scaled_by not in names or t.scaled_by == t.name):
            raise SpecError(f"{where} [[{key}]] {t.name!r}: scaled_by must name another output, "
                            f"got {t.scaled_by!r} (outputs: {sorted(names)})")
    return tuple(out)


def _slots(data: Mapping[str, Any], where: str) -> tuple[TensorSpec, ...]:
    """An optimizer's ``[[slots]]``: its state, one array per parameter or one global scalar."""
    out = []
    allowed = {"name", "per", "shape", "doc", "exact"}
    for i, item in enumerate(data.get("slots", [])):
        w = f"{where} [[slots]] #{i}"
        if not isinstance(item, dict):
            raise SpecError(f"{w}: must be a table")
        extra = set(item) - allowed
        if extra:
            raise SpecError(f"{w}: unknown keys {sorted(extra)}; allowed {sorted(allowed)}")
        per = _need(item, "per", str, w)
        if per not in ("param", "global"):
            raise SpecError(f"{w}: per must be 'param' or 'global', got {per!r}")
        out.append(TensorSpec(name=_need(item, "name", str, w), shape=_need(item, "shape", str, w),
                              doc=str(item.get("doc", "")), per=per,
                              exact=bool(item.get("exact", False))))
    return tuple(out)


def _hparam(name: str, item: Any, where: str) -> HParam:
    w = f"{where} [hparams.{name}]"
    if not isinstance(item, dict):
        raise SpecError(f"{w}: must be a table")
    allowed_keys = {"type", "default", "allowed", "min", "max", "gt", "lt", "nullable", "doc"}
    extra = set(item) - allowed_keys
    if extra:
        raise SpecError(f"{w}: unknown keys {sorted(extra)}; allowed {sorted(allowed_keys)}")
    kind = _need(item, "type", str, w)
    if kind not in HPARAM_TYPES:
        raise SpecError(f"{w}: type must be one of {HPARAM_TYPES}, got {kind!r}")
    if "default" not in item:
        raise SpecError(f"{w}: missing key 'default'")
    nullable = bool(item.get("nullable", False))

    def unsentinel(v: Any) -> Any:
        return None if nullable and v == NONE_SENTINEL else v

    allowed = item.get("allowed")
    param = HParam(
        name=name,
        type=kind,
        default=unsentinel(item["default"]),
        allowed=tuple(allowed) if allowed is not None else None,
        min=item.get("min"),
        max=item.get("max"),
        gt=item.get("gt"),
        lt=item.get("lt"),
        nullable=nullable,
        doc=str(item.get("doc", "")),
    )
    try:
        checked = param.check(name, param.default)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{w}: default is invalid: {exc}") from None
    if kind == "axes" and checked is not None:
        param = HParam(**{**param.__dict__, "default": checked})
    return param


def load_spec(path: str | os.PathLike[str]) -> Spec:
    """Parse and validate one spec file."""
    path = Path(path)
    where = str(path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{where}: not valid TOML: {exc}") from None
    name = _need(data, "name", str, where)
    if name != path.stem:
        raise SpecError(f"{where}: name {name!r} must equal the file name {path.stem!r}")
    cit = _need(data, "citation", dict, where)
    citation = Citation(
        title=_need(cit, "title", str, f"{where} [citation]"),
        arxiv=str(cit.get("arxiv", "")),
        equations=_need(cit, "equations", str, f"{where} [citation]"),
        code=_need(cit, "code", str, f"{where} [citation]"),
        notes=str(cit.get("notes", "")),
    )
    kind = data.get("kind", "op")
    if kind not in KINDS:
        raise SpecError(f"{where}: kind must be one of {KINDS}, got {kind!r}")
    hparams_raw = data.get("hparams", {})
    if not isinstance(hparams_raw, dict):
        raise SpecError(f"{where}: [hparams] must be a table")
    hparams = {k: _hparam(k, v, where) for k, v in hparams_raw.items()}
    if kind == "optimizer":
        spec = _optimizer_spec(data, name, path, citation, hparams, where)
    else:
        spec = _op_spec(data, name, path, citation, hparams, where)
    if not spec.inputs or not spec.outputs:
        raise SpecError(f"{where}: needs at least one [[inputs]] and one [[outputs]]")
    if spec.state and not spec.init_state:
        raise SpecError(f"{where}: has [[state]] but no 'init_state'")
    for d_name, table in data.get("dialects", {}).items():
        w = f"{where} [dialects.{d_name}]"
        if not isinstance(table, dict):
            raise SpecError(f"{w}: must be a table")
        raw = _need(table, "hparams", dict, w)
        values = {}
        for key, value in raw.items():
            if key not in hparams:
                raise SpecError(f"{w}: unknown hyper-parameter {key!r}")
            value = _unsentinel(hparams[key], value)
            try:
                values[key] = hparams[key].check(name, value)
            except (TypeError, ValueError) as exc:
                raise SpecError(f"{w}: {exc}") from None
        spec.dialects[d_name] = {
            "api": str(table.get("api", "")),
            "source": str(table.get("source", "")),
            "notes": str(table.get("notes", "")),
            "hparams": values,
        }
    cases = _optimizer_cases(data, spec, where) if kind == "optimizer" else _cases(data, spec, where)
    return Spec(**{**spec.__dict__, "cases": cases})


def _op_spec(data: Mapping[str, Any], name: str, path: Path, citation: Citation,
             hparams: dict[str, HParam], where: str) -> Spec:
    backward = _need(data, "backward", str, where)
    if backward not in BACKWARD_KINDS:
        raise SpecError(f"{where}: backward must be one of {BACKWARD_KINDS}, got {backward!r}")
    return Spec(
        name=name,
        family=_need(data, "family", str, where),
        summary=_need(data, "summary", str, where),
        path=path,
        citation=citation,
        function=_need(data, "function", str, where),
        vjp=_need(data, "vjp", str, where),
        init_state=data.get("init_state"),
        backward=backward,
        tolerance=_need(data, "tolerance", str, where),
        properties=tuple(data.get("properties", ())),
        inputs=_tensors(data, "inputs", where),
        state=_tensors(data, "state", where),
        outputs=_tensors(data, "outputs", where),
        hparams=hparams,
        dialects={},
    )


#: The fixed signature of every optimizer, as tensors of the generic op contract.
OPTIMIZER_INPUTS = (
    TensorSpec("params", "dict path -> array (the parameters w)"),
    TensorSpec("grads", "dict path -> array, the shapes of params (the gradients g)"),
)
OPTIMIZER_OUTPUTS = (TensorSpec("params", "the updated parameters, the shapes of params"),)


def _optimizer_spec(data: Mapping[str, Any], name: str, path: Path, citation: Citation,
                    hparams: dict[str, HParam], where: str) -> Spec:
    for key in ("function", "vjp", "init_state", "inputs", "outputs", "state"):
        if key in data:
            raise SpecError(f"{where}: an optimizer spec has no {key!r} (use step, init, [[slots]])")
    if "lr" not in hparams:
        raise SpecError(f"{where}: an optimizer spec needs a [hparams.lr]")
    return Spec(
        name=name,
        family=_need(data, "family", str, where),
        summary=_need(data, "summary", str, where),
        path=path,
        citation=citation,
        function=_need(data, "step", str, where),
        vjp="",
        init_state=_need(data, "init", str, where),
        backward="exact",
        tolerance=str(data.get("tolerance", "elementwise")),
        properties=tuple(data.get("properties", ())),
        inputs=OPTIMIZER_INPUTS,
        state=_slots(data, where),
        outputs=OPTIMIZER_OUTPUTS,
        hparams=hparams,
        dialects={},
        kind="optimizer",
    )


def _optimizer_cases(data: Mapping[str, Any], spec: Spec, where: str) -> tuple[dict[str, Any], ...]:
    out = []
    allowed = {"name", "params", "gradients", "steps", "schedule", "tags", "hparams", "dialect"}
    for i, item in enumerate(data.get("cases", [])):
        w = f"{where} [[cases]] #{i}"
        if not isinstance(item, dict):
            raise SpecError(f"{w}: must be a table")
        extra = set(item) - allowed
        if extra:
            raise SpecError(f"{w}: unknown keys {sorted(extra)}; allowed {sorted(allowed)}")
        name = _need(item, "name", str, w)
        params = _need(item, "params", dict, w)
        if not params:
            raise SpecError(f"{w}: params must name at least one parameter")
        for key, shape in params.items():
            if not isinstance(shape, list) or not all(isinstance(d, int) and d > 0 for d in shape):
                raise SpecError(f"{w}: shape of parameter {key!r} must be a list of positive ints")
        gradients = item.get("gradients", "fixed")
        if gradients not in GRADIENT_SOURCES:
            raise SpecError(f"{w}: gradients must be one of {GRADIENT_SOURCES}, got {gradients!r}")
        steps = item.get("steps")
        if steps is not None and (not isinstance(steps, int) or steps < 1):
            raise SpecError(f"{w}: steps must be a positive int, got {steps!r}")
        dialect, hparams, overrides = _case_hparams(item, spec, w)
        out.append({"name": name, "params": {k: tuple(v) for k, v in params.items()},
                    "shapes": {k: tuple(v) for k, v in params.items()},
                    "gradients": gradients, "steps": steps,
                    "schedule": str(item.get("schedule", "constant")),
                    "tags": tuple(item.get("tags", ())),
                    "hparams": hparams, "overrides": overrides, "dialect": dialect})
    _unique_names(out, where)
    if not out:
        raise SpecError(f"{where}: an optimizer spec needs at least one [[cases]]")
    return tuple(out)


def _unsentinel(param: HParam | None, value: Any) -> Any:
    """TOML has no null: the string "None" means None for a nullable hyper-parameter."""
    return None if param is not None and param.nullable and value == NONE_SENTINEL else value


def _case_hparams(item: Mapping[str, Any], spec: Spec, w: str) -> tuple[str | None, dict[str, Any],
                                                                      dict[str, Any]]:
    """A case's ``(dialect, hparams, overrides)``.  ``hparams``: fully resolved; ``overrides``:
    what the case itself asks for (its dialect's values, then its own), so a harness can overlay
    them on a framework's conventions."""
    dialect = item.get("dialect")
    if dialect is not None and dialect not in spec.dialects:
        raise SpecError(f"{w}: unknown dialect {dialect!r}")
    raw = {k: _unsentinel(spec.hparams.get(k), v) for k, v in item.get("hparams", {}).items()}
    try:
        hparams = spec.resolve(raw, dialect=dialect)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{w}: {exc}") from None
    overrides = {**(spec.dialects[dialect]["hparams"] if dialect else {}), **{k: hparams[k] for k in raw}}
    return dialect, hparams, overrides


def _unique_names(cases: list[dict[str, Any]], where: str) -> None:
    names = [c["name"] for c in cases]
    if len(set(names)) != len(names):
        raise SpecError(f"{where}: case names repeat: {names}")


def _cases(data: Mapping[str, Any], spec: Spec, where: str) -> tuple[dict[str, Any], ...]:
    out = []
    inputs = {t.name: t for t in spec.inputs}
    for i, item in enumerate(data.get("cases", [])):
        w = f"{where} [[cases]] #{i}"
        if not isinstance(item, dict):
            raise SpecError(f"{w}: must be a table")
        extra = set(item) - {"name", "shapes", "hparams", "dialect"}
        if extra:
            raise SpecError(f"{w}: unknown keys {sorted(extra)}")
        name = _need(item, "name", str, w)
        shapes = _need(item, "shapes", dict, w)
        for key, shape in shapes.items():
            if key not in inputs:
                raise SpecError(f"{w}: shapes names unknown input {key!r}")
            if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise SpecError(f"{w}: shape of {key!r} must be a list of non-negative ints")
        missing = [t.name for t in spec.inputs if not t.optional and t.name not in shapes]
        if missing:
            raise SpecError(f"{w}: shapes must give the required inputs {missing}")
        dialect, hparams, overrides = _case_hparams(item, spec, w)
        out.append({"name": name, "shapes": {k: tuple(v) for k, v in shapes.items()},
                    "hparams": hparams, "overrides": overrides, "dialect": dialect})
    _unique_names(out, where)
    return tuple(out)


@functools.cache
def _all_specs() -> dict[str, Spec]:
    root = specs_dir()
    specs: dict[str, Spec] = {}
    for path in sorted(root.glob("*/*.toml")):
        spec = load_spec(path)
        if spec.name in specs:
            raise SpecError(f"{path}: op {spec.name!r} is also defined in {specs[spec.name].path}")
        specs[spec.name] = spec
    return specs


def _resolve_callable(ref: str, where: str) -> Callable[..., Any]:
    module_name, _, attr = ref.partition(":")
    if not attr:
        raise SpecError(f"{where}: {ref!r} must have the form 'module:callable'")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise SpecError(f"{where}: cannot import {ref!r}: {exc}") from None


# --------------------------------------------------------------------------------------------
# Bound ops
# --------------------------------------------------------------------------------------------


def _split_state_result(spec: Spec, result: Any) -> tuple[Any, dict[str, Any]]:
    if spec.state:
        outputs, new_state = result
        return outputs, dict(new_state)
    return result, {}


def _as_output_dict(spec: Spec, outputs: Any) -> dict[str, Any]:
    if len(spec.outputs) == 1:
        return {spec.outputs[0].name: outputs}
    return {t.name: v for t, v in zip(spec.outputs, outputs, strict=True)}


@dataclass(frozen=True)
class Op:
    """An op: its parsed spec bound to its reference functions."""

    spec: Spec

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def function(self) -> Callable[..., Any]:
        return _resolve_callable(self.spec.function, f"{self.spec.path} function")

    @property
    def vjp_function(self) -> Callable[..., Any]:
        return _resolve_callable(self.spec.vjp, f"{self.spec.path} vjp")

    def dialect(self, name: str) -> dict[str, Any]:
        """The full hyper-parameter dict (defaults overlaid by the dialect's values)."""
        return self.spec.resolve({}, dialect=name)

    def _arrays(
        self, inputs: Mapping[str, Any], state: Mapping[str, Any] | None, hp: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, str]]:
        spec = self.spec
        if not isinstance(inputs, Mapping):
            raise TypeError(f"{spec.name}: inputs must be a dict of arrays, got {type(inputs).__name__}")
        known_in = {t.name for t in spec.inputs}
        for key in inputs:
            if key not in known_in:
                raise TypeError(
                    f"{spec.name}: unknown input {key!r}; expected some of {sorted(known_in)}"
                )
        arrays: dict[str, Any] = {}
        promoted: dict[str, str] = {}
        for t in spec.inputs:
            if inputs.get(t.name) is None:
                if not t.optional:
                    raise ValueError(f"{spec.name}: input {t.name!r} is required ({t.shape})")
                continue
            arrays[t.name], orig = as_float64(inputs[t.name], t.name, op=spec.name)
            if orig:
                promoted[t.name] = orig
        if spec.state:
            if state is None or len(state) == 0:
                state = self.init_state(arrays, **hp)
            known_st = {t.name for t in spec.state}
            for key in state:
                if key not in known_st:
                    raise TypeError(
                        f"{spec.name}: unknown state {key!r}; expected some of {sorted(known_st)}"
                    )
            for t in spec.state:
                if state.get(t.name) is None:
                    if not t.optional:
                        raise ValueError(f"{spec.name}: state {t.name!r} is required ({t.shape})")
                    continue
                arrays[t.name], orig = as_float64(state[t.name], t.name, op=spec.name)
                if orig:
                    promoted[t.name] = orig
        elif state:
            raise TypeError(f"{spec.name}: this op has no state, got state keys {sorted(state)}")
        return arrays, promoted

    # Optimizers: the pytree API and the flat form the harness speaks ------------------------

    def init(self, params: Mapping[str, Any], **hparams: Any) -> dict[str, Any]:
        """An optimizer's initial state for ``params`` (a dict pytree)."""
        self._need_optimizer("init")
        return _resolve_callable(self.spec.init_state, f"{self.spec.path} init")(params, **hparams)

    def step(self, params: Mapping[str, Any], grads: Mapping[str, Any],
             state: Mapping[str, Any] | None = None, **hparams: Any) -> tuple[Any, dict[str, Any]]:
        """One optimizer step: ``(new_params, new_state)``; ``state=None`` starts from ``init``."""
        self._need_optimizer("step")
        if state is None:
            state = self.init(params, **hparams)
        return self.function(params, grads, state, **hparams)

    @property
    def spec_init(self) -> Callable[..., Any]:
        """An optimizer's decorated ``init`` function."""
        return _resolve_callable(self.spec.init_state, f"{self.spec.path} init")

    def _need_optimizer(self, what: str) -> None:
        if not self.spec.is_optimizer:
            raise TypeError(f"{self.name} is not an optimizer; {what}() is for optimizers")

    def flat_state(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """Pytree state -> ``{"<slot>/<path>": array, "<global slot>": array}``."""
        out: dict[str, Any] = {}
        for slot in self.spec.state:
            if slot.name not in state:
                continue
            value = state[slot.name]
            if slot.per == "param":
                out.update({f"{slot.name}/{p}": v for p, v in value.items()})
            else:
                out[slot.name] = value
        return out

    def tree_state(self, flat: Mapping[str, Any]) -> dict[str, Any]:
        """The inverse of :meth:`flat_state`."""
        out: dict[str, Any] = {}
        slots = {s.name: s for s in self.spec.state}
        for key, value in flat.items():
            name, _, path = key.partition("/")
            if name not in slots:
                raise TypeError(f"{self.name}: unknown state {key!r}; slots are {sorted(slots)}")
            if slots[name].per == "param":
                out.setdefault(name, {})[path] = value
            else:
                out[name] = value
        return out

    @staticmethod
    def split_flat(inputs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """``{"params/p": w, "grads/p": g}`` -> ``({p: w}, {p: g})``."""
        parts: dict[str, dict[str, Any]] = {"params": {}, "grads": {}}
        for key, value in inputs.items():
            kind, _, path = key.partition("/")
            if kind not in parts or not path:
                raise TypeError(f"optimizer inputs are 'params/<path>' and 'grads/<path>', got {key!r}")
            parts[kind][path] = value
        return parts["params"], parts["grads"]

    def _apply_optimizer(self, inputs: Mapping[str, Any], state: Mapping[str, Any] | None,
                         hp: dict[str, Any]) -> tuple[Outputs, dict[str, Any]]:
        params, grads = self.split_flat(inputs)
        tree = self.tree_state(state) if state else None
        new_params, new_state = self.step(params, grads, tree, **hp)
        return (Outputs({f"params/{p}": v for p, v in new_params.items()}),
                self.flat_state(new_state))

    def init_state(self, inputs: Mapping[str, Any], **hparams: Any) -> dict[str, Any]:
        """The initial state for these inputs (empty for stateless ops; flat for optimizers)."""
        if self.spec.is_optimizer:
            params, _ = self.split_flat({k: v for k, v in inputs.items() if k.startswith("params/")})
            return self.flat_state(self.init(params, **hparams))
        if not self.spec.state:
            return {}
        hp = self.spec.resolve(hparams)
        fn = _resolve_callable(self.spec.init_state, f"{self.spec.path} init_state")
        params = inspect.signature(fn).parameters
        kwargs = {k: v for k, v in {**inputs, **hp}.items() if k in params}
        return dict(fn(**kwargs))

    def apply(
        self,
        inputs: Mapping[str, Any],
        state: Mapping[str, Any] | None = None,
        **hparams: Any,
    ) -> tuple[Outputs, dict[str, Any]]:
        """Forward: ``(outputs, new_state)``, both dicts keyed by the spec's names.

        Missing hyper-parameters take the spec's defaults; ``state=None`` starts from
        ``init_state``.  ``outputs.promoted`` records inputs that were not float64.
        """
        hp = self.spec.resolve(hparams)
        if self.spec.is_optimizer:
            return self._apply_optimizer(inputs, state, hp)
        arrays, promoted = self._arrays(inputs, state, hp)
        result = self.function(**arrays, **hp)
        outputs, new_state = _split_state_result(self.spec, result)
        return Outputs(_as_output_dict(self.spec, outputs), promoted=promoted), new_state

    def vjp(
        self,
        inputs: Mapping[str, Any],
        state: Mapping[str, Any] | None,
        cotangents: Mapping[str, Any],
        **hparams: Any,
    ) -> dict[str, Any]:
        """Gradient of ``<cotangents, outputs>`` w.r.t. each differentiable input given.

        Outputs absent from ``cotangents`` get a zero cotangent.
        """
        spec = self.spec
        if spec.is_optimizer or not spec.differentiable:
            raise TypeError(f"{spec.name} has no VJP: it has no differentiable input")
        hp = spec.resolve(hparams)
        arrays, _ = self._arrays(inputs, state, hp)
        names = {t.name for t in spec.outputs}
        if not isinstance(cotangents, Mapping):
            raise TypeError(f"{spec.name}: cotangents must be a dict output -> array, "
                            f"got {type(cotangents).__name__}")
        for key in cotangents:
            if key not in names:
                raise TypeError(f"{spec.name}: unknown cotangent {key!r}; outputs are {sorted(names)}")
        if all(v is None for v in cotangents.values()):
            raise ValueError(f"{spec.name}: vjp needs the cotangent of at least one output "
                             f"({', '.join(sorted(names))}), got {dict(cotangents) or 'none'}")
        cts = {}
        for t in spec.outputs:
            if cotangents.get(t.name) is not None:
                cts["d" + t.name], _ = as_float64(cotangents[t.name], "d" + t.name, op=spec.name)
            else:
                cts["d" + t.name] = None
        return dict(self.vjp_function(**cts, **arrays, **hp))


def ops(family: str | None = None) -> list[str]:
    """Names of the registered ops (of one ``family``: "normalizers", "optimizers"), sorted."""
    specs = _all_specs()
    if family is not None:
        families = sorted({s.family for s in specs.values()})
        if family not in families:
            raise ValueError(f"unknown family {family!r}; known: {', '.join(families)}")
    return sorted(n for n, s in specs.items() if family is None or s.family == family)


def get(name: str) -> Op:
    """The bound op called ``name``; ``KeyError`` naming the known ops if there is none."""
    specs = _all_specs()
    if name not in specs:
        raise KeyError(f"unknown op {name!r}; known ops: {', '.join(sorted(specs))}")
    return Op(specs[name])


# --------------------------------------------------------------------------------------------
# Decorators for the human API
# --------------------------------------------------------------------------------------------


def _bind(op_name: str, sig: inspect.Signature, kw_only: list[str], args: tuple[Any, ...],
          kwargs: dict[str, Any]) -> tuple[inspect.BoundArguments, dict[str, Any]]:
    """The call's arguments, and its keyword hyper-parameters validated by the op's spec."""
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(f"{op_name}: {exc}") from None
    spec = _all_specs()[op_name]
    return bound, spec.resolve({k: bound.arguments[k] for k in kw_only if k in bound.arguments})


def _wrap(op_name: str, kind: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn)
        kw_only = [p.name for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound, hp = _bind(op_name, sig, kw_only, args, kwargs)
            arrays = {}
            for key, value in bound.arguments.items():
                if key in hp:
                    continue
                if value is None:
                    arrays[key] = None
                elif is_array(value) or isinstance(value, (list, tuple, float, int)):
                    arrays[key], _ = as_float64(value, key, op=op_name)
                else:
                    raise TypeError(
                        f"{op_name}: {key} must be an array, got {type(value).__name__}"
                    )
            return fn(**arrays, **hp)

        wrapper.__normref_op__ = (op_name, kind)  # type: ignore[attr-defined]
        return wrapper

    return decorate


def oracle_optimizer(op_name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate an optimizer's ``init(params, *, hp)`` or ``step(params, grads, state, *, hp)``.

    Validates the keyword hyper-parameters against the spec, accepts nested dict pytrees
    (flattened with ``/``; results come back in the structure given), and promotes every leaf of
    params, grads and the state's per-parameter slots to float64.  Parameter and gradient paths
    and shapes must agree.  The raw function (no promotion) is ``__wrapped__``.
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn)
        kw_only = [p.name for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            from reference.optimizers._tree import flatten, unflatten

            bound, hp = _bind(op_name, sig, kw_only, args, kwargs)
            spec = _all_specs()[op_name]
            given = bound.arguments["params"]
            if not isinstance(given, Mapping) or not given:
                raise TypeError(f"{op_name}: params must be a non-empty dict of arrays, "
                                f"got {type(given).__name__}")
            nested = any(isinstance(v, Mapping) for v in given.values())
            params = _promote_tree(op_name, "params", flatten(given))
            call = {"params": params}
            if "grads" in bound.arguments:
                grads_in = bound.arguments["grads"]
                if not isinstance(grads_in, Mapping):
                    raise TypeError(f"{op_name}: grads must be a dict of arrays, got "
                                    f"{type(grads_in).__name__}")
                grads = _promote_tree(op_name, "grads", flatten(grads_in))
                if set(grads) != set(params):
                    raise ValueError(f"{op_name}: grads must have the parameters' paths "
                                     f"{sorted(params)}, got {sorted(grads)}")
                for path, g in grads.items():
                    if tuple(g.shape) != tuple(params[path].shape):
                        raise ValueError(f"{op_name}: grads[{path!r}] must have shape "
                                         f"{tuple(params[path].shape)}, got {tuple(g.shape)}")
                call["grads"] = grads
            if "state" in bound.arguments:
                call["state"] = _promote_state(spec, bound.arguments["state"], params)
            result = fn(**call, **hp)
            if not nested:
                return result
            if isinstance(result, tuple):
                new_params, new_state = result
                return unflatten(new_params), _nest_state(spec, new_state)
            return _nest_state(spec, result)

        wrapper.__normref_op__ = (op_name, "optimizer")  # type: ignore[attr-defined]
        return wrapper

    return decorate


def _promote_tree(op: str, name: str, tree: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for path, value in tree.items():
        if value is None:
            raise TypeError(f"{op}: {name}[{path!r}] is None")
        out[path], _ = as_float64(value, f"{name}[{path!r}]", op=op)
    return out


def _promote_state(spec: Spec, state: Any, params: Mapping[str, Any]) -> dict[str, Any]:
    from reference.optimizers._tree import flatten

    if not isinstance(state, Mapping):
        raise TypeError(f"{spec.name}: state must be a dict (from init), got {type(state).__name__}")
    slots = {s.name: s for s in spec.state}
    out: dict[str, Any] = {}
    for key, value in state.items():
        if key not in slots:
            raise TypeError(f"{spec.name}: unknown state slot {key!r}; slots are {sorted(slots)}")
        if slots[key].per == "param":
            if not isinstance(value, Mapping):
                raise TypeError(f"{spec.name}: state[{key!r}] must be a dict per parameter")
            flat = _promote_tree(spec.name, f"state[{key!r}]", flatten(value))
            if set(flat) != set(params):
                raise ValueError(f"{spec.name}: state[{key!r}] must have the parameters' paths "
                                 f"{sorted(params)}, got {sorted(flat)}")
            out[key] = flat
        else:
            out[key], _ = as_float64(value, f"state[{key!r}]", op=spec.name)
    return out


def _nest_state(spec: Spec, state: Mapping[str, Any]) -> dict[str, Any]:
    from reference.optimizers._tree import unflatten

    per = {s.name for s in spec.state if s.per == "param"}
    return {k: (unflatten(v) if k in per else v) for k, v in state.items()}


def oracle_function(op_name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a human-API forward: validate hyper-parameters by the spec, promote arrays."""
    return _wrap(op_name, "function")


def oracle_vjp(op_name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a hand-written VJP the same way."""
    return _wrap(op_name, "vjp")
