"""The benchmark scripts run (tiny sizes); their figures are not asserted here."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_stage1_benchmark_runs_quick():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "stage1_bench.py"), "--quick", "--only", "steps"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "speed-up" in done.stdout and "resid_mlp" in done.stdout


def test_coactivation_benchmark_runs_small(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "coactivation_bench.py"), "--samples", "20000",
                           "--pieces", "40", "--subset", "5000", "--chunk", "4096", "--dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "counts identical to a dense float64 product: True" in done.stdout


def test_gpt_benchmark_runs_quick():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpt_bench.py"), "--quick"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "top-k agreement" in done.stdout and "stage-1 step" in done.stdout


def test_attribution_cost_benchmark_runs_small():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "attribution_cost.py"), "--targets", "tms_5-2",
                           "--repeats", "1", "--batch", "64"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ablation" in done.stdout and "gradient (closed form)" in done.stdout


def test_adversarial_truth_benchmark_on_an_exact_grouping(id_store, tmp_path):
    """tms_5-2-id's default grouping is exact: the ground truth's grouping and
    the rejoined one are the same partition, so the same mechanisms are kept."""
    import shutil

    store = tmp_path / "run.zarr"
    shutil.copytree(id_store, store)
    grouped = subprocess.run([sys.executable, "-m", "apdkit.cli", "group", "--store", str(store), "-q"],
                             capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert grouped.returncode == 0, grouped.stderr[-2000:]
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "adversarial_truth.py"), str(store),
                           "--rows", "256"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {cells[0]: cells[1:] for cells in (
        [c.strip() for c in line.strip("|").split("|")] for line in done.stdout.splitlines()
        if line.startswith("| ") and not line.startswith("| grouping"))}
    assert set(rows) == {"spectral", "ground truth", "spectral, features rejoined"}
    mechanisms, kept = {r[0] for r in rows.values()}, {r[1] for r in rows.values()}
    assert mechanisms == {"6"} and len(kept) == 1  # 5 features and the identity; the same top-k error


def test_methods_table_reads_another_grouping_and_makes_it_where_missing(id_store, tmp_path):
    """A finished cell (its store and timing in place) is not rerun; with
    `--grouping mdl` the table groups and verifies it with mdl and shows those
    figures, with that time added to the cell's."""
    import json
    import shutil

    from apdkit import open_run

    store = tmp_path / "gradient" / "tms_5-2-id-0.zarr"
    shutil.copytree(id_store, store)
    store.with_suffix(".json").write_text(json.dumps({"wall_seconds": 1.0}))
    out = tmp_path / "cells.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "methods_table.py"), "--dir", str(tmp_path),
                           "--targets", "tms_5-2-id", "--seeds", "0", "--modes", "gradient", "--grouping", "mdl",
                           "--json", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert open_run(store).groupings() == ["mdl"]  # stage 1 only before: apd run was not called again
    cell = json.loads(out.read_text())["gradient/tms_5-2-id-0"]
    assert cell["ari"] == 1.0 and cell["verify_passed"] == 1.0  # the exact grouping: 5 features, the identity
    assert cell["wall_seconds"] > 1.0
    assert "verify 1/1" in done.stdout
    # without --grouping the table reads the grouping apd run makes, the target's default (spectral here;
    # induction's is mdl), also where another grouping sits beside it
    for command in (["group"], ["verify", "--method", "spectral"]):  # group: the target's default method
        made = subprocess.run([sys.executable, "-m", "apdkit.cli", *command, "--store", str(store), "-q"],
                              capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert made.returncode == 0, made.stderr[-2000:]
    assert open_run(store).groupings() == ["mdl", "spectral"]
    again = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "methods_table.py"), "--dir", str(tmp_path),
                            "--targets", "tms_5-2-id", "--seeds", "0", "--modes", "gradient", "--table-only",
                            "--json", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-2000:]
    cell = json.loads(out.read_text())["gradient/tms_5-2-id-0"]
    assert cell["ari"] == 1.0 and cell["verify_passed"] == 1.0 and cell["wall_seconds"] == 1.0
    assert cell["grouping"] == "spectral"


def test_methods_table_has_a_headline_for_every_built_in_target_with_ground_truth():
    import importlib.util

    from apdkit.targets import registry

    spec = importlib.util.spec_from_file_location("methods_table", ROOT / "benchmarks" / "methods_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    for name, target in registry.TARGETS.items():
        if target.scores is not None:  # induction-sink had none: a cell of it raised KeyError
            assert table.headline(name), name


def test_mdl_speed_benchmark_runs_on_a_store(id_store):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mdl_speed.py"), str(id_store)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    row = next(line for line in done.stdout.splitlines() if line.startswith(f"| {id_store}"))
    assert row.split("|")[4].strip() == "6"  # mechanisms: tms_5-2-id's 5 features and the identity
