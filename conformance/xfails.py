"""Expected-failure files: which case ids are known to fail, and why.

A file is TOML with one kind of table, ``[[xfail]]``, each holding ``id`` (a regular expression
searched in case ids ``ADAPTER:OP:DTYPE:CASE:SEED``) and ``reason`` (the diagnosis, required).
Anything else in the file is an error naming the file (and, for TOML syntax, the line): an
unknown table or key, a missing reason, a regex that does not compile.

An entry is *stale* when it can match no case the adapter could run under the run's profile and
seed: no op the adapter implements, in a dtype it declares, has a case whose id it matches.
Entries that merely concern ops or dtypes outside the run's selection are not stale.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["XfailError", "Xfails", "load"]


class XfailError(ValueError):
    """A malformed expected-failures file; the message names the file."""


@dataclass(frozen=True)
class Entry:
    pattern: str
    reason: str
    regex: re.Pattern[str]


class Xfails:
    """The entries of one file (or none)."""

    def __init__(self, entries: Iterable[Entry] = (), path: str = "") -> None:
        self.entries = list(entries)
        self.path = path

    def __bool__(self) -> bool:
        return bool(self.entries)

    def reason(self, case_id: str) -> str | None:
        """The reason of the first entry matching ``case_id`` (None: not expected to fail)."""
        for entry in self.entries:
            if entry.regex.search(case_id):
                return entry.reason
        return None

    def stale(self, possible_ids: Iterable[str]) -> list[str]:
        """Patterns that match none of ``possible_ids`` (every case id the adapter could run)."""
        ids = list(possible_ids)
        return [e.pattern for e in self.entries if not any(e.regex.search(i) for i in ids)]

    @classmethod
    def from_dict(cls, patterns: dict[str, str]) -> Xfails:
        """Entries from ``{pattern: reason}`` (the Python API)."""
        return cls(_entry("<dict>", k, v, i) for i, (k, v) in enumerate(patterns.items()))


def _entry(path: str, pattern: object, reason: object, index: int) -> Entry:
    where = f"{path}: [[xfail]] #{index + 1}"
    if not isinstance(pattern, str) or not pattern:
        raise XfailError(f"{where}: 'id' must be a non-empty string (a regex over case ids), got {pattern!r}")
    if not isinstance(reason, str) or not reason.strip():
        raise XfailError(f"{where} ({pattern!r}): 'reason' must say why the case is expected to fail")
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise XfailError(f"{where}: 'id' {pattern!r} is not a valid regex: {exc}") from None
    return Entry(pattern, reason.strip(), regex)


def load(path: str | None) -> Xfails:
    """Read and validate an expected-failures file (``None``: no entries)."""
    if not path:
        return Xfails()
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise XfailError(f"cannot read the xfails file {path!r}: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise XfailError(f"{path}: not valid TOML: {exc}") from None
    unknown = sorted(set(data) - {"xfail"})
    if unknown:
        raise XfailError(f"{path}: unknown table or key {unknown[0]!r}; the file holds only [[xfail]] tables")
    items = data.get("xfail", [])
    if not isinstance(items, list):
        raise XfailError(f"{path}: 'xfail' must be an array of tables ([[xfail]]), not a single table")
    entries = []
    for index, item in enumerate(items):
        extra = sorted(set(item) - {"id", "reason"})
        if extra:
            raise XfailError(f"{path}: [[xfail]] #{index + 1}: unknown key {extra[0]!r} "
                             "(expected id, reason)")
        entries.append(_entry(path, item.get("id"), item.get("reason"), index))
    return Xfails(entries, path)
