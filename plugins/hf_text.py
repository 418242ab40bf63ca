"""The text of a Hugging Face dataset for the byte LM task, as one UTF-8 buffer per split.

:func:`load_hf_text` loads a dataset with the optional ``datasets`` package (:func:`require_datasets`
says how to install it) and joins each split's ``text`` column into one ``bytearray`` with pyarrow,
never making a Python object per row. A helper of the built-in tasks plugin
(:mod:`psmsearch.plugins.tasks`), not a plugin itself.
"""

from __future__ import annotations

import struct
from typing import Any

from psmsearch.errors import ConfigError


def require_datasets(dataset: str) -> Any:
    """The ``datasets`` module, or a ConfigError saying how to get it."""
    try:
        import datasets  # noqa: PLC0415 - optional dependency
    except ImportError:
        raise ConfigError(
            f"dataset {dataset!r} needs the optional package `datasets` (pip install 'psmsearch[hf]'); "
            "or set task.path to a local text file",
            field="task.dataset",
        ) from None
    return datasets


_JOIN_BLOCK_ROWS = 1 << 16  # rows per Arrow kernel call while joining: bounds the one transient copy


def _text_column(dataset: str, split: str, table: Any) -> Any:
    """The ``text`` column of a split's Arrow table as a ``pyarrow.ChunkedArray`` of ``string`` or
    ``large_string`` rows, or a ConfigError naming the dataset and split.

    A null row is refused, naming its index: it has no text, and whether it stands for a blank line
    or a missing record cannot be told (the join below would make it a line of its own or an extra
    separator), so the user drops or fills it. A ``string_view`` column is cast to ``large_string``
    here (one extra copy of that column; the compute kernels used for the join do not take views)."""
    import pyarrow as pa  # noqa: PLC0415 - a dependency of `datasets`, needed only by this route
    import pyarrow.compute as pc  # noqa: PLC0415

    if "text" not in table.column_names:
        raise ConfigError(f"dataset {dataset!r} split {split!r} has columns {table.column_names}; "
                          "the lm task reads a column named 'text'", field="task.dataset")
    column = table.column("text")
    if getattr(pa.types, "is_string_view", lambda _type: False)(column.type):  # pyarrow >= 16 has views
        column = column.cast(pa.large_string())
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise ConfigError(f"dataset {dataset!r} split {split!r}: column 'text' holds {column.type}, "
                          "not strings", field="task.dataset")
    nulls = column.null_count
    if nulls:
        first = pc.index(pc.is_null(column), True).as_py()
        raise ConfigError(
            f"dataset {dataset!r} split {split!r}: row {first} of column 'text' is null ({nulls} null "
            f"{'row' if nulls == 1 else 'rows'} in the split); a null row is neither text nor a blank line: "
            "drop or fill the null rows", field="task.dataset")
    return column


def _value_bytes(array: Any) -> memoryview:
    """The bytes of a ``string`` or ``large_string`` Arrow array's rows back to back, as a view of its
    data buffer (no copy), read from the array's offsets so a sliced array gives only its rows."""
    import pyarrow as pa  # noqa: PLC0415

    if len(array) == 0:  # its offsets buffer may be empty (Arrow allows it for no rows)
        return memoryview(b"")
    _, offsets, data = array.buffers()
    code, width = ("=q", 8) if pa.types.is_large_string(array.type) else ("=i", 4)
    (first,) = struct.unpack_from(code, offsets, array.offset * width)
    (last,) = struct.unpack_from(code, offsets, (array.offset + len(array)) * width)
    return memoryview(data).cast("B")[first:last] if last > first else memoryview(b"")


def _joined_rows(column: Any) -> bytearray:
    """A text split's rows (a ``pyarrow.ChunkedArray`` of ``string`` or ``large_string``, no nulls) as
    one UTF-8 text: concatenated where the rows keep their own newlines, joined with newlines where
    they have none (a local text file loaded line by line).

    The Hub's WikiText rows end in ``"\n"`` and its blank lines (``" \n"`` in the raw files) are
    ``""``: joined with newlines every line got a second one (+2.9% bytes, 35,526 -> 64,767 newlines
    on tinyshakespeare cut that way); concatenated, with ``"\n"`` for each empty row, the text is the
    raw file's but for the space of its blank lines. Rows keep their newlines when there is a
    non-empty row and every non-empty row ends in ``"\n"``, decided from all rows (the first 1000 once
    decided, and a later row without its newline was run into the next line); otherwise the text is
    ``"\n".join(rows)`` (an empty split gives no bytes, and all-empty rows ``len(rows) - 1`` newlines).

    No Python object is made per row (a Python loop over the rows took 20-36 s for 100 MB of
    tinyshakespeare lines on a 2-core machine, this 0.3-0.6 s): the layout is checked with pyarrow.compute over the
    whole column, the size is read from the chunks' offsets, and the text is written into one
    ``bytearray`` of its final size, block by block (at most ``_JOIN_BLOCK_ROWS`` rows of one Arrow
    chunk), from the data buffer of an Arrow kernel's output: ``if_else`` putting ``"\n"`` for the
    empty rows, or ``binary_join`` with ``"\n"``. The copies that remain: the column's own buffers
    (memory-mapped from the ``datasets`` cache file when loaded from one, so file pages rather than
    heap), one block's kernel output at a time, and the returned buffer, which the caller's tensor
    uses as its memory without a copy.
    """
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.compute as pc  # noqa: PLC0415

    rows = len(column)
    empty = pc.sum(pc.equal(column, "")).as_py() or 0
    ending = pc.sum(pc.ends_with(column, "\n")).as_py() or 0
    keeps_newlines = rows > empty and ending == rows - empty  # a row ending in "\n" is not empty
    size = sum(len(_value_bytes(chunk)) for chunk in column.chunks)  # from the offsets: no per-row lengths array
    size += empty if keeps_newlines else max(rows - 1, 0)
    text = bytearray(size)
    view = memoryview(text)
    newline = pa.scalar("\n", column.type)
    lists = pa.LargeListArray if pa.types.is_large_string(column.type) else pa.ListArray
    at, first_block = 0, True
    for chunk in column.chunks:
        for start in range(0, len(chunk), _JOIN_BLOCK_ROWS):
            block = chunk.slice(start, _JOIN_BLOCK_ROWS)
            if keeps_newlines:
                joined = pc.if_else(pc.equal(block, ""), newline, block)
            else:
                if not first_block:  # the newline between this block's first row and the last block's last
                    view[at] = ord("\n")
                    at += 1
                joined = pc.binary_join(lists.from_arrays([0, len(block)], block), newline)
            part = _value_bytes(joined)
            view[at : at + len(part)] = part
            at += len(part)
            first_block = False
    if at != size:
        raise RuntimeError(f"joined {at} bytes of text into a buffer of {size}")  # a bug here, not the data's
    return text


def load_hf_text(dataset: str) -> tuple[bytearray, bytearray, bytearray | None]:
    """Train, validation and test text of a Hugging Face dataset (test ``None`` where the dataset has
    only one held-out split), or a ConfigError saying why not: each split's ``text`` rows joined by
    :func:`_joined_rows` from the split's Arrow table (``with_format("arrow")``: no Python row
    objects) into one buffer, which the caller wraps as a tensor without copying it."""
    datasets = require_datasets(dataset)
    family, config = (dataset.split("-", 1)[0], dataset) if dataset.startswith("wikitext-") else (dataset, None)
    try:
        data = datasets.load_dataset(family, config)
    except Exception as err:  # noqa: BLE001 - network, unknown name: all are the user's to fix
        raise ConfigError(f"could not load dataset {dataset!r}: {type(err).__name__}: {err}", field="task.dataset") from None
    splits = {name: _joined_rows(_text_column(dataset, name, data[name].with_format("arrow")[:])) for name in data}
    if "train" not in splits or not ({"validation", "test"} & set(splits)):
        raise ConfigError(f"dataset {dataset!r} has splits {sorted(splits)}; need train and validation", field="task.dataset")
    if "validation" in splits and "test" in splits:
        return splits["train"], splits["validation"], splits["test"]
    return splits["train"], splits.get("validation", splits.get("test", bytearray())), None
