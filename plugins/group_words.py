"""The group word problem (tasks ``group`` and ``s5``): running products in a finite group.

The group tables (:func:`group_elements`, :func:`multiplication_table`) and the tasks built on them,
:class:`GroupWordProblem` and its S5 variant. Validation and test words are kept apart from training
words by :mod:`psmsearch.plugins.disjoint_sampling`. A helper of the built-in tasks plugin
(:mod:`psmsearch.plugins.tasks`, which registers the tasks), not a plugin itself.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from psmsearch import HyperParameter
from psmsearch.errors import ConfigError
from psmsearch.plugins.disjoint_sampling import Part, sample_disjoint
from psmsearch.tasks import Batch, Direction, Task, batched, derive_seed, length_tag


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
    """0 for an even permutation, 1 for an odd one (by counting inversions)."""
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
    each other and from training by content hash (see :mod:`psmsearch.plugins.disjoint_sampling`).
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
        words = sample_disjoint(self._words(generator, self.length), batch_size, "train")  # [B, T]
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
                words = sample_disjoint(self._words(generator, m * self.train_length), self.hparams["eval_samples"], part)
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
