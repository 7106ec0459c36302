"""Execution options of the stage-1 step and of verify: torch.compile (CUDA
graphs on a GPU) gives the eager step's pieces, bfloat16 autocast takes
effect and stays close, --device is checked in one line."""

import shutil

import pytest
import torch
from typer.testing import CliRunner

from apdkit import open_run
from apdkit.cli.main import app
from apdkit.stages.config import resolve_stage1
from apdkit.stages.stage1.train import new_state, train
from apdkit.stages.target import builtin_target, matrix_settings
from apdkit.targets.registry import TARGETS


def _pieces(**options):
    target = builtin_target("tms_5-2")
    cfg = resolve_stage1(TARGETS["tms_5-2"].stage1, None, steps=30, warm_start_steps=5, log_every=5,
                         checkpoint_every=5, **options)
    n_pieces, topk = matrix_settings(target, cfg)
    state = new_state(target.model, cfg, n_pieces, torch.device("cpu"), target.sample)
    train(target.model, target.sample, cfg, topk, state)
    return state.pieces()["W"]


def _rel(a, b):
    return float((a - b).norm() / a.norm())


def test_compiled_step_equals_the_eager_one():
    (U, V), (Uc, Vc) = _pieces(), _pieces(compile=True)
    assert _rel(U, Uc) < 1e-5 and _rel(V, Vc) < 1e-5


def test_bfloat16_autocast_takes_effect_and_stays_close():
    (U, V), (Ub, Vb) = _pieces(), _pieces(precision="bfloat16")
    assert not torch.equal(U, Ub)  # the forward passes really ran in bfloat16
    assert _rel(U, Ub) < 1e-2 and _rel(V, Vb) < 1e-2


@pytest.fixture
def verified(id_store, tmp_path):
    store = tmp_path / "run.zarr"
    shutil.copytree(id_store, store)
    assert CliRunner().invoke(app, ["group", "--store", str(store), "--name", "dev", "-q"]).exit_code == 0
    return store


def test_verify_device_changes_no_verdict_and_bad_devices_are_one_line(verified):
    runner = CliRunner()
    auto = runner.invoke(app, ["verify", "--store", str(verified), "--method", "dev", "--samples", "2000", "--json", "-q"])
    first = open_run(verified).verification("dev")
    cpu = runner.invoke(app, ["verify", "--store", str(verified), "--method", "dev", "--samples", "2000", "--device", "cpu", "-q",
                              "--json"])
    assert auto.exit_code == cpu.exit_code == 0, auto.output + cpu.output
    again = open_run(verified).verification("dev")
    if torch.cuda.is_available():  # auto computed on the GPU: the same verdicts, figures within float error
        assert {k: c["passed"] for k, c in first["checks"].items()} == {k: c["passed"] for k, c in again["checks"].items()}
        for name, check in first["checks"].items():
            for key, value in check.get("figures", {}).items():
                if isinstance(value, float):
                    assert again["checks"][name]["figures"][key] == pytest.approx(value, rel=1e-3, abs=1e-7), key
    else:
        assert first["checks"] == again["checks"]
    bad = runner.invoke(app, ["verify", "--store", str(verified), "--method", "dev", "--device", "gpu", "-q"])
    assert bad.exit_code == 2 and "--device 'gpu' is not one of auto, cpu, cuda" in bad.output
    if not torch.cuda.is_available():
        no_gpu = runner.invoke(app, ["verify", "--store", str(verified), "--method", "dev", "--device", "cuda", "-q"])
        assert no_gpu.exit_code == 2 and "torch sees no CUDA device" in no_gpu.output
    assert open_run(verified).verification("dev")["checks"] == again["checks"]  # failures changed nothing
