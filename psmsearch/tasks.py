"""Task contract: a data source plus the evaluation protocol and metrics a trial reports.

Tasks are registered by plugins through ``register_tasks(register)``. A task is built as
``TaskClass(seed=..., **params)`` where ``params`` are its declared :attr:`Task.hyperparameters`
(searchable) and :attr:`Task.options` (plain settings such as a file path). The trainer only needs:

* :attr:`Task.vocab_size` — token ids lie in ``[0, vocab_size)``;
* :meth:`Task.train_batch` — a :class:`Batch` for a step, drawn from a ``torch.Generator`` the
  trainer owns (so a checkpoint can restore the data stream exactly);
* :meth:`Task.observe_train` — training accuracy after each step (curricula use it), with
  :meth:`Task.state_dict` / :meth:`Task.load_state_dict` so a curriculum survives a checkpoint;
* :meth:`Task.evaluate` — the evaluation protocol, returning a flat ``{metric: float}``;
* :meth:`Task.metric_directions` — the name and direction of every metric :meth:`evaluate` reports,
  so a search can validate its objectives before running anything;
* :meth:`Task.test_metrics` / :meth:`Task.test_metric_directions` (optional; default none) — final
  metrics on a test set that :meth:`evaluate` never scores. The trial runner calls it once, after
  training, and reports its metrics with the prefix :data:`TEST_PREFIX` (``loss`` -> ``test_loss``).
  Periodic evaluations, which drive pruning, only ever run :meth:`evaluate`, so a search that
  selects on the validation metrics leaves the test metrics an unbiased estimate of the selected trial.

Metric names use only letters, digits and underscores (``acc_4x``, not ``acc@4x``): MLflow rejects
``@`` in metric names and Ray Tune splits keys on ``/``. Names starting with ``test_`` are reserved
for the prefixed test metrics.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Literal, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from psmsearch.components import HyperParameter
from psmsearch.errors import ConfigError

Direction = Literal["maximize", "minimize"]

TEST_PREFIX = "test_"
"""Prefix of the final test-set metrics in a trial's metrics (``test_perplexity``)."""


@dataclass
class Batch:
    """One batch of a task: ``inputs[B, T]`` token ids, ``targets[B, T]`` ids and ``mask[B, T]``.

    The loss and accuracy are taken over positions where ``mask`` is True only.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.inputs.to(device), self.targets.to(device), self.mask.to(device))

    def rows(self, index: slice | torch.Tensor) -> "Batch":
        """The sub-batch of the given rows (data-parallel sharding)."""
        return Batch(self.inputs[index], self.targets[index], self.mask[index])

    @property
    def num_tokens(self) -> int:
        return int(self.inputs.numel())


LAUNCH_DIR_ENV = "PSMSEARCH_LAUNCH_DIR"
"""Environment variable holding the directory the ``psmsearch`` command was started in. The CLI sets it;
subprocesses and Ray workers inherit it, so a task can resolve a relative data path as the user meant
it even where a trial runs in a working directory of its own (Ray Tune's trial directories)."""


class Task:
    """Base class of tasks: declares its name, hyperparameters and options like components do."""

    kind: ClassVar[str] = "task"
    name: ClassVar[str] = ""
    hyperparameters: ClassVar[Sequence[HyperParameter]] = ()
    options: ClassVar[Mapping[str, Any]] = {}
    """Non-searchable settings with their defaults (e.g. a data path); the default's type is enforced."""
    option_types: ClassVar[Mapping[str, type]] = {}
    """The type of an option whose default is ``None`` (which says nothing of the type): ``{"dataset": str}``."""
    description: ClassVar[str] = ""

    def __init__(self, seed: int = 0, **params: Any) -> None:
        given_options = {k: params.pop(k) for k in list(params) if k in self.options}
        self.seed = int(seed)
        self.hparams = self.resolve_hyperparameters(params)
        self.settings = self.resolve_options(given_options)

    @classmethod
    def resolve_hyperparameters(cls, given: dict[str, Any]) -> dict[str, Any]:
        """Defaults filled in and values validated, as for components.

        Raises :class:`~psmsearch.errors.ConfigError` with ``field = "task.<name>"`` naming the value and
        what is allowed (unknown names list the declared hyperparameters and options).
        """
        declared = {hp.name: hp for hp in cls.hyperparameters}
        unknown = sorted(set(given) - set(declared) - set(cls.options))
        if unknown:
            allowed = ", ".join(sorted([*declared, *cls.options])) or "none"
            raise ConfigError(
                f"task {cls.name!r} has no parameter {unknown[0]!r}; allowed: {allowed}", field=f"task.{unknown[0]}"
            )
        resolved: dict[str, Any] = {}
        for name, hp in declared.items():
            try:
                resolved[name] = hp.validate(given.get(name, hp.default))
            except ValueError as err:
                raise ConfigError(f"task {cls.name!r}: {err}", field=f"task.{name}") from None
        return resolved

    @classmethod
    def resolve_options(cls, given: dict[str, Any]) -> dict[str, Any]:
        """Options with defaults filled in; a value must have its default's type, or the one
        :attr:`option_types` declares where the default is ``None`` (or be null)."""
        resolved = dict(cls.options)
        for key, value in given.items():
            default = cls.options[key]
            expected = cls.option_types.get(key) or (type(default) if default is not None else None)
            if value is not None and expected is not None and (
                    not isinstance(value, expected) or isinstance(value, bool) and expected is not bool):
                raise ConfigError(
                    f"task {cls.name!r}: {value!r} is not a {expected.__name__}", field=f"task.{key}"
                )
            resolved[key] = value
        return resolved

    def check(self) -> None:
        """Cheap checks that need the environment (a file exists, a package imports); ConfigError if not."""

    # -- data -----------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Token ids (inputs and targets) lie in ``[0, vocab_size)``."""
        raise NotImplementedError(_missing(self, "vocab_size"))

    def train_batch(self, step: int, batch_size: int, generator: torch.Generator) -> Batch:
        """The training batch for ``step``, drawn from ``generator`` only (never from global RNG)."""
        raise NotImplementedError(_missing(self, "train_batch"))

    def observe_train(self, step: int, accuracy: float) -> None:
        """Told the training accuracy of ``step``'s batch; a curriculum may advance here."""

    def state_dict(self) -> dict[str, Any]:
        """Mutable task state (a curriculum position) to checkpoint; ints/floats/strings only."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    # -- evaluation -----------------------------------------------------------------------------

    def evaluate(self, model: nn.Module, device: torch.device | str = "cpu", batch_size: int = 64) -> dict[str, float]:
        """Run the evaluation protocol on held-out data; returns ``{metric: value}``."""
        raise NotImplementedError(_missing(self, "evaluate"))

    def metric_directions(self) -> dict[str, Direction]:
        """Every metric :meth:`evaluate` reports and whether larger (maximize) or smaller is better."""
        raise NotImplementedError(_missing(self, "metric_directions"))

    def test_metrics(self, model: nn.Module, device: torch.device | str = "cpu", batch_size: int = 64) -> dict[str, float]:
        """Final metrics on the task's test set, ``{metric: value}`` without the ``test_`` prefix.

        Called once by the trial runner after training ends, never by periodic evaluations (so
        pruning and early stopping never see the test set). The test set must be disjoint from the
        training data and from what :meth:`evaluate` scores. Default: no test set, no metrics.
        """
        return {}

    def test_metric_directions(self) -> dict[str, Direction]:
        """Every metric :meth:`test_metrics` reports (unprefixed) and its direction; default none."""
        return {}

    @property
    def train_sequence_length(self) -> tuple[int, str] | None:
        """The longest training sequence and the parameter that sets it (``(16, "train_length")``).

        A PSM's chunk size may not exceed it: a chunk longer than every training sequence never
        completes, so its aggregator would never be trained. ``None``: no fixed length.
        """
        return None

    @property
    def default_objective(self) -> str:
        """The metric a search optimises when the user names none."""
        return next(iter(self.metric_directions()))

    def describe(self) -> dict[str, Any]:
        """Flat parameters for tracking: ``{"task": name, "task.<param>": value, ...}``."""
        out: dict[str, Any] = {"task": self.name}
        out.update({f"task.{k}": v for k, v in {**self.hparams, **self.settings}.items()})
        return out


# -- helpers shared by task implementations --------------------------------------------------------


def derive_seed(seed: int, stream: str) -> int:
    """A seed for a named random stream (``"train"``, ``"eval"``) that is stable across runs.

    Python's ``hash`` of a string is salted per process, so a small FNV-1a is used instead.
    """
    h = 0xCBF29CE484222325
    for byte in f"{seed}:{stream}".encode():
        h = ((h ^ byte) * 0x100000001B3) % 2**64
    return h % 2**63


def sequence_bucket(tokens: torch.Tensor, buckets: int) -> torch.Tensor:
    """``tokens[B, T] -> bucket[B]`` in ``[0, buckets)``: a fixed hash of each whole sequence.

    Tasks hold out bucket 0 for evaluation and never train on it, so training and evaluation
    sequences are disjoint by construction, not merely improbable to collide. The hash mixes the
    length in, so a sequence's bucket does not depend on the batch it came in.
    """
    length = tokens.shape[-1]
    prime = 2_147_483_647  # 2^31 - 1; products of two residues stay inside int64
    h = torch.full(tokens.shape[:-1], (length * 2_654_435_761) % prime, dtype=torch.int64)
    for t in range(length):
        h = (h * 1_000_003 + tokens[..., t].long() + 1) % prime
        h = (h ^ (h >> 13)) % prime
    return h % buckets


@torch.no_grad()
def masked_scores(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits[B, T, V]`` -> (cross-entropy ``[B, T]``, correct ``[B, T]`` as float), zero off ``mask``."""
    ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none").view_as(targets)
    correct = (logits.argmax(-1) == targets).float()
    m = mask.float()
    return ce * m, correct * m


def batched(n: int, batch_size: int) -> Iterable[slice]:
    """Slices covering ``range(n)`` in pieces of at most ``batch_size``."""
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


def length_tag(multiple: int | float) -> str:
    """``4 -> "4x"`` for metric names."""
    return f"{multiple:g}x"


def count_tag(n: int) -> str:
    """``65536 -> "64k"``, ``1000 -> "1000"``: short, metric-name-safe token counts."""
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024}k"
    return str(n)


def perplexity(loss: float) -> float:
    """``exp(loss)``, capped so a diverged model reports a large finite number."""
    return math.exp(min(loss, 50.0))


def _missing(task: Task, method: str) -> str:
    """Why a required method raised: which task class, which method, and where the contract is described."""
    cls = type(task)
    return (f"{cls.__qualname__} (task {cls.name!r}, in {_defined_in(cls)}) does not implement {method}, which every "
            "task must; see the docstring of psmsearch.tasks.Task")


def _defined_in(cls: type) -> str:
    """The file that defines ``cls`` (a plugin loaded from a path has a generated module name)."""
    module = sys.modules.get(cls.__module__)
    return getattr(module, "__file__", None) or cls.__module__
