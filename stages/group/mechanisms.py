"""Mechanisms: groups of rank-1 pieces, their ranks and description length.

A grouping is one integer label per piece (-1 for dead pieces); mechanism g
is the sum of the pieces labelled g, across all matrices. Pure numpy.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Union

import numpy as np
from scipy import sparse
from sklearn.metrics import adjusted_rand_score

from apdkit.stages.group.coactivation import PieceIndex, twin_components


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


def rank_function(index: PieceIndex, pieces: Mapping[str, tuple[np.ndarray, np.ndarray]], columns: np.ndarray,
                  rtol: float) -> Callable[[np.ndarray], np.ndarray]:
    """positions (into ``columns``, flat piece indices) -> (n_matrices,)
    numerical rank of the sum of those pieces in each matrix."""
    matrix_of, offsets = index.matrix_of(), index.offsets()

    def union_rank(positions: np.ndarray) -> np.ndarray:
        out = np.zeros(len(index.names), dtype=np.int64)
        cols = columns[positions]
        mats = matrix_of[cols]
        for j in np.unique(mats):
            name = index.names[j]
            local = cols[mats == j] - offsets[name]
            out[j] = numerical_rank(pieces[name][0][local], pieces[name][1][local], rtol)
        return out

    return union_rank


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


Masks = Union[sparse.sparray, np.ndarray]  # (n, P) bool: which pieces fire on each sampled input


def _columns(masks: Masks) -> sparse.csc_array:
    return masks if sparse.issparse(masks) and masks.format == "csc" else sparse.csc_array(masks, dtype=np.int8)


def _fired(cols: sparse.csc_array) -> float:
    """On how many rows at least one of the columns fires."""
    return float(np.count_nonzero(np.asarray(cols.sum(axis=1)).ravel()))


def twin_classes(masks: Masks, together: float) -> np.ndarray:
    """(m,) class of each column of ``masks`` (n, m) bool: columns whose
    Jaccard co-activation is at least ``together`` (pieces that (almost)
    always fire together) share a class, transitively."""
    m = _columns(masks).astype(np.int64)
    return twin_components(m.T @ m, np.asarray(m.sum(axis=0)).ravel(), together)


def best_split(masks: Masks, members: np.ndarray, union_rank: Callable[[np.ndarray], np.ndarray],
               alpha: float, n_groups: int, total_activity: float, together: float) -> tuple[float, np.ndarray] | None:
    """The split of one mechanism (``members``: its columns of ``masks``)
    into one class of twin pieces and the rest that lowers the description
    length most: (change in bits, the class's members), or None when no
    split into a class and a rest that both fire lowers it. ``union_rank``:
    columns -> the rank of their sum in each matrix. With G groups of total
    activity S, splitting g (activity s_g, rank r_g) into K and R changes it by
        log2(G+1) (S - s_g + s_K + s_R) - log2(G) S + alpha (s_K r_K + s_R r_R - s_g r_g)."""
    def rank_of(cols: np.ndarray) -> int:
        return int(np.sum(union_rank(cols)))

    sub = _columns(masks)[:, members]
    classes = twin_classes(sub, together)
    if classes.max() == 0:
        return None
    s_g = _fired(sub)
    r_g = rank_of(members)
    base = math.log2(n_groups + 1) * (total_activity - s_g) - math.log2(n_groups) * total_activity
    best = None
    for k in range(int(classes.max()) + 1):
        in_k = classes == k
        s_k, s_r = _fired(sub[:, np.flatnonzero(in_k)]), _fired(sub[:, np.flatnonzero(~in_k)])
        if s_k == 0 or s_r == 0:  # a part that never fires here is not evidence of two mechanisms
            continue
        r_k = rank_of(members[in_k])
        bound = base + math.log2(n_groups + 1) * (s_k + s_r) + alpha * (s_k * r_k + s_r * max(r_g - r_k, 0) - s_g * r_g)
        if bound >= 0 or (best is not None and bound >= best[0]):  # rank(R) >= rank(g) - rank(K)
            continue
        change = base + math.log2(n_groups + 1) * (s_k + s_r) + alpha * (
            s_k * r_k + s_r * rank_of(members[~in_k]) - s_g * r_g)
        if change < 0 and (best is None or change < best[0]):
            best = (change, members[in_k])
    return best


def split_unions(labels: np.ndarray, masks: Masks, union_rank: Callable[[np.ndarray], np.ndarray],
                 alpha: float, together: float) -> np.ndarray:
    """Split every mechanism that is a union: while taking one class of twin
    pieces out of a mechanism as a mechanism of its own lowers the
    description length, take the class that lowers it most. A union is two
    mechanisms that fire together on some inputs but not on others, such
    as one feature's piece joined to an inserted identity that is on for
    every input: as one mechanism, the identity's rank is paid wherever the
    feature fires, and the feature's wherever the identity does.
    ``labels``: (P,) per column of ``masks`` (n, P) bool, -1 for none."""
    masks = _columns(masks)
    out = labels.copy()
    n_groups = int(out.max()) + 1
    members_of = [np.flatnonzero(out == g) for g in range(n_groups)]
    activity = [_fired(masks[:, m]) for m in members_of]
    todo = list(range(n_groups))
    while todo:
        g = todo.pop(0)
        if len(members_of[g]) < 2:
            continue
        found = best_split(masks, members_of[g], union_rank, alpha, n_groups, float(sum(activity)), together)
        if found is None:
            continue
        out[found[1]] = n_groups
        members_of[g] = np.setdiff1d(members_of[g], found[1])
        members_of.append(found[1])
        activity[g] = _fired(masks[:, members_of[g]])
        activity.append(_fired(masks[:, found[1]]))
        todo += [g, n_groups]
        n_groups += 1
    return out


def union_mechanisms(labels: np.ndarray, masks: Masks, union_rank: Callable[[np.ndarray], np.ndarray],
                     alpha: float, together: float) -> list[int]:
    """The mechanisms that ``split_unions`` would split (see there)."""
    masks = _columns(masks)
    members_of = [np.flatnonzero(labels == g) for g in range(int(labels.max()) + 1)]
    total = float(sum(_fired(masks[:, m]) for m in members_of))
    return [g for g, m in enumerate(members_of)
            if len(m) > 1 and best_split(masks, m, union_rank, alpha, len(members_of), total, together) is not None]
