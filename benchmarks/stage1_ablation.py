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

from pipeline.config import resolve_stage1
from stages.decompose import new_state, score_inputs, train
from stages.scoring import stage1_scores
from stages.target import train_target
from stages.progress import SilentReporter
from targets.registry import get_target

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
    model, _ = train_target(spec, 0, SilentReporter())
    for p in model.parameters():
        p.requires_grad_(False)
    sample = lambda b, g: spec.sample(model, b, g)  # noqa: E731
    print(f"{'variant':42s} {'seed':>4s} {'mmcs':>7s} {'ml2r':>6s} {'grouped_ml2r':>12s} {'time':>6s}")
    for label, overrides in VARIANTS.items():
        rows = []
        for seed in range(args.seeds):
            cfg = resolve_stage1(args.model, seed=seed, **overrides)
            start = time.perf_counter()
            state = train(model, sample, cfg, new_state(model, cfg, torch.device("cpu"), sample))
            seconds = time.perf_counter() - start
            x = sample(cfg.eval_samples, torch.Generator().manual_seed(seed + 3))
            _, masks = score_inputs(model, x, state.factors(), cfg)
            s = stage1_scores(model, spec.family, state.factors(), cfg, {n: m.sum(0) for n, m in masks.items()}, x.shape[0])
            rows.append(s)
            print(f"{label:42s} {seed:4d} {s['tms/mmcs']:7.4f} {s['tms/ml2r']:6.3f} {s['tms/grouped_ml2r']:12.3f} {seconds:5.1f}s")
        ok = sum(r["tms/mmcs"] >= 0.99 for r in rows)
        mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
        print(f"{label:42s} MMCS>=0.99 on {ok}/{len(rows)} seeds; mean MMCS {mean('tms/mmcs'):.4f}, "
              f"ML2R {mean('tms/ml2r'):.3f}, grouped ML2R {mean('tms/grouped_ml2r'):.3f}\n")


if __name__ == "__main__":
    main()
