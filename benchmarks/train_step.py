"""Training step, evaluation forward and streaming per token: PSM language models against GPT.

For each model, at the sizes of ``examples/configs/*.yaml`` (d_model 64), three passes are timed:

- ``train``: forward, cross-entropy, backward and one AdamW step on a ``[B, T]`` batch;
- ``eval``: the forward pass under ``torch.no_grad()`` on the same batch;
- ``stream``: one token through ``model.stream(1).step`` (batch 1, averaged over whole chunks, so
  the chunk-completing steps that call the aggregator count in their share).

Every model is compared with the ``gpt`` baseline (causal attention, KV-cache streaming) at the same
width, depth, batch and length, measured in the same run. The T-PSM models (``embed`` encoder,
``attention`` aggregator and head) are also timed on the *full-rows* path they replaced, kept here as
the baseline of that change: the aggregator and head run their whole transformer on every row and
slice the kept rows afterwards, the head rebuilds its mask on every call, and streaming computes all
``c'`` rows of the partial chunk to keep the newest (``Head.forward_last``'s default). Both paths
share the weights, and ``tests/test_benchmarks.py`` checks that they compute the same model.

Timings are medians over interleaved repetitions: each round runs every (model, pass) once, in an
order shuffled anew (seeded) each round, so a slow spell on a shared machine hits every column alike.
Ratios only; no absolute targets.

    python benchmarks/train_step.py              # sizes of examples/configs (a few minutes on 2 cores)
    python benchmarks/train_step.py --quick      # small batch, few rounds (CI smoke size)
    python benchmarks/train_step.py --json       # one JSON object instead of the table
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from types import MethodType
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from psmsearch.composer import compatible_combinations
from psmsearch.config import ModelConfig
from psmsearch.model import build_model
from psmsearch.registry import get_registry

VOCAB = 256
PASSES = ("train", "eval", "stream")
AFFINE_ENCODERS = ("gla", "mamba2", "deltanet")


class Case(NamedTuple):
    """One model to time, with the batch it trains on and how many tokens one streaming pass takes.

    (A NamedTuple, not a dataclass: the smoke tests load this script without registering it as a module.)
    """

    name: str
    config: ModelConfig
    batch: int
    length: int
    stream_tokens: int


def _tpsm(chunk_size: int, n_layers: int) -> ModelConfig:
    """The T-PSM of ``examples/configs``: embed encoder, one-layer attention aggregator and head."""
    component = {"name": "attention", "layers": 1, "heads": 4}
    return ModelConfig(kind="psm", d_model=64, n_layers=n_layers, chunk_size=chunk_size, encoder="embed",
                       aggregator=component, head=component)


def _affine(encoder: str, chunk_size: int, n_layers: int) -> ModelConfig:
    """An affine PSM: ``encoder`` with the aggregator and head registered for its state kind."""
    for enc, aggregator, head in compatible_combinations(get_registry()):
        if enc == encoder:
            return ModelConfig(kind="psm", d_model=64, n_layers=n_layers, chunk_size=chunk_size, encoder=encoder,
                               aggregator=aggregator, head=head)
    raise LookupError(f"no registered aggregator and head for encoder {encoder!r}")


def cases(quick: bool) -> list[Case]:
    """group_tpsm.yaml (c = 1, one layer, B 32) and lm_tpsm.yaml (c = 16, two layers, B 16, T 128) sizes;
    the affine encoders at the lm size. ``quick`` shrinks batch, length and streamed tokens."""
    small = {"T-PSM c=1": (32, 64, 32), "lm": (16, 128, 64)}
    if quick:
        small = {"T-PSM c=1": (4, 16, 4), "lm": (2, 32, 16)}
    out = [Case("T-PSM c=1", _tpsm(1, 1), *small["T-PSM c=1"]), Case("T-PSM c=16", _tpsm(16, 2), *small["lm"])]
    out += [Case(f"{encoder} c=16", _affine(encoder, 16, 2), *small["lm"]) for encoder in AFFINE_ENCODERS]
    return out


def gpt_config(config: ModelConfig) -> ModelConfig:
    """The GPT baseline at the width and depth of ``config``."""
    return ModelConfig(kind="gpt", d_model=config.d_model, n_layers=config.n_layers, n_heads=4)


def is_tpsm(config: ModelConfig) -> bool:
    return config.kind == "psm" and config.aggregator.name == "attention" and config.head.name == "attention"


def _full_rows_mask(k: int, width: int, device: torch.device) -> torch.Tensor:
    """The head's ``[k+c', k+c']`` mask, made anew as the full-rows path did on every call."""
    position = torch.arange(k + width, device=device)
    query, key = position[:, None], position[None, :]  # [k+c', 1], [1, k+c']
    return ((key <= query) | (key < k)) & ~((query < k) & (key >= k))


def _full_rows_aggregate(self: nn.Module, older: torch.Tensor, newer: torch.Tensor) -> torch.Tensor:
    both = torch.cat([older + self.segment[0], newer + self.segment[1]], dim=-2)  # [*, 2k, d]
    return self.mixer(both)[..., self.k :, :].clone()  # [*, k, d]


def _full_rows_head(self: nn.Module, prefix: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    z = torch.cat([prefix + self.segment[0], f + self.segment[1]], dim=-2)  # [*, k+c', d]
    return self.reader(z, _full_rows_mask(self.k, f.shape[-2], z.device))[..., self.k :, :]  # [*, c', d]


def _full_rows_head_last(self: nn.Module, prefix: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return self(prefix, f)[..., -1, :]  # [*, d]


def full_rows_copy(model: nn.Module) -> nn.Module:
    """A copy of a T-PSM model (same weights) whose aggregators and heads take the full-rows path."""
    legacy = copy.deepcopy(model)
    for block in legacy.blocks:
        layer = block.mixer
        layer.aggregator.forward = MethodType(_full_rows_aggregate, layer.aggregator)
        layer.head.forward = MethodType(_full_rows_head, layer.head)
        layer.head.forward_last = MethodType(_full_rows_head_last, layer.head)
    return legacy


def train_step(model: nn.Module, tokens: torch.Tensor) -> Callable[[], float]:
    """One AdamW training step on ``tokens[B, T+1]`` (next-token targets); returns the loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        logits = model(tokens[:, :-1])  # [B, T, V]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def eval_forward(model: nn.Module, tokens: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The forward pass on ``tokens[B, T]`` without autograd."""

    @torch.no_grad()
    def forward() -> torch.Tensor:
        return model(tokens)  # [B, T, V]

    return forward


def stream_tokens(model: nn.Module, tokens: torch.Tensor) -> Callable[[], torch.Tensor]:
    """``tokens[1, n]`` one at a time through a fresh stream; returns the logits ``[1, n, V]``."""

    @torch.no_grad()
    def run() -> torch.Tensor:
        stream = model.stream(1)
        return torch.stack([stream.step(tokens[:, t]) for t in range(tokens.shape[1])], dim=1)

    return run


def median_interleaved(fns: dict[Any, Callable[[], object]], rounds: int) -> dict[Any, float]:
    """Median wall-clock seconds of each function over ``rounds`` rounds after one warm-up call each.

    Each round calls every function once, in an order shuffled anew (seeded, so runs repeat), so
    drift on a shared machine spreads over all of them instead of biasing one column.
    """
    for fn in fns.values():
        fn()
    keys = list(fns)
    times: dict[Any, list[float]] = {key: [] for key in keys}
    order = random.Random(0)
    for _ in range(rounds):
        order.shuffle(keys)
        for key in keys:
            start = time.perf_counter()
            fns[key]()
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in times.items()}


def measure(case: Case, rounds: int) -> list[dict[str, Any]]:
    """Rows ``{model, pass, ms, gpt_ms, over_gpt[, full_rows_ms, speedup]}`` for one case, all interleaved."""
    torch.manual_seed(0)
    models = {"new": build_model(case.config, VOCAB), "gpt": build_model(gpt_config(case.config), VOCAB)}
    if is_tpsm(case.config):
        models["full_rows"] = full_rows_copy(models["new"])
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(0, VOCAB, (case.batch, case.length + 1), generator=generator)  # [B, T+1]
    streamed = torch.randint(0, VOCAB, (1, case.stream_tokens), generator=generator)  # [1, n]
    fns: dict[tuple[str, str], Callable[[], object]] = {}
    for variant, model in models.items():
        fns[variant, "train"] = train_step(model, batch)
        fns[variant, "eval"] = eval_forward(model, batch[:, :-1])
        fns[variant, "stream"] = stream_tokens(model, streamed)
    medians = median_interleaved(fns, rounds)
    rows = []
    for kind in PASSES:
        scale = 1e3 / (case.stream_tokens if kind == "stream" else 1)  # ms per call, or per token
        row: dict[str, Any] = {"model": case.name, "pass": kind, "batch": 1 if kind == "stream" else case.batch,
                               "length": case.stream_tokens if kind == "stream" else case.length,
                               "ms": medians["new", kind] * scale, "gpt_ms": medians["gpt", kind] * scale}
        row["over_gpt"] = row["ms"] / row["gpt_ms"]
        if "full_rows" in models:
            row["full_rows_ms"] = medians["full_rows", kind] * scale
            row["speedup"] = row["full_rows_ms"] / row["ms"]
        rows.append(row)
    return rows


def print_table(result: dict[str, Any]) -> None:
    """The rows as a plain-text table (ms per step / forward / token, and the ratios)."""
    print(f"torch {result['torch']}, {result['threads']} thread(s), median of {result['rounds']} interleaved rounds")
    print("ms: train = forward+backward+AdamW step, eval = no-grad forward, stream = per token (batch 1)")
    print("model/GPT: our time over the GPT baseline's (same width, depth, batch); full-rows/ours: speed-up of "
          "the kept-rows T-PSM path over the full-rows path it replaced")
    header = ("model", "pass", "B x T", "ms", "GPT ms", "model/GPT", "full-rows ms", "full-rows/ours")
    lines = [header]
    for r in result["rows"]:
        full = (f"{r['full_rows_ms']:.3f}", f"{r['speedup']:.2f}x") if "speedup" in r else ("-", "-")
        lines.append((r["model"], r["pass"], f"{r['batch']} x {r['length']}", f"{r['ms']:.3f}", f"{r['gpt_ms']:.3f}",
                      f"{r['over_gpt']:.2f}x", *full))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for n, line in enumerate(lines):
        print(" | ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))))
        if n == 0:
            print("-+-".join("-" * w for w in widths))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small batches and 3 rounds (CI smoke size)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 15, or 3 with --quick)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--models", help="comma-separated subset of model names, e.g. 'T-PSM c=1,gla c=16'")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (3 if args.quick else 15)
    selected = cases(args.quick)
    if args.models:
        wanted = {name.strip() for name in args.models.split(",")}
        unknown = wanted - {case.name for case in selected}
        if unknown:
            parser.error(f"unknown model(s) {sorted(unknown)}; choose from {[case.name for case in selected]}")
        selected = [case for case in selected if case.name in wanted]
    rows = []
    for case in selected:
        started = time.perf_counter()
        rows += measure(case, rounds)
        print(f"measured {case.name} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    result = {"torch": torch.__version__, "threads": args.threads, "rounds": rounds, "quick": args.quick,
              "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
