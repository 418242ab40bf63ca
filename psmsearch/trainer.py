"""Training loop: AdamW, warmup + cosine decay, gradient clipping, periodic evaluation, checkpoints.

A run is deterministic on CPU for a given seed and a step budget: model init uses the seeded
global RNG, data comes from a dedicated ``torch.Generator``, evaluation data comes from the task's own
stream, and training-time randomness of the model (dropout, or any component drawing from torch's
global generator) comes from the trainer's own *training stream*, seeded from
:func:`training_seed` (``seed`` and the data-parallel rank). The training stream is swapped into the
global generator (CPU, and the CUDA device's when training there) only for each step's forward and
backward pass, under a process-wide lock, so trials running as threads of one process (``--jobs N``)
neither draw from each other's stream nor disturb the caller's. That lock serialises the forward and
backward passes of trials that draw random numbers; a model whose first step drew nothing from the
stream (no dropout, no random component) skips the swap and the lock from then on, so such trials
still compute concurrently. Randomness a component draws outside the training step (evaluation-mode
forward passes) is not covered. Every stream is saved in checkpoints (per rank under data
parallelism), so a restored run continues identically. With a time budget the schedule follows
wall-clock progress, which is not reproducible by nature.

Evaluation results go to ``callback(step, metrics)``; the callback may raise :class:`TrialPruned` to
stop the run (the Optuna and Ray drivers do). A non-finite loss or gradient raises
:class:`TrialDiverged` carrying the step and the reason, so a search records the trial as failed and
carries on. Under ``torch.distributed`` the loop runs data-parallel (see :mod:`psmsearch.distributed`).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn
from torch.nn import functional as F

from psmsearch import interrupts
from psmsearch import distributed as dist
from psmsearch.tasks import TEST_PREFIX, Batch, Task

Callback = Callable[[int, dict[str, float]], None]

_GLOBAL_RNG_LOCK = threading.Lock()
"""Held while a trainer's training stream is swapped into torch's process-wide generators."""

_CHECKPOINT_KEYS = frozenset({"model", "optimizer", "generator", "torch_rng", "task", "step", "tokens", "train_seconds"})
"""Keys every psmsearch checkpoint has had; later additions are optional so older files still load."""


@contextmanager
def seeded_global_rng(seed: int) -> Iterator[None]:
    """Run the block with torch's global CPU generator seeded with ``seed``, restoring it afterwards.

    Holds the lock that training steps hold while their stream is swapped in (see the module
    docstring): without it, a model built in one thread (seeded initialisation) and a training
    step in another would each save and restore the other's generator state.
    """
    with _GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def training_seed(seed: int, rank: int = 0) -> int:
    """The seed of a trial's training stream (dropout masks and the like) on data-parallel ``rank``.

    Derived by hashing, so it differs from the seed of model initialisation and data (``seed``
    itself) and from every other rank's: ranks train on different rows and must not share masks.
    """
    digest = hashlib.sha256(f"psmsearch-training-stream:{seed}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


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
    betas: tuple[float, float] = Field((0.9, 0.98), description="AdamW's (beta1, beta2), each 0 <= b < 1")
    warmup_steps: int = Field(50, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1.0, description="final lr as a fraction of lr")
    grad_clip: float | None = Field(1.0, gt=0, description="max global gradient norm; null turns clipping off")
    eval_every: int = Field(200, ge=1, description="evaluate every this many steps (and at the end)")
    eval_batch_size: int = Field(64, ge=1)
    checkpoint_every: int | None = Field(None, ge=1, description="save a checkpoint every this many steps")

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        """AdamW raises a bare ValueError from deep inside torch for these; say which field and why."""
        bad = [b for b in value if not 0.0 <= b < 1.0]
        if bad:
            raise ValueError(f"each beta must satisfy 0 <= b < 1; got {bad[0]!r}")
        return value

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
        identity: dict[str, Any] | None = None,
    ) -> None:
        """``identity`` (flat settings that must not change on resume; see :meth:`load_checkpoint`) is
        saved in checkpoints and compared when one is loaded; ``None`` skips the comparison."""
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.task = task
        self.config = config
        self.callback = callback
        self.progress = progress and sys.stderr.isatty()
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.generator = torch.Generator().manual_seed(seed)
        self.identity = identity
        self.rng_state = _seeded_rng_state(training_seed(seed, dist.rank()), self.device)
        self.draws_random: bool | None = None  # whether training steps draw from the stream; None: not yet known
        self._drew_random = False
        self.optimizer = _adamw(model, config)
        self.parallel = dist.wrap_model(self.model, self.device)
        self.step = 0
        self.tokens = 0
        self.train_seconds = 0.0
        self.recent_losses: list[float] = []
        self.last_metrics: dict[str, float] = {}

    # -- schedule -------------------------------------------------------------------------------

    def lr_at(self, step: int, elapsed: float) -> float:
        """Linear warmup then cosine decay to ``min_lr_ratio * lr`` over the budget.

        With a step budget the decay's progress is ``(step - warmup) / (steps - 1 - warmup)``: the
        first step after warmup trains at ``lr`` and the last one (``steps - 1``) at ``min_lr_ratio * lr``.
        """
        cfg = self.config
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        fractions = []
        if cfg.steps is not None:
            decay_steps = cfg.steps - 1 - cfg.warmup_steps  # steps after the first post-warmup one
            fractions.append((step - cfg.warmup_steps) / decay_steps if decay_steps > 0 else 1.0)
        if cfg.time_budget_s is not None:
            fractions.append(elapsed / cfg.time_budget_s)
        progress = min(1.0, max(fractions))
        return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    def _agreed_seconds(self, seconds: float) -> float:
        """Training time as every data-parallel rank will use it: with a time budget, the ranks' mean.

        Each rank times its own steps, and the clocks differ. With a time budget they would then
        disagree on the learning rate (replicas drift apart) and on the last step (one rank waits
        forever in a collective the others never join), so the time is averaged over ranks each step.
        """
        if self.config.time_budget_s is None or not dist.is_active():
            return seconds
        total = dist.all_reduce_sum(torch.tensor([seconds], dtype=torch.float64, device=self.device))
        return float(total.item()) / dist.world_size()

    def _budget_left(self) -> bool:
        cfg = self.config
        if cfg.steps is not None and self.step >= cfg.steps:
            return False
        return cfg.time_budget_s is None or self.train_seconds < cfg.time_budget_s

    # -- one step -------------------------------------------------------------------------------

    def backward(self, batch: Batch) -> tuple[float, float]:
        """Gradients of the global-batch mean loss on this rank's rows of ``batch``; (loss, accuracy).

        Under data parallelism DDP averages gradients over ranks, so the local loss sum is scaled by
        ``world_size / global_token_count``: the result equals one process on the whole batch. The
        same all-reduce carries each rank's stop request (:data:`psmsearch.interrupts.STOP`), so every
        rank stops at the same step instead of leaving the others waiting in a collective.
        """
        shard = dist.shard(batch).to(self.device)
        with self.training_rng():
            ce_sum, correct, count = masked_loss(self.parallel(shard.inputs), shard.targets, shard.mask)
        stop = torch.tensor(float(interrupts.STOP.is_set()), device=ce_sum.device)
        totals = dist.all_reduce_sum(torch.stack([ce_sum.detach(), correct, count, stop]))  # global sums
        if dist.is_active() and totals[3].item() > 0:
            raise KeyboardInterrupt("stop requested")
        global_count = totals[2].clamp(min=1)
        loss_value = (totals[0] / global_count).item()
        if not math.isfinite(loss_value):
            raise TrialDiverged(self.step, f"loss is {loss_value}")
        loss = ce_sum * dist.world_size() / global_count
        touch = dist.every_parameter_term(self.model)  # a gradient for every parameter, as DDP expects
        with self.training_rng():
            (loss if touch is None else loss + touch).backward()
        return loss_value, (totals[1] / global_count).item()

    @contextmanager
    def training_rng(self) -> Iterator[None]:
        """Run the block with this trainer's training stream in torch's global generators.

        The caller's generator states are restored afterwards; the lock keeps trials in other
        threads from drawing from (or swapping out) this stream meanwhile. A model whose first
        training step drew nothing from the stream (no dropout, no random component) skips the
        swap and the lock from then on, so trials in threads (``--jobs N``) compute concurrently
        unless they need randomness.
        """
        if self.draws_random is False:
            yield
            return
        cuda = self.device.type == "cuda"
        with _GLOBAL_RNG_LOCK:
            outside_cpu = torch.get_rng_state()
            outside_cuda = torch.cuda.get_rng_state(self.device) if cuda else None
            before = self.rng_state
            torch.set_rng_state(before["cpu"])
            if cuda:
                torch.cuda.set_rng_state(before["cuda"], self.device)
            try:
                yield
            finally:
                self.rng_state = {"cpu": torch.get_rng_state()}
                if cuda:
                    self.rng_state["cuda"] = torch.cuda.get_rng_state(self.device)
                torch.set_rng_state(outside_cpu)
                if outside_cuda is not None:
                    torch.cuda.set_rng_state(outside_cuda, self.device)
                self._drew_random = self._drew_random or any(
                    not torch.equal(before[key], self.rng_state[key]) for key in before)

    def train_step(self) -> tuple[float, float]:
        """One optimiser step on the task's batch for ``self.step``; returns (loss, accuracy)."""
        batch = self.task.train_batch(self.step, self.config.batch_size, self.generator)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step, self.train_seconds)
        loss, accuracy = self.backward(batch)
        if self.draws_random is None:  # decided once, by the first step's forward and backward
            self.draws_random = self._drew_random
        grad_norm = _clip(self.model, self.config.grad_clip)
        if not math.isfinite(grad_norm):
            raise TrialDiverged(self.step, f"gradient norm is {grad_norm}")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.tokens += batch.num_tokens
        return loss, accuracy

    def evaluate(self) -> dict[str, float]:
        """The task's metrics of the current model (a periodic evaluation; never the test set).

        A model whose outputs hold NaN or inf fails the trial here instead of being scored: argmax
        turns NaN logits into class 0, which a task would count as real predictions (a broken
        aggregator that training at short curriculum lengths never called shows up only here).
        """
        return self._guarded("evaluation", self.task.evaluate)

    def test_metrics(self) -> dict[str, float]:
        """The task's final test-set metrics of the current model, prefixed ``test_``.

        Called once after training (by the trial runner, on rank 0), never from :meth:`fit`, so no
        periodic evaluation or callback sees them. Non-finite model outputs raise
        :class:`TrialDiverged` as in :meth:`evaluate`.
        """
        metrics = self._guarded("test evaluation", self.task.test_metrics)
        return {f"{TEST_PREFIX}{name}": value for name, value in metrics.items()}

    def _guarded(self, what: str, score: Callable[[nn.Module, torch.device, int], dict[str, float]]) -> dict[str, float]:
        """``score(model, device, eval_batch_size)`` as floats, or :class:`TrialDiverged` naming ``what``
        if any floating-point output of the model held NaN or inf meanwhile."""
        broken: list[str] = []

        def check_outputs(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if not broken and isinstance(output, torch.Tensor) and output.is_floating_point() \
                    and not bool(torch.isfinite(output).all()):
                length = output.shape[1] if output.dim() > 1 else output.shape[0]
                broken.append(f"the model's outputs hold NaN or inf on {what} sequences of length {length}")

        hook = self.model.register_forward_hook(check_outputs)
        try:
            metrics = score(self.model, self.device, self.config.eval_batch_size)
        finally:
            hook.remove()
        if broken:
            raise TrialDiverged(self.step, f"{what}: {broken[0]}")
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
                if not dist.is_active():  # data-parallel ranks agree on stopping inside backward()
                    interrupts.raise_if_stopping()  # a search's Ctrl-C reaches trials in worker threads here
                started = time.perf_counter()
                loss, accuracy = self.train_step()
                self.task.observe_train(self.step, accuracy)
                self.step += 1
                self.train_seconds = self._agreed_seconds(self.train_seconds + time.perf_counter() - started)
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
        """Everything a run needs to continue bit-for-bit: weights, optimiser, RNGs, task, counters.

        ``torch_rng`` is this rank's training stream; under data parallelism ``rank_rng`` lists every
        rank's (a collective: every rank must call this), and ``trial`` is the JSON of ``identity``.
        """
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": self.rng_state["cpu"],
            "task": self.task.state_dict(),
            "step": self.step,
            "tokens": self.tokens,
            "train_seconds": self.train_seconds,
            "recent_losses": list(self.recent_losses),
        }
        if "cuda" in self.rng_state:
            state["cuda_rng"] = self.rng_state["cuda"].cpu()
        if dist.is_active():
            state["rank_rng"] = dist.all_gather_object({k: v.cpu() for k, v in self.rng_state.items()})
        if self.identity is not None:
            state["trial"] = json.dumps(self.identity, sort_keys=True)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; this rank's training stream comes from ``rank_rng`` when the
        checkpoint has one for it, else from ``torch_rng`` (a single-process checkpoint)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.rng_state = _restored_rng_state(state, dist.rank(), self.device, self.rng_state)
        self.task.load_state_dict(state["task"])
        self.step = int(state["step"])
        self.tokens = int(state["tokens"])
        self.train_seconds = float(state["train_seconds"])
        self.recent_losses = [float(x) for x in state.get("recent_losses", [])]

    def save_checkpoint(self, path: str | Path) -> None:
        """Write a checkpoint (rank 0 writes under data parallelism; every rank must call this, as the
        ranks' training streams are gathered); atomic via a temporary file."""
        state = self.state_dict()
        if dist.rank() != 0:
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(state, tmp)
        tmp.replace(path)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint` (``weights_only=True``: no pickled code).

        A file that is not such a checkpoint, or one written for another model or optimiser, is a
        :class:`~psmsearch.errors.ConfigError` naming the file; the run has not started then. So is one
        whose saved ``identity`` differs from this trainer's: the error names every differing field
        with both values (a checkpoint without one, from before identities were saved, is not compared).
        """
        from psmsearch.errors import ConfigError

        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as err:  # noqa: BLE001 - torch raises several types for a foreign or damaged file
            raise ConfigError(f"cannot read {str(path)!r} as a checkpoint: {_first_line(err)}",
                              field="--checkpoint") from None
        missing = sorted(_CHECKPOINT_KEYS - set(state)) if isinstance(state, dict) else ["everything"]
        if missing:
            raise ConfigError(f"{str(path)!r} is not a psmsearch checkpoint (it lacks {', '.join(missing)})",
                              field="--checkpoint")
        if self.identity is not None and isinstance(state.get("trial"), str):
            differences = identity_differences(json.loads(state["trial"]), self.identity)
            if differences:
                raise ConfigError(
                    f"{str(path)!r} was written by a different trial: {'; '.join(differences)}; resume with the "
                    "settings that wrote it (only the budget, evaluation and checkpoint cadence, metrics, "
                    "device and threads may change)", field="--checkpoint")
        try:
            self.load_state_dict(state)
        except (RuntimeError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{str(path)!r} was written for another model or training setup: {_first_line(err)}; "
                              "resume with the configuration that wrote it", field="--checkpoint") from None


def identity_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"train.lr: 0.003 in the checkpoint, 0.001 now"`` for every key whose value differs (or is
    on one side only), sorted by key."""
    missing = object()
    out = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key, missing), current.get(key, missing)
        if old != new:
            shown = ["unset" if v is missing else repr(v) for v in (old, new)]
            out.append(f"{key}: {shown[0]} in the checkpoint, {shown[1]} now")
    return out


def _seeded_rng_state(seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Fresh generator states seeded with ``seed``: ``cpu``, plus ``cuda`` for a CUDA device."""
    state = {"cpu": torch.Generator().manual_seed(seed).get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.Generator(device).manual_seed(seed).get_state()
    return state


def _restored_rng_state(state: dict[str, Any], rank: int, device: torch.device,
                        fallback: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's training stream from a checkpoint.

    ``rank_rng`` (data-parallel checkpoints) gives each rank its own; a single-process checkpoint
    has only ``torch_rng`` (and ``cuda_rng``), which rank 0 takes. A rank the checkpoint has no stream
    for (resuming with more processes than wrote it) keeps its freshly seeded one, and a CUDA stream
    missing from a CPU checkpoint stays seeded: such a resumed run is reproducible but differs from an
    uninterrupted one.
    """
    by_rank = state.get("rank_rng")
    if isinstance(by_rank, list) and rank < len(by_rank):
        saved = by_rank[rank]
    elif rank == 0:
        saved = {"cpu": state["torch_rng"], **({"cuda": state["cuda_rng"]} if "cuda_rng" in state else {})}
    else:
        saved = {}
    out = {"cpu": saved.get("cpu", fallback["cpu"]).cpu()}
    if "cuda" in fallback:
        out["cuda"] = saved["cuda"].cpu() if "cuda" in saved else fallback["cuda"]
    return out


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
