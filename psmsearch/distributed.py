"""Data-parallel training with ``torch.distributed``: gloo on CPU, NCCL on CUDA.

Every rank draws the *same* full batch from the same seeded generator and trains on its rows
``rank::world_size`` (:func:`shard`); the trainer normalises the loss by the global token count, so
the averaged gradients equal those of one process on the whole batch and a run's result does not
depend on the number of processes (up to float summation order). Outside a process group every
helper here is the identity, so the trainer has one code path.

:func:`launch` starts ``world_size`` local processes on the loopback interface (127.0.0.1 only). The
parent stays in charge: it relays the workers' messages (:func:`send`, e.g. evaluation lines printed
by rank 0) to a callback, re-raises a worker's user-facing error as the same exception, and on any
exception of its own (Ctrl-C, SIGTERM, a callback that prunes) stops every worker before re-raising.
"""

from __future__ import annotations

import atexit
import faulthandler
import logging
import os
import pickle
import queue as queue_module
import signal
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as torch_dist
from torch import nn

from psmsearch.tasks import Batch


def is_active() -> bool:
    """True inside an initialised process group with more than one rank."""
    return torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1


def rank() -> int:
    return torch_dist.get_rank() if is_active() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if is_active() else 1


def default_backend(device: torch.device | str) -> str:
    """``nccl`` for CUDA devices, ``gloo`` otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def shard(batch: Batch) -> Batch:
    """This rank's rows of the global batch (all of it outside a process group)."""
    if not is_active():
        return batch
    return batch.rows(slice(rank(), None, world_size()))


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over ranks (a copy; the input is untouched)."""
    if not is_active():
        return tensor
    out = tensor.detach().clone()
    torch_dist.all_reduce(out, op=torch_dist.ReduceOp.SUM)
    return out


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` outside a process group); a collective."""
    if not is_active():
        return [obj]
    out: list[Any] = [None] * world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def wrap_model(model: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(model)`` inside a process group, else ``model`` itself.

    DDP is told that every parameter takes part in every step (``find_unused_parameters=False``).
    A PSM's aggregator takes no part in a step whose sequences fit in one chunk (a curriculum's
    first lengths), and plugin components may branch; the trainer makes that true anyway by adding
    :func:`every_parameter_term` to the loss of models that do not declare
    ``uses_every_parameter = True``. DDP's own search for unused parameters would cost a graph
    traversal per step and printed a warning on every rank whenever it found none.
    """
    if not is_active():
        return model
    device_ids = [device.index if device.index is not None else 0] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False)


def every_parameter_term(model: nn.Module) -> torch.Tensor | None:
    """``0 · Σ p`` over ``model``'s trainable parameters, or None where there is no need for it.

    Zero in value and in every gradient, it gives each parameter a gradient in every step, so DDP's
    reduction completes when a step leaves some parameters out of the loss (see :func:`wrap_model`).
    None outside a process group and for models that declare ``uses_every_parameter = True``.
    """
    if not is_active() or getattr(model, "uses_every_parameter", False):
        return None
    sums = [p.sum() for p in model.parameters() if p.requires_grad]
    return torch.stack(sums).sum() * 0.0 if sums else None


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def setup(rank_: int, world_size_: int, port: int, backend: str = "gloo") -> None:
    """Join the local process group at ``127.0.0.1:port``."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    if backend == "nccl":
        torch.cuda.set_device(rank_ % torch.cuda.device_count())
    torch_dist.init_process_group(backend, rank=rank_, world_size=world_size_)


def teardown() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


STOP_GRACE_S = 10.0
"""Seconds a worker gets to stop after SIGTERM before it is killed."""

_messages: Any = None  # the parent's queue inside a launched worker (see send)


def send(message: Any) -> None:
    """Pass a picklable ``message`` to the ``on_message`` callback of :func:`launch` in the parent
    process (dropped outside a launched worker)."""
    if _messages is not None:
        _messages.put(message)


def _request_stop(_signum: int, _frame: Any) -> None:
    """A worker's SIGTERM/SIGINT handler: ask the trainer to stop. Every rank learns of it in the
    next step's all-reduce and stops at that same step; raising here could leave a rank blocked
    in a collective its peers never join."""
    from psmsearch import interrupts

    interrupts.STOP.set()


def _worker(rank_: int, fn: Callable[..., Any], world_size_: int, port: int, backend: str, args: tuple,
            messages: Any, error_dir: str, forward: tuple[type[BaseException], ...]) -> None:
    global _messages
    _messages = messages
    faulthandler.enable(all_threads=True)  # a fatal signal prints every thread's Python stack to stderr
    signal.signal(signal.SIGTERM, _request_stop)
    signal.signal(signal.SIGINT, _request_stop)
    setup(rank_, world_size_, port, backend)
    try:
        fn(rank_, *args)
        # Every rank arrives before any tears down: rank 0 hosts the store the others still talk to.
        # Only on success: a failed peer never arrives.
        torch_dist.barrier()
    except forward as err:
        _save_error(err, Path(error_dir) / f"error{rank_}.pkl")
        raise
    finally:
        teardown()
    _exit_after_success()


def _exit_after_success() -> None:
    """End a worker whose work is done and whose process group is destroyed: run the ``atexit``
    hooks, flush standard output and error, and leave with status 0, skipping the interpreter's
    teardown (modules cleared, objects freed) and C++'s static destructors.

    A worker that had returned and torn down its group still aborted at exit, twice in CI over many
    runs ("terminate called without an active exception": a C++ thread object destroyed while still
    joinable), which failed a finished trial; its results were already written. psmsearch's own
    results travel through files closed by now and through a pipe written synchronously
    (:func:`send`). Plugin code keeps the clean-ups Python documents for exit (``atexit``,
    ``weakref.finalize``, ``logging.shutdown``); what is lost is only what relies on objects being
    freed at teardown, such as an unclosed file object held by a module.
    """
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: nothing more can reach it
            pass
    os._exit(0)


def _save_error(err: BaseException, path: Path) -> None:
    """Pickle ``err``'s type, args and attributes (not the exception itself: types with keyword-only
    constructor arguments, like ConfigError, do not unpickle), plus the worker's traceback as text in
    ``worker_traceback`` (the parent's copy has no ``__traceback__`` or ``__cause__`` of its own)."""
    cls = type(err)
    attrs = {**vars(err), "worker_traceback": "".join(traceback.format_exception(err)).rstrip()}
    payload = {"module": cls.__module__, "qualname": cls.__qualname__, "args": err.args, "attrs": attrs}
    try:
        path.write_bytes(pickle.dumps(payload))
    except Exception:  # noqa: BLE001 - unpicklable attributes: the parent falls back to the traceback
        pass


def _load_error(path: Path) -> BaseException | None:
    """The exception :func:`_save_error` wrote, rebuilt as the same type with the same message."""
    import importlib

    try:
        payload = pickle.loads(path.read_bytes())
        cls: Any = importlib.import_module(payload["module"])
        for part in payload["qualname"].split("."):
            cls = getattr(cls, part)
        err = cls.__new__(cls)
        err.args = tuple(payload["args"])
        vars(err).update(payload["attrs"])
        return err
    except Exception:  # noqa: BLE001 - missing or unreadable: the parent reports the worker's traceback
        return None


def launch(fn: Callable[..., Any], world_size_: int, *args: Any, backend: str = "gloo",
           on_message: Callable[[Any], None] | None = None,
           forward: tuple[type[BaseException], ...] = ()) -> None:
    """Run ``fn(rank, *args)`` in ``world_size_`` spawned processes joined in one process group.

    ``fn`` must be importable (a module-level function); results travel through files, or through
    :func:`send` to ``on_message``, which runs in this process. A worker exception that is an instance
    of a type in ``forward`` is raised here as the same type with the same message and attributes
    (the first failing rank's); any other failure raises torch's ``ProcessRaisedException`` with the
    worker's traceback. An exception here (``KeyboardInterrupt`` from Ctrl-C or SIGTERM, or one
    raised by ``on_message``) terminates every worker, kills those still running after
    :data:`STOP_GRACE_S` seconds, and is re-raised.
    """
    import torch.multiprocessing as mp

    port = free_port()
    context = mp.get_context("spawn")
    messages = context.SimpleQueue()
    with tempfile.TemporaryDirectory(prefix="psmsearch-launch-") as error_dir:
        processes = mp.start_processes(
            _worker, args=(fn, world_size_, port, backend, args, messages, error_dir, forward),
            nprocs=world_size_, join=False, start_method="spawn",
        )
        spawn_log = logging.getLogger("torch.multiprocessing.spawn")
        level = spawn_log.level
        spawn_log.setLevel(logging.ERROR)  # its "Terminating process N" warnings follow every worker error
        try:
            try:
                while not processes.join(timeout=0.2):
                    _relay(messages, on_message)
            finally:
                spawn_log.setLevel(level)
            _relay(messages, on_message)  # what the workers sent after the last poll
        except mp.ProcessRaisedException as err:
            failed = [err.error_index, *range(world_size_)]
            errors = (_load_error(Path(error_dir) / f"error{r}.pkl") for r in failed)
            forwarded = next((e for e in errors if e is not None), None)
            if forwarded is not None:
                raise forwarded from None
            raise
        except BaseException:
            _stop_all(processes.processes)
            raise


def _relay(messages: Any, on_message: Callable[[Any], None] | None) -> None:
    """Hand every queued worker message to ``on_message`` (or drop it)."""
    while True:
        try:
            if messages.empty():
                return
            message = messages.get()
        except (OSError, EOFError, queue_module.Empty):
            return
        if on_message is not None:
            on_message(message)


def _stop_all(processes: list[Any]) -> None:
    """SIGTERM every live worker (each stops at its next training step), SIGKILL any left after the grace."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()
