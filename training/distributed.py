"""Data-parallel training across processes started by a launcher (torchrun).

`torchrun --nproc_per_node N -m loraplex.cli train cfg.yaml` starts N copies of
the command; each reads RANK, WORLD_SIZE and LOCAL_RANK from its environment.
Every rank computes the same global batches and takes a strided shard of each,
the LoRA gradients are summed across ranks once per optimizer step, and rank 0
alone writes files. Without a launcher (WORLD_SIZE unset or 1) every operation
here is a no-op, so the single-process path runs no distributed code at all.

Why an explicit all-reduce and not the DDP wrapper: the loss is divided by the
global answer-token count, so a plain sum of the ranks' gradients is the
single-process gradient; one flat all-reduce per optimizer step is what DDP
with `no_sync` over the accumulation steps would do, without DDP's rules (every
rank must run a forward, `model.module` everywhere, static graphs for
gradient checkpointing), and a rank whose shard is empty just contributes zeros.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

# Rank 0 hashes the base weights and writes outputs while the others wait at the
# final barrier; generous, because a stuck collective is killed by the launcher anyway.
TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the data-parallel processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that prints reports and writes files."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's part of `items`: every world_size-th item from position rank."""
        return list(items[self.rank :: self.world_size])

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum of `values` over all ranks (float64, so counts stay exact)."""
        if not self.active:
            return list(values)
        buffer = torch.tensor(values, dtype=torch.float64, device=_comm_device())
        dist.all_reduce(buffer)
        return buffer.tolist()

    def sum_gradients(self, params: Sequence[torch.Tensor]) -> None:
        """Replace each parameter's gradient by its sum over all ranks (missing = zero)."""
        if not self.active:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        for param, chunk in zip(params, flat.split([g.numel() for g in grads]), strict=True):
            param.grad = chunk.view_as(param).clone()

    def broadcast_parameters(self, params: Sequence[torch.Tensor]) -> None:
        """Copy rank 0's values into every rank, so all ranks start from the same weights."""
        if not self.active:
            return
        with torch.no_grad():
            for param in params:
                dist.broadcast(param.data, src=0)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


SINGLE = Ranks()


def _comm_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo only CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def launched_ranks() -> Ranks:
    """The ranks a launcher (torchrun) set in the environment; SINGLE without one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    return Ranks(
        rank=int(os.environ["RANK"]),
        world_size=world,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def start(ranks: Ranks, device: torch.device) -> None:
    """Join the process group: nccl when training on CUDA, gloo on CPU."""
    if not ranks.active or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=TIMEOUT)


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
