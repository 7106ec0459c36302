"""Gradient attributions of rank-1 pieces, taken at the target's parameters.

Definition (the reference): for piece c of matrix l and input x,

    A_c(x) = sqrt( mean_o ( sum_{ij} dF_o(x)/dW_{l,ij} * P_{c,ij} )^2 )

computed by ``reference_attributions`` with one backward pass per output
dimension o. For a rank-1 piece u v^T used as h = W a, the inner sum factors
into (dF_o/dh . u)(v . a): ``attributions`` needs only each use's input
activations and the output Jacobian with respect to that use's output, which
it gets in one vectorised vector-Jacobian product. A tied matrix used twice
(TMS: W and W^T) contributes one term per use, summed before squaring.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from stages.pieces import Factors
from targets.base import DenseOp, Forward, TargetModel


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


def _tapped_run(model: TargetModel, x: Tensor, weights: Mapping[str, Tensor], deltas):
    uses: list = []
    ops = {}
    for name, w in weights.items():
        ops[name] = _Tap(name, w, uses, deltas)
    return model.run(x, ops), uses


@torch.no_grad()
def attributions(model: TargetModel, x: Tensor, factors: Factors) -> tuple[dict[str, Tensor], Forward]:
    """Fast exact attributions: ({name: (batch, C)}, the target's forward pass)."""
    weights = {n: w.detach() for n, w in model.decomposed_weights().items()}
    # First pass: the target's output and every use's input activation.
    fwd, uses = _tapped_run(model, x, weights, None)
    n_out = fwd.output.shape[-1]
    zeros = tuple(
        torch.zeros(x.shape[0], (weights[n].shape[1] if t else weights[n].shape[0]), dtype=x.dtype, device=x.device)
        for n, _, t in uses
    )

    def outputs(*deltas):
        return _tapped_run(model, x, weights, deltas)[0].output

    with torch.enable_grad():
        _, vjp_fn = torch.func.vjp(outputs, *zeros)
        basis = torch.eye(n_out, dtype=x.dtype, device=x.device)
        cotangents = basis[:, None, :].expand(n_out, x.shape[0], n_out)
        jacobians = torch.func.vmap(vjp_fn)(cotangents)  # per use: (n_out, batch, d_use_out)

    contrib: dict[str, Tensor] = {}
    for (name, a, transposed), jac in zip(uses, jacobians):
        U, V = factors[name]
        out_side, in_side = (V, U) if transposed else (U, V)
        term = (jac @ out_side.T) * (a @ in_side.T)  # (n_out, batch, C)
        contrib[name] = term if name not in contrib else contrib[name] + term
    scores = {name: term.square().mean(dim=0).sqrt() for name, term in contrib.items()}
    return scores, fwd


def reference_attributions(model: TargetModel, x: Tensor, factors: Factors) -> dict[str, Tensor]:
    """The definition, computed slowly: per output dimension, per-sample
    gradients of F_o with respect to each decomposed matrix, contracted with
    every piece. Kept as the reference the fast path is tested against."""
    weights = {n: w.detach() for n, w in model.decomposed_weights().items()}
    names = list(weights)
    n_out = model(x[:1]).shape[-1]

    def f_o(ws: dict, xb: Tensor, o: int) -> Tensor:
        return model.run(xb[None], {n: DenseOp(w) for n, w in ws.items()}).output[0, o]

    sums = {n: torch.zeros(x.shape[0], factors[n][0].shape[0], dtype=x.dtype) for n in names}
    for o in range(n_out):
        grads = torch.func.vmap(torch.func.grad(f_o), in_dims=(None, 0, None))(weights, x, o)
        for n in names:
            U, V = factors[n]
            # sum_ij g_ij U_ci V_cj, one piece at a time: no (C, d_out, d_in) tensor.
            dots = torch.einsum("bij,cj->bci", grads[n], V)
            sums[n] += (dots * U[None]).sum(-1).square()
    return {n: (s / n_out).sqrt() for n, s in sums.items()}
