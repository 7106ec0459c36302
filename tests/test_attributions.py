"""Attributions: the closed forms, the generic vector-Jacobian path and the
random-probe estimator against the slow definition."""

import pytest
import torch

from apdkit.core.attributions import attributions, reference_attributions
from apdkit.core.model import DecomposedModel
from apdkit.core.pieces import init_random
from apdkit.targets.load import TargetRef, decomposed_model
from apdkit.targets.registry import TARGETS
from tests.helpers import made_target
from tests.user_models import TinyTransformer


def _random_pieces(model: DecomposedModel, C: int, gen, scale: float = 3.0):
    return {n: (U * scale, V) for n, (U, V) in ((n, init_random(w, C, gen)) for n, w in model.weights().items())}


@pytest.mark.parametrize("name", [n for n, spec in TARGETS.items() if spec.fast_sites is not None])
def test_closed_form_and_generic_paths_equal_reference(name):
    spec = TARGETS[name]
    gen = torch.Generator().manual_seed(7)
    module = made_target(name, 3)
    fast_model = decomposed_model(TargetRef(name, modules=spec.modules, hidden=spec.hidden), module)
    generic = DecomposedModel(module, spec.modules, hidden=spec.hidden)
    assert fast_model.fast_sites is not None and generic.fast_sites is None
    # Random (not trained) weights and pieces: the identity must hold for any.
    pieces = _random_pieces(generic, 9, gen)
    x = spec.sample(module, 6, gen)
    x[0] = 0.0  # an all-zero input has all-zero attributions
    x[1] = torch.rand(x.shape[1], generator=gen)  # a dense one exercises every ReLU
    fast, fwd = attributions(fast_model, x, pieces)
    exact, gfwd = attributions(generic, x, pieces)
    slow = reference_attributions(generic, x, pieces)
    assert torch.allclose(fwd.output, module(x), atol=1e-6)
    assert fwd.hidden.keys() == gfwd.hidden.keys()
    for n in generic.names:
        assert fast[n].shape == (6, 9)
        assert torch.all(fast[n][0] == 0)
        for path in (fast, exact):
            rel = (path[n] - slow[n]).abs().max() / slow[n].abs().max()
            assert rel < 1e-5, (n, float(rel))


def test_attribution_of_known_piece_tms():
    """Hand-checkable: TMS 2-1 with W = [[1, 0]], bias 0, piece = W itself.
    F(x) = ReLU(W^T W x); for x = (0.5, 0): F = (0.5, 0); dF_0/dW_00 = 2 * W_00 * x_0 = 1,
    so the piece's contribution to output 0 is 1 and to output 1 is 0:
    A = sqrt((1^2 + 0^2) / 2)."""
    from apdkit.targets.tms.model import TMS

    module = TMS(2, 1)
    with torch.no_grad():
        module.W.weight.copy_(torch.tensor([[1.0, 0.0]]))
    U, V = torch.tensor([[1.0]]), torch.tensor([[1.0, 0.0]])
    x = torch.tensor([[0.5, 0.0]])
    for model in (decomposed_model(TargetRef("tms_5-2", modules=("W", "W_T")), module),
                  DecomposedModel(module, ["W", "W_T"])):
        scores, _ = attributions(model, x, {"W": (U, V)})
        assert torch.allclose(scores["W"], torch.tensor([[(0.5) ** 0.5]]))


def _small_transformer():
    torch.manual_seed(0)
    module = TinyTransformer(vocab=16, d=8, heads=2, seq=4).eval()
    # every layer kind: Embedding, Linear (attention, MLP, read-out)
    model = DecomposedModel(module, ["embed", "blocks.*.attn.*", "blocks.*.mlp.fc_*", "unembed"])
    gen = torch.Generator().manual_seed(1)
    pieces = _random_pieces(model, 5, gen, scale=1.0)
    x = torch.randint(16, (3, 4), generator=gen)
    return model, pieces, x


def test_generic_path_is_exact_per_position_on_a_transformer():
    """Per (sequence, position) rows: a piece at one position is credited with
    its effect on every later output of the sequence."""
    model, pieces, x = _small_transformer()
    exact, fwd = attributions(model, x, pieces, max_exact_outputs=10_000)
    slow = reference_attributions(model, x, pieces)
    assert fwd.output.shape == (12, 16)
    for n in model.names:
        assert exact[n].shape == (12, 5)
        assert (exact[n] - slow[n]).abs().max() / slow[n].abs().max() < 1e-5, n


def test_estimator_is_unbiased_and_converges():
    model, pieces, x = _small_transformer()
    exact, _ = attributions(model, x, pieces, max_exact_outputs=10_000)
    gen = torch.Generator().manual_seed(5)
    errors = {}
    for K in (8, 512):
        est, _ = attributions(model, x, pieces, max_exact_outputs=1, probes=K, gen=gen)
        errors[K] = max(float((est[n] ** 2 - exact[n] ** 2).norm() / (exact[n] ** 2).norm()) for n in model.names)
    assert errors[512] < 0.15 and errors[512] < errors[8] / 3
    # unbiased for the squared attribution: the mean of many draws approaches it
    draws = [attributions(model, x, pieces, max_exact_outputs=1, probes=16, gen=gen)[0] for _ in range(64)]
    for n in model.names:
        mean_sq = torch.stack([d[n] ** 2 for d in draws]).mean(0)
        assert float((mean_sq - exact[n] ** 2).norm() / (exact[n] ** 2).norm()) < 0.1, n


@pytest.mark.parametrize("method", ["integrated_gradients", "ablation"])
def test_other_methods_equal_their_definition_per_position_on_a_transformer(method):
    model, pieces, x = _small_transformer()
    fast, fwd = attributions(model, x, pieces, max_exact_outputs=10_000, method=method, steps=4)
    slow = reference_attributions(model, x, pieces, method=method, steps=4)
    grad, _ = attributions(model, x, pieces, max_exact_outputs=10_000)
    for n in model.names:
        assert fast[n].shape == (12, 5)
        assert (fast[n] - slow[n]).abs().max() / slow[n].abs().max() < 1e-5, n
    # a nonlinear model: the methods differ from the gradient
    assert max(float((fast[n] - grad[n]).abs().max() / grad[n].abs().max()) for n in model.names) > 0.05


@pytest.mark.parametrize("method", ["integrated_gradients", "ablation"])
def test_other_methods_equal_their_definition_on_a_toy(method):
    spec = TARGETS["resid_mlp"]
    gen = torch.Generator().manual_seed(7)
    module = made_target("resid_mlp", 3)
    model = decomposed_model(TargetRef("resid_mlp", modules=spec.modules), module)
    pieces = _random_pieces(model, 4, gen, scale=0.3)
    x = spec.sample(module, 3, gen)
    fast, _ = attributions(model, x, pieces, method=method, steps=3)
    slow = reference_attributions(DecomposedModel(module, spec.modules), x, pieces, method=method, steps=3)
    tol = 1e-4 if method == "ablation" else 1e-5  # ablation: a float32 difference of two forward passes
    for n in model.names:
        assert (fast[n] - slow[n]).abs().max() / slow[n].abs().max() < tol, n


def test_all_methods_agree_where_the_output_is_linear_in_the_weights():
    """y = W x: the output change of a piece is its gradient term exactly."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(5, 3))
    model = DecomposedModel(module, ["0"])
    gen = torch.Generator().manual_seed(2)
    pieces = _random_pieces(model, 4, gen, scale=1.0)
    x = torch.randn(7, 5, generator=gen)
    grad, _ = attributions(model, x, pieces)
    for method in ("integrated_gradients", "ablation"):
        other, _ = attributions(model, x, pieces, method=method, steps=2)
        assert torch.allclose(other["0"], grad["0"], rtol=1e-5, atol=1e-7), method


def test_methods_on_a_hand_checkable_tms():
    """TMS 2-1, W = [[1, 0]], x = (0.5, 0), one piece = W. F_0 = ReLU(W_00^2 x_0):
    the gradient is 2 W_00 x_0 = 1 (A = sqrt(1/2)); removing the piece
    changes F_0 by 0.5, and so does integrating the gradient 2 alpha x_0 over
    alpha in [0, 1] (A = sqrt(0.25 / 2) for both)."""
    from apdkit.targets.tms.model import TMS

    module = TMS(2, 1)
    with torch.no_grad():
        module.W.weight.copy_(torch.tensor([[1.0, 0.0]]))
    model = DecomposedModel(module, ["W", "W_T"])
    pieces = {"W": (torch.tensor([[1.0]]), torch.tensor([[1.0, 0.0]]))}
    x = torch.tensor([[0.5, 0.0]])
    expected = {"gradient": 0.5 ** 0.5, "integrated_gradients": 0.125 ** 0.5, "ablation": 0.125 ** 0.5}
    for method, value in expected.items():
        scores, _ = attributions(model, x, pieces, method=method, steps=3)
        assert torch.allclose(scores["W"], torch.tensor([[value]])), method


def test_unknown_method_is_an_error():
    model, pieces, x = _small_transformer()
    with pytest.raises(ValueError, match="unknown attribution method"):
        attributions(model, x, pieces, method="shapley")
