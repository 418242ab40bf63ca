"""The command line the kernel benchmarks share: which device part to run, how big, which output."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import torch


def device_benchmark_parser(description: str,
                            quick_help: str = "fewer sizes and repetitions") -> argparse.ArgumentParser:
    """``--cpu-only | --cuda-only``, ``--quick``, ``--json`` and ``--from-json FILE``; callers add their own."""
    parser = argparse.ArgumentParser(description=description)
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--cpu-only", action="store_true", help="skip the CUDA part")
    only.add_argument("--cuda-only", action="store_true", help="skip the CPU part")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--from-json", metavar="FILE", help="print the tables of a saved --json run")
    return parser


def print_saved(path: str, print_tables: Callable[[dict[str, Any]], None]) -> None:
    """Print the tables of a result saved with ``--json``."""
    with open(path) as handle:
        print_tables(json.load(handle))


def run_device_parts(args: argparse.Namespace, result: dict[str, Any],
                     cpu_part: Callable[[bool], list[dict[str, Any]]],
                     cuda_part: Callable[[bool], list[dict[str, Any]]],
                     print_tables: Callable[[dict[str, Any]], None]) -> None:
    """Fill ``result`` with the CPU and CUDA rows the flags ask for, then print it as JSON or tables."""
    if not args.cuda_only:
        result["cpu"] = cpu_part(args.quick)
    if not args.cpu_only:
        if torch.cuda.is_available():
            result["cuda_device"] = torch.cuda.get_device_name()
            result["cuda"] = cuda_part(args.quick)
        else:
            result["cuda_note"] = "n/a: torch.cuda.is_available() is False"
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_tables(result)


def device_benchmark_main(argv: list[str] | None, description: str,
                          header: Callable[[argparse.Namespace], dict[str, Any]],
                          cpu_part: Callable[[bool], list[dict[str, Any]]],
                          cuda_part: Callable[[bool], list[dict[str, Any]]],
                          print_tables: Callable[[dict[str, Any]], None]) -> None:
    """The whole ``main`` of a benchmark with the standard flags: reprint a saved run, or measure.

    ``header(args)`` gives the result's fields that are not rows (thread count, shapes).
    """
    args = device_benchmark_parser(description).parse_args(argv)
    if args.from_json:
        print_saved(args.from_json, print_tables)
        return
    run_device_parts(args, header(args), cpu_part, cuda_part, print_tables)
