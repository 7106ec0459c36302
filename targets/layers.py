"""Layers the built-in targets share."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Conv1D(nn.Module):
    """GPT-2-style transposed linear layer: out = a @ weight + bias, weight
    (d_in, d_out). Used to apply a tied matrix through its transpose (TMS:
    the read-out shares W's parameter); apd treats it like transformers' Conv1D."""

    def __init__(self, weight: nn.Parameter, bias: bool = True):
        super().__init__()
        self.nf = weight.shape[1]
        self.weight = weight
        self.bias = nn.Parameter(torch.zeros(self.nf)) if bias else None

    def forward(self, a: Tensor) -> Tensor:
        out = a @ self.weight
        return out if self.bias is None else out + self.bias
