"""Modular addition, (a + b) mod p, by a one-hidden-layer ReLU MLP on one-hot
pairs, trained on part of the p^2 pairs with weight decay until it
generalises to the rest (grokking). A network that generalises computes with
a few key Fourier frequencies: each hidden unit reads cos/sin(2 pi k a / p)
and the same k of b, and W_out writes frequency k over the answer.
W_in and W_out are the decomposed matrices."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from apdkit.targets.spec import HealthReport
from apdkit.targets.training import train_loop


class ModAddMLP(nn.Module):
    def __init__(self, p: int = 53, d_embed: int = 16, d_hidden: int = 128, train_fraction: float = 0.4,
                 split_seed: int = 0):
        super().__init__()
        self.p, self.train_fraction, self.split_seed = p, train_fraction, split_seed
        self.embed = nn.Linear(2 * p, d_embed, bias=False)  # E_a[a] + E_b[b]: a narrow embedding picks few frequencies
        self.W_in = nn.Linear(d_embed, d_hidden, bias=False)
        self.act = nn.ReLU()
        self.W_out = nn.Linear(d_hidden, p, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.W_out(self.act(self.W_in(self.embed(x))))

    def split(self) -> tuple[Tensor, Tensor]:
        """Pair indices a * p + b of the training and held-out sets: fixed by
        the architecture's split_seed, so a rebuilt module has the same split."""
        order = torch.randperm(self.p ** 2, generator=torch.Generator().manual_seed(self.split_seed))
        n_train = int(self.train_fraction * self.p ** 2)
        return order[:n_train], order[n_train:]

    def encode(self, pairs: Tensor) -> Tensor:
        """One-hot [a | b] rows for pair indices a * p + b."""
        a, b = pairs // self.p, pairs % self.p
        x = torch.zeros(len(pairs), 2 * self.p)
        x[torch.arange(len(pairs)), a] = 1.0
        x[torch.arange(len(pairs)), self.p + b] = 1.0
        return x

    def answers(self, pairs: Tensor) -> Tensor:
        return (pairs // self.p + pairs % self.p) % self.p


def build(**arch) -> ModAddMLP:
    return ModAddMLP(**arch)


def sample(model: ModAddMLP, batch: int, gen: torch.Generator) -> Tensor:
    """Pairs drawn uniformly from all p^2 (the decomposition sees every input)."""
    return model.encode(torch.randint(0, model.p ** 2, (batch,), generator=gen))


@torch.no_grad()
def accuracy(model: nn.Module, mlp: ModAddMLP, pairs: Tensor) -> float:
    return float((model(mlp.encode(pairs)).argmax(-1) == mlp.answers(pairs)).float().mean())


def fit(model: ModAddMLP, recipe: dict, gen: torch.Generator, on_step=None) -> float:
    """Full-batch AdamW with strong weight decay on the training pairs."""
    train, _ = model.split()
    x, y = model.encode(train), model.answers(train)
    return train_loop(model, lambda g, step: nn.functional.cross_entropy(model(x), y), recipe, gen, on_step)


def check(model: ModAddMLP, gen: torch.Generator) -> HealthReport:
    """Healthy when it generalises: held-out accuracy >= 99%."""
    _, held_out = model.split()
    acc = accuracy(model, model, held_out)
    return HealthReport(healthy=acc >= 0.99, summary=f"held-out accuracy {acc:.4f} (healthy >= 0.99)",
                        figures={"held_out_accuracy": acc})
