"""Where a decomposed matrix is used in a forward pass, and the output's
Jacobian with respect to that use's output: what rank-1 attributions need.

A ``Site`` is one use of a matrix: its input activations ``a`` (batch, d_in of
the use), whether the use applies the transpose (tied weights), and
``contract(P)``: the Jacobian dF/dh (n_out, batch, d_out of the use)
contracted with the rows of P (C, d_out of the use), giving (n_out, batch, C).
Exposing the contraction instead of the Jacobian lets a target with structure
(resid_mlp: frozen linear read-out) skip building per-sample Jacobians.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping

import torch
from torch import Tensor

if TYPE_CHECKING:
    from targets.base import Forward, TargetModel


@dataclass(frozen=True)
class Site:
    name: str
    a: Tensor
    transposed: bool
    contract: Callable[[Tensor], Tensor]


class _Tap:
    """A dense op that records its inputs and adds a zero 'delta' to its
    output, so the Jacobian with respect to that output can be taken."""

    def __init__(self, name: str, weight: Tensor, uses: list, deltas: tuple[Tensor, ...] | None):
        self.name, self.weight, self.uses, self.deltas = name, weight, uses, deltas

    def _out(self, value: Tensor, a: Tensor, transposed: bool) -> Tensor:
        i = len(self.uses)
        self.uses.append((self.name, a, transposed))
        return value if self.deltas is None else value + self.deltas[i]

    def __call__(self, a: Tensor) -> Tensor:
        return self._out(a @ self.weight.T, a, False)

    def t(self, h: Tensor) -> Tensor:
        return self._out(h @ self.weight, h, True)


def tapped_run(model: "TargetModel", x: Tensor, weights: Mapping[str, Tensor], deltas=None):
    """Forward pass that records every use of a decomposed matrix:
    (Forward, [(name, input activation, transposed), ...])."""
    uses: list = []
    ops = {name: _Tap(name, w, uses, deltas) for name, w in weights.items()}
    return model.run(x, ops), uses


def autodiff_sites(model: "TargetModel", x: Tensor) -> tuple["Forward", list[Site]]:
    """Any target: Jacobians by one vectorised vector-Jacobian product over
    the output dimensions."""
    weights = {n: w.detach() for n, w in model.decomposed_weights().items()}
    fwd, uses = tapped_run(model, x, weights)
    n_out = fwd.output.shape[-1]
    zeros = tuple(
        torch.zeros(x.shape[0], weights[n].shape[1] if t else weights[n].shape[0], dtype=x.dtype, device=x.device)
        for n, _, t in uses
    )

    def outputs(*deltas):
        return tapped_run(model, x, weights, deltas)[0].output

    with torch.enable_grad():
        _, vjp_fn = torch.func.vjp(outputs, *zeros)
        basis = torch.eye(n_out, dtype=x.dtype, device=x.device)
        jacobians = torch.func.vmap(vjp_fn)(basis[:, None, :].expand(n_out, x.shape[0], n_out))
    sites = [
        Site(name, a, transposed, lambda P, jac=jac: jac @ P.T)
        for (name, a, transposed), jac in zip(uses, jacobians)
    ]
    return fwd, sites
