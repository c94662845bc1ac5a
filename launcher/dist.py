"""Rank, world and device of this process, and the few collectives the loop needs."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as torch_dist


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return torch_dist.is_available() and torch_dist.is_initialized()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
        return t

    def all_gather_text(self, text: str) -> list:
        """Every rank's `text`, by rank (an object collective: gloo on CPU, also beside NCCL)."""
        if not self.distributed:
            return [text]
        texts = [None] * self.world_size
        torch_dist.all_gather_object(texts, text)
        return texts

    def barrier(self) -> None:
        if self.distributed:
            torch_dist.barrier()

    @contextlib.contextmanager
    def local_main_first(self):
        """Local rank 0 runs the block first (filling node-local caches); the others then read them."""
        if self.local_rank != 0:
            self.barrier()
        try:
            yield
        finally:
            if self.local_rank == 0:
                self.barrier()


def backend_for(device: torch.device) -> str:
    """The process group's backends: the loop all-reduces CPU tensors (token counts, stop flags,
    checkpoint agreement) on every device, which NCCL alone refuses, so CUDA runs get gloo for CPU
    tensors and NCCL for CUDA tensors in one group."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def init(timeout_s: int = 1800) -> Dist:
    """Join the process group described by torchrun's environment (a single process without it).
    `timeout_s`: how long a collective waits for a peer before failing (launch.collective_timeout_s)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not torch_dist.is_initialized():
        backend = backend_for(device)
        # The elastic agent's store outlives a restart, and gloo would read the dead attempt's peer
        # addresses from it (connect: refused): each attempt gets keys of its own.
        store, _, _ = next(torch_dist.rendezvous("env://", rank=rank, world_size=world))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = torch_dist.PrefixStore(f"sft-launcher/attempt-{attempt}", store)
        torch_dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    return Dist(rank=rank, local_rank=local_rank, world_size=world, device=device)


def shutdown(synchronise: bool = True) -> None:
    """Leave the process group. After a success, wait for every rank first: tearing gloo down
    while a peer is still in a collective aborts that peer (std::terminate). After a failure,
    don't: the peers may be gone and the barrier would hang until the collective timeout."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        if synchronise:
            torch_dist.barrier()
        torch_dist.destroy_process_group()


def exit_process(code: int) -> None:
    """End a worker process without interpreter teardown. After the group is destroyed, the
    comm libraries' (gloo, DeepSpeed) C++ threads can still be joinable when their destructors
    run at exit, which calls std::terminate and turns a finished run into SIGABRT."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
