"""Data parallelism: 2 gloo processes on loopback give the gradients of 1 process on the whole batch."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from psmsearch import distributed as dist
from psmsearch.config import ModelConfig
from psmsearch.model import build_model
from psmsearch.plugins.tasks import GroupWordProblem
from psmsearch.tasks import Batch
from psmsearch.trainer import TrainConfig, Trainer
from psmsearch.trial import TrialConfig, run_trial, run_trial_data_parallel

MODEL = ModelConfig(kind="gpt", d_model=16, n_layers=1, n_heads=2)
PSM = ModelConfig(kind="psm", d_model=16, n_layers=1, chunk_size=2, aggregator={"name": "attention", "heads": 2},
                  head={"name": "attention", "heads": 2})


def make_trainer(steps: int, model: ModelConfig = MODEL) -> Trainer:
    torch.manual_seed(0)
    task = GroupWordProblem(group="S3", train_length=6, curriculum=False, eval_max_multiple=1, eval_samples=8)
    return Trainer(build_model(model, task.vocab_size), task, TrainConfig(steps=steps, batch_size=6, warmup_steps=1, eval_every=100))


def uneven_batch() -> Batch:
    """A batch whose scored positions differ per row, so per-rank token counts differ."""
    g = torch.Generator().manual_seed(3)
    inputs = torch.randint(6, (6, 9), generator=g)
    mask = torch.rand(6, 9, generator=g) < torch.linspace(0.2, 0.9, 6)[:, None]
    return Batch(inputs, torch.randint(6, (6, 9), generator=g), mask)


def grads(trainer: Trainer) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in trainer.model.parameters()])


def weights(trainer: Trainer) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in trainer.model.parameters()])


def worker(rank: int, out_dir: str, model: dict | None = None) -> None:
    torch.set_num_threads(1)
    trainer = make_trainer(steps=3, model=MODEL if model is None else ModelConfig(**model))
    trainer.backward(uneven_batch())
    torch.save(grads(trainer), Path(out_dir) / f"grads{rank}.pt")
    trainer.optimizer.zero_grad()
    trainer.fit()
    torch.save(weights(trainer), Path(out_dir) / f"weights{rank}.pt")


def budget_worker(rank: int, out_dir: str) -> None:
    """A time-budgeted run in which rank 1's steps take 30 ms longer than rank 0's."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    task = GroupWordProblem(group="S3", train_length=6, curriculum=False, eval_max_multiple=1, eval_samples=8)
    config = TrainConfig(steps=None, time_budget_s=0.8, batch_size=6, warmup_steps=0, eval_every=10_000)
    trainer = Trainer(build_model(MODEL, task.vocab_size), task, config)
    sample = task.train_batch

    def slower_on_rank_1(*args: object, **kwargs: object) -> Batch:
        if rank == 1:
            time.sleep(0.03)
        return sample(*args, **kwargs)

    task.train_batch = slower_on_rank_1  # type: ignore[method-assign]
    trainer.fit()
    torch.save({"steps": trainer.step, "weights": weights(trainer)}, Path(out_dir) / f"budget{rank}.pt")


def test_ranks_with_a_time_budget_stop_together_with_equal_weights(tmp_path: Path) -> None:
    """Each rank timed itself: the slower rank stopped first while the other waited in a collective,
    and the ranks' learning rates (a function of elapsed time) differed, so replicas drifted apart."""
    dist.launch(budget_worker, 2, str(tmp_path))
    first, second = (torch.load(tmp_path / f"budget{rank}.pt") for rank in (0, 1))
    assert first["steps"] == second["steps"] > 1
    assert torch.equal(first["weights"], second["weights"])


@pytest.mark.parametrize("model", [MODEL, PSM], ids=["gpt", "psm"])
def test_two_processes_match_one_process(model: ModelConfig, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Gradients and weights; a PSM (whose parameters DDP is told all take part) without DDP's warning on
    every rank that its search for unused parameters found none."""
    dist.launch(worker, 2, str(tmp_path), model.model_dump(mode="json"))
    single = make_trainer(steps=3, model=model)
    single.backward(uneven_batch())
    reference = grads(single)
    single.optimizer.zero_grad()
    single.fit()
    for rank in (0, 1):
        torch.testing.assert_close(torch.load(tmp_path / f"grads{rank}.pt"), reference, atol=1e-6, rtol=1e-5)
        if model is MODEL:  # AdamW's first steps move a weight by about lr whatever the size of its gradient,
            # so the PSM's near-zero gradients (equal to 1e-6) can move its weights apart by up to 2 lr per step
            torch.testing.assert_close(torch.load(tmp_path / f"weights{rank}.pt"), weights(single), atol=1e-5, rtol=1e-4)
    assert "find_unused_parameters" not in capfd.readouterr().err


def test_data_parallel_trial_matches_single_process(capfd: pytest.CaptureFixture[str]) -> None:
    config = TrialConfig.from_dict({
        "task": {"name": "group", "group": "Z5", "train_length": 4, "eval_max_multiple": 2, "eval_samples": 16},
        "model": {"kind": "gpt", "d_model": 16, "n_layers": 1, "n_heads": 2},
        "train": {"steps": 4, "batch_size": 8, "warmup_steps": 1, "eval_every": 4},
        "metrics": {"enabled": False},
    })
    parallel, single = run_trial_data_parallel(config, 2), run_trial(config)
    for name in ("acc_1x", "acc_2x", "final_acc_2x", "train_loss", "test_acc_1x", "test_acc_2x"):  # rank 0 tests
        assert parallel[name] == pytest.approx(single[name], abs=1e-5)
    # GPT uses every parameter every step: no search for unused ones, so no DDP warning on any rank
    assert "find_unused_parameters" not in capfd.readouterr().err


def test_data_parallel_psm_with_a_curriculum_matches_single_process(capfd: pytest.CaptureFixture[str]) -> None:
    """The curriculum's first sequences fit in one chunk, so the aggregator takes no part in those steps:
    DDP once failed its reduction there (the shipped T-PSM example under --nproc 2). DDP's search for
    unused parameters, which fixed that, printed a warning on every rank once it found none."""
    config = TrialConfig.from_dict({
        "task": {"name": "group", "group": "S3", "train_length": 8, "curriculum": True, "eval_max_multiple": 2,
                 "eval_samples": 16},
        "model": {"kind": "psm", "d_model": 16, "n_layers": 1, "chunk_size": 4, "encoder": "embed",
                  "aggregator": {"name": "attention", "layers": 1, "heads": 2},
                  "head": {"name": "attention", "layers": 1, "heads": 2}},
        "train": {"steps": 6, "batch_size": 8, "warmup_steps": 1, "eval_every": 6},
        "metrics": {"enabled": False},
    })
    parallel, single = run_trial_data_parallel(config, 2), run_trial(config)
    for name in ("acc_1x", "acc_2x", "train_loss"):
        assert parallel[name] == pytest.approx(single[name], abs=1e-5)
    assert "find_unused_parameters" not in capfd.readouterr().err


def test_data_parallel_trial_writes_and_resumes_a_checkpoint(tmp_path: Path) -> None:
    """--nproc once dropped --checkpoint and --resume silently."""
    config = TrialConfig.from_dict({
        "task": {"name": "group", "group": "Z5", "train_length": 4, "eval_max_multiple": 2, "eval_samples": 16},
        "model": {"kind": "gpt", "d_model": 16, "n_layers": 1, "n_heads": 2},
        "train": {"steps": 3, "batch_size": 8, "warmup_steps": 1, "eval_every": 3},
        "metrics": {"enabled": False},
    })
    checkpoint, copy = tmp_path / "ddp.pt", tmp_path / "single.pt"
    run_trial_data_parallel(config, 2, checkpoint_path=checkpoint)
    assert torch.load(checkpoint, weights_only=True)["step"] == 3
    copy.write_bytes(checkpoint.read_bytes())
    longer = config.model_copy(update={"train": config.train.model_copy(update={"steps": 5})})
    resumed = run_trial_data_parallel(longer, 2, checkpoint_path=checkpoint, resume=True)
    assert resumed["train_steps"] == 5 and torch.load(checkpoint, weights_only=True)["step"] == 5
    single = run_trial(longer, checkpoint_path=copy, resume=True)  # the same checkpoint, one process
    for name in ("acc_1x", "acc_2x", "train_loss"):
        assert resumed[name] == pytest.approx(single[name], abs=1e-5)


def test_helpers_are_identity_outside_a_process_group() -> None:
    batch = uneven_batch()
    assert dist.shard(batch) is batch and dist.world_size() == 1 and dist.rank() == 0
    t = torch.ones(3)
    assert dist.all_reduce_sum(t) is t
    assert dist.default_backend("cpu") == "gloo"

