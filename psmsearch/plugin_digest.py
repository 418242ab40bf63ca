"""Digests of a plugin's code, so that a trial's record can say which code it ran.

A trial's ``trial_config.yaml`` names the plugin each of its components came from; a digest of that
plugin's code, taken when the plugin was loaded, lets ``psmsearch train`` warn when the file it is
about to run has changed since (the trial is then not what it reproduces).
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path


def plugin_digest(plugin: str) -> str | None:
    """SHA-256 of a plugin file, or of a plugin folder's ``.py`` files (their relative paths and bytes,
    in sorted order); None for a name that is no file or folder here, or one that cannot be read."""
    path = Path(plugin)
    try:
        if path.is_file():
            return hashlib.sha256(path.read_bytes()).hexdigest()
        if path.is_dir():
            digest = hashlib.sha256()
            for file in sorted(path.rglob("*.py")):
                digest.update(str(file.relative_to(path)).encode() + b"\0" + file.read_bytes() + b"\0")
            return digest.hexdigest()
    except OSError:
        return None
    return None


def module_digest(name: str) -> str | None:
    """:func:`plugin_digest` of the file or package folder an importable module ``name`` comes from
    (a plugin named as a module, as Ray workers load a shipped plugin file); None where it has none."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return plugin_digest(next(iter(spec.submodule_search_locations)))
    return plugin_digest(spec.origin) if spec.origin else None
