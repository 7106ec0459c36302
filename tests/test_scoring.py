import torch

from apdkit.targets.probes import dedicated_pieces
from apdkit.targets.tms.scoring import feature_recovery


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
    from apdkit.targets.registry import TARGETS
    from apdkit.targets.spec import missed_criteria

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
