"""Rank-1 subcomponents of the decomposed matrices, as pure tensors.

Piece c of a matrix W (d_out x d_in) is ``outer(U[c], V[c])``. Nothing here
builds a (C, d_out, d_in) tensor: every product goes through the factors.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

Factors = Mapping[str, tuple[Tensor, Tensor]]  # name -> (U (C, d_out), V (C, d_in))


class MaskedPiecesOp:
    """The sum of the pieces that ``mask`` keeps on, per sample:
    W_b = sum_c mask[b, c] * outer(U[c], V[c]). ``mask`` may be float (a
    0/1 mask) or None for all pieces on."""

    def __init__(self, U: Tensor, V: Tensor, mask: Tensor | None):
        self.U, self.V, self.mask = U, V, mask

    def __call__(self, a: Tensor) -> Tensor:
        inner = a @ self.V.T
        return (inner if self.mask is None else inner * self.mask) @ self.U

    def t(self, h: Tensor) -> Tensor:
        inner = h @ self.U.T
        return (inner if self.mask is None else inner * self.mask) @ self.V


def pieces_sum(U: Tensor, V: Tensor) -> Tensor:
    """sum_c outer(U[c], V[c]) = U^T V."""
    return U.T @ V


def piece_norms(U: Tensor, V: Tensor) -> Tensor:
    """The one singular value of each rank-1 piece: |U[c]| |V[c]|."""
    return U.norm(dim=1) * V.norm(dim=1)


def init_factors(weight: Tensor, n_pieces: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Small random U, unit-norm random V (the scale lives in U)."""
    d_out, d_in = weight.shape
    scale = float(weight.norm()) / (n_pieces * max(d_out, d_in)) ** 0.5
    U = torch.randn(n_pieces, d_out, generator=gen) * scale
    V = torch.randn(n_pieces, d_in, generator=gen)
    return U, V / V.norm(dim=1, keepdim=True)


def batch_topk_mask(scores: Tensor, k: float) -> Tensor:
    """Batch top-k: keep the floor(k * batch) largest entries of the
    (batch, C) score matrix; entries with zero score are never kept."""
    n_keep = int(k * scores.shape[0])
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if n_keep > 0:
        idx = torch.topk(scores.flatten(), min(n_keep, scores.numel())).indices
        mask.view(-1)[idx] = True
    return mask & (scores > 0)
