"""Built-in tasks: the group word problem (``group``, ``s5``), associative recall (``mqar``), byte LM (``lm``).

Synthetic tasks draw training data from the trainer's generator (seeded by the trial ``seed``) and
their validation and test sequences from two streams seeded by the task option ``eval_seed`` (default
0), not by the trial seed: a seed sweep retrains on new data but is scored on the same sequences.
Every whole sequence hashes to a bucket (:func:`psmsearch.tasks.sequence_bucket`): one sequence in
:data:`EVAL_BUCKETS` is held out and training rejects it, and the held-out ones are split again by the
same hash into validation (periodic evaluation) and test (the final ``test_`` metrics), so no two of
the three sets can share a sequence. The LM task splits the file by byte offset instead: training
windows lie wholly before the held-out tail, whose first half is validation and second half test.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import struct
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

import torch
from torch import nn

from psmsearch import HyperParameter, hookimpl
from psmsearch.errors import ConfigError
from psmsearch.tasks import (
    LAUNCH_DIR_ENV,
    Batch,
    Direction,
    Task,
    batched,
    derive_seed,
    length_tag,
    masked_scores,
    perplexity,
    sequence_bucket,
)

EVAL_BUCKETS = 10  # one sequence in ten (by content hash) is held out: never trained on

Part = Literal["train", "validation", "test"]


def _sample_disjoint(draw: Callable[[int], torch.Tensor], n: int, part: Part) -> torch.Tensor:
    """``n`` rows from ``draw(k) -> [k, T]`` that belong to ``part``, by their content hash ``h``.

    Training takes ``h mod EVAL_BUCKETS != 0`` (as before the test split, so training data is
    unchanged); the held-out rest is split by the finer bucket ``h mod 2 * EVAL_BUCKETS``, which is 0
    for validation and ``EVAL_BUCKETS`` for test.
    """
    kept: list[torch.Tensor] = []
    have = 0
    what = "training" if part == "train" else part
    for _ in range(1000):
        rows = draw(max(n - have, 1) * (2 if part == "train" else 2 * EVAL_BUCKETS + 1))  # [k, T]
        bucket = sequence_bucket(rows, 2 * EVAL_BUCKETS)  # [k]
        if part == "train":
            rows = rows[bucket % EVAL_BUCKETS != 0]
        else:
            rows = rows[bucket == (0 if part == "validation" else EVAL_BUCKETS)]
        kept.append(rows)
        have += rows.shape[0]
        if have >= n:
            return torch.cat(kept)[:n]
    raise RuntimeError(f"could not draw {n} {what} sequences from its share of the sequence space (by content "
                       "hash); the sequence space is too small")


# -- the group word problem ------------------------------------------------------------------------


def group_elements(group: str) -> list[tuple[int, ...]]:
    """Elements of ``S_n``, ``A_n`` or ``Z_n`` as permutations of ``range(n)``, identity first."""
    family, n = group[0], int(group[1:])
    if family == "Z":
        return [tuple((j + i) % n for j in range(n)) for i in range(n)]
    perms = list(itertools.permutations(range(n)))
    if family == "A":
        perms = [p for p in perms if _parity(p) == 0]
    return perms


def _parity(p: tuple[int, ...]) -> int:
    inversions = sum(1 for i in range(len(p)) for j in range(i + 1, len(p)) if p[i] > p[j])
    return inversions % 2


def multiplication_table(elements: list[tuple[int, ...]]) -> torch.Tensor:
    """``table[a, b]`` = index of ``a · b`` where ``(a · b)(j) = a(b(j))``; ``[G, G]`` int64."""
    index = {p: i for i, p in enumerate(elements)}
    table = [[index[tuple(a[b[j]] for j in range(len(a)))] for b in elements] for a in elements]
    return torch.tensor(table, dtype=torch.int64)


GROUPS = ("S3", "S4", "S5", "A4", "A5", "Z2", "Z3", "Z5", "Z7", "Z11", "Z60")


class GroupWordProblem(Task):
    """Running products in a finite group: input ``g_1..g_T``, label at ``t`` = ``g_1 · ... · g_t``.

    Trained on lengths up to ``train_length`` (with an optional length curriculum that starts at 2
    and grows by one whenever a training batch's accuracy passes ``curriculum_threshold``), evaluated
    at ``train_length`` times 1, 2, 4, ... up to ``eval_max_multiple``: ``acc_<m>x`` over all
    positions and ``final_acc_<m>x`` at the last position, plus ``curriculum_length``. Periodic
    evaluation scores ``eval_samples`` validation sequences per length; the final test metrics
    (``test_acc_<m>x``, ``test_final_acc_<m>x``) score as many test sequences per length. Both sets
    come from streams seeded by the option ``eval_seed`` (not the trial seed) and are disjoint from
    each other and from training by content hash (see the module docstring).
    """

    name = "group"
    fixed_group: ClassVar[str | None] = None
    hyperparameters = (
        HyperParameter("group", "categorical", "S3", choices=GROUPS, help="S_n, A_n (alternating) or Z_n (cyclic)"),
        HyperParameter("train_length", "int", 16, low=2, high=1024, help="longest training sequence (L)"),
        HyperParameter("curriculum", "bool", True, help="grow the training length from 2 to L"),
        HyperParameter("curriculum_threshold", "float", 0.9, low=0.3, high=1.0, help="train accuracy that advances the curriculum"),
        HyperParameter("eval_max_multiple", "int", 16, low=1, high=64, help="evaluate at L x 1, 2, 4, ... up to this"),
        HyperParameter("eval_samples", "int", 256, low=8, high=100000, help="evaluation sequences per length"),
    )
    options = {"eval_seed": 0}

    def __init__(self, seed: int = 0, **params: Any) -> None:
        if self.fixed_group is not None and "group" in params:
            raise ConfigError(f"task {self.name!r} fixes group={self.fixed_group}; use task 'group' to choose", field="task.group")
        super().__init__(seed, **params)
        self.group: str = self.fixed_group or self.hparams["group"]
        self.elements = group_elements(self.group)
        self.table = multiplication_table(self.elements)  # [G, G]
        self.train_length: int = self.hparams["train_length"]
        self.length = min(2, self.train_length) if self.hparams["curriculum"] else self.train_length
        self._sets: dict[Part, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.elements)

    def running_products(self, words: torch.Tensor) -> torch.Tensor:
        """``words[B, T] -> prefix products [B, T]`` by table lookup."""
        out = torch.empty_like(words)
        acc = words[:, 0]  # [B]
        out[:, 0] = acc
        for t in range(1, words.shape[1]):
            acc = self.table[acc, words[:, t]]
            out[:, t] = acc
        return out

    def _words(self, generator: torch.Generator, length: int) -> Callable[[int], torch.Tensor]:
        return lambda k: torch.randint(self.vocab_size, (k, length), generator=generator)

    def train_batch(self, step: int, batch_size: int, generator: torch.Generator) -> Batch:
        words = _sample_disjoint(self._words(generator, self.length), batch_size, "train")  # [B, T]
        targets = self.running_products(words)
        return Batch(words, targets, torch.ones_like(words, dtype=torch.bool))

    def observe_train(self, step: int, accuracy: float) -> None:
        if self.length < self.train_length and accuracy >= self.hparams["curriculum_threshold"]:
            self.length += 1

    def state_dict(self) -> dict[str, Any]:
        return {"length": self.length}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.length = int(state["length"])

    @property
    def train_sequence_length(self) -> tuple[int, str]:
        return self.train_length, "train_length"

    @property
    def multiples(self) -> list[int]:
        top = self.hparams["eval_max_multiple"]
        out = [2**i for i in range(int(math.log2(top)) + 1)]
        return out if out[-1] == top else [*out, top]

    def eval_sets(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """``{multiple: (words[n, m*L], products[n, m*L])}``: the validation sets of periodic evaluation."""
        return self._held_out_sets("validation")

    def test_sets(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """``{multiple: (words[n, m*L], products[n, m*L])}``: the test sets of the final test metrics."""
        return self._held_out_sets("test")

    def _held_out_sets(self, part: Part) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """``part``'s sets, drawn once from a stream seeded by ``eval_seed`` and the part's name."""
        if part not in self._sets:
            stream = "eval" if part == "validation" else "test"
            generator = torch.Generator().manual_seed(derive_seed(self.settings["eval_seed"], f"{stream}:{self.group}"))
            sets = {}
            for m in self.multiples:
                words = _sample_disjoint(self._words(generator, m * self.train_length), self.hparams["eval_samples"], part)
                sets[m] = (words, self.running_products(words))
            self._sets[part] = sets
        return self._sets[part]

    @torch.no_grad()
    def _score(self, model: nn.Module, sets: dict[int, tuple[torch.Tensor, torch.Tensor]],
               device: torch.device | str, batch_size: int) -> dict[str, float]:
        """Accuracy over all positions and at the last one, per length multiple, on ``sets``."""
        was_training = model.training
        model.eval()
        metrics: dict[str, float] = {}
        try:
            for m, (words, targets) in sets.items():
                correct_all = correct_final = 0.0
                for rows in batched(words.shape[0], batch_size):
                    x, y = words[rows].to(device), targets[rows].to(device)
                    hit = (model(x).argmax(-1) == y).float()  # [b, T]
                    correct_all += hit.sum().item()
                    correct_final += hit[:, -1].sum().item()
                metrics[f"acc_{length_tag(m)}"] = correct_all / words.numel()
                metrics[f"final_acc_{length_tag(m)}"] = correct_final / words.shape[0]
        finally:
            model.train(was_training)
        return metrics

    def evaluate(self, model: nn.Module, device: torch.device | str = "cpu", batch_size: int = 64) -> dict[str, float]:
        """Accuracies on the validation sets, and the curriculum's current training length."""
        metrics = self._score(model, self.eval_sets(), device, batch_size)
        metrics["curriculum_length"] = float(self.length)
        return metrics

    def test_metrics(self, model: nn.Module, device: torch.device | str = "cpu", batch_size: int = 64) -> dict[str, float]:
        """Accuracies on the test sets (once, after training)."""
        return self._score(model, self.test_sets(), device, batch_size)

    def test_metric_directions(self) -> dict[str, Direction]:
        return {k: d for k, d in self.metric_directions().items() if k != "curriculum_length"}

    def metric_directions(self) -> dict[str, Direction]:
        out: dict[str, Direction] = {}
        for m in self.multiples:
            out[f"acc_{length_tag(m)}"] = "maximize"
            out[f"final_acc_{length_tag(m)}"] = "maximize"
        out["curriculum_length"] = "maximize"
        return out

    @property
    def default_objective(self) -> str:
        m = 4 if 4 in self.multiples else self.multiples[-1]
        return f"acc_{length_tag(m)}"


class S5WordProblem(GroupWordProblem):
    """The group word problem on S5 (non-solvable: needs depth growing with length)."""

    name = "s5"
    fixed_group = "S5"
    hyperparameters = tuple(hp for hp in GroupWordProblem.hyperparameters if hp.name != "group")


# -- multi-query associative recall ----------------------------------------------------------------


class MQAR(Task):
    """Multi-query associative recall (Zoology, Arora et al. 2023).

    A sequence starts with ``num_kv_pairs`` key-value pairs (keys from the lower half of the
    vocabulary, values from the upper half, token 0 reserved as filler), followed by queries: each
    key reappears once, at a slot drawn uniformly or with a power law favouring early slots, and
    the model must predict its value at the query position. Only query positions are scored.
    Periodic evaluation scores ``eval_samples`` validation sequences (``acc``, ``loss``); the final
    test metrics (``test_acc``, ``test_loss``) score as many test sequences. Both come from streams
    seeded by the option ``eval_seed`` (not the trial seed) and are disjoint from each other and from
    training by content hash (see the module docstring).
    """

    name = "mqar"
    hyperparameters = (
        HyperParameter("vocab_size", "int", 64, low=8, high=65536, log=True, help="vocabulary, including filler 0"),
        HyperParameter("num_kv_pairs", "int", 8, low=1, high=1024, log=True, help="key-value pairs per sequence"),
        HyperParameter("seq_len", "int", 64, low=8, high=65536, log=True, help="sequence length"),
        HyperParameter("placement", "categorical", "power_law", choices=("uniform", "power_law"), help="query slot distribution"),
        HyperParameter("power_a", "float", 0.01, low=0.001, high=1.0, log=True, help="power-law exponent (slot i has weight (i+1)^(a-1))"),
        HyperParameter("eval_samples", "int", 512, low=8, high=100000, help="evaluation sequences"),
    )
    options = {"eval_seed": 0}

    def __init__(self, seed: int = 0, **params: Any) -> None:
        super().__init__(seed, **params)
        v, kv, t = self.hparams["vocab_size"], self.hparams["num_kv_pairs"], self.hparams["seq_len"]
        if kv > (v - 1) // 2:
            raise ConfigError(f"num_kv_pairs={kv} needs vocab_size >= {2 * kv + 1} (distinct keys and values); got {v}", field="task.num_kv_pairs")
        if 4 * kv > t:
            raise ConfigError(f"num_kv_pairs={kv} needs seq_len >= {4 * kv} (pairs plus one query slot each); got {t}", field="task.num_kv_pairs")
        self.key_range = (1, 1 + (v - 1) // 2)  # keys in [1, 1 + half)
        self.value_range = (1 + (v - 1) // 2, v)
        slots = (t - 2 * kv) // 2  # query slots of two tokens (key, value) after the context
        weights = torch.ones(slots) if self.hparams["placement"] == "uniform" else (
            torch.arange(1, slots + 1, dtype=torch.float64) ** (self.hparams["power_a"] - 1)
        )
        self.slot_weights = (weights / weights.sum()).float()  # [S]
        self._held_out: dict[Part, Batch] = {}

    @property
    def vocab_size(self) -> int:
        return self.hparams["vocab_size"]

    @property
    def train_sequence_length(self) -> tuple[int, str]:
        return self.hparams["seq_len"], "seq_len"

    def _draw(self, generator: torch.Generator) -> Callable[[int], torch.Tensor]:
        kv, t = self.hparams["num_kv_pairs"], self.hparams["seq_len"]
        lo_k, hi_k = self.key_range
        lo_v, hi_v = self.value_range

        def draw(b: int) -> torch.Tensor:
            keys = torch.rand(b, hi_k - lo_k, generator=generator).argsort(-1)[:, :kv] + lo_k  # [b, kv] distinct
            values = torch.randint(lo_v, hi_v, (b, kv), generator=generator)  # [b, kv]
            seq = torch.zeros(b, t, dtype=torch.int64)
            seq[:, 0 : 2 * kv : 2] = keys
            seq[:, 1 : 2 * kv : 2] = values
            slots = torch.multinomial(self.slot_weights.expand(b, -1), kv, replacement=False, generator=generator)  # [b, kv]
            positions = 2 * kv + 2 * slots  # [b, kv] query key positions
            order = torch.rand(b, kv, generator=generator).argsort(-1)  # which key goes to which slot
            rows = torch.arange(b)[:, None]
            seq[rows, positions] = keys[rows, order]
            seq[rows, positions + 1] = values[rows, order]
            return seq

        return draw

    def _batch(self, seq: torch.Tensor) -> Batch:
        """Inputs ``seq[:, :-1]``; the target at a query key is the next token, its value."""
        kv = self.hparams["num_kv_pairs"]
        inputs, targets = seq[:, :-1], seq[:, 1:]
        lo_k, hi_k = self.key_range
        is_key = (inputs >= lo_k) & (inputs < hi_k)
        mask = is_key & (torch.arange(inputs.shape[1]) >= 2 * kv)  # [B, T-1] query positions only
        return Batch(inputs, targets, mask)

    def train_batch(self, step: int, batch_size: int, generator: torch.Generator) -> Batch:
        return self._batch(_sample_disjoint(self._draw(generator), batch_size, "train"))

    def eval_batch(self) -> Batch:
        """The validation sequences of periodic evaluation."""
        return self._held_out_batch("validation")

    def test_batch(self) -> Batch:
        """The test sequences of the final test metrics."""
        return self._held_out_batch("test")

    def _held_out_batch(self, part: Part) -> Batch:
        """``part``'s sequences, drawn once from a stream seeded by ``eval_seed`` and the part's name."""
        if part not in self._held_out:
            stream = "eval:mqar" if part == "validation" else "test:mqar"
            generator = torch.Generator().manual_seed(derive_seed(self.settings["eval_seed"], stream))
            self._held_out[part] = self._batch(_sample_disjoint(self._draw(generator), self.hparams["eval_samples"], part))
        return self._held_out[part]

    @torch.no_grad()
    def _score(self, model: nn.Module, data: Batch, device: torch.device | str, batch_size: int) -> dict[str, float]:
        """Accuracy and mean cross-entropy at the query positions of ``data``."""
        was_training = model.training
        model.eval()
        loss = correct = 0.0
        try:
            for rows in batched(data.inputs.shape[0], batch_size):
                part = data.rows(rows).to(device)
                ce, hit = masked_scores(model(part.inputs), part.targets, part.mask)
                loss += ce.sum().item()
                correct += hit.sum().item()
        finally:
            model.train(was_training)
        count = data.mask.sum().item()
        return {"acc": correct / count, "loss": loss / count}

    def evaluate(self, model: nn.Module, device: torch.device | str = "cpu", batch_size: int = 64) -> dict[str, float]:
        """Accuracy and loss on the validation sequences."""
        return self._score(model, self.eval_batch(), device, batch_size)

    def test_metrics(self, model: nn.Module, device: torch.device | str = "cpu", batch_size: int = 64) -> dict[str, float]:
        """Accuracy and loss on the test sequences (once, after training)."""
        return self._score(model, self.test_batch(), device, batch_size)

    def test_metric_directions(self) -> dict[str, Direction]:
        return self.metric_directions()

    def metric_directions(self) -> dict[str, Direction]:
        return {"acc": "maximize", "loss": "minimize"}


# -- byte-level language modelling -----------------------------------------------------------------

DEFAULT_TEXT = "../shared/data/tinyshakespeare.txt"


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


def _require_datasets(dataset: str) -> Any:
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


def _bytes_tensor(buffer: bytearray) -> torch.Tensor:
    """``buffer`` as a uint8 tensor sharing its memory (``torch.frombuffer`` refuses an empty one)."""
    return torch.frombuffer(buffer, dtype=torch.uint8) if buffer else torch.empty(0, dtype=torch.uint8)


def _read_bytes(path: Path) -> torch.Tensor:
    """A file's bytes as a uint8 tensor, read straight into the one buffer it keeps.

    ``read_bytes``, slicing and a ``bytearray`` copy held three copies at once: loading a 101 MB text
    peaked at 310 MB over the import. Here the file is one buffer and its parts are views of it.
    """
    buffer = bytearray(path.stat().st_size)
    with path.open("rb") as file:
        read = file.readinto(buffer)
    return _bytes_tensor(buffer if read == len(buffer) else buffer[:read])  # [size]


def _load_hf_text(dataset: str) -> tuple[bytearray, bytearray, bytearray | None]:
    """Train, validation and test text of a Hugging Face dataset (test ``None`` where the dataset has
    only one held-out split), or a ConfigError saying why not: each split's ``text`` rows joined by
    :func:`_joined_rows` from the split's Arrow table (``with_format("arrow")``: no Python row
    objects) into one buffer, which the caller wraps as a tensor without copying it."""
    datasets = _require_datasets(dataset)
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


class ByteLM(Task):
    """Character-level (byte) language modelling of a text file or a Hugging Face dataset.

    A text file is cut in three by byte offset: the first ``1 - val_fraction`` of its bytes are for
    training, and the held-out last ``val_fraction`` is halved into a *validation* part (its first
    ``floor(held_out / 2)`` bytes) and a *test* part (the rest). Training draws random windows wholly
    inside the training part (unchanged by the validation/test halving, so models trained before it
    saw the same bytes). A Hugging Face dataset uses its own validation and test splits, or halves
    its one held-out split the same way when it has only one.

    Periodic evaluation (:meth:`evaluate`: ``loss``, ``perplexity``, ``bpc``; what pruning and a
    search's validation objectives see) scores the *start* of the validation part, and the final
    test metrics (:meth:`test_metrics`, reported once after training as ``test_loss``,
    ``test_perplexity``, ``test_bpc``) score the start of the test part the same way: of a part of
    ``P`` bytes, ``n = min(floor((P - 1) / seq_len), max(1, floor(eval_tokens / seq_len)))``
    consecutive ``seq_len`` windows, so the first ``n * seq_len`` bytes after the part's first are
    each predicted once (every position of every window scored, the context never reaching outside
    the part) and the rest of the part is not scored. ``eval_tokens`` thus bounds both, and both
    score the same number of bytes when the parts are large enough; an ``eval_tokens`` of at least
    the part's size (its maximum, 2**30, always is) scores the whole part up to its last partial
    window. Validation and test bytes are disjoint from each other and from every training window.

    ``bpc`` is bits per *byte* (``loss / ln 2``): the model predicts UTF-8 bytes, so for ASCII text
    such as tinyshakespeare it is bits per character, and for other text it is not (a character of
    several bytes costs the sum of its bytes' bits).
    """

    name = "lm"
    hyperparameters = (
        HyperParameter("seq_len", "int", 256, low=8, high=65536, log=True, help="training window (tokens)"),
        HyperParameter("val_fraction", "float", 0.1, low=0.01, high=0.5, help="held-out tail of the file: first half validation, second half test"),
        HyperParameter("eval_tokens", "int", 65536, low=256, high=2**30, log=True, help="tokens scored per evaluation (validation) and by the final test metrics (test): the first this many of each part (rounded down to whole windows); 2**30 scores all"),
    )
    options = {"path": DEFAULT_TEXT, "dataset": None}
    option_types = {"dataset": str}

    def __init__(self, seed: int = 0, **params: Any) -> None:
        super().__init__(seed, **params)
        self._data: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def vocab_size(self) -> int:
        return 256

    @property
    def train_sequence_length(self) -> tuple[int, str]:
        return self.hparams["seq_len"], "seq_len"

    def check(self) -> None:
        """The text file exists and is long enough for ``seq_len`` in all three parts of the split, or the
        dataset's loader package imports (nothing is downloaded here, so its size is checked only
        when training loads it). Checked before a search samples, so a too-short file fails once
        as a config error instead of failing every trial."""
        if self.settings["dataset"]:
            if self.settings["path"] not in (DEFAULT_TEXT, None):
                raise ConfigError(
                    f"task.path ({self.settings['path']!r}) and task.dataset ({self.settings['dataset']!r}) are both "
                    "set, and a dataset replaces the text file: remove one of them", field="task.path")
            files = self._local_split_files()
            if files is None:
                _require_datasets(self.settings["dataset"])
                return
            need = self.hparams["seq_len"] + 1
            short = {split: path.stat().st_size for split, path in files.items() if path.stat().st_size < need}
            if short:
                raise ConfigError(
                    f"dataset folder {self.settings['dataset']!r}: "
                    + ", ".join(f"{files[split].name} has {size} bytes" for split, size in short.items())
                    + f"; each split needs at least seq_len + 1 = {need}", field="task.dataset")
            return
        path = resolve_text_path(self.settings["path"])
        if not path.is_file():
            raise self._missing_file()
        self._check_split(path, path.stat().st_size)

    def _local_split_files(self) -> dict[str, Path] | None:
        """The split files of a ``dataset`` that is a local folder of them (:func:`local_split_files`)."""
        folder = resolve_text_path(self.settings["dataset"])
        return local_split_files(folder) if folder.is_dir() else None

    def _split_point(self, size: int) -> int:
        """Bytes of a ``size``-byte file that go to training; the rest is held out."""
        return int(size * (1 - self.hparams["val_fraction"]))

    def _part_sizes(self, size: int) -> tuple[int, int, int]:
        """(train, validation, test) bytes of a ``size``-byte file: the held-out tail is halved,
        validation taking the smaller half when it is odd."""
        train = self._split_point(size)
        validation = (size - train) // 2
        return train, validation, size - train - validation

    def _check_split(self, path: Path, size: int) -> None:
        """A ConfigError on ``task.path`` naming the file and the sizes if any part of its split
        (train, validation, test) is shorter than one window plus its target (``seq_len + 1`` bytes)."""
        need = self.hparams["seq_len"] + 1

        def fits(n: int) -> bool:
            return min(self._part_sizes(n)) >= need

        if not fits(size):
            fraction = self.hparams["val_fraction"]
            smallest = math.ceil(need / min(fraction / 2, 1 - fraction))
            while not fits(smallest):
                smallest += 1
            while fits(smallest - 1):  # int() rounding of the split can make the estimate one too high
                smallest -= 1
            train, validation, test = self._part_sizes(size)
            raise ConfigError(
                f"text file {str(path)!r} has {size} bytes: {train} train / {size - train} held-out "
                f"({validation} validation + {test} test; val_fraction={fraction}); each of the three parts "
                f"needs at least seq_len + 1 = {need} bytes, so the file "
                f"needs at least {smallest} bytes, or a smaller task.seq_len",
                field="task.path",
            )

    def _missing_file(self) -> ConfigError:
        path = resolve_text_path(self.settings["path"])
        if path.is_dir():
            problem = f"is a directory ({path})"
        elif Path(self.settings["path"]).expanduser().is_absolute():
            problem = "not found"
        else:
            repo_root = Path(__file__).resolve().parent.parent
            tried = [str(base) for base in text_path_bases() if base != repo_root]
            problem = f"not found (tried {', '.join([*tried, 'the repository root'])})"
        return ConfigError(
            f"text file {self.settings['path']!r} {problem}; "
            "set task.path to a text file or task.dataset to a Hugging Face dataset",
            field="task.path",
        )

    def splits(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(train, validation, test) bytes as uint8 tensors, loaded once; see the class docstring."""
        if self._data is None:
            dataset = self.settings["dataset"]
            files = self._local_split_files() if dataset else None
            if files is not None:
                train, validation, test = (_read_bytes(files[split]) for split in ("train", "validation", "test"))
            elif dataset:
                hub_train, hub_validation, hub_test = _load_hf_text(dataset)
                train, validation = _bytes_tensor(hub_train), _bytes_tensor(hub_validation)
                if hub_test is None:  # one held-out split: halved, both halves views of it
                    held_out = validation
                    validation, test = held_out[: len(held_out) // 2], held_out[len(held_out) // 2 :]
                else:
                    test = _bytes_tensor(hub_test)
            else:
                path = resolve_text_path(self.settings["path"])
                if not path.is_file():
                    raise self._missing_file()
                whole = _read_bytes(path)  # [size]: the three parts are views of it
                self._check_split(path, len(whole))
                n_train, n_validation, _ = self._part_sizes(len(whole))
                train = whole[:n_train]
                validation = whole[n_train : n_train + n_validation]
                test = whole[n_train + n_validation :]
            need = self.hparams["seq_len"] + 1
            if min(len(train), len(validation), len(test)) < need:
                raise ConfigError(f"dataset {dataset!r} too short for seq_len={need - 1}: {len(train)} train / "
                                  f"{len(validation)} validation / {len(test)} test bytes", field="task.seq_len")
            self._data = (train, validation, test)
        return self._data

    def train_batch(self, step: int, batch_size: int, generator: torch.Generator) -> Batch:
        train = self.splits()[0]
        t = self.hparams["seq_len"]
        starts = torch.randint(len(train) - t, (batch_size,), generator=generator)  # [B]
        windows = train[starts[:, None] + torch.arange(t + 1)].long()  # [B, T+1]
        x, y = windows[:, :-1], windows[:, 1:]
        return Batch(x, y, torch.ones_like(x, dtype=torch.bool))

    def _windows(self, part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Consecutive windows from the start of ``part``, ``(inputs[n, T], targets[n, T])``: each
        target byte once, all inside ``part``; ``n`` as in the class docstring (``eval_tokens`` bounds it)."""
        t = self.hparams["seq_len"]
        n = min((len(part) - 1) // t, max(1, self.hparams["eval_tokens"] // t))
        return part[: n * t].long().view(n, t), part[1 : n * t + 1].long().view(n, t)

    def eval_windows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The validation windows that every periodic evaluation scores (see :meth:`_windows`)."""
        return self._windows(self.splits()[1])

    def test_windows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The test windows that the final test metrics score (see :meth:`_windows`)."""
        return self._windows(self.splits()[2])

    @torch.no_grad()
    def _score(self, model: nn.Module, windows: tuple[torch.Tensor, torch.Tensor], device: torch.device | str,
               batch_size: int) -> dict[str, float]:
        """Mean next-byte cross-entropy of ``model`` over ``windows`` as loss, perplexity and bits per byte."""
        was_training = model.training
        model.eval()
        x, y = windows
        total = 0.0
        try:
            for rows in batched(x.shape[0], batch_size):
                xb, yb = x[rows].to(device), y[rows].to(device)
                ce, _ = masked_scores(model(xb), yb, torch.ones_like(yb, dtype=torch.bool))
                total += ce.sum().item()
        finally:
            model.train(was_training)
        loss = total / y.numel()
        return {"loss": loss, "perplexity": perplexity(loss), "bpc": loss / math.log(2)}

    def evaluate(self, model: nn.Module, device: torch.device | str = "cpu", batch_size: int = 64) -> dict[str, float]:
        """Loss, perplexity and bpc on the validation windows (periodic evaluation)."""
        return self._score(model, self.eval_windows(), device, batch_size)

    def test_metrics(self, model: nn.Module, device: torch.device | str = "cpu", batch_size: int = 64) -> dict[str, float]:
        """Loss, perplexity and bpc on the test windows (once, after training)."""
        return self._score(model, self.test_windows(), device, batch_size)

    def test_metric_directions(self) -> dict[str, Direction]:
        return self.metric_directions()

    def metric_directions(self) -> dict[str, Direction]:
        return {"bpc": "minimize", "loss": "minimize", "perplexity": "minimize"}


@hookimpl
def register_tasks(register: Callable[..., None]) -> None:
    register(GroupWordProblem)
    register(S5WordProblem)
    register(MQAR)
    register(ByteLM)


__all__ = ["ByteLM", "GroupWordProblem", "MQAR", "S5WordProblem", "group_elements", "multiplication_table"]
