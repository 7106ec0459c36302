"""Induction ground truth: two known functions, each implemented by one head.

- ``prev_token``: layer 0's attention from each position to the one before it
  (mean attention probability on t-1), implemented by layer 0's Q, K, V, O;
- ``induction``: the in-context copy (accuracy of predicting M at the second
  S), implemented by layer 1's head on top of layer 0's.

For a grouping into mechanisms, per function: which mechanisms it *needs*
(ablating one alone takes the function below half its target value), whether
they lie in the implementing head's matrices (share of their weight norm,
induction counting only the mechanisms the previous-token function does not
also need), and whether keeping only them, every other piece ablated,
preserves it (>= 90% of the target's value). Pure: a model, pieces and
labels in, floats out.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import Tensor

from apdkit.core.masks import Activity, active_masks
from apdkit.core.model import DecomposedModel
from apdkit.core.pieces import Pieces, pieces_sum
from apdkit.targets.induction.model import batch_for

FUNCTIONS = {"prev_token": "layers.0.", "induction": "layers.1."}  # function -> its head's matrices
NEEDED_BELOW = 0.5  # ablating a needed mechanism takes the function below this share of the target's value
KEEP_MIN = 0.9  # keeping only the needed mechanisms must preserve this share
EVAL_SEQUENCES = 512


@torch.no_grad()
def function_values(model: DecomposedModel, tokens: Tensor, q: Tensor, answer: Tensor,
                    pieces: Pieces | None = None, masks: Mapping[str, Tensor] | None = None) -> dict[str, float]:
    """Both functions on a batch: the target's (no pieces) or the pieces' under
    ``masks`` (per matrix, (C,) for every row or (rows, C))."""
    captured = {}
    handle = model.module.layers[0].pattern.register_forward_hook(
        lambda mod, args, out: captured.__setitem__("pattern", out))
    try:
        if pieces is None:
            out = model.forward(tokens).output
        else:
            rows = tokens.numel()
            full = {n: (m.expand(rows, -1) if m.dim() == 1 else m).float() for n, m in (masks or {}).items()}
            out = model.run(tokens, pieces, {n: full.get(n) for n in pieces}).output
    finally:
        handle.remove()
    logits = out.view(tokens.shape[0], tokens.shape[1], -1)[torch.arange(len(q)), q]
    pattern = captured["pattern"]
    T = tokens.shape[1]
    prev = pattern[:, torch.arange(1, T), torch.arange(0, T - 1)].mean()
    return {"prev_token": float(prev), "induction": float((logits.argmax(-1) == answer).float().mean())}


def _eval_batch(model: DecomposedModel, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    return batch_for(model.module, EVAL_SEQUENCES, gen)


def scores(model: DecomposedModel, pieces: Pieces, topk: Mapping[str, float],
           active: Activity | None = None) -> dict[str, float]:
    """Stage 1: each function with the target, all pieces, only each row's
    active pieces (``active``'s, else the top-k at ``topk``), and every piece
    ablated."""
    batch = _eval_batch(model, torch.Generator().manual_seed(0))
    tokens = batch[0]
    used = active_masks(model, tokens, pieces, topk, 64, active)
    runs = {
        "target": function_values(model, *batch),
        "all_pieces": function_values(model, *batch, pieces=pieces),
        "active_pieces": function_values(model, *batch, pieces=pieces, masks=used),
        "ablated": function_values(model, *batch, pieces=pieces,
                                   masks={n: torch.zeros(U.shape[0]) for n, (U, V) in pieces.items()}),
    }
    return {f"induction/{f}/{run}": v[f] for run, v in runs.items() for f in FUNCTIONS}


def keep_masks(labels: Mapping[str, np.ndarray], groups: set[int], dead: bool) -> dict[str, Tensor]:
    """Per matrix: 1 on the pieces of ``groups`` (and on the set-aside pieces,
    label < 0, when ``dead``), 0 elsewhere."""
    chosen = torch.tensor(sorted(groups), dtype=torch.long)
    as_tensors = {n: torch.as_tensor(v) for n, v in labels.items()}
    return {n: (torch.isin(v, chosen) | ((v < 0) & dead)).float() for n, v in as_tensors.items()}


def ablation_values(model: DecomposedModel, pieces: Pieces, labels: Mapping[str, np.ndarray],
                    batch: tuple[Tensor, Tensor, Tensor]) -> list[dict[str, float]]:
    """Per mechanism g: both functions with g alone ablated (every other
    mechanism and the set-aside pieces on)."""
    n_groups = int(max((lab.max() for lab in labels.values()), default=-1)) + 1
    return [function_values(model, *batch, pieces=pieces, masks=keep_masks(labels, set(range(n_groups)) - {g}, True))
            for g in range(n_groups)]


def mechanism_scores(model: DecomposedModel, pieces: Pieces, labels: Mapping[str, np.ndarray],
                     topk: Mapping[str, float], gen: torch.Generator,
                     active: Activity | None = None) -> dict[str, float]:
    """Per function: needed mechanisms, their share in the head, the function
    with only them kept, and whether it is recovered (see the module doc)."""
    batch = _eval_batch(model, gen)
    target = function_values(model, *batch)
    ablated = ablation_values(model, pieces, labels, batch)
    n_groups = len(ablated)
    needed = {f: {g for g in range(n_groups) if ablated[g][f] < NEEDED_BELOW * target[f]} for f in FUNCTIONS}
    out: dict[str, float] = {}
    for f, head in FUNCTIONS.items():
        own = needed[f] - (needed["prev_token"] if f == "induction" else set())
        members = keep_masks(labels, own, dead=False)
        norms = {n: float(pieces_sum(U[members[n].bool()], V[members[n].bool()]).norm() ** 2)
                 for n, (U, V) in pieces.items()}
        total = sum(norms.values())
        in_head = sum(v for n, v in norms.items() if n.startswith(head)) / total if total > 0 else 0.0
        only_needed = keep_masks(labels, needed[f], dead=False)
        kept = function_values(model, *batch, pieces=pieces, masks=only_needed)[f] / max(target[f], 1e-12)
        out[f"induction/{f}/needed_mechanisms"] = float(len(needed[f]))
        out[f"induction/{f}/share_in_head"] = in_head
        out[f"induction/{f}/kept_only_needed"] = kept
        out[f"induction/{f}/recovered"] = float(bool(own) and in_head >= 0.9 and kept >= KEEP_MIN)
    return out
