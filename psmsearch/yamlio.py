"""Safe YAML loading that remembers where each value came from.

``load_yaml(path)`` returns the data and a :class:`SourceMap` from dotted field paths
(``model.aggregator.choice.1``) to line numbers, so validation errors can say
``space.yaml:12: model.chunk_size: ...``. Only :class:`Loader`, a ``yaml.SafeLoader``, is used: no
object construction. Two things YAML 1.1 (PyYAML) allows are refused or read differently because
they silently changed what a user wrote: a key given twice in one mapping (the last one won) is an
error, and YAML 1.2 floats such as ``1e-3`` are floats (YAML 1.1 wants ``1.0e-3``; ``1e-3`` was
read as the string ``'1e-3'``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from psmsearch.errors import ConfigError

MERGE_TAG = "tag:yaml.org,2002:merge"

# Floats with an exponent that YAML 1.1 reads as strings: no dot (1e-3, 1E5) or an unsigned exponent
# (1.5e3). The YAML 1.1 forms (1.0e-3, .inf, .nan, 1.5) keep PyYAML's own resolver.
YAML12_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$")


class Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also resolves YAML 1.2 floats (``1e-3``, ``1E5``, ``-2e-4``) as floats.

    A subclass, so ``yaml.safe_load`` elsewhere (and in other libraries) is unchanged.
    """


Loader.add_implicit_resolver("tag:yaml.org,2002:float", YAML12_FLOAT, list("-+0123456789."))


@dataclass
class SourceMap:
    """Where each field of a loaded YAML document is (1-based line numbers)."""

    source: str
    lines: dict[str, int] = field(default_factory=dict)

    def where(self, path: str) -> str:
        """``file:line`` for the field at ``path`` (or its closest recorded parent), else ``file``."""
        probe = path
        while probe:
            if probe in self.lines:
                return f"{self.source}:{self.lines[probe]}"
            probe = probe.rpartition(".")[0]
        return self.source

    def error(self, path: str, message: str) -> ConfigError:
        """A ConfigError located at ``path``."""
        return ConfigError(message, source=self.where(path), field=path or None)


class _Walker:
    """Records each field's line and refuses duplicate keys and self-containing aliases, before construction.

    Checked on the composed nodes, where a merge (``<<: *base``) is still apart from the keys that
    override it: overriding a merged key is allowed, repeating a key of the mapping itself is not.
    """

    def __init__(self, loader: Loader, source: str, located: bool) -> None:
        self.loader, self.source, self.located = loader, source, located
        self.lines: dict[str, int] = {}
        self.open: set[int] = set()

    def walk(self, node: yaml.Node, path: str) -> None:
        line = node.start_mark.line + 1
        self.lines.setdefault(path, line)
        if id(node) in self.open:
            raise ConfigError("a YAML alias refers to a node that contains it (a recursive structure)",
                              source=self._at(line), field=path or None)
        self.open.add(id(node))
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, value_node in node.value:
                key = f"{path}.{key_node.value}" if path else str(key_node.value)
                key_line = key_node.start_mark.line + 1
                if key_node.tag != MERGE_TAG and isinstance(key_node, yaml.ScalarNode):
                    value = self.loader.construct_object(key_node, deep=True)
                    if value in seen:
                        first = f" (first at line {seen[value]})" if self.located else ""
                        raise ConfigError(f"duplicate key {value!r}{first}; a key may appear once in a mapping "
                                          "(YAML would silently keep only the last value)",
                                          source=self._at(key_line), field=key)
                    seen[value] = key_line
                self.lines[key] = key_line
                self.walk(value_node, key)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self.walk(item, f"{path}.{index}" if path else str(index))
        self.open.discard(id(node))

    def _at(self, line: int) -> str:
        return f"{self.source}:{line}" if self.located else self.source


def _load(text: str, source: str, located: bool) -> tuple[Any, dict[str, int]]:
    """Compose, check (duplicate keys, recursion) and construct one document with :class:`Loader`."""
    loader = Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        walker = _Walker(loader, source, located)
        walker.walk(node, "")
        return loader.construct_document(node), walker.lines
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark and located else source
        problem = err.problem or err.context or "invalid YAML"
        raise ConfigError(f"malformed YAML: {problem}", source=where) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"malformed YAML: {err}", source=source) from None
    finally:
        loader.dispose()


def parse_yaml(text: str, source: str) -> tuple[Any, SourceMap]:
    """Parse YAML text safely; syntax errors and duplicate keys become ConfigErrors with the line."""
    data, lines = _load(text, source, located=True)
    return data, SourceMap(source, lines)


def parse_value(text: str, source: str) -> Any:
    """Parse one YAML value given on the command line (``--set key=VALUE``); errors name ``source``, no line."""
    return _load(text, source, located=False)[0]


def load_yaml(path: str | Path) -> tuple[Any, SourceMap]:
    """Read and parse a YAML file; a missing or unreadable file is a ConfigError naming it."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"no such file: {path}", source=str(path)) from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read {path}: {err}", source=str(path)) from None
    return parse_yaml(text, str(path))
