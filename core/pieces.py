"""Rank-1 pieces of the decomposed matrices, as pure tensors.

Piece c of a matrix W (the parameter's shape, d_out x d_in) is
``outer(U[c], V[c])``. Nothing here builds a (C, d_out, d_in) tensor: every
product goes through U and V.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import torch
from torch import Tensor

if TYPE_CHECKING:
    import numpy as np

Pieces = Mapping[str, tuple[Tensor, Tensor]]  # matrix -> (U (C, d_out), V (C, d_in))


def pieces_sum(U: Tensor, V: Tensor) -> Tensor:
    """sum_c outer(U[c], V[c]) = U^T V."""
    return U.T @ V


def piece_norms(U: Tensor, V: Tensor) -> Tensor:
    """The one singular value of each rank-1 piece: |U[c]| |V[c]|."""
    return U.norm(dim=1) * V.norm(dim=1)


def unit_rows(V: Tensor) -> Tensor:
    return V / V.norm(dim=1, keepdim=True).clamp_min(1e-12)


def init_random(weight: Tensor, n_pieces: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Small random U, unit-norm random V (the scale lives in U)."""
    d_out, d_in = weight.shape
    scale = float(weight.norm()) / (n_pieces * max(d_out, d_in)) ** 0.5
    U = torch.randn(n_pieces, d_out, generator=gen, dtype=weight.dtype) * scale
    V = torch.randn(n_pieces, d_in, generator=gen, dtype=weight.dtype)
    return U, unit_rows(V)


def init_from_data(weight: Tensor, acts: Tensor, n_pieces: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """V rows: diverse directions of the matrix's input activations, picked by
    k-means++ seeding; U: a ridge least-squares fit of W by those directions,
    so the pieces start near faithful and never huge. A rank-1 piece does not
    care about the sign of v, so each direction is first flipped to make its
    largest coordinate positive (v and -v become one candidate)."""
    from sklearn.cluster import kmeans_plusplus

    live = acts[acts.norm(dim=1) > 1e-6]
    if live.shape[0] == 0:
        return init_random(weight, n_pieces, gen)
    live = live / live.norm(dim=1, keepdim=True)
    lead = live.gather(1, live.abs().argmax(dim=1, keepdim=True))
    candidates = (live * lead.sign()).double().numpy()
    n_distinct = min(n_pieces, candidates.shape[0])
    seed = int(torch.randint(2**31 - 1, (1,), generator=gen))
    centers, _ = kmeans_plusplus(candidates, n_distinct, random_state=seed)
    V = torch.from_numpy(centers).to(weight.dtype)
    if n_distinct < n_pieces:  # fewer distinct inputs than pieces: pad with random directions
        V = torch.cat([V, torch.randn(n_pieces - n_distinct, V.shape[1], generator=gen, dtype=weight.dtype)])
    V = unit_rows(V)
    gram = V @ V.T
    ridge = 1e-2 * gram.diagonal().mean() * torch.eye(n_pieces, dtype=weight.dtype)
    U = torch.linalg.solve(gram + ridge, V @ weight.T)  # (C, d_out): W ~ U^T V
    return U, V


def batch_topk_mask(scores: Tensor, k: float) -> Tensor:
    """Batch top-k: keep the floor(k * rows) largest entries of the
    (rows, C) score matrix; entries with zero score are never kept."""
    n_keep = int(k * scores.shape[0])
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if n_keep > 0:
        idx = torch.topk(scores.flatten(), min(n_keep, scores.numel())).indices
        mask.view(-1)[idx] = True
    return mask & (scores > 0)


def singleton_labels(pieces: Mapping[str, tuple[Tensor, Tensor]]) -> dict[str, "np.ndarray"]:
    """Each piece its own mechanism: labels 0..P-1 across matrices, in order."""
    import numpy as np

    offsets = np.cumsum([0] + [U.shape[0] for U, _ in pieces.values()])
    return {n: np.arange(U.shape[0]) + offsets[i] for i, (n, (U, _)) in enumerate(pieces.items())}


def membership_matrices(labels: Mapping[str, "np.ndarray"], n_groups: int) -> dict[str, Tensor]:
    """Per matrix, a (C, n_groups) 0/1 matrix: piece c belongs to mechanism g
    (label -1: to none)."""
    out = {}
    for name, lab in labels.items():
        lab = torch.as_tensor(lab, dtype=torch.long)
        m = torch.zeros(len(lab), n_groups)
        rows = torch.nonzero(lab >= 0).flatten()
        m[rows, lab[rows]] = 1.0
        out[name] = m
    return out
