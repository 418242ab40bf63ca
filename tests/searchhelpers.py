"""Tiny real search spaces and readers of the Optuna and MLflow stores they fill."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

TINY_SPACE: dict[str, Any] = {
    "name": "tiny",
    "task": {"name": "group", "group": "Z5", "train_length": 9, "eval_max_multiple": 2, "eval_samples": 16, "curriculum": False},
    "model": {
        "kind": "psm",
        "d_model": 16,
        "chunk_size": {"choice": [1, 2, 4]},
        "encoder": "embed",
        "aggregator": {"choice": [{"name": "mlp", "mlp_ratio": 1}, {"name": "attention", "layers": 1, "heads": 2}]},
        "head": {"name": "attention", "layers": 1, "heads": 2},
    },
    "train": {"steps": 6, "batch_size": 8, "eval_every": 3, "warmup_steps": 1, "eval_batch_size": 16},
    "metrics": {"memory_lengths": [64], "latency_lengths": [64], "latency_tokens": 2},
    "objectives": [{"metric": "acc_2x", "direction": "maximize"}],
    "driver": {"trials": 3, "startup_trials": 1, "pruner": "none"},
}

MIXED_MODEL: dict[str, Any] = {
    **TINY_SPACE["model"],
    "encoder": {"choice": ["embed", "gla"]},  # two state kinds: tokens and affine_diag
    "aggregator": {"choice": [*TINY_SPACE["model"]["aggregator"]["choice"], "affine_diag"]},
    "head": {"choice": [{"name": "attention", "layers": 1, "heads": 2}, "linear_readout_diag"]},
}
"""TINY_SPACE's model with encoders of two state kinds, each with its own aggregators and heads."""


def write_space(directory: Path, name: str = "space.yaml", **changes: Any) -> Path:
    """Write TINY_SPACE (with top-level ``changes``) to ``directory/name``."""
    space = {**TINY_SPACE, **changes}
    path = directory / name
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def optuna_trials(storage: Path, study: str = "tiny") -> list[Any]:
    import optuna

    return optuna.load_study(study_name=study, storage=f"sqlite:///{storage}").get_trials(deepcopy=False)


def mlflow_runs(db: Path, experiment: str = "tiny") -> list[Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], max_results=1000) if found else []
