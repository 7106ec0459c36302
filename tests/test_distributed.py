"""Stage 1 on torch.distributed (gloo, 2 processes on CPU): the same pieces as
one process, rank 0 alone writes, kill -9 of a rank then the same command
resumes."""

import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
import zarr

from apdkit import open_run


def _config(tmp_path, steps=300):
    cfg = tmp_path / "dp.yaml"
    cfg.write_text(f"steps: {steps}\nwarm_start_steps: 50\ncheckpoint_every: 100\nlog_every: 50\n"
                   "eval_samples: 1000\nbatch_size: 1024\ndevice: cpu\n")  # gloo on CPU, also where there is a GPU
    return cfg


TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _stage1(store, cfg, *extra, wait=True, verbose=False, launcher=()):
    cmd = [sys.executable, *launcher, "-m", "apdkit.cli", *(["-v"] if verbose else []), "stage1", "--model", "tms_5-2",
           "--store", str(store), "--config", str(cfg), *([] if verbose else ["-q"]), *extra]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _rel(a, b):
    return float((a - b).norm() / a.norm())


@pytest.fixture(scope="module")
def one_process(tms_target_store, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one")
    store = tmp / "one.zarr"
    shutil.copytree(tms_target_store, store)
    done = _stage1(store, _config(tmp))
    assert done.returncode == 0, done.stderr
    return store


def test_two_processes_learn_the_pieces_of_one(one_process, tms_store, tmp_path):
    """Started by torchrun itself; the --nproc launcher is the next test's."""
    done = _stage1(tms_store, _config(tmp_path), launcher=TORCHRUN)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("stage1 scores") == 1  # rank 0 alone prints
    (U1, V1), (U2, V2) = open_run(one_process).pieces()["W"], open_run(tms_store).pieces()["W"]
    assert _rel(U1, U2) < 1e-5 and _rel(V1, V2) < 1e-5
    s1, s2 = open_run(one_process).scores(), open_run(tms_store).scores()
    assert s1.keys() == s2.keys()
    assert all(abs(s1[k] - s2[k]) <= 1e-4 * max(1.0, abs(s1[k])) for k in s1), (s1, s2)
    assert zarr.open_group(str(tms_store), mode="r")["stage1"].attrs["world_size"] == 2
    assert zarr.open_group(str(one_process), mode="r")["stage1"].attrs["world_size"] == 1


def test_kill_9_of_a_replica_then_the_same_command_resumes(one_process, tms_store, tmp_path):
    cfg = _config(tmp_path, steps=300)
    launcher = _stage1(tms_store, cfg, "--nproc", "2", wait=False)
    ckpt = tms_store / "checkpoints" / "stage1.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and launcher.poll() is None:
        time.sleep(0.05)
    replicas = [p for p in psutil.Process(launcher.pid).children(recursive=True)
                if p.environ().get("RANK") == "1"]
    assert ckpt.exists() and replicas, "no checkpoint or no rank-1 process to kill"
    os.kill(replicas[0].pid, signal.SIGKILL)
    assert launcher.wait(timeout=120) != 0  # torchrun stops the group when a replica dies
    assert open_run(tms_store).status("stage1") == "running"
    done = _stage1(tms_store, cfg, "--nproc", "2", verbose=True)
    assert done.returncode == 0, done.stderr
    assert "resuming stage1 from step" in done.stdout + done.stderr
    (U1, V1), (U2, V2) = open_run(one_process).pieces()["W"], open_run(tms_store).pieces()["W"]
    assert _rel(U1, U2) < 1e-5 and _rel(V1, V2) < 1e-5


def test_a_batch_that_does_not_split_over_the_processes_is_one_line(tms_store, tmp_path):
    cfg = tmp_path / "odd.yaml"
    cfg.write_text("steps: 10\nbatch_size: 1001\ndevice: cpu\n")
    done = _stage1(tms_store, cfg, "--nproc", "2")
    assert done.returncode != 0
    assert "batch_size 1001 does not split evenly over 2 processes" in done.stderr


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_more_processes_than_gpus_is_one_line(monkeypatch, device):
    """Two processes on a machine with one GPU: each would take a GPU of its own."""
    from apdkit.stages.errors import StageError
    from apdkit.stages.stage1.parallel import replicas_from_env

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")  # rank 0 checks too: it is the one that prints
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(StageError, match=r"2 processes on this machine but torch sees 1 GPU\(s\).*--device cpu"):
        replicas_from_env(device)
