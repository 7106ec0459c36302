"""Long ground-truth runs at the default settings (``make test-slow``)."""

import pytest
from typer.testing import CliRunner

from apdkit.cli.main import app
from apdkit import open_run

pytestmark = pytest.mark.slow
runner = CliRunner()


def stage1(tmp_path, model, *extra):
    store = tmp_path / f"{model}.zarr"
    result = runner.invoke(app, ["stage1", "--model", model, "--store", str(store), "-q", *map(str, extra)])
    assert result.exit_code == 0, result.output
    return open_run(store).scores()


@pytest.mark.parametrize("seed", range(4))
def test_tms_5_2_recovers_on_every_seed(tmp_path, seed):
    scores = stage1(tmp_path, "tms_5-2", "--seed", seed)
    assert scores["tms/mmcs"] >= 0.99
    assert scores["tms/grouped_ml2r"] >= 0.95


def test_tms_40_10_recovers(tmp_path):
    assert stage1(tmp_path, "tms_40-10")["tms/mmcs"] >= 0.99


def test_resid_mlp_dedicated_w_in_pieces_and_faithful(tmp_path):
    scores = stage1(tmp_path, "resid_mlp")
    assert scores["resid/dedicated_features/layers.0.W_in"] >= 95
    assert scores["faithfulness_rel_error/layers.0.W_in"] <= 1e-2
    assert scores["faithfulness_rel_error/layers.0.W_out"] <= 1e-2
