"""Grouping at scale: time and peak memory of stage 2's steps as the number
of pieces grows, on synthetic masks with a planted answer.

    python benchmarks/grouping_scale.py [--pieces 1000 10000 100000] [--samples 1000000]

Each size runs in its own process (so each peak resident memory is its own).
The masks are made lazily, chunk by chunk, as a dask array (nothing on
disk): P pieces in planted mechanisms of 4; each input uses a Poisson(10)
number of mechanisms, each member of a used mechanism firing with
probability 0.95, plus Poisson(5) pieces firing at random (noise, which is
what fills the co-activation matrix with chance pairs). The steps are the
stage's own functions: co-activation counts (sparse, folded chunk by chunk),
the chance-filtered affinity graph, spectral grouping per connected
component, the split of groups holding pieces that are apart, the sample
of the masks (50,000 rows, sparse) and the split of unions, and the
group activity counts of the description length. The
baseline, in the same process, is what the dense statistics the stage used
before would hold: two (P, P) float64 matrices, plus one (2, P, P) float64
partial sum per chunk in flight.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import dask.array as da
from dask import delayed
import numpy as np

MECHANISM = 4
USED_PER_INPUT = 10
NOISE_PER_INPUT = 5
KEEP = 0.95
DL_SAMPLES = 50_000  # the stage's default dl_samples: rows sampled for the union split


def synthetic_chunk(block_id: int, rows: int, P: int) -> np.ndarray:
    rng = np.random.default_rng(1000 + block_id)
    G = P // MECHANISM
    used = rng.poisson(USED_PER_INPUT, size=rows)
    row_of = np.repeat(np.arange(rows), used)
    mech = rng.integers(0, G, size=row_of.size)
    pieces = (mech[:, None] * MECHANISM + np.arange(MECHANISM)).ravel()
    prow = np.repeat(row_of, MECHANISM)
    fire = rng.random(pieces.size) < KEEP
    noise = rng.poisson(NOISE_PER_INPUT, size=rows)
    nrow = np.repeat(np.arange(rows), noise)
    m = np.zeros((rows, P), dtype=bool)
    m[prow[fire], pieces[fire]] = True
    m[nrow, rng.integers(0, P, size=nrow.size)] = True
    return m


def lazy_masks(n: int, P: int) -> da.Array:
    chunk = int(min(8192, max(256, 80_000_000 // P)))  # about 80 MB of mask per chunk
    sizes = [min(chunk, n - s) for s in range(0, n, chunk)]
    blocks = [da.from_delayed(delayed(synthetic_chunk)(i, r, P), shape=(r, P), dtype=bool)
              for i, r in enumerate(sizes)]
    return da.concatenate(blocks, axis=0)


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_size(P: int, n: int, min_rate: float) -> dict:
    from apdkit.stages.group.coactivation import (alive_pieces, coactivation_dask, group_activity_counts,
                                                  sample_masks, sample_rows)
    from apdkit.stages.group.mechanisms import partition_scores, relabel, split_unions
    from apdkit.stages.group.methods import (ALWAYS_TOGETHER, GroupingInput, GroupingSettings, affinity, spectral,
                                             split_apart)
    from scipy.sparse.csgraph import connected_components

    out = {"pieces": P, "samples": n, "start_mib": round(peak_mib())}
    masks = lazy_masks(n, P)
    t = time.perf_counter()
    stats = coactivation_dask(masks)
    out["coactivation_s"] = round(time.perf_counter() - t, 1)
    out["co_nonzeros"] = int(stats.co.nnz)
    out["co_mib"] = round((stats.co.data.nbytes + stats.co.indices.nbytes + stats.co.indptr.nbytes) / 2**20)
    alive = alive_pieces(stats, min_rate)
    out["alive"] = int(alive.sum())
    sub = stats.restrict(alive)
    t = time.perf_counter()
    A = affinity(sub)
    out["affinity_s"] = round(time.perf_counter() - t, 1)
    out["graph_edges"] = int((A.nnz - A.shape[0]) // 2)
    out["components"] = int(connected_components(A, directed=False)[0])
    del stats
    t = time.perf_counter()
    inp = GroupingInput(sub, np.zeros((0, len(sub.counts)), bool), np.zeros(len(sub.counts), int), None)
    labels_alive = spectral(inp, GroupingSettings())
    out["spectral_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    labels_alive = split_apart(labels_alive, inp, GroupingSettings())  # the stage's rule after every method
    out["apart_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    alive_idx = np.flatnonzero(alive)
    sampled = sample_masks(masks, sample_rows(n, DL_SAMPLES, 0), alive_idx)
    out["sample_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    planted_of = alive_idx // MECHANISM

    def union_rank(positions):  # a planted mechanism's pieces share one direction
        return np.array([len(np.unique(planted_of[positions]))])

    labels_alive = relabel(split_unions(labels_alive, sampled, union_rank, GroupingSettings().alpha, ALWAYS_TOGETHER))
    out["unions_s"] = round(time.perf_counter() - t, 1)
    labels = np.full(P, -1)
    labels[alive] = labels_alive
    labels = relabel(labels)
    out["groups"] = int(labels.max()) + 1
    t = time.perf_counter()
    group_activity_counts(masks, labels, out["groups"])
    out["activity_s"] = round(time.perf_counter() - t, 1)
    truth = np.arange(P) // MECHANISM
    out["exact_match"] = round(partition_scores(labels[alive], truth[alive])["exact_match"], 4)
    out["peak_mib"] = round(peak_mib())
    out["dense_baseline_mib"] = round((2 * P * P * 8 + 2 * 2 * P * P * 8) / 2**20)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pieces", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--min-rate", type=float, default=1e-4, help="alive: active on more than this share of inputs")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one_size(args.one, args.samples, args.min_rate)))
        return
    print("| pieces | samples | co-activation s | co nonzeros (MiB) | alive | graph edges | components | spectral s "
          "| apart split s | sample s | union split s | activity s | groups | planted recovered | peak RSS MiB "
          "| dense statistics would hold MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for P in args.pieces:
        done = subprocess.run([sys.executable, __file__, "--one", str(P), "--samples", str(args.samples),
                               "--min-rate", str(args.min_rate)], capture_output=True, text=True)
        if done.returncode != 0:
            reason = "out of memory (killed)" if done.returncode in (-9, 137) else done.stderr.strip().splitlines()[-1]
            print(f"| {P} | {args.samples} | {reason} |")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"| {P} | {r['samples']} | {r['coactivation_s']} | {r['co_nonzeros']:,} ({r['co_mib']}) | {r['alive']} "
              f"| {r['graph_edges']:,} | {r['components']} | {r['spectral_s']} | {r['apart_s']} | {r['sample_s']} "
              f"| {r['unions_s']} | {r['activity_s']} | {r['groups']} "
              f"| {r['exact_match']:.1%} | {r['peak_mib']} | {r['dense_baseline_mib']:,} |", flush=True)


if __name__ == "__main__":
    main()
