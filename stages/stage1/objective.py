"""The APD objective for one batch: faithfulness, minimality (batch top-k by
attribution), hidden-activation reconstruction and Schatten simplicity.
Plain tensors and numbers in, loss tensors out."""

from __future__ import annotations

from typing import Callable, ContextManager, Mapping

import torch
from torch import Tensor

from apdkit.core.attributions import attributions, no_timer
from apdkit.core.masks import topk_masks
from apdkit.core.model import DecomposedModel

LOSS_NAMES = ("total", "faithfulness", "minimality", "hidden", "simplicity")


def faithfulness_loss(weights: Mapping[str, Tensor], U: Mapping[str, Tensor], V: Mapping[str, Tensor]) -> Tensor:
    n_weights = sum(w.numel() for w in weights.values())
    return sum(((weights[n] - U[n].T @ V[n]) ** 2).sum() for n in weights) / n_weights


def objective(model: DecomposedModel, x: Tensor, weights: Mapping[str, Tensor], U: Mapping[str, Tensor],
              V: Mapping[str, Tensor], topk: Mapping[str, float], coeffs: Mapping[str, float], schatten_p: float,
              simplicity_weight: float, max_exact_outputs: int = 512, probes: int = 64,
              gen: torch.Generator | None = None,
              timer: Callable[[str], ContextManager] = no_timer,
              select: Callable[[Mapping[str, Tensor], Mapping[str, float]], dict[str, Tensor]] = topk_masks,
              low_precision: torch.dtype | None = None, attribution: str = "gradient", integration_steps: int = 8,
              ) -> dict[str, Tensor]:
    """All loss terms for one batch. ``coeffs`` has faithfulness, minimality,
    hidden and simplicity weights. ``select`` turns attributions into masks
    (batch top-k; data-parallel replicas take it over the global batch).
    ``low_precision`` (e.g. bfloat16) autocasts the attributions and the
    masked forward pass; faithfulness, simplicity and the losses' sums stay
    float32. ``attribution`` and ``integration_steps`` choose the method
    (core/attributions.py)."""
    n_weights = sum(w.numel() for w in weights.values())
    faith = faithfulness_loss(weights, U, V)
    pieces = {n: (U[n].detach(), V[n].detach()) for n in U}
    with torch.autocast(x.device.type, dtype=low_precision or torch.bfloat16, enabled=low_precision is not None):
        scores, target = attributions(model, x, pieces, max_exact_outputs, probes, gen, timer, attribution,
                                      integration_steps)
        with timer("top-k forward"):
            masks = select({n: v.float() for n, v in scores.items()}, topk)
            fwd = model.run(x, {n: (U[n], V[n]) for n in U}, {n: m.to(x.dtype) for n, m in masks.items()},
                            hidden=bool(target.hidden))
    minimality = torch.nn.functional.mse_loss(fwd.output.float(), target.output.float())
    hidden = sum((torch.nn.functional.mse_loss(fwd.hidden[h].float(), target.hidden[h].float())
                  for h in target.hidden), torch.zeros((), device=x.device))
    # Schatten-p of a rank-1 piece is its one singular value |U[c]| (V unit).
    rows = fwd.output.shape[0]
    simplicity = sum((masks[n].sum(0).to(x.dtype) * U[n].norm(dim=1).pow(schatten_p)).sum() for n in U) \
        / (n_weights * rows)
    total = (coeffs["faithfulness"] * faith + coeffs["minimality"] * minimality + coeffs["hidden"] * hidden
             + coeffs["simplicity"] * simplicity_weight * simplicity)
    return {"total": total, "faithfulness": faith, "minimality": minimality, "hidden": hidden,
            "simplicity": simplicity}
