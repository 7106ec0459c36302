"""apd verify and apd run, as a user runs them."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from cli.main import app
from stores import open_run

runner = CliRunner()


def apd(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def grouped_id(id_store, tmp_path):
    store = tmp_path / "grouped.zarr"
    shutil.copytree(id_store, store)
    result = apd("group", "--store", store, "--name", "g", "-q")
    assert result.exit_code == 0, result.output
    return store


def test_verify_passes_on_a_good_decomposition(grouped_id):
    result = apd("verify", "--store", grouped_id, "--method", "g", "--json", "-q")
    assert result.exit_code == 0, result.output
    ver = open_run(grouped_id).verification("g")
    assert ver["passed"]
    mini = ver["checks"]["minimality"]["figures"]
    assert mini["mechanisms/fraction_of_ablated"] < 0.1
    # mechanisms: the identity is one, so fewer active per input than pieces
    assert mini["mechanisms/mean_active"] < mini["pieces/mean_active"]
    assert ver["checks"]["simplicity"]["figures"]["max_mechanism_rank"] == 2


def test_verify_catches_a_perturbed_mechanism(grouped_id):
    labels = open_run(grouped_id).grouping("g")["W"]
    g = int(labels[labels >= 0][0])
    U = zarr.open_array(str(grouped_id / "stage1" / "factors" / "W" / "U"), mode="r+")
    u = np.asarray(U[...])
    u[labels == g] *= 1.5  # one mechanism no longer adds up
    U[...] = u
    result = apd("verify", "--store", grouped_id, "--method", "g", "-q")
    assert result.exit_code == 1
    assert "failed: faithfulness" in result.output


def test_verify_without_grouping_is_a_clear_error(id_store):
    result = apd("verify", "--store", id_store, "--method", "nope", "-q")
    assert result.exit_code == 2 and "no finished grouping 'nope'" in result.output
    assert result.output.strip().count("\n") == 0


def test_run_refuses_a_store_of_another_model(id_store):
    result = apd("run", "--model", "resid_mlp", "--store", id_store, "-q")
    assert result.exit_code == 2 and "not 'resid_mlp'" in result.output


def _final_figures(store):
    run = open_run(store)
    ver = run.verification("spectral")
    U, V = run.subcomponents()["W"]
    return ver["checks"], run.grouping("spectral")["W"].tolist(), U.numpy().tobytes()


def test_kill_9_anywhere_then_rerun_gives_the_same_result(tms_target_store, tmp_path):
    """Kill `apd run` at random moments (target cached, so the kills land in
    stage 1, grouping and verify), rerun each time; the end result equals an
    uninterrupted run's."""
    cfg = tmp_path / "small.yaml"
    cfg.write_text("steps: 800\nwarm_start_steps: 50\ncheckpoint_every: 100\nlog_every: 50\neval_samples: 4000\n")
    cmd = [sys.executable, "-m", "cli", "run", "--model", "tms_5-2", "--config", str(cfg), "-q"]
    reference = tmp_path / "reference.zarr"
    shutil.copytree(tms_target_store, reference)
    t = time.time()
    subprocess.run([*cmd, "--store", str(reference)], check=True, capture_output=True)
    full = time.time() - t
    store = tmp_path / "killed.zarr"
    shutil.copytree(tms_target_store, store)
    rng = random.Random(0)
    for _ in range(4):
        proc = subprocess.Popen([*cmd, "--store", str(store)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, full))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        open_run(store)  # readable after every kill
    done = subprocess.run([*cmd, "--store", str(store)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert _final_figures(store) == _final_figures(reference)
