"""Which pieces and mechanisms are active on an input, as stage 1 was
trained: batch top-k of attributions (minimality topk) or learned gates
above their threshold (minimality learned). Every stage asks here, so the
two modes are told apart in one place."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from apdkit.core.attributions import mechanism_attributions
from apdkit.core.gates import gate_masks
from apdkit.core.masks import Activity, score_inputs
from apdkit.core.model import DecomposedModel
from apdkit.core.pieces import Pieces, batch_topk_mask
from apdkit.stages.config import Stage1Config

Gates = Mapping[str, Mapping[str, Tensor]]


@torch.no_grad()
def piece_masks(model: DecomposedModel, x: Tensor, pieces: Pieces, gates: Gates, topk: Mapping[str, float],
                cfg: Stage1Config, gen: torch.Generator | None,
                attribution: str | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(scores, masks) {matrix: (rows, C)}: attributions and their batch top-k
    over blocks of ``batch_size`` inputs, or gates and gate > threshold.
    ``attribution`` overrides stage 1's method (top-k only)."""
    if cfg.minimality == "learned":
        return gate_masks(model, x, pieces, gates, cfg.gate_threshold, cfg.batch_size)
    return score_inputs(model, x, pieces, topk, cfg.batch_size, cfg.max_exact_outputs, cfg.attribution_probes, gen,
                        attribution or cfg.attribution, cfg.integration_steps)


def scorer_activity(model: DecomposedModel, pieces: Pieces, gates: Gates, cfg: Stage1Config) -> Activity | None:
    """What the ground-truth scorers count as a row's active pieces: with
    learned gates, those above the threshold; in top-k mode None, so a scorer
    takes the batch top-k at the target's k over its own blocks."""
    if cfg.minimality != "learned":
        return None
    return lambda x: gate_masks(model, x, pieces, gates, cfg.gate_threshold, cfg.batch_size)[1]


@torch.no_grad()
def mechanism_masks(model: DecomposedModel, x: Tensor, pieces: Pieces, gates: Gates,
                    membership: Mapping[str, Tensor], mean_active: float, cfg: Stage1Config,
                    gen: torch.Generator | None, attribution: str | None = None) -> tuple[Tensor, Tensor]:
    """(scores, active) (rows, G) of mechanisms: each attributed as a whole
    and the batch top-k at ``mean_active`` per input kept, or, with learned
    gates, a mechanism's score is its largest piece gate and it is active
    where that exceeds the threshold."""
    if cfg.minimality == "learned":
        g, _ = gate_masks(model, x, pieces, gates, cfg.gate_threshold, cfg.batch_size)
        n_groups = next(iter(membership.values())).shape[1]
        scores = torch.zeros(next(iter(g.values())).shape[0], n_groups, device=x.device)
        for n in pieces:
            member = membership[n].sum(1) > 0  # pieces set aside belong to no mechanism
            label = membership[n][member].argmax(1)
            scores.scatter_reduce_(1, label.expand(scores.shape[0], -1), g[n][:, member], "amax")
        return scores, scores > cfg.gate_threshold
    scores, _ = mechanism_attributions(model, x, pieces, membership, cfg.max_exact_outputs, cfg.attribution_probes,
                                       gen, attribution or cfg.attribution, cfg.integration_steps)
    return scores, batch_topk_mask(scores, mean_active)
