"""timm's layer modules without ``import timm``: what the torch adapter maps to timm's layers.

``import timm`` (and ``import timm.layers``) executes ``timm/__init__.py``, which imports
``timm.models`` and, through ``timm/layers/norm_act.py``, ``torchvision.ops.misc``: without a
torchvision that matches the installed torch it fails (PyPI's torchvision 0.28.0 beside the CPU
build of torch 2.13.0 raises ``RuntimeError: operator torchvision::nms does not exist`` on import;
the matching CPU wheel comes only from PyTorch's own index).  The layers the adapter needs
(``evo_norm.py``, ``split_batchnorm.py``, ``std_conv.py``) import only torch and a few sibling
modules of ``timm/layers/`` (``create_act``, ``activations*``, ``config``, ``typing``,
``trace_utils``, ``_fx``, ``padding``, ``helpers``), and torchvision only inside a ``try``.

So this module loads them from the installed files without running either ``__init__.py``:
it registers two empty package objects under a private name, ``_normref_timm`` and
``_normref_timm.layers``, whose ``__path__`` are the installed ``timm/`` and ``timm/layers/``
directories (found by ``importlib.util.find_spec("timm")``, which locates the package without
executing it), then imports ``_normref_timm.layers.<module>`` normally: its relative imports
(``from .create_act import ...``) resolve to the sibling files.  The code that runs is timm's own,
file for file; only the package name differs, so a real ``import timm`` elsewhere in the process
(where torchvision works) is neither shadowed nor changed.  timm is installed without its
dependencies: ``pip install --no-deps timm==1.0.31`` (its other requirements, torchvision,
huggingface_hub, safetensors and pyyaml, are not needed by these layers).

Without timm, :func:`layers` raises :class:`~conformance.adapters.Unsupported` with one line
naming the install command, so the mappings that need timm are SKIP with that reason.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import types
from importlib import metadata
from pathlib import Path

from conformance.adapters import Unsupported

__all__ = ["INSTALL", "PACKAGE", "available", "layers", "version"]

#: The private package name the layer modules are loaded under (never ``timm`` itself).
PACKAGE = "_normref_timm"
#: How to install timm for these mappings (the version the mappings were checked with).
INSTALL = "pip install --no-deps timm==1.0.31"


@functools.cache
def _timm_dir() -> Path | None:
    """The installed ``timm/`` package directory, or None (located, not imported)."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _package(name: str, path: Path) -> types.ModuleType:
    """An empty package object for ``name`` whose submodules are the files under ``path``."""
    if name in sys.modules:
        return sys.modules[name]
    module = types.ModuleType(name, f"timm's {path.name}/ directory, without its __init__.py")
    module.__path__ = [str(path)]
    module.__package__ = name
    module.__file__ = None
    sys.modules[name] = module
    return module


@functools.cache
def layers(module: str) -> types.ModuleType:
    """``timm/layers/<module>.py`` loaded as ``_normref_timm.layers.<module>``; Unsupported (one
    line) when timm is not installed or the module cannot be imported."""
    root = _timm_dir()
    if root is None:
        raise Unsupported(f"timm is not installed ({INSTALL})")
    if not (root / "layers" / f"{module}.py").is_file():
        raise Unsupported(f"timm {version()} has no timm/layers/{module}.py")
    _package(PACKAGE, root)
    _package(f"{PACKAGE}.layers", root / "layers")
    try:
        return importlib.import_module(f"{PACKAGE}.layers.{module}")
    except Exception as exc:  # a broken sibling import: say which, in one line
        raise Unsupported(f"timm/layers/{module}.py does not import: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}") from None


def available() -> bool:
    """Whether timm's layer modules can be loaded here."""
    try:
        layers("split_batchnorm")
    except Unsupported:
        return False
    return True


def version() -> str:
    """The installed timm's version (from its distribution metadata), or ``"absent"``."""
    try:
        return metadata.version("timm")
    except metadata.PackageNotFoundError:
        return "absent"
