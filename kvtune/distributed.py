"""Data parallelism over processes started by ``torchrun``: each rank takes a share of the batches
(or items), keeps float64 sums, and one reduction at the end combines them.

``torchrun --nproc_per_node N -m kvtune profile ...`` (``--nnodes`` for several machines) starts N
copies of the same command on the same inputs. Work is split by batch index — rank r takes batches
r, r + N, r + 2N, ... — so every batch is computed exactly as a single process computes it, and the
result differs from one process's only in the order of summation. Rank 0 alone writes results and
shows progress. Without torchrun (``WORLD_SIZE`` unset or 1) every call here is the identity.

The process group (NCCL on GPUs, gloo on CPUs) is PyTorch's own; kvtune keeps no state of its own.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

from kvtune.errors import KvtuneError


@dataclass(frozen=True)
class Ranks:
    """This process's place among the data-parallel processes of one command."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes results and shows progress."""
        return self.rank == 0

    def share(self, items: Sequence) -> list:
        """This rank's items (every ``size``-th, from its rank): deterministic, and balanced to one item."""
        return list(items)[self.rank :: self.size]

    def state_name(self, stem: str) -> str:
        """A per-rank resume file (``progress.json`` alone keeps its name in one process)."""
        return f"{stem}.json" if self.size == 1 else f"{stem}-rank{self.rank}-of-{self.size}.json"

    def sum(self, tree: Any) -> Any:
        """Element-wise sum over ranks of a nested dict/list of numbers, in float64 (ints stay ints)."""
        return self._reduce(tree, dist.ReduceOp.SUM)

    def max(self, tree: Any) -> Any:
        return self._reduce(tree, dist.ReduceOp.MAX)

    def _reduce(self, tree: Any, op) -> Any:
        if self.size == 1:
            return tree
        leaves, spec = pytree.tree_flatten(tree)
        if not leaves:
            return tree
        values = torch.tensor([float(x) for x in leaves], dtype=torch.float64, device=_collective_device())
        dist.all_reduce(values, op=op)
        reduced = [int(v) if isinstance(x, int) else float(v) for x, v in zip(leaves, values.tolist())]
        return pytree.tree_unflatten(reduced, spec)

    def gather(self, obj: Any) -> list:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def merge(self, parts: dict) -> dict:
        """The union of every rank's ``parts`` (disjoint keys: a batch start, a validation target)."""
        merged = {}
        for shared in self.gather(parts):
            merged.update(shared)
        return merged

    def agree(self, error: KvtuneError | None) -> None:
        """Raise on every rank when any rank found a problem (its checks before work), naming the rank,
        so that no rank starts work the others refused and none waits on a collective forever."""
        if self.size == 1:
            if error is not None:
                raise error
            return
        messages = self.gather(None if error is None else (type(error).__name__, str(error)))
        for rank, found in enumerate(messages):
            if found is not None:
                raise KvtuneError(f"rank {rank} of {self.size}: {found[1]}")

    def checked(self, check, *args, **kwargs):
        """``check(*args, **kwargs)`` on every rank; all raise together if one fails."""
        try:
            result = check(*args, **kwargs)
        except KvtuneError as e:
            self.agree(e)
            raise
        self.agree(None)
        return result


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def ranks() -> Ranks:
    """This process's :class:`Ranks`, joining the process group torchrun describes (``WORLD_SIZE``,
    ``RANK``, ``MASTER_ADDR``...) on first use: NCCL where CUDA is available, else gloo."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 and not dist.is_initialized():
        return Ranks()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":  # one GPU per process on each node; --device cuda then means this one
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return Ranks(dist.get_rank(), dist.get_world_size())
