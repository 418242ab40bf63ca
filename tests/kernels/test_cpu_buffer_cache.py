"""The huge-page output buffers of the CPU kernels and the cache that reuses them.

Reuse is observed through the buffers' addresses and the cache's counters;
memory given back is observed in the process's RSS and huge-page figures from
``/proc`` (Linux only, skipped with the reason elsewhere). Tests that change the
shared cache's limit restore it.
"""

from __future__ import annotations

import gc
import mmap
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from scan_naive import naive_first_order_scan  # noqa: E402

from psmsearch.kernels import _dispatch, cpu_buffer_cache, first_order_scan  # noqa: E402

pytestmark = pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"),
                                reason="the buffer cache needs madvise(MADV_HUGEPAGE) (Linux)")

MIB = 1 << 20
FOUR_MIB_FLOATS = (1 << 20,)  # the smallest buffer that comes from the cache


def _thp_mode() -> str | None:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not path.exists():
        return None
    return next((word.strip("[]") for word in path.read_text().split() if word.startswith("[")), None)


needs_thp = pytest.mark.skipif(_thp_mode() not in ("always", "madvise"),
                               reason="needs Linux with transparent huge pages in mode always or madvise")


def _anon_huge_kib() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    raise AssertionError("no AnonHugePages line in /proc/self/smaps_rollup")


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS line in /proc/self/status")


@pytest.fixture
def cache() -> Iterator[cpu_buffer_cache.HugePageBufferCache]:
    """The shared cache with the default limit (whatever the environment says), emptied, its counters
    zeroed; the limit is restored afterwards."""
    before = cpu_buffer_cache.stats().idle_limit_bytes
    cpu_buffer_cache.set_idle_limit(cpu_buffer_cache.DEFAULT_IDLE_LIMIT_MIB * MIB)
    cpu_buffer_cache.empty_cache()
    gc.collect()                            # buffers other tests left to the garbage collector
    cpu_buffer_cache.reset_counters()
    yield cpu_buffer_cache.CACHE
    cpu_buffer_cache.set_idle_limit(before)
    cpu_buffer_cache.empty_cache()


def _large(shape: tuple[int, ...] = FOUR_MIB_FLOATS) -> torch.Tensor:
    return _dispatch.new_output(shape, torch.float32, "cpu")


def test_small_outputs_are_ordinary_tensors(cache: cpu_buffer_cache.HugePageBufferCache) -> None:
    assert _dispatch.huge_page_buffer((1000,), torch.float32) is None
    _large((1000,))
    assert cpu_buffer_cache.stats().misses == 0


@needs_thp
def test_large_outputs_get_huge_pages_and_give_them_back_without_cache(
        cache: cpu_buffer_cache.HugePageBufferCache) -> None:
    """A fresh 64 MiB kernel output is in huge pages once written, whatever THP_MEM_ALLOC_ENABLE
    says; with the cache off its memory is returned when the tensor dies (the mapping ends with it)."""
    cpu_buffer_cache.set_idle_limit(0)
    huge_before, rss_before = _anon_huge_kib(), _rss_mib()
    out = _large((16 << 20,))
    assert out.data_ptr() % (2 * MIB) == 0
    out.fill_(1.0)
    gained_mib = (_anon_huge_kib() - huge_before) / 1024
    assert gained_mib >= 32, f"only {gained_mib:.1f} MiB of huge pages after writing a 64 MiB output"
    assert float(out.sum()) == 16 << 20
    del out
    assert _rss_mib() - rss_before < 16, "the output's memory was not returned when the tensor died"
    assert cpu_buffer_cache.stats().idle_bytes == 0


@needs_thp
def test_a_freed_buffer_is_reused_without_new_faults(cache: cpu_buffer_cache.HugePageBufferCache) -> None:
    first = _large((16 << 20,))
    first.fill_(1.0)
    address = first.data_ptr()
    del first
    assert cpu_buffer_cache.stats().idle_bytes == 64 * MIB
    rss_before = _rss_mib()
    again = _large((4 << 20, 4))        # another shape of the same byte size
    assert again.data_ptr() == address
    again.fill_(2.0)
    assert _rss_mib() - rss_before < 8, "the reused buffer was faulted in again"
    stats = cpu_buffer_cache.stats()
    assert (stats.hits, stats.misses, stats.idle_bytes) == (1, 1, 0)
    del again
    cpu_buffer_cache.empty_cache()
    assert cpu_buffer_cache.stats().idle_bytes == 0
    assert _rss_mib() - rss_before < 8, "empty_cache did not return the idle buffer's memory"


HOLDERS = {
    "a view": lambda out: out[1:],
    "a NumPy array": lambda out: out.numpy(),
    "a DLPack capsule": lambda out: torch.utils.dlpack.to_dlpack(out),
    "a tensor saved for backward": lambda out: out.view(-1)[:8].clone().requires_grad_() * out.view(-1)[:8],
}


@pytest.mark.parametrize("holder", list(HOLDERS))
def test_a_buffer_is_not_reused_while_anything_holds_it(holder: str,
                                                         cache: cpu_buffer_cache.HugePageBufferCache) -> None:
    out = _large()
    address = out.data_ptr()
    held = HOLDERS[holder](out)
    del out
    other = _large()
    assert other.data_ptr() != address, f"reused while {holder} held the buffer"
    del other, held
    assert _large().data_ptr() == address, "not reused once nothing held the buffer"


def test_share_memory_moves_the_data_and_frees_the_buffer(cache: cpu_buffer_cache.HugePageBufferCache) -> None:
    """``share_memory_`` copies the data to shared memory and drops the old buffer at once (as the
    module docstring warns): the tensor keeps its values, and the buffer may be handed out again."""
    out = _large()
    out.copy_(torch.arange(out.numel(), dtype=torch.float32))
    address = out.data_ptr()
    out.share_memory_()
    assert out.is_shared() and out.data_ptr() != address
    again = _large()
    assert again.data_ptr() == address
    again.fill_(-1.0)
    assert torch.equal(out, torch.arange(out.numel(), dtype=torch.float32))


@needs_thp
def test_a_cached_output_cannot_grow_but_its_clone_can(cache: cpu_buffer_cache.HugePageBufferCache) -> None:
    """The limit the README and the module docstring state: the storage has a fixed size."""
    size = FOUR_MIB_FLOATS[0]
    with pytest.raises(RuntimeError, match="not resizable"):
        _large().resize_(2 * size)
    assert _large().resize_(size // 2).numel() == size // 2, "shrinking keeps working"
    assert _large().clone().resize_(2 * size).numel() == 2 * size


def test_idle_buffers_beyond_the_limit_are_unmapped_least_recently_used_first(
        cache: cpu_buffer_cache.HugePageBufferCache) -> None:
    cpu_buffer_cache.set_idle_limit(8 * MIB)
    buffers = [_large() for _ in range(3)]
    addresses = [b.data_ptr() for b in buffers]
    for index in range(3):                  # freed in order 0, 1, 2: 0 is the least recently used
        buffers[index] = None
    stats = cpu_buffer_cache.stats()
    assert (stats.idle_bytes, stats.idle_mappings) == (8 * MIB, 2)
    held = [_large(), _large()]
    assert {b.data_ptr() for b in held} == set(addresses[1:])


def test_a_buffer_larger_than_the_limit_is_not_kept(cache: cpu_buffer_cache.HugePageBufferCache) -> None:
    cpu_buffer_cache.set_idle_limit(2 * MIB)
    out = _large()
    del out
    assert cpu_buffer_cache.stats().idle_bytes == 0


def test_a_buffer_freed_while_the_cache_is_busy_is_filed_on_the_next_call() -> None:
    """A release callback can run inside the cache's own locked code (garbage collection); it must not
    deadlock or corrupt the idle list, only queue the buffer."""
    own = cpu_buffer_cache.HugePageBufferCache(64 * MIB)
    out = own.tensor(FOUR_MIB_FLOATS, torch.float32)
    with own._lock:
        del out
        gc.collect()
    assert own.stats().idle_mappings == 1
    own.empty()


def test_threads_taking_and_freeing_buffers_leave_consistent_counts() -> None:
    own = cpu_buffer_cache.HugePageBufferCache(64 * MIB)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(20):
                held = [own.tensor(FOUR_MIB_FLOATS, torch.float32) for _ in range(2)]
                held[0].fill_(1.0)
                del held
        except BaseException as exc:  # report in the main thread
            errors.append(exc)

    workers = [threading.Thread(target=work) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not errors
    stats = own.stats()
    assert stats.hits + stats.misses == 4 * 20 * 2
    assert stats.idle_bytes == stats.idle_mappings * 4 * MIB <= 64 * MIB
    # At most 8 buffers are alive at once; a buffer freed while another thread holds the lock is
    # filed a moment later, so a few more fresh mappings than 8 are possible, not one per take.
    assert stats.misses <= 16, f"{stats.misses} fresh mappings for at most 8 buffers alive at once"
    own.empty()


def test_reused_buffers_are_poisoned_and_fully_overwritten(cache: cpu_buffer_cache.HugePageBufferCache) -> None:
    """A scan into a reused buffer full of stale values still writes every element."""
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(1, 256, 4096, generator=gen) * 0.5 + 0.5
    b = torch.randn(1, 256, 4096, generator=gen)
    stale = _large((1, 256, 4096))
    stale.fill_(float("inf"))
    address = stale.data_ptr()
    del stale
    got = first_order_scan(a, b, backend="numba")
    assert got.data_ptr() == address
    torch.testing.assert_close(got.double(), naive_first_order_scan(a.double(), b.double(), None, False),
                               rtol=1e-5, atol=1e-5)
    del got
    with _dispatch.poisoned_outputs():
        assert torch.isnan(_large((1, 256, 4096))).all()


@pytest.mark.parametrize("raw, expected", [("", 256 * MIB), ("0", 0), ("1.5", 3 * MIB // 2), (" 64 ", 64 * MIB)])
def test_limit_from_the_environment(monkeypatch: pytest.MonkeyPatch, raw: str, expected: int) -> None:
    monkeypatch.setenv(cpu_buffer_cache.ENV_VAR, raw)
    assert cpu_buffer_cache._idle_limit_from_env() == expected


@pytest.mark.parametrize("raw", ["-1", "lots", "nan"])
def test_bad_limits_name_the_variable_and_what_is_allowed(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv(cpu_buffer_cache.ENV_VAR, raw)
    with pytest.raises(ValueError, match=f"{cpu_buffer_cache.ENV_VAR}='{raw}': expected a number of MiB >= 0"):
        cpu_buffer_cache._idle_limit_from_env()
    with pytest.raises(ValueError, match="idle_limit_bytes=-1: expected >= 0"):
        cpu_buffer_cache.set_idle_limit(-1)
