"""The inactive-mechanism checks (stochastic, resample, adversarial) on a
linear model whose answer is known exactly.

y = W x with W = I (4 x 4), inputs one-hot, each feature on a quarter of the
rows; mechanism f is piece f (e_f e_f^T). The wrong decomposition adds two
pieces that cancel in the sum, +Q to mechanism 0 and -Q to mechanism 1, with
Q = v e_0 e_3^T: it reads feature 3. On a feature-3 row with mechanism g at
mask m_g the output is e_3 + v (m_0 - m_1) e_0, so the row's MSE is
v^2 (m_0 - m_1)^2 / 4 while the ablated MSE is 1/4 on every row:

- at the input's own mechanisms alone (minimality's point) the error is 0;
- adversarial: the vertex m_0 = 1, m_1 = 0 gives fraction v^2 / 4 exactly;
- stochastic: E[(r_0 - r_1)^2] = 1/6, fraction v^2 / 24 on average;
- resample: a donor row of feature 0 or 1 (half of them) switches one on,
  fraction v^2 / 8 on average.
"""

import pytest
import torch
from torch import nn

from apdkit.core.inactive import (adversarial_masks, mechanism_output_error, resample_masks,
                                  stochastic_masks)
from apdkit.core.model import DecomposedModel

D, ROWS, V_SCALE = 4, 4000, 3.0
THRESHOLDS = {"stochastic": 0.25, "resample": 0.25, "adversarial": 0.5}  # VerifyConfig's defaults


def _setup(wrong: bool):
    module = nn.Sequential(nn.Linear(D, D, bias=False))
    with torch.no_grad():
        module[0].weight.copy_(torch.eye(D))
    model = DecomposedModel(module, ["0"])
    U, V = torch.eye(D), torch.eye(D)
    labels = list(range(D))
    if wrong:
        U = torch.cat([U, V_SCALE * torch.eye(D)[[0]], -V_SCALE * torch.eye(D)[[0]]])
        V = torch.cat([V, torch.eye(D)[[3]], torch.eye(D)[[3]]])
        labels += [0, 1]
    membership = {"0": torch.zeros(len(labels), D)}
    membership["0"][torch.arange(len(labels)), torch.tensor(labels)] = 1.0
    feature = torch.arange(ROWS) % D
    x = torch.nn.functional.one_hot(feature, D).float()
    active = torch.nn.functional.one_hot(feature, D).float()
    pieces = {"0": (U, V)}
    assert torch.allclose(U.T @ V, torch.eye(D))  # both decompositions are faithful
    return model, x, pieces, membership, active


def _fractions(wrong: bool, seed: int = 0) -> dict[str, float]:
    model, x, pieces, membership, active = _setup(wrong)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        target = model.forward(x).output
    ablated = float((target ** 2).mean())
    err = lambda m: float(mechanism_output_error(model, x, pieces, membership, m, target).mean()) / ablated  # noqa: E731
    _, worst = adversarial_masks(model, x, pieces, membership, active, target, steps=20, step_size=0.1, gen=gen)
    return {"own": err(active), "stochastic": err(stochastic_masks(active, gen)),
            "resample": err(resample_masks(active, gen)), "adversarial": float(worst.mean()) / ablated}


def test_a_right_decomposition_has_no_error_under_any_mask_of_its_inactive_mechanisms():
    for check, value in _fractions(wrong=False).items():
        assert value == pytest.approx(0.0, abs=1e-12), check


@pytest.mark.parametrize("seed", [0, 1])
def test_cancelling_pieces_pass_at_the_own_masks_and_fail_every_inactive_check(seed):
    f = _fractions(wrong=True, seed=seed)
    assert f["own"] == pytest.approx(0.0, abs=1e-12)  # what minimality sees: nothing wrong
    assert f["adversarial"] == pytest.approx(V_SCALE ** 2 / 4, rel=1e-5)
    assert f["stochastic"] == pytest.approx(V_SCALE ** 2 / 24, rel=0.1)
    assert f["resample"] == pytest.approx(V_SCALE ** 2 / 8, rel=0.1)
    for check, limit in THRESHOLDS.items():
        assert f[check] > limit, check


def test_the_adversarial_search_finds_more_than_random_masks_and_keeps_masks_in_range():
    model, x, pieces, membership, active = _setup(wrong=True)
    with torch.no_grad():
        target = model.forward(x).output
    masks, worst = adversarial_masks(model, x, pieces, membership, active, target, steps=20, step_size=0.1,
                                     gen=torch.Generator().manual_seed(0))
    assert masks.min() >= 0 and masks.max() <= 1
    assert torch.equal(masks[active.bool()], torch.ones(ROWS))  # active mechanisms stay fully on
    no_steps = adversarial_masks(model, x, pieces, membership, active, target, steps=0, step_size=0.1,
                                 gen=torch.Generator().manual_seed(0))[1]
    assert float(worst.mean()) > 3 * float(no_steps.mean())
