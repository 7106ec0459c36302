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
