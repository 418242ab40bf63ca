"""Local text for the byte LM task: where a relative path is found, a folder's split files, and a
file's bytes as a tensor.

:func:`resolve_text_path` looks a relative ``task.path`` (or a ``task.dataset`` folder) up where a
trial can see it; :func:`local_split_files` finds the train/validation/test files of such a folder;
:func:`read_bytes` loads a file into one buffer that its parts can view. A helper of the built-in
tasks plugin (:mod:`psmsearch.plugins.tasks`), not a plugin itself.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from psmsearch.errors import ConfigError
from psmsearch.tasks import LAUNCH_DIR_ENV


def text_path_bases() -> list[Path]:
    """Where a relative ``task.path`` is looked for, in order: the directory the command was started
    in (a Ray trial runs in a working directory of its own), the working directory, the repository root."""
    launch = os.environ.get(LAUNCH_DIR_ENV)
    bases = [Path(launch)] if launch else []
    bases += [Path.cwd(), Path(__file__).resolve().parent.parent]
    return list(dict.fromkeys(bases))


def resolve_text_path(path: str) -> Path:
    """A relative path is tried against each of :func:`text_path_bases`; the first where it exists (a
    file, or a folder of split files for ``task.dataset``) wins."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute():
        return candidate
    bases = text_path_bases()
    for base in bases:
        if (base / candidate).exists():
            return (base / candidate).resolve()
    return (bases[0] / candidate).resolve()


_SPLIT_FILE = re.compile(r"(?:^|[._-])(train|valid|validation|test)(?:[._-]|$)")
_TEXT_SUFFIXES = (".txt", ".raw", ".tokens")


def local_split_files(folder: Path) -> dict[str, Path] | None:
    """``{"train": ..., "validation": ..., "test": ...}`` text files of a local folder, by name, or None
    where the folder holds no such files (a local Hugging Face dataset: parquet, json...).

    A split's file has the split in its name (``train``, ``valid`` or ``validation``, ``test``, between
    separators) and ends in .txt, .raw or .tokens: the WikiText archives' ``wiki.train.raw``,
    ``wiki.valid.raw``, ``wiki.test.raw`` as unpacked, or ``train.txt`` etc. They are read as bytes,
    exactly, without the ``datasets`` package. A ConfigError if a split is missing or ambiguous.
    """
    found: dict[str, list[Path]] = {"train": [], "validation": [], "test": []}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):  # hidden: editor backups, macOS's ._ metadata files from archives
            continue
        match = _SPLIT_FILE.search(entry.name.lower())
        if entry.is_file() and entry.suffix.lower() in _TEXT_SUFFIXES and match:
            found["validation" if match.group(1).startswith("valid") else match.group(1)].append(entry)
    if not any(found.values()):
        return None
    problems = [f"{split}: {', '.join(p.name for p in paths) or 'none'}" for split, paths in found.items()
                if len(paths) != 1]
    if problems:
        raise ConfigError(
            f"dataset folder {str(folder)!r}: need one text file per split, named with train, valid(ation) and "
            f"test and ending in {', '.join(_TEXT_SUFFIXES)} (e.g. wiki.train.raw, wiki.valid.raw, wiki.test.raw); "
            f"found {'; '.join(problems)}", field="task.dataset")
    return {split: paths[0] for split, paths in found.items()}


def bytes_tensor(buffer: bytearray) -> torch.Tensor:
    """``buffer`` as a uint8 tensor sharing its memory (``torch.frombuffer`` refuses an empty one)."""
    return torch.frombuffer(buffer, dtype=torch.uint8) if buffer else torch.empty(0, dtype=torch.uint8)


def read_bytes(path: Path) -> torch.Tensor:
    """A file's bytes as a uint8 tensor, read straight into the one buffer it keeps.

    ``read_bytes``, slicing and a ``bytearray`` copy held three copies at once: loading a 101 MB text
    peaked at 310 MB over the import. Here the file is one buffer and its parts are views of it.
    """
    buffer = bytearray(path.stat().st_size)
    with path.open("rb") as file:
        read = file.readinto(buffer)
    return bytes_tensor(buffer if read == len(buffer) else buffer[:read])  # [size]

