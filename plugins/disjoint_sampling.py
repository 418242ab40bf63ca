"""Train, validation and test sequences of a synthetic task, kept disjoint by content hash.

Synthetic tasks draw training data from the trainer's generator (seeded by the trial ``seed``) and
their validation and test sequences from two streams seeded by the task option ``eval_seed`` (default
0), not by the trial seed: a seed sweep retrains on new data but is scored on the same sequences.
Every whole sequence hashes to a bucket (:func:`psmsearch.tasks.sequence_bucket`): one sequence in
:data:`EVAL_BUCKETS` is held out and training rejects it, and the held-out ones are split again by the
same hash into validation (periodic evaluation) and test (the final ``test_`` metrics), so no two of
the three sets can share a sequence. :func:`sample_disjoint` does the rejecting for every part.

A helper of the built-in tasks plugin (:mod:`psmsearch.plugins.tasks`), not a plugin itself.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch

from psmsearch.tasks import sequence_bucket

EVAL_BUCKETS = 10  # one sequence in ten (by content hash) is held out: never trained on

Part = Literal["train", "validation", "test"]


def sample_disjoint(draw: Callable[[int], torch.Tensor], n: int, part: Part) -> torch.Tensor:
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
