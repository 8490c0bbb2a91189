"""The regular expressions of the configuration, matched in time linear in the text.

Python's `re` backtracks: `protect: [{tag: '(a+)+'}]` against a valid 42-character tag runs
for hours, holding the interpreter lock, so /metrics stops answering too. These patterns come
from a file an operator (or a merge request) writes and run against names CI makes up, so
they go to RE2, which never backtracks and refuses what would need it (backreferences,
lookaround). Its syntax is otherwise Python's for everything a tag pattern needs, named
groups `(?P<n>...)` included (docs/configuration.md, Patterns).

Docker names are ASCII, so matching runs on bytes: the binding's str path maps every offset
back to characters, three times slower, for nothing here. Groups are given back as str.
"""

from __future__ import annotations

from typing import Any

import re2

_OPTIONS = re2.Options()
# A refused pattern is a config error gcd reports itself, with file and line: the library
# would also write its own line to stderr.
_OPTIONS.log_errors = False


class PatternError(ValueError):
    """A pattern RE2 refuses; the message is RE2's own ("invalid perl operator: (?=")."""


class Match:
    """The groups of one successful match, as str."""

    __slots__ = ("_groupindex", "_match")

    def __init__(self, match: Any, groupindex: dict[str, int]) -> None:
        self._match = match
        self._groupindex = groupindex

    def group(self, *groups: int | str) -> Any:
        """As re.Match.group: one group gives str or None, several give a tuple."""
        index = self._groupindex
        # A bytes pattern names its groups in bytes: ask by number.
        found = self._match.group(*(index[g] if isinstance(g, str) else g for g in groups or (0,)))
        if len(groups) > 1:
            return tuple(None if g is None else g.decode() for g in found)
        return None if found is None else found.decode()


class Pattern:
    """A compiled pattern: `fullmatch`, `groupindex` and `pattern`, as re.Pattern has."""

    __slots__ = ("_fullmatch", "groupindex", "pattern")

    def __init__(self, pattern: str) -> None:
        try:
            compiled = re2.compile(pattern.encode(), _OPTIONS)
        except re2.error as e:
            reason = e.args[0] if e.args else "refused"
            if isinstance(reason, bytes):
                reason = reason.decode(errors="replace")
            raise PatternError(str(reason)) from None
        self.pattern = pattern
        self.groupindex: dict[str, int] = {
            (k.decode() if isinstance(k, bytes) else k): v for k, v in compiled.groupindex.items()
        }
        self._fullmatch = compiled.fullmatch

    def fullmatch(self, text: str) -> Match | None:
        found = self._fullmatch(text.encode())
        return None if found is None else Match(found, self.groupindex)

    def __repr__(self) -> str:
        return f"Pattern({self.pattern!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pattern) and other.pattern == self.pattern

    def __hash__(self) -> int:
        return hash(self.pattern)


ANY = Pattern(".*")
