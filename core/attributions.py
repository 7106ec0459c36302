"""Gradient attributions of rank-1 pieces, taken at the target's parameters.

Definition (the reference): for piece c of matrix l and sample row n,

    A_c(n)^2 = mean_o ( sum_{ij} dF_o / dW_{l,ij}(n) * P_{c,ij} )^2

where W_l(n) is the copy of W_l used on row n (for sequences: at that
position) and o runs over every output of the row's input (for sequences:
every position's outputs, so a piece at one position is credited with its
effect on later ones). ``reference_attributions`` computes exactly this with
per-row weight copies and one backward pass per output.

The sum over ij is the derivative of F_o with respect to a scale eps_c(n) of
the piece added on row n, so the generic path (``attributions``) runs the
model once with every piece added at eps = 0 and takes vector-Jacobian
products with respect to eps: one per output dimension (exact), or, above
``max_exact_outputs``, K random +-1 probes r: E[(r . dF/deps)^2] = sum_o
(dF_o/deps)^2, an unbiased estimate of the squared attribution. A tied
matrix used twice contributes one term per use, summed before squaring,
because both uses share eps.

Built-in toys may also supply closed-form output Jacobians (``Site``s):
attributions then come from each use's input activations and the Jacobian
with respect to its output, with no backward pass (tested against both).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Mapping

import torch
from torch import Tensor

from apdkit.core.model import DecomposedModel, Forward, use_inner, use_out_side
from apdkit.core.pieces import Pieces

PROBE_CHUNK = 64  # vector-Jacobian products batched together


def no_timer(section: str) -> ContextManager:
    return nullcontext()


@dataclass(frozen=True)
class Site:
    """One use of a matrix with a closed-form output Jacobian: its input rows
    ``a``, its kind, and ``contract(P)``: dF/dh (n_out, rows or 1, d_out of the
    use) contracted with the rows of P (C, d_out of the use) -> (n_out, rows, C)."""

    name: str
    kind: str
    a: Tensor
    contract: Callable[[Tensor], Tensor]


def _eps_grads(model: DecomposedModel, x: Tensor, pieces: Pieces, units: Mapping[str, Tensor] | None,
               n_units: int | None, max_exact_outputs: int, probes: int,
               gen: torch.Generator | None) -> tuple[dict[str, Tensor] | Tensor, Forward]:
    """Mean over outputs of (dF_o/deps)^2 per row and unit. Units are the
    pieces (``units`` None: one eps per matrix and piece) or mechanisms
    (``units[name]``: (C, G) membership; one eps (rows, G) shared by matrices)."""
    with torch.no_grad():
        target = model.forward(x, hidden=True)
    rows, batch = target.output.shape[0], target.batch
    n_out = target.output.numel() // batch
    dtype, device = target.output.dtype, target.output.device  # inputs may be token ids
    names = list(pieces)
    if units is None:
        eps = [torch.zeros(rows, pieces[n][0].shape[0], dtype=dtype, device=device, requires_grad=True)
               for n in names]
        scales = lambda: dict(zip(names, eps))  # noqa: E731
    else:
        eps = [torch.zeros(rows, n_units, dtype=dtype, device=device, requires_grad=True)]
        scales = lambda: {n: eps[0] @ units[n].T for n in names}  # noqa: E731
    with torch.enable_grad():
        out = model.run_added(x, pieces, scales()).output.reshape(batch, n_out)
    exact = n_out <= max_exact_outputs
    n_probes = n_out if exact else probes
    sq = [torch.zeros_like(e) for e in eps]
    for start in range(0, n_probes, PROBE_CHUNK):
        k = min(PROBE_CHUNK, n_probes - start)
        if exact:
            basis = torch.zeros(k, 1, n_out, dtype=dtype, device=device)
            basis[torch.arange(k), 0, start + torch.arange(k)] = 1.0
            cot = basis.expand(k, batch, n_out)
        else:
            signs = torch.randint(0, 2, (k, batch, n_out), generator=gen, dtype=torch.int8)
            cot = (signs.to(dtype) * 2 - 1).to(device)
        grads = _batched_vjp(out, eps, cot)
        for s, g in zip(sq, grads):
            s += g.square().sum(0)
    sq = [s / (n_out if exact else n_probes * n_out) for s in sq]
    return (dict(zip(names, sq)) if units is None else sq[0]), target


def _batched_vjp(out: Tensor, inputs: list[Tensor], cot: Tensor) -> tuple[Tensor, ...]:
    try:
        return torch.autograd.grad(out, inputs, grad_outputs=cot, retain_graph=True, is_grads_batched=True,
                                   allow_unused=True)
    except RuntimeError:  # an op without a batching rule: one probe at a time
        per = [torch.autograd.grad(out, inputs, grad_outputs=c, retain_graph=True, allow_unused=True) for c in cot]
        return tuple(torch.stack([p[i] for p in per]) for i in range(len(inputs)))


@torch.no_grad()
def attributions(model: DecomposedModel, x: Tensor, pieces: Pieces, max_exact_outputs: int = 512,
                 probes: int = 64, gen: torch.Generator | None = None,
                 timer: Callable[[str], ContextManager] = no_timer) -> tuple[dict[str, Tensor], Forward]:
    """({matrix: (rows, C)} attributions, the target's forward pass with its
    hidden activations). Closed form when the model has one, else exact up
    to ``max_exact_outputs`` outputs per input, else ``probes`` random probes."""
    if model.fast_sites is not None:
        with timer("target forward + jacobians"):
            fwd, sites = model.fast_sites(model.module, x)
        with timer("attributions"):
            return _contract_sites(sites, pieces, fwd.output.shape[0]), fwd
    with timer("attributions (vector-Jacobian products)"):
        sq, fwd = _eps_grads(model, x, pieces, None, None, max_exact_outputs, probes, gen)
    return {n: v.sqrt() for n, v in sq.items()}, fwd


@torch.no_grad()
def mechanism_attributions(model: DecomposedModel, x: Tensor, pieces: Pieces, membership: Mapping[str, Tensor],
                           max_exact_outputs: int = 512, probes: int = 64,
                           gen: torch.Generator | None = None) -> tuple[Tensor, Forward]:
    """(rows, G) attributions of mechanisms: ``membership[name]`` is a (C, G)
    0/1 matrix. A mechanism's attribution is that of the sum of its pieces
    (across matrices): per-output terms are summed before squaring."""
    n_groups = next(iter(membership.values())).shape[1]
    if model.fast_sites is not None:
        fwd, sites = model.fast_sites(model.module, x)
        total = None
        for site in sites:
            U, V = pieces[site.name]
            term = (site.contract(use_out_side(site.kind, U, V)) * use_inner(site.kind, site.a, U, V)) @ membership[site.name]
            total = term if total is None else total + term
        return total.square().mean(dim=0).expand(fwd.output.shape[0], -1).sqrt(), fwd
    sq, fwd = _eps_grads(model, x, pieces, membership, n_groups, max_exact_outputs, probes, gen)
    return sq.sqrt(), fwd


def _contract_sites(sites: list[Site], pieces: Pieces, rows: int) -> dict[str, Tensor]:
    uses: dict[str, int] = {}
    for site in sites:
        uses[site.name] = uses.get(site.name, 0) + 1
    sq: dict[str, Tensor] = {}
    contrib: dict[str, Tensor] = {}
    for site in sites:
        U, V = pieces[site.name]
        jac_term = site.contract(use_out_side(site.kind, U, V))  # (n_out, rows or 1, C)
        inner = use_inner(site.kind, site.a, U, V)  # (rows, C)
        if uses[site.name] == 1:
            # one use: sum_o (G s)^2 = s^2 sum_o G^2, no (n_out, rows, C) product
            sq[site.name] = jac_term.square().mean(dim=0) * inner.square()
        else:
            term = jac_term * inner
            contrib[site.name] = term if site.name not in contrib else contrib[site.name] + term
    for name, term in contrib.items():
        sq[name] = term.square().mean(dim=0)
    return {name: v.expand(rows, -1).sqrt() for name, v in sq.items()}


def reference_attributions(model: DecomposedModel, x: Tensor, pieces: Pieces) -> dict[str, Tensor]:
    """The definition, computed slowly: a copy of every decomposed matrix per
    sample row, one backward pass per output, each row's weight gradient
    contracted with every piece. For tests on small models only."""
    weights = model.weights()
    with torch.no_grad():
        fwd = model.forward(x)
    rows, batch = fwd.output.shape[0], fwd.batch
    n_out = fwd.output.numel() // batch
    copies = {n: w.expand(rows, *w.shape).clone().requires_grad_(True) for n, w in weights.items()}
    with torch.enable_grad():
        out = model.run_per_row(x, copies).output.reshape(batch, n_out)
        sums = {n: torch.zeros(rows, pieces[n][0].shape[0], dtype=fwd.output.dtype) for n in weights}
        for o in range(n_out):
            grads = torch.autograd.grad(out[:, o].sum(), list(copies.values()), retain_graph=True, allow_unused=True)
            for n, g in zip(copies, grads):
                if g is None:
                    continue
                U, V = pieces[n]
                sums[n] += torch.einsum("nij,ci,cj->nc", g, U, V).square()
    return {n: (s / n_out).sqrt() for n, s in sums.items()}
