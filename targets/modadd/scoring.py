"""Modular-addition ground truth: the key Fourier frequencies.

A mechanism's frequency content: each of its matrices' parts is read as a
function of the input or answer index (``embed``: over a and over b;
``W_in``: through the target's embedding, over a and b; ``W_out``: over the
answer c), Fourier-transformed into power per frequency k = 0..(p-1)/2 (cos
and sin together), normalised, and averaged over the matrices the mechanism
has weight in (each matrix counts the same, whatever its scale: W_out's
weights are larger, and a ReLU network writes some DC and third harmonic
there). Purity is the largest frequency's share; the mean purity is weighted
by each mechanism's squared norm, so that dust does not count as much as
mechanisms. The key frequencies are those holding >= KEY_SHARE of the
trained embedding's power. Pure: a model, pieces and labels in, floats out.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import Tensor

from apdkit.core.masks import Activity
from apdkit.core.model import DecomposedModel
from apdkit.core.pieces import Pieces, pieces_sum, singleton_labels
from apdkit.targets.modadd.model import accuracy

KEY_SHARE = 0.05  # a key frequency holds at least this share of the embedding's power
DEDICATED_PURITY = 0.8  # a mechanism is dedicated to its top frequency when that holds this share


def power(W: Tensor, p: int) -> Tensor:
    """Power per frequency of (rows, 2p) weights over a and over b: (p//2 + 1,)."""
    return sum(torch.fft.rfft(W[:, s * p:(s + 1) * p].double(), dim=1).abs().pow(2).sum(0) for s in (0, 1))


def spectrum(parts: Mapping[str, Tensor], embed: Tensor, p: int) -> Tensor:
    """A mechanism's power share per frequency (sums to 1; zeros if empty)."""
    present = {n: w for n, w in parts.items() if float(w.pow(2).sum()) > 0}
    out = torch.zeros(p // 2 + 1, dtype=torch.float64)
    for name, w in present.items():
        if name == "W_out":
            spec = torch.fft.rfft(w.double().T, dim=1).abs().pow(2).sum(0)  # over the answer index
        else:
            spec = power(w if name == "embed" else w @ embed, p)
        out += spec / spec.sum() / len(present)
    return out


def key_frequencies(embed: Tensor, p: int) -> list[int]:
    share = power(embed, p)
    share = share / share.sum()
    return [int(k) for k in torch.nonzero(share >= KEY_SHARE).flatten()]


def mechanism_scores(model: DecomposedModel, pieces: Pieces, labels: Mapping[str, np.ndarray],
                     topk: Mapping[str, float], gen: torch.Generator,
                     active: Activity | None = None) -> dict[str, float]:
    mlp = model.module
    p, embed = mlp.p, mlp.embed.weight.detach()
    keys = key_frequencies(embed, p)
    n_groups = int(max((lab.max() for lab in labels.values()), default=-1)) + 1
    spectra, norms = [], []
    for g in range(n_groups):
        parts = {n: pieces_sum(U[torch.as_tensor(labels[n] == g)], V[torch.as_tensor(labels[n] == g)])
                 for n, (U, V) in pieces.items()}
        spectra.append(spectrum(parts, embed, p))
        norms.append(sum(float(w.pow(2).sum()) for w in parts.values()))
    spectra_t = torch.stack(spectra) if spectra else torch.zeros(0, p // 2 + 1, dtype=torch.float64)
    purity, top = spectra_t.max(dim=1) if n_groups else (torch.zeros(0), torch.zeros(0, dtype=torch.long))
    norm = torch.tensor(norms, dtype=torch.float64)
    dedicated = {k: bool(((top == k) & (purity >= DEDICATED_PURITY)).any()) for k in keys}
    keep_groups = torch.nonzero(torch.isin(top, torch.tensor(keys))).flatten()
    masks = {n: torch.isin(torch.as_tensor(lab), keep_groups).float().expand(1, -1) for n, lab in labels.items()}
    _, held_out = mlp.split()
    x = mlp.encode(held_out)
    with torch.no_grad():
        out = model.run(x, pieces, {n: m.expand(len(x), -1) for n, m in masks.items()}).output
    kept_acc = float((out.argmax(-1) == mlp.answers(held_out)).float().mean())
    return {
        "modadd/key_frequencies": float(len(keys)),
        "modadd/mechanisms": float(n_groups),
        "modadd/mean_purity": float((purity * norm).sum() / norm.sum()) if n_groups else 0.0,
        "modadd/unweighted_mean_purity": float(purity.mean()) if n_groups else 0.0,
        "modadd/dedicated_key_fraction": sum(dedicated.values()) / max(1, len(keys)),
        "modadd/held_out_accuracy_key_mechanisms": kept_acc,
        "modadd/held_out_accuracy_target": accuracy(mlp, mlp, held_out),
    }


def scores(model: DecomposedModel, pieces: Pieces, topk: Mapping[str, float],
           active: Activity | None = None) -> dict[str, float]:
    """Stage 1: the same scores with each piece its own mechanism."""
    out = mechanism_scores(model, pieces, singleton_labels(pieces), topk, torch.Generator().manual_seed(0))
    return {k.replace("modadd/", "modadd/pieces/"): v for k, v in out.items()}
