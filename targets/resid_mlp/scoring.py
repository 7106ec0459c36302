"""resid_mlp ground truth: each feature's computation is its own mechanism,
read off one-hot probes (dedicated W_in pieces, output error with only the
active pieces)."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from apdkit.core.masks import Activity
from apdkit.core.model import DecomposedModel
from apdkit.core.pieces import Pieces
from apdkit.targets.probes import dedicated_labels as probe_dedicated_labels
from apdkit.targets.probes import dedicated_pieces, feature_truth_labels, one_hot_probe


def scores(model: DecomposedModel, pieces: Pieces, topk: Mapping[str, float],
           active: Activity | None = None) -> dict[str, float]:
    n = model.module.n_features
    out: dict[str, float] = {}
    for value in (1.0, 0.75):
        probe_scores, masks, mse = one_hot_probe(model, n, pieces, topk, value)
        tag = f"one_hot_{value:g}"
        out[f"resid/{tag}/mean_output_mse"] = float(mse.mean())
        out[f"resid/{tag}/max_output_mse"] = float(mse.max())
        if value == 1.0:
            anywhere = torch.zeros(n, dtype=torch.bool)
            for name in pieces:
                if name.endswith("W_in"):
                    here = dedicated_pieces(probe_scores[name], masks[name])
                    out[f"resid/dedicated_features/{name}"] = float(here.sum())
                    anywhere |= here
            out["resid/dedicated_features"] = float(anywhere.sum())  # a dedicated W_in piece in some layer
    return out


def truth_labels(model: DecomposedModel, pieces: Pieces, topk: Mapping[str, float], names: Sequence[str]) -> np.ndarray:
    n = model.module.n_features
    return feature_truth_labels(model, n, pieces, topk, names, list(range(n)))


def dedicated_labels(model: DecomposedModel, pieces: Pieces, topk: Mapping[str, float], names: Sequence[str]) -> np.ndarray:
    n = model.module.n_features
    return probe_dedicated_labels(model, n, pieces, topk, names, list(range(n)))
