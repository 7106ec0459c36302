"""Where the induction target uses each of its matrices, and whether a
decomposition could see it. Per store (a finished induction run):

- each matrix's output zeroed at one class of positions, on the target
  alone, and the logit error that makes as a fraction of the error with all
  eight zeroed everywhere (stage 1's and verify's scale), with the copy
  accuracy; "pattern" is the first S, the M after it and the second S
  (where the circuit's story says the heads act), "elsewhere" every other
  position but BOS;
- each layer's attention on BOS and on its sink logit (``induction-sink``),
  elsewhere and at the second S;
- whether a row's own input to layer 1 (what a gate on its Q, K or V reads)
  tells the pattern positions from the others: a small MLP's held-out AUC;
- the run's stage-1 pieces on per position, in each class.

    python benchmarks/induction_usage.py runs/induction.zarr [more stores]

Why: a mechanism is found by the inputs that switch it off. Where zeroing a
head's matrices elsewhere costs far more than the error a decomposition may
leave, every head is on at every position, and no attribution method or
grouping by co-activation can tell the heads apart from the inputs.
"""

from __future__ import annotations

import argparse
from contextlib import ExitStack

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from torch import Tensor

from apdkit import open_run
from apdkit.stages.config import Stage1Config
from apdkit.stages.selection import piece_masks
from apdkit.stages.target import load_from_store, matrix_settings
from apdkit.stores.run import STAGE1
from apdkit.targets.induction.model import batch_for, circuit_positions, first_s

MATRICES = ("q", "k", "v", "o")


@torch.no_grad()
def zeroed_logits(module: torch.nn.Module, tokens: Tensor, zero: dict[tuple[int, str], Tensor]) -> Tensor:
    """Logits with matrix (layer, name)'s output set to 0 where its (n, T)
    position mask is True."""
    with ExitStack() as stack:
        for (layer, name), where in zero.items():
            linear = getattr(module.layers[layer], name)
            keep = (~where).unsqueeze(-1).float()
            stack.enter_context(linear.register_forward_hook(lambda mod, args, out, keep=keep: out * keep))
        return module(tokens)


def position_classes(tokens: Tensor, q: Tensor) -> dict[str, Tensor]:
    pattern = circuit_positions(tokens, q)
    elsewhere = ~pattern
    elsewhere[:, 0] = False
    return {"pattern": pattern, "elsewhere": elsewhere}


@torch.no_grad()
def layer_input(module: torch.nn.Module, tokens: Tensor, layer: int) -> Tensor:
    """(n, T, d_model) residual stream entering ``layer``: what a gate on that
    layer's V (and Q and K, but for layer 0 of a "layer0_qk" target) reads at
    each position."""
    captured = {}
    handle = module.layers[layer].v.register_forward_pre_hook(lambda mod, args: captured.__setitem__("x", args[0]))
    try:
        module(tokens)
    finally:
        handle.remove()
    return captured["x"]


def telling_apart(features: Tensor, positive: Tensor, negative: Tensor, seed: int = 0) -> float:
    """Held-out ROC AUC of a small MLP told to separate the ``positive`` rows
    from the ``negative`` ones by their features alone (balanced classes):
    about 0.5 when a row's own input cannot say which it is."""
    gen = torch.Generator().manual_seed(seed)
    pos, neg = features[positive], features[negative]
    n = min(len(pos), len(neg))
    neg = neg[torch.randperm(len(neg), generator=gen)[:n]]
    X = torch.cat([pos[:n], neg]).numpy()
    y = np.r_[np.ones(n), np.zeros(n)]
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.3, random_state=seed, stratify=y)
    clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=300, early_stopping=True, random_state=seed)
    clf.fit(X_train, y_train)
    return float(roc_auc_score(y_test, clf.predict_proba(X_test)[:, 1]))


def usage(path: str, sequences: int) -> None:
    run = open_run(path)
    target = load_from_store(run)
    module = target.module
    tokens, q, answer = batch_for(module, sequences, torch.Generator().manual_seed(0))
    rows = torch.arange(len(q))
    logits = zeroed_logits(module, tokens, {})
    everywhere = torch.ones(tokens.shape, dtype=torch.bool)
    ablated = zeroed_logits(module, tokens, {(l, m): everywhere for l in range(len(module.layers)) for m in MATRICES})
    scale = float(((ablated - logits) ** 2).mean())
    classes = position_classes(tokens, q)
    print(f"{path}: copy accuracy {float((logits[rows, q].argmax(-1) == answer).float().mean()):.3f}; "
          "share of positions: " + ", ".join(f"{c} {float(w.float().mean()):.3f}" for c, w in classes.items()))
    print("  zeroed | " + " | ".join(f"{c}: error, copy accuracy" for c in classes))
    units = [((l, m),) for l in range(len(module.layers)) for m in MATRICES]
    units += [tuple((l, m) for m in MATRICES) for l in range(len(module.layers))]
    for unit in units:
        cells = []
        for where in classes.values():
            out = zeroed_logits(module, tokens, {key: where for key in unit})
            copy = float((out[rows, q].argmax(-1) == answer).float().mean())
            cells.append(f"{float(((out - logits) ** 2).mean()) / scale:.3f}, {copy:.2f}")
        label = f"{unit[0][0]}.{unit[0][1]}" if len(unit) == 1 else f"layer {unit[0][0]} head"
        print(f"  {label} | " + " | ".join(cells))
    patterns = {}
    hooks = [block.pattern.register_forward_hook(lambda mod, args, out, l=l: patterns.__setitem__(l, out))
             for l, block in enumerate(module.layers)]
    with torch.no_grad():
        module(tokens)
    for hook in hooks:
        hook.remove()
    print("  attention on BOS, elsewhere / at the second S: " + "; ".join(
        f"layer {l} {float(p[..., 0][classes['elsewhere']].mean()):.3f} / {float(p[rows, q, 0].mean()):.3f}"
        for l, p in patterns.items()))
    sink = {l: 1 - p.sum(-1) for l, p in patterns.items()}  # a pattern's rows sum to 1 less the sink's share
    print("  attention on the sink (induction-sink), elsewhere / at the second S: " + "; ".join(
        f"layer {l} {float(s[classes['elsewhere']].mean()):.3f} / {float(s[rows, q].mean()):.3f}"
        for l, s in sink.items()))
    first = first_s(tokens, q)
    features = layer_input(module, tokens, 1).flatten(0, 1)
    ordinary = classes["elsewhere"].flatten()
    for name, at in (("first S", first), ("M", first + 1), ("second S", q)):
        mark = torch.zeros(tokens.shape, dtype=torch.bool)
        mark[rows, at] = True
        auc = telling_apart(features, mark.flatten(), ordinary)
        print(f"  layer 1's input: {name} against elsewhere, held-out AUC {auc:.3f}")
    cfg = Stage1Config(**run.config(STAGE1))
    _, topk = matrix_settings(target, cfg)
    _, masks = piece_masks(target.model, tokens, run.pieces(), run.gates(), topk, cfg, torch.Generator().manual_seed(0))
    print(f"  stage 1 ({cfg.minimality}, {cfg.attribution}): pieces on per position, " +
          " / ".join(classes) + ": " + "; ".join(
              f"{n.removeprefix('layers.')} " + " / ".join(
                  f"{float(m.view(*tokens.shape, -1)[w].float().sum(-1).mean()):.1f}" for w in classes.values())
              for n, m in masks.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stores", nargs="+")
    parser.add_argument("--sequences", type=int, default=512)
    args = parser.parse_args()
    for path in args.stores:
        usage(path, args.sequences)


if __name__ == "__main__":
    main()
