"""Which pieces make a grouping merge features, and why. For every mechanism
that holds the dedicated pieces of two or more features (the
``merged_features`` count of `apd group` on the resid and TMS targets), each
of its pieces: its matrix and index, the feature the one-hot probes dedicate
it to, how many stored inputs it fires on, and which features are on where it
fires (the three most frequent, with counts). A piece that fires on two
features' inputs mixes them: the grouping is then right to keep them
together, and the miss is stage 1's.

    python benchmarks/merged_features.py runs/resid_mlp3.zarr [--grouping spectral]
"""

from __future__ import annotations

import argparse

import numpy as np

from apdkit import open_run
from apdkit.stages.config import Stage1Config
from apdkit.stages.target import load_from_store, matrix_settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store")
    parser.add_argument("--grouping", default="spectral")
    parser.add_argument("--top", type=int, default=3, help="features listed per piece")
    args = parser.parse_args()
    run = open_run(args.store)
    target = load_from_store(run)
    if target.builtin is None or target.builtin.dedicated_labels is None:
        raise SystemExit(f"{args.store}: its target has no one-hot feature probes (resid and TMS targets do)")
    pieces = run.pieces()
    names = list(pieces)
    _, topk = matrix_settings(target, Stage1Config(**run.config("stage1")))
    dedicated = target.builtin.dedicated_labels(target.model, pieces, topk, names)
    labels = np.concatenate([run.grouping(args.grouping)[n] for n in names])
    where = [(n, i) for n in names for i in range(pieces[n][0].shape[0])]
    fires = np.asarray(run.eval_masks_dask(names).compute()).astype(bool)  # (inputs, pieces)
    on = np.asarray(run.eval_inputs()) != 0  # (inputs, features): one input coordinate per feature
    own = (dedicated >= 0) & (labels >= 0)
    merged = [g for g in np.unique(labels[own]) if len(np.unique(dedicated[own & (labels == g)])) > 1]
    print(f"{args.store}, {args.grouping}: {len(merged)} mechanisms hold the dedicated pieces of several features")
    for g in merged:
        features = np.unique(dedicated[own & (labels == g)]).tolist()
        print(f"mechanism {g}: features {features} (on in {[int(on[:, f].sum()) for f in features]} inputs)")
        for p in np.flatnonzero(labels == g):
            counts = on[fires[:, p]].sum(0)
            top = np.argsort(-counts)[:args.top]
            name, i = where[p]
            print(f"  {name}[{i}] dedicated to {dedicated[p]}, fires on {int(fires[:, p].sum())}: "
                  + ", ".join(f"feature {f} on in {int(counts[f])}" for f in top))


if __name__ == "__main__":
    main()
