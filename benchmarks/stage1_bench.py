"""Speed and memory of stage 1, measured in this process against this machine.

    python benchmarks/stage1_bench.py                 # everything (about 15 minutes on 2 cores)
    python benchmarks/stage1_bench.py --quick         # tiny sizes: checks the script runs
    python benchmarks/stage1_bench.py --only steps    # one section: steps, solution, scaling, compile

Sections:
- steps: for each built-in target at its default config, the median time of a
  training step split into its phases, the step's matrix-multiply FLOPs (counted
  by torch's FlopCounterMode) and achieved rate against the machine's own sgemm
  rate, the bare cost of the step's matrix multiplies (the same shapes replayed
  alone), the fast attributions against the per-output-dimension reference
  (speed ratio, largest relative difference), and peak resident memory. Each
  target runs in a fresh subprocess so peak memory is its own.
- solution: steps and wall time until the recovery criteria of the stage-1
  issue hold, with the default settings, from a trained target.
- scaling: resid_mlp step time and peak memory with C x1, x4, x16 and with
  d_embed 1000 and 4000.
- compile: the torch.compile path against eager on resid_mlp.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from apdkit.core.attributions import attributions, reference_attributions
from apdkit.core.pieces import pieces_sum, unit_rows
from apdkit.stages.config import resolve_stage1
from apdkit.stages.progress import SilentReporter
from apdkit.stages.stage1.objective import objective
from apdkit.stages.stage1.train import coefficients, new_state, simplicity_weight_at, train
from apdkit.stages.target import builtin_target, matrix_settings, train_builtin
from apdkit.targets.probes import dedicated_pieces, one_hot_probe
from apdkit.targets.registry import TARGETS, get_target
from apdkit.targets.tms.scoring import feature_recovery

aten = torch.ops.aten
MATMUL_OPS = {aten.mm.default, aten.addmm.default, aten.bmm.default}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine_gflops(n: int = 2048, repeats: int = 10) -> float:
    """This machine's float32 matrix-multiply rate: the limit."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t) / 1e9


class Stopwatch:
    """Accumulates wall time per named section of a step."""

    def __init__(self):
        self.times: dict[str, list[float]] = {}

    @contextmanager
    def __call__(self, section: str):
        t = time.perf_counter()
        yield
        self.times.setdefault(section, []).append(time.perf_counter() - t)


class MatmulRecorder(TorchDispatchMode):
    """Records the shapes of every matrix multiply dispatched."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in MATMUL_OPS:
            self.calls.append((func, tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args)))
        return func(*args, **(kwargs or {}))


def replay_seconds(calls: list[tuple], repeats: int) -> float:
    """Median time of running just these matrix multiplies, shapes as recorded."""
    tensors = [(func, [torch.randn(*s) if isinstance(s, tuple) else s for s in shapes]) for func, shapes in calls]
    times = []
    for _ in range(repeats + 2):
        t = time.perf_counter()
        for func, args in tensors:
            func(*args)
        times.append(time.perf_counter() - t)
    return statistics.median(times[2:])


def step_figures(name: str, steps: int, cfg_overrides: dict | None = None, arch_overrides: dict | None = None,
                 reference: bool = True) -> dict:
    """One target's step: phase times, FLOPs, bare matmul cost, attributions."""
    target = builtin_target(name, arch_overrides)
    model, sample = target.model, target.sample
    cfg = resolve_stage1(get_target(name).stage1, **(cfg_overrides or {}))
    n_pieces, topk = matrix_settings(target, cfg)
    state = new_state(model, cfg, n_pieces, torch.device("cpu"), sample)
    weights = model.weights()
    gen = torch.Generator().manual_seed(0)
    step_no = cfg.warm_start_steps + 1
    loss_fn = torch.compile(objective) if cfg.compile else objective

    def one_step(timer):
        x = sample(cfg.batch_size, gen)
        V = {n: unit_rows(v) for n, v in state.V_raw.items()}
        losses = loss_fn(model, x, weights, state.U, V, topk, coefficients(cfg), cfg.schatten_p,
                         simplicity_weight_at(cfg, step_no), timer=timer)
        with timer("backward"):
            state.optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
        with timer("optimizer"):
            state.optimizer.step()

    warm = 5 if not cfg.compile else 3
    for _ in range(warm):
        one_step(Stopwatch())
    watch, totals = Stopwatch(), []
    for _ in range(steps):
        t = time.perf_counter()
        one_step(watch)
        totals.append(time.perf_counter() - t)
    out = {"target": name, "C": next(iter(n_pieces.values())), "batch": cfg.batch_size,
           "step_ms": 1e3 * statistics.median(totals),
           "phases_ms": {k: 1e3 * statistics.median(v) for k, v in watch.times.items()}}
    if not cfg.compile:
        with FlopCounterMode(display=False) as counter:
            one_step(Stopwatch())
        out["step_gflop"] = counter.get_total_flops() / 1e9
        recorder = MatmulRecorder()
        with recorder:
            one_step(Stopwatch())
        out["bare_matmul_ms"] = 1e3 * replay_seconds(recorder.calls, max(3, steps // 2))
        out["matmul_calls"] = len(recorder.calls)
    if reference:
        x = sample(cfg.batch_size, gen)
        factors = state.pieces()
        for _ in range(2):
            t = time.perf_counter()
            fast, _ = attributions(model, x, factors)
            fast_s = time.perf_counter() - t
        t = time.perf_counter()
        slow = reference_attributions(model, x, factors)
        slow_s = time.perf_counter() - t
        out["attr_fast_ms"], out["attr_reference_ms"] = 1e3 * fast_s, 1e3 * slow_s
        out["attr_max_rel_diff"] = max(float((fast[n] - slow[n]).abs().max() / slow[n].abs().max()) for n in fast)
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def solution_figures(name: str, overrides: dict | None = None) -> dict:
    """Steps and seconds of stage 1 (after target training) until the stage-1
    recovery criteria hold, checked every log_every steps."""
    spec = get_target(name)
    module, _ = train_builtin(spec, 0, SilentReporter())
    target = builtin_target(name, module=module)
    model, sample = target.model, target.sample
    cfg = resolve_stage1(spec.stage1, **(overrides or {}))
    n_pieces, topk = matrix_settings(target, cfg)
    checking = {"s": 0.0}

    def solved(state) -> bool:
        t = time.perf_counter()
        f = state.pieces()
        faith_ok = all(float((w - pieces_sum(*f[n])).norm() / w.norm()) <= 1e-2 for n, w in model.weights().items())
        if name.startswith("tms"):
            ok = feature_recovery(module.W.weight, *f["W"])["mmcs"] >= 0.99
        else:
            scores, masks, _ = one_hot_probe(model, module.n_features, f, topk)
            n_in = [k for k in f if k.endswith("W_in")]
            ok = faith_ok and all(int(dedicated_pieces(scores[k], masks[k]).sum()) >= 95 for k in n_in)
        checking["s"] += time.perf_counter() - t
        return ok

    class Solved(Exception):
        pass

    start = time.perf_counter()
    state = new_state(model, cfg, n_pieces, torch.device("cpu"), sample)

    def on_log(row):
        if solved(state):
            raise Solved

    try:
        train(model, sample, cfg, topk, state, on_log=on_log)
        reached = False
    except Solved:
        reached = True
    seconds = time.perf_counter() - start - checking["s"]
    return {"target": name, "solved": reached, "steps": state.step, "of_steps": cfg.warm_start_steps + cfg.steps,
            "seconds": seconds, "peak_rss_mib": peak_rss_mib()}


def in_subprocess(kind: str, **kwargs) -> dict:
    """Run one measurement in a fresh interpreter (its own peak memory)."""
    cmd = [sys.executable, __file__, "--worker", json.dumps({"kind": kind, **kwargs})]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def worker(spec: dict) -> None:
    torch.manual_seed(0)
    kind = spec.pop("kind")
    result = step_figures(**spec) if kind == "step" else solution_figures(**spec)
    print(json.dumps(result))


def fmt_steps(rows: list[dict], limit: float) -> None:
    print(f"{'target':14s} {'C':>5s} {'batch':>5s} {'step ms':>8s} {'GFLOP':>7s} {'GFLOP/s':>8s} {'of peak':>7s} "
          f"{'bare mm ms':>10s} {'step/bare':>9s} {'attr fast ms':>12s} {'reference ms':>12s} {'speed-up':>8s} "
          f"{'max rel diff':>12s} {'RSS MiB':>7s}")
    for r in rows:
        rate = r["step_gflop"] / (r["step_ms"] / 1e3)
        print(f"{r['target']:14s} {r['C']:5d} {r['batch']:5d} {r['step_ms']:8.2f} {r['step_gflop']:7.3f} {rate:8.1f} "
              f"{rate / limit:7.1%} {r['bare_matmul_ms']:10.2f} {r['step_ms'] / r['bare_matmul_ms']:9.2f} "
              f"{r['attr_fast_ms']:12.2f} {r['attr_reference_ms']:12.1f} {r['attr_reference_ms'] / r['attr_fast_ms']:7.0f}x "
              f"{r['attr_max_rel_diff']:12.1e} {r['peak_rss_mib']:7.0f}")
    print("phases (median ms):")
    for r in rows:
        print(f"  {r['target']:14s} " + ", ".join(f"{k} {v:.2f}" for k, v in r["phases_ms"].items()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    parser.add_argument("--only", choices=["steps", "solution", "scaling", "compile"], default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    sections = [args.only] if args.only else ["steps", "solution", "scaling", "compile"]
    steps = 3 if args.quick else 30
    limit = machine_gflops(512 if args.quick else 2048, 3 if args.quick else 10)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; float32 matmul rate {limit:.1f} GFLOP/s")
    quick_cfg = {"batch_size": 32, "n_pieces": 8} if args.quick else {}
    if "steps" in sections:
        names = ["tms_5-2", "resid_mlp"] if args.quick else list(TARGETS)
        rows = [in_subprocess("step", name=n, steps=steps, cfg_overrides=quick_cfg) for n in names]
        print("\n== training step at the default config (fresh process per target)")
        fmt_steps(rows, limit)
    if "solution" in sections and not args.quick:
        print("\n== time to solution (stage 1 from a trained target; criteria of the stage-1 issue)")
        for n in ["tms_5-2", "tms_40-10", "resid_mlp"]:
            for label, overrides in (("default", {}), ("random init (before)", {"init": "random"})):
                r = in_subprocess("solution", name=n, overrides=overrides)
                print(f"  {n:10s} {label:21s} solved {r['solved']} after {r['steps']} of {r['of_steps']} steps, "
                      f"{r['seconds']:.1f}s, peak RSS {r['peak_rss_mib']:.0f} MiB")
    if "scaling" in sections:
        print("\n== resid_mlp scaling (fresh process each)")
        base_c = 8 if args.quick else 130
        rows = []
        for mult in (1, 4, 16):
            cfg = {**quick_cfg, "n_pieces": base_c * mult}
            rows.append(("C x%d" % mult, in_subprocess("step", name="resid_mlp", steps=steps, cfg_overrides=cfg, reference=False)))
        for width in ((1000, 4000) if not args.quick else (1000, 2000)):
            rows.append((f"d_embed {width}", in_subprocess("step", name="resid_mlp", steps=steps, cfg_overrides=quick_cfg,
                                                            arch_overrides={"d_embed": width}, reference=False)))
        base = rows[0][1]
        for label, r in rows:
            print(f"  {label:14s} C {r['C']:5d}: step {r['step_ms']:8.2f} ms ({r['step_ms'] / base['step_ms']:5.2f}x), "
                  f"peak RSS {r['peak_rss_mib']:6.0f} MiB ({r['peak_rss_mib'] / base['peak_rss_mib']:4.2f}x), "
                  f"step/bare matmuls {r['step_ms'] / r['bare_matmul_ms']:.2f}")
    if "compile" in sections:
        print("\n== torch.compile against eager (resid_mlp)")
        eager = in_subprocess("step", name="resid_mlp", steps=steps, cfg_overrides=quick_cfg, reference=False)
        t = time.perf_counter()
        compiled = in_subprocess("step", name="resid_mlp", steps=steps, cfg_overrides={**quick_cfg, "compile": True},
                                 reference=False)
        print(f"  eager {eager['step_ms']:.2f} ms/step; compiled {compiled['step_ms']:.2f} ms/step "
              f"({eager['step_ms'] / compiled['step_ms']:.2f}x), compile + run took {time.perf_counter() - t:.0f}s")


if __name__ == "__main__":
    main()
