import shutil

import pytest
import torch

from apdkit.stages.target import ensure_target
from apdkit.stores.run import RunStore
from apdkit.targets.load import resolve_ref


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tms_target_store(tmp_path_factory):
    """A store holding only a trained tms_5-2 target (trained once per session)."""
    path = tmp_path_factory.mktemp("cache") / "tms.zarr"
    ensure_target(RunStore(path, "tms_5-2"), resolve_ref("tms_5-2"), seed=0)
    return path


@pytest.fixture
def tms_store(tms_target_store, tmp_path):
    """A fresh copy of the target-only store, for one test to write into."""
    path = tmp_path / "run.zarr"
    shutil.copytree(tms_target_store, path)
    return path


@pytest.fixture(scope="session")
def id_store(tmp_path_factory):
    """tms_5-2-id after stage 1 with the default settings (once per session)."""
    from typer.testing import CliRunner

    from apdkit.cli.main import app

    store = tmp_path_factory.mktemp("id") / "run.zarr"
    result = CliRunner().invoke(app, ["stage1", "--model", "tms_5-2-id", "--store", str(store), "-q"])
    assert result.exit_code == 0, result.output
    return store
