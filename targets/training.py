"""Target training: one small loop shared by the built-in toys."""

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


def fit_target(
    model: nn.Module,
    sample: Callable[[int, torch.Generator], tuple[Tensor, Tensor]],
    recipe: dict,
    gen: torch.Generator,
    on_step: Callable[[int, float], None] | None = None,
) -> float:
    """Train ``model`` on (input, label) batches with AdamW and MSE; returns the
    mean loss over the last tenth of the steps. Deterministic given ``gen``."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    steps, warmup = recipe["steps"], int(recipe.get("warmup", 0.0) * recipe["steps"])
    tail: list[Tensor] = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = recipe["lr"] * cosine_lr(step, steps, warmup, recipe.get("schedule", "cosine"))
        x, y = sample(recipe["batch"], gen)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= steps - max(1, steps // 10):
            tail.append(loss.detach())
        if on_step is not None and (step % 100 == 0 or step == steps - 1):
            on_step(step, float(loss.detach()))
    return float(torch.stack(tail).mean())
