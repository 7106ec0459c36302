"""Attributions: the closed forms, the generic vector-Jacobian path and the
random-probe estimator against the slow definition."""

import pytest
import torch

from apdkit.core.attributions import attributions, reference_attributions
from apdkit.core.model import DecomposedModel
from apdkit.core.pieces import init_random
from apdkit.targets.load import TargetRef, decomposed_model
from apdkit.targets.registry import TARGETS
from tests.user_models import TinyTransformer


def _random_pieces(model: DecomposedModel, C: int, gen, scale: float = 3.0):
    return {n: (U * scale, V) for n, (U, V) in ((n, init_random(w, C, gen)) for n, w in model.weights().items())}


@pytest.mark.parametrize("name", [n for n, spec in TARGETS.items() if spec.fast_sites is not None])
def test_closed_form_and_generic_paths_equal_reference(name):
    spec = TARGETS[name]
    gen = torch.Generator().manual_seed(7)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        module = spec.make()
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
