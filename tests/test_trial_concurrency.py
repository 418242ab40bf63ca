"""Trials run as threads of one process (``--jobs N``) get the same result as a trial run alone."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from psmsearch.trial import TrialConfig, run_trial

CONFIG = {
    "task": {"name": "group", "group": "Z5", "train_length": 8, "eval_max_multiple": 2, "eval_samples": 16},
    "model": {"d_model": 16, "chunk_size": 2, "aggregator": {"name": "mlp", "mlp_ratio": 1}, "head": {"name": "attention", "layers": 1, "heads": 2}},
    "train": {"steps": 4, "batch_size": 8, "eval_every": 4, "warmup_steps": 1},
    "metrics": {"enabled": False},
    "threads": 1,
}


def test_concurrent_trials_match_a_trial_run_alone() -> None:
    config = TrialConfig.from_dict(CONFIG)
    alone = run_trial(config)
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(lambda _: run_trial(config), range(4)))
    for metrics in together:
        assert metrics["train_loss"] == alone["train_loss"]
        assert metrics["acc_2x"] == alone["acc_2x"]
