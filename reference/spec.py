"""Op specs: the schema of ``specs/<family>/<name>.toml`` and its validating loader.

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
``backward``      ``exact`` (the true gradient: checked against finite differences) | ``custom``
                  (the paper defines a backward that is not the true gradient, e.g. spectral
                  norm's u, v held constant) | ``surrogate`` (a straight-through estimator) |
                  ``none`` (no input is differentiable: a schedule of the step count, a metric;
                  the spec has no ``vjp``, and every other kind needs one and a differentiable
                  input)
``properties``    names of the invariants the property tests check (each the name of a test:
                  tests/test_registry.py)
``backward_properties``  (``custom`` and ``surrogate`` backwards, required there and only
                  there) the properties, among ``properties``, that pin the declared backward
                  down: they replace the finite-difference check, which holds only for the true
                  gradient (tests/test_all_ops.py)
``[citation]``    ``title``, ``arxiv``, ``equations``, ``code`` (official code path), ``notes``
``[[inputs]]`` / ``[[state]]`` / ``[[outputs]]``: ``name``, ``shape`` (a rule in words),
                  ``differentiable`` (inputs), ``optional``, ``doc``, ``updated_in`` (state:
                  ``forward``, the default, or ``backward``: the VJP reads and updates the slot and
                  returns ``(grads, new_backward_state)``; the harness compares it like forward
                  state, step after step), ``exact`` (inputs and
                  state: integer-valued, a step or batch count: read exactly, never perturbed),
                  ``scaled_by`` (outputs: the name of another output this one is multiplied or
                  divided by, whose own rounding error it inherits relatively, e.g. spectral
                  norm's ``w = W / sigma``: conformance/tolerance.py), ``domain`` (inputs: the
                  values generated cases draw, one of ``DOMAINS``: ``normal`` N(0, 1), the
                  default; ``around_one`` 1 + N(0, 1)/2 for gains, so no channel is switched off;
                  ``steps`` 0, 1, 2, ... for step counts; ``uniform`` U[0, 1) (probabilities,
                  random draws); ``on_edges`` values in [0, 1] of which half lie exactly on the
                  edges k/``upper`` and a quarter repeat another value (ties), for binned
                  metrics; ``index`` for int64 inputs, uniform in
                  [0, ``upper``); ``mask`` for bool inputs, each element True with probability
                  1/2), ``dtype`` (inputs: ``float64``, the default, or ``int64`` / ``bool`` for
                  labels, indices and masks: passed to the oracle and to adapters unchanged,
                  never rounded to the dtype under test, perturbed or differentiated), ``upper``
                  (int64 inputs: an int, or the name of an int hyper-parameter)
``[hparams.<name>]``  ``type`` (float|int|bool|str|axes), ``default``, optional ``allowed``,
                  ``min``/``max`` (inclusive) or ``gt``/``lt`` (exclusive), ``nullable``, ``doc``.
                  TOML has no null: the string ``"None"`` stands for Python ``None`` where
                  ``nullable = true``.
``[dialects.<framework>]``  ``api`` (the framework call), ``source`` (file it was read from),
                  ``notes``, and ``hparams`` = the values that reproduce that framework.
``draws``         (inputs) ``true`` for random draws the op consumes (U[0, 1) variates, domain
                  ``uniform``): sampling methods take their randomness as an input, so the oracle
                  is deterministic and an adapter that takes draws (``OpSupport.takes_draws``) is
                  given the same ones; one that samples its own is called many times without them
                  and its outputs' means are tested against ``expectation``
                  (conformance/distributional.py)
``expectation``   (ops with ``draws`` inputs, required there) ``"module:callable"``, ``(inputs
                  without the draws, hparams) -> {output: (mean, low, high)}``: each output's
                  expectation over the draws and a range holding it almost surely
``discontinuities``  (ops with jumps: a binned metric) ``"module:callable"``, ``(inputs and state,
                  hparams, rel) -> {input: bool mask}``: which input values lie within relative distance
                  ``rel`` of a jump (a bin edge).  The error model's probes leave them still (a
                  move across would read the jump, not the slope), and where the dtype's rounding
                  can move a value across, a differing result is MISTRUSTED, not FAIL
                  (conformance/judge.py).
``[[error_cases]]``  bad arguments and the error they raise, run by tests/test_error_cases.py:
                  ``name``; ``call`` (``apply`` or ``vjp``; ``step`` for optimizers); the
                  arguments: ``shapes`` (input -> shape, values drawn from the input's domain),
                  ``values`` (input -> explicit values), ``dtypes`` (input -> the dtype it is
                  given in), ``state`` (slot -> shape, ones), ``cotangents`` (output -> shape),
                  for optimizers ``params``/``grads`` (path -> shape); ``hparams`` (passed as
                  given, unvalidated); ``error`` (``ValueError`` | ``TypeError``) and ``match`` (a
                  regular expression the message must match)
``[[cases]]``     seeded default cases: ``name``, ``shapes`` (input name -> list of ints),
                  optional ``domains`` (input name -> a domain of its dtype, replacing the
                  input's own for this case: a binned metric's ``on_edges`` case),
                  optional ``hparams`` (overrides) and ``dialect``.  The harness and the generic
                  tests draw standard-normal values for these shapes (conformance/cases.py).

Stream specs (``kind = "stream"``: an estimator over a sequence of batches, e.g. a gradient-noise-
scale estimate or an EMA of anything) have the keys of an op spec, ``[[state]]`` and ``backward =
"none"``.  Each call consumes one batch (its inputs) and the state, and returns its estimates and
the new state; the harness runs T calls as a free trajectory (conformance/trajectory.py): a fresh
batch per step drawn from the inputs' domains, the adapter's own state carried, outputs and state
compared at every step against an accumulated bound.

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

Public entry points: :func:`load_spec` (one file), :func:`all_specs` (every spec under
:func:`specs_dir`, loaded once).  Binding a spec to its functions is :mod:`reference.registry`.

This module holds the :class:`Spec` and reads its top-level keys; the rest of the loader is split
by table, and every name defined here before that split stays importable from here:
reference/spec_schema.py (the allowed values of the enumerated keys, :class:`SpecError`, the TOML
table readers), reference/spec_tensors.py (``[[inputs]]``/``[[state]]``/``[[outputs]]``/
``[[slots]]`` as :class:`TensorSpec`, ``[hparams.<name>]`` as :class:`HParam`) and
reference/spec_cases.py (``[[cases]]`` and ``[[error_cases]]``).
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reference.spec_cases import error_cases, op_cases, optimizer_cases
from reference.spec_schema import (
    BACKWARD_KINDS,
    BOUNDED_DOMAINS,
    DOMAINS,
    DOMAINS_OF,
    GRADIENT_SOURCES,
    HPARAM_TYPES,
    KINDS,
    NONE_SENTINEL,
    TOP_KEYS,
    SpecError,
    need,
    table,
    tables,
)
from reference.spec_tensors import HParam, TensorSpec, read_hparam, read_slots, read_tensors, unsentinel

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# The names defined in spec_schema.py and spec_tensors.py are re-exported: they were defined here
# before the split, and `from reference.spec import X` keeps working for every one of them.
__all__ = [
    "BACKWARD_KINDS",
    "BOUNDED_DOMAINS",
    "DOMAINS",
    "DOMAINS_OF",
    "GRADIENT_SOURCES",
    "HPARAM_TYPES",
    "KINDS",
    "NONE_SENTINEL",
    "OPTIMIZER_INPUTS",
    "OPTIMIZER_OUTPUTS",
    "TOP_KEYS",
    "Citation",
    "HParam",
    "Spec",
    "SpecError",
    "TensorSpec",
    "all_specs",
    "load_spec",
    "need",
    "specs_dir",
    "specs_dirs",
    "table",
    "tables",
    "unsentinel",
]


def specs_dir() -> Path:
    """The first folder of :func:`specs_dirs`."""
    return specs_dirs()[0]


def specs_dirs() -> list[Path]:
    """The folders holding the specs: ``$NORMREF_SPECS`` (several joined by ``os.pathsep``: a
    project's own ops beside normref's) or ``specs/`` next to the package."""
    env = os.environ.get("NORMREF_SPECS")
    if env:
        return [Path(p) for p in env.split(os.pathsep) if p]
    return [Path(__file__).resolve().parent.parent / "specs"]


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
    properties: tuple[str, ...]
    inputs: tuple[TensorSpec, ...]
    state: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    hparams: dict[str, HParam]
    dialects: dict[str, dict[str, Any]] = field(default_factory=dict)
    cases: tuple[dict[str, Any], ...] = ()
    kind: str = "op"
    #: custom / surrogate backwards: the properties that replace the finite-difference check
    backward_properties: tuple[str, ...] = ()
    #: ``module:function`` marking the inputs within a relative distance of a jump of the op (a
    #: bin edge): never probed; a case with such values is MISTRUSTED where it differs
    discontinuities: str = ""
    #: ``module:function`` giving each output's expectation over the random draws and an
    #: almost-sure range, ``(inputs without the draws, hparams) -> {output: (mean, low, high)}``
    #: (ops with ``draws`` inputs: the distributional check of conformance/distributional.py)
    expectation: str = ""
    #: bad inputs and the error they must raise (tests/test_error_cases.py runs every one)
    error_cases: tuple[dict[str, Any], ...] = ()
    #: resolve()'s validated results, keyed by the call (the harness resolves the same few
    #: hyper-parameter sets hundreds of thousands of times per run)
    _resolved: dict[Any, dict[str, Any]] = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_optimizer(self) -> bool:
        return self.kind == "optimizer"

    @property
    def is_trajectory(self) -> bool:
        """Run as a free trajectory over T steps (optimizers and streams: conformance/trajectory.py)."""
        return self.kind in ("optimizer", "stream")

    @property
    def backward_state(self) -> tuple[str, ...]:
        """The state slots the VJP updates (``updated_in = "backward"``): its function then returns
        ``(grads, new_backward_state)``."""
        return tuple(t.name for t in self.state if t.updated_in == "backward")

    @property
    def differentiable(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs if t.differentiable)

    @property
    def draws(self) -> tuple[str, ...]:
        """The inputs that are random draws (``draws = true``)."""
        return tuple(t.name for t in self.inputs if t.draws)

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

def load_spec(path: str | os.PathLike[str]) -> Spec:
    """Parse and validate one spec file."""
    path = Path(path)
    where = str(path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{where}: not valid TOML: {exc}") from None
    name = need(data, "name", str, where)
    if name != path.stem:
        raise SpecError(f"{where}: name {name!r} must equal the file name {path.stem!r}")
    cit = need(data, "citation", dict, where)
    citation = Citation(
        title=need(cit, "title", str, f"{where} [citation]"),
        arxiv=str(cit.get("arxiv", "")),
        equations=need(cit, "equations", str, f"{where} [citation]"),
        code=need(cit, "code", str, f"{where} [citation]"),
        notes=str(cit.get("notes", "")),
    )
    kind = data.get("kind", "op")
    if kind not in KINDS:
        raise SpecError(f"{where}: kind must be one of {KINDS}, got {kind!r}")
    table(data, where, TOP_KEYS[kind])
    hparams_raw = data.get("hparams", {})
    if not isinstance(hparams_raw, dict):
        raise SpecError(f"{where}: [hparams] must be a table")
    hparams = {k: read_hparam(k, v, where) for k, v in hparams_raw.items()}
    if kind == "optimizer":
        spec = _optimizer_spec(data, name, path, citation, hparams, where)
    else:
        spec = _op_spec(data, name, path, citation, hparams, where, kind)
    if not spec.inputs or not spec.outputs:
        raise SpecError(f"{where}: needs at least one [[inputs]] and one [[outputs]]")
    if spec.state and not spec.init_state:
        raise SpecError(f"{where}: has [[state]] but no 'init_state'")
    for d_name, dialect_table in data.get("dialects", {}).items():
        w = f"{where} [dialects.{d_name}]"
        table(dialect_table, w)
        raw = need(dialect_table, "hparams", dict, w)
        values = {}
        for key, value in raw.items():
            if key not in hparams:
                raise SpecError(f"{w}: unknown hyper-parameter {key!r}")
            value = unsentinel(hparams[key], value)
            try:
                values[key] = hparams[key].check(name, value)
            except (TypeError, ValueError) as exc:
                raise SpecError(f"{w}: {exc}") from None
        spec.dialects[d_name] = {
            "api": str(dialect_table.get("api", "")),
            "source": str(dialect_table.get("source", "")),
            "notes": str(dialect_table.get("notes", "")),
            "hparams": values,
        }
    cases = optimizer_cases(data, spec, where) if kind == "optimizer" else op_cases(data, spec, where)
    return Spec(**{**spec.__dict__, "cases": cases, "error_cases": error_cases(data, spec, where)})


def _op_spec(data: Mapping[str, Any], name: str, path: Path, citation: Citation,
             hparams: dict[str, HParam], where: str, kind: str = "op") -> Spec:
    backward = need(data, "backward", str, where)
    if backward not in BACKWARD_KINDS:
        raise SpecError(f"{where}: backward must be one of {BACKWARD_KINDS}, got {backward!r}")
    if kind == "stream" and (backward != "none" or "state" not in data):
        raise SpecError(f"{where}: a stream op carries [[state]] from batch to batch and has backward = "
                        f"'none' (its trajectory compares forward quantities), got backward = "
                        f"{backward!r}{'' if 'state' in data else ' and no [[state]]'}")
    inputs = read_tensors(data, "inputs", where)
    for t in inputs:
        if t.upper != "" and not (
                (isinstance(t.upper, int) and t.upper >= 1)
                or (isinstance(t.upper, str) and t.upper in hparams and hparams[t.upper].type == "int")):
            raise SpecError(f"{where} [[inputs]] {t.name!r}: upper must be an int >= 1 or the name of an "
                            f"int hyper-parameter, got {t.upper!r}")
    differentiable = [t.name for t in inputs if t.differentiable]
    if backward == "none" and ("vjp" in data or differentiable):
        raise SpecError(f"{where}: backward = 'none' has no 'vjp' and no differentiable input, got "
                        f"{'a vjp' if 'vjp' in data else 'differentiable ' + ', '.join(differentiable)}")
    if backward != "none" and not differentiable:
        raise SpecError(f"{where}: backward = {backward!r} needs a differentiable input (no input is "
                        "differentiable: backward = 'none')")
    properties = tuple(data.get("properties", ()))
    backward_properties = tuple(data.get("backward_properties", ()))
    if (backward in ("custom", "surrogate")) != bool(backward_properties):
        raise SpecError(f"{where}: backward_properties (the properties that pin a custom or surrogate "
                        f"backward down, replacing the finite-difference check) are required for "
                        f"backward = 'custom' / 'surrogate' and only there; backward is {backward!r}")
    unknown = [p for p in backward_properties if p not in properties]
    if unknown:
        raise SpecError(f"{where}: backward_properties must be among properties, got {unknown}")
    if any(t.draws for t in inputs) != ("expectation" in data):
        raise SpecError(f"{where}: an op with random-draw inputs (draws = true) names its 'expectation' "
                        "(the outputs' mean and range over the draws), and only such an op")
    state = read_tensors(data, "state", where)
    if backward == "none" and any(t.updated_in == "backward" for t in state):
        raise SpecError(f"{where}: state updated_in = 'backward' needs a backward pass (backward is 'none')")
    return Spec(
        **_common(data, name, path, citation, hparams, where),
        function=need(data, "function", str, where),
        vjp="" if backward == "none" else need(data, "vjp", str, where),
        init_state=data.get("init_state"),
        backward=backward,
        backward_properties=backward_properties,
        discontinuities=str(data.get("discontinuities", "")),
        expectation=str(data.get("expectation", "")),
        inputs=inputs,
        state=state,
        outputs=read_tensors(data, "outputs", where),
        kind=kind,
    )


def _common(data: Mapping[str, Any], name: str, path: Path, citation: Citation, hparams: dict[str, HParam],
            where: str) -> dict[str, Any]:
    """The fields every kind of spec fills the same way."""
    return {"name": name, "family": need(data, "family", str, where),
            "summary": need(data, "summary", str, where), "path": path, "citation": citation,
            "properties": tuple(data.get("properties", ())), "hparams": hparams, "dialects": {}}


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
        **_common(data, name, path, citation, hparams, where),
        function=need(data, "step", str, where),
        vjp="",
        init_state=need(data, "init", str, where),
        backward="exact",
        inputs=OPTIMIZER_INPUTS,
        state=read_slots(data, where),
        outputs=OPTIMIZER_OUTPUTS,
        kind="optimizer",
    )


@functools.cache
def all_specs() -> dict[str, Spec]:
    """Every spec under :func:`specs_dirs`, by op name (loaded once per process)."""
    specs: dict[str, Spec] = {}
    for path in [p for root in specs_dirs() for p in sorted(root.glob("*/*.toml"))]:
        spec = load_spec(path)
        if spec.name in specs:
            raise SpecError(f"{path}: op {spec.name!r} is also defined in {specs[spec.name].path}")
        specs[spec.name] = spec
    return specs
