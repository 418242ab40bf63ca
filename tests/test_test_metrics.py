"""Final test-set metrics: computed once after training, prefixed ``test_``, never seen by periodic
evaluations (pruning), and usable as search objectives end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from psmsearch.plugins.tasks import ByteLM, GroupWordProblem
from psmsearch.tasks import Task
from psmsearch.trainer import TrainConfig, Trainer, TrialDiverged
from psmsearch.trial import TrialConfig, TrialPhaseError, metric_directions, run_trial

from clihelpers import run_cli
from searchhelpers import mlflow_runs, optuna_trials, write_space

SHAKESPEARE = Path(__file__).resolve().parents[1] / "../shared/data/tinyshakespeare.txt"

TINY_MODEL = {"kind": "gpt", "d_model": 16, "n_layers": 1, "n_heads": 2}
LM_TASK = {"name": "lm", "path": str(SHAKESPEARE), "seq_len": 32, "val_fraction": 0.02, "eval_tokens": 1024}
GROUP_TASK = {"name": "group", "group": "Z5", "train_length": 4, "eval_max_multiple": 2, "eval_samples": 16,
              "curriculum": False}


def tiny_config(task: dict) -> TrialConfig:
    return TrialConfig.from_dict({
        "task": task, "model": TINY_MODEL, "metrics": {"enabled": False},
        "train": {"steps": 4, "batch_size": 4, "warmup_steps": 1, "eval_every": 2, "eval_batch_size": 16},
    })


def test_lm_trial_reports_test_metrics_once_and_no_evaluation_sees_them() -> None:
    seen: list[tuple[int, dict[str, float]]] = []
    metrics = run_trial(tiny_config(LM_TASK), lambda step, m: seen.append((step, dict(m))))
    assert [step for step, _ in seen] == [2, 4]
    assert not any(name.startswith("test_") for _, evaluation in seen for name in evaluation)
    assert {"test_loss", "test_perplexity", "test_bpc", "loss", "perplexity", "bpc"} <= set(metrics)
    assert metrics["test_perplexity"] == pytest.approx(math.exp(metrics["test_loss"]))
    assert metrics["test_bpc"] == pytest.approx(metrics["test_loss"] / math.log(2))
    assert metrics["test_loss"] != metrics["loss"]  # scored on other bytes than validation
    assert metrics["loss"] == seen[-1][1]["loss"]  # the reported validation metrics are the last evaluation's
    directions = metric_directions(tiny_config(LM_TASK))
    assert {directions[f"test_{m}"] for m in ("loss", "perplexity", "bpc")} == {"minimize"}


def test_trainer_scores_the_test_set_only_when_asked() -> None:
    """fit() runs periodic evaluations only; test_metrics() is the task's test score of the model, prefixed."""
    calls: list[str] = []

    class Counting(ByteLM):
        def test_metrics(self, model: nn.Module, device: torch.device | str = "cpu", batch_size: int = 64) -> dict[str, float]:
            calls.append("test")
            return super().test_metrics(model, device, batch_size)

    task = Counting(path=str(SHAKESPEARE), seq_len=16, val_fraction=0.02, eval_tokens=512)
    torch.manual_seed(0)
    model = nn.Embedding(256, 256)
    trainer = Trainer(model, task, TrainConfig(steps=3, batch_size=2, warmup_steps=1, eval_every=1))
    trainer.fit()
    assert calls == []
    tested = trainer.test_metrics()
    assert calls == ["test"]
    assert tested == {f"test_{k}": v for k, v in task.test_metrics(model).items()}


def test_nan_outputs_on_the_test_set_fail_the_trial_naming_the_test_evaluation() -> None:
    task = GroupWordProblem(group="S3", train_length=4, eval_max_multiple=1, eval_samples=8)

    class NaNModel(nn.Module):
        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return torch.full((*tokens.shape, 6), float("nan"))

    model = NaNModel()
    model.dummy = nn.Parameter(torch.zeros(1))  # the optimiser needs a parameter
    trainer = Trainer(model, task, TrainConfig(steps=1, batch_size=2, warmup_steps=0))
    with pytest.raises(TrialDiverged, match=r"test evaluation: the model's outputs hold NaN or inf on test evaluation"):
        trainer.test_metrics()


def test_a_failing_test_metric_names_its_phase_and_keeps_the_validation_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: Task, model: nn.Module, device: object = "cpu", batch_size: int = 64) -> dict[str, float]:
        raise ValueError("test set unavailable")

    monkeypatch.setattr(GroupWordProblem, "test_metrics", broken)
    with pytest.raises(TrialPhaseError) as info:
        run_trial(tiny_config(GROUP_TASK))
    assert info.value.phase == "computing test metrics"
    assert "computing test metrics: ValueError: test set unavailable" in str(info.value)
    assert "acc_2x" in info.value.metrics and not any(k.startswith("test_") for k in info.value.metrics)


def test_a_task_without_a_test_set_reports_no_test_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    """Third-party tasks written before the hook inherit Task's defaults and keep working."""
    monkeypatch.setattr(GroupWordProblem, "test_metrics", Task.test_metrics)
    monkeypatch.setattr(GroupWordProblem, "test_metric_directions", Task.test_metric_directions)
    metrics = run_trial(tiny_config(GROUP_TASK))
    assert "acc_2x" in metrics and not any(k.startswith("test_") for k in metrics)
    assert not any(k.startswith("test_") for k in metric_directions(tiny_config(GROUP_TASK)))


@pytest.mark.slow  # two CLI subprocesses and a 2-trial search: ~20 s on a 2-core machine
def test_a_search_can_optimise_a_test_metric_end_to_end(tmp_path: Path) -> None:
    """test_perplexity as the objective: Optuna's values, MLflow's runs and the summary all hold it,
    and MLflow's step metrics (the periodic evaluations) never do."""
    space = write_space(
        tmp_path,
        task=LM_TASK,
        model={"kind": "gpt", "d_model": {"choice": [8, 16]}, "n_layers": 1, "n_heads": 2},
        train={"steps": 4, "batch_size": 4, "warmup_steps": 1, "eval_every": 2, "eval_batch_size": 16},
        metrics={"enabled": False},
        objectives=[{"metric": "test_perplexity", "direction": "minimize"}],
        driver={"trials": 2, "startup_trials": 1, "pruner": "median"},
    )
    result = run_cli("search", str(space), "--json", "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    trials = optuna_trials(tmp_path / "psmsearch.db")
    assert len(trials) == 2 and all(t.value == t.user_attrs["metrics"]["test_perplexity"] for t in trials)
    assert [row["objectives"]["test_perplexity"] for row in summary["trials"]] == sorted(t.value for t in trials)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    children = [r for r in mlflow_runs(tmp_path / "mlflow.db") if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2
    for run in children:
        assert run.data.metrics["test_perplexity"] == pytest.approx(math.exp(run.data.metrics["test_loss"]))
        assert len(client.get_metric_history(run.info.run_id, "test_perplexity")) == 1  # logged once, at the end
        assert [m.step for m in client.get_metric_history(run.info.run_id, "perplexity")] == [2, 4, 0]
    compared = run_cli("compare", "--experiment", "tiny", "--json", cwd=tmp_path)
    assert compared.returncode == 0, compared.stderr
    ranked = json.loads(compared.stdout.strip().splitlines()[-1])
    assert [t["objectives"]["test_perplexity"] for t in ranked["trials"]] == sorted(t.value for t in trials)
