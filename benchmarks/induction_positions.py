"""Where in the sequence an induction target copies. Per store (any run of
``induction`` or ``induction-sink``), on held-out sequences:

- copy accuracy by quarter of the first S's position (1..seq_len-3), with
  each quarter's share of the sequences;
- layer 0's attention on the previous position (what the previous-token head
  is for), by quarter of the query's position;
- from the second S: layer 0's attention on the first S (a duplicate-token
  head, the other way to copy when positions are in the residual stream) and
  on the position before, and layer 1's on M.

    python benchmarks/induction_positions.py runs/induction.zarr [more stores] [--placement second_first]

Why: the health check's bar is on the mean copy accuracy, and the data puts
the first S late in few sequences, so a target can pass it while copying
nothing from the end of the sequence (RESULTS.md, "Where the pair sits").
"""

from __future__ import annotations

import argparse

import torch

from apdkit import open_run
from apdkit.stages.target import load_from_store
from apdkit.targets.induction.model import PLACEMENTS, copied, first_s, first_s_quarter, induction_batch


@torch.no_grad()
def positions(path: str, sequences: int, placement: str | None) -> None:
    module = load_from_store(open_run(path)).module
    T = module.seq_len
    gen = torch.Generator().manual_seed(0)
    tokens, q, answer = induction_batch(sequences, module.vocab, T, gen, placement or module.placement)
    captured = {}
    hooks = [layer.pattern.register_forward_hook(lambda mod, args, out, i=i: captured.__setitem__(i, out))
             for i, layer in enumerate(module.layers)]
    try:
        ok = copied(module, tokens, q, answer).float()
    finally:
        for hook in hooks:
            hook.remove()
    quarter = first_s_quarter(tokens, q)
    print(f"{path}: copy accuracy {float(ok.mean()):.3f}; by quarter of the first S's position "
          "(share of sequences): " + ", ".join(
              f"{float(ok[quarter == i].mean()):.3f} ({float((quarter == i).float().mean()):.3f})" for i in range(4)))
    at = torch.arange(1, T)
    on_previous = captured[0][:, at, at - 1].mean(0)  # (T-1,): query position 1..T-1
    bounds = [1 + (T - 1) * i // 4 for i in range(5)]
    print("  layer 0's attention on the previous position, by quarter of positions: " + ", ".join(
        f"{a}-{b - 1} {float(on_previous[a - 1:b - 1].mean()):.3f}" for a, b in zip(bounds[:-1], bounds[1:])))
    rows, first = torch.arange(len(q)), first_s(tokens, q)
    print(f"  from the second S, layer 0 on the first S {float(captured[0][rows, q, first].mean()):.3f} "
          f"(a duplicate-token head), on the position before {float(captured[0][rows, q, q - 1].mean()):.3f}; "
          f"layer 1 on M {float(captured[1][rows, q, first + 1].mean()):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stores", nargs="+")
    parser.add_argument("--sequences", type=int, default=8192)
    parser.add_argument("--placement", choices=PLACEMENTS,
                        help="the pair's placement to read the stores with (default: the one the target was "
                             "trained with, stored with its arch; a store from before placements were named was "
                             "trained on second_first and is read so)")
    args = parser.parse_args()
    for path in args.stores:
        positions(path, args.sequences, args.placement)


if __name__ == "__main__":
    main()
