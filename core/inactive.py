"""What the mechanisms an input does not use may do to its output.

A decomposition claims that on each input only its active mechanisms matter:
the output is the target's whether the others are off, on, or anywhere in
between. Minimality tests one point of that claim (all inactive mechanisms
off). These functions test others, each as per-row output MSE against the
target with the active mechanisms fully on and the inactive ones at:

- ``stochastic_masks``: independent uniform values in [0, 1];
- ``resample_masks``: another input's choice (its active mechanisms switched
  on too), so the switched-on sets follow the data;
- ``adversarial_masks``: the worst values a projected gradient ascent finds.

Masks are over mechanisms, (rows, G); ``membership[name]`` (C, G) maps them to
each matrix's pieces.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from apdkit.core.model import DecomposedModel
from apdkit.core.pieces import Pieces


def mechanism_output_error(model: DecomposedModel, x: Tensor, pieces: Pieces, membership: Mapping[str, Tensor],
                           mech_masks: Tensor, target_out: Tensor) -> Tensor:
    """Per row: output MSE against ``target_out`` with mechanism g of row n
    scaled by ``mech_masks[n, g]``."""
    out = model.run(x, pieces, {n: mech_masks @ membership[n].T for n in pieces}).output
    return ((out - target_out) ** 2).mean(dim=1)


def stochastic_masks(active: Tensor, gen: torch.Generator | None = None) -> Tensor:
    """a + (1 - a) u with u ~ U(0, 1): active mechanisms (a = 1) stay at 1,
    inactive ones (a = 0) get independent uniform values; a gate a in
    between keeps at least a (core/gates.py)."""
    r = torch.rand(active.shape, generator=gen).to(active.device)
    return active + (1 - active) * r


def resample_masks(active: Tensor, gen: torch.Generator | None = None) -> Tensor:
    """Each row's active mechanisms plus those active on another row of the
    batch (a random permutation; for sequences, rows are positions)."""
    perm = torch.randperm(active.shape[0], generator=gen).to(active.device)
    return torch.maximum(active, active[perm])


def adversarial_masks(model: DecomposedModel, x: Tensor, pieces: Pieces, membership: Mapping[str, Tensor],
                      active: Tensor, target_out: Tensor, steps: int, step_size: float,
                      gen: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """(masks, per-row error) at the worst point found: ``steps`` of
    sign-gradient ascent on the batch's summed output error over the inactive
    mechanisms' values, projected to [0, 1], from a uniform random start. The
    best iterate (largest summed error, the start included) is returned."""
    inactive = 1 - active
    r = torch.rand(active.shape, generator=gen).to(active.device)
    best_err, best_masks = None, None
    with torch.enable_grad():
        for step in range(steps + 1):
            r.requires_grad_(True)
            masks = active + inactive * r
            err = mechanism_output_error(model, x, pieces, membership, masks, target_out)
            if best_err is None or err.sum() > best_err.sum():
                best_err, best_masks = err.detach(), masks.detach()
            if step == steps:
                break
            (grad,) = torch.autograd.grad(err.sum(), r)
            r = (r.detach() + step_size * grad.sign()).clamp_(0, 1)
    return best_masks, best_err
