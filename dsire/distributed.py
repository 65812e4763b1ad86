"""Featurisation across processes (Lightning DDP): each LoRA read by exactly one rank, results shared.

Lightning's `DistributedSampler` pads the last shard with repeated items so that every rank gets
as many batches as the others; that is right for gradient steps and wrong here, where every LoRA
must be counted once. `ShardSampler` splits without padding (DSiRe has no collective step per
batch, so ranks may get unequal counts), and `gather` hands every rank everybody's results.
With one process both are no-ops, so the same code runs with and without DDP.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

import torch.distributed as dist
from torch.utils.data import Sampler

T = TypeVar("T")


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ShardSampler(Sampler[int]):
    """Indices rank, rank + world, rank + 2·world, …: every item on exactly one rank, no padding.

    The rank is read when iteration starts, so a loader built before DDP launched still shards.
    """

    def __init__(self, length: int):
        self.length = length

    def __iter__(self) -> Iterator[int]:
        rank, world = rank_and_world()
        return iter(range(rank, self.length, world))

    def __len__(self) -> int:
        rank, world = rank_and_world()
        return len(range(rank, self.length, world))


def gather(value: T) -> list[T]:
    """Every rank's `value`, in rank order (our own processes' results, never untrusted files)."""
    _, world = rank_and_world()
    if world == 1:
        return [value]
    values: list[T | None] = [None] * world
    dist.all_gather_object(values, value)
    return values  # type: ignore[return-value]


def one_rank_at_a_time() -> Iterator[None]:
    """Yield once per rank, in turn, so read-modify-write of shared files does not race."""
    rank, world = rank_and_world()
    for turn in range(world):
        if turn == rank:
            yield
        if world > 1:
            dist.barrier()
