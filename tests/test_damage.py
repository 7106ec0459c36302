"""Damaged stores: every kind of damage x every reading command is one line
naming the damaged node, exit 2, and nothing changed; rerunning the stage
that wrote the node repairs it."""

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from apdkit import open_run
from apdkit.cli.main import app
from tests.helpers import store_tree

runner = CliRunner()


def apd(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    store = tmp_path_factory.mktemp("finished") / "run.zarr"
    cfg = store.parent / "small.yaml"
    cfg.write_text("steps: 400\nwarm_start_steps: 50\neval_samples: 4096\neval_chunk: 1024\n")
    result = apd("run", "--model", "tms_5-2", "--store", store, "--config", cfg, "-q")
    assert result.exit_code == 0, result.output
    return store


def _garbage(path: Path) -> None:
    path.write_text("{ not json")


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGE = {  # kind -> (what to do, the node the error must name)
    "garbage root zarr.json": (lambda s: _garbage(s / "zarr.json"), "not an apd store"),
    "deleted chunk of the pieces": (lambda s: (s / "stage1/pieces/W/U/c/0/0").unlink(), "stage1/pieces/W/U"),
    "deleted chunk of the masks": (lambda s: (s / "stage1/eval/masks/W/c/1/0").unlink(), "stage1/eval/masks/W"),
    "truncated chunk": (lambda s: _truncate(s / "stage1/eval/scores/W/c/0/0"), "stage1/eval/scores/W"),
    "damaged array zarr.json": (lambda s: _garbage(s / "stage1/pieces/W/V/zarr.json"), "stage1/pieces/W/V"),
    "deleted array": (lambda s: shutil.rmtree(s / "target/state/W.weight"), "target/state/W.weight"),
}
COMMANDS = {
    "status": lambda s: ["status", s],
    "group": lambda s: ["group", "--store", s, "--name", "again", "-q"],
    "verify": lambda s: ["verify", "--store", s, "-q"],
    "report": lambda s: ["report", s],
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damage_is_one_line_naming_the_node_and_changes_nothing(finished, tmp_path, kind):
    damage, node = DAMAGE[kind]
    for command, args in COMMANDS.items():
        store = tmp_path / f"{command}.zarr"
        shutil.copytree(finished, store)
        damage(store)
        before = store_tree(store)
        result = apd(*args(store))
        assert result.exit_code == 2, (kind, command, result.output)
        assert node in result.output, (kind, command, result.output)
        assert result.output.strip().count("\n") == 0 and "Traceback" not in result.output
        assert store_tree(store) == before, (kind, command)


def test_rerunning_the_stage_that_wrote_a_node_repairs_it(finished, tmp_path):
    store = tmp_path / "repair.zarr"
    shutil.copytree(finished, store)
    cfg = finished.parent / "small.yaml"
    reference = open_run(finished).pieces()["W"][0]
    (store / "stage1/pieces/W/U/c/0/0").unlink()
    assert apd("status", store).exit_code == 2
    result = apd("stage1", "--model", "tms_5-2", "--store", store, "--config", cfg, "-q")
    assert result.exit_code == 0, result.output
    assert (open_run(store).pieces()["W"][0] == reference).all()  # the same run again, bit for bit
    assert open_run(store).groupings() == []  # groupings of the old pieces went with them
    assert apd("group", "--store", store, "-q").exit_code == 0
    shutil.rmtree(store / "groupings/spectral/labels/W")
    assert apd("verify", "--store", store, "-q").exit_code == 2
    assert apd("group", "--store", store, "-q").exit_code == 0  # the grouping is redone
    assert apd("verify", "--store", store, "-q").exit_code == 0
    assert apd("status", store).exit_code == 0
