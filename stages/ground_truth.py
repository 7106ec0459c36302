"""The right grouping of a built-in target's pieces, read off one-hot probes.

Pieces of a matrix the target declares shared (``model.shared``: the TMS
hidden identity), and pieces active on more than half of the one-hot inputs,
form the one mechanism every input uses. Any other piece belongs to the
mechanism of the feature whose one-hot input gives it the largest attribution
(``model.feature_mechanisms()``: synced features share one); a piece with
zero attribution on every one-hot input is its own group.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import adjusted_rand_score

from pipeline.config import Stage1Config
from stages.coactivation import PieceIndex
from stages.scoring import one_hot_probe

SHARED_FRACTION = 0.5


def truth_labels(model, factors, stage1_cfg: Stage1Config, index: PieceIndex) -> np.ndarray:
    """One label per piece in the side-by-side index (dead pieces included)."""
    scores, masks, _ = one_hot_probe(model, factors, stage1_cfg, value=1.0)
    score = np.concatenate([scores[n].numpy() for n in index.names], axis=1)  # (n_features, P)
    active = np.concatenate([masks[n].numpy() for n in index.names], axis=1)
    n_features = score.shape[0]
    labels = np.asarray(model.feature_mechanisms())[score.argmax(axis=0)]
    silent = score.max(axis=0) <= 0
    shared = (active.mean(axis=0) > SHARED_FRACTION) | np.isin(index.matrix_of(), [
        j for j, n in enumerate(index.names) if n in model.shared])
    labels[shared] = n_features  # the shared mechanism
    silent &= ~shared
    labels[silent] = n_features + 1 + np.arange(int(silent.sum()))
    return labels


def partition_scores(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Agreement of two labellings of the same pieces."""
    def canonical(lab):
        groups: dict[int, list[int]] = {}
        for i, g in enumerate(lab):
            groups.setdefault(int(g), []).append(i)
        return sorted(map(tuple, groups.values()))

    return {
        "ari": float(adjusted_rand_score(truth, predicted)),
        "exact_match": float(canonical(predicted) == canonical(truth)),
        "truth_groups": float(len(set(truth.tolist()))),
    }
