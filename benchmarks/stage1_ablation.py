"""Which stage-1 defaults matter on tms_5-2: data-driven init and the
simplicity anneal, switched off one at a time, over several seeds.

    python benchmarks/stage1_ablation.py [--seeds 6] [--model tms_5-2]

Prints MMCS, ML2R and grouped ML2R per variant and seed, and a summary line per
variant. The target is trained once (seed 0) and shared by every run.
"""

from __future__ import annotations

import argparse
import time

import torch

from apdkit.stages.config import resolve_stage1
from apdkit.stages.progress import SilentReporter
from apdkit.stages.stage1.train import new_state, train
from apdkit.stages.target import builtin_target, matrix_settings, train_builtin
from apdkit.targets.registry import get_target

VARIANTS = {
    "default (data init + anneal)": {},
    "random init + anneal": {"init": "random"},
    "data init, no anneal": {"simplicity_final": 1.0},
    "published-like (random init, no anneal)": {"init": "random", "simplicity_final": 1.0},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--model", default="tms_5-2")
    args = parser.parse_args()
    spec = get_target(args.model)
    module, _ = train_builtin(spec, 0, SilentReporter())
    target = builtin_target(args.model, module=module)
    model, sample = target.model, target.sample
    print(f"{'variant':42s} {'seed':>4s} {'mmcs':>7s} {'ml2r':>6s} {'grouped_ml2r':>12s} {'time':>6s}")
    for label, overrides in VARIANTS.items():
        rows = []
        for seed in range(args.seeds):
            cfg = resolve_stage1(spec.stage1, seed=seed, **overrides)
            n_pieces, topk = matrix_settings(target, cfg)
            start = time.perf_counter()
            state = train(model, sample, cfg, topk, new_state(model, cfg, n_pieces, torch.device("cpu"), sample))
            seconds = time.perf_counter() - start
            s = spec.scores(model, state.pieces(), topk)
            rows.append(s)
            print(f"{label:42s} {seed:4d} {s['tms/mmcs']:7.4f} {s['tms/ml2r']:6.3f} {s['tms/grouped_ml2r']:12.3f} {seconds:5.1f}s")
        ok = sum(r["tms/mmcs"] >= 0.99 for r in rows)
        mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
        print(f"{label:42s} MMCS>=0.99 on {ok}/{len(rows)} seeds; mean MMCS {mean('tms/mmcs'):.4f}, "
              f"ML2R {mean('tms/ml2r'):.3f}, grouped ML2R {mean('tms/grouped_ml2r'):.3f}\n")


if __name__ == "__main__":
    main()
