"""Every random stream of a run, derived from its one seed, in one place."""

from __future__ import annotations

_OFFSETS = {
    "init": 1,  # data-driven / random init of the pieces
    "gates": 5,  # learned gates: their initial parameters
    "data": 2,  # stage-1 training batches (and attribution probes)
    "eval": 3,  # stage-1 evaluation set, stored for stage 2
    "group_samples": 11,  # new inputs when stage 2 asks for more than stored
    "verify": 17,  # fresh inputs for stage 3
    "truth": 23,  # ground-truth scoring inputs (stage 2: extra 0; verify: 1 + its seed)
}


def seed_for(seed: int, stream: str, extra: int = 0) -> int:
    return seed + _OFFSETS[stream] + extra


def target_attempt_seed(seed: int, attempt: int) -> int:
    """A built-in target that trains unhealthy is retried from a derived seed."""
    return seed + 1000 * attempt


def generator(seed: int, stream: str, extra: int = 0):
    import torch

    return torch.Generator().manual_seed(seed_for(seed, stream, extra))
