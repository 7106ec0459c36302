"""Grouping methods: co-activation statistics of the alive pieces in, one
label per alive piece out. Every method has the same signature; adding one is
a function here and a line in METHODS."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import networkx as nx
import numpy as np
from sklearn.cluster import SpectralClustering

from apdkit.stages.group.coactivation import CoactivationStats, jaccard
from apdkit.stages.group.mechanisms import relabel


@dataclass(frozen=True)
class GroupingInput:
    """What a method sees, restricted to the alive pieces (P of them)."""

    stats: CoactivationStats  # (P,) counts, (P, P) co-activation
    sample_masks: np.ndarray  # (n_sub, P) bool: a sample of inputs, for description lengths
    matrix_of: np.ndarray  # (P,) which matrix each piece is in
    union_rank: Callable[[np.ndarray], np.ndarray]  # piece positions -> rank per matrix of their sum


@dataclass(frozen=True)
class GroupingSettings:
    n_groups: int | None = None
    alpha: float = 4.0
    threshold: float = 0.5
    resolution: float = 1.0
    max_groups: int | None = None
    seed: int = 0


class GroupingError(ValueError):
    pass


CHANCE_LIFT = 2.0  # co-activation must beat independence by this factor to link two pieces
ALWAYS_TOGETHER = 0.9  # ... unless they (almost) never fire apart


def affinity(stats: CoactivationStats) -> np.ndarray:
    """Jaccard co-activation, kept only where two pieces fire together at
    least CHANCE_LIFT times as often as independent pieces would: coincidences
    between unrelated pieces (two features on the same input) are not links.
    Pieces that nearly always fire together (Jaccard >= ALWAYS_TOGETHER) stay
    linked even when both fire on most inputs, where chance says nothing
    (an inserted identity is on for every input)."""
    A = jaccard(stats)
    expected = np.outer(stats.counts, stats.counts) / max(stats.n_samples, 1)
    A[(stats.co < CHANCE_LIFT * expected) & (A < ALWAYS_TOGETHER)] = 0.0
    np.fill_diagonal(A, 1.0)
    return A


def eigengap(A: np.ndarray, max_groups: int) -> int:
    """The group count (at least 2) after the largest gap among the smallest
    eigenvalues of the normalised Laplacian of the affinity. The gap after
    the first eigenvalue is skipped: weak links make most co-activation
    graphs connected, and that gap only says so."""
    if len(A) <= 2 or max_groups < 2:
        return min(len(A), max(1, max_groups))
    d = A.sum(1)
    inv = 1.0 / np.sqrt(np.maximum(d, 1e-12))
    L = np.eye(len(A)) - inv[:, None] * A * inv[None, :]
    eig = np.sort(np.linalg.eigvalsh(L))[: max_groups + 1]
    return int(np.argmax(np.diff(eig)[1:])) + 2


def spectral(inp: GroupingInput, s: GroupingSettings) -> np.ndarray:
    """Spectral clustering of the (chance-filtered) Jaccard affinity; the
    number of groups is --n-groups or else the eigengap's."""
    A = affinity(inp.stats)
    P = len(A)
    k = s.n_groups if s.n_groups is not None else eigengap(A, min(P - 1, s.max_groups or P - 1))
    if k >= P:
        return np.arange(P)
    if k == 1:
        return np.zeros(P, dtype=np.int64)
    with warnings.catch_warnings():  # disconnected co-activation graphs are the normal case here
        warnings.filterwarnings("ignore", message="Graph is not fully connected")
        labels = SpectralClustering(n_clusters=k, affinity="precomputed", assign_labels="discretize",
                                    random_state=s.seed).fit_predict(A)
    return relabel(labels)


def _graph(inp: GroupingInput) -> nx.Graph:
    A = affinity(inp.stats)
    G = nx.Graph()
    G.add_nodes_from(range(len(A)))
    rows, cols = np.nonzero(np.triu(A, k=1))
    G.add_weighted_edges_from((int(i), int(j), float(A[i, j])) for i, j in zip(rows, cols))
    return G


def _from_communities(communities, P: int) -> np.ndarray:
    labels = np.full(P, -1, dtype=np.int64)
    for g, members in enumerate(sorted(communities, key=min)):
        labels[list(members)] = g
    return labels


def louvain(inp: GroupingInput, s: GroupingSettings) -> np.ndarray:
    comms = nx.community.louvain_communities(_graph(inp), weight="weight", resolution=s.resolution, seed=s.seed)
    return _from_communities(comms, len(inp.matrix_of))


def leiden(inp: GroupingInput, s: GroupingSettings) -> np.ndarray:
    try:
        comms = nx.community.leiden_communities(_graph(inp), weight="weight", resolution=s.resolution, seed=s.seed)
    except NotImplementedError as e:
        raise GroupingError(f"leiden needs a networkx backend that implements it ({e}); use louvain") from None
    return _from_communities(comms, len(inp.matrix_of))


def threshold(inp: GroupingInput, s: GroupingSettings) -> np.ndarray:
    """Connected components of the graph of Jaccard >= threshold."""
    A = affinity(inp.stats)
    G = nx.Graph()
    G.add_nodes_from(range(len(A)))
    rows, cols = np.nonzero(np.triu(A >= s.threshold, k=1))
    G.add_edges_from(zip(rows.tolist(), cols.tolist()))
    return _from_communities(nx.connected_components(G), len(A))


def mdl(inp: GroupingInput, s: GroupingSettings) -> np.ndarray:
    """Greedy merging: repeatedly merge the pair of groups whose merge lowers
    the description length most, until none does.

    With G groups, S = sum_g s_g, merging g and h (co-active on c inputs,
    merged rank r) changes the length by
        log2(G-1) (S - c) - log2(G) S + alpha ((s_g + s_h - c) r - s_g r_g - s_h r_h).
    The merged rank needs a small SVD, so pairs are screened with a lower
    bound (per matrix, r >= max(r_g, r_h)) and only the best is checked exactly.
    """
    masks = inp.sample_masks.astype(bool)
    P = masks.shape[1]
    members = [np.array([p]) for p in range(P)]
    ranks = np.stack([inp.union_rank(m) for m in members])  # (G, n_matrices)
    active = masks.copy()  # (n, G): is any member active
    s_g = active.sum(0).astype(np.float64)
    co = (active.T.astype(np.int64) @ active.astype(np.int64)).astype(np.float64)
    rejected: set[tuple[int, int]] = set()
    alpha = s.alpha
    while len(members) > 1:
        G = len(members)
        S = s_g.sum()
        r_tot = ranks.sum(1).astype(np.float64)
        lower_r = np.maximum(ranks[:, None, :], ranks[None, :, :]).sum(-1)
        base = math.log2(G - 1) * (S - co) - math.log2(G) * S
        delta_lower = base + alpha * ((s_g[:, None] + s_g[None, :] - co) * lower_r
                                      - s_g[:, None] * r_tot[:, None] - s_g[None, :] * r_tot[None, :])
        delta_lower[np.tril_indices(G)] = np.inf
        delta_lower[co == 0] = np.inf
        for g, h in rejected:
            delta_lower[g, h] = np.inf
        g, h = np.unravel_index(np.argmin(delta_lower), delta_lower.shape)
        if not delta_lower[g, h] < 0:
            break
        union = np.concatenate([members[g], members[h]])
        r_union = inp.union_rank(union)
        exact = base[g, h] + alpha * ((s_g[g] + s_g[h] - co[g, h]) * r_union.sum()
                                      - s_g[g] * r_tot[g] - s_g[h] * r_tot[h])
        if exact >= 0:
            rejected.add((int(g), int(h)))
            continue
        # merge h into g
        members[g] = union
        ranks[g] = r_union
        active[:, g] |= active[:, h]
        keep = [i for i in range(G) if i != h]
        members = [members[i] for i in keep]
        ranks = ranks[keep]
        active = active[:, keep]
        s_g = active.sum(0).astype(np.float64)
        g_new = g if g < h else g - 1
        row = (active.T.astype(np.int64) @ active[:, g_new].astype(np.int64)).astype(np.float64)
        co = co[np.ix_(keep, keep)]
        co[g_new, :] = row
        co[:, g_new] = row
        rejected = {(a - (a > h), b - (b > h)) for a, b in rejected if h not in (a, b) and g not in (a, b)}
    labels = np.empty(P, dtype=np.int64)
    for gi, m in enumerate(members):
        labels[m] = gi
    return relabel(labels)


METHODS: dict[str, Callable[[GroupingInput, GroupingSettings], np.ndarray]] = {
    "spectral": spectral,
    "louvain": louvain,
    "leiden": leiden,
    "mdl": mdl,
    "threshold": threshold,
}
