"""The fast attribution path equals the per-output-dimension reference."""

import pytest
import torch

from stages.attributions import attributions, reference_attributions
from stages.pieces import init_factors
from targets.registry import TARGETS


@pytest.mark.parametrize("name", list(TARGETS))
def test_fast_attributions_equal_reference(name):
    gen = torch.Generator().manual_seed(7)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = TARGETS[name].make()
    # Random (not trained) weights and pieces: the identity must hold for any.
    factors = {n: init_factors(w.detach(), 9, gen) for n, w in model.decomposed_weights().items()}
    factors = {n: (U * 3, V) for n, (U, V) in factors.items()}
    x = model.sample_inputs(6, gen)
    x[0] = 0.0  # an all-zero input has all-zero attributions
    x[1] = torch.rand(model.n_features, generator=gen)  # a dense one exercises every ReLU
    fast, fwd = attributions(model, x, factors)
    slow = reference_attributions(model, x, factors)
    assert torch.allclose(fwd.output, model(x))
    for n in model.decomposed:
        assert fast[n].shape == (6, 9)
        assert torch.all(fast[n][0] == 0)
        rel = (fast[n] - slow[n]).abs().max() / slow[n].abs().max()
        assert rel < 1e-5, (n, float(rel))


def test_attribution_of_known_piece_tms():
    """Hand-checkable: TMS 2-1 with W = [[1, 0]], bias 0, piece = W itself.
    F(x) = ReLU(W^T W x); for x = (0.5, 0): F = (0.5, 0); dF_0/dW_00 = 2 * W_00 * x_0 = 1,
    so the piece's contribution to output 0 is 1 and to output 1 is 0:
    A = sqrt((1^2 + 0^2) / 2)."""
    from targets.tms import TMS

    model = TMS(2, 1)
    with torch.no_grad():
        model.W.copy_(torch.tensor([[1.0, 0.0]]))
    U, V = torch.tensor([[1.0]]), torch.tensor([[1.0, 0.0]])
    scores, _ = attributions(model, torch.tensor([[0.5, 0.0]]), {"W": (U, V)})
    assert torch.allclose(scores["W"], torch.tensor([[(0.5) ** 0.5]]))


@pytest.mark.parametrize("name", ["tms_5-2-id", "resid_mlp2"])
def test_generic_autodiff_path_equals_reference(name):
    """The fallback any new target gets (one vectorised VJP) is exact too."""
    from stages.attributions import _contract
    from targets.jacobians import autodiff_sites

    gen = torch.Generator().manual_seed(1)
    model = TARGETS[name].make()
    factors = {n: init_factors(w.detach(), 7, gen) for n, w in model.decomposed_weights().items()}
    x = model.sample_inputs(5, gen)
    x[1] = torch.rand(model.n_features, generator=gen)
    _, sites = autodiff_sites(model, x)
    fast = _contract(sites, factors, 5)
    slow = reference_attributions(model, x, factors)
    for n in model.decomposed:
        assert (fast[n] - slow[n]).abs().max() / slow[n].abs().max() < 1e-5
