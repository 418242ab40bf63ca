"""Trainer: determinism, checkpoint resume, schedule, pruning and divergence."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from psmsearch.config import ModelConfig
from psmsearch.model import build_model
from psmsearch.plugins.tasks import GroupWordProblem
from psmsearch.trainer import TrainConfig, Trainer, TrialDiverged, TrialPruned, training_seed

MODEL = ModelConfig(
    d_model=16, chunk_size=2, aggregator={"name": "attention", "layers": 1, "heads": 2},
    head={"name": "attention", "layers": 1, "heads": 2},
)


def make_trainer(steps: int = 12, seed: int = 0, dropout: float = 0.0, **train: object) -> Trainer:
    torch.manual_seed(seed)
    task = GroupWordProblem(group="S3", train_length=6, eval_max_multiple=2, eval_samples=16, curriculum_threshold=0.3)
    model = build_model(MODEL.model_copy(update={"dropout": dropout}), task.vocab_size)
    config = TrainConfig(steps=steps, batch_size=8, **{"warmup_steps": 3, "eval_every": 5, **train})
    return Trainer(model, task, config, seed=seed)


def params(trainer: Trainer) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in trainer.model.parameters()])


def test_same_seed_same_metrics_and_weights() -> None:
    a, b = make_trainer(), make_trainer()
    ra, rb = a.fit(), b.fit()
    assert ra.metrics == rb.metrics and ra.steps == rb.steps == 12
    assert torch.equal(params(a), params(b))
    c = make_trainer(seed=1)
    c.fit()
    assert not torch.equal(params(a), params(c))


def test_restored_checkpoint_continues_identically(tmp_path: Path) -> None:
    straight = make_trainer(steps=12)
    straight_result = straight.fit()

    first = make_trainer(steps=12, checkpoint_every=6)
    first.checkpoint_path = tmp_path / "ckpt.pt"
    first.fit(stop_at=6)
    resumed = make_trainer(steps=12, seed=5)  # different init: everything must come from the file
    resumed.load_checkpoint(tmp_path / "ckpt.pt")
    assert resumed.step == 6 and resumed.task.length == first.task.length
    result = resumed.fit()
    assert torch.equal(params(resumed), params(straight))
    assert result.metrics["acc_1x"] == straight_result.metrics["acc_1x"]
    assert result.metrics["train_loss"] == straight_result.metrics["train_loss"], "the last 50 losses are in the checkpoint"


def test_resuming_a_finished_checkpoint_reports_the_finished_run(tmp_path: Path) -> None:
    """Nothing is left to train; the evaluation and train_loss are the finished run's, not NaN."""
    finished = make_trainer(steps=12)
    finished.checkpoint_path = tmp_path / "ckpt.pt"
    done = finished.fit()
    again = make_trainer(steps=12, seed=5)
    again.load_checkpoint(tmp_path / "ckpt.pt")
    result = again.fit()
    assert result.steps == 12 and result.metrics == done.metrics


def test_nan_outputs_at_evaluation_fail_the_trial_instead_of_being_scored() -> None:
    """Training at short curriculum lengths may never reach a broken aggregator; argmax of NaN
    logits is class 0, which would be scored as predictions."""

    class NaNWhenEvaluating(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            logits = self.inner(tokens)
            return logits if self.training else logits * float("nan")

    trainer = make_trainer(steps=10)
    trainer.model = NaNWhenEvaluating(trainer.model)
    trainer.parallel = trainer.model
    with pytest.raises(TrialDiverged) as info:
        trainer.fit()
    assert info.value.step == 5 and "evaluation: the model's outputs hold NaN or inf" in info.value.reason


def test_checkpoint_loads_with_weights_only(tmp_path: Path) -> None:
    trainer = make_trainer(steps=2)
    trainer.fit()
    trainer.save_checkpoint(tmp_path / "c.pt")
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    assert state["step"] == 2 and set(state) >= {"model", "optimizer", "generator", "task"}


def test_warmup_then_cosine_schedule() -> None:
    """Steps 0..102 with 3 warmup steps: the decay runs over steps 3..102, so its middle is step 52.5."""
    trainer = make_trainer(steps=103, lr=1.0, min_lr_ratio=0.1)
    assert trainer.lr_at(0, 0) == pytest.approx(1 / 3)
    assert trainer.lr_at(2, 0) == pytest.approx(1.0)
    assert trainer.lr_at(3, 0) == pytest.approx(1.0)
    assert (trainer.lr_at(52, 0) + trainer.lr_at(53, 0)) / 2 == pytest.approx(0.55, abs=1e-4)
    assert trainer.lr_at(52, 0) - 0.55 == pytest.approx(0.55 - trainer.lr_at(53, 0))  # symmetric about the middle
    assert trainer.lr_at(102, 0) == pytest.approx(0.1)


def test_the_last_step_trains_at_the_minimum_learning_rate() -> None:
    """The decay once ended at progress 7/8 (4.03e-4 here, not 3e-4): the lrs the optimiser actually used."""
    trainer = make_trainer(steps=12, warmup_steps=4, lr=3e-3, min_lr_ratio=0.1)
    used: list[float] = []
    step = trainer.optimizer.step

    def record(*args: object, **kwargs: object) -> object:
        used.append(trainer.optimizer.param_groups[0]["lr"])
        return step(*args, **kwargs)

    trainer.optimizer.step = record  # type: ignore[method-assign]
    trainer.fit()
    assert used[:4] == pytest.approx([7.5e-4, 1.5e-3, 2.25e-3, 3e-3])  # linear warmup
    assert used[4] == pytest.approx(3e-3) and used[-1] == pytest.approx(3e-4, rel=1e-9)
    assert all(a > b for a, b in zip(used[4:], used[5:]))
    assert used[4] + used[11] == pytest.approx(used[7] + used[8]) == pytest.approx(3.3e-3)  # cosine: point-symmetric


@pytest.mark.parametrize(("steps", "warmup"), [(4, 3), (2, 0), (1, 0)])
def test_a_budget_with_one_step_after_warmup_ends_at_the_minimum_too(steps: int, warmup: int) -> None:
    """With ``steps == warmup + 1`` the decay had no length: the one post-warmup step trained at ``lr``."""
    trainer = make_trainer(steps=steps, warmup_steps=warmup, lr=1.0, min_lr_ratio=0.1)
    assert trainer.lr_at(steps - 1, 0) == pytest.approx(0.1)
    assert [trainer.lr_at(s, 0) for s in range(warmup)] == pytest.approx([(s + 1) / warmup for s in range(warmup)])


def test_callback_sees_evaluations_and_can_prune() -> None:
    seen: list[int] = []

    def callback(step: int, metrics: dict[str, float]) -> None:
        seen.append(step)
        assert {"acc_1x", "acc_2x", "train_loss"} <= set(metrics)
        if step >= 10:
            raise TrialPruned(f"pruned at {step}")

    trainer = make_trainer(steps=30)
    trainer.callback = callback
    with pytest.raises(TrialPruned, match="pruned at 10"):
        trainer.fit()
    assert seen == [5, 10]


def test_evaluates_at_the_end_when_budget_is_not_a_multiple() -> None:
    steps: list[int] = []
    trainer = make_trainer(steps=7)
    trainer.callback = lambda step, metrics: steps.append(step)
    trainer.fit()
    assert steps == [5, 7]


def test_time_budget_stops_training() -> None:
    trainer = make_trainer(steps=None, time_budget_s=0.5)
    result = trainer.fit()
    assert 0.5 <= result.seconds < 5 and result.steps >= 1 and result.tokens_per_s > 0


class Exploding(nn.Module):
    """Wraps a model and returns NaN logits from the given forward call on."""

    def __init__(self, inner: nn.Module, after: int) -> None:
        super().__init__()
        self.inner, self.after, self.calls = inner, after, 0

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        logits = self.inner(tokens)
        return logits * float("nan") if self.training and self.calls > self.after else logits


def test_divergence_raises_with_reason() -> None:
    trainer = make_trainer(steps=10)
    trainer.model = Exploding(trainer.model, after=3)
    trainer.parallel = trainer.model
    with pytest.raises(TrialDiverged) as info:
        trainer.fit()
    assert info.value.step == 3 and "loss is nan" in info.value.reason


def test_needs_a_budget() -> None:
    with pytest.raises(ValueError, match="budget"):
        TrainConfig(steps=None, time_budget_s=None)


def test_dropout_masks_come_from_the_trial_seed_not_the_global_generator() -> None:
    """Dropout drew from torch's unseeded global generator: same seed, different runs. Whatever the
    global generator holds when training starts, the same seed gives the same weights."""
    runs = []
    for global_seed in (1, 2):
        trainer = make_trainer(dropout=0.3)
        torch.manual_seed(global_seed)
        outside = torch.get_rng_state()
        trainer.fit()
        assert torch.equal(torch.get_rng_state(), outside), "training leaves the caller's generator alone"
        runs.append(params(trainer))
    assert torch.equal(runs[0], runs[1])
    other_seed = make_trainer(dropout=0.3, seed=1)
    other_seed.model.load_state_dict(make_trainer(dropout=0.3).model.state_dict())  # same init: only masks differ
    other_seed.generator.manual_seed(0)  # and the same data
    other_seed.fit()
    assert not torch.equal(params(other_seed), runs[0]), "the training stream follows the seed"
    no_dropout = make_trainer()
    no_dropout.fit()
    assert not torch.equal(params(no_dropout), runs[0]), "dropout was in effect"


def test_training_streams_differ_per_seed_and_rank() -> None:
    seeds = {training_seed(seed, rank) for seed in range(3) for rank in range(3)}
    assert len(seeds) == 9 and all(0 <= s < 2**63 for s in seeds) and training_seed(0) not in range(3)


def test_resume_with_dropout_continues_as_the_uninterrupted_run(tmp_path: Path) -> None:
    """The checkpoint holds the training stream; a resumed process's own global generator does not matter."""
    straight = make_trainer(steps=10, dropout=0.3)
    straight.fit()
    first = make_trainer(steps=10, dropout=0.3)
    first.checkpoint_path = tmp_path / "ckpt.pt"
    first.fit(stop_at=4)
    resumed = make_trainer(steps=10, seed=5, dropout=0.3)
    resumed.load_checkpoint(tmp_path / "ckpt.pt")
    torch.manual_seed(1234)  # as a fresh process would have it: unrelated to the run
    resumed.fit()
    assert torch.equal(params(resumed), params(straight))
