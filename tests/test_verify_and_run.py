"""apd verify and apd run, as a user runs them."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from apdkit.cli.main import app
from apdkit import open_run

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
    info = open_run(grouped_id).grouping_info("g")
    assert info["together_min"] == 0.3
    # each feature's pieces one mechanism of their own (the identity's pieces are no feature's)
    assert info["scores"]["merged_features"] == 0 and info["scores"]["split_features"] == 0
    assert ver["checks"]["faithfulness"]["figures"]["set_aside/fraction_of_ablated"] < 0.05
    mini = ver["checks"]["minimality"]["figures"]
    assert mini["mechanisms/fraction_of_ablated"] < 0.1
    # mechanisms: the identity is one, so fewer active per input than pieces
    assert mini["mechanisms/mean_active"] < mini["pieces/mean_active"]
    assert ver["checks"]["simplicity"]["figures"]["max_mechanism_rank"] == 2
    assert ver["checks"]["simplicity"]["figures"]["unions"] == 0
    for check in ("stochastic", "resample", "adversarial"):
        assert ver["checks"][check]["figures"]["fraction_of_ablated"] < 0.1, check
    adv = ver["checks"]["adversarial"]["figures"]
    assert adv["steps"] == 20 and adv["inputs"] == adv["rows"] == 2048
    assert adv["fraction_of_ablated"] >= adv["typical/fraction_of_ablated"]  # the search starts from a random point


def test_verify_catches_a_perturbed_mechanism(grouped_id):
    labels = open_run(grouped_id).grouping("g")["W"]
    g = int(labels[labels >= 0][0])
    from apdkit.stores.run import STAGE1, RunStore

    run = open_run(grouped_id)
    pieces = run.pieces()
    U, V = pieces["W"]
    U[torch.from_numpy(labels == g)] *= 1.5  # one mechanism no longer adds up
    store = RunStore(grouped_id, run.model_name)
    store.write_stage1_pieces(pieces)  # a wrong decomposition, stored whole (with its checksums)
    store.set_stage(STAGE1, "done", **{k: v for k, v in run.attrs(STAGE1).items() if k not in ("status", "checksums")})
    result = apd("verify", "--store", grouped_id, "--method", "g", "-q")
    assert result.exit_code == 1
    assert "failed: faithfulness" in result.output


def test_verify_catches_weight_held_by_dead_pieces(grouped_id):
    """An alive piece grows threefold and a dead piece takes the extra back:
    the pieces still sum to W, but the mechanisms alone do not."""
    import numpy as np

    from apdkit.stores.run import STAGE1, RunStore

    run = open_run(grouped_id)
    labels = run.grouping("g")["W"]
    pieces = run.pieces()
    U, V = pieces["W"]
    p = int(np.flatnonzero(labels >= 0)[0])
    dead_pieces = np.flatnonzero(labels < 0)  # the one holding the least weight is overwritten
    dead = int(dead_pieces[np.argmin([float(U[d].norm() * V[d].norm()) for d in dead_pieces])])
    W = U.T @ V  # the pieces' sum: W up to stage 1's error
    lost = float(torch.outer(U[dead], V[dead]).norm() / W.norm())  # the overwritten piece's own term
    U[dead], V[dead] = -2 * U[p], V[p]
    U[p] *= 3
    expected_share = float((U[dead_pieces].T @ V[dead_pieces]).norm() / W.norm())
    store = RunStore(grouped_id, run.model_name)
    store.write_stage1_pieces(pieces)
    store.set_stage(STAGE1, "done", **{k: v for k, v in run.attrs(STAGE1).items() if k not in ("status", "checksums")})
    result = apd("verify", "--store", grouped_id, "--method", "g", "-q")
    assert result.exit_code == 1, result.output
    faith = open_run(grouped_id).verification("g")["checks"]["faithfulness"]
    assert not faith["passed"]
    # the pieces still sum to W but for that term (stage 1's own error is ~4e-4): the set-aside condition,
    # not the sum, is what fails
    assert faith["figures"]["rel_error/W"] == pytest.approx(lost, abs=0.002)
    assert faith["figures"]["set_aside_share/W"] == pytest.approx(expected_share, rel=0.02)
    assert faith["figures"]["set_aside/fraction_of_ablated"] > 0.1
    # per matrix: the hidden identity has no set-aside pieces, so W's alone make the whole condition
    assert faith["figures"]["set_aside_share/hidden"] == 0.0
    assert faith["figures"]["set_aside_effect/hidden"] < 0.01
    assert faith["figures"]["set_aside_effect/W"] == pytest.approx(faith["figures"]["set_aside/fraction_of_ablated"],
                                                                   rel=1e-6)


def test_verify_catches_cancelling_pieces_in_inactive_mechanisms(grouped_id):
    """Piece p (mechanism A) also reads piece q's input direction, 6 U_p V_q^T,
    and piece q (mechanism B) gives that term back: V_p += 6 V_q, U_q -= 6 U_p.
    Both stay rank 1 and the sum is still W exactly, but an input that has
    one of A and B on and the other off is far off."""
    import numpy as np

    from apdkit.stores.run import STAGE1, RunStore

    run = open_run(grouped_id)
    labels = run.grouping("g")["W"]
    pieces = run.pieces()
    U, V = pieces["W"]
    p, q = (int(np.flatnonzero(labels == g)[0]) for g in (0, 1))
    V[p] += 6 * V[q]
    U[q] -= 6 * U[p]
    store = RunStore(grouped_id, run.model_name)
    store.write_stage1_pieces(pieces)
    store.set_stage(STAGE1, "done", **{k: v for k, v in run.attrs(STAGE1).items() if k not in ("status", "checksums")})
    result = apd("verify", "--store", grouped_id, "--method", "g", "-q")
    assert result.exit_code == 1, result.output
    checks = open_run(grouped_id).verification("g")["checks"]
    assert checks["faithfulness"]["passed"], checks["faithfulness"]["figures"]  # the pieces still sum to W
    for check in ("stochastic", "resample", "adversarial"):
        assert not checks[check]["passed"], (check, checks[check]["figures"])
    adv = checks["adversarial"]["figures"]
    assert adv["fraction_of_ablated"] > adv["typical/fraction_of_ablated"]


def test_verify_catches_a_union_of_two_mechanisms(grouped_id):
    """One feature's piece joined to the hidden identity's mechanism (as
    spectral grouping did on tms_5-2-id seed 4): the grouping is shorter to
    describe than the ungrouped pieces, but not than with the feature apart."""
    import numpy as np

    from apdkit.stages.group.coactivation import group_activity_counts
    from apdkit.stages.group.mechanisms import relabel
    from apdkit.stores.run import RunStore

    run = open_run(grouped_id)
    info, labels = run.grouping_info("g"), run.grouping("g")
    identity = int(labels["hidden"][0])
    assert set(labels["hidden"].tolist()) == {identity}  # the identity's pieces: one mechanism
    W = labels["W"].copy()
    feature = int(W[(W >= 0) & (W != identity)][0])
    W[W == feature] = identity
    flat = relabel(np.concatenate([W, labels["hidden"]]))
    n_groups = int(flat.max()) + 1
    activity = group_activity_counts(run.eval_masks_dask(["W", "hidden"]), flat, n_groups)
    attrs = {k: v for k, v in info.items() if k not in ("status", "checksums", "identity", "scores")}
    attrs.update(n_groups=n_groups, activity=activity.tolist(),
                 mean_active_mechanisms=float(activity.sum() / run.masks()["W"].shape[0]))
    RunStore(grouped_id, run.model_name).write_grouping("union", {"W": flat[:len(W)], "hidden": flat[len(W):]},
                                                        **attrs)
    result = apd("verify", "--store", grouped_id, "--method", "union", "-q")
    assert result.exit_code == 1, result.output
    assert "failed: simplicity" in result.output
    simp = open_run(grouped_id).verification("union")["checks"]["simplicity"]["figures"]
    assert simp["unions"] == 1
    assert simp["description_length_per_input"] < simp["pieces_description_length_per_input"]


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
    U, V = run.pieces()["W"]
    return ver["checks"], run.grouping("spectral")["W"].tolist(), U.numpy().tobytes()


STAGES = ("stage1", "group", "verify")


def _stages_done(store) -> int:
    """How many of STAGES a store has finished (0 when it is not readable yet)."""
    try:
        run = open_run(store)
    except Exception:
        return 0
    if run.status("stage1") != "done":
        return 0
    if "spectral" not in run.groupings():
        return 1
    return 2 if run.verification("spectral") is None else 3


def _stage1_checkpoint_step(store) -> int:
    """The step of stage 1's last checkpoint (0 before the first one)."""
    try:
        return open_run(store).checkpoint_step("stage1") or 0
    except Exception:  # the store or checkpoint is being created
        return 0


def test_kill_9_in_each_stage_then_rerun_gives_the_same_result(tms_target_store, tmp_path):
    """kill -9 `apd run` inside stage 1, just after a checkpoint picked at
    random, then (rerun) the moment stage 1 is done, i.e. inside grouping,
    then (rerun) the moment grouping is done, i.e. inside verify; the store
    stays readable, and the final rerun ends with the same result as an
    uninterrupted run. Each kill waits for the store's own progress, never
    for a time, so a slow or fast machine kills in the same stage."""
    cfg = tmp_path / "small.yaml"
    cfg.write_text("steps: 800\nwarm_start_steps: 50\ncheckpoint_every: 100\nlog_every: 50\neval_samples: 20000\n")
    cmd = [sys.executable, "-m", "apdkit.cli", "run", "--model", "tms_5-2", "--config", str(cfg), "-q"]
    reference = tmp_path / "reference.zarr"
    shutil.copytree(tms_target_store, reference)
    subprocess.run([*cmd, "--store", str(reference)], check=True, capture_output=True)
    store = tmp_path / "killed.zarr"
    shutil.copytree(tms_target_store, store)
    rng = random.Random(0)
    killed_in = []
    for stage in range(3):
        proc = subprocess.Popen([*cmd, "--store", str(store)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if stage == 0:  # 800 steps, a checkpoint every 100: kill after one of the first five
            kill_after = 100 * rng.randint(1, 5)
            while _stage1_checkpoint_step(store) < kill_after and _stages_done(store) == 0 and proc.poll() is None:
                time.sleep(0.002)
        else:
            while _stages_done(store) < stage and proc.poll() is None:
                time.sleep(0.002)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            killed_in.append((STAGES[stage], _stages_done(store)))
        proc.wait()
        open_run(store)  # readable after every kill
    assert ("stage1", 0) in killed_in and ("group", 1) in killed_in
    done = subprocess.run([*cmd, "--store", str(store)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert _final_figures(store) == _final_figures(reference)
    print("killed during (stage, stages done at the kill):", killed_in)
