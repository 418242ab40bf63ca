"""Byte-level language modelling (task ``lm``) of a text file, a folder of split files or a Hugging
Face dataset.

The LM task splits a text file by byte offset rather than by content hash: training windows lie
wholly before the held-out tail, whose first half is validation and second half test (see
:class:`ByteLM`). Where the text comes from is :mod:`psmsearch.plugins.text_files` (local files) and
:mod:`psmsearch.plugins.hf_text` (Hugging Face datasets). A helper of the built-in tasks plugin
(:mod:`psmsearch.plugins.tasks`, which registers the task), not a plugin itself.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from psmsearch import HyperParameter
from psmsearch.errors import ConfigError
from psmsearch.plugins.hf_text import load_hf_text, require_datasets
from psmsearch.plugins.text_files import bytes_tensor, local_split_files, read_bytes, resolve_text_path, text_path_bases
from psmsearch.tasks import Batch, Direction, Task, batched, masked_scores, perplexity

DEFAULT_TEXT = "../shared/data/tinyshakespeare.txt"


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
    the part's size (its maximum, 2**30, always is) scores every whole window of the part: all of it
    but its first byte and its last partial window (fewer than ``seq_len`` bytes). Validation and test bytes are disjoint from each other and from every training window.

    ``bpc`` is bits per *byte* (``loss / ln 2``): the model predicts UTF-8 bytes, so for ASCII text
    such as tinyshakespeare it is bits per character, and for other text it is not (a character of
    several bytes costs the sum of its bytes' bits).
    """

    name = "lm"
    hyperparameters = (
        HyperParameter("seq_len", "int", 256, low=8, high=65536, log=True, help="training window (tokens)"),
        HyperParameter("val_fraction", "float", 0.1, low=0.01, high=0.5, help="held-out tail of the file: first half validation, second half test"),
        HyperParameter("eval_tokens", "int", 65536, low=256, high=2**30, log=True, help="tokens scored per evaluation (validation) and by the final test metrics (test): the first this many of each part, rounded down to whole windows of seq_len (at least one); 2**30 scores every whole window"),
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
                require_datasets(self.settings["dataset"])
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
            return ConfigError(
                f"text file {self.settings['path']!r} is a directory ({path}); task.path takes one text file, whose "
                "last val_fraction is held out; a folder of split files (train, valid or validation, and test: "
                ".txt, .raw or .tokens) goes in task.dataset instead",
                field="task.path",
            )
        if Path(self.settings["path"]).expanduser().is_absolute():
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
                train, validation, test = (read_bytes(files[split]) for split in ("train", "validation", "test"))
            elif dataset:
                hub_train, hub_validation, hub_test = load_hf_text(dataset)
                train, validation = bytes_tensor(hub_train), bytes_tensor(hub_validation)
                if hub_test is None:  # one held-out split: halved, both halves views of it
                    held_out = validation
                    validation, test = held_out[: len(held_out) // 2], held_out[len(held_out) // 2 :]
                else:
                    test = bytes_tensor(hub_test)
            else:
                path = resolve_text_path(self.settings["path"])
                if not path.is_file():
                    raise self._missing_file()
                whole = read_bytes(path)  # [size]: the three parts are views of it
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
