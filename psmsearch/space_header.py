"""The header of a search-space file: its name, objectives, driver and tracking settings.

These pydantic models validate every top-level key of a space file that is not part of the trial
template (see :func:`psmsearch.space.space_from_data`). Ray experiments pickle the header with the
space (:class:`~psmsearch.ray_trial.PortableSpace`); those saved before this module was split from
:mod:`psmsearch.space` name the models ``psmsearch.space.<name>``, which still resolves there.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# Search and study names become MLflow filter values, run names and Ray folder names.
NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"


class Objective(BaseModel):
    """One metric to optimise and its direction."""

    model_config = ConfigDict(extra="forbid")

    metric: str
    direction: Literal["maximize", "minimize"] = "maximize"


class DriverSettings(BaseModel):
    """How trials are scheduled; the CLI's flags override these."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["optuna", "ray"] = "optuna"
    trials: int = Field(8, ge=1)
    jobs: int = Field(1, ge=1)
    storage: str | None = None
    study: str | None = Field(None, pattern=NAME_PATTERN)
    seed: int = 0
    sampler: Literal["tpe", "random", "nsga2", "grid"] = "tpe"
    pruner: Literal["median", "none"] = "median"
    startup_trials: int = Field(4, ge=0, description="trials before TPE and pruning kick in")
    pruner_warmup_steps: int = Field(0, ge=0, description="training steps before which no evaluation prunes a trial")
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0)
    address: str | None = None
    heartbeat_interval: int = Field(5, ge=1, description="seconds between a running trial's heartbeats")
    grace_period: int = Field(15, ge=2, description="a trial silent this long is stale (its process died)")


class TrackingSettings(BaseModel):
    """Where results go in MLflow."""

    model_config = ConfigDict(extra="forbid")

    experiment: str | None = None
    tracking_uri: str | None = None
    enabled: bool = True


class SpaceHeader(BaseModel):
    """The parts of a search-space file that are not the trial template."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    objectives: list[Objective] = Field(min_length=1)
    driver: DriverSettings = DriverSettings()
    tracking: TrackingSettings = TrackingSettings()
