"""Do gradient attributions see the induction head's pieces? On a finished
induction run: for the key position of each held-out sequence (the token M
after the first S, where layer 1 attends from the second S) and for the
query position, compare each layer-1 piece's gradient attribution with its
ablation effect (the exact change of the output when that one piece is
removed at that one position). Softmax attention saturates, so the first
order can miss pieces whose removal matters.

    python benchmarks/induction_attributions.py runs/induction.zarr
"""

from __future__ import annotations

import sys

import torch

from apdkit import open_run
from apdkit.core.attributions import attributions
from apdkit.stages.target import load_from_store
from apdkit.targets.induction.model import batch_for


def main(path: str, n: int = 32) -> None:
    torch.set_num_threads(2)
    run = open_run(path)
    target = load_from_store(run)
    model, module = target.model, target.module
    pieces = run.pieces()
    tokens, q, answer = batch_for(module, n, torch.Generator().manual_seed(123))
    T = module.seq_len
    key = torch.nonzero(tokens[:, 1:] == answer[:, None])[:, 1] + 1  # where M sits
    with torch.no_grad():
        scores, _ = attributions(model, tokens, pieces, max_exact_outputs=512, probes=256)  # the estimate
        full = model.run(tokens, pieces, {k: None for k in pieces}).output.view(n, T, -1)
    print(f"{path}: {n} held-out sequences; per layer-1 matrix and position, top-4 overlap of gradient "
          "attribution and ablation effect, and the ablation effect the top-4 by gradient misses")
    for name in [m for m in pieces if m.startswith("layers.1.")]:
        C = pieces[name][0].shape[0]
        for label, pos in (("query", q), ("key", key)):
            rows = torch.arange(n) * T + pos
            grad = scores[name][rows]  # (n, C)
            effect = torch.zeros(n, C)
            for c in range(C):
                masks = {m: torch.ones(n * T, pieces[m][0].shape[0]) for m in pieces}
                masks[name][rows, c] = 0.0
                with torch.no_grad():
                    out = model.run(tokens, pieces, masks).output.view(n, T, -1)
                effect[:, c] = ((out - full) ** 2).sum(dim=(1, 2))
            top_g = grad.topk(4, dim=1).indices
            top_a = effect.topk(4, dim=1).indices
            overlap = torch.tensor([len(set(a.tolist()) & set(b.tolist())) / 4 for a, b in zip(top_g, top_a)])
            missed = torch.tensor([float(effect[i, top_a[i]].sum() - effect[i, top_g[i]].sum()).__abs__()
                                   / max(float(effect[i, top_a[i]].sum()), 1e-30) for i in range(n)])
            corr = torch.corrcoef(torch.stack([grad.flatten(), effect.flatten()]))[0, 1]
            print(f"  {name:11s} {label:5s}  top-4 overlap {overlap.mean():.2f}  "
                  f"effect share missed {missed.mean():.2f}  corr(grad, ablation) {corr:.2f}")


if __name__ == "__main__":
    main(*sys.argv[1:2])
