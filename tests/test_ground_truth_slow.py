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


def run_all(tmp_path, model, *extra):
    store = tmp_path / f"{model}.zarr"
    result = runner.invoke(app, ["run", "--model", model, "--store", str(store), "-q", *map(str, extra)])
    assert result.exit_code in (0, 1), result.output  # 1: verify failed; the scores are still written
    return open_run(store)


def test_resid_mlp_run_passes_every_verify_check(tmp_path):
    verification = run_all(tmp_path, "resid_mlp").verification("spectral")
    assert verification["passed"], {c: v["figures"] for c, v in verification["checks"].items() if not v["passed"]}


@pytest.mark.parametrize("seed", [0, 1])  # seed 1 failed the adversarial check at 3,000 stage-1 steps
def test_resid_mlp3_run_passes_verify_with_every_feature_dedicated_and_none_merged(tmp_path, seed):
    run = run_all(tmp_path, "resid_mlp3", "--seed", seed)
    verification = run.verification("spectral")
    assert verification["passed"], {c: v["figures"] for c, v in verification["checks"].items() if not v["passed"]}
    assert run.scores()["resid/dedicated_features"] >= 98
    assert run.grouping_info("spectral")["scores"]["merged_features"] == 0


@pytest.mark.parametrize("seed", [2, 3])  # the seeds that merged a pair of features at 3,000 stage-1 steps
def test_resid_mlp2_run_passes_verify_and_merges_no_features_with_spectral_or_mdl(tmp_path, seed):
    store = run_all(tmp_path, "resid_mlp2", "--seed", seed).path  # spectral, the default
    for command in ("group", "verify"):
        result = runner.invoke(app, [command, "--store", str(store), "--method", "mdl", "-q"])
        assert result.exit_code in (0, 1), result.output
    run = open_run(store)
    for grouping in ("spectral", "mdl"):
        verification = run.verification(grouping)
        assert verification["passed"], {c: v["figures"] for c, v in verification["checks"].items() if not v["passed"]}
        assert run.grouping_info(grouping)["scores"]["merged_features"] == 0, grouping
    assert run.scores()["resid/dedicated_features"] >= 98


@pytest.mark.parametrize("seed", range(3))
def test_induction_pieces_reproduce_both_functions(tmp_path, seed):
    scores = run_all(tmp_path, "induction", "--seed", seed, "--method", "mdl").scores()
    for f in ("prev_token", "induction"):
        assert scores[f"induction/{f}/all_pieces"] >= 0.95 * scores[f"induction/{f}/target"]


# induction with its default grouping, mdl: each layer's always-on part is a mechanism of its own (split_always_on), so
# layer 0's is the previous-token head (found on seeds 0-4 by `apd run` in a shell, and on 0-2 here). The induction head
# is less sure: found on seeds 0, 2 and 4 in a shell (one thread) but on seed 2 only here (two threads: stage 1 differs
# with the thread count); where it is missed, layer 1's O pieces are spread over small mechanisms none of which alone is
# needed (seed 1: keeping only the needed ones keeps 0.41 of the copy). Before the split neither head was found on any
# seed (RESULTS.md, "Always-on parts").
INDUCTION_HEAD_FOUND = {2}


@pytest.mark.parametrize("seed", range(3))
def test_induction_finds_the_previous_token_head_and_passes_verify(tmp_path, seed):
    verification = run_all(tmp_path, "induction", "--seed", seed).verification("mdl")
    assert verification["passed"], {c: v["figures"] for c, v in verification["checks"].items() if not v["passed"]}
    assert verification["truth"]["induction/prev_token/recovered"] == 1.0
    if seed in INDUCTION_HEAD_FOUND:
        assert verification["truth"]["induction/induction/recovered"] == 1.0


# induction-sink's head is off where the circuit does not need it; with the learned default and mdl (its default
# grouping) its O matrix is a mechanism of its own, on at the second S only. Targets whose head rests on its sink below
# 0.97 away from the circuit are retrained (seeds 0 and 2's first attempts, 0.95 and 0.94, left O on there, and it
# joined the rest: RESULTS.md, "induction-sink: a head that does not rest is retrained"). The induction head's Q, K and
# V are on at every position (so that it can rest), as is layer 0: each layer's always-on part is a mechanism of its
# own (split_always_on), and layer 0's is the previous-token head (before, mdl joined them, leaving 0.23-0.29 of that
# mechanism in layer 0; RESULTS.md, "Always-on parts")
@pytest.mark.parametrize("seed", range(5))
def test_induction_sink_recovers_both_heads_and_passes_verify(tmp_path, seed):
    verification = run_all(tmp_path, "induction-sink", "--seed", seed).verification("mdl")
    assert verification["passed"], {c: v["figures"] for c, v in verification["checks"].items() if not v["passed"]}
    assert verification["truth"]["induction/induction/recovered"] == 1.0
    assert verification["truth"]["induction/prev_token/recovered"] == 1.0


def test_modadd_run_passes_every_verify_check_with_mdl(tmp_path):
    verification = run_all(tmp_path, "modadd", "--method", "mdl").verification("mdl")
    assert verification["passed"], {c: v["figures"] for c, v in verification["checks"].items() if not v["passed"]}


@pytest.mark.xfail(strict=True, reason="measured on 3 seeds: dedicated key fraction 0-0.2, purity 0.24-0.35; "
                   "every input uses every frequency, so co-activation cannot separate them")
def test_modadd_key_frequencies_get_dedicated_mechanisms(tmp_path):
    truth = run_all(tmp_path, "modadd").verification("spectral")["truth"]
    assert truth["modadd/dedicated_key_fraction"] == 1.0
    assert truth["modadd/mean_purity"] >= 0.9


# modadd's learned setting (start 0.1, error target 0.02): with the generic coefficient of 1 verify failed five
# checks on 3 of 3 seeds; with it, 3 of 3 pass (RESULTS.md, "modadd under learned gates")
def test_modadd_learned_gates_pass_verify(tmp_path):
    config = tmp_path / "learned.yaml"
    config.write_text("minimality: learned\n")
    verification = run_all(tmp_path, "modadd", "--config", config).verification("spectral")
    assert verification["passed"], {c: v["figures"] for c, v in verification["checks"].items() if not v["passed"]}


# measured on 5 seeds with the gate's leak at 0.1: 44-49% of the mechanisms on per token (seed 0: 59.8 of 124), CE
# recovered 0.98-0.99; at the old leak of 0.01, 45-74% (RESULTS.md, "The gate's leak"). A thin margin: with each
# block's always-on part its own mechanism, this checkout's seeds 0-2 are at 49.8%, 50.1% and 45.0% (RESULTS.md,
# "The always-on split on resid_mlp3, resid_mlp2 and tiny_lm"); seed 0 passed under pytest
def test_tiny_lm_active_mechanisms_recover_the_loss(tmp_path):
    truth = run_all(tmp_path, "tiny_lm").verification("spectral")["truth"]
    assert truth["tiny_lm/ce_recovered"] >= 0.9
    assert truth["tiny_lm/l0_per_token"] <= 0.5 * truth["tiny_lm/alive_mechanisms"]
