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
from scipy import sparse
from scipy.sparse.csgraph import connected_components
from scipy.sparse.linalg import eigsh
from sklearn.cluster import SpectralClustering
from threadpoolctl import threadpool_limits

from apdkit.stages.config import TOGETHER_MIN
from apdkit.stages.group.coactivation import CoactivationStats, jaccard, twin_components
from apdkit.stages.group.mechanisms import relabel, split_unions


@dataclass(frozen=True)
class GroupingInput:
    """What a method sees, restricted to the alive pieces (P of them)."""

    stats: CoactivationStats  # (P,) counts, (P, P) co-activation
    sample_masks: sparse.sparray | np.ndarray  # (n_sub, P) bool: a sample of inputs, for description lengths
    matrix_of: np.ndarray  # (P,) which matrix each piece is in
    union_rank: Callable[[np.ndarray], np.ndarray]  # piece positions -> rank per matrix of their sum
    module_of: np.ndarray | None = None  # (P,) which module (a matrix's parent, module_name) each piece is in; None: one


@dataclass(frozen=True)
class GroupingSettings:
    n_groups: int | None = None
    alpha: float = 4.0
    threshold: float = 0.5
    resolution: float = 1.0
    max_groups: int | None = None
    together_min: float = TOGETHER_MIN
    shared_pieces: str = "own"  # every bridge piece a mechanism of its own ("method": where the method put it)
    always_on: str = "own"  # a module's always-on part of a mechanism its own mechanism ("method": left joined)
    seed: int = 0


class GroupingError(ValueError):
    pass


CHANCE_LIFT = 2.0  # co-activation must beat independence by this factor to link two pieces
ALWAYS_TOGETHER = 0.9  # ... unless they (almost) never fire apart


AFFINITY_ROWS = 1024  # rows of the co-activation matrix filtered at once (bounds the temporaries)


def chance_z(n_pieces: int) -> float:
    """Standard deviations by which a pair's co-activation must exceed
    chance: sqrt(2 ln(pairs)), the Gaussian bound under which no pair among
    them is expected to get there by chance. With many pieces a fixed lift
    is not enough: among 10^8 pairs some independent ones double their
    expected count."""
    return float(np.sqrt(2 * np.log(max(n_pieces * (n_pieces - 1) / 2, 2))))


def affinity(stats: CoactivationStats) -> sparse.csr_array:
    """Jaccard co-activation, kept only where two pieces fire together at
    least CHANCE_LIFT times as often as independent pieces would, and by more
    than chance_z standard deviations (of a count with variance max(expected,
    1)): coincidences between unrelated pieces (two features on the same
    input) are not links.
    Pieces that nearly always fire together (Jaccard >= ALWAYS_TOGETHER) stay
    linked even when both fire on most inputs, where chance says nothing
    (an inserted identity is on for every input). Sparse, diagonal 1."""
    P, c = len(stats.counts), stats.counts.astype(np.float64)
    z = chance_z(P)
    rows, cols, vals = [np.arange(P)], [np.arange(P)], [np.ones(P)]
    for start in range(0, P, AFFINITY_ROWS):
        block = stats.co[start:start + AFFINITY_ROWS].tocoo()
        r, q, co = block.row + start, block.col, block.data.astype(np.float64)
        J = jaccard(co, c[r], c[q])
        expected = c[r] * c[q] / max(stats.n_samples, 1)
        beyond_chance = (co >= CHANCE_LIFT * expected) & (co >= expected + z * np.sqrt(np.maximum(expected, 1.0)))
        keep = (beyond_chance | (J >= ALWAYS_TOGETHER)) & (r != q)
        rows.append(r[keep])
        cols.append(q[keep])
        vals.append(J[keep])
    return sparse.csr_array((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(P, P))


# ONE_THREAD: eigenvalues and eigenvectors are computed with one BLAS thread.
# With two threads they differ in the last bits, and the clustering follows
# them (resid_mlp3 seed 2: 6 merged features with one thread, 8 with two), so
# a grouping would depend on the machine's core count.
DENSE_EIGEN_MAX = 2000  # larger components: a sparse solver for their first eigenvalues
SPARSE_EIGEN_COUNT = 100  # ... so at most this many groups in one such component


def laplacian_spectrum(A: sparse.csr_array, count: int) -> np.ndarray:
    """The ``count`` smallest eigenvalues of the normalised Laplacian of a
    connected affinity graph."""
    d = np.asarray(A.sum(axis=1)).ravel()
    inv = sparse.diags_array(1.0 / np.sqrt(np.maximum(d, 1e-12)))
    norm = inv @ A @ inv  # eigenvalues of L = I - norm
    n = A.shape[0]
    with threadpool_limits(limits=1):  # see ONE_THREAD
        if n <= DENSE_EIGEN_MAX:
            return np.sort(1.0 - np.linalg.eigvalsh(norm.toarray()))[:count]
        k = min(count, SPARSE_EIGEN_COUNT, n - 2)
        top = eigsh(norm, k=k, which="LA", return_eigenvectors=False, v0=np.ones(n) / np.sqrt(n))
    return np.sort(1.0 - top)


ONE_GROUP_LAMBDA = 2 / 3


def eigengap(A: sparse.csr_array, max_groups: int) -> int:
    """The group count of one connected component, from the smallest
    eigenvalues of its normalised Laplacian. One group when the second
    eigenvalue is at least ONE_GROUP_LAMBDA: every piece is strongly linked
    to the rest (for two pieces: a Jaccard of at least 1/2; a component tied
    together through hubs, like an always-on identity linked to every
    feature, stays well below). Otherwise the count after the largest gap,
    skipping the gap after the first eigenvalue, which only says the
    component is connected."""
    if A.shape[0] == 1 or max_groups < 2:
        return 1
    eig = laplacian_spectrum(A, max_groups + 1)
    if eig[1] >= ONE_GROUP_LAMBDA:
        return 1
    if len(eig) == 2:
        return 2
    return int(np.argmax(np.diff(eig)[1:])) + 2


def _cluster(A: sparse.csr_array, k: int, seed: int) -> np.ndarray:
    if k >= A.shape[0]:
        return np.arange(A.shape[0])
    if k == 1:
        return np.zeros(A.shape[0], dtype=np.int64)
    with warnings.catch_warnings():  # a fixed --n-groups may span components
        warnings.filterwarnings("ignore", message="Graph is not fully connected")
        if A.shape[0] <= DENSE_EIGEN_MAX:
            A = A.toarray()
        else:  # scikit-learn takes 32-bit sparse indices only
            A = sparse.csr_array((A.data, A.indices.astype(np.int32), A.indptr.astype(np.int32)), shape=A.shape)
        with threadpool_limits(limits=1):  # see ONE_THREAD
            return SpectralClustering(n_clusters=k, affinity="precomputed", assign_labels="discretize",
                                      random_state=seed).fit_predict(A)


def spectral(inp: GroupingInput, s: GroupingSettings) -> np.ndarray:
    """Spectral clustering of the (chance-filtered) Jaccard affinity. With
    --n-groups, of the whole graph into that many groups; otherwise each
    connected component on its own, into as many groups as its eigengap says,
    so pieces that never co-activate are never put together."""
    A = affinity(inp.stats)
    P = A.shape[0]
    if s.n_groups is not None:
        return relabel(_cluster(A, s.n_groups, s.seed))
    n_comp, comp = connected_components(A, directed=False)
    labels = np.empty(P, dtype=np.int64)
    start = 0
    for c in range(n_comp):
        idx = np.flatnonzero(comp == c)
        sub = A[idx][:, idx].tocsr()
        k = eigengap(sub, min(len(idx), s.max_groups or len(idx)))
        labels[idx] = start + _cluster(sub, k, s.seed)
        start += k
    return relabel(labels)


def _graph(inp: GroupingInput) -> nx.Graph:
    A = sparse.triu(affinity(inp.stats), k=1).tocoo()
    G = nx.Graph()
    G.add_nodes_from(range(A.shape[0]))
    G.add_weighted_edges_from(zip(A.row.tolist(), A.col.tolist(), A.data.tolist()))
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
    A.data[A.data < s.threshold] = 0
    A.eliminate_zeros()
    return relabel(connected_components(A, directed=False)[1])


MDL_MAX_PIECES = 4000  # mdl holds dense groups x groups matrices


def mdl(inp: GroupingInput, s: GroupingSettings) -> np.ndarray:
    """Greedy merging: repeatedly merge the pair of groups whose merge lowers
    the description length most, until none does.

    With G groups, S = sum_g s_g, merging g and h (co-active on c inputs,
    merged rank r) changes the length by
        log2(G-1) (S - c) - log2(G) S + alpha ((s_g + s_h - c) r - s_g r_g - s_h r_h).
    The merged rank needs a small SVD, so pairs are screened with a lower
    bound (per matrix, r >= max(r_g, r_h)) and only the best is checked exactly.
    """
    P = inp.sample_masks.shape[1]
    if P > MDL_MAX_PIECES:
        raise GroupingError(f"mdl holds dense groups x groups matrices: at most {MDL_MAX_PIECES} alive pieces "
                            f"(here {P}); use spectral or louvain")
    masks = inp.sample_masks.toarray() if sparse.issparse(inp.sample_masks) else inp.sample_masks
    # 0/1 as floats, so the counts go through BLAS (an int64 product of 16,384 rows x 1,024 pieces took
    # minutes, a float one under a second); float32 sums of 0/1 are exact below 2**24 rows
    active = masks.astype(np.float32 if masks.shape[0] < 2**24 else np.float64)  # (n, G): is any member active
    members = [np.array([p]) for p in range(P)]
    ranks = np.stack([inp.union_rank(m) for m in members])  # (G, n_matrices)
    co = (active.T @ active).astype(np.float64)
    s_g = np.diag(co).copy()
    rejected: set[tuple[int, int]] = set()
    alpha = s.alpha
    delta_lower = None  # kept while only rejections happen: a rejection changes nothing but its own pair
    while len(members) > 1:
        G = len(members)
        if delta_lower is None:
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
            delta_lower[g, h] = np.inf
            continue
        # merge h into g
        members[g] = union
        ranks[g] = r_union
        np.maximum(active[:, g], active[:, h], out=active[:, g])
        keep = [i for i in range(G) if i != h]
        members = [members[i] for i in keep]
        ranks = ranks[keep]
        active = np.delete(active, h, axis=1)
        g_new = g if g < h else g - 1
        row = (active.T @ active[:, g_new]).astype(np.float64)
        s_g = s_g[keep]
        s_g[g_new] = row[g_new]
        co = co[np.ix_(keep, keep)]
        co[g_new, :] = row
        co[:, g_new] = row
        rejected = {(a - (a > h), b - (b > h)) for a, b in rejected if h not in (a, b) and g not in (a, b)}
        delta_lower = None
    labels = np.empty(P, dtype=np.int64)
    for gi, m in enumerate(members):
        labels[m] = gi
    return relabel(labels)


def apart(stats: CoactivationStats, idx: np.ndarray, together_min: float) -> np.ndarray:
    """(len(idx), len(idx)) bool: pairs of pieces that must not share a
    mechanism. Two pieces are apart when they fire together no more than
    CHANCE_LIFT times chance, or on at most ``together_min`` of the rarer
    one's inputs, unless they (almost) always fire together (an inserted
    identity, on for every input, is at chance with itself). A piece that
    serves two features (fires on both) is not apart from either, but the
    features' own pieces are apart from each other."""
    c = stats.counts[idx].astype(np.float64)
    co = stats.co[idx][:, idx].toarray().astype(np.float64)
    expected = c[:, None] * c[None, :] / max(stats.n_samples, 1)
    rarer = np.minimum(c[:, None], c[None, :])
    out = (co <= np.maximum(CHANCE_LIFT * expected, together_min * rarer)) & (
        jaccard(co, c[:, None], c[None, :]) < ALWAYS_TOGETHER)
    np.fill_diagonal(out, False)
    return out


SPLIT_MAX_PIECES = 4000  # a group is checked with dense (members x members) matrices


def split_apart(labels: np.ndarray, inp: GroupingInput, s: GroupingSettings) -> np.ndarray:
    """Split every group that holds two pieces that are ``apart`` (a
    cannot-link rule, for any method): by connected components of its links
    first, then by spectral bisection, until no group holds such a pair.
    What joins two features' pieces is then never kept: a piece shared by
    both (one W_out direction serving two features) goes with one side."""
    A = None  # the links, built only if some group needs splitting
    out = labels.copy()
    next_label = int(labels.max()) + 1
    todo = [np.flatnonzero(labels == g) for g in np.unique(labels)]
    while todo:
        idx = todo.pop()
        if len(idx) < 2 or len(idx) > SPLIT_MAX_PIECES:
            continue
        bad = apart(inp.stats, idx, s.together_min)
        if not bad.any():
            continue
        A = affinity(inp.stats) if A is None else A
        sub = A[idx][:, idx].tocsr()
        n_parts, parts = connected_components(sub, directed=False)
        if n_parts == 1:
            parts = _cluster(sub, 2, s.seed)
            if len(np.unique(parts)) < 2:  # no bisection found: the piece apart from most others leaves
                parts = np.zeros(len(idx), dtype=np.int64)
                parts[bad.sum(1).argmax()] = 1
        for part in np.unique(parts):
            members = idx[parts == part]
            if part != parts[0]:
                out[members] = next_label
                next_label += 1
            todo.append(members)
    return relabel(out)


BRIDGE_DOMINANCE = 2.0  # a bridge stays where the method put it when one side explains this many times more of it


def bridges(stats: CoactivationStats, together_min: float) -> np.ndarray:
    """(P,) bool: pieces that serve two mechanisms that never share inputs,
    about equally. A piece p is a bridge when, among the pieces it is linked
    to (not ``apart`` from it, active with it at least once, and not
    (almost) always together with it: a twin is p itself), one is apart from
    p's strongest partner q and fires with p on at least 1/BRIDGE_DOMINANCE
    as many inputs as q does. In resid_mlp: a W_out
    direction read from a neuron two features share, which one feature's
    one-hot probe switches on but which fires as often on the other
    feature's inputs; whichever side it joins, that side's mechanism holds a
    piece of the other feature."""
    P = len(stats.counts)
    out = np.zeros(P, dtype=bool)
    for p in range(P):
        row = stats.co[[p]]
        others = (row.data > 0) & (row.indices != p)
        nb, co = row.indices[others], row.data[others].astype(np.float64)
        if len(nb) < 2 or len(nb) >= SPLIT_MAX_PIECES:
            continue
        bad = apart(stats, np.concatenate([[p], nb]), together_min)
        twin = jaccard(co, stats.counts[p], stats.counts[nb]) >= ALWAYS_TOGETHER
        linked = np.flatnonzero(~bad[0, 1:] & ~twin)
        if len(linked) < 2:
            continue
        best = linked[np.argmax(co[linked])]
        rivals = linked[bad[1 + best, 1 + linked]]
        out[p] = len(rivals) > 0 and co[rivals].max() * BRIDGE_DOMINANCE >= co[best]
    return out


def split_bridges(labels: np.ndarray, inp: GroupingInput, s: GroupingSettings) -> np.ndarray:
    """Give every bridge piece a mechanism of its own (bridges that (almost)
    always fire together share one), so it pulls neither side to the other."""
    is_bridge = bridges(inp.stats, s.together_min)
    if not is_bridge.any():
        return labels
    idx = np.flatnonzero(is_bridge)
    sub = inp.stats.restrict(idx)
    out = labels.copy()
    out[idx] = int(labels.max()) + 1 + twin_components(sub.co, sub.counts, ALWAYS_TOGETHER)
    return relabel(out)


ALWAYS_ON = 0.99  # a part of a mechanism on for at least this share of the inputs is always on


def module_name(matrix: str) -> str:
    """The module a matrix belongs to: its name's parent ("layers.1" for
    "layers.1.q", "" for a top-level matrix)."""
    return matrix.rpartition(".")[0]


def split_always_on(labels: np.ndarray, inp: GroupingInput) -> np.ndarray:
    """Give each module's always-on part of a mechanism that spans several
    modules a mechanism of its own. A part on for (almost) every input fires
    with any other part exactly as often as chance says, so co-activation
    holds no evidence that it belongs with them; a description length still
    joins such parts (one always-on mechanism costs fewer bits than two).
    Seen on induction-sink: layer 1's Q, K and V, on everywhere so that the
    head can rest on its sink, joined layer 0's previous-token head.
    The parts that are not always on stay together."""
    if inp.module_of is None or len(np.unique(inp.module_of)) < 2 or inp.sample_masks.shape[0] == 0:
        return labels
    masks = inp.sample_masks
    out = labels.copy()
    next_label = int(labels.max()) + 1
    for g in np.unique(labels[labels >= 0]):
        idx = np.flatnonzero(labels == g)
        modules = np.unique(inp.module_of[idx])
        if len(modules) < 2:
            continue
        parts = [idx[inp.module_of[idx] == m] for m in modules]
        on = [np.asarray((masks[:, part] != 0).sum(axis=1)).ravel() > 0 for part in parts]
        always = [part for part, o in zip(parts, on) if o.mean() >= ALWAYS_ON]
        if len(always) == len(parts):
            always = always[1:]  # the first keeps the label
        for part in always:
            out[part] = next_label
            next_label += 1
    return relabel(out)


def always_on_applies(s: GroupingSettings) -> bool:
    """Whether split_always_on runs after the method: not with a fixed group count."""
    return s.n_groups is None and s.always_on == "own"


def splits_apply(s: GroupingSettings) -> bool:
    """Whether the apart rule, the union split and the bridges run after the
    method: not with a fixed group count, nor with together_min 0."""
    return s.n_groups is None and s.together_min > 0


def group_pieces(method: str, inp: GroupingInput, s: GroupingSettings) -> np.ndarray:
    """One label per alive piece: the method's grouping; unless the group
    count is fixed, with always_on "own" each module's always-on part of a
    mechanism split off (split_always_on); then (unless the
    group count is fixed or together_min is 0) split so that no group holds
    two pieces that are apart, split where a group is a union of two
    mechanisms (mechanisms.split_unions, on the masks sample), and with
    shared_pieces "own" every bridge piece made a mechanism of its own."""
    labels = METHODS[method](inp, s)
    if always_on_applies(s):
        labels = split_always_on(labels, inp)
    if not splits_apply(s):
        return labels
    labels = split_apart(labels, inp, s)
    if inp.sample_masks.shape[0] == 0:
        raise GroupingError("splitting unions needs a sample of the masks (GroupingInput.sample_masks is empty)")
    labels = relabel(split_unions(labels, inp.sample_masks, inp.union_rank, s.alpha, ALWAYS_TOGETHER))
    return split_bridges(labels, inp, s) if s.shared_pieces == "own" else labels


METHODS: dict[str, Callable[[GroupingInput, GroupingSettings], np.ndarray]] = {
    "spectral": spectral,
    "louvain": louvain,
    "leiden": leiden,
    "mdl": mdl,
    "threshold": threshold,
}
