"""Toy models of superposition: x_hat = ReLU(W^T [I] W x + b), W tied.

Ground truth: one rank-1 mechanism per feature (column j of W, in W and, tied,
in W^T); with the hidden identity (``+ID`` variants) also the identity, used by
every input.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from targets.base import Forward, HealthReport, LinearOp, TargetModel
from targets.jacobians import Site
from targets.training import fit_target


class TMS(TargetModel):
    def __init__(self, n_features: int, d_hidden: int, hidden_identity: bool = False,
                 feature_probability: float = 0.05, synced_features: tuple[int, ...] = ()):
        super().__init__()
        self.n_features, self.d_hidden = n_features, d_hidden
        self.feature_probability = feature_probability
        self.synced_features = tuple(synced_features)
        self.W = nn.Parameter(torch.empty(d_hidden, n_features))
        nn.init.xavier_normal_(self.W)
        self.b = nn.Parameter(torch.zeros(n_features))
        if hidden_identity:
            # Frozen in target training, decomposed like any other matrix.
            self.hidden = nn.Parameter(torch.eye(d_hidden), requires_grad=False)
            self.decomposed = ("W", "hidden")
            self.shared = ("hidden",)
        else:
            self.decomposed = ("W",)

    def run(self, x: Tensor, ops: Mapping[str, LinearOp]) -> Forward:
        h = ops["W"](x)
        if "hidden" in ops:
            h = ops["hidden"](h)
        return Forward(torch.relu(ops["W"].t(h) + self.b))

    def attribution_sites(self, x: Tensor) -> tuple[Forward, list[Site]]:
        """Closed-form output Jacobians: with D = ReLU'(pre) (batch, n), the
        output's Jacobian is D for the W^T use, D * W^T for the hidden layer's
        output and D * W^T H for W's first use, so every contraction is a
        small product K (n, C) scaled per input: D[b, o] K[o, c]."""
        W = self.W.detach()
        H = self.hidden.detach() if "hidden" in self.decomposed else None
        h = x @ W.T
        h2 = h if H is None else h @ H.T
        pre = h2 @ W + self.b.detach()
        out = torch.relu(pre)
        D = (pre > 0).to(x.dtype).T[:, :, None]  # (n, batch, 1)
        through_hidden = W.T if H is None else W.T @ H  # d out-pre / d h

        sites = [Site("W", x, False, lambda P: D * (through_hidden @ P.T)[:, None, :])]
        if H is not None:
            sites.append(Site("hidden", h, False, lambda P: D * (W.T @ P.T)[:, None, :]))
        sites.append(Site("W", h2, True, lambda P: D * P.T[:, None, :]))
        return Forward(out), sites

    def feature_mechanisms(self) -> list[int]:
        """Synced features always fire together: one mechanism."""
        lead = self.synced_features[0] if self.synced_features else None
        return [lead if j in self.synced_features else j for j in range(self.n_features)]

    def sample_inputs(self, batch: int, gen: torch.Generator) -> Tensor:
        """Each feature on independently with probability p, value U[0, 1];
        synced features copy the first synced feature's on/off state."""
        on = torch.rand(batch, self.n_features, generator=gen) < self.feature_probability
        if self.synced_features:
            lead = self.synced_features[0]
            on[:, list(self.synced_features)] = on[:, [lead]]
        values = torch.rand(batch, self.n_features, generator=gen)
        return values * on


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
