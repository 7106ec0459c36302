"""Data-parallel stage 1 over torch.distributed.

Every replica draws the same global batch from the shared seed and keeps its
own rows, so N processes train on exactly the batches one process would.
Batch top-k is taken over the whole global batch (the replicas' attribution
scores are gathered first: a per-replica top-k would pick other pieces), and
gradients are averaged. Every loss term is a mean over rows, so the averaged
gradient is one process's gradient up to summation order.

``Replicas()`` is the one-process case: every method is then a no-op, so the
training loop has a single form.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
import torch.distributed as dist
from torch import Tensor

from apdkit.core.masks import topk_masks
from apdkit.stages.errors import StageError


@dataclass(frozen=True)
class Replicas:
    rank: int = 0
    world_size: int = 1

    @property
    def writes(self) -> bool:
        """Only rank 0 writes the store, checkpoints and logs."""
        return self.rank == 0

    def rows(self, batch_size: int) -> slice:
        """This replica's rows of a global batch."""
        share = batch_size // self.world_size
        return slice(self.rank * share, (self.rank + 1) * share)

    def masks(self, scores: Mapping[str, Tensor], topk: Mapping[str, float]) -> dict[str, Tensor]:
        """Batch top-k over the global batch, this replica's rows of it."""
        if self.world_size == 1:
            return topk_masks(scores, topk)
        names = list(scores)
        local = torch.cat([scores[n] for n in names], dim=1).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local)
        full = torch.cat(parts).split([scores[n].shape[1] for n in names], dim=1)
        rows = slice(self.rank * local.shape[0], (self.rank + 1) * local.shape[0])
        return {n: m[rows] for n, m in topk_masks(dict(zip(names, full)), topk).items()}

    def average_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        if self.world_size == 1:
            return
        params = [p for p in params if p.grad is not None]
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat)
        flat /= self.world_size
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad.copy_(g.view_as(p.grad))

    def average(self, values: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Mean over replicas of scalar tensors (the logged losses)."""
        if self.world_size == 1:
            return dict(values)
        names = list(values)
        flat = torch.stack([values[n].detach().float() for n in names])
        dist.all_reduce(flat)
        return dict(zip(names, flat / self.world_size))

    def share(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` on every replica (the others pass nothing)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def replicas_from_env(device_name: str) -> tuple[Replicas, str]:
    """Join the process group torchrun set up (RANK, WORLD_SIZE, LOCAL_RANK in
    the environment), or one process when there is none. Returns the
    replicas and the device name this replica computes on."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Replicas(), device_name
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if cuda:
        # every rank checks, so rank 0 (the one that prints) says why rather than waiting for the others
        local_world, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", world)), torch.cuda.device_count()
        if local_world > gpus:
            raise StageError(f"{local_world} processes on this machine but torch sees {gpus} GPU(s): run one "
                             "process per GPU, or add --device cpu")
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        # rank 0 may train the target first: the others wait at the first broadcast
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2))
    return Replicas(rank, world), f"cuda:{local}" if cuda else "cpu"
