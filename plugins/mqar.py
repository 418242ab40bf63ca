"""Multi-query associative recall (task ``mqar``): recall the value of each key queried again.

Validation and test sequences are kept apart from training sequences by
:mod:`psmsearch.plugins.disjoint_sampling`. A helper of the built-in tasks plugin
(:mod:`psmsearch.plugins.tasks`, which registers the task), not a plugin itself.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from psmsearch import HyperParameter
from psmsearch.errors import ConfigError
from psmsearch.plugins.disjoint_sampling import Part, sample_disjoint
from psmsearch.tasks import Batch, Direction, Task, batched, derive_seed, masked_scores


class MQAR(Task):
    """Multi-query associative recall (Zoology, Arora et al. 2023).

    A sequence starts with ``num_kv_pairs`` key-value pairs (keys from the lower half of the
    vocabulary, values from the upper half, token 0 reserved as filler), followed by queries: each
    key reappears once, at a slot drawn uniformly or with a power law favouring early slots, and
    the model must predict its value at the query position. Only query positions are scored.
    Periodic evaluation scores ``eval_samples`` validation sequences (``acc``, ``loss``); the final
    test metrics (``test_acc``, ``test_loss``) score as many test sequences. Both come from streams
    seeded by the option ``eval_seed`` (not the trial seed) and are disjoint from each other and from
    training by content hash (see :mod:`psmsearch.plugins.disjoint_sampling`).
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
        return self._batch(sample_disjoint(self._draw(generator), batch_size, "train"))

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
            self._held_out[part] = self._batch(sample_disjoint(self._draw(generator), self.hparams["eval_samples"], part))
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
