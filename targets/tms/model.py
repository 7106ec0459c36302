"""Toy models of superposition: x_hat = ReLU(W^T [I] W x + b), W tied.

An ordinary nn.Module: ``W`` is a Linear (features -> hidden); the read-out
``W_T`` is a GPT-2-style Conv1D holding the same parameter, so apd sees one
matrix used twice. With ``hidden_identity`` a frozen identity Linear sits in
between (the +ID variants).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from apdkit.core.attributions import Site
from apdkit.core.model import Forward
from apdkit.targets.layers import Conv1D
from apdkit.targets.spec import HealthReport
from apdkit.targets.training import fit_target


class TMS(nn.Module):
    def __init__(self, n_features: int, d_hidden: int, hidden_identity: bool = False,
                 feature_probability: float = 0.05, synced_features: tuple[int, ...] = ()):
        super().__init__()
        self.n_features, self.d_hidden = n_features, d_hidden
        self.feature_probability = feature_probability
        self.synced_features = tuple(synced_features)
        self.W = nn.utils.skip_init(nn.Linear, n_features, d_hidden, bias=False)
        nn.init.xavier_normal_(self.W.weight)
        self.W_T = Conv1D(self.W.weight)  # tied: the same parameter, applied transposed
        self.hidden = None
        if hidden_identity:  # frozen in target training, decomposed like any other matrix
            self.hidden = nn.utils.skip_init(nn.Linear, d_hidden, d_hidden, bias=False)
            with torch.no_grad():
                self.hidden.weight.copy_(torch.eye(d_hidden))
            self.hidden.weight.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.W(x)
        if self.hidden is not None:
            h = self.hidden(h)
        return torch.relu(self.W_T(h))

    def sample_inputs(self, batch: int, gen: torch.Generator) -> Tensor:
        """Each feature on independently with probability p, value U[0, 1];
        synced features copy the first synced feature's on/off state."""
        on = torch.rand(batch, self.n_features, generator=gen) < self.feature_probability
        if self.synced_features:
            lead = self.synced_features[0]
            on[:, list(self.synced_features)] = on[:, [lead]]
        values = torch.rand(batch, self.n_features, generator=gen)
        return values * on

    def feature_mechanisms(self) -> list[int]:
        """Ground truth: synced features always fire together, one mechanism."""
        lead = self.synced_features[0] if self.synced_features else None
        return [lead if j in self.synced_features else j for j in range(self.n_features)]


def fast_sites(model: TMS, x: Tensor) -> tuple[Forward, list[Site]]:
    """Closed-form output Jacobians: with D = ReLU'(pre) (batch, n), the
    output's Jacobian is D for the W^T use, D * W^T for the hidden layer's
    output and D * W^T H for W's first use, so every contraction is a small
    product K (n, C) scaled per input: D[b, o] K[o, c]."""
    W = model.W.weight.detach()
    H = model.hidden.weight.detach() if model.hidden is not None else None
    h = x @ W.T
    h2 = h if H is None else h @ H.T
    pre = h2 @ W + model.W_T.bias.detach()
    D = (pre > 0).to(x.dtype).T[:, :, None]  # (n, batch, 1)
    through_hidden = W.T if H is None else W.T @ H  # d out-pre / d h
    sites = [Site("W", "linear", x, lambda P: D * (through_hidden @ P.T)[:, None, :])]
    if H is not None:
        sites.append(Site("hidden", "linear", h, lambda P: D * (W.T @ P.T)[:, None, :]))
    sites.append(Site("W", "conv1d", h2, lambda P: D * P.T[:, None, :]))
    return Forward(torch.relu(pre), x.shape[0]), sites


def build(**arch) -> TMS:
    return TMS(**arch)


def sample(model: TMS, batch: int, gen: torch.Generator) -> Tensor:
    return model.sample_inputs(batch, gen)


def fit(model: TMS, recipe: dict, gen: torch.Generator, on_step=None) -> float:
    def batches(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        x = model.sample_inputs(n, g)
        return x, x

    return fit_target(model, batches, recipe, gen, on_step)


def check(model: TMS, gen: torch.Generator) -> HealthReport:
    """Healthy when no feature is dead: a one-hot input of value 1 is
    reconstructed at >= 0.5 on its own output."""
    with torch.no_grad():
        recon = model(torch.eye(model.n_features)).diagonal()
    dead = int((recon < 0.5).sum())
    return HealthReport(
        healthy=dead == 0,
        summary=f"{dead} dead feature(s) of {model.n_features} (one-hot reconstruction min {float(recon.min()):.3f})",
        figures={"dead_features": float(dead), "min_one_hot_reconstruction": float(recon.min())},
    )
