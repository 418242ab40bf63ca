"""The benchmark scripts run, and their baselines compute what the kernels compute.

A speed-up is only meaningful if the baseline does the same work: each token
loop is checked against the kernel it is compared with (and so, transitively,
against the float64 loops of ``tests/kernels``).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from psmsearch.kernels import _dispatch, chunk_gated_linear_attention, first_order_scan

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str) -> ModuleType:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_scan_token_loop_is_the_same_scan() -> None:
    scan = _load("scan")
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(1, 300, 7, generator=gen) * 0.5 + 0.5
    b = torch.randn(1, 300, 7, generator=gen)
    torch.testing.assert_close(scan._token_loop(a, b), first_order_scan(a, b, backend="reference"))


@pytest.mark.skipif(not _dispatch.numba_available(), reason="numba is not installed")
def test_scan_numba_kernel_column_is_the_same_scan() -> None:
    """The "numba kernel" column times the forward kernel alone; it must compute the scan."""
    scan = _load("scan")
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(1, 300, 7, generator=gen) * 0.5 + 0.5
    b = torch.randn(1, 300, 7, generator=gen)
    out = torch.full_like(b, float("nan"))
    scan._numba_kernel_into(a, b, out)()
    torch.testing.assert_close(out, first_order_scan(a, b, backend="reference"))


def _run_and_reprint(name: str, tmp_path: Path, *flags: str) -> tuple[dict, str]:
    """Run ``benchmarks/NAME.py --cpu-only --quick --json FLAGS``; return its result and the table that
    ``--from-json`` prints from the saved output."""
    script = BENCHMARKS / f"{name}.py"
    run = subprocess.run([sys.executable, str(script), "--cpu-only", "--quick", "--json", *flags],
                         capture_output=True, text=True, timeout=300, check=True)
    saved = tmp_path / f"{name}.json"
    saved.write_text(run.stdout)
    table = subprocess.run([sys.executable, str(script), "--from-json", str(saved)],
                           capture_output=True, text=True, timeout=60, check=True).stdout
    return json.loads(run.stdout), table


@pytest.mark.skipif(not _dispatch.numba_available(), reason="numba is not installed")
def test_streamed_add_floor_is_an_add_at_any_alignment() -> None:
    """The memory-floor column must do the scan's traffic for real: every element of ``x + y``, including
    the elements before the first 64-byte line and after the last one, which take ordinary stores."""
    floor = _load("memory_floor")
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        x, y = torch.randn(2, 1000 + 37, dtype=dtype, generator=gen)
        for shift in (0, 1, 5):
            size = 1000 - shift
            out = torch.full((size + shift,), float("nan"), dtype=dtype)[shift:]   # misaligned by shift elements
            floor.streamed_add(x[:size], y[:size], out)
            torch.testing.assert_close(out, x[:size] + y[:size], rtol=0, atol=0)
    with pytest.raises(ValueError, match="one shape and dtype"):
        floor.streamed_add(x[:4], y[:5], torch.empty(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="y must be a contiguous CPU float tensor"):
        floor.streamed_add(x[:4], y[::2][:4], torch.empty(4, dtype=torch.float64))


@pytest.mark.skipif(not _dispatch.numba_available(), reason="numba is not installed")
def test_scan_benchmark_runs_and_reprints_its_json(tmp_path: Path) -> None:
    scan = _load("scan")
    result, table = _run_and_reprint("scan", tmp_path, "--model-sizes")
    assert [(r["rows"], r["T"]) for r in result["cpu"]] == [(16, 65536), (512, 16384), (2048, 4096)]
    assert all(r["numba_ms"] > 0 and r["numba_kernel_ms"] > 0 and r["numba_fresh_ms"] > 0 and r["reference_ms"] > 0
               for r in result["cpu"])
    assert all(r["loop_over_numba_fresh"] == pytest.approx(r["loop_ms"] / r["numba_fresh_ms"]) for r in result["cpu"])
    assert all(r["add_ms"] > 0 and r["loop_over_add"] == pytest.approx(r["loop_ms"] / r["add_ms"])
               for r in result["cpu"])
    assert all(r["add_streamed_ms"] > 0
               and r["numba_kernel_over_add_streamed"] == pytest.approx(r["numba_kernel_ms"] / r["add_streamed_ms"])
               for r in result["cpu"])
    assert {(r["T"], r["gate"], r["pass"]) for r in result["cpu_model_sizes"]} == {
        (shape[1], gate, kind) for shape in scan.MODEL_SHAPES
        for gate in ("scalar", "diagonal") for kind in ("fwd", "fwd+bwd")}
    assert "loop/numba" in table and "ref/numba" in table and "loop/(a+b)" in table
    assert "loop/(a+b streamed)" in table and "the memory floor in this run" in table
    assert "Targets at (512, 16384): loop/numba" in table
    assert "the PyTorch reference itself is at loop/ref" in table and "assoc_scan/ref" in table
    assert all(r["assoc_scan_over_reference"] == pytest.approx(r["assoc_scan_ms"] / r["reference_ms"])
               for r in result["cpu"] if r["assoc_scan_ms"] is not None)
    assert result["cpu_clean_caches"] is True and "caches left clean before each timed call" in table


@pytest.mark.skipif(not _dispatch.triton_available(), reason="triton is not installed")
def test_scan_tuning_report_names_every_candidate_and_the_pick(monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """What the CUDA part of the scan benchmark saves and prints about the tuner (filled by hand: no GPU here)."""
    from psmsearch.kernels import first_order_scan_triton as scan_triton

    fast, slow = scan_triton._FORWARD_CANDIDATES[-1], scan_triton._DEFAULT_CONFIG
    key = ("fwd", 1536, 8, 17, torch.Size([1536]), torch.bfloat16, torch.bfloat16)
    broken = scan_triton._CANDIDATES[1]
    monkeypatch.setattr(scan_triton, "_tuning_times", {key: {slow: 3.0, fast: 1.5, broken: math.inf}})
    monkeypatch.setattr(scan_triton, "_tuned", {key: fast})
    report = scan_triton.tuning_report()
    assert report == [{"key": [str(part) for part in key],
                       "candidates": {"T64xN64 w4 s2": 3.0, "T128xN64 w4 s1 sub4": 1.5, "T32xN64 w4 s2": None},
                       "chosen": "T128xN64 w4 s1 sub4"}]
    saved = json.dumps(report, allow_nan=False)  # strict JSON: a failed candidate is null, not Infinity
    _load("scan").print_tuning_table(json.loads(saved))
    out = capsys.readouterr().out
    assert "T128xN64 w4 s1 sub4 1.500 ms | T64xN64 w4 s2 2.00x, T128xN64 w4 s1 sub4 1.00x, T32xN64 w4 s2 failed" in out


def test_scan_benchmark_reprints_the_saved_h200_run() -> None:
    """The CUDA table of a saved GPU run (benchmarks/measured) reprints from its JSON, with the same figures."""
    saved = BENCHMARKS / "measured" / "scan_cuda_h200_2026-11-29.json"
    run = subprocess.run([sys.executable, str(BENCHMARKS / "scan.py"), "--from-json", str(saved)],
                         capture_output=True, text=True, timeout=120, check=True)
    assert "CUDA (NVIDIA H200)" in run.stdout
    assert "float32 | 65536 | fwd | 2.804 | 3446 | 91% |" in run.stdout
    assert "Triton tile tuning" in run.stdout


def test_cache_sizes_as_linux_writes_them() -> None:
    timing = _load("bench_timing")
    assert [timing.cache_size_bytes(text) for text in ("32768K\n", "1M", "512", "", "big")] == [
        32 << 20, 1 << 20, 512, None, None]
    assert timing.last_level_cache_bytes() > 0


@pytest.mark.parametrize("diagonal", [False, True])
def test_chunkwise_token_loop_is_the_same_attention(diagonal: bool) -> None:
    chunkwise = _load("chunkwise")
    q, k, v, log_gate = chunkwise._inputs(1, 2, 150, 8, 5, diagonal, "cpu")
    want, _ = chunk_gated_linear_attention(q, k, v, log_gate, chunk_size=64, backend="reference")
    torch.testing.assert_close(chunkwise.token_loop(q, k, v, log_gate), want, rtol=1e-4, atol=1e-4)


def test_scan_benchmark_asks_for_huge_pages_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    scan = _load("scan")
    monkeypatch.delenv(scan.THP_ENV, raising=False)
    scan.configure_thp([])
    assert os.environ[scan.THP_ENV] == "1"
    scan.configure_thp(["--no-thp"])
    assert os.environ[scan.THP_ENV] == "0"
    monkeypatch.setenv(scan.THP_ENV, "0")
    scan.configure_thp([])
    assert os.environ[scan.THP_ENV] == "0", "a value the user set is kept"


def test_chunkwise_benchmark_runs_and_reprints_its_json(tmp_path: Path) -> None:
    result, table = _run_and_reprint("chunkwise", tmp_path)
    rows = result["cpu"]
    assert {(r["gate"], r["pass"]) for r in rows} == {
        (gate, kind) for gate in ("scalar", "diagonal") for kind in ("fwd", "fwd+bwd")}
    assert all(r["reference_ms"] > 0 and r["loop_ms"] > 0 for r in rows)
    assert "T | gate | pass | reference ms" in table and "loop/ref" in table


@pytest.mark.skipif(not _dispatch.triton_available(), reason="triton is not installed")
def test_chunkwise_default_launch_ab_swaps_and_restores_the_launch_options() -> None:
    """The GPU A/B times Triton's default launch; it must reach every launcher and undo itself."""
    from psmsearch.kernels import chunkwise_triton, chunkwise_triton_backward, chunkwise_triton_common

    chunkwise = _load("chunkwise")
    modules = (chunkwise_triton, chunkwise_triton_backward, chunkwise_triton_common)
    assert all(module.launch_options(64) == {"num_warps": 8, "num_stages": 1} for module in modules)
    with chunkwise._triton_default_launch():
        assert all(module.launch_options(64) == {} for module in modules)
    assert all(module.launch_options(64) == {"num_warps": 8, "num_stages": 1} for module in modules)


def test_affine_layers_benchmark_paths_compute_the_same_layer() -> None:
    bench = _load("affine_layers")
    shape = {**bench.CPU_SHAPE_QUICK, "steps": 40}
    x = bench._inputs(shape, "cpu")
    for encoder in bench.TRIPLES:
        layer = bench.make_layer(encoder, 16, shape, "cpu")
        generic = bench.layer_pass(layer, x, fused=False, backward=True)()
        fused = bench.layer_pass(layer, x, fused=True, backward=True)()
        torch.testing.assert_close(fused, generic, rtol=1e-4, atol=1e-5)
        assert x.grad is None and all(p.grad is None for p in layer.parameters()), "a pass must clear its grads"


def test_affine_layers_benchmark_runs_and_reprints_its_json(tmp_path: Path) -> None:
    result, table = _run_and_reprint("affine_layers", tmp_path)
    rows = result["cpu"]
    assert {(r["encoder"], r["pass"]) for r in rows} == {
        (encoder, kind) for encoder in ("mamba2", "gla") for kind in ("fwd", "fwd+bwd")}
    assert all(r["generic_ms"] > 0 and r["fused_ms"] > 0 for r in rows)
    assert "encoder | chunk | pass | generic ms" in table and "generic/fused" in table


def test_train_step_full_rows_path_computes_the_same_model() -> None:
    """The full-rows baseline of ``benchmarks/train_step.py`` must do the same work as the kept-rows
    path it is compared with: same logits, gradients and streamed outputs (it shares the weights)."""
    bench = _load("train_step")
    case = next(case for case in bench.cases(quick=True) if case.name == "T-PSM c=16")
    torch.manual_seed(0)
    model = bench.build_model(case.config, bench.VOCAB)
    legacy = bench.full_rows_copy(model)
    tokens = torch.randint(0, bench.VOCAB, (2, 37))
    for m in (model, legacy):
        torch.nn.functional.cross_entropy(m(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
    torch.testing.assert_close(legacy(tokens), model(tokens))
    for (name, p), q in zip(model.named_parameters(), legacy.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    torch.testing.assert_close(bench.stream_tokens(legacy, tokens[:1])(), bench.stream_tokens(model, tokens[:1])())
    assert legacy.blocks[0].mixer.head.forward_last.__func__ is bench._full_rows_head_last


def test_train_step_benchmark_runs(tmp_path: Path) -> None:
    script = BENCHMARKS / "train_step.py"
    run = subprocess.run([sys.executable, str(script), "--quick", "--rounds", "1", "--json"],
                         capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(run.stdout)
    rows = result["rows"]
    assert [(r["model"], r["pass"]) for r in rows] == [
        (model, kind) for model in ("T-PSM c=1", "T-PSM c=16", "gla c=16", "mamba2 c=16", "deltanet c=16")
        for kind in ("train", "eval", "stream")]
    assert all(r["ms"] > 0 and r["over_gpt"] == pytest.approx(r["ms"] / r["gpt_ms"]) for r in rows)
    assert all(("speedup" in r) == r["model"].startswith("T-PSM") for r in rows)
    assert all(r["speedup"] == pytest.approx(r["full_rows_ms"] / r["ms"]) for r in rows if "speedup" in r)
    assert result["threads"] == 1 and result["rounds"] == 1


def test_the_search_overhead_benchmark_loads_as_a_plugin_and_times_run_trial(fresh_registry) -> None:
    """It passes itself as --plugin; once plugins without a hook were failures (and a failed --plugin
    stops a search), it failed under both drivers before measuring anything."""
    import psmsearch.trial

    original = psmsearch.trial.run_trial
    try:
        registry = fresh_registry.load_registry(extra_plugins=[str(BENCHMARKS / "search_overhead.py")])
        assert registry.failures == []
        assert getattr(psmsearch.trial.run_trial, "__wrapped_for_benchmark__", False)
        assert psmsearch.trial.run_trial.__wrapped__ is original
    finally:
        psmsearch.trial.run_trial = original
