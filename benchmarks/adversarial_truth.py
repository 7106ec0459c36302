"""How much of verify's adversarial figure is the grouping's: the same search
(core/inactive.py, as stages/verify/stage.py runs it) on a store's grouping,
on the ground truth's grouping of the same pieces, and on the grouping with
the mechanisms that hold one feature's dedicated pieces rejoined.

    python benchmarks/adversarial_truth.py STORE [--grouping spectral] [--rows 2048]

Built-in targets with ground truth only (truth_labels, dedicated_labels).
Every grouping is searched on the same inputs, from the same generator
state; pieces the stored grouping set aside stay aside in all three.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from apdkit import open_run
from apdkit.core.inactive import adversarial_masks, mechanism_output_error, stochastic_masks
from apdkit.core.pieces import membership_matrices
from apdkit.stages.config import Stage1Config, VerifyConfig
from apdkit.stages.group.mechanisms import relabel
from apdkit.stages.selection import mechanism_masks
from apdkit.stages.seeds import generator
from apdkit.stages.target import load_from_store, matrix_settings
from apdkit.stores.run import STAGE1


def rejoin_features(flat: np.ndarray, dedicated: np.ndarray) -> np.ndarray:
    """Every mechanism whose dedicated pieces are all one feature's joins that
    feature's other such mechanisms."""
    out = flat.copy()
    offset = int(flat.max()) + 1
    for g in np.unique(flat[flat >= 0]):
        feats = set(dedicated[flat == g].tolist()) - {-1}
        if len(feats) == 1:
            out[flat == g] = offset + feats.pop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store")
    parser.add_argument("--grouping", default="spectral")
    parser.add_argument("--rows", type=int, default=VerifyConfig().adversarial_rows)
    args = parser.parse_args()
    run = open_run(args.store)
    cfg = Stage1Config(**run.config(STAGE1))
    verify = VerifyConfig()
    target = load_from_store(run)
    model = target.model
    if not target.has_ground_truth or target.builtin.truth_labels is None:
        raise SystemExit(f"{args.store}: {run.model_name} has no ground-truth grouping")
    _, topk = matrix_settings(target, cfg)
    pieces, gates = run.pieces(), run.gates()
    names = list(pieces)
    sizes = [pieces[n][0].shape[0] for n in names]
    info = run.grouping_info(args.grouping)
    stored = np.concatenate([run.grouping(args.grouping)[n] for n in names])
    truth = target.builtin.truth_labels(model, pieces, topk, names)
    dedicated = target.builtin.dedicated_labels(model, pieces, topk, names)
    groupings = {args.grouping: stored, "ground truth": np.where(stored >= 0, truth, -1),
                 f"{args.grouping}, features rejoined": rejoin_features(stored, dedicated)}
    mean_active = float(info["mean_active_mechanisms"])

    gen = generator(cfg.seed, "verify", 0)  # verify's stream (its first draw is one batch, not these rows)
    x = target.sample(args.rows, gen)
    with torch.no_grad():
        target_out = model.forward(x).output
        off = {n: torch.zeros(x.shape[0] * (target_out.shape[0] // x.shape[0]), s) for n, s in zip(names, sizes)}
        ablated = float(((model.run(x, pieces, off).output - target_out) ** 2).mean())
    state = gen.get_state()
    print(f"{args.store}: {args.rows} inputs, {verify.adversarial_steps} steps of {verify.adversarial_step_size}, "
          f"mean active mechanisms {mean_active:.2f}")
    print("| grouping | mechanisms | top-k | typical | worst |\n|---|---|---|---|---|")
    for name, flat in groupings.items():
        gen.set_state(state)
        labels = relabel(flat)
        n_groups = int(labels.max()) + 1
        membership = membership_matrices(dict(zip(names, np.split(labels, np.cumsum(sizes)[:-1]))), n_groups)
        _, active = mechanism_masks(model, x, pieces, gates, membership, mean_active, cfg, gen)
        active = active.float()
        with torch.no_grad():
            kept = mechanism_output_error(model, x, pieces, membership, active, target_out)
            typical = mechanism_output_error(model, x, pieces, membership, stochastic_masks(active, gen), target_out)
        _, worst = adversarial_masks(model, x, pieces, membership, active, target_out, verify.adversarial_steps,
                                     verify.adversarial_step_size, gen)
        print(f"| {name} | {n_groups} | {float(kept.mean()) / ablated:.3f} | {float(typical.mean()) / ablated:.3f} "
              f"| {float(worst.mean()) / ablated:.3f} |")


if __name__ == "__main__":
    main()
