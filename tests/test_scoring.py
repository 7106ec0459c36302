import numpy as np
import torch

from apdkit.core.masks import score_inputs
from apdkit.stages.config import resolve_stage1
from apdkit.stages.stage1.train import new_state
from apdkit.stages.target import Target, matrix_settings
from apdkit.targets.load import TargetRef, decomposed_model
from apdkit.targets.probes import dedicated_pieces, feature_truth_labels
from apdkit.targets.registry import TARGETS
from apdkit.targets.spec import missed_criteria
from apdkit.targets.tms.scoring import feature_recovery
from tests.helpers import made_target


def test_ground_truth_pieces_score_perfectly():
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(2, 5, generator=gen)
    U, V = W.T.clone(), torch.eye(5)  # piece j = W[:, j] e_j^T
    s = feature_recovery(W, U, V)
    assert abs(s["mmcs"] - 1) < 1e-6 and abs(s["ml2r"] - 1) < 1e-6
    assert abs(s["grouped_ml2r"] - 1) < 1e-6


def test_split_pieces_lower_ml2r_but_not_grouped_ml2r():
    W = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    # feature 0 split into two halves; feature 1 shrunk to 0.8 of its length
    U = torch.tensor([[0.5, 0.0], [0.5, 0.0], [0.0, 1.6]])
    V = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    s = feature_recovery(W, U, V)
    assert abs(s["mmcs"] - 1) < 1e-6
    assert abs(s["ml2r"] - (0.5 + 0.8) / 2) < 1e-6
    assert abs(s["grouped_ml2r"] - (1.0 + 0.8) / 2) < 1e-6


def test_dedicated_pieces_on_hand_made_mask():
    # rows: one-hot inputs 0..3; cols: pieces
    masks = torch.tensor([
        [1, 0, 0, 1],  # piece 0 only here -> dedicated
        [0, 1, 0, 1],  # piece 1 only here -> dedicated
        [0, 0, 0, 1],  # only the shared piece 3 -> not dedicated
        [0, 0, 1, 0],  # piece 2 only here -> dedicated
    ], dtype=torch.bool)
    assert dedicated_pieces(torch.zeros(4, 4), masks).tolist() == [True, True, False, True]


def test_toy_criteria_flag_a_missed_feature_and_an_unsummed_identity():

    tms = TARGETS["tms_40-10-id"]
    bad = {"tms/mmcs": 0.8949, "faithfulness_rel_error/hidden": 0.2623}  # tms_40-10-id, seed 0, top-k
    assert missed_criteria(bad, tms.criteria, tms.criteria_max) == [
        "tms/mmcs = 0.8949 misses its criterion >= 0.99",
        "faithfulness_rel_error/hidden = 0.2623 misses its criterion <= 0.01"]
    assert missed_criteria({"tms/mmcs": 0.9999, "faithfulness_rel_error/hidden": 0.0016}, tms.criteria,
                           tms.criteria_max) == []
    # learned gates, seed 0: the criteria of the columns and the identity met, the lengths 1.8x
    learned = {"tms/mmcs": 0.9974, "tms/grouped_ml2r": 1.806, "faithfulness_rel_error/hidden": 0.0012}
    assert missed_criteria(learned, tms.criteria, tms.criteria_max) == [
        "tms/grouped_ml2r = 1.806 misses its criterion <= 1.1"]
    resid = TARGETS["resid_mlp3"]
    assert missed_criteria({"resid/dedicated_features": 97.0}, resid.criteria, resid.criteria_max) == [
        "resid/dedicated_features = 97 misses its criterion >= 98"]


def test_resid_targets_keep_w_out_whole_on_every_input_it_acts_on():
    # resid_mlp3's default: W_out as d_mlp pieces, every one in the top-k of every input that
    # reaches W_out (and so in the ground truth's one mechanism every input uses); W_in keeps
    # 130 pieces at 0.5 per input
    spec = TARGETS["resid_mlp3"]
    module = made_target("resid_mlp3", 0)
    model = decomposed_model(TargetRef("resid_mlp3", modules=spec.modules, hidden=spec.hidden), module)
    cfg = resolve_stage1(spec.stage1, batch_size=64)
    sample = lambda b, g: spec.sample(module, b, g)  # noqa: E731
    n_pieces, topk = matrix_settings(Target(TargetRef("resid_mlp3"), module, model, sample), cfg)
    assert n_pieces == {f"layers.{i}.{m}": (130 if m == "W_in" else 17) for i in range(3) for m in ("W_in", "W_out")}
    state = new_state(model, cfg, n_pieces, torch.device("cpu"), sample)
    pieces = {n: (state.U[n].detach(), state.V_raw[n].detach()) for n in n_pieces}
    x = sample(64, torch.Generator().manual_seed(1))
    scores, masks = score_inputs(model, x, pieces, topk, block=64)
    for i in range(3):
        # every W_out piece that acts on an input is kept (a zero attribution never is)
        w_out = f"layers.{i}.W_out"
        assert torch.equal(masks[w_out], scores[w_out] > 0) and float(masks[w_out].float().mean()) > 0.3
        assert int(masks[f"layers.{i}.W_in"].sum()) <= 32  # 0.5 per input
    names = list(n_pieces)
    labels = feature_truth_labels(model, 102, pieces, topk, names, list(range(102)))
    w_out = np.concatenate([np.full(n_pieces[n], n.endswith("W_out")) for n in names])
    assert set(labels[w_out]) == {102}  # the shared mechanism
