"""Training-time randomness follows the trial seed: in threads of one process (``--jobs N``) and per rank."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from psmsearch.trial import TrialConfig, run_trial, run_trial_data_parallel

CONFIG = {
    "task": {"name": "group", "group": "Z5", "train_length": 8, "eval_max_multiple": 2, "eval_samples": 16},
    "model": {"d_model": 16, "chunk_size": 2, "dropout": 0.3, "aggregator": {"name": "mlp", "mlp_ratio": 1},
              "head": {"name": "attention", "layers": 1, "heads": 2}},
    "train": {"steps": 6, "batch_size": 8, "eval_every": 6, "warmup_steps": 1},
    "metrics": {"enabled": False},
    "threads": 1,
}


def test_concurrent_trials_with_dropout_match_a_trial_run_alone() -> None:
    """Threads share torch's global generator; each trial's steps swap in its own stream under a lock."""
    config = TrialConfig.from_dict(CONFIG)
    alone = run_trial(config)
    with ThreadPoolExecutor(max_workers=3) as pool:
        together = list(pool.map(lambda _: run_trial(config), range(3)))
    for metrics in together:
        assert metrics["train_loss"] == alone["train_loss"] and metrics["acc_2x"] == alone["acc_2x"]
    other = run_trial(TrialConfig.from_dict({**CONFIG, "seed": 1}))
    assert other["train_loss"] != alone["train_loss"]


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_only_models_that_draw_random_numbers_take_the_training_stream_lock(dropout: float) -> None:
    """Trials in threads serialise their steps only when they need the stream: the first step decides."""
    import threading

    from psmsearch.model import build_model
    from psmsearch.trainer import _GLOBAL_RNG_LOCK, Trainer
    from psmsearch.trial import make_task

    config = TrialConfig.from_dict({**CONFIG, "model": {**CONFIG["model"], "dropout": dropout}})
    task = make_task(config)
    trainer = Trainer(build_model(config.model, task.vocab_size), task, config.train)
    assert trainer.draws_random is None
    trainer.train_step()
    assert trainer.draws_random is (dropout > 0)
    step = threading.Thread(target=trainer.train_step, daemon=True)
    with _GLOBAL_RNG_LOCK:  # as a trial with dropout in another thread holds it during its step
        step.start()
        step.join(timeout=2)  # a step takes ~50 ms: still running after 2 s means blocked
        blocked = step.is_alive()
    step.join(timeout=30)
    assert blocked is (dropout > 0) and not step.is_alive()


@pytest.mark.slow  # three 2-process launches: ~30 s on a 2-core CPU
def test_data_parallel_dropout_resumes_as_the_uninterrupted_run(tmp_path: Path) -> None:
    """Each rank has its own stream, saved in the checkpoint: 3 steps + resume to 5 equals 5 straight
    (a constant learning rate, so the shorter first budget does not change the schedule)."""
    base = {**CONFIG, "model": {**CONFIG["model"], "kind": "gpt", "n_heads": 2, "chunk_size": 1},
            "train": {**CONFIG["train"], "warmup_steps": 0, "min_lr_ratio": 1.0, "eval_every": 100}}
    base["model"] = {k: v for k, v in base["model"].items() if k not in ("aggregator", "head", "chunk_size")}
    short = TrialConfig.from_dict({**base, "train": {**base["train"], "steps": 3}})
    full = TrialConfig.from_dict({**base, "train": {**base["train"], "steps": 5}})
    straight = run_trial_data_parallel(full, 2)
    checkpoint = tmp_path / "ddp.pt"
    run_trial_data_parallel(short, 2, checkpoint_path=checkpoint)
    streams = torch.load(checkpoint, weights_only=True)["rank_rng"]
    assert len(streams) == 2 and not torch.equal(streams[0]["cpu"], streams[1]["cpu"])
    resumed = run_trial_data_parallel(full, 2, checkpoint_path=checkpoint, resume=True)
    assert resumed["train_steps"] == 5
    for name in ("train_loss", "acc_1x", "acc_2x"):
        assert resumed[name] == pytest.approx(straight[name], abs=1e-6)
