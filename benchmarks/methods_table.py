"""Attribution method x minimality mode on the built-in targets with ground
truth: `apd run` per (mode, target, seed), then one table of recovery scores,
verify verdicts and time to solution.

    python benchmarks/methods_table.py --dir runs/methods \\
        --targets tms_5-2 tms_5-2-id tms_40-10 tms_40-10-id resid_mlp --seeds 0 1 2 \\
        --modes gradient integrated_gradients ablation learned [--jobs 4]

A mode is an attribution method with batch top-k minimality, or `learned`
(gates; no attribution, no k); each overrides the target's own default mode.
`learned` keeps the target's learned-mode settings where it names them (a
start of 0.1 and an error target on modadd, induction, induction-sink and
tiny_lm; elsewhere the generic fixed coefficient of 1). Runs
that finished before are read back, not rerun (delete <dir>/<mode>/<target>-
<seed>.zarr to redo one). Each `apd run`'s config and wall time are kept
beside its store. `--jobs N` runs N cells at once: they share the GPU and the
cores, so their times are upper bounds, and one run keeps several cores busy,
so 2 to 6 suit a 16-core GPU machine. `--cell-timeout S` stops a cell after S
seconds and leaves it out of the table. The table reads the grouping `apd run`
made (the target's default: spectral, mdl for induction and induction-sink);
`--grouping mdl` (or any method) reads that grouping instead, grouping and
verifying each store first where it lacks one; the time to solution then
includes it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from apdkit import open_run
from apdkit.pipeline.api import group_config, stored_ref

MODES = ("gradient", "integrated_gradients", "ablation", "learned")


def mode_config(mode: str) -> str:
    """The stage-1 YAML of a mode. It names the minimality mode too, since some
    targets default to learned gates."""
    if mode == "learned":
        return "minimality: learned\n"
    return f"minimality: topk\nattribution: {mode}\n"


def run_cell(root: Path, mode: str, target: str, seed: int, timeout: float | None = None) -> Path:
    store = root / mode / f"{target}-{seed}.zarr"
    timing = store.with_suffix(".json")
    if timing.exists():
        return store
    store.parent.mkdir(parents=True, exist_ok=True)
    cfg = store.with_suffix(".yaml")  # one per cell: cells run at once must not rewrite a file another is reading
    cfg.write_text(mode_config(mode))
    cmd = [sys.executable, "-m", "apdkit.cli", "run", "--model", target, "--seed", str(seed), "--store", str(store),
           "--config", str(cfg), "-q", "--json"]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"{mode} {target} seed {seed}: stopped after {timeout:.0f} s", file=sys.stderr, flush=True)
        return store
    wall = time.perf_counter() - start
    if done.returncode not in (0, 1):
        print(f"{mode} {target} seed {seed}: apd run failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return store
    timing.write_text(json.dumps({"wall_seconds": wall}))
    print(f"{mode:22s} {target:14s} seed {seed}: {wall:7.1f} s", file=sys.stderr, flush=True)
    return store


def add_grouping(store: Path, method: str) -> None:
    """`apd group` and `apd verify` with ``method`` on a finished cell that
    lacks that grouping; their wall time is kept beside `apd run`'s."""
    timing = store.with_suffix(".json")
    if not timing.exists() or method in open_run(store).groupings():
        return
    start = time.perf_counter()
    for verb in ("group", "verify"):
        done = subprocess.run([sys.executable, "-m", "apdkit.cli", verb, "--store", str(store), "--method", method,
                               "-q"], capture_output=True, text=True)
        if done.returncode not in (0, 1):
            print(f"{store}: apd {verb} failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            return
    times = json.loads(timing.read_text())
    times[f"{method}_seconds"] = time.perf_counter() - start
    timing.write_text(json.dumps(times))


def cell_figures(store: Path, grouping: str | None = None) -> dict[str, Any] | None:
    """The cell's scores: ground truth from stage 1, the grouping (None: the
    one `apd run` made; its name under "grouping") and verify (floats), and
    the names of the verify checks that failed."""
    timing = store.with_suffix(".json")
    if not timing.exists():
        return None
    run = open_run(store)
    out = dict(run.scores("stage1"))
    if any(k.startswith("resid/") for k in out) and "resid/dedicated_features" not in out:
        out.update(_rescore(run))  # a store from before the any-layer count
    groupings = run.groupings()
    # apd run's grouping is the target's default one (another may have been added beside it with --grouping)
    name = grouping if grouping is not None else group_config(stored_ref(store)).grouping_name
    if name in groupings:
        out["grouping"] = name
        out.update(run.grouping_info(name).get("scores", {}))
        ver = run.verification(name) or {}
        out.update(ver.get("truth", {}))
        out["verify_passed"] = float(bool(ver.get("passed")))
        out["failed_checks"] = [k for k, c in ver.get("checks", {}).items() if not c.get("passed")]
        adv = ver.get("checks", {}).get("adversarial", {}).get("figures", {})
        if adv:
            out["adversarial"] = adv["fraction_of_ablated"]
    times = json.loads(timing.read_text())
    out["wall_seconds"] = times["wall_seconds"] + (times.get(f"{grouping}_seconds", 0.0) if grouping else 0.0)
    return out


def _rescore(run) -> dict[str, float]:
    from apdkit.stages.config import Stage1Config
    from apdkit.stages.selection import scorer_activity
    from apdkit.stages.target import load_from_store, matrix_settings

    target = load_from_store(run)
    cfg = Stage1Config(**run.config("stage1"))
    _, topk = matrix_settings(target, cfg)
    pieces = run.pieces()
    return target.builtin.scores(target.model, pieces, topk, scorer_activity(target.model, pieces, run.gates(), cfg))


# per target: (label, score key, format) shown in its cell
HEADLINES = {
    "tms": [("MMCS", "tms/mmcs", "{:.3f}"), ("exact", "exact_match", "{:.0f}")],
    "tms-id": [("MMCS", "tms/mmcs", "{:.3f}"), ("id err", "faithfulness_rel_error/hidden", "{:.3f}")],
    "resid": [("dedicated", "resid/dedicated_features", "{:.0f}"), ("ARI", "ari", "{:.2f}"),
              ("merged", "merged_features", "{:.0f}")],
    "induction": [("prev", "induction/prev_token/recovered", "{:.0f}"), ("ind", "induction/induction/recovered", "{:.0f}")],
    "modadd": [("purity", "modadd/mean_purity", "{:.2f}"), ("keys", "modadd/dedicated_key_fraction", "{:.2f}")],
    "tiny_lm": [("CE rec", "tiny_lm/ce_recovered", "{:.2f}")],
}


def headline(target: str) -> list[tuple[str, str, str]]:
    if target.startswith("tms"):
        return HEADLINES["tms-id" if target.endswith("-id") else "tms"]
    if target.startswith("resid"):
        return HEADLINES["resid"]
    if target.startswith("induction"):  # induction-sink scores the same two heads
        return HEADLINES["induction"]
    return HEADLINES[target]


def cell_text(target: str, cells: list[dict[str, Any]]) -> str:
    if not cells:
        return "–"
    parts = []
    for label, key, fmt in headline(target):
        values = [c[key] for c in cells if key in c]
        if values:
            parts.append(f"{label} " + "/".join(fmt.format(v) for v in values))
    passed = sum(int(c.get("verify_passed", 0)) for c in cells)
    parts.append(f"verify {passed}/{len(cells)}")
    adv = [c["adversarial"] for c in cells if "adversarial" in c]
    if adv:
        parts.append("adv " + "/".join(f"{v:.2g}" for v in adv))
    parts.append(f"{statistics.median(c['wall_seconds'] for c in cells):.0f} s")
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("runs/methods"))
    parser.add_argument("--targets", nargs="+", default=["tms_5-2", "tms_5-2-id", "tms_40-10", "tms_40-10-id",
                                                         "resid_mlp"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--table-only", action="store_true", help="print the table of what exists; run nothing")
    parser.add_argument("--jobs", type=int, default=1, help="cells run at once")
    parser.add_argument("--cell-timeout", type=float, default=None, help="seconds before a cell is stopped")
    parser.add_argument("--grouping", default=None, help="grouping method whose figures the table shows "
                        "(default: the one apd run made)")
    parser.add_argument("--json", type=Path, default=None, help="also write every cell's figures to this file")
    args = parser.parse_args()
    if not args.table_only:
        cells = [(m, t, s) for m in args.modes for t in args.targets for s in args.seeds]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            stores = list(pool.map(lambda c: run_cell(args.dir, *c, timeout=args.cell_timeout), cells))
            if args.grouping is not None:
                list(pool.map(lambda store: add_grouping(store, args.grouping), stores))
    figures = {}
    print("| mode | " + " | ".join(args.targets) + " |")
    print("|---|" + "---|" * len(args.targets))
    for mode in args.modes:
        row = []
        for target in args.targets:
            by_seed = {s: c for s in args.seeds if (c := cell_figures(args.dir / mode / f"{target}-{s}.zarr", args.grouping))}
            figures.update({f"{mode}/{target}-{s}": c for s, c in by_seed.items()})
            cells = list(by_seed.values())
            row.append(cell_text(target, cells))
        label = "learned gates" if mode == "learned" else f"{mode}, top-k"
        print(f"| {label} | " + " | ".join(row) + " |")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
