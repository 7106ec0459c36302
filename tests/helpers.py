"""Shared test helpers."""

from pathlib import Path

import torch

from apdkit.targets.registry import TARGETS

LOCK_FILES = {".apd.lock", ".apd.lock.owner"}  # the writer lock: process bookkeeping, not store content


def store_tree(path: Path) -> list:
    """Every file of a store with its size and modification time, to check
    that a refused command changed nothing."""
    return sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in Path(path).rglob("*") if p.is_file() and p.name not in LOCK_FILES)


def made_target(name: str, seed: int) -> torch.nn.Module:
    """A built-in target's module with untrained weights drawn from ``seed``,
    leaving the global random state as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return TARGETS[name].make()


def exact_pieces(weights: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Rank-1 pieces that sum exactly to each matrix: its SVD."""
    out = {}
    for name, w in weights.items():
        A, S, Bt = torch.linalg.svd(w, full_matrices=False)
        out[name] = ((A * S).T.contiguous(), Bt.contiguous())
    return out
