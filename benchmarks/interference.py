"""Where does the output error of a resid_mlp decomposition sit: on the
features an input has on, or on those it has off? A residual MLP with fewer
neurons than features writes a little into every feature's output direction
(interference); the target's output holds it, so a decomposition must
reproduce it too. For each finished run, on fresh inputs, with the grouping's
set-aside pieces off (every mechanism on), and with every piece off (ablated):
the MSE over the output coordinates of features that are on, and over those
that are off, as fractions of the ablated MSE. Any target whose output has
one coordinate per input feature will do (the TMS targets too).

    python benchmarks/interference.py runs/resid_mlp2.zarr [more stores] [--grouping spectral]
"""

from __future__ import annotations

import argparse

import torch

from apdkit import open_run
from apdkit.stages.target import load_from_store


def split_error(out: torch.Tensor, target: torch.Tensor, on: torch.Tensor) -> tuple[float, float]:
    """(MSE share on the coordinates where ``on``, share where not), both over every entry."""
    sq = (out - target) ** 2
    return float((sq * on).sum() / sq.numel()), float((sq * ~on).sum() / sq.numel())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stores", nargs="+")
    parser.add_argument("--grouping", default="spectral")
    parser.add_argument("--samples", type=int, default=8192)
    args = parser.parse_args()
    torch.set_num_threads(2)
    print("store | ablated: features on / off | set-aside pieces off: on / off | target output on features off")
    for path in args.stores:
        run = open_run(path)
        target = load_from_store(run)
        model, pieces, labels = target.model, run.pieces(), run.grouping(args.grouping)
        x = target.sample(args.samples, torch.Generator().manual_seed(123))
        on = x != 0  # one output coordinate per feature
        with torch.no_grad():
            y = model.forward(x).output
            off_masks = {n: torch.zeros(len(x), U.shape[0]) for n, (U, V) in pieces.items()}
            grouped = {n: torch.from_numpy(labels[n] >= 0).float().expand(len(x), -1) for n in pieces}
            ablated = split_error(model.run(x, pieces, off_masks).output, y, on)
            set_aside = split_error(model.run(x, pieces, grouped).output, y, on)
        total = sum(ablated)
        held = float((y ** 2 * ~on).sum() / y.numel())
        print(f"{path} | {ablated[0] / total:.3f} / {ablated[1] / total:.3f} | "
              f"{set_aside[0] / total:.3f} / {set_aside[1] / total:.3f} | {held / total:.3f}")


if __name__ == "__main__":
    main()
