"""A cache of huge-page mappings for large CPU kernel outputs, reused once their tensors are freed.

Linux zeroes every page of fresh anonymous memory on its first write. For the
32 MiB output of a scan at (512, 16384) that zeroing cost about as much as the
scan itself on the 2-core machine we measured, even in huge pages. A training
loop asks for the same output sizes step after step, so, like PyTorch's CUDA
caching allocator, this keeps the mappings of freed outputs (up to a byte
budget) and hands them out again: memory already faulted in, nothing to zero.

How a buffer comes back: the tensor is made with :func:`torch.from_numpy` on a
NumPy array over the mapping, so the tensor's storage holds that array and
nothing else does. Views, ``.numpy()`` arrays, DLPack exports and tensors that
autograd saved all keep the storage, hence the array, alive. When the storage
is freed, the array is too, and the callback of a weak reference to it returns
the mapping to the idle list. Idle mappings beyond the budget are unmapped,
least recently used first.

The hand-out path makes as few Python and PyTorch calls as it can (for dtypes
NumPy has: one array in the tensor's shape, one ``from_numpy``, one weak
reference and its dict entry): it runs right after a large kernel has streamed
its inputs through every cache, when each call costs tens of microseconds.

One PyTorch operation frees the memory while the tensor lives on:
``share_memory_()`` (also run when a tensor is pickled for
``torch.multiprocessing``) copies the data to shared memory and drops the old
buffer at once. A NumPy array or raw pointer taken from the tensor *before*
that call then points at memory the next kernel output may reuse; in plain
PyTorch it would point at freed memory. Take such views after ``share_memory_()``.

The storage of such a tensor cannot grow, as for any tensor made by
:func:`torch.from_numpy`: ``resize_`` to more elements, or an ``out=``
argument that would have to grow it, raises "Trying to resize storage that is
not resizable". Clone the tensor first where that is needed.

The budget is ``PSMSEARCH_CPU_BUFFER_CACHE_MIB`` (read at import; default
256) or :func:`set_idle_limit`; 0 turns the cache off, and every buffer is
then a fresh mapping that is unmapped with its tensor. :func:`empty_cache`
unmaps every idle mapping, :func:`stats` says what the cache holds.

Buffers are uninitialised (the kernels write every element), 2 MiB aligned,
and advised into transparent huge pages. Mapping sizes are rounded up to
2 MiB, and a request reuses an idle mapping of exactly its rounded size.
"""

from __future__ import annotations

import atexit
import functools
import math
import mmap
import os
import threading
import weakref
from dataclasses import dataclass

import numpy as np
import torch

# PyTorch dtypes that NumPy has, so a buffer can be made in its final dtype and shape at once.
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16,
                 torch.int64: np.int64, torch.int32: np.int32, torch.uint8: np.uint8}

ENV_VAR = "PSMSEARCH_CPU_BUFFER_CACHE_MIB"
DEFAULT_IDLE_LIMIT_MIB = 256
HUGE_PAGE_BYTES = 2 << 20


def _idle_limit_from_env() -> int:
    raw = os.environ.get(ENV_VAR, "").strip()
    if not raw:
        return DEFAULT_IDLE_LIMIT_MIB << 20
    try:
        mib = float(raw)
    except ValueError:
        mib = -1.0
    if not math.isfinite(mib) or mib < 0:
        raise ValueError(f"{ENV_VAR}={raw!r}: expected a number of MiB >= 0 (0 turns the cache off)")
    return int(mib * (1 << 20))


@dataclass(eq=False)
class _Mapping:
    """One anonymous mapping: ``size`` usable bytes from the 2 MiB-aligned ``offset``."""

    region: mmap.mmap
    offset: int
    size: int


@dataclass(frozen=True)
class CacheStats:
    """What the cache holds and how often it was used since the process started (or the last reset)."""

    idle_bytes: int
    idle_mappings: int
    idle_limit_bytes: int
    hits: int
    misses: int


class HugePageBufferCache:
    """Hands out CPU tensors backed by cached huge-page mappings; see the module docstring."""

    def __init__(self, idle_limit_bytes: int) -> None:
        self._lock = threading.Lock()
        self._idle: list[_Mapping] = []         # least recently used first
        self._returned: list[_Mapping] = []     # freed, not yet filed under idle (see _give_back)
        # In-use buffers by id of the weak reference to their array (arrays are unhashable), which it keeps alive.
        self._in_use: dict[int, tuple[weakref.ref[np.ndarray], _Mapping]] = {}
        self._closed = False                    # set at interpreter exit: callbacks then do nothing
        self._idle_bytes = 0
        self._idle_limit = idle_limit_bytes
        self._hits = 0
        self._misses = 0
        os.register_at_fork(after_in_child=functools.partial(_after_fork, weakref.ref(self)))
        atexit.register(functools.partial(_close_at_exit, weakref.ref(self)))

    def _after_fork(self) -> None:
        """In a forked child: a fresh lock (the parent's may have been held by a thread that is
        gone) and the idle byte count recomputed (such a thread may have been inside ``_settle``)."""
        self._lock = threading.Lock()
        self._idle_bytes = sum(mapping.size for mapping in self._idle)

    def tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised, 2 MiB-aligned CPU tensor of ``shape`` and ``dtype`` in huge pages."""
        nbytes = math.prod(shape) * dtype.itemsize
        mapping = self._take(-(-max(nbytes, 1) // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES)
        numpy_dtype = _NUMPY_DTYPES.get(dtype)
        if numpy_dtype is not None:
            array = np.ndarray(shape, numpy_dtype, buffer=mapping.region, offset=mapping.offset)
            out = torch.from_numpy(array)
        else:  # bfloat16 and other dtypes NumPy lacks: bytes, viewed as the dtype
            array = np.ndarray((nbytes,), np.uint8, buffer=mapping.region, offset=mapping.offset)
            out = torch.from_numpy(array).view(dtype).view(shape)
        array_ref = weakref.ref(array, self._release)
        self._in_use[id(array_ref)] = (array_ref, mapping)
        return out

    def _take(self, size: int) -> _Mapping:
        with self._lock:
            self._settle()
            for index in range(len(self._idle) - 1, -1, -1):
                if self._idle[index].size == size:
                    mapping = self._idle.pop(index)
                    self._idle_bytes -= size
                    self._hits += 1
                    return mapping
            self._misses += 1
        region = mmap.mmap(-1, size + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                           prot=mmap.PROT_READ | mmap.PROT_WRITE)
        address = np.frombuffer(region, dtype=np.uint8, count=1).ctypes.data
        offset = -address % HUGE_PAGE_BYTES
        region.madvise(mmap.MADV_HUGEPAGE, offset, size)
        return _Mapping(region, offset, size)

    def _release(self, array_ref: weakref.ref[np.ndarray]) -> None:
        """Callback of the weak reference to a buffer's array: the array, so the tensor's storage, died."""
        entry = self._in_use.pop(id(array_ref), None)
        if entry is not None and not self._closed:
            self._give_back(entry[1])

    def _give_back(self, mapping: _Mapping) -> None:
        """Return a freed buffer. It may run on any thread, at any point (the garbage
        collector), even inside this class's own locked code, so it only queues the mapping
        and files it if the lock is free; otherwise the next locked call files it."""
        self._returned.append(mapping)
        if self._lock.acquire(blocking=False):
            try:
                self._settle()
            finally:
                self._lock.release()

    def _settle(self) -> None:
        """File returned mappings as idle (most recently used last) and trim to the limit. Lock held."""
        while self._returned:
            mapping = self._returned.pop(0)
            if mapping.size > self._idle_limit:
                _unmap(mapping)
                continue
            self._idle.append(mapping)
            self._idle_bytes += mapping.size
        self._trim(self._idle_limit)

    def _trim(self, limit: int) -> None:
        """Unmap the least recently used idle mappings until at most ``limit`` bytes stay idle."""
        while self._idle and self._idle_bytes > limit:
            mapping = self._idle.pop(0)
            self._idle_bytes -= mapping.size
            _unmap(mapping)

    def set_idle_limit(self, idle_limit_bytes: int) -> None:
        if idle_limit_bytes < 0:
            raise ValueError(f"idle_limit_bytes={idle_limit_bytes}: expected >= 0 (0 turns the cache off)")
        with self._lock:
            self._idle_limit = idle_limit_bytes
            self._settle()

    def empty(self) -> None:
        with self._lock:
            self._settle()
            self._trim(0)

    def stats(self) -> CacheStats:
        with self._lock:
            self._settle()
            return CacheStats(self._idle_bytes, len(self._idle), self._idle_limit, self._hits, self._misses)

    def reset_counters(self) -> None:
        with self._lock:
            self._hits = self._misses = 0


def _close_at_exit(cache: weakref.ref[HugePageBufferCache]) -> None:
    """At interpreter exit buffers are not returned any more (module state may be half torn down)."""
    alive = cache()
    if alive is not None:
        alive._closed = True


def _after_fork(cache: weakref.ref[HugePageBufferCache]) -> None:
    alive = cache()
    if alive is not None:
        alive._after_fork()


def _unmap(mapping: _Mapping) -> None:
    """Unmap now if nothing exports the buffer any more; otherwise the mapping is unmapped when
    the last reference to it goes (the case for a buffer dropped from its own release callback,
    whose dying array still holds its export at that point)."""
    try:
        mapping.region.close()
    except BufferError:
        pass


CACHE = HugePageBufferCache(_idle_limit_from_env())


def set_idle_limit(idle_limit_bytes: int) -> None:
    """Keep at most ``idle_limit_bytes`` of freed output buffers for reuse (0: keep none)."""
    CACHE.set_idle_limit(idle_limit_bytes)


def empty_cache() -> None:
    """Unmap every idle buffer (buffers still in use are not affected)."""
    CACHE.empty()


def stats() -> CacheStats:
    """Idle bytes and mappings, the limit, and hits and misses since the last :func:`reset_counters`."""
    return CACHE.stats()


def reset_counters() -> None:
    """Zero the hit and miss counters."""
    CACHE.reset_counters()
