"""The oracle's side of a case, computed once per process.

What the oracle computes for a case (its quantities, sensitivities and bounds; an optimizer's
whole float64 trajectory with its accumulated bounds) reads only the case's rounded values, the
hyper-parameters, the dtype and the seed, never the adapter.  Every adapter asked for the same
case (a run over several adapters, a mutant catalogue against its control, a diagnosis looking at
the declared hyper-parameters again) gets the same values, so they are kept, keyed by a digest of
everything the computation reads.  Values that cannot be digested faithfully (a callable mask) are
not kept.  Estimates are kept up to a number and a size in bytes (a realistic-size case's estimate
is about 100 MB: recomputing it costs about a second, holding every one would cost gigabytes).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np

__all__ = ["Replay", "clear", "digest", "estimate", "trajectory"]

T = TypeVar("T")
#: Entries of each kind kept (least recently used dropped first).
ESTIMATES, TRAJECTORIES = 256, 64
#: Bytes of arrays the kept estimates may hold together (least recently used dropped first).
ESTIMATE_BYTES = 1 << 30

_estimates: OrderedDict[str, Any] = OrderedDict()
_trajectories: OrderedDict[str, Replay] = OrderedDict()
#: Bytes held by each kept estimate (counted once, when it is kept).
_sizes: dict[str, int] = {}


def digest(*parts: Any) -> str | None:
    """A digest of arrays (dtype, shape and bytes), dicts, sequences and scalars; None when a part
    cannot be digested faithfully (a callable)."""
    h = hashlib.blake2b(digest_size=20)

    def feed(x: Any) -> bool:
        if isinstance(x, np.ndarray) or np.isscalar(x) and isinstance(x, np.generic):
            a = np.ascontiguousarray(x)
            h.update(f"a{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
            return True
        if isinstance(x, dict):
            h.update(b"{")
            return all(feed(k) and feed(x[k]) for k in sorted(x, key=repr))
        if isinstance(x, (list, tuple)):
            h.update(f"[{len(x)}".encode())
            return all(feed(v) for v in x)
        if x is None or isinstance(x, (str, int, float, bool)):
            h.update(repr((type(x).__name__, x)).encode())
            return True
        return False  # callables and other objects: no faithful digest

    return h.hexdigest() if all(feed(p) for p in parts) else None


def clear() -> None:
    """Forget everything kept (e.g. after replacing a function the kept values were computed with)."""
    _estimates.clear()
    _trajectories.clear()
    _sizes.clear()


def nbytes(value: Any) -> int:
    """Bytes of the arrays in a value (arrays, dicts, sequences and dataclasses of them)."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(nbytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    return 0


def _remember(store: OrderedDict[str, Any], key: str, value: Any, limit: int,
              max_bytes: int | None = None, size: int = 0) -> Any:
    store[key] = value
    store.move_to_end(key)
    if max_bytes is not None:
        _sizes[key] = size
    while len(store) > limit or (max_bytes is not None and len(store) > 1
                                 and sum(_sizes.get(k, 0) for k in store) > max_bytes):
        dropped, _ = store.popitem(last=False)
        _sizes.pop(dropped, None)
    return value


def estimate(key: str | None, compute: Callable[[], T]) -> T:
    """``compute()``, kept under ``key`` (computed every time when the key is None)."""
    if key is None:
        return compute()
    if key in _estimates:
        _estimates.move_to_end(key)
        return _estimates[key]
    value = compute()
    size = nbytes(value)
    if size > ESTIMATE_BYTES:
        return value
    return _remember(_estimates, key, value, ESTIMATES, ESTIMATE_BYTES, size)


class Replay:
    """A generator's items, recorded as they are first produced and replayed to later readers; an
    exception it raised is raised again to every reader that reaches it."""

    def __init__(self, items: Iterator[Any]) -> None:
        self._source, self._items = items, []
        self._error: BaseException | None = None
        self._done = False

    def __iter__(self) -> Iterator[Any]:
        i = 0
        while True:
            if i < len(self._items):
                yield self._items[i]
                i += 1
                continue
            if self._error is not None:
                raise self._error
            if self._done:
                return
            try:
                self._items.append(next(self._source))
            except StopIteration:
                self._done = True
            except Exception as exc:  # noqa: BLE001 - e.g. the oracle rejects the case: every reader sees it
                self._error = exc


def trajectory(key: str | None, start: Callable[[], Iterator[T]]) -> Iterator[T]:
    """The oracle's trajectory ``start()`` produces, replayed when the same ``key`` was seen."""
    if key is None:
        return start()
    if key not in _trajectories:
        _remember(_trajectories, key, Replay(start()), TRAJECTORIES)
    else:
        _trajectories.move_to_end(key)
    return iter(_trajectories[key])
