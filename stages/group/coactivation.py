"""Co-activation statistics of rank-1 pieces over many rows (inputs or positions).

The pieces of all decomposed matrices are laid side by side in one index
space (the "piece index": matrices in sorted name order, pieces in order).
Statistics are exact integer counts, computed chunk by chunk with dask so
the (n_samples x n_pieces) masks never need to fit in memory, and kept as
sparse matrices so pairs that never fire together cost nothing:

- ``counts[p]``: inputs on which piece p is active;
- ``co[p, q]``: inputs on which p and q are both active (``co[p, p] = counts[p]``).

``coactivation_numpy`` is the plain in-memory computation, the reference the
dask path is tested and benchmarked against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import dask
import dask.array as da
import numpy as np
from dask import delayed
from scipy import sparse
from scipy.sparse.csgraph import connected_components


@dataclass(frozen=True)
class PieceIndex:
    """Which (matrix, piece) each column of the side-by-side layout is."""

    names: tuple[str, ...]
    sizes: tuple[int, ...]

    @classmethod
    def from_sizes(cls, sizes: Mapping[str, int]) -> "PieceIndex":
        names = tuple(sorted(sizes))
        return cls(names, tuple(int(sizes[n]) for n in names))

    @property
    def total(self) -> int:
        return sum(self.sizes)

    def offsets(self) -> dict[str, int]:
        out, start = {}, 0
        for n, s in zip(self.names, self.sizes):
            out[n] = start
            start += s
        return out

    def matrix_of(self) -> np.ndarray:
        """For each column, the position of its matrix in ``names``."""
        return np.repeat(np.arange(len(self.names)), self.sizes)

    def split(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """A per-column vector back to {matrix: per-piece vector}."""
        off = self.offsets()
        return {n: flat[off[n]:off[n] + s] for n, s in zip(self.names, self.sizes)}


@dataclass(frozen=True)
class CoactivationStats:
    """Sparse: only pairs that were ever active together are stored."""

    n_samples: int
    counts: np.ndarray  # (P,) int64
    co: sparse.csr_array  # (P, P) int32 (a count never exceeds the number of inputs)

    def merge(self, other: "CoactivationStats") -> "CoactivationStats":
        """Statistics of two disjoint sample sets (e.g. from two processes)."""
        return CoactivationStats(self.n_samples + other.n_samples, self.counts + other.counts,
                                 (self.co + other.co).tocsr())

    def restrict(self, keep: np.ndarray) -> "CoactivationStats":
        """The statistics of the pieces ``keep`` (a boolean mask or indices) only."""
        idx = np.flatnonzero(keep) if keep.dtype == bool else keep
        if len(idx) == len(self.counts) and np.array_equal(idx, np.arange(len(idx))):
            return self  # no copy of a large matrix when every piece is kept
        return CoactivationStats(self.n_samples, self.counts[idx], self.co[idx][:, idx].tocsr())


def _chunk_co(m: np.ndarray) -> sparse.csr_array:
    """Co-activation counts of one row chunk: the sparse product of its
    sparse mask with itself, so the cost follows the active pairs per row."""
    rows = sparse.csr_array(np.asarray(m, dtype=bool)).astype(np.int32)
    return (rows.T @ rows).tocsr()


FOLD_BATCH = 4  # row chunks computed at once (in parallel) before they are added to the running sums


def coactivation_dask(masks: da.Array, scheduler=None) -> CoactivationStats:
    """Exact statistics over chunked (n, P) masks, on any dask scheduler.
    Chunks are computed FOLD_BATCH at a time and added to one running sparse
    sum, so memory is that sum and a few chunks' partial sums."""
    P = masks.shape[1]
    blocks = masks.rechunk({1: -1}).to_delayed().ravel()
    co = sparse.csr_array((P, P), dtype=np.int32)
    for i in range(0, len(blocks), FOLD_BATCH):
        parts = dask.compute(*[delayed(_chunk_co)(b) for b in blocks[i:i + FOLD_BATCH]], scheduler=scheduler)
        co = (co + sum(parts[1:], parts[0])).tocsr()  # the small sums first: one full-size temporary per batch
        del parts
    return CoactivationStats(int(masks.shape[0]), co.diagonal().astype(np.int64), co)


def coactivation_numpy(masks: np.ndarray) -> CoactivationStats:
    """All rows at once (the reference the chunked path is tested against)."""
    co = _chunk_co(masks)
    return CoactivationStats(masks.shape[0], co.diagonal().astype(np.int64), co)


def _chunk_group_counts(m: np.ndarray, member: sparse.csr_array) -> np.ndarray:
    any_member = (sparse.csr_array(np.asarray(m, dtype=bool)).astype(np.int32) @ member).tocsr()
    any_member.eliminate_zeros()
    return np.bincount(any_member.indices, minlength=member.shape[1])[None, :]


def group_activity_counts(masks: da.Array, labels: np.ndarray, n_groups: int, scheduler=None) -> np.ndarray:
    """For each group g, on how many inputs at least one member is active:
    the s_g of the description length. Exact, chunked, sparse."""
    alive = np.flatnonzero(labels >= 0)
    member = sparse.csr_array((np.ones(len(alive), dtype=np.int32), (alive, labels[alive])),
                              shape=(labels.shape[0], n_groups))
    masks = masks.rechunk({1: -1})
    parts = masks.map_blocks(_chunk_group_counts, member, dtype=np.int64, chunks=((1,) * masks.numblocks[0], (n_groups,)))
    return np.asarray(parts.sum(axis=0).compute(scheduler=scheduler)).astype(np.int64)


def jaccard(co: np.ndarray, count_p: np.ndarray, count_q: np.ndarray) -> np.ndarray:
    """|p and q| / |p or q| of pairs given by their co-activation and counts."""
    return co / np.maximum(count_p + count_q - co, 1)


def twin_components(co: sparse.sparray, counts: np.ndarray, together: float) -> np.ndarray:
    """(P,) component of each piece when pieces whose Jaccard co-activation
    is at least ``together`` (pieces that (almost) always fire together) are
    linked, transitively. ``co``: (P, P) co-activation counts; ``counts``:
    (P,) activation counts."""
    pairs = sparse.coo_array(co)
    keep = jaccard(pairs.data.astype(np.float64), counts[pairs.row], counts[pairs.col]) >= together
    linked = sparse.csr_array((np.ones(int(keep.sum())), (pairs.row[keep], pairs.col[keep])), shape=co.shape)
    return connected_components(linked, directed=False)[1]


def alive_pieces(stats: CoactivationStats, min_rate: float) -> np.ndarray:
    """Pieces active on more than ``min_rate`` of the inputs (and at least once)."""
    return (stats.counts > 0) & (stats.counts >= min_rate * stats.n_samples)


def sample_rows(n: int, limit: int, seed: int) -> Sequence[int]:
    """A sorted, reproducible subset of at most ``limit`` row indices."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def sample_masks(masks: da.Array, rows: Sequence[int], columns: np.ndarray, scheduler=None) -> sparse.csc_array:
    """(len(rows), len(columns)) the masks of the given (sorted) rows and
    columns as a sparse column matrix, read one stored chunk of rows at a
    time: each chunk is read once, and no dense sample is ever held."""
    rows = np.asarray(rows)
    bounds = np.cumsum((0,) + masks.chunks[0])
    blocks = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        picked = rows[(rows >= start) & (rows < stop)] - start
        if len(picked):
            chunk = np.asarray(masks[start:stop].compute(scheduler=scheduler))
            blocks.append(sparse.csr_array(chunk[picked][:, columns], dtype=np.int8))
    if not blocks:
        return sparse.csc_array((0, len(columns)), dtype=np.int8)
    return sparse.vstack(blocks, format="csc")
