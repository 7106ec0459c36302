"""A user's own nn.Module, decomposed through the Python API and the CLI:
known parts come out as separate mechanisms; sequence models work per
position; identity insertion gives its known answer; bad input is one line."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import apdkit
from apdkit.cli.main import app
from tests.user_models import N_PARTS, TinyTransformer, sample_parts, sample_tokens, train_parts_mlp

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
PARTS_CONFIG = {"n_pieces": 12, "topk": 0.5, "steps": 800, "warm_start_steps": 100, "batch_size": 256,
                "lr": 5e-3, "hidden_coeff": 1.0, "eval_samples": 4000, "checkpoint_every": 100, "log_every": 50}


def apd(*args):
    return runner.invoke(app, [str(a) for a in args])


def _write_config(path: Path, cfg: dict) -> Path:
    path.write_text("".join(f"{k}: {v}\n" for k, v in cfg.items()))
    return path


def assert_parts_are_separate_mechanisms(run):
    """Each feature's one-hot input is served by its own mechanism: the top
    mechanism differs per feature, and keeping only it reproduces the output."""
    x = torch.eye(N_PARTS) * 0.8
    _, scores = run.active_mechanisms(x)
    top = scores.argmax(dim=1)
    assert len(set(top.tolist())) == N_PARTS, top.tolist()
    target = run.target()(x)
    for i in range(N_PARTS):
        keep = torch.zeros(N_PARTS, scores.shape[1])
        keep[i, top[i]] = 1.0
        out = run.forward(x, keep=keep)
        err = float(((out[i] - target[i]) ** 2).mean() / (target[i] ** 2).mean())
        assert err < 0.05, (i, err)


@pytest.fixture(scope="module")
def parts_run(tmp_path_factory):
    model = train_parts_mlp()
    store = tmp_path_factory.mktemp("parts") / "run.zarr"
    run = apdkit.decompose(model, sample_parts, modules=["fc_in", "fc_out"], hidden=["act"], store=store,
                           config=PARTS_CONFIG)
    run.group("spectral")
    return run, model


def test_own_mlp_through_the_python_api(parts_run):
    run, model = parts_run
    scores = run.scores()
    assert scores["faithfulness_rel_error/fc_in"] < 0.02 and scores["faithfulness_rel_error/fc_out"] < 0.02
    assert_parts_are_separate_mechanisms(run)
    assert run.grouping_info("spectral")["together_min"] == 0.3  # one row per input: the apart rule is on
    result = run.verify(samples=2000)
    assert result["checks"]["faithfulness"]["passed"]
    assert result["checks"]["minimality"]["passed"], result["checks"]["minimality"]
    # the store rebuilds nothing it cannot: the model was a Python object
    with pytest.raises(Exception, match="given as a Python object"):
        apdkit.open_run(run.path).target()
    # from the CLI, without the object: grouping works, the report says what needs the model
    assert apd("group", "--store", run.path, "--name", "cli", "-q").exit_code == 0
    result = apd("report", run.path, "--method", "cli")
    assert result.exit_code == 0, result.output
    assert "cards and the target&#x27;s figures need the model" in (run.path / "report.html").read_text()
    reopened = apdkit.open_run(run.path, module=train_parts_mlp())
    assert torch.equal(reopened.target().fc_in.weight, model.fc_in.weight)
    mech = reopened.mechanism_weights(0, "spectral")
    assert set(mech) == {"fc_in", "fc_out"} and mech["fc_in"].shape == model.fc_in.weight.shape


def test_own_mlp_through_the_cli_by_import_path(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    store = tmp_path / "cli.zarr"
    cfg = _write_config(tmp_path / "c.yaml", PARTS_CONFIG)
    result = apd("run", "--model", "tests.user_models:build_parts_mlp", "--data", "tests.user_models:sample_parts",
                 "--modules", "fc_in", "--modules", "fc_out", "--hidden", "act", "--config", cfg,
                 "--store", store, "-q")
    assert result.exit_code == 0, result.output
    run = apdkit.open_run(store)  # rebuilt from the stored import path
    assert run.target_ref()["model"] == "tests.user_models:build_parts_mlp"
    assert_parts_are_separate_mechanisms(run)


def test_transformer_per_position_with_identity_insertion(tmp_path):
    torch.manual_seed(0)
    model = TinyTransformer(vocab=64, d=16, heads=2, seq=8).eval()
    linears = ["blocks.*.attn.*", "blocks.*.mlp.fc_*", "unembed"]
    cfg = {"n_pieces": 24, "topk": 4.0, "steps": 150, "warm_start_steps": 50, "batch_size": 16,
           "eval_samples": 96, "eval_chunk": 32, "checkpoint_every": 50, "log_every": 50}
    run = apdkit.decompose(model, sample_tokens, modules=linears, insert_identity=["blocks.0.mlp.fc_in"],
                           store=tmp_path / "tf.zarr", config=cfg)
    names = set(run.pieces())
    assert names == {"blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.attn.v", "blocks.0.attn.o",
                     "blocks.0.mlp.fc_in", "blocks.0.mlp.fc_out", "unembed", "blocks.0.mlp.fc_in.identity"}
    assert run.pieces()["blocks.0.mlp.fc_in.identity"][0].shape == (16, 16)  # one piece per dimension
    masks = run.masks()["blocks.0.attn.q"]
    assert masks.shape == (96 * 8, 24)  # one row per (sequence, position)
    assert run.eval_inputs().shape == (96, 8)
    info = run.group("spectral")
    assert info["together_min"] == 0.0  # rows are positions: a head's query and key pieces fire on different ones
    ident = info["identity"]["blocks.0.mlp.fc_in.identity"]
    assert ident["one_mechanism"] and ident["active_share"] > 0.99, ident
    result = run.verify(samples=64)
    assert result["checks"]["identity"]["passed"], result["checks"]["identity"]


def test_an_inserted_identity_is_one_always_active_mechanism_with_learned_gates(tmp_path):
    """Gated like the other pieces, the identity's pieces were switched off where the output needs them
    (5 mechanisms, active on no input, minimality failed); its gates are now fixed at 1."""
    run = apdkit.decompose(train_parts_mlp(), sample_parts, modules=["fc_in", "fc_out"], insert_identity=["fc_in"],
                           store=tmp_path / "run.zarr", config={**PARTS_CONFIG, "minimality": "learned"})
    ident = run.group("spectral")["identity"]["fc_in.identity"]
    assert ident["one_mechanism"] and ident["active_share"] == 1.0, ident
    checks = run.verify()["checks"]
    assert checks["identity"]["passed"] and checks["minimality"]["passed"], checks


def test_a_split_identity_fails_the_identity_check(tmp_path):
    """The identity's pieces put in two mechanisms: verify says so."""
    torch.manual_seed(0)
    model = TinyTransformer(vocab=64, d=16, heads=2, seq=8).eval()
    cfg = {"n_pieces": 8, "topk": 2.0, "steps": 60, "warm_start_steps": 20, "batch_size": 16,
           "eval_samples": 64, "eval_chunk": 32, "checkpoint_every": 20, "log_every": 20}
    run = apdkit.decompose(model, sample_tokens, modules=["blocks.*.mlp.fc_in"], insert_identity=["blocks.0.mlp.fc_in"],
                           store=tmp_path / "tf.zarr", config=cfg)
    info = run.group("spectral")
    assert info["identity"]["blocks.0.mlp.fc_in.identity"]["one_mechanism"]
    from apdkit.stores.run import RunStore

    labels = run.grouping("spectral")
    lab = labels["blocks.0.mlp.fc_in.identity"]
    lab[: len(lab) // 2] = (lab[0] + 1) % info["n_groups"]  # half of it joins another mechanism
    attrs = {k: v for k, v in run.grouping_info("spectral").items() if k not in ("status", "checksums")}
    RunStore(run.path, run.model_name).write_grouping("spectral", labels, **attrs)  # a wrong grouping, stored whole
    result = run.verify(samples=32)
    assert not result["checks"]["identity"]["passed"]



@pytest.mark.parametrize("args, message", [
    (["--model", "nopkg.nomod:build", "--modules", "fc_in"], "cannot import 'nopkg.nomod'"),
    (["--model", "tests.user_models:build_not_a_module", "--modules", "fc_in"], "returned a int, not a torch nn.Module"),
    (["--model", "tests.user_models:build_parts_mlp", "--modules", "nothing.*"], "pattern 'nothing.*' matches no module"),
    (["--model", "tests.user_models:build_parts_mlp", "--modules", "act"], "module 'act' (ReLU) is not a layer"),
    (["--model", "tests.user_models:build_parts_mlp", "--modules", "fc_in", "--data",
      "tests.user_models:sample_wrong_shape"], "the model fails on the data (inputs of shape (4, 7)"),
    (["--model", "tests.user_models:build_nan_mlp", "--modules", "fc_in"], "fc_in.weight holds NaN"),
    (["--model", "tests.user_models:build_parts_mlp"], "name the layers to decompose with --modules"),
    (["--model", "tests.user_models:build_parts_mlp", "--modules", "fc_in"], "give the inputs with --data"),
])
def test_bad_user_input_is_one_line_and_touches_nothing(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(ROOT)
    store = tmp_path / "run.zarr"
    if "--data" not in args and "nan" in args[1]:
        args = [*args, "--data", "tests.user_models:sample_parts"]
    if "--data" not in args and "not_a_module" in args[1]:
        args = [*args, "--data", "tests.user_models:sample_parts"]
    result = apd("stage1", *args, "--store", store, "-q")
    assert result.exit_code == 2, result.output
    assert message in result.output, result.output
    assert result.output.strip().count("\n") == 0
    assert not store.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the model fails only off the CPU")
def test_a_model_that_makes_cpu_tensors_fails_on_the_gpu_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    result = apd("stage1", "--model", "tests.user_models:CpuBiasMLP", "--modules", "fc_in", "--data",
                 "tests.user_models:sample_parts", "--device", "cuda", "--store", tmp_path / "run.zarr", "-q")
    assert result.exit_code == 2, result.output
    assert "the model fails on cuda" in result.output and "--device cpu" in result.output, result.output
    assert result.output.strip().count("\n") == 0


def test_kill_9_then_rerun_of_a_user_model_gives_the_same_result(tmp_path):
    cfg = _write_config(tmp_path / "c.yaml", {**PARTS_CONFIG, "steps": 1200, "eval_samples": 2000})
    cmd = [sys.executable, "-m", "apdkit.cli", "run", "--model", "tests.user_models:build_parts_mlp",
           "--data", "tests.user_models:sample_parts", "--modules", "fc_*", "--config", str(cfg), "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    reference, store = tmp_path / "reference.zarr", tmp_path / "killed.zarr"
    subprocess.run([*cmd, "--store", str(reference)], cwd=ROOT, env=env, capture_output=True)
    proc = subprocess.Popen([*cmd, "--store", str(store)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = store / "checkpoints" / "stage1.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert apdkit.open_run(store).status("stage1") == "running"
    done = subprocess.run([*cmd, "--store", str(store)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode in (0, 1), done.stderr  # 1: verify's verdict, not an error
    a, b = apdkit.open_run(reference), apdkit.open_run(store)
    for name in ("fc_in", "fc_out"):
        assert torch.equal(a.pieces()[name][0], b.pieces()[name][0])
    assert a.verification("spectral")["checks"] == b.verification("spectral")["checks"]
    shutil.rmtree(reference)


transformers = pytest.importorskip("transformers")


def test_tiny_gpt2_from_a_local_path_by_name(tmp_path, monkeypatch):
    """hf:PATH loads a causal LM (random weights, built from a config here),
    GPT-2's Conv1D layers are decomposed, the logits attributed by estimate."""
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    torch.save(torch.randint(64, (200, 8)), tmp_path / "tokens.pt")
    cfg = _write_config(tmp_path / "c.yaml", {"n_pieces": 16, "topk": 2.0, "steps": 40, "warm_start_steps": 10,
                                               "batch_size": 8, "eval_samples": 32, "eval_chunk": 16,
                                               "checkpoint_every": 10, "log_every": 10, "max_exact_outputs": 256,
                                               "attribution_probes": 16})
    store = tmp_path / "gpt2.zarr"
    result = apd("stage1", "--model", f"hf:{tmp_path / 'gpt2'}", "--data", tmp_path / "tokens.pt",
                 "--modules", "transformer.h.*.mlp.c_*", "--output", "logits", "--config", cfg, "--store", store, "-q")
    assert result.exit_code == 0, result.output
    run = apdkit.open_run(store)
    assert run.attrs("stage1")["matrices"]["transformer.h.0.mlp.c_fc"]["shape"] == [16, 64]  # Conv1D: (in, out)
    assert run.masks()["transformer.h.0.mlp.c_fc"].shape == (32 * 8, 16)
    assert type(run.target()).__name__ == "GPT2LMHeadModel"


def test_stage1_flags_pieces_that_miss_their_weights_for_any_model(tmp_path, monkeypatch):
    # no faithfulness term and no warm start: the pieces are free to drift off W, which verify would fail
    monkeypatch.chdir(ROOT)
    store = tmp_path / "drift.zarr"
    cfg = _write_config(tmp_path / "c.yaml", dict(PARTS_CONFIG, steps=50, warm_start_steps=0, faithfulness_coeff=0.0,
                                                  eval_samples=500))
    result = apd("stage1", "--model", "tests.user_models:build_parts_mlp", "--data", "tests.user_models:sample_parts",
                 "--modules", "fc_in", "--modules", "fc_out", "--config", cfg, "--store", store, "-q")
    assert result.exit_code == 0, result.output
    errors = {k.split("/", 1)[1]: v for k, v in apdkit.open_run(store).scores().items()
              if k.startswith("faithfulness_rel_error/")}
    assert set(errors) == {"fc_in", "fc_out"} and min(errors.values()) > 0.02, errors
    for name in errors:
        assert f"MISSED: faithfulness_rel_error/{name} = " in result.output
        assert "misses its criterion <= 0.02" in result.output
    status = apd("status", "--store", store)
    assert status.exit_code == 0 and status.output.count("MISSED") == 1, status.output  # one row: stage 1's
    assert "faithfulness_rel_error/fc_in" in status.output.split("MISSED", 1)[1]
