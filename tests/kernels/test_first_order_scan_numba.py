"""The compiled CPU (numba) backend of first_order_scan against a float64 token loop.

Outputs and every gradient (a, b, h0) are compared with the independent loop
in ``scan_naive``, with the kernels' output buffers NaN-filled so that a skipped
element shows. Small block and thread thresholds force the code paths that
large inputs take: descending passes in many touched blocks, and the batch
split across threads, unevenly.
"""

from __future__ import annotations

import importlib
import multiprocessing
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from scan_naive import naive_first_order_scan  # noqa: E402

from psmsearch.kernels import _dispatch, chunk_gated_linear_attention, first_order_scan  # noqa: E402

scan_module = importlib.import_module("psmsearch.kernels.first_order_scan")
autograd_module = importlib.import_module("psmsearch.kernels.first_order_scan_autograd")

pytestmark = pytest.mark.skipif(not _dispatch.numba_available(), reason="numba is not installed")

STATE = (2, 3, 4)  # [H, dk, dv]
GATE_SHAPES = {
    "scalar": (2, 1, 1),      # grouped: one gate per head
    "diagonal": (2, 3, 1),    # grouped: one per key channel
    "full": STATE,            # one per element
    "per_value": (1, 1, 4),   # skips the leading dims: expanded to full
    "one": (1, 1, 1),         # one gate for the whole state
}


def _inputs(batch: int, steps: int, gate_shape: tuple[int, ...], with_h0: bool,
            dtype: torch.dtype = torch.float64, seed: int = 0,
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand((batch, steps, *gate_shape), generator=gen, dtype=dtype) * 0.6 + 0.4
    b = torch.randn((batch, steps, *STATE), generator=gen, dtype=dtype)
    h0 = torch.randn((batch, *STATE), generator=gen, dtype=dtype) if with_h0 else None
    return a, b, h0


def _check_against_loop(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None, reverse: bool,
                        tol: float = 1e-10) -> None:
    inputs = [x.requires_grad_() for x in (a, b, h0) if x is not None]
    names = ["a", "b", "h0"][:len(inputs)]
    with _dispatch.poisoned_outputs():
        got = first_order_scan(a, b, h0, reverse=reverse, backend="numba")
        upstream = torch.randn(got.shape, generator=torch.Generator().manual_seed(1), dtype=got.dtype)
        grads = torch.autograd.grad(got, inputs, upstream)
    want = naive_first_order_scan(a, b, h0, reverse)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    for name, g_got, g_want in zip(names, grads, torch.autograd.grad(want, inputs, upstream)):
        assert g_got.shape == g_want.shape, name
        torch.testing.assert_close(g_got, g_want, rtol=tol, atol=tol, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.fixture
def threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("steps", [1, 2, 63, 197])
@pytest.mark.parametrize("gate", list(GATE_SHAPES))
@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_numba_matches_loop(steps: int, gate: str, with_h0: bool, reverse: bool) -> None:
    _check_against_loop(*_inputs(2, steps, GATE_SHAPES[gate], with_h0), reverse)


@pytest.mark.parametrize("gate", ["scalar", "diagonal", "full"])
@pytest.mark.parametrize("reverse", [False, True])
def test_many_blocks_and_an_uneven_thread_split(gate: str, reverse: bool, threads: None,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Descending passes in 5-step touched blocks (the last one partial); 5 items on 3 threads."""
    from psmsearch.kernels import first_order_scan_numba as compiled

    monkeypatch.setattr(compiled, "_BLOCK_ELEMENTS", 5 * 24)
    monkeypatch.setattr(compiled, "_MIN_ELEMENTS_PER_THREAD", 1)
    torch.set_num_threads(3)
    assert compiled._block_rows(24) == 5 and compiled._workers(5, 63, 24) == 3
    _check_against_loop(*_inputs(5, 63, GATE_SHAPES[gate], with_h0=True), reverse)


@pytest.mark.parametrize("gate", ["scalar", "diagonal", "full", "one"])
@pytest.mark.parametrize("shared", ["batch", "time", "both"])
@pytest.mark.parametrize("reverse", [False, True])
def test_gates_shared_over_batch_or_time(gate: str, shared: str, reverse: bool, threads: None,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A gate with batch and/or time of size 1 is read in place (no expanded copy) and its gradient
    is summed over what it is shared by; in 5-step touched blocks, 5 items on 3 threads."""
    from psmsearch.kernels import first_order_scan_numba as compiled

    monkeypatch.setattr(compiled, "_BLOCK_ELEMENTS", 5 * 24)
    monkeypatch.setattr(compiled, "_MIN_ELEMENTS_PER_THREAD", 1)
    torch.set_num_threads(3)
    a, b, h0 = _inputs(5, 63, GATE_SHAPES[gate], with_h0=True)
    a = a[: 1 if shared in ("batch", "both") else None, : 1 if shared in ("time", "both") else None].clone()
    table, grad_shape = compiled._gate_table(a, b.shape, torch.float64)
    assert table.shape[:2] == a.shape[:2] and table.numel() == a.numel(), "the shared gate must not be copied"
    assert grad_shape[:2] == b.shape[:2]
    inputs = [x.requires_grad_() for x in (a, b, h0)]
    with _dispatch.poisoned_outputs():
        got = first_order_scan(a, b, h0, reverse=reverse, backend="numba")
        upstream = torch.randn(got.shape, generator=torch.Generator().manual_seed(1), dtype=got.dtype)
        grads = torch.autograd.grad(got, inputs, upstream)
    want = naive_first_order_scan(a.expand(*b.shape[:2], *a.shape[2:]), b, h0, reverse)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for name, g_got, g_want in zip("a b h0".split(), grads, torch.autograd.grad(want, inputs, upstream)):
        assert g_got.shape == g_want.shape, name
        torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-10, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("reverse", [False, True])
def test_float32_long_scan_close_to_float64(reverse: bool) -> None:
    a, b, h0 = _inputs(2, 3000, GATE_SHAPES["diagonal"], with_h0=True)
    got = first_order_scan(a.float(), b.float(), h0.float(), reverse=reverse, backend="numba")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), naive_first_order_scan(a, b, h0, reverse), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_accumulate_in_float32(dtype: torch.dtype) -> None:
    a, b, h0 = (x.to(dtype) for x in _inputs(2, 700, GATE_SHAPES["diagonal"], with_h0=True))
    got = first_order_scan(a, b, h0, backend="numba")
    assert got.dtype == dtype
    want = naive_first_order_scan(a.double(), b.double(), h0.double(), False)
    torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=2e-2)


def test_numba_and_reference_agree_on_float32() -> None:
    """A second algorithm: the blocked reference, on a scan long enough to use its carries."""
    a, b, h0 = (x.float() for x in _inputs(4, 2500, GATE_SHAPES["scalar"], with_h0=True, seed=5))
    for reverse in (False, True):
        torch.testing.assert_close(first_order_scan(a, b, h0, reverse=reverse, backend="numba"),
                                   first_order_scan(a, b, h0, reverse=reverse, backend="reference"),
                                   rtol=1e-5, atol=1e-5)


def _scan_in_child(queue: multiprocessing.Queue) -> None:
    a, b, h0 = _inputs(4, 300, GATE_SHAPES["full"], with_h0=True)
    got = first_order_scan(a, b, h0, backend="numba")
    queue.put(float((got - naive_first_order_scan(a, b, h0, False)).abs().max()))


def test_a_forked_child_gets_its_own_thread_pool(threads: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The parent's pool threads do not exist in a forked child; the child must not wait on them."""
    from psmsearch.kernels import first_order_scan_numba as compiled

    monkeypatch.setattr(compiled, "_MIN_ELEMENTS_PER_THREAD", 1)
    torch.set_num_threads(2)
    _check_against_loop(*_inputs(4, 300, GATE_SHAPES["full"], with_h0=True), reverse=False)  # pool now running
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_scan_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("a scan in a forked child hung on the parent's thread pool")
    assert child.exitcode == 0
    assert queue.get(timeout=5) < 1e-10


def test_default_cpu_backend_depends_on_length(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    long, short = scan_module.MIN_COMPILED_CPU_STEPS, scan_module.MIN_COMPILED_CPU_STEPS - 1
    chosen = []
    implementation = autograd_module.implementation
    record = lambda backend: chosen.append(backend) or implementation(backend)  # noqa: E731
    monkeypatch.setattr(scan_module, "implementation", record)      # calls without gradients
    monkeypatch.setattr(autograd_module, "implementation", record)  # the autograd Function's
    for steps in (long, short):
        first_order_scan(torch.rand(1, steps, 3), torch.rand(1, steps, 3))
        first_order_scan(torch.rand(1, steps, 3, requires_grad=True), torch.rand(1, steps, 3)).sum().backward()
    assert chosen == ["numba"] * 3 + ["reference"] * 3  # forward without grad; forward and backward with


def test_env_var_forces_numba(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_dispatch.ENV_VAR, "numba")
    x = torch.zeros(1, 2, 3)
    assert _dispatch.select_backend(None, x, available=("triton", "reference", "numba")) == "numba"


def test_kernels_without_numba_say_so(monkeypatch: pytest.MonkeyPatch) -> None:
    q = torch.randn(1, 1, 16, 4)
    with pytest.raises(ValueError, match=r"backend='numba': chunk_gated_linear_attention has no numba"):
        chunk_gated_linear_attention(q, q, q, -torch.rand(1, 1, 16), chunk_size=16, backend="numba")
    monkeypatch.setenv(_dispatch.ENV_VAR, "numba")
    with pytest.raises(ValueError, match=f"{_dispatch.ENV_VAR}='numba'"):
        chunk_gated_linear_attention(q, q, q, -torch.rand(1, 1, 16), chunk_size=16)


def test_numba_refuses_non_cpu_tensors() -> None:
    x = torch.empty(1, 4, 3, device="meta")
    with pytest.raises(RuntimeError, match=r"backend='numba': numba runs on CPU tensors only, got tensors on "
                                           r"meta; use backend='reference'"):
        _dispatch.select_backend("numba", x, available=("triton", "reference", "numba"))


def test_backend_names_are_case_insensitive_and_errors_name_their_source(
        monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.zeros(1, 70, 3)
    assert _dispatch.select_backend(" Numba", x, available=("triton", "reference", "numba")) == "numba"
    monkeypatch.setenv(_dispatch.ENV_VAR, "Bogus")
    with pytest.raises(ValueError, match=f"{_dispatch.ENV_VAR}='Bogus': unknown kernel backend"):
        first_order_scan(x, x)


def test_poisoned_outputs_fill_large_and_small_buffers() -> None:
    with _dispatch.poisoned_outputs():
        for shape in ((7,), (2 << 20,)):
            assert torch.isnan(_dispatch.new_output(shape, torch.float32, "cpu")).all()


def test_second_derivatives_are_those_of_the_loop() -> None:
    """The fused kernels build no graph in backward; a differentiated backward must not come out zero:
    ``d/da`` of the gradient in ``b`` equals the float64 loop's (full gates, 70 steps: the numba default)."""
    a, b, _ = _inputs(1, 70, GATE_SHAPES["full"], with_h0=False)
    a64, b64 = (x.double().requires_grad_() for x in (a, b))
    (db_want,) = torch.autograd.grad(naive_first_order_scan(a64, b64, None, False).square().sum(), [b64],
                                     create_graph=True)
    (want,) = torch.autograd.grad(db_want.sum(), [a64])
    for backend in ("numba", "reference"):
        a_k, b_k = a.clone().requires_grad_(), b.clone().requires_grad_()
        (db,) = torch.autograd.grad(first_order_scan(a_k, b_k, backend=backend).square().sum(), [b_k],
                                    create_graph=True)
        (got,) = torch.autograd.grad(db.sum(), [a_k])
        assert got.abs().max() > 0
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_threads_with_different_thread_counts_share_the_kernels(threads: None,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Trials run as threads of one process, each with its own torch thread count, at the same time."""
    import threading

    from psmsearch.kernels import first_order_scan_numba as compiled

    monkeypatch.setattr(compiled, "_MIN_ELEMENTS_PER_THREAD", 1)
    a, b, h0 = _inputs(4, 80, GATE_SHAPES["diagonal"], with_h0=True)
    want = naive_first_order_scan(a, b, h0, False)
    errors: list[BaseException] = []

    def trial(threads: int) -> None:
        torch.set_num_threads(threads)
        try:
            for _ in range(30):
                torch.testing.assert_close(first_order_scan(a, b, h0, backend="numba"), want)
        except BaseException as exc:  # collected and re-raised by the test thread
            errors.append(exc)

    workers = [threading.Thread(target=trial, args=(n,)) for n in (2, 3, 4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert not any(worker.is_alive() for worker in workers), "a scan thread hung"
    assert not errors, errors[0]


@pytest.mark.parametrize("shape", [(2, 0, 3), (2, 5, 0), (0, 5, 3)])
def test_empty_scans(shape: tuple[int, ...]) -> None:
    a = torch.rand(shape, dtype=torch.float64, requires_grad=True)
    b = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(shape[0], shape[2], dtype=torch.float64, requires_grad=True)
    out = first_order_scan(a, b, h0, backend="numba")
    assert out.shape == shape
    da, db, dh0 = torch.autograd.grad(out.sum(), [a, b, h0], allow_unused=True)
    assert da.shape == a.shape and db.shape == b.shape
    assert torch.equal(dh0, torch.zeros_like(h0)), "h0 reaches no output of an empty scan"


@pytest.fixture
def streaming(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bool]]:
    """Every ascending forward scan with full gates streams its output, however small (the large-output path).

    Yields the decisions :func:`streams_output` returned, so a test can check the path ran.
    """
    compiled = importlib.import_module("psmsearch.kernels.first_order_scan_numba")
    monkeypatch.setattr(compiled, "STREAM_MIN_BYTES", 0)
    decisions: list[bool] = []
    decide = compiled.streams_output

    def recorded(out: torch.Tensor, reverse: bool, full_gates: bool) -> bool:
        decisions.append(decide(out, reverse, full_gates))
        return decisions[-1]

    monkeypatch.setattr(compiled, "streams_output", recorded)
    yield decisions


@pytest.mark.parametrize("state", [(1,), (5,), (2, 8), (17,), (3, 11), (1031,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_streaming_stores_match_the_loop_at_every_alignment(state: tuple[int, ...], dtype: torch.dtype,
                                                            streaming: list[bool]) -> None:
    """Rows of these widths start at every offset within a 64-byte line, so the peeled head, the
    streamed lines and the tail all get exercised."""
    gen = torch.Generator().manual_seed(3)
    a = torch.rand((2, 37, *state), generator=gen, dtype=dtype) * 0.6 + 0.4
    b = torch.randn((2, 37, *state), generator=gen, dtype=dtype)
    h0 = torch.randn((2, *state), generator=gen, dtype=dtype)
    inputs = [x.requires_grad_() for x in (a, b, h0)]
    with _dispatch.poisoned_outputs():
        got = first_order_scan(a, b, h0, backend="numba")
        upstream = torch.randn(got.shape, generator=gen, dtype=dtype)
        grads = torch.autograd.grad(got, inputs, upstream)
    assert streaming and streaming[0], "the forward did not take the streaming path"
    want = naive_first_order_scan(*(x.double() for x in (a, b, h0)), False)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    for name, g_got, g_want in zip("a b h0".split(), grads, torch.autograd.grad(want, inputs, upstream.double())):
        torch.testing.assert_close(g_got.double(), g_want.double(), rtol=tol, atol=tol,
                                   msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize(("gate_shape", "streams"), [((4, 9, 7), True), ((4, 9, 1), False), ((4, 1, 1), False)])
def test_streaming_and_ordinary_stores_give_the_same_bits(gate_shape: tuple[int, ...], streams: bool,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Full gates stream past the threshold, grouped ones never (measured slower); the bits agree."""
    compiled = importlib.import_module("psmsearch.kernels.first_order_scan_numba")
    gen = torch.Generator().manual_seed(5)
    a = torch.rand((3, 50, *gate_shape), generator=gen) * 0.6 + 0.4
    b = torch.randn(3, 50, 4, 9, 7, generator=gen)
    results, decisions = [], []
    decide = compiled.streams_output
    monkeypatch.setattr(compiled, "streams_output", lambda out, reverse, full_gates: decisions.append(
        decide(out, reverse, full_gates)) or decisions[-1])
    for threshold in (0, 1 << 62):
        monkeypatch.setattr(compiled, "STREAM_MIN_BYTES", threshold)
        results.append(first_order_scan(a, b, backend="numba"))
    assert decisions == [streams, False]
    assert torch.equal(results[0], results[1])


def test_only_large_ascending_outputs_of_full_gates_stream() -> None:
    compiled = importlib.import_module("psmsearch.kernels.first_order_scan_numba")
    large = torch.empty(compiled.STREAM_MIN_BYTES // 4)
    assert compiled.streams_output(large, reverse=False, full_gates=True)
    assert not compiled.streams_output(large, reverse=False, full_gates=False)
    assert not compiled.streams_output(large, reverse=True, full_gates=True)
    assert not compiled.streams_output(large[:-1], reverse=False, full_gates=True)
    assert not compiled.streams_output(torch.empty(0), reverse=False, full_gates=True)
    raw = np.zeros(compiled.STREAM_MIN_BYTES + 8, dtype=np.uint8)
    misaligned = torch.from_numpy(np.frombuffer(raw.data, dtype=np.float32, count=large.numel(), offset=1))
    assert misaligned.data_ptr() % 4 and not compiled.streams_output(misaligned, reverse=False, full_gates=True)


def test_a_default_device_elsewhere_does_not_move_the_scratch_buffers() -> None:
    """``torch.set_default_device`` (here via the ``meta`` device context) must not reach the
    kernels' own CPU buffers (start states, backward scratch): CPU inputs give CPU results."""
    a, b, h0 = _inputs(2, 80, GATE_SHAPES["diagonal"], with_h0=True)
    inputs = [x.clone().requires_grad_() for x in (a, b, h0)]
    want = naive_first_order_scan(a, b, h0, False)
    with torch.device("meta"):
        got = first_order_scan(*inputs, backend="numba")
        grads = torch.autograd.grad(got.sum(), inputs)
        no_start = first_order_scan(a, b, backend="numba")
    assert got.device.type == "cpu" and all(g.device.type == "cpu" for g in grads)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(no_start, naive_first_order_scan(a, b, None, False))
