"""What each induction mechanism holds and does. For finished induction runs
and one grouping: per mechanism, its pieces per matrix, the share of its
weight in each layer's head, and both functions (previous-token attention,
copy accuracy) with it alone ablated, as a share of the target's; and per
matrix, how many of its pieces each input position keeps on.

    python benchmarks/induction_mechanisms.py runs/induction.zarr [more stores] --grouping mdl

Why: the recovery scores say whether a head came out as its own mechanisms,
not why not. The reasons measured so far: a mechanism that joins matrices of
both layers, or layer 0's V and O apart from its Q and K (the copy then
needs layer-0 mechanisms the previous-token attention does not), or a head
split over several mechanisms none of which is needed alone. For the last,
per function the head's mechanisms together (those with >= 90% of their
weight in the head): the function keeping only them (and the mechanisms it
needs), and with all of them ablated. A diagnostic, not a recovery score:
one mechanism per piece would pass it too, so read it with their count.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from apdkit import open_run
from apdkit.core.pieces import pieces_sum
from apdkit.stages.target import load_from_store
from apdkit.targets.induction.model import batch_for
from apdkit.targets.induction.scoring import FUNCTIONS, NEEDED_BELOW, ablation_values, function_values, keep_masks

IN_HEAD = 0.9  # a mechanism with this share of its weight in a head's matrices counts as the head's


def describe(path: str, grouping: str, sequences: int = 512) -> None:
    run = open_run(path)
    target = load_from_store(run)
    model, module = target.model, target.module
    pieces, labels = run.pieces(), run.grouping(grouping)
    batch = batch_for(module, sequences, torch.Generator().manual_seed(0))
    whole = function_values(model, *batch)
    ablated = ablation_values(model, pieces, labels, batch)
    attribution = run.config("stage1").get("attribution", "gradient")
    print(f"{path} ({attribution}, {grouping}: {len(ablated)} mechanisms); target prev-token "
          f"{whole['prev_token']:.3f}, copy {whole['induction']:.3f}")
    masks = run.masks()
    active = {n: float(np.asarray(masks[n][:4096]).sum(axis=1).mean()) for n in pieces}
    print("  pieces on per position: " + ", ".join(f"{n} {a:.1f}/{pieces[n][0].shape[0]}" for n, a in active.items()))
    print("  mechanism | pieces per matrix | weight share layer 0 / 1 | prev-token, copy with it ablated | needed by")
    head_of, needed_by = {f: set() for f in FUNCTIONS}, {f: set() for f in FUNCTIONS}
    for g, values in enumerate(ablated):
        held, norms = [], {}
        for n, (U, V) in pieces.items():
            mine = torch.as_tensor(labels[n] == g)
            if mine.any():
                held.append(f"{n.removeprefix('layers.')}×{int(mine.sum())}")
                norms[n] = float(pieces_sum(U[mine], V[mine]).norm() ** 2)
        total = sum(norms.values()) or 1.0
        share = [sum(v for n, v in norms.items() if n.startswith(head)) / total for head in FUNCTIONS.values()]
        ratio = {f: values[f] / max(whole[f], 1e-12) for f in FUNCTIONS}
        needed = [f for f in FUNCTIONS if ratio[f] < NEEDED_BELOW] or ["-"]
        for f, sh in zip(FUNCTIONS, share):
            if sh >= IN_HEAD:
                head_of[f].add(g)
            if f in needed:
                needed_by[f].add(g)
        print(f"  {g:3d} | {' '.join(held)} | {share[0]:.2f} / {share[1]:.2f} | "
              f"{ratio['prev_token']:.2f}, {ratio['induction']:.2f} | {', '.join(needed)}")
    everything = set(range(len(ablated)))
    for f in FUNCTIONS:
        mine = head_of[f]
        kept = function_values(model, *batch, pieces=pieces, masks=keep_masks(labels, mine | needed_by[f], False))[f]
        gone = function_values(model, *batch, pieces=pieces, masks=keep_masks(labels, everything - mine, True))[f]
        print(f"  {f} head's mechanisms together ({len(mine)}: {sorted(mine)}): kept with the ones it needs "
              f"{kept / max(whole[f], 1e-12):.2f}, all ablated {gone / max(whole[f], 1e-12):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stores", nargs="+")
    parser.add_argument("--grouping", default="mdl")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for path in args.stores:
        describe(path, args.grouping)


if __name__ == "__main__":
    main()
