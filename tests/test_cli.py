"""The CLI's habits: version, settings round trip, plain logs in pipes, user
text never read as markup."""

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from apdkit.cli.main import app
from apdkit.pipeline.api import group_config, stage1_config, stored_ref
from apdkit.stages.config import resolve_group, resolve_verify
from apdkit.targets.load import resolve_ref
from apdkit.targets.registry import TARGETS

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("apdkit ")


@pytest.mark.parametrize("model", list(TARGETS))
def test_config_show_round_trips_through_config(model, tmp_path):
    shown = runner.invoke(app, ["config", "show", "--model", model])
    assert shown.exit_code == 0, shown.output
    f = tmp_path / "c.yaml"
    f.write_text(shown.output)
    ref = resolve_ref(model)
    assert stage1_config(ref, f) == stage1_config(ref)
    again = runner.invoke(app, ["config", "show", "--model", model, "--config", str(f)])
    assert again.output == shown.output


def test_group_and_verify_config_round_trip(tmp_path):
    for stage, resolve in (("group", resolve_group), ("verify", resolve_verify)):
        f = tmp_path / f"{stage}.yaml"
        f.write_text(runner.invoke(app, ["config", "show", "--stage", stage]).output)
        assert resolve(f) == resolve(None)


def test_a_built_in_target_names_its_grouping_default(tmp_path):
    def ref(model):
        return resolve_ref(model, (), None, (), (), None)

    assert group_config(ref("induction-sink")).method == group_config(ref("induction")).method == "mdl"
    assert group_config(ref("tms_5-2")).method == "spectral"
    assert group_config(None).method == "spectral"
    assert group_config(ref("induction-sink"), method="spectral").method == "spectral"  # a flag wins
    f = tmp_path / "g.yaml"
    f.write_text("method: louvain\n")
    assert group_config(ref("induction-sink"), f).method == "louvain"  # and a YAML file
    shown = runner.invoke(app, ["config", "show", "--stage", "group", "--model", "induction-sink"])
    assert shown.exit_code == 0 and "method: mdl" in shown.output.splitlines(), shown.output
    assert stored_ref(tmp_path) is None  # not a store: the stage that needs one says so


def test_examples_are_what_config_show_prints():
    for stage in ("stage1", "group", "verify"):
        shown = runner.invoke(app, ["config", "show", "--stage", stage, "--comments"]).output
        assert (ROOT / "examples" / f"{stage}.yaml").read_text() == shown, stage


def test_piped_output_is_plain_log_lines(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("steps: 200\nwarm_start_steps: 20\neval_samples: 2000\nlog_every: 20\ncheckpoint_every: 100\n")
    done = subprocess.run([sys.executable, "-m", "apdkit.cli", "stage1", "--model", "tms_5-2", "--config", str(cfg),
                           "--store", str(tmp_path / "r.zarr")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "━" not in done.stderr and "…" not in done.stderr
    lines = [ln for ln in done.stderr.splitlines() if "stage1 tms_5-2: " in ln]
    assert 3 <= len(lines) <= 13  # start, one per tenth, done
    assert "stage1 tms_5-2: done" in lines[-1]


def test_user_text_is_never_markup(tmp_path):
    weird = tmp_path / "[/x] [bold]run"
    result = runner.invoke(app, ["status", str(weird)])
    assert result.exit_code == 2
    assert str(weird) in result.output and result.output.strip().count("\n") == 0
    result = runner.invoke(app, ["group", "--store", str(weird), "--name", "[red]g[/]", "-q"])
    assert result.exit_code == 2 and "Traceback" not in result.output


def _stage1_logged(tmp_path, log_to, **settings):
    """A short tms_5-2 stage 1 with metrics sent to ``log_to``; returns its store."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("".join(f"{k}: {v}\n" for k, v in dict(warm_start_steps=20, log_every=20, **settings).items()))
    store = tmp_path / "r.zarr"
    result = runner.invoke(app, ["stage1", "--model", "tms_5-2", "--config", str(cfg), "--store", str(store),
                                 "--log-to", log_to, "-q"])
    assert result.exit_code == 0, result.output
    return store


def test_tensorboard_gets_the_loss_curve(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    store = _stage1_logged(tmp_path, "tensorboard", steps=200, eval_samples=1000, checkpoint_every=100)
    events = EventAccumulator(str(store / "tensorboard"))
    events.Reload()
    curve = events.Scalars("stage1/total")
    from apdkit import open_run

    stored = open_run(store).metrics()
    assert [e.step for e in curve] == stored["step"].astype(int).tolist()
    assert [e.value for e in curve] == pytest.approx(stored["total"].tolist(), rel=1e-6)


def test_wandb_offline_gets_the_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    store = _stage1_logged(tmp_path, "wandb", steps=60, eval_samples=500, checkpoint_every=20)
    runs = list((store / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
