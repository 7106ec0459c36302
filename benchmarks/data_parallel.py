"""Stage 1 on N data-parallel processes against one, on this machine.

    python benchmarks/data_parallel.py [--model resid_mlp] [--steps 1000] [--nproc 2]

Trains the target once, then runs the same `apd stage1` into two copies of
that store: one process, then `--nproc N`. Prints each one's stage-1 wall
time (training and the evaluation set, which rank 0 scores alone), the ratio,
and how far the two runs' pieces are apart (relative Frobenius difference
per matrix) and their ground-truth scores.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def stage1(store: Path, model: str, steps: int, extra: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "apdkit.cli", "stage1", "--model", model, "--store", str(store),
                    "--steps", str(steps), "-q", *extra], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="resid_mlp")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args()

    from apdkit import open_run
    from apdkit.stages.target import ensure_target
    from apdkit.stores.run import RunStore
    from apdkit.targets.load import resolve_ref

    work = Path(tempfile.mkdtemp(prefix="apd-dp-"))
    try:
        base = work / "target.zarr"
        ensure_target(RunStore(base, args.model), resolve_ref(args.model), seed=0)
        one, many = work / "one.zarr", work / "many.zarr"
        shutil.copytree(base, one)
        shutil.copytree(base, many)
        t1 = stage1(one, args.model, args.steps, [])
        tn = stage1(many, args.model, args.steps, ["--nproc", str(args.nproc)])
        r1, rn = open_run(one), open_run(many)
        w1 = r1.attrs("stage1")["wall_seconds"]
        wn = rn.attrs("stage1")["wall_seconds"]
        print(f"{args.model}, {args.steps} steps: 1 process {w1:.1f} s in stage 1 ({t1:.1f} s command); "
              f"{args.nproc} processes {wn:.1f} s ({tn:.1f} s command); "
              f"throughput {args.nproc} vs 1: {w1 / wn:.2f}x")
        p1, pn = r1.pieces(), rn.pieces()
        for name in p1:
            d = [float((a - b).norm() / a.norm()) for a, b in zip(p1[name], pn[name])]
            print(f"  {name}: relative difference U {d[0]:.1e}, V {d[1]:.1e}")
        s1, sn = r1.scores(), rn.scores()
        worst = max(abs(s1[k] - sn[k]) for k in s1)
        print(f"  scores: largest absolute difference {worst:.1e} over {len(s1)} scores")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
