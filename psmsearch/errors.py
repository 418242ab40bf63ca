"""Errors psmsearch raises for the user's input: each one says what was wrong and what is allowed."""

from __future__ import annotations

import difflib
from typing import Iterable


class PSMSearchError(Exception):
    """Base class: an error caused by input the user can fix. The CLI prints it and exits 2."""

    exit_code = 2


class ConfigError(PSMSearchError):
    """A configuration value is invalid; the message names the file, field, value and what is allowed."""

    def __init__(self, message: str, *, source: str | None = None, field: str | None = None) -> None:
        self.source = source
        self.field = field
        self.detail = message
        where = ": ".join(part for part in (source, field) if part)
        super().__init__(f"{where}: {message}" if where else message)

    def located(self, source: str) -> "ConfigError":
        """This error (same type, field and message) located at ``source`` instead, e.g. ``file:line``."""
        self.source = source
        where = ": ".join(part for part in (source, self.field) if part)
        self.args = (f"{where}: {self.detail}" if where else self.detail, *self.args[1:])
        return self


class UnknownComponentError(PSMSearchError, KeyError):
    """A component name is not registered; the message suggests the closest registered names."""

    def __init__(self, kind: str, name: str, known: Iterable[str]) -> None:
        known = sorted(known)
        close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        allowed = ", ".join(known) or "none registered"
        self.kind, self.name, self.known = kind, name, known
        super().__init__(f"unknown {kind} {name!r}.{hint} Registered {kind}s: {allowed}")

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class IncompatibleComponentsError(PSMSearchError):
    """Components whose state kinds do not match were combined."""


class PluginError(PSMSearchError):
    """A plugin could not be loaded or registered something invalid."""


def suggest(value: str, allowed: Iterable[str]) -> str:
    """`` Did you mean 'x'?`` for the closest allowed value, or an empty string."""
    close = difflib.get_close_matches(str(value), list(allowed), n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""
