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

Three methods (``method``) replace dF_o/deps_c by another per-output effect
of piece c on row n, squared and averaged over outputs the same way:

- ``gradient``: dF_o/deps_c at the target (above);
- ``integrated_gradients``: the mean of dF_o/deps_c over ``steps`` midpoints
  alpha of the path W - (1 - alpha) sum_c P_c, from every piece switched off
  (alpha = 0) to the target (alpha = 1); summed over pieces it is the output
  change from switching them all on (completeness), where the gradient is
  exact only for a model linear in its weights;
- ``ablation``: F_o(W) - F_o(W - P_c on row n only), the exact change when
  the piece is removed there; for sequences, removed at that position, its
  effect counted on every output of the sequence. Computed as replicas of
  the batch, one per (position, piece), in a few batched forward passes.

``reference_attributions`` holds each to its definition, slowly.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Mapping

import torch
from torch import Tensor

from apdkit.core.model import DecomposedModel, Forward, use_inner, use_out_side
from apdkit.core.pieces import Pieces, pieces_sum

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
               gen: torch.Generator | None, alphas: tuple[float, ...] = (1.0,)
               ) -> tuple[dict[str, Tensor] | Tensor, Forward]:
    """Mean over outputs of (dF_o/deps)^2 per row and unit, dF_o/deps averaged
    over the path points ``alphas`` first (W - (1 - alpha) sum of the units'
    pieces; (1.0,): the gradient at the target). Units are the pieces
    (``units`` None: one eps per matrix and piece) or mechanisms
    (``units[name]``: (C, G) membership; one eps (rows, G) shared by
    matrices). Every path point's graph is kept until the last probe."""
    with torch.no_grad():
        target = model.forward(x, hidden=True)
    rows, batch = target.output.shape[0], target.batch
    n_out = target.output.numel() // batch
    dtype, device = target.output.dtype, target.output.device  # inputs may be token ids
    names = list(pieces)
    if units is None:
        eps = [torch.zeros(rows, pieces[n][0].shape[0], dtype=dtype, device=device, requires_grad=True)
               for n in names]
        scales = lambda shift: {n: e + shift for n, e in zip(names, eps)}  # noqa: E731
    else:
        eps = [torch.zeros(rows, n_units, dtype=dtype, device=device, requires_grad=True)]
        scales = lambda shift: {n: (eps[0] + shift) @ units[n].T for n in names}  # noqa: E731
    with torch.enable_grad():
        outs = [model.run_added(x, pieces, scales(alpha - 1.0)).output.reshape(batch, n_out) for alpha in alphas]
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
        grads = [torch.zeros((k, *e.shape), dtype=dtype, device=device) for e in eps]
        for out in outs:
            for acc, g in zip(grads, _batched_vjp(out, eps, cot)):
                if g is not None:
                    acc += g
        for s, g in zip(sq, grads):
            s += (g / len(alphas)).square().sum(0)
    sq = [s / (n_out if exact else n_probes * n_out) for s in sq]
    return (dict(zip(names, sq)) if units is None else sq[0]), target


def _batched_vjp(out: Tensor, inputs: list[Tensor], cot: Tensor) -> tuple[Tensor, ...]:
    try:
        return torch.autograd.grad(out, inputs, grad_outputs=cot, retain_graph=True, is_grads_batched=True,
                                   allow_unused=True)
    except RuntimeError:  # an op without a batching rule: one probe at a time
        per = [torch.autograd.grad(out, inputs, grad_outputs=c, retain_graph=True, allow_unused=True) for c in cot]
        return tuple(torch.stack([p[i] for p in per]) for i in range(len(inputs)))


ATTRIBUTION_METHODS = ("gradient", "integrated_gradients", "ablation")
ABLATION_ROWS = 1 << 16  # sample rows per batched forward pass of ablation replicas


def path_points(steps: int) -> tuple[float, ...]:
    """Midpoints of ``steps`` equal intervals of [0, 1]."""
    return tuple((i + 0.5) / steps for i in range(steps))


def _ablation_sq(model: DecomposedModel, x: Tensor, pieces: Pieces, units: Mapping[str, Tensor] | None,
                 n_units: int | None) -> tuple[dict[str, Tensor] | Tensor, Forward]:
    """Mean over outputs of the squared output change when one unit (a piece
    of one matrix, or a mechanism) is removed on one sample row. Replicas of
    the batch, one per (position, unit), each remove one unit at one
    position; the pass is split so no call holds more than ABLATION_ROWS rows.
    A piece is removed by its own rank-1 term per row (O(d) a row, not O(C d))."""
    with torch.no_grad():
        target = model.forward(x, hidden=True)
    rows, batch = target.output.shape[0], target.batch
    per_input = rows // batch  # positions per input
    n_out = target.output.numel() // batch
    ref = target.output.reshape(batch, n_out)
    dtype, device = target.output.dtype, target.output.device
    names = list(pieces)
    # what is ablated: (matrix or None for mechanisms, number of units)
    groups = [(n, pieces[n][0].shape[0]) for n in names] if units is None else [(None, n_units)]
    result: dict[str | None, Tensor] = {}
    for matrix, n in groups:
        sq = torch.zeros(rows, n, dtype=dtype, device=device)
        jobs = per_input * n  # (position, unit) pairs
        per_pass = max(1, ABLATION_ROWS // rows)
        for start in range(0, jobs, per_pass):
            k = min(per_pass, jobs - start)
            job = torch.arange(start, start + k, device=device)
            pos, unit = job // n, job % n
            x_rep = x.repeat(k, *([1] * (x.dim() - 1)))
            if matrix is None:  # a mechanism: every one of its pieces, in every matrix
                eps = torch.zeros(k, batch, per_input, n, dtype=dtype, device=device)
                eps[torch.arange(k, device=device), :, pos, unit] = -1.0
                eps = eps.reshape(k * rows, n)
                out = model.run_added(x_rep, pieces, {m: eps @ units[m].T for m in names}).output
            else:
                index = torch.full((k, batch, per_input), -1, dtype=torch.long, device=device)
                index[torch.arange(k, device=device), :, pos] = unit[:, None]
                out = model.run_removed(x_rep, matrix, pieces[matrix], index.reshape(k * rows)).output
            change = (out.reshape(k, batch, n_out) - ref).square().mean(dim=2)  # (k, batch)
            row = torch.arange(batch, device=device)[None, :] * per_input + pos[:, None]  # (k, batch)
            sq[row, unit[:, None].expand(k, batch)] = change
        result[matrix] = sq
    return (result if units is None else result[None]), target


def _method_sq(model: DecomposedModel, x: Tensor, pieces: Pieces, units: Mapping[str, Tensor] | None,
               n_units: int | None, max_exact_outputs: int, probes: int, gen: torch.Generator | None,
               method: str, steps: int):
    if method == "gradient":
        return _eps_grads(model, x, pieces, units, n_units, max_exact_outputs, probes, gen)
    if method == "integrated_gradients":
        return _eps_grads(model, x, pieces, units, n_units, max_exact_outputs, probes, gen, path_points(steps))
    if method == "ablation":
        return _ablation_sq(model, x, pieces, units, n_units)
    raise ValueError(f"unknown attribution method {method!r} (one of {', '.join(ATTRIBUTION_METHODS)})")


@torch.no_grad()
def attributions(model: DecomposedModel, x: Tensor, pieces: Pieces, max_exact_outputs: int = 512,
                 probes: int = 64, gen: torch.Generator | None = None,
                 timer: Callable[[str], ContextManager] = no_timer, method: str = "gradient",
                 steps: int = 8) -> tuple[dict[str, Tensor], Forward]:
    """({matrix: (rows, C)} attributions, the target's forward pass with its
    hidden activations). ``method``: gradient, integrated_gradients (``steps``
    path points) or ablation (module docstring). Gradients: closed form when
    the model has one, else exact up to ``max_exact_outputs`` outputs per
    input, else ``probes`` random probes."""
    if method == "gradient" and model.fast_sites is not None:
        with timer("target forward + jacobians"):
            fwd, sites = model.fast_sites(model.module, x)
        with timer("attributions"):
            return _contract_sites(sites, pieces, fwd.output.shape[0]), fwd
    with timer(f"attributions ({method})"):
        sq, fwd = _method_sq(model, x, pieces, None, None, max_exact_outputs, probes, gen, method, steps)
    return {n: v.sqrt() for n, v in sq.items()}, fwd


@torch.no_grad()
def mechanism_attributions(model: DecomposedModel, x: Tensor, pieces: Pieces, membership: Mapping[str, Tensor],
                           max_exact_outputs: int = 512, probes: int = 64,
                           gen: torch.Generator | None = None, method: str = "gradient",
                           steps: int = 8) -> tuple[Tensor, Forward]:
    """(rows, G) attributions of mechanisms: ``membership[name]`` is a (C, G)
    0/1 matrix. A mechanism's attribution is that of the sum of its pieces
    (across matrices): per-output terms are summed before squaring; ablation
    removes all of its pieces at once."""
    n_groups = next(iter(membership.values())).shape[1]
    if method == "gradient" and model.fast_sites is not None:
        fwd, sites = model.fast_sites(model.module, x)
        total = None
        for site in sites:
            U, V = pieces[site.name]
            term = (site.contract(use_out_side(site.kind, U, V)) * use_inner(site.kind, site.a, U, V)) @ membership[site.name]
            total = term if total is None else total + term
        return total.square().mean(dim=0).expand(fwd.output.shape[0], -1).sqrt(), fwd
    sq, fwd = _method_sq(model, x, pieces, membership, n_groups, max_exact_outputs, probes, gen, method, steps)
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


def reference_attributions(model: DecomposedModel, x: Tensor, pieces: Pieces, method: str = "gradient",
                           steps: int = 8) -> dict[str, Tensor]:
    """The definitions, computed slowly: a copy of every decomposed matrix per
    sample row. Gradients (at the target or at each path point): one backward
    pass per output, each row's weight gradient contracted with every piece.
    Ablation: one forward pass per (row, piece) with that row's copy less the
    piece. For tests on small models only."""
    weights = model.weights()
    with torch.no_grad():
        fwd = model.forward(x)
    rows, batch = fwd.output.shape[0], fwd.batch
    n_out = fwd.output.numel() // batch
    dtype = fwd.output.dtype
    if method == "ablation":
        per_input = rows // batch
        ref = fwd.output.reshape(batch, n_out)
        out_sq = {n: torch.zeros(rows, pieces[n][0].shape[0], dtype=dtype) for n in weights}
        for n, w in weights.items():
            U, V = pieces[n]
            for row in range(rows):
                for c in range(U.shape[0]):
                    copies = {m: v.expand(rows, *v.shape).clone() for m, v in weights.items()}
                    copies[n][row] -= torch.outer(U[c], V[c])
                    with torch.no_grad():
                        out = model.run_per_row(x, copies).output.reshape(batch, n_out)
                    b = row // per_input
                    out_sq[n][row, c] = (out[b] - ref[b]).square().mean()
        return {n: v.sqrt() for n, v in out_sq.items()}
    alphas = (1.0,) if method == "gradient" else path_points(steps)
    effects = {n: torch.zeros(n_out, rows, pieces[n][0].shape[0], dtype=dtype) for n in weights}
    for alpha in alphas:
        path = {n: w - (1 - alpha) * pieces_sum(*pieces[n]) for n, w in weights.items()}
        copies = {n: w.expand(rows, *w.shape).clone().requires_grad_(True) for n, w in path.items()}
        with torch.enable_grad():
            out = model.run_per_row(x, copies).output.reshape(batch, n_out)
            for o in range(n_out):
                grads = torch.autograd.grad(out[:, o].sum(), list(copies.values()), retain_graph=True,
                                            allow_unused=True)
                for n, g in zip(copies, grads):
                    if g is not None:
                        U, V = pieces[n]
                        effects[n][o] += torch.einsum("nij,ci,cj->nc", g, U, V) / len(alphas)
    return {n: e.square().mean(dim=0).sqrt() for n, e in effects.items()}
