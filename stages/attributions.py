"""Gradient attributions of rank-1 pieces, taken at the target's parameters.

Definition (the reference): for piece c of matrix l and input x,

    A_c(x) = sqrt( mean_o ( sum_{ij} dF_o(x)/dW_{l,ij} * P_{c,ij} )^2 )

computed by ``reference_attributions`` with one backward pass per output
dimension o. For a rank-1 piece u v^T used as h = W a, the inner sum factors
into (dF_o/dh . u)(v . a): ``attributions`` needs only each use's input
activations and the output Jacobian with respect to that use's output, which
a target supplies as ``attribution_sites`` (closed form where its structure
allows, one vectorised vector-Jacobian product otherwise). A tied matrix used twice
(TMS: W and W^T) contributes one term per use, summed before squaring.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager, Mapping

import torch
from torch import Tensor

from stages.pieces import Factors
from targets.base import DenseOp, Forward, TargetModel


def no_timer(section: str) -> ContextManager:
    return nullcontext()


@torch.no_grad()
def attributions(model: TargetModel, x: Tensor, factors: Factors,
                 timer: Callable[[str], ContextManager] = no_timer) -> tuple[dict[str, Tensor], Forward]:
    """Fast exact attributions: ({name: (batch, C)}, the target's forward pass).
    ``timer(section)`` wraps the two phases (benchmarks pass a stopwatch)."""
    with timer("target forward + jacobians"):
        fwd, sites = model.attribution_sites(x)
    with timer("attributions"):
        return _contract(sites, factors, x.shape[0]), fwd


@torch.no_grad()
def mechanism_attributions(model: TargetModel, x: Tensor, factors: Factors,
                           membership: Mapping[str, Tensor]) -> tuple[Tensor, Forward]:
    """Attributions of mechanisms: ``membership[name]`` is a (C, G) 0/1 matrix
    saying which mechanism each piece of ``name`` belongs to. A mechanism's
    attribution is that of the sum of its pieces (across matrices), not a sum
    of their scores: the per-output terms are summed before squaring."""
    fwd, sites = model.attribution_sites(x)
    total = None
    for site in sites:
        U, V = factors[site.name]
        out_side, in_side = (V, U) if site.transposed else (U, V)
        term = (site.contract(out_side) * (site.a @ in_side.T)) @ membership[site.name]  # (n_out, batch, G)
        total = term if total is None else total + term
    return total.square().mean(dim=0).expand(x.shape[0], -1).sqrt(), fwd


def _contract(sites, factors: Factors, batch: int) -> dict[str, Tensor]:
    uses: dict[str, int] = {}
    for site in sites:
        uses[site.name] = uses.get(site.name, 0) + 1
    sq: dict[str, Tensor] = {}
    contrib: dict[str, Tensor] = {}
    for site in sites:
        U, V = factors[site.name]
        out_side, in_side = (V, U) if site.transposed else (U, V)
        jac_term = site.contract(out_side)  # (n_out, batch or 1, C)
        inner = site.a @ in_side.T  # (batch, C)
        if uses[site.name] == 1:
            # one use: sum_o (G s)^2 = s^2 sum_o G^2, no (n_out, batch, C) product
            sq[site.name] = jac_term.square().mean(dim=0) * inner.square()
        else:
            term = jac_term * inner
            contrib[site.name] = term if site.name not in contrib else contrib[site.name] + term
    for name, term in contrib.items():
        sq[name] = term.square().mean(dim=0)
    return {name: v.expand(batch, -1).sqrt() for name, v in sq.items()}


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
