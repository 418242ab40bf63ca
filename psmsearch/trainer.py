"""Training loop: AdamW, warmup + cosine decay, gradient clipping, periodic evaluation, checkpoints.

A run is deterministic on CPU for a given seed and a step budget: model init uses the seeded
global RNG, data comes from a dedicated ``torch.Generator`` (saved in checkpoints, so a restored run
continues identically), evaluation data comes from the task's own stream. With a time budget the
schedule follows wall-clock progress, which is not reproducible by nature.

Evaluation results go to ``callback(step, metrics)``; the callback may raise :class:`TrialPruned` to
stop the run (the Optuna and Ray drivers do). A non-finite loss or gradient raises
:class:`TrialDiverged` carrying the step and the reason, so a search records the trial as failed and
carries on. Under ``torch.distributed`` the loop runs data-parallel (see :mod:`psmsearch.distributed`).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.nn import functional as F

from psmsearch import interrupts
from psmsearch import distributed as dist
from psmsearch.tasks import Batch, Task

Callback = Callable[[int, dict[str, float]], None]


class TrialStopped(Exception):
    """Base of the exceptions that end a trial early without being a bug."""


class TrialPruned(TrialStopped):
    """Raised by an evaluation callback to stop a trial that is not promising (pruning)."""


class TrialDiverged(TrialStopped):
    """A non-finite loss or gradient in training, or non-finite model outputs at evaluation;
    ``step`` and ``reason`` say where and what."""

    def __init__(self, step: int, reason: str) -> None:
        self.step = step
        self.reason = reason
        super().__init__(f"training diverged at step {step}: {reason}")


class TrainConfig(BaseModel):
    """Budget and optimiser settings of a trial (the ``train:`` section of a trial YAML)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # nan fails every bound, so say "finite"

    steps: int | None = Field(1000, ge=1, description="step budget (null: time budget only)")
    time_budget_s: float | None = Field(None, gt=0, description="wall-clock budget in seconds (training only)")
    batch_size: int = Field(64, ge=1, le=65536)
    lr: float = Field(3e-3, gt=0, le=1.0)
    weight_decay: float = Field(0.01, ge=0, le=1.0)
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = Field(50, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1.0, description="final lr as a fraction of lr")
    grad_clip: float | None = Field(1.0, gt=0)
    eval_every: int = Field(200, ge=1, description="evaluate every this many steps (and at the end)")
    eval_batch_size: int = Field(64, ge=1)
    checkpoint_every: int | None = Field(None, ge=1, description="save a checkpoint every this many steps")

    @model_validator(mode="after")
    def _needs_budget(self) -> "TrainConfig":
        if self.steps is None and self.time_budget_s is None:
            raise ValueError("set train.steps or train.time_budget_s (or both); a run needs a budget")
        return self


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns: the last evaluation plus training throughput."""

    metrics: dict[str, float]
    steps: int
    seconds: float
    tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def masked_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-batch sums over ``mask``: (cross-entropy sum with grad, correct count, token count)."""
    ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")  # [B*T]
    m = mask.flatten().float()
    correct = ((logits.detach().argmax(-1).flatten() == targets.flatten()).float() * m).sum()
    return (ce * m).sum(), correct, m.sum()


class Trainer:
    """Trains ``model`` on ``task`` under ``config``; see the module docstring for the guarantees."""

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        config: TrainConfig,
        *,
        seed: int = 0,
        device: torch.device | str = "cpu",
        callback: Callback | None = None,
        progress: bool = False,
        checkpoint_path: str | Path | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.task = task
        self.config = config
        self.callback = callback
        self.progress = progress and sys.stderr.isatty()
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.generator = torch.Generator().manual_seed(seed)
        self.optimizer = _adamw(model, config)
        self.parallel = dist.wrap_model(self.model, self.device)
        self.step = 0
        self.tokens = 0
        self.train_seconds = 0.0
        self.recent_losses: list[float] = []
        self.last_metrics: dict[str, float] = {}

    # -- schedule -------------------------------------------------------------------------------

    def lr_at(self, step: int, elapsed: float) -> float:
        """Linear warmup then cosine decay to ``min_lr_ratio * lr`` over the budget."""
        cfg = self.config
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        fractions = []
        if cfg.steps is not None:
            fractions.append((step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        if cfg.time_budget_s is not None:
            fractions.append(elapsed / cfg.time_budget_s)
        progress = min(1.0, max(fractions))
        return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    def _budget_left(self) -> bool:
        cfg = self.config
        if cfg.steps is not None and self.step >= cfg.steps:
            return False
        return cfg.time_budget_s is None or self.train_seconds < cfg.time_budget_s

    # -- one step -------------------------------------------------------------------------------

    def backward(self, batch: Batch) -> tuple[float, float]:
        """Gradients of the global-batch mean loss on this rank's rows of ``batch``; (loss, accuracy).

        Under data parallelism DDP averages gradients over ranks, so the local loss sum is scaled by
        ``world_size / global_token_count``: the result equals one process on the whole batch.
        """
        shard = dist.shard(batch).to(self.device)
        ce_sum, correct, count = masked_loss(self.parallel(shard.inputs), shard.targets, shard.mask)
        totals = dist.all_reduce_sum(torch.stack([ce_sum.detach(), correct, count]))  # global sums
        global_count = totals[2].clamp(min=1)
        loss_value = (totals[0] / global_count).item()
        if not math.isfinite(loss_value):
            raise TrialDiverged(self.step, f"loss is {loss_value}")
        (ce_sum * dist.world_size() / global_count).backward()
        return loss_value, (totals[1] / global_count).item()

    def train_step(self) -> tuple[float, float]:
        """One optimiser step on the task's batch for ``self.step``; returns (loss, accuracy)."""
        batch = self.task.train_batch(self.step, self.config.batch_size, self.generator)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step, self.train_seconds)
        loss, accuracy = self.backward(batch)
        grad_norm = _clip(self.model, self.config.grad_clip)
        if not math.isfinite(grad_norm):
            raise TrialDiverged(self.step, f"gradient norm is {grad_norm}")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.tokens += batch.num_tokens
        return loss, accuracy

    def evaluate(self) -> dict[str, float]:
        """The task's metrics of the current model.

        A model whose outputs hold NaN or inf fails the trial here instead of being scored: argmax
        turns NaN logits into class 0, which a task would count as real predictions (a broken
        aggregator that training at short curriculum lengths never called shows up only here).
        """
        broken: list[str] = []

        def check_outputs(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if not broken and isinstance(output, torch.Tensor) and output.is_floating_point() \
                    and not bool(torch.isfinite(output).all()):
                length = output.shape[1] if output.dim() > 1 else output.shape[0]
                broken.append(f"the model's outputs hold NaN or inf on evaluation sequences of length {length}")

        hook = self.model.register_forward_hook(check_outputs)
        try:
            metrics = self.task.evaluate(self.model, self.device, self.config.eval_batch_size)
        finally:
            hook.remove()
        if broken:
            raise TrialDiverged(self.step, f"evaluation: {broken[0]}")
        return {k: float(v) for k, v in metrics.items()}

    # -- the loop -------------------------------------------------------------------------------

    def fit(self, stop_at: int | None = None) -> TrainResult:
        """Train until the budget is spent, evaluating every ``eval_every`` steps and at the end.

        ``stop_at`` pauses after that step without changing the schedule (the run can be continued
        later, e.g. from a checkpoint, exactly as if it had not stopped). With a checkpoint path, a
        checkpoint is written every ``checkpoint_every`` steps and whenever training stops after a step.
        """
        cfg = self.config
        started_at = self.step
        self.model.train()
        evaluated_at = -1
        with _ProgressBar(self.progress, cfg.steps, cfg.time_budget_s) as advance:
            while self._budget_left() and (stop_at is None or self.step < stop_at):
                interrupts.raise_if_stopping()  # a search's Ctrl-C reaches trials in worker threads here
                started = time.perf_counter()
                loss, accuracy = self.train_step()
                self.task.observe_train(self.step, accuracy)
                self.step += 1
                self.train_seconds += time.perf_counter() - started
                self.recent_losses = [*self.recent_losses[-49:], loss]
                advance(self.step, self.train_seconds, loss)
                if self.step % cfg.eval_every == 0:
                    self._report(self._train_loss())
                    evaluated_at = self.step
                if cfg.checkpoint_every and self.checkpoint_path and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint(self.checkpoint_path)
        if self.checkpoint_path and self.step != started_at and not (
                cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0):
            self.save_checkpoint(self.checkpoint_path)
        if evaluated_at != self.step:
            self._report(self._train_loss())
        return TrainResult(self.last_metrics, self.step, self.train_seconds, self.tokens)

    def _train_loss(self) -> float:
        """Mean loss of the last 50 steps (kept in checkpoints, so a resumed run reports what an
        uninterrupted one does, even when it resumes after the last step)."""
        return sum(self.recent_losses) / len(self.recent_losses) if self.recent_losses else float("nan")

    def _report(self, train_loss: float) -> None:
        metrics = self.evaluate()
        metrics["train_loss"] = train_loss
        self.last_metrics = metrics
        if self.callback is not None:
            self.callback(self.step, dict(metrics))

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything a run needs to continue bit-for-bit: weights, optimiser, RNGs, task, counters."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "task": self.task.state_dict(),
            "step": self.step,
            "tokens": self.tokens,
            "train_seconds": self.train_seconds,
            "recent_losses": list(self.recent_losses),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.task.load_state_dict(state["task"])
        self.step = int(state["step"])
        self.tokens = int(state["tokens"])
        self.train_seconds = float(state["train_seconds"])
        self.recent_losses = [float(x) for x in state.get("recent_losses", [])]

    def save_checkpoint(self, path: str | Path) -> None:
        """Write a checkpoint (rank 0 only under data parallelism); atomic via a temporary file."""
        if dist.rank() != 0:
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(self.state_dict(), tmp)
        tmp.replace(path)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint` (``weights_only=True``: no pickled code).

        A file that is not such a checkpoint, or one written for another model or optimiser, is a
        :class:`~psmsearch.errors.ConfigError` naming the file; the run has not started then.
        """
        from psmsearch.errors import ConfigError

        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as err:  # noqa: BLE001 - torch raises several types for a foreign or damaged file
            raise ConfigError(f"cannot read {str(path)!r} as a checkpoint: {_first_line(err)}",
                              field="--checkpoint") from None
        missing = sorted(set(self.state_dict()) - set(state)) if isinstance(state, dict) else ["everything"]
        if missing:
            raise ConfigError(f"{str(path)!r} is not a psmsearch checkpoint (it lacks {', '.join(missing)})",
                              field="--checkpoint")
        try:
            self.load_state_dict(state)
        except (RuntimeError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{str(path)!r} was written for another model or training setup: {_first_line(err)}; "
                              "resume with the configuration that wrote it", field="--checkpoint") from None


def _first_line(err: BaseException) -> str:
    """The line of an error message that says what went wrong (PyTorch's run to dozens of lines).

    ``torch.load`` under ``weights_only`` leads with advice to load unsafely; the reason is on
    its ``WeightsUnpickler error`` line. ``load_state_dict`` leads with a header ending in ``:``;
    the first mismatch is on the next line.
    """
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    marker = next((i for i, line in enumerate(lines) if "WeightsUnpickler error" in line), None)
    if marker is not None:  # "... WeightsUnpickler error: ", then the reason on the next line
        detail = lines[marker].partition("WeightsUnpickler error:")[2].strip() or \
            (lines[marker + 1] if marker + 1 < len(lines) else "")
        return f"not a checkpoint PyTorch can load safely ({detail})" if detail else "not a checkpoint PyTorch can load safely"
    if lines[0].endswith(":") and len(lines) > 1:
        return f"{lines[0]} {lines[1]}"
    return lines[0]


def _adamw(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, norms or 1-d parameters)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)


def _clip(model: nn.Module, max_norm: float | None) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm is None:
        return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


class _ProgressBar:
    """A rich progress bar on stderr when enabled, else a no-op; yields ``advance(step, seconds, loss)``."""

    def __init__(self, enabled: bool, steps: int | None, seconds: float | None) -> None:
        self.enabled = enabled
        self.by_steps = steps is not None
        self.total = float(steps if steps is not None else seconds or 1)
        self.bar: Any = None

    def __enter__(self) -> Callable[[int, float, float], None]:
        if not self.enabled:
            return lambda step, seconds, loss: None
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(
            TextColumn("train"), BarColumn(), TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
            console=Console(stderr=True), transient=True,
        )
        self.bar.start()
        handle = self.bar.add_task("train", total=self.total, status="")

        def advance(step: int, seconds: float, loss: float) -> None:
            if step % 10 == 0:
                done = step if self.by_steps else min(seconds, self.total)
                self.bar.update(handle, completed=done, status=f"step {step} loss {loss:.4f}")

        return advance

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()


def iterate_batches(task: Task, batch_size: int, seed: int) -> Iterator[Any]:
    """Endless training batches of ``task`` from a seeded generator (for tools and notebooks)."""
    generator = torch.Generator().manual_seed(seed)
    step = 0
    while True:
        yield task.train_batch(step, batch_size, generator)
        step += 1
