"""Stage 2 end to end on tms_5-2-id, and its bad-input errors."""

import pytest
from typer.testing import CliRunner

from apdkit.cli.main import app
from tests.helpers import store_tree
from apdkit import open_run

runner = CliRunner()


def apd(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("method", ["spectral", "mdl"])
def test_tms_5_2_id_identity_is_one_rank_2_mechanism(id_store, method):
    result = apd("group", "--store", id_store, "--method", method, "-q")
    assert result.exit_code == 0, result.output
    run = open_run(id_store)
    info = run.grouping_info(method)
    assert info["scores"]["ari"] >= 0.95
    labels = run.grouping(method)
    hidden = labels["hidden"][labels["hidden"] >= 0]
    assert len(set(hidden.tolist())) == 1  # all identity pieces: one mechanism
    g = int(hidden[0])
    assert info["ranks"]["hidden"][g] == 2 and info["ranks"]["W"][g] == 0
    # every other mechanism: one feature's rank-1 piece(s) of W
    others = [i for i in range(info["n_groups"]) if i != g]
    assert len(others) == 5
    assert all(info["ranks"]["W"][i] == 1 and info["ranks"]["hidden"][i] == 0 for i in others)


def test_groupings_live_side_by_side_and_auto_picks_lowest(id_store):
    assert apd("group", "--store", id_store, "--method", "threshold", "--name", "thr", "-q").exit_code == 0
    assert apd("group", "--store", id_store, "--method", "auto", "-q").exit_code == 0
    run = open_run(id_store)
    assert {"thr", "auto"} <= set(run.groupings())
    auto = run.grouping_info("auto")
    assert auto["description_length"] == min(auto["candidates"].values())


def test_more_samples_than_stored(id_store):
    n_stored = open_run(id_store).masks()["W"].shape[0]
    result = apd("group", "--store", id_store, "--method", "spectral", "--samples", n_stored + 3000,
                 "--name", "more", "-q")
    assert result.exit_code == 0, result.output
    info = open_run(id_store).grouping_info("more")
    assert info["n_samples"] == n_stored + 3000
    assert info["scores"]["ari"] >= 0.95



def test_bad_input(id_store, tms_store):
    # the last case needs a 'spectral' grouping made with other settings; make it here, as other tests
    # that make it may run in another process (pytest -n)
    assert apd("group", "--store", id_store, "--method", "spectral", "-q").exit_code == 0
    before = store_tree(id_store)
    for args, message in [
        (["--store", id_store, "--method", "kmeans"], "method: Input should be"),
        (["--store", id_store, "--n-groups", "500", "--name", "fresh"], "more than the 9 alive pieces"),
        (["--store", id_store, "--n-groups", "0"], "n_groups: Input should be greater than 0"),
        (["--store", id_store, "--n-groups", "3"], "exists in"),  # 'spectral' was made with other settings
    ]:
        result = apd("group", *args, "-q")
        assert result.exit_code == 2, result.output
        assert message in result.output and result.output.strip().count("\n") == 0
    assert store_tree(id_store) == before
    # a store with a target but no finished stage 1
    before = store_tree(tms_store)
    result = apd("group", "--store", tms_store, "-q")
    assert result.exit_code == 2 and "no finished stage 1" in result.output
    assert store_tree(tms_store) == before
