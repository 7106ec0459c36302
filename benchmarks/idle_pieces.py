"""What the pieces a grouping sets aside (label -1: no input uses them)
carry, matrix by matrix: the norm of their sum relative to W, its cosine
with W, and, per input column j of W, the share of W[:, j] they hold
(their sum's projection on W[:, j] over |W[:, j]|^2) next to the share the
used pieces hold. Idle pieces whose sum is -a W, against used pieces summing
to (1 + a) W, make up for pieces that are too long: switched off, they leave
the output too large (tms_40-10-id under top-k without the set-aside term).

    python benchmarks/idle_pieces.py runs/tms_40-10-id.zarr [--grouping spectral]
"""

from __future__ import annotations

import argparse

import torch

from apdkit import open_run
from apdkit.stages.target import load_from_store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store")
    parser.add_argument("--grouping", default="spectral")
    args = parser.parse_args()
    run = open_run(args.store)
    weights = load_from_store(run).model.weights()
    labels = run.grouping(args.grouping)
    print("matrix | idle pieces | |idle sum| / |W| | cos(idle sum, W) | idle share of W[:, j] (min..max) | "
          "used share (min..max)")
    for name, (U, V) in run.pieces().items():
        W = weights[name].detach().float()
        idle = torch.from_numpy(labels[name] < 0)
        idle_sum, used_sum = U[idle].T @ V[idle], U[~idle].T @ V[~idle]
        col = (W * W).sum(0).clamp_min(1e-12)
        idle_share, used_share = (idle_sum * W).sum(0) / col, (used_sum * W).sum(0) / col
        cos = float((idle_sum * W).sum() / (idle_sum.norm() * W.norm()).clamp_min(1e-12))
        print(f"{name} | {int(idle.sum())} | {float(idle_sum.norm() / W.norm()):.3f} | {cos:.3f} | "
              f"{float(idle_share.min()):.3f}..{float(idle_share.max()):.3f} | "
              f"{float(used_share.min()):.3f}..{float(used_share.max()):.3f}")


if __name__ == "__main__":
    main()
