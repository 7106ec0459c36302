"""Mechanisms: groups of rank-1 pieces, their ranks and description length.

A grouping is one integer label per piece (-1 for dead pieces); mechanism g
is the sum of the pieces labelled g, across all matrices. Pure numpy.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from sklearn.metrics import adjusted_rand_score

from apdkit.stages.group.coactivation import PieceIndex


def numerical_rank(U: np.ndarray, V: np.ndarray, rtol: float) -> int:
    """Rank of sum_c outer(U[c], V[c]) = U^T V without forming it: with
    U^T = Q1 R1 and V^T = Q2 R2, U^T V = Q1 (R1 R2^T) Q2^T, so the singular
    values are those of the small k x k matrix R1 R2^T. Singular values under
    ``rtol`` times the largest member piece's norm count as zero."""
    if U.shape[0] == 0:
        return 0
    scale = float(np.max(np.linalg.norm(U, axis=1) * np.linalg.norm(V, axis=1)))
    if scale == 0.0:
        return 0
    R1 = np.linalg.qr(U.T.astype(np.float64), mode="r")
    R2 = np.linalg.qr(V.T.astype(np.float64), mode="r")
    sv = np.linalg.svd(R1 @ R2.T, compute_uv=False)
    return int((sv > rtol * scale).sum())


def mechanism_ranks(labels: np.ndarray, index: PieceIndex, pieces: Mapping[str, tuple[np.ndarray, np.ndarray]],
                    n_groups: int, rtol: float) -> np.ndarray:
    """(n_groups, n_matrices) numerical rank of each mechanism in each matrix."""
    ranks = np.zeros((n_groups, len(index.names)), dtype=np.int64)
    per_matrix = index.split(labels)
    for j, name in enumerate(index.names):
        U, V = pieces[name]
        lab = per_matrix[name]
        for g in np.unique(lab[lab >= 0]):
            members = lab == g
            ranks[g, j] = numerical_rank(U[members], V[members], rtol)
    return ranks


def description_length(activity: np.ndarray, total_rank: np.ndarray, alpha: float) -> float:
    """sum_g s_g (log2 G + alpha * rank_g): bits to say which mechanisms each
    input uses plus alpha per unit of rank used (reference section 4)."""
    n_groups = len(activity)
    if n_groups == 0:
        return 0.0
    return float((activity * (math.log2(n_groups) + alpha * total_rank)).sum())


def relabel(labels: np.ndarray) -> np.ndarray:
    """Labels 0..G-1 in order of first appearance; -1 stays -1."""
    out = np.full_like(labels, -1)
    mapping: dict[int, int] = {}
    for i, lab in enumerate(labels):
        if lab >= 0:
            out[i] = mapping.setdefault(int(lab), len(mapping))
    return out


def partition_scores(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Agreement of a grouping with the ground-truth one, over the same pieces."""
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


def feature_merges(predicted: np.ndarray, dedicated: np.ndarray) -> dict[str, float]:
    """How a grouping treats the features' dedicated pieces (``dedicated``:
    the feature of each piece, -1 for shared or silent ones, see
    targets/probes.dedicated_labels): ``merged_features`` counts features
    whose dedicated pieces share a mechanism with another feature's, and
    ``split_features`` those whose dedicated pieces are spread over more
    than one mechanism. The known answer has 0 of each."""
    own = (dedicated >= 0) & (predicted >= 0)
    pairs = np.unique(np.stack([predicted[own], dedicated[own]], axis=1), axis=0)  # (mechanism, feature)
    mech, n_feat = np.unique(pairs[:, 0], return_counts=True)
    merged = np.unique(pairs[np.isin(pairs[:, 0], mech[n_feat > 1]), 1])
    feat, n_mech = np.unique(pairs[:, 1], return_counts=True)
    return {"merged_features": float(len(merged)), "split_features": float((n_mech > 1).sum())}


def identity_mechanisms(labels: Mapping[str, np.ndarray], identities: list[str]) -> dict[str, dict]:
    """For each inserted identity matrix: whether all its pieces landed in one
    mechanism (none set aside), which one, and whether that mechanism holds
    nothing else. The known answer is one mechanism, used by every input."""
    out = {}
    for name in identities:
        lab = np.asarray(labels[name])
        groups = set(lab.tolist())
        one = len(groups) == 1 and -1 not in groups
        g = int(lab[0]) if one else None
        exclusive = one and all(not np.any(np.asarray(v) == g) for n, v in labels.items() if n != name)
        out[name] = {"one_mechanism": one, "mechanism": g, "exclusive": exclusive,
                     "n_mechanisms": len(groups - {-1}), "set_aside": int((lab < 0).sum())}
    return out
