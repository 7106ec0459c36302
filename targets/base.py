"""What every target network looks like from outside.

A target's forward pass is written against *linear operators* instead of raw
weight matrices: ``ops[name](a)`` applies the weight ``name`` (``a @ W.T``) and
``ops[name].t(h)`` applies its transpose (``h @ W``, for tied weights). The same
code then runs with the target's own dense weights, with a sum of masked rank-1
pieces (the top-k forward), or with taps that record activations for
attributions, without ever building a full copy of a matrix per piece.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping, Protocol

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from targets.jacobians import Site


class LinearOp(Protocol):
    def __call__(self, a: Tensor) -> Tensor:
        """``a @ W.T``: map a (batch, d_in) input to (batch, d_out)."""

    def t(self, h: Tensor) -> Tensor:
        """``h @ W``: apply the transpose, (batch, d_out) -> (batch, d_in)."""


class DenseOp:
    """A plain weight matrix."""

    def __init__(self, weight: Tensor):
        self.weight = weight

    def __call__(self, a: Tensor) -> Tensor:
        return a @ self.weight.T

    def t(self, h: Tensor) -> Tensor:
        return h @ self.weight


@dataclass(frozen=True)
class Forward:
    """A forward pass: the output and the hidden activations used by the
    hidden-activation reconstruction loss (empty where the target has none)."""

    output: Tensor
    hidden: dict[str, Tensor] = field(default_factory=dict)


class TargetModel(nn.Module):
    """Base class of the built-in targets.

    Subclasses set ``decomposed`` (names in ``named_parameters()`` of the
    matrices that are split into pieces) and implement ``run``. Parameters not
    listed (biases) and buffers (frozen embeddings) are always on.
    """

    decomposed: tuple[str, ...] = ()
    # Ground truth: matrices whose pieces together form the one mechanism that
    # every input uses (the TMS hidden identity).
    shared: tuple[str, ...] = ()

    def run(self, x: Tensor, ops: Mapping[str, LinearOp]) -> Forward:
        raise NotImplementedError

    def feature_mechanisms(self) -> list[int]:
        """Ground truth: the mechanism each input feature belongs to (one per
        feature unless features are tied together)."""
        return list(range(self.n_features))

    def decomposed_weights(self) -> dict[str, Tensor]:
        params = dict(self.named_parameters())
        return {name: params[name] for name in self.decomposed}

    def dense_ops(self) -> dict[str, DenseOp]:
        return {name: DenseOp(w) for name, w in self.decomposed_weights().items()}

    def forward(self, x: Tensor) -> Tensor:
        return self.run(x, self.dense_ops()).output

    def attribution_sites(self, x: Tensor) -> tuple[Forward, list["Site"]]:
        """Every use of a decomposed matrix on ``x`` with its output Jacobian
        (see targets/jacobians.py). Override with a closed form for speed; the
        tests hold every target to the reference definition."""
        from targets.jacobians import autodiff_sites

        return autodiff_sites(self, x)


@dataclass(frozen=True)
class TargetSpec:
    """Everything the pipeline needs to know about one built-in target.

    ``arch`` holds the constructor arguments (JSON-able), so a stored spec is
    enough to rebuild the module; ``train`` the target-training recipe.
    """

    name: str
    family: str
    arch: dict
    train: dict
    build: Callable[..., TargetModel]
    sample: Callable[[TargetModel, int, torch.Generator], Tensor]
    fit: Callable[[TargetModel, dict, torch.Generator, Callable[[int, float], None] | None], float]
    check: Callable[[TargetModel, torch.Generator], "HealthReport"]

    def make(self) -> TargetModel:
        return self.build(**self.arch)


@dataclass(frozen=True)
class HealthReport:
    healthy: bool
    summary: str
    figures: dict[str, float]
