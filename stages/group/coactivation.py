"""Co-activation statistics of rank-1 pieces over many rows (inputs or positions).

The pieces of all decomposed matrices are laid side by side in one index
space (the "piece index": matrices in sorted name order, pieces in order).
Statistics are exact integer counts, computed chunk by chunk with dask so
the (n_samples x n_pieces) masks never need to fit in memory:

- ``counts[p]``: inputs on which piece p is active;
- ``co[p, q]``: inputs on which p and q are both active (``co[p, p] = counts[p]``);
- ``weighted[p, q]``: sum over inputs of attribution(p) * attribution(q) where
  both are active.

``coactivation_numpy`` is the plain in-memory computation, the reference the
dask path is tested and benchmarked against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import dask.array as da
import numpy as np


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
    n_samples: int
    counts: np.ndarray  # (P,) int64
    co: np.ndarray  # (P, P) int64
    weighted: np.ndarray  # (P, P) float64

    def merge(self, other: "CoactivationStats") -> "CoactivationStats":
        """Statistics of two disjoint sample sets (e.g. from two processes)."""
        return CoactivationStats(self.n_samples + other.n_samples, self.counts + other.counts,
                                 self.co + other.co, self.weighted + other.weighted)


def _block_stats(m: np.ndarray, s: np.ndarray) -> np.ndarray:
    """(1, 3, P, P) partial sums of one row chunk: counts on the diagonal of
    the first, co-activation, weighted co-activation. The 0/1 products run
    as float32 BLAS: exact, since a chunk's sums stay far below 2**24."""
    mf = m.astype(np.float32)
    w = np.where(m, s, 0).astype(np.float32)
    out = np.empty((1, 2, m.shape[1], m.shape[1]), dtype=np.float64)
    out[0, 0] = mf.T @ mf
    out[0, 1] = w.T @ w
    return out


MAX_CHUNK_ROWS = 1 << 20  # keeps per-chunk float32 sums exact (< 2**24)


def coactivation_dask(masks: da.Array, scores: da.Array, scheduler=None) -> CoactivationStats:
    """Exact statistics over chunked (n, P) masks and scores, in memory
    bounded by a few chunks and (P, P) partial sums."""
    P = masks.shape[1]
    masks = masks.rechunk({0: min(masks.chunksize[0], MAX_CHUNK_ROWS), 1: -1})
    scores = scores.rechunk(masks.chunks)
    parts = da.map_blocks(_block_stats, masks, scores, dtype=np.float64, new_axis=[2, 3],
                          chunks=((1,) * masks.numblocks[0], (2,), (P,), (P,)))
    total = parts.sum(axis=0).compute(scheduler=scheduler)
    co = np.rint(total[0]).astype(np.int64)
    return CoactivationStats(int(masks.shape[0]), co.diagonal().copy(), co, total[1])


def coactivation_numpy(masks: np.ndarray, scores: np.ndarray) -> CoactivationStats:
    """All rows at once, in float64 (exact for counts below 2**53)."""
    m = masks.astype(np.float64)
    w = np.where(masks, scores.astype(np.float64), 0.0)
    co = np.rint(m.T @ m).astype(np.int64)
    return CoactivationStats(masks.shape[0], co.diagonal().copy(), co, w.T @ w)


def group_activity_counts(masks: da.Array, labels: np.ndarray, n_groups: int, scheduler=None) -> np.ndarray:
    """For each group g, on how many inputs at least one member is active:
    the s_g of the description length. Exact, chunked."""
    member = np.zeros((labels.shape[0], n_groups), dtype=np.float32)
    alive = labels >= 0
    member[np.flatnonzero(alive), labels[alive]] = 1
    any_active = (masks.astype(np.float32) @ member) > 0
    return np.asarray(any_active.sum(axis=0).compute(scheduler=scheduler)).astype(np.int64)


def jaccard(stats: CoactivationStats) -> np.ndarray:
    """|p and q| / |p or q|: the default affinity (0 where neither fires)."""
    union = stats.counts[:, None] + stats.counts[None, :] - stats.co
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(union > 0, stats.co / np.maximum(union, 1), 0.0)
    return out


def alive_pieces(stats: CoactivationStats, min_rate: float) -> np.ndarray:
    """Pieces active on more than ``min_rate`` of the inputs (and at least once)."""
    return (stats.counts > 0) & (stats.counts >= min_rate * stats.n_samples)


def sample_rows(n: int, limit: int, seed: int) -> Sequence[int]:
    """A sorted, reproducible subset of at most ``limit`` row indices."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))
