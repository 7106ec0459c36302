"""apd group on a dask.distributed cluster (a LocalCluster with 2 worker
processes): the same co-activation counts and grouping as local threads."""

import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from apdkit import open_run
from apdkit.cli.main import app
from apdkit.stores.run import Run

distributed = pytest.importorskip("distributed")  # the `distributed` extra; the test set-up installs it

runner = CliRunner()


def apd(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as c:
        yield c


def test_group_on_a_local_cluster_equals_local_threads(id_store, tmp_path, cluster):
    store = tmp_path / "run.zarr"
    shutil.copytree(id_store, store)
    local = apd("group", "--store", store, "--name", "local", "--json", "-q")
    assert local.exit_code == 0, local.output
    with distributed.Client(cluster) as client:
        before = sum(client.run(lambda dask_worker: len(dask_worker.data)).values())
        remote = apd("group", "--store", store, "--name", "cluster", "--scheduler", cluster.scheduler_address,
                     "--json", "-q")
        assert remote.exit_code == 0, remote.output
        # the workers did the work: they ran tasks (their logs list them)
        done = sum(len(v) for v in client.run(lambda dask_worker: list(dask_worker.state.log)).values())
    assert done > before
    run = open_run(store)
    a, b = run.grouping_info("local"), run.grouping_info("cluster")
    assert a["piece_counts"] == b["piece_counts"] and a["activity"] == b["activity"]
    assert a["n_groups"] == b["n_groups"] and a["description_length"] == b["description_length"]
    la, lb = Run(store).grouping("local"), Run(store).grouping("cluster")
    assert all(np.array_equal(la[n], lb[n]) for n in la)


def test_an_unreachable_scheduler_is_one_line(id_store, tmp_path):
    store = tmp_path / "run.zarr"
    shutil.copytree(id_store, store)
    before = open_run(store).groupings()  # the shared stage-1 store may already hold other tests' groupings
    result = apd("group", "--store", store, "--name", "unreached", "--scheduler", "tcp://127.0.0.1:9", "-q")
    assert result.exit_code == 2
    assert "cannot reach dask scheduler tcp://127.0.0.1:9" in result.output
    assert open_run(store).groupings() == before and "unreached" not in before
