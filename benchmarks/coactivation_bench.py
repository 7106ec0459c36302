"""Co-activation statistics on a mask held on disk, in bounded memory.

    python benchmarks/coactivation_bench.py [--samples 1000000] [--pieces 1000] [--subset 50000]

Writes a synthetic zarr store of (samples x pieces) masks and scores (pieces
in planted groups that fire together, ~1% density) chunk by chunk, computes the
statistics with the dask path the stage uses, and prints its throughput and
the process's peak resident memory. Then, on a subset that fits in memory, it
runs the plain numpy computation and the dask path on the same rows and checks
that they agree exactly.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import dask.array as da
import numpy as np
import zarr

from apdkit.stages.group.coactivation import coactivation_dask, coactivation_numpy


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_synthetic(path: Path, n: int, pieces: int, chunk: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, pieces // 4, size=pieces)  # ~4 pieces per planted group
    root = zarr.open_group(str(path), mode="w")
    masks = root.create_array("masks", shape=(n, pieces), chunks=(chunk, pieces), dtype="bool")
    scores = root.create_array("scores", shape=(n, pieces), chunks=(chunk, pieces), dtype="float32")
    for start in range(0, n, chunk):
        rows = min(chunk, n - start)
        events = rng.random((rows, pieces // 4)) < 0.01
        m = events[:, groups] & (rng.random((rows, pieces)) > 0.05)
        masks[start:start + rows] = m
        scores[start:start + rows] = np.where(m, rng.random((rows, pieces), dtype=np.float32), 0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--pieces", type=int, default=1000)
    parser.add_argument("--subset", type=int, default=50_000)
    parser.add_argument("--chunk", type=int, default=8192)
    parser.add_argument("--dir", type=Path, default=None, help="where to write the synthetic store (default: a temp dir)")
    args = parser.parse_args()
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="apd-coact-"))
    path = workdir / "synthetic.zarr"
    try:
        t = time.perf_counter()
        write_synthetic(path, args.samples, args.pieces, args.chunk)
        print(f"wrote {args.samples} x {args.pieces} masks and scores in {time.perf_counter() - t:.1f}s "
              f"(peak RSS so far {peak_rss_mib():.0f} MiB)")
        masks = da.from_zarr(str(path), component="masks")

        t = time.perf_counter()
        stats = coactivation_dask(masks)
        full_s = time.perf_counter() - t
        print(f"dask, all {args.samples} samples: {full_s:.1f}s, {args.samples / full_s:,.0f} samples/s, "
              f"peak RSS {peak_rss_mib():.0f} MiB, {int(stats.co.trace())} activations")

        n_sub = min(args.subset, args.samples)
        m_np = np.asarray(masks[:n_sub])
        t = time.perf_counter()
        ref = coactivation_numpy(m_np)
        np_s = time.perf_counter() - t
        t = time.perf_counter()
        sub = coactivation_dask(masks[:n_sub])
        dask_s = time.perf_counter() - t
        dense = m_np.astype(np.float64)
        exact = (np.array_equal(ref.counts, sub.counts) and np.array_equal(ref.co.toarray(), sub.co.toarray())
                 and np.array_equal(sub.co.toarray(), dense.T @ dense))
        print(f"subset of {n_sub}: in memory at once {n_sub / np_s:,.0f} samples/s, dask {n_sub / dask_s:,.0f} "
              f"samples/s (dask/in-memory throughput {np_s / dask_s:.2f}x); counts identical to a dense float64 "
              f"product: {exact}")
    finally:
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
