import torch

from apdkit.core.model import apply_pieces
from apdkit.core.pieces import batch_topk_mask, init_from_data, piece_norms, pieces_sum


def test_batch_topk_keeps_largest_entries_over_whole_batch():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.5, 0.6, 0.2], [0.0, 0.0, 0.0], [0.3, 0.8, 0.7]])
    mask = batch_topk_mask(scores, k=1.0)  # floor(1.0 * 4) = 4 entries in all
    expected = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 0], [0, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)
    # the per-sample count varies: batch top-k, not per-sample top-k
    assert mask.sum(1).tolist() == [1, 1, 0, 2]


def test_batch_topk_never_keeps_zero_scores():
    scores = torch.tensor([[0.0, 0.0], [0.0, 0.3]])
    assert batch_topk_mask(scores, k=2.0).sum() == 1


def test_masked_pieces_equal_dense_sum_of_active_pieces_for_every_layer_kind():
    gen = torch.Generator().manual_seed(0)
    U, V = torch.randn(5, 3, generator=gen), torch.randn(5, 4, generator=gen)
    mask = torch.tensor([[1.0, 0, 1, 0, 0], [0, 1, 1, 1, 0]])
    a = torch.randn(2, 4, generator=gen)
    h = torch.randn(2, 3, generator=gen)
    idx = torch.tensor([2, 0])
    for b in range(2):
        W_b = sum(mask[b, c] * torch.outer(U[c], V[c]) for c in range(5))  # (3, 4), the parameter's shape
        assert torch.allclose(apply_pieces("linear", a, U, V, mask)[b], W_b @ a[b], atol=1e-6)
        assert torch.allclose(apply_pieces("conv1d", h, U, V, mask)[b], h[b] @ W_b, atol=1e-6)
        assert torch.allclose(apply_pieces("embedding", idx, U, V, mask)[b], W_b[idx[b]], atol=1e-6)
    assert torch.allclose(pieces_sum(U, V), sum(torch.outer(U[c], V[c]) for c in range(5)), atol=1e-6)
    assert torch.allclose(piece_norms(U, V), torch.stack([torch.linalg.matrix_norm(torch.outer(U[c], V[c]), 2) for c in range(5)]), atol=1e-5)


def test_data_init_covers_every_input_direction():
    """One-hot activations of 4 features, 4 pieces: k-means++ picks each
    direction once, and the ridge fit reproduces W up to the ridge shrinkage."""
    gen = torch.Generator().manual_seed(0)
    acts = torch.eye(4).repeat(50, 1) * torch.rand(200, 1, generator=gen)
    W = torch.randn(3, 4, generator=gen)
    U, V = init_from_data(W, acts, 4, gen)
    assert torch.allclose(V.abs().sum(0), torch.ones(4))  # one piece per direction
    assert torch.allclose(U.T @ V, W / 1.01, atol=1e-5)
