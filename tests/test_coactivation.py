import dask.array as da
import numpy as np
import pytest
from scipy import sparse

from apdkit.stages.group.coactivation import (PieceIndex, alive_pieces, coactivation_dask, coactivation_numpy,
                                 group_activity_counts, jaccard, twin_components)


MASK = np.array([
    [1, 1, 0, 0],
    [1, 1, 0, 0],
    [1, 0, 1, 0],
    [0, 0, 1, 0],
    [1, 1, 1, 0],
], dtype=bool)


def test_exact_counts_on_hand_made_mask():
    # chunks of 2 rows: the dask path must sum partial products exactly
    stats = coactivation_dask(da.from_array(MASK, chunks=(2, 4)))
    assert stats.n_samples == 5
    assert stats.counts.tolist() == [4, 3, 3, 0]
    assert stats.co.toarray().tolist() == [
        [4, 3, 2, 0],
        [3, 3, 1, 0],
        [2, 1, 3, 0],
        [0, 0, 0, 0],
    ]
    ref = coactivation_numpy(MASK)
    assert np.array_equal(ref.co.toarray(), stats.co.toarray()) and np.array_equal(ref.counts, stats.counts)
    assert stats.co.nnz == 9  # piece 3 never fires: its row and column cost nothing


def test_jaccard_alive_and_merge():
    stats = coactivation_numpy(MASK)
    c, co = stats.counts, stats.co.toarray()
    assert jaccard(co[0, 1], c[0], c[1]) == pytest.approx(3 / 4)  # both on rows 0,1,4; either on rows 0,1,2,4
    assert jaccard(co[0, 2], c[0], c[2]) == pytest.approx(2 / 5)
    assert jaccard(co[3, 3], c[3], c[3]) == 0.0
    assert alive_pieces(stats, 0.0).tolist() == [True, True, True, False]
    assert alive_pieces(stats, 0.7).tolist() == [True, False, False, False]
    both = stats.merge(stats)
    assert both.n_samples == 10 and both.co[0, 1] == 6


def test_group_activity_counts():
    labels = np.array([0, 0, 1, -1])
    counts = group_activity_counts(da.from_array(MASK, chunks=(2, 4)), labels, 2)
    assert counts.tolist() == [4, 3]  # group 0 = pieces {0,1}: rows 0,1,2,4


def test_piece_index_round_trip():
    index = PieceIndex.from_sizes({"b": 2, "a": 3})
    assert index.names == ("a", "b") and index.total == 5
    assert index.matrix_of().tolist() == [0, 0, 0, 1, 1]
    parts = index.split(np.arange(5))
    assert parts["a"].tolist() == [0, 1, 2] and parts["b"].tolist() == [3, 4]


def test_sample_masks_reads_the_chosen_rows_and_columns_chunk_by_chunk():
    from apdkit.stages.group.coactivation import sample_masks

    dense = np.random.default_rng(0).random((10, 5)) < 0.4
    masks = da.from_array(dense, chunks=(3, 5))
    got = sample_masks(masks, [1, 4, 5, 9], np.array([0, 2, 4]))
    assert got.format == "csc"
    assert np.array_equal(got.toarray().astype(bool), dense[[1, 4, 5, 9]][:, [0, 2, 4]])
    assert sample_masks(masks, [], np.array([0, 1])).shape == (0, 2)


def test_twin_components_link_pieces_that_fire_together_transitively():
    # counts 10, 10, 11, 20, 4; pairs: 0-1 Jaccard 9/11, 1-2 10/11, 3-4 4/20 (Jaccard of a piece with itself: 1)
    counts = np.array([10, 10, 11, 20, 4])
    co = np.diag(counts).astype(float)
    for p, q, c in [(0, 1, 9), (1, 2, 10), (3, 4, 4)]:
        co[p, q] = co[q, p] = c
    labels = twin_components(sparse.csr_array(co), counts, 0.9)
    assert labels[1] == labels[2] and len({labels[0], labels[1], labels[3], labels[4]}) == 4
    labels = twin_components(sparse.csr_array(co), counts, 0.8)  # 9/11 = 0.82: 0-1-2 one class
    assert labels[0] == labels[1] == labels[2] and len(set(labels.tolist())) == 3
