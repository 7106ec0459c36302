import json
import os

import pytest
import torch

from apdkit.stores.run import ROOT_ATTR, RunStore, StoreError, check_writable, open_run


def test_refuses_a_file_and_a_foreign_directory(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(StoreError, match="not a directory"):
        check_writable(f, "tms_5-2")
    d = tmp_path / "dir"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not an apd store"):
        RunStore(d, "tms_5-2")
    assert sorted(p.name for p in d.iterdir()) == ["notes.txt"]


def test_refuses_a_path_under_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(StoreError, match="is not a directory"):
        check_writable(f / "run.zarr", "tms_5-2")


def test_refuses_other_model_and_other_format(tmp_path):
    path = tmp_path / "run.zarr"
    RunStore(path, "tms_5-2")
    with pytest.raises(StoreError, match="holds a run of model 'tms_5-2', not 'resid_mlp'"):
        RunStore(path, "resid_mlp")
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"][ROOT_ATTR]["format"] = 999
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="store format 999"):
        open_run(path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_refuses_unwritable_parent(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(StoreError, match="not writable"):
            check_writable(ro / "run.zarr", "tms_5-2")
    finally:
        ro.chmod(0o700)


def test_checkpoint_is_replaced_atomically(tmp_path):
    store = RunStore(tmp_path / "run.zarr", "tms_5-2")
    store.save_checkpoint("stage1", {"step": 1, "t": torch.ones(2)})
    store.save_checkpoint("stage1", {"step": 2, "t": torch.ones(2)})
    assert store.load_checkpoint("stage1")["step"] == 2
    assert not any(p.suffix == ".tmp" for p in store.checkpoint_path("stage1").parent.iterdir())


def test_reading_an_unfinished_stage_is_a_clear_error(tmp_path):
    RunStore(tmp_path / "run.zarr", "tms_5-2")
    with pytest.raises(StoreError, match="stage1 is absent, not done"):
        open_run(tmp_path / "run.zarr").pieces()


class _Payload:
    """Unpickling this runs code: a checkpoint must never be loaded so."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_pickle_checkpoint_is_refused_and_runs_nothing(tms_store, tmp_path):
    from typer.testing import CliRunner

    from apdkit.cli.main import app

    marker = tmp_path / "pwned"
    ckpt = tms_store / "checkpoints" / "stage1.pt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": {}, "state": {"step": 1, "x": _Payload(marker)}}, ckpt)
    store = RunStore(tms_store, "tms_5-2")
    store.set_stage("stage1", "running")  # an interrupted run
    for args in (["status", str(tms_store)], ["stage1", "--model", "tms_5-2", "--store", str(tms_store), "-q"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, result.output
        assert "not a valid apd checkpoint" in result.output and result.output.strip().count("\n") == 0
    assert not marker.exists()


def test_one_writer_at_a_time_and_kill_9_frees_the_lock(tmp_path):
    import signal
    import subprocess
    import sys

    from apdkit.stores.run import writer_lock

    path = tmp_path / "run.zarr"
    RunStore(path, "tms_5-2")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from apdkit.stores.run import writer_lock\n"
        f"with writer_lock({str(path)!r}):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(StoreError, match=f"being written by another apd process \\(pid {holder.pid}"):
        with writer_lock(path):
            pass
    from typer.testing import CliRunner

    from apdkit.cli.main import app

    result = CliRunner().invoke(app, ["stage1", "--model", "tms_5-2", "--store", str(path), "-q"])
    assert result.exit_code == 2 and f"pid {holder.pid}" in result.output
    assert result.output.strip().count("\n") == 0
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with writer_lock(path):  # the OS released the dead holder's lock
        with writer_lock(path):  # re-entrant within one process
            pass


def test_every_stage_group_opens_as_a_labelled_xarray_dataset(id_store, tmp_path):
    import shutil
    import warnings

    import xarray as xr
    from typer.testing import CliRunner

    from apdkit.cli.main import app

    store = tmp_path / "run.zarr"
    shutil.copytree(id_store, store)
    assert CliRunner().invoke(app, ["group", "--store", str(store), "-q"]).exit_code == 0
    expected = {
        "stage1/pieces/W": {"piece": 10, "d_out": 2, "d_in": 5},
        "stage1/eval": {"sample": 10000, "input_dim_1": 5},
        # the hidden identity is kept whole (2 pieces): each matrix's piece axis is named for it
        "stage1/eval/scores": {"row": 10000, "piece.W": 10, "piece.hidden": 2},
        "stage1/eval/masks": {"row": 10000, "piece.W": 10, "piece.hidden": 2},
        "stage1/metrics": {"log": 22},
        "groupings/spectral/labels": {"piece.W": 10, "piece.hidden": 2},
        "target/state": {"W.weight.dim_0": 2, "W.weight.dim_1": 5, "W_T.weight.dim_0": 2, "W_T.weight.dim_1": 5,
                         "W_T.bias.dim_0": 5, "hidden.weight.dim_0": 2, "hidden.weight.dim_1": 2},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # xarray notes that the store has no consolidated metadata
        for group, sizes in expected.items():
            ds = xr.open_zarr(store, group=group, consolidated=False)
            assert dict(ds.sizes) == sizes, group
    pieces = xr.open_zarr(store, group="stage1/pieces/W", consolidated=False)
    U, V = open_run(store).pieces()["W"]
    assert (pieces["U"].values == U.numpy()).all() and pieces["V"].dims == ("piece", "d_in")


def test_docs_store_md_lists_exactly_the_nodes_a_run_writes(id_store, tmp_path):
    """docs/store.md keeps saying what is on disk."""
    import re
    import shutil
    from pathlib import Path

    import zarr
    from typer.testing import CliRunner

    from apdkit.cli.main import app

    store = tmp_path / "run.zarr"
    shutil.copytree(id_store, store)
    for args in (["group", "--store", str(store), "--name", "docs", "-q"],
                 ["verify", "--store", str(store), "--method", "docs", "-q"], ["report", str(store), "--method", "docs"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code in (0, 1), result.output
    doc = (Path(__file__).resolve().parents[1] / "docs" / "store.md").read_text()
    documented = set(re.findall(r"^\| `([^`]+)`", doc, re.M))
    matrices, names = {"W", "hidden"}, set(open_run(store).groupings())

    def placeholder(path: str) -> str:
        parts = path.split("/")
        if parts[:2] == ["target", "state"]:
            return "target/state/<key>"
        if parts[:2] == ["stage1", "metrics"]:
            return "stage1/metrics/<name>"
        return "/".join("<matrix>" if p in matrices else "<name>" if p in names else p for p in parts)

    root = zarr.open_group(str(store), mode="r")
    arrays = {placeholder(path) for path, node in root.members(max_depth=None) if isinstance(node, zarr.Array)}
    files = {str(p.relative_to(store)) for p in store.rglob("*") if p.is_file() and p.name != "zarr.json"
             and not p.relative_to(store).parts[0] in {"target", "stage1", "groupings"}}
    doc_arrays = {d for d in documented if d.startswith(("target/", "stage1/", "groupings/"))
                  and not d.startswith("stage1/gates/")}  # a top-k store has no gates (test_learned_gates)
    assert arrays == doc_arrays
    assert files <= documented, files - documented
    assert {"/"} <= documented and set(root.attrs) == {"apd", "provenance"}
