"""Ground truth read off one-hot probes, shared by the feature toys (TMS,
resid_mlp): feed value * e_i for every feature i and see which pieces act."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from apdkit.core.masks import active_output_error, score_inputs
from apdkit.core.model import DecomposedModel
from apdkit.core.pieces import Pieces

SHARED_FRACTION = 0.5  # pieces active on more than this share of one-hot inputs serve every input


def one_hot_probe(model: DecomposedModel, n_features: int, pieces: Pieces, topk: Mapping[str, float],
                  value: float = 1.0) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
    """Scores, masks and per-probe output MSE (active pieces only) on the
    one-hot inputs value * e_i. Batch top-k runs over the probes together,
    with at least one active piece per probe and matrix (k = max(1, k))."""
    x = torch.eye(n_features) * value
    probe_topk = {n: max(1.0, k) for n, k in topk.items()}
    scores, masks = score_inputs(model, x, pieces, probe_topk, block=n_features)
    return scores, masks, active_output_error(model, x, pieces, masks)


def dedicated_pieces(scores: Tensor, masks: Tensor) -> Tensor:
    """For each one-hot input i (row), whether some piece is active on i and on
    no other one-hot input. Returns a bool vector over features."""
    only_here = masks & (masks.sum(dim=0, keepdim=True) == 1)
    return only_here.any(dim=1)


def feature_truth_labels(model: DecomposedModel, n_features: int, pieces: Pieces, topk: Mapping[str, float],
                         names: Sequence[str], feature_mechanisms: Sequence[int],
                         shared_matrices: Sequence[str] = ()) -> np.ndarray:
    """One label per piece, matrices side by side in ``names`` order. Pieces
    of a matrix declared shared (the TMS hidden identity), and pieces active
    on more than half of the one-hot inputs, form the one mechanism every
    input uses. Any other piece belongs to the mechanism of the feature whose
    one-hot input gives it the largest attribution; a piece with zero
    attribution on every one-hot input is its own group."""
    scores, masks, _ = one_hot_probe(model, n_features, pieces, topk, value=1.0)
    score = np.concatenate([scores[n].numpy() for n in names], axis=1)  # (n_features, P)
    active = np.concatenate([masks[n].numpy() for n in names], axis=1)
    matrix_of = np.repeat(np.arange(len(names)), [pieces[n][0].shape[0] for n in names])
    labels = np.asarray(feature_mechanisms)[score.argmax(axis=0)]
    silent = score.max(axis=0) <= 0
    shared = (active.mean(axis=0) > SHARED_FRACTION) | np.isin(
        matrix_of, [j for j, n in enumerate(names) if n in shared_matrices])
    labels[shared] = n_features  # the shared mechanism
    silent &= ~shared
    labels[silent] = n_features + 1 + np.arange(int(silent.sum()))
    return labels


def dedicated_labels(model: DecomposedModel, n_features: int, pieces: Pieces, topk: Mapping[str, float],
                     names: Sequence[str], feature_mechanisms: Sequence[int],
                     shared_matrices: Sequence[str] = ()) -> np.ndarray:
    """One label per piece (matrices side by side in ``names`` order): the
    mechanism of the one feature whose one-hot input the piece is active on;
    -1 for pieces active on no one-hot input or on several, and for the
    pieces of a matrix every input uses (the TMS hidden identity)."""
    _, masks, _ = one_hot_probe(model, n_features, pieces, topk, value=1.0)
    active = np.concatenate([masks[n].numpy() for n in names], axis=1)  # (n_features, P)
    only = (active.sum(axis=0) == 1) & ~np.repeat(np.isin(list(names), list(shared_matrices)),
                                                  [pieces[n][0].shape[0] for n in names])
    return np.where(only, np.asarray(feature_mechanisms)[active.argmax(axis=0)], -1)
