"""Every grouping method recovers a planted partition, and the description
length and rank helpers are exact on small cases."""

import numpy as np
import pytest

from apdkit.stages.group.coactivation import coactivation_numpy
from apdkit.stages.group.methods import (METHODS, GroupingError, GroupingInput, GroupingSettings, apart, bridges,
                                        group_pieces, module_name, split_always_on, split_apart)
from apdkit.stages.group.mechanisms import (best_split, description_length, feature_merges, numerical_rank,
                                            partition_scores, relabel, split_unions, union_mechanisms)


def planted(seed=0, n=4000, sizes=(3, 2, 2, 1, 3)):
    """Groups of pieces that fire together (each group an independent event
    with prob 0.1), plus 2% independent noise flips per piece."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(len(sizes)), sizes)
    events = rng.random((n, len(sizes))) < 0.1
    masks = events[:, truth] & (rng.random((n, len(truth))) > 0.02)
    return masks, truth


def make_input(masks, truth):
    # each group one rank-1 direction per matrix: pieces in a group are parallel
    rng = np.random.default_rng(1)
    dirs = rng.normal(size=(truth.max() + 1, 6))

    def union_rank(positions):
        vecs = dirs[truth[positions]]
        return np.array([np.linalg.matrix_rank(vecs, tol=1e-8)])

    stats = coactivation_numpy(masks)
    return GroupingInput(stats, masks, np.zeros(len(truth), dtype=int), union_rank)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "leiden"])
def test_method_recovers_planted_partition(method):
    masks, truth = planted()
    labels = METHODS[method](make_input(masks, truth), GroupingSettings(threshold=0.5))
    assert partition_scores(labels, truth)["exact_match"] == 1.0


def test_spectral_with_given_group_count():
    masks, truth = planted()
    labels = METHODS["spectral"](make_input(masks, truth), GroupingSettings(n_groups=5))
    assert len(set(labels.tolist())) == 5
    assert partition_scores(labels, truth)["ari"] == 1.0


def test_leiden_works_or_says_why():
    masks, truth = planted()
    try:
        labels = METHODS["leiden"](make_input(masks, truth), GroupingSettings())
    except GroupingError as e:
        assert "louvain" in str(e)
    else:
        assert partition_scores(labels, truth)["exact_match"] == 1.0


def test_numerical_rank_of_sum_of_pieces():
    u = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    v = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert numerical_rank(u[:2], v[:2], 0.05) == 1  # parallel pieces: rank 1
    assert numerical_rank(u, v, 0.05) == 2
    # pieces that cancel: rank of the sum, not of the members
    assert numerical_rank(np.array([[1.0], [-1.0]]), np.array([[1.0], [1.0]]), 0.05) == 0


def test_description_length_formula():
    # 2 groups active on 3 and 5 inputs, ranks 1 and 2: 3 (1 + a) + 5 (1 + 2a)
    assert description_length(np.array([3, 5]), np.array([1, 2]), alpha=0.5) == pytest.approx(3 * 1.5 + 5 * 2)
    assert relabel(np.array([4, -1, 4, 2])).tolist() == [0, -1, 0, 1]


def _input_from_masks(masks):
    return GroupingInput(coactivation_numpy(masks), masks, np.zeros(masks.shape[1], dtype=int),
                         lambda positions: np.array([len(positions)]))


def test_spectral_never_joins_pieces_that_never_co_activate():
    # 5 features on disjoint inputs, one piece each: a global eigengap saw 5 zero eigenvalues and no gap
    rng = np.random.default_rng(0)
    feature = rng.integers(0, 6, size=5000)  # 5: no feature
    masks = feature[:, None] == np.arange(5)[None, :]
    labels = METHODS["spectral"](_input_from_masks(masks), GroupingSettings())
    assert labels.tolist() == [0, 1, 2, 3, 4]


def test_spectral_splits_a_weak_pair_and_a_hub_keeps_a_strong_one():
    rng = np.random.default_rng(1)
    n = 20000
    a, b = rng.random(n) < 0.05, rng.random(n) < 0.05
    weak = b | (a & (rng.random(n) < 0.3))  # piece 1 fires with piece 0 far beyond chance, Jaccard ~0.2
    strong = a & (rng.random(n) < 0.95)  # piece 2 is piece 0 nearly always
    hub = rng.random(n) < 0.5  # an always-half-on piece linked (weakly) to the independent 4 and 5
    c, d = rng.random(n) < 0.05, rng.random(n) < 0.05
    masks = np.stack([a, weak, strong, hub | c | d, c, d], axis=1)
    labels = METHODS["spectral"](_input_from_masks(masks), GroupingSettings())
    assert labels[0] == labels[2] and labels[1] != labels[0]
    assert labels[4] != labels[5]  # joined only through the hub: still apart


def test_two_pieces_alone_are_one_group_only_when_strongly_linked():
    rng = np.random.default_rng(2)
    a = rng.random(20000) < 0.05
    for p_together, expected_groups in ((0.9, 1), (0.1, 2)):
        b = a & (rng.random(20000) < p_together)
        labels = METHODS["spectral"](_input_from_masks(np.stack([a, b], axis=1)), GroupingSettings())
        assert len(set(labels.tolist())) == expected_groups, p_together


def test_apart_pairs_on_a_small_case():
    # A on rows 0-1, B on rows 2-3, H (shared by A and B) on rows 0-3, I1 and I2 on all 10 rows
    rows = np.zeros((10, 5), dtype=bool)
    rows[0:2, 0] = rows[2:4, 1] = rows[0:4, 2] = True
    rows[:, 3] = rows[:, 4] = True
    bad = apart(coactivation_numpy(rows), np.arange(5), together_min=0.3)
    # A-B never together; I is at chance with everything but its twin (always together)
    assert bad.astype(int).tolist() == [[0, 1, 0, 1, 1],
                                        [1, 0, 0, 1, 1],
                                        [0, 0, 0, 1, 1],
                                        [1, 1, 1, 0, 0],
                                        [1, 1, 1, 0, 0]]


def test_feature_merges_counts():
    predicted = np.array([0, 0, 1, 1, -1])
    dedicated = np.array([0, 1, 1, -1, 2])  # mechanism 0 holds features 0 and 1; feature 1 also in mechanism 1
    assert feature_merges(predicted, dedicated) == {"merged_features": 2.0, "split_features": 1.0}


def _shared_piece_cases():
    """Features with their own pieces and pieces shared by several features
    (as resid_mlp's W_out directions serving two or three features)."""
    rng = np.random.default_rng(0)
    n = 20000
    feats = rng.random((n, 4)) < 0.05
    cols = [feats[:, f] & (rng.random(n) > 0.05) for f in range(4) for _ in range(2)]
    two_pieces = np.stack(cols + [feats[:, 0] | feats[:, 1], feats[:, 1] | feats[:, 2] | feats[:, 3]], axis=1)
    star = rng.random((n, 3)) < 0.03  # one piece per feature and one shared by all three
    return [(two_pieces, np.array([0, 0, 1, 1, 2, 2, 3, 3, -1, -1])),
            (np.concatenate([star, star.any(1, keepdims=True)], axis=1), np.array([0, 1, 2, -1]))]


@pytest.mark.parametrize("method", [m for m in METHODS if m != "leiden"])
def test_no_grouping_joins_features_through_a_shared_piece(method):
    for masks, dedicated in _shared_piece_cases():
        labels = group_pieces(method, _input_from_masks(masks), GroupingSettings())
        assert feature_merges(labels, dedicated) == {"merged_features": 0.0, "split_features": 0.0}


def test_without_the_apart_rule_methods_join_features():
    (two_pieces, ded2), (star, ded_star) = _shared_piece_cases()
    off = GroupingSettings(together_min=0.0)
    assert feature_merges(group_pieces("mdl", _input_from_masks(two_pieces), off), ded2)["merged_features"] == 2
    assert feature_merges(group_pieces("louvain", _input_from_masks(star), off), ded_star)["merged_features"] == 3


@pytest.mark.parametrize("same_direction, expected", [(False, [0, 1, 2, 2]), (True, [0, 0, 1, 1])])
def test_mdl_checks_the_exact_rank_then_goes_on_to_the_next_pair(same_direction, expected):
    # pieces 0 and 1 share 20 of their 35 inputs each, 2 and 3 share 12 of 15. The rank-1 lower bound ranks
    # 0+1 first (-153 bits against -108); in two directions their exact length rises by 47 bits, so mdl
    # rejects them and merges 2+3 next, from the same screened pairs; in one direction it merges both pairs
    m = np.zeros((68, 4), dtype=bool)
    m[0:20, [0, 1]] = m[20:35, [0]] = m[35:50, [1]] = True
    m[50:62, [2, 3]] = m[62:65, [2]] = m[65:68, [3]] = True
    direction = np.array([0, 0 if same_direction else 1, 2, 2])
    checked = []

    def union_rank(positions):
        checked.append(sorted(positions.tolist()))
        return np.array([len(np.unique(direction[positions]))])

    labels = METHODS["mdl"](GroupingInput(coactivation_numpy(m), m, np.zeros(4, dtype=int), union_rank),
                            GroupingSettings())
    assert labels.tolist() == expected
    assert checked[4:] == [[0, 1], [2, 3]]  # after the four single pieces: the pairs, best bound first


def test_bridges_on_a_small_case():
    # as test_apart_pairs_on_a_small_case, plus H2: rows 0-2 (with A on both of A's rows, with B on one of B's)
    rows = np.zeros((10, 6), dtype=bool)
    rows[0:2, 0] = rows[2:4, 1] = rows[0:4, 2] = True
    rows[:, 3] = rows[:, 4] = True
    rows[0:3, 5] = True
    # H fires with A and with B (apart) on 2 inputs each; H2's one input with B is at chance: not a link
    assert bridges(coactivation_numpy(rows), together_min=0.3).tolist() == [False, False, True, False, False, False]


def _readout_shared_about_equally():
    """Features 0 and 1 (never together) with two own pieces each, and a
    piece that feature 0's probe would call its own but that fires on 60% of
    either feature's inputs (resid_mlp: a W_out direction read from a neuron
    both features use)."""
    rng = np.random.default_rng(3)
    n = 20000
    f = rng.integers(0, 20, size=n)  # 0, 1: the features; the rest: neither
    a, b = f == 0, f == 1
    shared = (a | b) & (rng.random(n) < 0.6)
    masks = np.stack([a, a & (rng.random(n) < 0.9), b, b & (rng.random(n) < 0.9), shared], axis=1)
    return masks, np.array([0, 0, 1, 1, 0])


@pytest.mark.parametrize("method", [m for m in METHODS if m != "leiden"])
def test_shared_pieces_own_keeps_two_features_apart(method):
    masks, dedicated = _readout_shared_about_equally()
    inp = _input_from_masks(masks)
    own = group_pieces(method, inp, GroupingSettings(shared_pieces="own"))
    assert feature_merges(own, dedicated) == {"merged_features": 0.0, "split_features": 1.0}
    assert len(set(own.tolist())) == 3 and own[4] not in own[:4]
    assert GroupingSettings().shared_pieces == "own"  # the default
    # with "method", every piece its own direction: with either feature the shared piece makes a union
    # (its rank paid where it does not fire), and the union split takes it out as well
    method_settings = GroupingSettings(shared_pieces="method")
    assert group_pieces(method, inp, method_settings).tolist() == own.tolist()
    before = split_apart(METHODS[method](inp, method_settings), inp, method_settings)
    if method in ("spectral", "louvain"):  # these put the shared piece with one of the features
        assert before[4] in (before[0], before[2])
        assert union_mechanisms(before, masks, inp.union_rank, 4.0, 0.9) == [before[4]]
    # but when it reads feature 0's direction (no rank of its own there), no union is left to split:
    # only "own" keeps it out of feature 0's mechanism
    parallel = GroupingInput(inp.stats, masks, inp.matrix_of,
                             lambda positions: np.array([len(set(np.where(positions == 4, 0, positions) // 2))]))
    kept = group_pieces(method, parallel, method_settings)
    assert kept[0] != kept[2]
    if method in ("spectral", "louvain"):
        assert kept[4] in (kept[0], kept[2])
    assert group_pieces(method, parallel, GroupingSettings()).tolist() == own.tolist()


def test_spectral_solves_on_one_blas_thread(monkeypatch):
    # eigenvectors differ in the last bits with the thread count and the clustering follows them
    from threadpoolctl import threadpool_info
    from sklearn.cluster import SpectralClustering

    seen = []

    def recording(real):
        def wrapper(*args, **kwargs):
            seen.append({lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"})
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(np.linalg, "eigvalsh", recording(np.linalg.eigvalsh))
    monkeypatch.setattr(SpectralClustering, "fit_predict", recording(SpectralClustering.fit_predict))
    masks, truth = planted()
    labels = METHODS["spectral"](make_input(masks, truth), GroupingSettings())
    assert partition_scores(labels, truth)["exact_match"] == 1.0
    assert len(seen) >= 2 and all(threads == {1} for threads in seen)


def test_bridges_that_always_fire_together_share_one_mechanism():
    masks, _ = _readout_shared_about_equally()
    twin = np.concatenate([masks, masks[:, 4:5]], axis=1)  # a second piece on exactly the shared piece's inputs
    own = group_pieces("spectral", _input_from_masks(twin), GroupingSettings(shared_pieces="own"))
    assert own[4] == own[5] and len(set(own.tolist())) == 3


def _union_fixture():
    """10 inputs. Pieces 0 and 1 (an identity's two pieces) fire on rows 0-7,
    piece 2 (a feature) on rows 0-1 only, piece 3 (another feature) on rows
    4-5; group 0 joins the feature to the identity. Pieces 4 and 5 fire on
    rows 0-4 and 0-3 + 5: mostly together, not twins (Jaccard 4/6)."""
    masks = np.zeros((10, 6), dtype=bool)
    masks[:8, [0, 1]] = True
    masks[:2, 2] = True
    masks[4:6, 3] = True
    masks[:5, 4] = True
    masks[[0, 1, 2, 3, 5], 5] = True
    return masks, np.array([0, 0, 0, 1, 2, 2])


def _rank_is_count(positions):
    return np.array([len(positions)])


def test_best_split_of_a_union_is_exact():
    masks, labels = _union_fixture()
    # G = 3 groups active on 8, 2 and 6 inputs (S = 16); taking the feature out of group 0 (rank 3,
    # active 8) gives parts active on 2 (rank 1) and 8 (rank 2), with 4 groups:
    # log2(4) (16 - 8 + 2 + 8) - log2(3) 16 + alpha (2 + 16 - 24)
    change, part = best_split(masks, np.array([0, 1, 2]), _rank_is_count, 4.0, 3, 16.0, 0.9)
    assert change == pytest.approx(2 * 18 - np.log2(3) * 16 - 4 * 6)
    assert sorted(part.tolist()) in ([2], [0, 1])
    # pieces 4 and 5 apart would cost log2(4) (16 - 6 + 5 + 5) - log2(3) 16 + alpha (5 + 5 - 12) > 0 bits: kept
    apart_dl = description_length(np.array([8, 2, 5, 5]), np.array([3, 1, 1, 1]), 4.0)
    assert apart_dl - description_length(np.array([8, 2, 6]), np.array([3, 1, 2]), 4.0) == pytest.approx(
        2 * 20 - np.log2(3) * 16 - 4 * 2)
    assert 2 * 20 - np.log2(3) * 16 - 4 * 2 > 0
    assert best_split(masks, np.array([4, 5]), _rank_is_count, 4.0, 3, 16.0, 0.9) is None
    assert best_split(masks, np.array([0, 1]), _rank_is_count, 4.0, 3, 16.0, 0.9) is None  # twins: one class


def test_split_unions_takes_a_feature_out_of_an_identity_mechanism():
    masks, labels = _union_fixture()
    assert union_mechanisms(labels, masks, _rank_is_count, 4.0, 0.9) == [0]
    out = relabel(split_unions(labels, masks, _rank_is_count, 4.0, 0.9))
    assert out.tolist() == [0, 0, 1, 2, 3, 3]
    assert union_mechanisms(out, masks, _rank_is_count, 4.0, 0.9) == []
    # -1 (dead) pieces stay out of every group
    dead = np.array([0, 0, 0, 1, -1, -1])
    assert relabel(split_unions(dead, masks, _rank_is_count, 4.0, 0.9)).tolist() == [0, 0, 1, 2, -1, -1]


def test_group_pieces_splits_unions_unless_the_count_is_fixed():
    masks, _ = _union_fixture()
    # spectral alone keeps the feature with the identity it always fires with; the union split takes it out
    inp = _input_from_masks(np.repeat(masks, 50, axis=0))
    labels = group_pieces("spectral", inp, GroupingSettings())
    assert labels[2] != labels[0] and labels[0] == labels[1]
    with pytest.raises(GroupingError, match="sample of the masks"):
        group_pieces("spectral", GroupingInput(inp.stats, masks[:0], inp.matrix_of, inp.union_rank),
                     GroupingSettings())


def _two_always_on_modules(n=2000, seed=0):
    """Pieces 0, 1 in module 0 and 2, 3 in module 1 on for every input (each
    module's matrix used everywhere); 4, 5 in module 1 fire together on a
    fifth of the inputs. Every piece its own direction of its module's matrix."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, 6), dtype=bool)
    masks[:, :4] = True
    masks[:, [4, 5]] = (rng.random(n) < 0.2)[:, None]
    module_of = np.array([0, 0, 1, 1, 1, 1])

    def union_rank(positions):
        return np.bincount(module_of[positions], minlength=2)

    return GroupingInput(coactivation_numpy(masks), masks, module_of, union_rank, module_of)


def test_mdl_joins_always_on_parts_of_two_modules_and_always_on_own_splits_them():
    inp = _two_always_on_modules()
    # joining two always-on groups saves the bits that name one of them, so mdl joins them whatever they do
    joined = group_pieces("mdl", inp, GroupingSettings(always_on="method", together_min=0.0))
    assert joined.tolist() == [0, 0, 0, 0, 1, 1]
    for together_min in (0.0, 0.3):  # token targets run without the apart rule; the split runs either way
        own = group_pieces("mdl", inp, GroupingSettings(together_min=together_min))
        assert own.tolist() == [0, 0, 1, 1, 2, 2]
    # a fixed group count is the user's: nothing is split
    fixed = group_pieces("spectral", inp, GroupingSettings(n_groups=2))
    assert len(np.unique(fixed)) == 2


def test_split_always_on_splits_only_always_on_parts_across_modules():
    masks = np.zeros((100, 5), dtype=bool)
    masks[:99, 0] = True  # module 0: on for 99 of 100 inputs (always on: >= 0.99)
    masks[:98, 1] = True  # module 1: on for 98 (not always on)
    masks[::2, 2] = True  # module 1: half
    masks[:, [3, 4]] = True  # both in module 2: always on, one module
    module_of = np.array([0, 1, 1, 2, 2])
    inp = GroupingInput(coactivation_numpy(masks), masks, module_of, None, module_of)
    # group 0 spans modules 0 and 1: module 0's part leaves, module 1's parts (98% and half) stay together;
    # group 1 lies in one module and is kept; -1 (dead) stays out
    assert split_always_on(np.array([0, 0, 0, 1, 1]), inp).tolist() == [0, 1, 1, 2, 2]
    assert split_always_on(np.array([0, 0, -1, 1, 1]), inp).tolist() == [0, 1, -1, 2, 2]
    assert split_always_on(np.array([-1, -1, 0, 1, 1]), inp).tolist() == [-1, -1, 0, 1, 1]
    # both parts always on: one keeps the label, the other becomes a mechanism
    assert split_always_on(np.array([0, 1, 1, 0, 0]), inp).tolist() == [0, 1, 1, 2, 2]
    # no modules given, or one module: unchanged
    one = GroupingInput(inp.stats, masks, module_of, None)
    assert split_always_on(np.array([0, 0, 0, 1, 1]), one).tolist() == [0, 0, 0, 1, 1]


def test_module_name_is_the_parent():
    assert module_name("layers.1.q") == "layers.1"
    assert module_name("transformer.h.0.mlp.c_fc") == "transformer.h.0.mlp"
    assert module_name("W") == ""
