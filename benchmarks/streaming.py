"""Streaming inference cost against sequence length: T-PSM (c = 1, 16, 64), an affine PSM, GPT.

Every model is driven through its real streaming path (:func:`psmsearch.metrics.measure_streaming`)
to n tokens; we report the bytes its state retains and the per-token ``step`` latency at each n, with
ratios against the GPT baseline of the same width and depth measured in the same run. The affine
model is included when a plugin registers an associative aggregator (found by ``state_kind``, not by
name). Targets: at n = 65,536 T-PSM retains >= 100x fewer bytes than GPT's KV cache, and T-PSM's
per-token latency at 64k is within 1.5x of its latency at 1k while GPT's grows.

    python benchmarks/streaming.py                 # n = 1k, 4k, 16k, 64k (minutes on a laptop CPU)
    python benchmarks/streaming.py --quick --json  # CI size
    python benchmarks/streaming.py --plot streaming.png
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch

from psmsearch.composer import compatible_combinations
from psmsearch.config import ModelConfig
from psmsearch.metrics import measure_streaming
from psmsearch.model import build_model
from psmsearch.registry import get_registry
from psmsearch.tasks import count_tag

VOCAB = 256
FULL_LENGTHS = (1024, 4096, 16384, 65536)
QUICK_LENGTHS = (256, 1024, 4096)


def model_configs(d_model: int, n_layers: int) -> dict[str, ModelConfig]:
    """The models to compare: T-PSMs at three chunk sizes, an affine PSM if registered, and GPT."""
    common = {"d_model": d_model, "n_layers": n_layers}
    configs = {
        f"T-PSM c={c}": ModelConfig(kind="psm", chunk_size=c, encoder="embed", aggregator="attention", head="attention", **common)
        for c in (1, 16, 64)
    }
    registry = get_registry()
    for encoder, aggregator, head in compatible_combinations(registry):
        info = registry.get("aggregator", aggregator)
        if info.associative and info.state_kind != "tokens":
            configs[f"affine {aggregator} c=64"] = ModelConfig(
                kind="psm", chunk_size=64, encoder=encoder, aggregator=aggregator, head=head, **common
            )
            break
    configs["GPT (KV cache)"] = ModelConfig(kind="gpt", n_heads=4, **common)
    return configs


def run(lengths: tuple[int, ...], d_model: int, n_layers: int, latency_tokens: int) -> list[dict[str, Any]]:
    """One record per (model, n) with measured bytes and latency."""
    records = []
    for name, config in model_configs(d_model, n_layers).items():
        torch.manual_seed(0)
        model = build_model(config, VOCAB)
        started = time.perf_counter()
        worst = tuple(n - 1 for n in lengths)  # every counter bit set: the most roots and a partial chunk
        out = measure_streaming(model, VOCAB, (*lengths, *worst), lengths, latency_tokens, feed_chunk=256)
        print(f"measured {name} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        for n in lengths:
            tag = count_tag(n)
            records.append({
                "model": name, "n": n,
                "state_bytes": out[f"state_bytes_{tag}"], "expected_state_bytes": out[f"expected_state_bytes_{tag}"],
                "state_bytes_at_n_minus_1": out[f"state_bytes_{count_tag(n - 1)}"],
                "latency_ms": out[f"latency_ms_{tag}"],
            })
    return records


def add_ratios(records: list[dict[str, Any]]) -> None:
    """GPT bytes / model bytes at the same n, and latency relative to the model's own at the smallest n."""
    gpt = {r["n"]: r for r in records if r["model"].startswith("GPT")}
    first = {}
    for r in records:
        first.setdefault(r["model"], r["latency_ms"])
        r["bytes_ratio_vs_gpt"] = gpt[r["n"]]["state_bytes"] / r["state_bytes"]
        r["worst_bytes_ratio_vs_gpt"] = gpt[r["n"]]["state_bytes_at_n_minus_1"] / r["state_bytes_at_n_minus_1"]
        r["latency_vs_first_n"] = r["latency_ms"] / first[r["model"]]


def print_table(records: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Streaming state and per-token latency (batch 1, measured; n-1 = all scan roots occupied)")
    columns = ("model", "n", "state bytes", "GPT / ours", "bytes at n-1", "GPT / ours at n-1", "latency ms", "latency / first n")
    for column in columns:
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in records:
        table.add_row(
            r["model"], f"{r['n']:,}", f"{int(r['state_bytes']):,}", f"{r['bytes_ratio_vs_gpt']:.1f}x",
            f"{int(r['state_bytes_at_n_minus_1']):,}", f"{r['worst_bytes_ratio_vs_gpt']:.1f}x",
            f"{r['latency_ms']:.3f}", f"{r['latency_vs_first_n']:.2f}x",
        )
    Console(file=sys.stdout, width=160).print(table)


def plot(records: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_bytes, ax_lat) = plt.subplots(1, 2, figsize=(11, 4))
    for model in dict.fromkeys(r["model"] for r in records):
        rows = [r for r in records if r["model"] == model]
        ns = [r["n"] for r in rows]
        ax_bytes.plot(ns, [r["state_bytes_at_n_minus_1"] for r in rows], marker="o", label=model)
        ax_lat.plot(ns, [r["latency_ms"] for r in rows], marker="o", label=model)
    for ax, label in ((ax_bytes, "retained state bytes at n-1 (worst case)"), (ax_lat, "per-token step latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens streamed (n)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_bytes.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"n = {', '.join(map(str, QUICK_LENGTHS))} (CI size)")
    parser.add_argument("--lengths", type=lambda s: tuple(int(x) for x in s.split(",")), help="comma-separated n values")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=1, help="model depth (T-PSM is one layer in the paper)")
    parser.add_argument("--latency-tokens", type=int, default=16, help="steps timed at each n (their mean is reported)")
    parser.add_argument("--json", action="store_true", help="end stdout with one JSON object")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of bytes and latency against n")
    args = parser.parse_args(argv)
    lengths = args.lengths or (QUICK_LENGTHS if args.quick else FULL_LENGTHS)
    records = run(tuple(sorted(lengths)), args.d_model, args.layers, args.latency_tokens)
    add_ratios(records)
    print_table(records)
    if args.plot:
        plot(records, args.plot)
    if args.json:
        print(json.dumps({"lengths": list(lengths), "records": records}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
