"""TMS ground truth: one rank-1 mechanism per feature (column j of W, in W
and, tied, in W^T); with the hidden identity also the identity, used by every
input. Pure functions: a model, pieces and top-k settings in, floats out."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from torch import Tensor

from apdkit.core.masks import Activity
from apdkit.core.model import DecomposedModel
from apdkit.core.pieces import Pieces
from apdkit.targets.probes import dedicated_labels as probe_dedicated_labels, feature_truth_labels


def feature_recovery(W: Tensor, U: Tensor, V: Tensor) -> dict[str, float]:
    """MMCS and ML2R of W's feature columns against the pieces' columns.

    Column j of piece c is U[c] * V[c, j]. For each feature j: the best cosine
    over pieces, and that piece's column norm over |W[:, j]|; both averaged.
    """
    cols = U[:, :, None] * V[:, None, :]  # (C, d_hidden, n_features), tiny for TMS
    W = W.detach()
    cos = (cols * W[None]).sum(1) / (cols.norm(dim=1) * W.norm(dim=0)[None]).clamp_min(1e-12)
    best_cos, best = cos.max(dim=0)
    ratio = cols.norm(dim=1).gather(0, best[None])[0] / W.norm(dim=0)
    # Shrinkage apart from splitting: sum the pieces of each feature (a piece
    # belongs to the feature its column norm is largest on; pieces under 5% of
    # the largest piece are dead) and compare that sum's column with W's.
    col_norms = cols.norm(dim=1)  # (C, n_features)
    alive = col_norms.max(dim=1).values > 0.05 * col_norms.max()
    owner = col_norms.argmax(dim=1)
    grouped = cols.new_zeros(W.shape)
    for j in range(W.shape[1]):
        grouped[:, j] = cols[(owner == j) & alive, :, j].sum(0)
    grouped_ratio = grouped.norm(dim=0) / W.norm(dim=0)
    grouped_cos = (grouped * W).sum(0) / (grouped.norm(dim=0) * W.norm(dim=0)).clamp_min(1e-12)
    return {"mmcs": float(best_cos.mean()), "ml2r": float(ratio.mean()),
            "min_cos": float(best_cos.min()), "grouped_mmcs": float(grouped_cos.mean()),
            "grouped_ml2r": float(grouped_ratio.mean())}


def scores(model: DecomposedModel, pieces: Pieces, topk: Mapping[str, float],
           active: Activity | None = None) -> dict[str, float]:
    U, V = pieces["W"]
    return {f"tms/{k}": v for k, v in feature_recovery(model.module.W.weight, U, V).items()}


def truth_labels(model: DecomposedModel, pieces: Pieces, topk: Mapping[str, float], names: Sequence[str]) -> np.ndarray:
    tms = model.module
    shared = ("hidden",) if tms.hidden is not None else ()
    return feature_truth_labels(model, tms.n_features, pieces, topk, names, tms.feature_mechanisms(), shared)


def dedicated_labels(model: DecomposedModel, pieces: Pieces, topk: Mapping[str, float], names: Sequence[str]) -> np.ndarray:
    tms = model.module
    shared = ("hidden",) if tms.hidden is not None else ()
    return probe_dedicated_labels(model, tms.n_features, pieces, topk, names, tms.feature_mechanisms(), shared)
