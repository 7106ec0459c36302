"""tiny_lm scores, as the successor method reports language models: mean
active mechanisms per token (L0) and next-byte cross-entropy of the target,
of the model run on only each token's active mechanisms, on all pieces, and
with every decomposed matrix ablated; the share of the ablation's increase
that the active mechanisms recover. A mechanism is active on a token when
any of its pieces is active there as stage 1 decides it (as stage 2 counts
activity): its gate above the threshold in the learned mode, else in the
top-k.
Pure: a model, pieces, labels and top-k settings (or the run's activity) in,
floats out."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from apdkit.core.masks import Activity, active_masks
from apdkit.core.model import DecomposedModel
from apdkit.core.pieces import Pieces, membership_matrices, singleton_labels
from apdkit.targets.tiny_lm.model import corpus_split, next_token_loss, windows

EVAL_WINDOWS = 64


@torch.no_grad()
def mechanism_scores(model: DecomposedModel, pieces: Pieces, labels: Mapping[str, np.ndarray],
                     topk: Mapping[str, float], gen: torch.Generator,
                     active: Activity | None = None) -> dict[str, float]:
    lm = model.module
    tokens = windows(corpus_split(held_out=True), EVAL_WINDOWS, lm.context, gen)
    n_groups = int(max((lab.max() for lab in labels.values()), default=-1)) + 1
    member = membership_matrices(labels, n_groups)
    piece_masks = active_masks(model, tokens, pieces, topk, 16, active)
    on = sum(piece_masks[n].float() @ member[n] for n in pieces) > 0  # (rows, G): mechanisms active per token
    keep = {n: (on.float() @ member[n].T) > 0 for n in pieces}

    def ce(masks) -> float:
        out = model.run(tokens, pieces, masks).output if masks is not None else model.forward(tokens).output
        return float(next_token_loss(out.view(*tokens.shape, -1), tokens))

    rows = tokens.numel()
    target = ce(None)
    active_ce = ce({n: m.float() for n, m in keep.items()})
    ablated = ce({n: torch.zeros(rows, U.shape[0]) for n, (U, V) in pieces.items()})
    all_pieces = ce({n: None for n in pieces})
    return {
        "tiny_lm/mechanisms": float(n_groups),
        "tiny_lm/alive_mechanisms": float(int(on.any(0).sum())),
        "tiny_lm/l0_per_token": float(on.float().sum(1).mean()),
        "tiny_lm/ce_target": target,
        "tiny_lm/ce_all_pieces": all_pieces,
        "tiny_lm/ce_active": active_ce,
        "tiny_lm/ce_ablated": ablated,
        "tiny_lm/ce_recovered": (ablated - active_ce) / max(ablated - target, 1e-12),
    }


def scores(model: DecomposedModel, pieces: Pieces, topk: Mapping[str, float],
           active: Activity | None = None) -> dict[str, float]:
    """Stage 1: each piece its own mechanism."""
    out = mechanism_scores(model, pieces, singleton_labels(pieces), topk, torch.Generator().manual_seed(0), active)
    return {k.replace("tiny_lm/", "tiny_lm/pieces/"): v for k, v in out.items()}
