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
