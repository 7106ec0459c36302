"""The APD objective for one batch: faithfulness, minimality, hidden-activation
reconstruction and Schatten simplicity. Minimality comes in two forms:
``objective`` (APD: the batch top-k by attribution must reproduce the
output) and ``learned_objective`` (gates, core/gates.py: the output under
stochastic masks, with an importance penalty instead of a k). Plain tensors
and numbers in, loss tensors out."""

from __future__ import annotations

from typing import Callable, ContextManager, Mapping

import torch
from torch import Tensor

from apdkit.core.attributions import attributions, no_timer
from apdkit.core.gates import gate_from_logits, gate_logits, open_identities, piece_inputs, stochastic_piece_masks
from apdkit.core.masks import topk_masks
from apdkit.core.model import DecomposedModel

LOSS_NAMES = ("total", "faithfulness", "minimality", "hidden", "simplicity", "stochastic", "set_aside", "importance")


def mask_dtype(U: Mapping[str, Tensor]) -> torch.dtype:
    """The dtype masks are cast to: the pieces' (a floating one), never the
    input's, which for token models is an integer one that would truncate a
    partial mask such as g + (1 - g) u to 0."""
    return next(iter(U.values())).dtype


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
    hidden and simplicity weights, and optionally stochastic and set_aside
    (terms with weight 0 are not computed). ``select`` turns attributions into masks
    (batch top-k; data-parallel replicas take it over the global batch).
    ``low_precision`` (e.g. bfloat16) autocasts the attributions and the
    masked forward pass; faithfulness, simplicity and the losses' sums stay
    float32. ``attribution`` and ``integration_steps`` choose the method
    (core/attributions.py)."""
    n_weights = sum(w.numel() for w in weights.values())
    faith = faithfulness_loss(weights, U, V)
    pieces = {n: (U[n].detach(), V[n].detach()) for n in U}
    dtype = mask_dtype(U)
    with torch.autocast(x.device.type, dtype=low_precision or torch.bfloat16, enabled=low_precision is not None):
        scores, target = attributions(model, x, pieces, max_exact_outputs, probes, gen, timer, attribution,
                                      integration_steps)
        with timer("top-k forward"):
            masks = select({n: v.float() for n, v in scores.items()}, topk)
            fwd = model.run(x, {n: (U[n], V[n]) for n in U}, {n: m.to(dtype) for n, m in masks.items()},
                            hidden=bool(target.hidden))
        stochastic = torch.zeros((), device=x.device)
        if coeffs.get("stochastic", 0.0) > 0:
            # the inactive pieces at random partial values must not matter either (verify's stochastic check)
            noisy = stochastic_piece_masks({n: m.to(dtype) for n, m in masks.items()}, gen)
            out = model.run(x, {n: (U[n], V[n]) for n in U}, noisy).output
            stochastic = torch.nn.functional.mse_loss(out.float(), target.output.float())
        set_aside = torch.zeros((), device=x.device)
        if coeffs.get("set_aside", 0.0) > 0:
            # every piece the batch selects on, the others off: the weight no input uses must be inert (verify's
            # set-aside condition, with the batch, or a data-parallel replica's rows, standing in for the data)
            used = {n: m.amax(0, keepdim=True).expand_as(m).to(dtype) for n, m in masks.items()}
            out = model.run(x, {n: (U[n], V[n]) for n in U}, used).output
            set_aside = torch.nn.functional.mse_loss(out.float(), target.output.float())
    minimality = torch.nn.functional.mse_loss(fwd.output.float(), target.output.float())
    hidden = sum((torch.nn.functional.mse_loss(fwd.hidden[h].float(), target.hidden[h].float())
                  for h in target.hidden), torch.zeros((), device=x.device))
    # Schatten-p of a rank-1 piece is its one singular value |U[c]| (V unit).
    rows = fwd.output.shape[0]
    simplicity = sum((masks[n].sum(0).to(dtype) * U[n].norm(dim=1).pow(schatten_p)).sum() for n in U) \
        / (n_weights * rows)
    total = (coeffs["faithfulness"] * faith + coeffs["minimality"] * minimality + coeffs["hidden"] * hidden
             + coeffs["simplicity"] * simplicity_weight * simplicity + coeffs.get("stochastic", 0.0) * stochastic
             + coeffs.get("set_aside", 0.0) * set_aside)
    return {"total": total, "faithfulness": faith, "minimality": minimality, "hidden": hidden,
            "simplicity": simplicity, "stochastic": stochastic, "set_aside": set_aside,
            "importance": torch.zeros((), device=x.device)}


def learned_objective(model: DecomposedModel, x: Tensor, weights: Mapping[str, Tensor], U: Mapping[str, Tensor],
                      V: Mapping[str, Tensor], gates: Mapping[str, Mapping[str, Tensor]], coeffs: Mapping[str, float],
                      importance_p: float,
                      gen: torch.Generator | None = None, low_precision: torch.dtype | None = None,
                      ) -> dict[str, Tensor]:
    """All loss terms for one batch in the learned mode, each scale-free so
    one set of weights can serve every target: ``faithfulness`` is
    |W - sum of pieces|^2 / |W|^2 over all matrices; ``minimality`` the
    output MSE with every piece masked at g + (1 - g) u, as a fraction of the
    MSE with every decomposed matrix ablated; ``importance`` the mean over
    inputs and matrices of sum_c relu(z_c)^p / min(d_out, d_in) (an inserted
    identity and a matrix kept whole have no penalty: their gates are 1,
    core/gates.py).
    No simplicity term (the pieces are rank 1). ``coeffs``:
    learned_faithfulness, hidden, importance."""
    n_weights = sum(w.numel() for w in weights.values())
    faith = faithfulness_loss(weights, U, V) * n_weights / sum((w ** 2).sum() for w in weights.values())
    live = {n: (U[n], V[n]) for n in U}
    with torch.autocast(x.device.type, dtype=low_precision or torch.bfloat16, enabled=low_precision is not None):
        inner, target = piece_inputs(model, x, live)
        # gates decide; they do not shape pieces. A matrix with no gates is kept whole: its gates are 1
        z = {n: gate_logits(gates[n], inner[n].detach().float()) for n in U if n in gates}
        g = open_identities(model, {n: gate_from_logits(z[n]) if n in z else torch.ones_like(inner[n].float())
                                    for n in U})
        dtype = mask_dtype(U)
        fwd = model.run(x, live, {n: m.to(dtype) for n, m in stochastic_piece_masks(g, gen).items()},
                        hidden=bool(target.hidden))
        with torch.no_grad():
            ablated = model.run(x, live, {n: torch.zeros_like(v) for n, v in g.items()}).output
    ablated_mse = torch.nn.functional.mse_loss(ablated.float(), target.output.float()).clamp_min(1e-12)
    minimality = torch.nn.functional.mse_loss(fwd.output.float(), target.output.float()) / ablated_mse
    hidden = sum((torch.nn.functional.mse_loss(fwd.hidden[h].float(), target.hidden[h].float())
                  for h in target.hidden), torch.zeros((), device=x.device))
    # per matrix, divided by its rank: a coefficient of 1 prices a row that opens as many pieces as the
    # matrix has rank like the ablated output error, whatever the matrix's size (RESULTS.md, "Importance per rank")
    gated = [(v, min(weights[n].shape)) for n, v in z.items() if n not in model.identities]
    importance = sum((v.relu().pow(importance_p).sum(1).mean() / rank for v, rank in gated),
                     torch.zeros((), device=x.device)) / max(len(gated), 1)
    total = (coeffs["learned_faithfulness"] * faith + minimality + coeffs["hidden"] * hidden
             + coeffs["importance"] * importance)
    zero = torch.zeros((), device=x.device)
    return {"total": total, "faithfulness": faith, "minimality": minimality, "hidden": hidden,
            "simplicity": zero, "stochastic": zero, "set_aside": zero, "importance": importance}
