"""Inference metrics measured by actually streaming a model (DESIGN.md §6).

For each length ``n`` the model's stream is driven to ``n`` tokens (whole chunks through ``feed``,
since no per-token outputs are needed) and then asked what it holds:

* ``state_bytes_<n>``: bytes the stream's state tensors keep alive (each storage once) at ``n``, and
  ``expected_state_bytes_<n>``: the model's own accounting, which must agree;
* ``peak_state_bytes_<n>`` and, for PSMs, ``peak_num_states_<n>``: the most the stream held at any
  measured point up to ``n``. A binary-counter scan holds a single root at ``2^k`` chunks, so
  ``state_bytes`` at a power-of-two ``n`` (every default) is its best case, and the most states
  (roots plus cached folds) at chunk counts that :func:`psmsearch.scan.held_state_counts` finds:
  1, 3, 7, 13, 27, 53, ... 853, 1707 chunks each hold more than any fewer do (not only ``2^k - 1``:
  853 chunks hold 11 states, 511 hold 10, so a peak up to n = 1000 taken at ``2^k - 1`` alone was one
  state short). The features of a partial chunk are held too, most with
  ``c - 1`` tokens buffered (for an affine layer they outweigh the state), so the stream is also
  measured ``c - 1`` tokens past each of those chunk counts, which makes the peak the worst case a
  deployment must provision for, where every chunk state has the same size (every built-in);
* ``latency_ms_<n>`` and ``latency_max_ms_<n>``: mean and slowest wall time of one ``step`` after
  ``n``, over whole periods of the stream's step cost (at least ``latency_tokens`` steps): a PSM's
  chunk, a growing KV cache's block of 256 slots (it reallocates once per block), on a second
  stream, so the timed steps never move where memory is measured;
* ``peak_alloc_bytes_<n>`` (CUDA only): the allocator's peak while streaming up to ``n``. PyTorch
  keeps one peak per device and process, so it includes the weights, and under ``--jobs`` > 1 on one
  GPU (trials are threads of one process) whatever concurrent trials allocated meanwhile: compare
  trials on it only where each had its GPU to itself;
* ``num_states_<n>`` for PSMs: chunk states held (roots plus cached folds).

Lengths are counted as in :func:`psmsearch.tasks.count_tag` (``65536 -> 64k``).
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Annotated, Iterable

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from psmsearch.scan import held_state_counts
from psmsearch.tasks import count_tag


class MetricsConfig(BaseModel):
    """Which inference measurements a trial takes (the ``metrics:`` section of a trial YAML)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    memory_lengths: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1024, 4096],
                                                              description="n for state bytes")
    latency_lengths: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1024],
                                                               description="n for per-token latency")
    latency_tokens: int = Field(16, ge=1, le=4096,
                                description="steps timed per latency length, rounded up to whole periods of the step cost (a PSM chunk, a KV-cache block)")
    feed_chunk: int = Field(256, ge=1, description="tokens per feed call while advancing the stream")


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_streaming(
    model: nn.Module,
    vocab_size: int,
    memory_lengths: Iterable[int] = (1024, 4096),
    latency_lengths: Iterable[int] = (1024,),
    latency_tokens: int = 16,
    feed_chunk: int = 256,
    device: torch.device | str = "cpu",
    seed: int = 0,
    threads: int | None = 1,
) -> dict[str, float]:
    """Stream random tokens through ``model.stream(1)`` and measure memory and latency at each ``n``.

    Memory is measured at exactly each nominal ``n``; latency on a second stream (see
    :func:`_measure_latency`). ``threads`` sets torch's intra-op threads for the measurement (restored afterwards): batch-1
    streaming runs many tiny ops, and on a 2-core CPU OpenMP's fork/join made a 2x16 LayerNorm
    8x slower with 2 threads than with 1, which would measure thread overhead instead of the model.
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _measure(model, vocab_size, memory_lengths, latency_lengths, latency_tokens, feed_chunk, torch.device(device), seed)
    finally:
        torch.set_num_threads(previous)


@torch.no_grad()
def _measure(
    model: nn.Module,
    vocab_size: int,
    memory_lengths: Iterable[int],
    latency_lengths: Iterable[int],
    latency_tokens: int,
    feed_chunk: int,
    device: torch.device,
    seed: int,
) -> dict[str, float]:
    model = model.to(device).eval()
    out = _measure_memory(model, vocab_size, sorted(set(memory_lengths)), feed_chunk, device, seed)
    out.update(_measure_latency(model, vocab_size, sorted(set(latency_lengths)), latency_tokens, feed_chunk, device, seed + 1))
    return out


def _measure_memory(
    model: nn.Module, vocab_size: int, lengths: list[int], feed_chunk: int, device: torch.device, seed: int
) -> dict[str, float]:
    """State bytes at each n, and the most held at any fullest point or feed on the way."""
    if not lengths:
        return {}
    generator = torch.Generator().manual_seed(seed)
    stream = model.stream(1)
    chunk = _aligned_chunk(model, feed_chunk)
    wanted = set(lengths)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out: dict[str, float] = {}
    seen = 0
    peak_bytes, peak_states = 0, 0
    for n in sorted(wanted | _fullest_points(_chunk_size(model), lengths[-1])):
        while seen < n:
            m = min(chunk - seen % chunk, n - seen)  # back onto whole-chunk feeds after a fullest point
            stream.feed(torch.randint(vocab_size, (1, m), generator=generator).to(device))
            seen += m
            peak_bytes = max(peak_bytes, stream.state_nbytes())
            peak_states = max(peak_states, getattr(stream, "num_states", 0))
        if n not in wanted:
            continue
        tag = count_tag(n)
        out[f"state_bytes_{tag}"] = float(stream.state_nbytes())
        out[f"expected_state_bytes_{tag}"] = float(stream.expected_nbytes())
        out[f"peak_state_bytes_{tag}"] = float(peak_bytes)
        if hasattr(stream, "num_states"):
            out[f"num_states_{tag}"] = float(stream.num_states)
            out[f"peak_num_states_{tag}"] = float(peak_states)
        if device.type == "cuda":
            out[f"peak_alloc_bytes_{tag}"] = float(torch.cuda.max_memory_allocated(device))
    return out


def _measure_latency(
    model: nn.Module, vocab_size: int, lengths: list[int], latency_tokens: int, feed_chunk: int,
    device: torch.device, seed: int,
) -> dict[str, float]:
    """Per-token ``step`` times after each n, over whole chunks, on a stream of its own.

    A window of whole chunks times every position of a chunk equally often: the cheap early
    positions, the late ones whose head reads a longer partial chunk, and the completing step that
    runs the encoder and the aggregator. A window shorter than a chunk would leave the aggregator
    out. A stream whose step cost repeats with another period says so (``step_period``: a GPT's
    KV cache reallocates once per 256 tokens, and 16 steps from n = 1024 weighted that one step
    1/16 instead of 1/256: 1.11 ms against 0.27 ms for the others); the window is whole periods of
    both. A timed window past one latency length moves the next one's start to where it ended.
    """
    if not lengths:
        return {}
    generator = torch.Generator().manual_seed(seed)
    stream = model.stream(1)
    chunk = _aligned_chunk(model, feed_chunk)
    period = math.lcm(_chunk_size(model), getattr(stream, "step_period", 1))  # a KV cache grows in blocks
    steps = -(-latency_tokens // period) * period
    out: dict[str, float] = {}
    seen = 0
    for n in lengths:
        while seen < n:
            m = min(chunk - seen % chunk, n - seen)
            stream.feed(torch.randint(vocab_size, (1, m), generator=generator).to(device))
            seen += m
        times = []
        for _ in range(steps):
            token = torch.randint(vocab_size, (1,), generator=generator).to(device)
            _sync(device)
            start = time.perf_counter()
            stream.step(token)
            _sync(device)
            times.append(time.perf_counter() - start)
        seen += steps
        tag = count_tag(n)
        out[f"latency_ms_{tag}"] = 1000 * statistics.fmean(times)
        out[f"latency_max_ms_{tag}"] = 1000 * max(times)
    return out


def _chunk_size(model: nn.Module) -> int:
    """The PSM chunk size, or 1 for models without chunks (the baselines)."""
    config = getattr(model, "config", None)
    return config.chunk_size if config is not None and config.kind == "psm" else 1


def _aligned_chunk(model: nn.Module, feed_chunk: int) -> int:
    """A feed size that is a multiple of the PSM chunk size, so ``feed`` takes whole-chunk calls."""
    c = _chunk_size(model)
    return max(c, feed_chunk // c * c)


def _fullest_points(chunk_size: int, longest: int) -> set[int]:
    """Token counts up to ``longest`` where the stream holds more than at any count before it.

    For every number of whole chunks ``m`` after which a binary-counter scan holds more states than
    after any fewer (:func:`~psmsearch.scan.held_state_counts`; ``m = 0`` included), the count
    ``m c + c - 1``: those chunks plus the ``c - 1`` tokens of the fullest partial chunk. Between
    two such points the states held are no more than at the first, and the partial chunk is no
    fuller, so the largest of these points and ``n`` itself is the most held up to ``n``.
    """
    counts = held_state_counts(longest // chunk_size)
    points, most = set(), -1
    for chunks, held in enumerate(counts):
        if held > most:
            most = held
            point = (chunks + 1) * chunk_size - 1
            if 1 <= point <= longest:
                points.add(point)
    return points


def inference_metrics(
    model: nn.Module, vocab_size: int, config: MetricsConfig, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """All measured inference metrics of a trial, plus ``params`` (threads as the caller set them)."""
    out = {"params": float(parameter_count(model))}
    if config.enabled:
        out.update(
            measure_streaming(
                model, vocab_size, config.memory_lengths, config.latency_lengths,
                config.latency_tokens, config.feed_chunk, device, threads=None,
            )
        )
    return out
