"""Safe YAML loading that remembers where each value came from.

``load_yaml(path)`` returns the data and a :class:`SourceMap` from dotted field paths
(``model.aggregator.choice.1``) to line numbers, so validation errors can say
``space.yaml:12: model.chunk_size: ...``. Only ``yaml.SafeLoader`` is used: no object construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from psmsearch.errors import ConfigError


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


def _walk(node: yaml.Node, path: str, lines: dict[str, int]) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{path}.{key_node.value}" if path else str(key_node.value)
            lines[key] = key_node.start_mark.line + 1
            _walk(value_node, key, lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _walk(item, f"{path}.{index}" if path else str(index), lines)


def parse_yaml(text: str, source: str) -> tuple[Any, SourceMap]:
    """Parse YAML text safely; syntax errors become ConfigErrors with the line and column."""
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = err.problem or err.context or "invalid YAML"
        raise ConfigError(f"malformed YAML: {problem}", source=where) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"malformed YAML: {err}", source=source) from None
    lines: dict[str, int] = {}
    if node is not None:
        _walk(node, "", lines)
    return data, SourceMap(source, lines)


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
