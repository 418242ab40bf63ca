"""Data-parallel training with ``torch.distributed``: gloo on CPU, NCCL on CUDA.

Every rank draws the *same* full batch from the same seeded generator and trains on its rows
``rank::world_size`` (:func:`shard`); the trainer normalises the loss by the global token count, so
the averaged gradients equal those of one process on the whole batch and a run's result does not
depend on the number of processes (up to float summation order). Outside a process group every
helper here is the identity, so the trainer has one code path.

:func:`launch` starts ``world_size`` local processes on the loopback interface (127.0.0.1 only).
"""

from __future__ import annotations

import os
import socket
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


def wrap_model(model: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(model)`` inside a process group, else ``model`` itself.

    Unused parameters are looked for on every step: a PSM's aggregator takes no part in a step
    whose sequences fit in one chunk (a curriculum's first lengths), and DDP without the search
    fails that step's reduction ("Expected to have finished reduction in the prior iteration").
    """
    if not is_active():
        return model
    device_ids = [device.index if device.index is not None else 0] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)


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


def _worker(rank_: int, fn: Callable[..., Any], world_size_: int, port: int, backend: str, args: tuple) -> None:
    setup(rank_, world_size_, port, backend)
    try:
        fn(rank_, *args)
    finally:
        teardown()


def launch(fn: Callable[..., Any], world_size_: int, *args: Any, backend: str = "gloo") -> None:
    """Run ``fn(rank, *args)`` in ``world_size_`` spawned processes joined in one process group.

    ``fn`` must be importable (a module-level function); results travel through files or queues.
    """
    port = free_port()
    torch.multiprocessing.spawn(_worker, args=(fn, world_size_, port, backend, args), nprocs=world_size_, join=True)
