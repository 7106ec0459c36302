"""The transformer targets (induction, modadd, tiny_lm): their scores on
decompositions whose answer is known, and a reduced induction run end to end."""

import dataclasses

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from apdkit import open_run
from apdkit.cli.main import app
from apdkit.core.model import DecomposedModel
from apdkit.core.pieces import singleton_labels
from apdkit.pipeline.status import store_status
from apdkit.targets import registry
from apdkit.targets.spec import missed_criteria
from apdkit.targets.induction import model as induction
from apdkit.targets.induction import scoring as induction_scoring
from apdkit.targets.modadd import model as modadd
from apdkit.targets.modadd import scoring as modadd_scoring
from apdkit.targets.tiny_lm import model as tiny_lm
from apdkit.targets.tiny_lm import scoring as tiny_lm_scoring
from tests.helpers import exact_pieces

SMALL_INDUCTION = dict(vocab=24, d_model=16, seq_len=16, n_layers=2, placement="uniform")
SMALL_INDUCTION_TRAIN = dict(lr=1e-2, weight_decay=0.01, batch=128, steps=1000, warmup=0.02, schedule="cosine")


@pytest.fixture(scope="module")
def small_induction():
    torch.manual_seed(0)
    m = induction.build(**SMALL_INDUCTION)
    induction.fit(m, SMALL_INDUCTION_TRAIN, torch.Generator().manual_seed(0))
    assert induction.check(m, torch.Generator().manual_seed(1)).healthy
    return DecomposedModel(m.eval(), registry.TARGETS["induction"].modules)


@pytest.mark.parametrize("placement", induction.PLACEMENTS)
def test_induction_data_has_exactly_one_repeat_and_its_answer(placement):
    tokens, q, answer = induction.induction_batch(64, 24, 16, torch.Generator().manual_seed(0), placement)
    for row, pos, ans in zip(tokens, q, answer):
        content = row[1:].tolist()
        assert len(content) - len(set(content)) == 1  # one repeated token, S
        first = content.index(int(row[pos])) + 1
        assert first < pos and int(row[first + 1]) == ans
    assert (tokens[:, 0] == induction.BOS).all()


def test_uniform_placement_starts_the_copy_at_every_position_as_often():
    # seq_len 16: the first S in 1..13; "second_first" draws the second S first, so late first S's are rare
    counts = {}
    for placement in induction.PLACEMENTS:
        tokens, q, _ = induction.induction_batch(26000, 24, 16, torch.Generator().manual_seed(0), placement)
        counts[placement] = torch.bincount(induction.first_s(tokens, q), minlength=14)[1:].float() / len(q)
    assert counts["uniform"].sub(1 / 13).abs().max() < 0.01
    assert counts["second_first"][-1] < 0.01 and counts["second_first"][0] > 0.2
    with pytest.raises(ValueError, match="placement must be"):
        induction.build(**dict(SMALL_INDUCTION, placement="late"))
    with pytest.raises(ValueError, match="placement must be"):
        induction.induction_batch(4, 24, 16, torch.Generator().manual_seed(0), "late")


def test_a_sink_head_adds_nothing_when_its_sink_wins_and_is_a_plain_head_when_it_loses():
    torch.manual_seed(0)
    plain, sunk = induction.AttentionHead(8), induction.AttentionHead(8, sink=True)
    sunk.load_state_dict({**plain.state_dict(), "sink": torch.tensor(0.0)})
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        sunk.sink.fill_(-1e4)
        assert torch.allclose(sunk(x), plain(x), atol=1e-6)
        sunk.sink.fill_(1e4)
        assert torch.equal(sunk(x), x + sunk.o(torch.zeros_like(x)))  # every row's attention on the sink


def test_sink_names_the_heads_that_have_one_and_a_stored_bool_builds_as_before():
    for sink, has in (("none", [False, False]), ("all", [True, True]), ("last", [False, True]),
                      (True, [True, True]), (False, [False, False])):  # stores written before "last" hold a bool
        assert [layer.sink is not None for layer in induction.build(**SMALL_INDUCTION, sink=sink).layers] == has
    with pytest.raises(ValueError, match="sink must be one of none, all, last"):
        induction.build(**SMALL_INDUCTION, sink="first")


def test_the_health_check_reports_the_sink_share_away_from_the_circuit_only_with_sinks():
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    plain = induction.check(induction.build(**SMALL_INDUCTION), gen())
    assert set(plain.figures) == {"copy_accuracy", "copy_accuracy_worst_quarter"}
    torch.manual_seed(0)
    m = induction.build(**SMALL_INDUCTION, sink=True)
    for logit, share in ((50.0, 1.0), (-50.0, 0.0)):  # the sink takes all of each row, or none
        with torch.no_grad():
            m.layers[-1].sink.fill_(logit)
        report = induction.check(m, gen())
        assert report.figures["sink_share_off_circuit"] == pytest.approx(share, abs=1e-6)
        assert f"away from the circuit {share:.3f}" in report.summary


class StandInCopier(torch.nn.Module):
    """Answers right exactly where the first S sits at or before ``copies_up_to``."""

    vocab, seq_len, placement = 24, 16, "second_first"  # the last quarter rare, as before placements were named

    def __init__(self, copies_up_to: int, sink_share: float | None = None):
        super().__init__()
        self.copies_up_to, self.sink_share = copies_up_to, sink_share
        # check reads layers[-1].sink, and with one the pattern its hook sees
        self.layers = torch.nn.ModuleList([induction.AttentionHead(4, sink=sink_share is not None)])

    def forward(self, tokens):
        n, T = tokens.shape
        q = (tokens[:, :, None] == tokens[:, None, :]).tril(-1).any(-1).float().argmax(1)  # the token seen before
        first, rows = induction.first_s(tokens, q), torch.arange(n)
        answer = tokens[rows, first + 1]
        logits = torch.zeros(n, T, self.vocab)
        logits[rows, q, torch.where(first <= self.copies_up_to, answer, (answer + 1) % self.vocab)] = 1.0
        if self.sink_share is not None:  # every row's attention, on the first position, sums to 1 less the sink's share
            self.layers[-1].pattern(torch.zeros(n, T, T).index_fill(-1, torch.tensor([0]), 1 - self.sink_share))
        return logits


def test_the_health_check_reports_the_worst_quarter_of_the_first_s_positions():
    # seq_len 16: the first S in 1..13, quarters {1-4}, {5-7}, {8-10}, {11-13}
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    tokens, q, _ = induction.induction_batch(4096, 24, 16, gen(), "second_first")
    early = float((induction.first_s(tokens, q) <= 10).float().mean())
    report = induction.check(StandInCopier(copies_up_to=10), gen())
    assert report.figures == {"copy_accuracy": pytest.approx(early), "copy_accuracy_worst_quarter": 0.0}
    assert "worst quarter of positions 0.000" in report.summary
    assert early > 0.95 and report.healthy  # the last quarter is rare: a bar on the mean alone lets this pass
    report = induction.check(StandInCopier(copies_up_to=13), gen())
    assert report.figures == {"copy_accuracy": 1.0, "copy_accuracy_worst_quarter": 1.0} and report.healthy


def test_a_sink_target_whose_head_does_not_rest_off_the_circuit_is_unhealthy():
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    bar = induction.SINK_SHARE_HEALTHY
    for share, healthy in ((bar, True), (bar - 0.01, False), (1.0, True), (0.5, False)):
        report = induction.check(StandInCopier(copies_up_to=13, sink_share=share), gen())
        assert report.figures["copy_accuracy"] == 1.0  # it copies every time: only its rest decides
        assert report.figures["sink_share_off_circuit"] == pytest.approx(share, abs=1e-6)
        assert report.healthy is healthy, share


def test_induction_recipe_refuses_an_unknown_loss_away_from_the_answer():
    m = induction.build(**SMALL_INDUCTION)
    with pytest.raises(ValueError, match="away must be"):
        induction.fit(m, dict(SMALL_INDUCTION_TRAIN, away="flat"), torch.Generator().manual_seed(0))


def _layer1_error_away_from_the_circuit(module: torch.nn.Module) -> float:
    """Logit error with layer 1's output zeroed away from the circuit's
    positions (first S, M, second S), as a share of zeroing it everywhere."""
    tokens, q, _ = induction.batch_for(module, 512, torch.Generator().manual_seed(0))
    away = ~induction.circuit_positions(tokens, q)

    def zeroed(where):
        keep = (~where).unsqueeze(-1).float()
        handle = module.layers[1].o.register_forward_hook(lambda mod, args, out: out * keep)
        try:
            with torch.no_grad():
                return module(tokens)
        finally:
            handle.remove()

    clean = zeroed(torch.zeros_like(away))
    return float((zeroed(away) - clean).pow(2).mean() / (zeroed(torch.ones_like(away)) - clean).pow(2).mean())


def test_the_sink_target_turns_its_induction_head_off_away_from_the_circuit(small_induction):
    """induction-sink's recipe (a sink logit, flat logits asked for away from
    the answer) on the small arch: it copies, and layer 1's output away from the
    circuit's positions matters far less than in the plain target's (measured
    0.040 against 0.41)."""
    torch.manual_seed(0)
    arch = registry.TARGETS["induction-sink"].arch
    sunk = induction.build(**dict(SMALL_INDUCTION, sink=arch["sink"], placement=arch["placement"],
                                  positions=arch["positions"]))
    induction.fit(sunk, dict(SMALL_INDUCTION_TRAIN, away="uniform"), torch.Generator().manual_seed(0))
    # it copies; without the rest penalty its head rests only partly (0.57), so the check calls it unhealthy
    assert induction.check(sunk, torch.Generator().manual_seed(1)).figures["copy_accuracy"] >= 0.95
    plain, off = _layer1_error_away_from_the_circuit(small_induction.module), _layer1_error_away_from_the_circuit(sunk)
    assert off < 0.5 * plain, (off, plain)


def test_induction_scores_recover_the_heads_and_fail_a_merged_grouping(small_induction):
    model = small_induction
    pieces = exact_pieces(model.weights())
    per_layer = {n: np.full(U.shape[0], int(n.split(".")[1])) for n, (U, V) in pieces.items()}
    right = induction_scoring.mechanism_scores(model, pieces, per_layer, {}, torch.Generator().manual_seed(0))
    assert right["induction/prev_token/recovered"] == 1.0
    assert right["induction/induction/recovered"] == 1.0
    assert right["induction/prev_token/share_in_head"] == pytest.approx(1.0)
    assert right["induction/induction/kept_only_needed"] == pytest.approx(1.0, abs=0.02)
    merged = {n: np.zeros(U.shape[0], dtype=int) for n, (U, V) in pieces.items()}  # both heads one mechanism
    wrong = induction_scoring.mechanism_scores(model, pieces, merged, {}, torch.Generator().manual_seed(0))
    assert wrong["induction/prev_token/needed_mechanisms"] == 1.0
    assert wrong["induction/prev_token/share_in_head"] < 0.9
    assert wrong["induction/prev_token/recovered"] == 0.0


def test_induction_ablation_values_follow_the_layers(small_induction):
    model = small_induction
    pieces = exact_pieces(model.weights())
    per_layer = {n: np.full(U.shape[0], int(n.split(".")[1])) for n, (U, V) in pieces.items()}
    batch = induction.batch_for(model.module, 256, torch.Generator().manual_seed(0))
    whole = induction_scoring.function_values(model, *batch)
    layer0, layer1 = induction_scoring.ablation_values(model, pieces, per_layer, batch)
    # layer 1 comes after layer 0's attention pattern: ablating it leaves the pattern as it was
    assert layer1["prev_token"] == pytest.approx(whole["prev_token"], abs=1e-5)
    assert layer1["induction"] < 0.5 * whole["induction"]
    assert layer0["prev_token"] < 0.5 * whole["prev_token"]
    assert layer0["induction"] < 0.5 * whole["induction"]


def test_induction_runs_end_to_end_with_its_scores(tmp_path, monkeypatch):
    spec = registry.TARGETS["induction"]
    small = dataclasses.replace(spec, arch=SMALL_INDUCTION, train=SMALL_INDUCTION_TRAIN,
                                stage1=dict(spec.stage1, n_pieces=16, topk=8.0, steps=150, warm_start_steps=50,
                                            eval_samples=64))
    monkeypatch.setitem(registry.TARGETS, "induction", small)
    store = tmp_path / "ind.zarr"
    result = CliRunner().invoke(app, ["run", "--model", "induction", "--store", str(store), "-q"])  # mdl: its default
    assert result.exit_code in (0, 1), result.output
    again = CliRunner().invoke(app, ["group", "--store", str(store), "-q"])  # no --method: the target's, done
    assert again.exit_code == 0, again.output
    run = open_run(store)
    assert run.groupings() == ["mdl"]
    # no mechanism joins parts of both layers that are each on at every position (split_always_on)
    labels, masks = run.grouping("mdl"), run.masks()
    for g in range(run.grouping_info("mdl")["n_groups"]):
        always = {int(n.split(".")[1]) for n in labels if (labels[n] == g).any()
                  and np.asarray(masks[n])[:, labels[n] == g].any(axis=1).mean() >= 0.99}
        assert len(always) <= 1, g
    assert run.attrs("target")["health"]["copy_accuracy"] >= 0.95
    stage1 = run.scores()
    assert stage1["induction/induction/target"] >= 0.9
    assert stage1["induction/induction/ablated"] < 0.3  # without the heads there is no copying
    truth = run.verification("mdl")["truth"]
    assert set(truth) == {f"induction/{f}/{s}" for f in ("prev_token", "induction")
                          for s in ("needed_mechanisms", "share_in_head", "kept_only_needed", "recovered")}
    assert "ground truth" in result.output
    missed = [f for f in ("prev_token", "induction") if truth[f"induction/{f}/recovered"] < 1.0]
    assert all(f"MISSED: induction/{f}/recovered" in result.output for f in missed)
    flagged = [line for line in result.output.splitlines() if line.startswith("MISSED")]
    assert len(flagged) == len(set(flagged))  # verify's scores and the grouping's same ones: flagged once
    status = CliRunner().invoke(app, ["status", str(store)])
    assert status.exit_code == 0, status.output
    health = run.attrs("target")["health"]
    target_row = next(detail for stage, _, detail in store_status(store) if stage == "target")
    assert target_row.endswith(f"; health copy_accuracy {health['copy_accuracy']:.4g}, "
                               f"copy_accuracy_worst_quarter {health['copy_accuracy_worst_quarter']:.4g}")
    drifted = any(v > 0.02 for k, v in stage1.items() if k.startswith("faithfulness_rel_error/"))
    assert ("MISSED" in status.output) == bool(missed or drifted)


def test_missed_criteria_names_each_score_below_its_criterion():
    scores = {"a": 0.5, "b": 1.0}
    assert missed_criteria(scores, {"a": 0.9, "b": 1.0, "not_scored": 1.0}) == ["a = 0.5 misses its criterion >= 0.9"]
    assert missed_criteria(scores, {}, {"a": 0.4, "b": 1.0}) == ["a = 0.5 misses its criterion <= 0.4"]


@pytest.fixture(scope="module")
def trained_modadd():
    spec = registry.TARGETS["modadd"]  # the built-in itself: 8000 full-batch steps, about 20 s
    torch.manual_seed(0)
    m = spec.make()
    spec.fit(m, spec.train, torch.Generator().manual_seed(0))
    assert spec.check(m, None).healthy
    return DecomposedModel(m.eval(), ("embed", "W_in", "W_out"))


def fourier_mechanisms(model: DecomposedModel) -> tuple[dict, dict]:
    """The known answer built from the target itself: per frequency, the
    embedding projected on it and the hidden units that mostly read it.
    Returns exact pieces and labels."""
    mlp = model.module
    p, E = mlp.p, mlp.embed.weight.detach()
    keys = modadd_scoring.key_frequencies(E, p)
    n = torch.arange(p, dtype=torch.float64)
    parts = {"embed": [], "W_in": [], "W_out": []}
    unit_freq = torch.stack([modadd_scoring.power(w[None] @ E, p).argmax() for w in mlp.W_in.weight.detach()])
    for k in range(p // 2 + 1):  # every frequency its own mechanism; the network uses the key ones
        basis = torch.stack([torch.cos(2 * torch.pi * k * n / p), torch.sin(2 * torch.pi * k * n / p)])
        basis = basis[basis.norm(dim=1) > 1e-9]  # k = 0: the constant only
        basis = basis / basis.norm(dim=1, keepdim=True)
        proj = torch.block_diag(basis.T @ basis, basis.T @ basis)  # (2p, 2p): frequency k of a and of b
        units = unit_freq == k
        parts["embed"].append((E.double() @ proj).float())
        parts["W_in"].append(mlp.W_in.weight.detach() * units[:, None])
        parts["W_out"].append(mlp.W_out.weight.detach() * units[None, :])
    pieces, labels = {}, {}
    for name, mats in parts.items():
        Us, Vs, labs = [], [], []
        for g, w in enumerate(mats):
            U, V = exact_pieces({"w": w})["w"]
            keep = U.norm(dim=1) * V.norm(dim=1) > 1e-6
            Us.append(U[keep]), Vs.append(V[keep]), labs.append(np.full(int(keep.sum()), g))
        pieces[name] = (torch.cat(Us), torch.cat(Vs))
        labels[name] = np.concatenate(labs)
    return pieces, labels


def test_modadd_scores_the_fourier_answer_high_and_a_merged_one_low(trained_modadd):
    model = trained_modadd
    pieces, labels = fourier_mechanisms(model)
    right = modadd_scoring.mechanism_scores(model, pieces, labels, {}, torch.Generator())
    assert right["modadd/key_frequencies"] >= 2
    assert right["modadd/dedicated_key_fraction"] == 1.0
    assert right["modadd/held_out_accuracy_key_mechanisms"] >= 0.95
    merged = {n: np.zeros_like(v) for n, v in labels.items()}
    wrong = modadd_scoring.mechanism_scores(model, pieces, merged, {}, torch.Generator())
    assert wrong["modadd/dedicated_key_fraction"] == 0.0
    assert right["modadd/mean_purity"] >= 0.9  # the known answer meets the criterion
    assert wrong["modadd/mean_purity"] < 0.5


def test_modadd_split_is_fixed_by_the_architecture():
    a, b = modadd.build(p=23).split(), modadd.build(p=23).split()
    assert torch.equal(a[0], b[0]) and len(set(a[0].tolist()) & set(a[1].tolist())) == 0


def test_tiny_lm_scores_are_exact_on_a_known_decomposition(monkeypatch):
    words = [b"def ", b"return ", b"self", b"(x)", b": ", b"\n    ", b"import ", b"None"]
    order = torch.randint(0, len(words), (6000,), generator=torch.Generator().manual_seed(0))
    text = torch.frombuffer(bytearray(b"".join(words[i] for i in order)), dtype=torch.uint8).clone()
    monkeypatch.setattr(tiny_lm, "corpus", lambda: text)
    torch.manual_seed(0)
    lm = tiny_lm.build(d_model=16, n_layers=1, heads=2, context=8)
    tiny_lm.fit(lm, dict(lr=1e-2, weight_decay=0.0, batch=32, steps=150), torch.Generator().manual_seed(0))
    lm.eval()
    model = DecomposedModel(lm, ("blocks.*.fc_in", "blocks.*.fc_out"))
    pieces = exact_pieces(model.weights())
    labels = singleton_labels(pieces)
    everything = {n: float(U.shape[0]) for n, (U, V) in pieces.items()}  # every piece active on every token
    got = tiny_lm_scoring.mechanism_scores(model, pieces, labels, everything, torch.Generator().manual_seed(3))
    # the run's own activity (learned gates) overrides the top-k: here no piece on any token
    nothing = tiny_lm_scoring.mechanism_scores(
        model, pieces, labels, everything, torch.Generator().manual_seed(3),
        active=lambda x: {n: torch.zeros(x.numel(), U.shape[0], dtype=torch.bool) for n, (U, V) in pieces.items()})
    tokens = tiny_lm.windows(tiny_lm.corpus_split(held_out=True), tiny_lm_scoring.EVAL_WINDOWS, 8,
                             torch.Generator().manual_seed(3))
    with torch.no_grad():
        target = float(tiny_lm.next_token_loss(lm(tokens), tokens))
        for block in lm.blocks:  # ablated: the decomposed matrices zero, biases kept
            block.fc_in.weight.zero_(), block.fc_out.weight.zero_()
        ablated = float(tiny_lm.next_token_loss(lm(tokens), tokens))
    assert got["tiny_lm/ce_target"] == pytest.approx(target, rel=1e-6)
    assert got["tiny_lm/ce_ablated"] == pytest.approx(ablated, rel=1e-5)
    assert got["tiny_lm/ce_active"] == pytest.approx(target, rel=1e-4)
    assert abs(ablated - target) > 0.1
    assert got["tiny_lm/ce_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert got["tiny_lm/l0_per_token"] == pytest.approx(sum(len(v) for v in labels.values()))
    assert nothing["tiny_lm/ce_active"] == pytest.approx(ablated, rel=1e-5)
    assert nothing["tiny_lm/l0_per_token"] == 0 and nothing["tiny_lm/ce_recovered"] == pytest.approx(0.0, abs=1e-4)


def test_positions_only_in_layer0_qk_leave_layer0_attending_by_position_and_the_rest_blind_to_it():
    """"layer0_qk": layer 0's pattern is the same whatever the tokens, and with
    layer 0's output zeroed the last position's logits do not change when the
    tokens before it are shuffled (no position in the residual stream)."""
    torch.manual_seed(0)
    m = induction.build(**SMALL_INDUCTION, sink=True, positions="layer0_qk")
    captured = []
    m.layers[0].pattern.register_forward_hook(lambda mod, args, out: captured.append(out))
    tokens = induction.sample(m, 2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        m(tokens)
        assert torch.equal(captured[0][0], captured[0][1])
        m.layers[0].o.weight.zero_()
        shuffled = torch.cat([tokens[:, torch.randperm(15)], tokens[:, 15:]], 1)
        assert torch.allclose(m(shuffled)[:, -1], m(tokens)[:, -1], atol=1e-5)
        with_residual = induction.build(**SMALL_INDUCTION, positions="residual")
        with_residual.layers[0].o.weight.zero_()
        assert not torch.allclose(with_residual(shuffled)[:, -1], with_residual(tokens)[:, -1], atol=1e-3)
    with pytest.raises(ValueError, match="positions must be"):
        induction.build(**SMALL_INDUCTION, positions="rotary")


def test_a_built_in_store_is_rebuilt_with_the_arch_it_was_trained_with(tmp_path, monkeypatch):
    """A registry change (induction-sink's positions and placement) must not
    change what an older store's weights compute."""
    from apdkit.stages.target import ensure_target, load_from_store
    from apdkit.stores.run import Run, RunStore
    from apdkit.targets.load import resolve_ref
    from apdkit.targets.spec import HealthReport

    spec = registry.TARGETS["induction-sink"]
    then = dict(SMALL_INDUCTION, sink=True, placement="second_first", positions="residual")
    healthy = lambda module, gen: HealthReport(True, "ok", {})  # noqa: E731
    monkeypatch.setitem(registry.TARGETS, "induction-sink",
                        dataclasses.replace(spec, arch=then, train=dict(spec.train, steps=5), check=healthy))
    trained = ensure_target(RunStore(tmp_path / "t.zarr", "induction-sink"), resolve_ref("induction-sink"), 0).module
    monkeypatch.setitem(registry.TARGETS, "induction-sink",
                        dataclasses.replace(spec, arch=dict(then, placement="uniform", positions="layer0_qk")))
    loaded = load_from_store(Run(tmp_path / "t.zarr")).module
    assert (loaded.placement, loaded.positions) == ("second_first", "residual")
    tokens = induction.sample(trained, 8, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), trained(tokens))
    import zarr

    from apdkit.stages.errors import StageError
    zarr.open_group(str(tmp_path / "t.zarr"))["target"].attrs["arch"] = dict(then, heads=2)  # an argument since removed
    with pytest.raises(StageError, match="no longer builds"):
        load_from_store(Run(tmp_path / "t.zarr"))


def test_the_rest_penalty_starts_at_its_share_of_the_steps_and_needs_a_sink():
    """``rest`` adds the induction head's off-circuit attention to the loss
    from ``rest_from`` of the steps on: with 2 steps and rest_from 0.5 the
    first step's loss is the plain one and the second's is not."""
    def losses(rest):
        torch.manual_seed(0)
        m = induction.build(**dict(SMALL_INDUCTION, sink=True))
        seen = []
        induction.fit(m, dict(SMALL_INDUCTION_TRAIN, steps=2, away="uniform", rest=rest, rest_from=0.5),
                      torch.Generator().manual_seed(0), lambda step, loss: seen.append(loss))
        return seen

    plain, rested = losses(0.0), losses(5.0)
    assert plain[0] == rested[0] and rested[1] > plain[1] + 0.1
    with pytest.raises(ValueError, match="has none"):
        induction.fit(induction.build(**SMALL_INDUCTION), dict(SMALL_INDUCTION_TRAIN, rest=0.1),
                      torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="rest_from"):
        induction.fit(induction.build(**dict(SMALL_INDUCTION, sink=True)),
                      dict(SMALL_INDUCTION_TRAIN, rest=0.1, rest_from=1.0), torch.Generator().manual_seed(0))
