"""The top-k objective's stochastic term on a case worked by hand: tms_5-2's
W split exactly into its two singular pieces, plus a pair of pieces +D and
-D that no input selects. The pair sums to zero, so faithfulness and the
top-k forward pass cannot see it; only random partial masks of the inactive
pieces, (u1 - u2) D, expose it (resid_mlp's dead W_out pieces did this)."""

import pytest
import torch

from apdkit.stages.stage1.objective import objective
from apdkit.targets.load import TargetRef, decomposed_model
from apdkit.targets.registry import TARGETS
from tests.helpers import made_target

COEFFS = {"faithfulness": 1.0, "minimality": 1.0, "hidden": 0.0, "simplicity": 0.0}


@pytest.fixture(scope="module")
def toy():
    spec = TARGETS["tms_5-2"]
    module = made_target("tms_5-2", 0)
    for p in module.parameters():
        p.requires_grad_(False)
    model = decomposed_model(TargetRef("tms_5-2", modules=spec.modules, hidden=spec.hidden), module)
    x = spec.sample(module, 256, torch.Generator().manual_seed(0))
    return model, x


def pieces_with_cancelling_pair(W: torch.Tensor, scale: float):
    """W's two singular pieces, then scale * (u0 v1^T) and its negative."""
    u, s, vh = torch.linalg.svd(W, full_matrices=False)
    d = scale * u[:, 0]
    U = torch.stack([s[0] * u[:, 0], s[1] * u[:, 1], d, -d])
    V = torch.stack([vh[0], vh[1], vh[1], vh[1]])
    return U, V


def losses(model, x, scale, stochastic_coeff):
    weights = model.weights()
    (name, W), = weights.items()
    U, V = pieces_with_cancelling_pair(W, scale)
    on = torch.tensor([1.0, 1.0, 0.0, 0.0]).expand(x.shape[0], 4)
    fixed = lambda scores, topk: {name: on}  # noqa: E731 - the two singular pieces on every row
    return objective(model, x, weights, {name: U}, {name: V}, {name: 2.0},
                     dict(COEFFS, stochastic=stochastic_coeff), 1.0, 1.0, select=fixed,
                     gen=torch.Generator().manual_seed(0))


def test_a_cancelling_inactive_pair_is_seen_only_by_the_stochastic_term(toy):
    model, x = toy
    clean, dirty = losses(model, x, 0.0, 1.0), losses(model, x, 3.0, 1.0)
    for out in (clean, dirty):
        assert float(out["faithfulness"]) == pytest.approx(0.0, abs=1e-10)
        assert float(out["minimality"]) == pytest.approx(0.0, abs=1e-10)
    assert float(clean["stochastic"]) == pytest.approx(0.0, abs=1e-10)
    assert float(dirty["stochastic"]) > 1e-2
    # the term grows as the pair's length squared (same draws: same seed)
    assert float(losses(model, x, 6.0, 1.0)["stochastic"]) > 3.0 * float(dirty["stochastic"])


def test_the_stochastic_term_enters_the_total_with_its_coefficient(toy):
    model, x = toy
    off, on = losses(model, x, 3.0, 0.0), losses(model, x, 3.0, 10.0)
    assert float(off["stochastic"]) == 0.0  # not computed when its coefficient is 0
    assert float(on["total"] - off["total"]) == pytest.approx(10.0 * float(on["stochastic"]), rel=1e-6)


def split_with_idle_piece(W: torch.Tensor, shift: float):
    """W's two singular pieces, shift * u0 v0^T moved out of the first into a third piece."""
    u, s, vh = torch.linalg.svd(W, full_matrices=False)
    U = torch.stack([(s[0] - shift) * u[:, 0], s[1] * u[:, 1], shift * u[:, 0]])
    V = torch.stack([vh[0], vh[1], vh[0]])
    return U, V


def test_the_set_aside_term_switches_on_what_the_batch_selects_and_nothing_else(toy):
    """Rows select piece 0 or piece 1 in turn and never piece 2. The term runs
    every row with pieces 0 and 1 on: zero when piece 2 is empty, and exactly
    the error of the model with W - shift u0 v0^T when it is not."""
    model, x = toy
    weights = model.weights()
    (name, W), = weights.items()
    rows = x.shape[0]
    turn = torch.zeros(rows, 3)
    turn[0::2, 0] = 1.0
    turn[1::2, 1] = 1.0
    by_turn = lambda scores, topk: {name: turn}  # noqa: E731

    def run(shift, coeff):
        U, V = split_with_idle_piece(W, shift)
        return objective(model, x, weights, {name: U}, {name: V}, {name: 1.0},
                         dict(COEFFS, set_aside=coeff), 1.0, 1.0, select=by_turn)

    exact, off = run(0.0, 1.0), run(0.5, 0.0)
    assert float(exact["set_aside"]) == pytest.approx(0.0, abs=1e-10)
    assert float(exact["minimality"]) > 1e-3  # each row lacks one of W's pieces: the term is not minimality
    assert float(off["set_aside"]) == 0.0  # not computed when its coefficient is 0
    shifted = run(0.5, 2.0)
    U, V = split_with_idle_piece(W, 0.5)
    without_idle = model.run(x, {name: (U, V)}, {name: torch.tensor([1.0, 1.0, 0.0]).expand(rows, 3)}).output
    expected = torch.nn.functional.mse_loss(without_idle, model.forward(x).output)
    assert float(expected) > 1e-4
    assert float(shifted["set_aside"]) == pytest.approx(float(expected), rel=1e-6)
    assert float(shifted["total"] - off["total"]) == pytest.approx(2.0 * float(expected), rel=1e-5)
