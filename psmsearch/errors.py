"""Errors psmsearch raises for the user's input: each one says what was wrong and what is allowed."""

from __future__ import annotations

import difflib
import importlib.util
import os
import sysconfig
import traceback
from functools import cache
from pathlib import Path
from typing import Any, Iterable


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


class HyperParameterError(ValueError):
    """A component's hyperparameter is unknown or out of range; ``name`` is the hyperparameter at fault.

    A ``ValueError`` (components raise it from ``__init__``), so existing ``except ValueError`` still
    catches it; config validation uses ``name`` to point at ``model.<kind>.<name>`` and the line or
    ``--set`` that gave it.
    """

    def __init__(self, message: str, name: str) -> None:
        super().__init__(message)
        self.name = name

    def __reduce__(self) -> tuple[type["HyperParameterError"], tuple[str, str]]:
        """Pickle and copy with both arguments (the default rebuilds from ``args``, the message alone)."""
        return type(self), (str(self.args[0]), self.name)


PLUGIN_HINT = ("A plugin's {kind}s are registered once it is loaded: psmsearch --plugin PATH COMMAND ..., "
               "PSMSEARCH_PLUGINS=PATH, or an installed package's entry point")


class UnknownComponentError(PSMSearchError, KeyError):
    """A component name is not registered; the message suggests the closest registered names."""

    def __init__(self, kind: str, name: str, known: Iterable[str]) -> None:
        known = sorted(known)
        close = close_matches(str(name), known, 3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        allowed = ", ".join(known) or "none registered"
        self.kind, self.name, self.known = kind, name, known
        plugins = "" if kind == "component kind" else " " + PLUGIN_HINT.format(kind=kind)
        super().__init__(f"unknown {kind} {name!r}.{hint} Registered {kind}s: {allowed}.{plugins}{'.' if plugins else ''}")

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]

    def __reduce__(self) -> tuple[Any, tuple[type, tuple, dict[str, Any]]]:
        """Pickled as its message and attributes, not its constructor's arguments (Ray and worker
        processes send errors back): subclasses take other arguments (:class:`UnknownTaskError`), and a
        located error's message no longer follows from them."""
        return _rebuilt, (type(self), self.args, dict(vars(self)))


def _rebuilt(cls: type, args: tuple, attrs: dict[str, Any]) -> BaseException:
    """An exception of type ``cls`` with ``args`` and attributes ``attrs``, its ``__init__`` not run."""
    err = cls.__new__(cls)
    err.args = args
    vars(err).update(attrs)
    return err


class IncompatibleComponentsError(PSMSearchError):
    """Components whose state kinds do not match were combined."""


class PluginError(PSMSearchError):
    """A plugin could not be loaded or registered something invalid."""


def close_matches(value: str, allowed: Iterable[str], n: int) -> list[str]:
    """Up to ``n`` allowed values that ``value`` is probably a typo or an abbreviation of.

    Close spellings first (difflib ratio >= 0.6: ``atention`` -> ``attention``, ``gal`` -> ``gla``),
    then names that contain ``value`` or that ``value`` contains, for 3 characters or more (``linear``
    -> ``linear_attention``). A looser ratio suggested unrelated names (``typohook`` -> ``pool``).
    """
    allowed = list(allowed)
    close = difflib.get_close_matches(value, allowed, n=n, cutoff=0.6)
    low = value.lower()
    if len(low) >= 3:
        close += [a for a in allowed if a not in close and (low in a.lower() or (len(a) >= 3 and a.lower() in low))]
    return close[:n]


def suggest(value: str, allowed: Iterable[str]) -> str:
    """`` Did you mean 'x'?`` for the closest allowed value, or an empty string."""
    close = close_matches(str(value), allowed, 1)
    return f" Did you mean {close[0]!r}?" if close else ""


def where_raised(err: BaseException) -> str:
    """`` (at FILE:LINE in FUNCTION)`` of the innermost frame of ``err`` in user or plugin code: not in
    an installed package (torch, numpy) or the standard library, nor in psmsearch's engine."""
    if getattr(err, "names_its_origin", False):  # the engine found the fault and its message says whose
        return ""
    excluded = (*{p for p in (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["stdlib"])}, *_engine_dirs())
    plugins = _plugin_dirs()  # the built-in plugins are plugins, installed under psmsearch/ or not
    frames = [frame for frame in traceback.extract_tb(err.__traceback__)
              if not frame.filename.startswith("<")
              and (frame.filename.startswith(plugins) or not frame.filename.startswith(excluded))]
    return f" (at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""


_ENGINE_DIR = str(Path(__file__).resolve().parent) + os.sep  # psmsearch/; the built-in plugins are in plugins/


@cache
def _plugin_dirs() -> tuple[str, ...]:
    """The folder of psmsearch.plugins: inside psmsearch/ (and site-packages) in a normal install, where
    a built-in component's line was hidden as if it were the engine's."""
    spec = importlib.util.find_spec("psmsearch.plugins")
    return tuple(str(Path(p).resolve()) + os.sep for p in (spec.submodule_search_locations or [])) if spec else ()


@cache
def _engine_dirs() -> tuple[str, ...]:
    """psmsearch/ and the folder of psmsearch.kernels, which an editable install maps from the repository's
    kernels/ (a plugin's bad call then named the kernel's argument check, not the plugin's line)."""
    spec = importlib.util.find_spec("psmsearch.kernels")
    kernels = [str(Path(p).resolve()) + os.sep for p in (spec.submodule_search_locations or [])] if spec else []
    return (_ENGINE_DIR, *kernels)
