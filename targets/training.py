"""Target training: one small loop shared by the built-in targets."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from torch import nn


def cosine_lr(step: int, total: int, warmup: int, schedule: str) -> float:
    """Learning-rate multiplier in [0, 1] for ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_loop(
    model: nn.Module,
    batch_loss: Callable[[torch.Generator, int], Tensor],
    recipe: dict,
    gen: torch.Generator,
    on_step: Callable[[int, float], None] | None = None,
) -> float:
    """AdamW on ``batch_loss(gen, step)`` for ``recipe["steps"]`` steps (lr, weight
    decay, warm-up share and schedule from the recipe; optional ``betas`` and
    gradient-norm ``clip``); returns the mean loss over the last tenth of the
    steps. Deterministic given ``gen``."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe["lr"], weight_decay=recipe["weight_decay"],
                            betas=tuple(recipe.get("betas", (0.9, 0.999))))
    steps, warmup = recipe["steps"], int(recipe.get("warmup", 0.0) * recipe["steps"])
    tail: list[Tensor] = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = recipe["lr"] * cosine_lr(step, steps, warmup, recipe.get("schedule", "cosine"))
        loss = batch_loss(gen, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if "clip" in recipe:
            nn.utils.clip_grad_norm_(params, recipe["clip"])
        opt.step()
        if step >= steps - max(1, steps // 10):
            tail.append(loss.detach())
        if on_step is not None and (step % 100 == 0 or step == steps - 1):
            on_step(step, float(loss.detach()))
    return float(torch.stack(tail).mean())


def fit_target(
    model: nn.Module,
    sample: Callable[[int, torch.Generator], tuple[Tensor, Tensor]],
    recipe: dict,
    gen: torch.Generator,
    on_step: Callable[[int, float], None] | None = None,
) -> float:
    """Train ``model`` on (input, label) batches with MSE (the feature toys)."""
    def batch_loss(g: torch.Generator, step: int) -> Tensor:
        x, y = sample(recipe["batch"], g)
        return torch.nn.functional.mse_loss(model(x), y)

    return train_loop(model, batch_loss, recipe, gen, on_step)
