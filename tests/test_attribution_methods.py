"""--attribution end to end: a built-in target decomposed with ablation
attributions recovers its ground truth and passes verify; verify can
attribute with another method; a bad name is one line."""

from typer.testing import CliRunner

from apdkit import open_run
from apdkit.cli.main import app

runner = CliRunner()


def apd(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_ablation_run_recovers_tms_and_verify_can_switch_method(tmp_path):
    store = tmp_path / "run.zarr"
    result = apd("run", "--model", "tms_5-2", "--attribution", "ablation", "--store", store, "--json", "-q")
    assert result.exit_code == 0, result.output
    run = open_run(store)
    assert run.config("stage1")["attribution"] == "ablation"
    ver = run.verification("spectral")
    assert ver["attribution"] == "ablation" and ver["passed"]
    assert run.attrs("stage1")["scores"]["tms/mmcs"] >= 0.99
    assert run.grouping_info("spectral")["scores"]["exact_match"] == 1.0  # 5 mechanisms, one per feature
    again = apd("verify", "--store", store, "--attribution", "integrated_gradients", "--samples", "2000", "-q")
    assert again.exit_code == 0, again.output
    assert open_run(store).verification("spectral")["attribution"] == "integrated_gradients"


def test_an_unknown_attribution_is_one_line_and_writes_nothing(tmp_path):
    store = tmp_path / "run.zarr"
    result = apd("stage1", "--model", "tms_5-2", "--attribution", "shapley", "--store", store, "-q")
    assert result.exit_code == 2
    assert "attribution" in result.output and result.output.strip().count("\n") == 0
    assert not store.exists()
