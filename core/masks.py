"""Which pieces are active on which rows: attributions, then batch top-k per
matrix, over blocks of rows as in training."""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import Tensor

from apdkit.core.attributions import attributions
from apdkit.core.model import DecomposedModel
from apdkit.core.pieces import Pieces, batch_topk_mask


# inputs -> {matrix: (rows, C) bool}: the pieces each row uses, as the run decides it (stages/selection.py)
Activity = Callable[[Tensor], dict[str, Tensor]]


def active_masks(model: DecomposedModel, x: Tensor, pieces: Pieces, topk: Mapping[str, float], block: int,
                 active: Activity | None) -> dict[str, Tensor]:
    """The pieces active on each row of ``x``: ``active``'s answer where the
    run gives one (learned gates), else the batch top-k at ``topk`` of
    gradient attributions over blocks of ``block`` inputs."""
    return active(x) if active is not None else score_inputs(model, x, pieces, topk, block)[1]


def topk_masks(scores: Mapping[str, Tensor], topk: Mapping[str, float]) -> dict[str, Tensor]:
    """Batch top-k per matrix; ``topk[name]`` is the mean active pieces per row."""
    return {n: batch_topk_mask(s, topk[n]) for n, s in scores.items()}


@torch.no_grad()
def score_inputs(model: DecomposedModel, x: Tensor, pieces: Pieces, topk: Mapping[str, float], block: int,
                 max_exact_outputs: int = 512, probes: int = 64,
                 gen: torch.Generator | None = None, method: str = "gradient",
                 steps: int = 8) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Attribution scores (``method``, ``steps``: core/attributions.py) and
    top-k masks {matrix: (rows, C)} of ``x``, batch top-k taken over blocks
    of ``block`` inputs."""
    scores: dict[str, list[Tensor]] = {n: [] for n in pieces}
    masks: dict[str, list[Tensor]] = {n: [] for n in pieces}
    for start in range(0, x.shape[0], block):
        s, _ = attributions(model, x[start:start + block], pieces, max_exact_outputs, probes, gen,
                            method=method, steps=steps)
        m = topk_masks(s, topk)
        for n in pieces:
            scores[n].append(s[n])
            masks[n].append(m[n])
    return {n: torch.cat(v) for n, v in scores.items()}, {n: torch.cat(v) for n, v in masks.items()}


@torch.no_grad()
def active_output_error(model: DecomposedModel, x: Tensor, pieces: Pieces, masks: Mapping[str, Tensor]) -> Tensor:
    """Per input row: output MSE against the target with only the masked-on pieces."""
    target = model.forward(x).output
    out = model.run(x, pieces, {n: m.float() for n, m in masks.items()}).output  # not x.dtype: tokens are integers
    return ((out - target) ** 2).mean(dim=1)
