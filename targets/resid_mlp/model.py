"""Residual MLPs doing compressed computation.

r0 = W_E x, r_{l+1} = r_l + W_out^l ReLU(W_in^l r_l), y = W_E^T r_L, with W_E a
frozen random embedding (unit-norm feature columns, a buffer, never decomposed).
Labels y_i = x_i + ReLU(x_i). Only the W_in and W_out Linears are decomposed;
``layers.<l>.act`` is the hidden activation the minimality loss also matches.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from apdkit.core.attributions import Site
from apdkit.core.model import Forward
from apdkit.targets.spec import HealthReport
from apdkit.targets.training import fit_target


class MLPBlock(nn.Module):
    def __init__(self, d_embed: int, d_mlp: int):
        super().__init__()
        self.W_in = nn.Linear(d_embed, d_mlp, bias=False)
        self.act = nn.ReLU()
        self.W_out = nn.Linear(d_mlp, d_embed, bias=False)

    def forward(self, r: Tensor) -> Tensor:
        return r + self.W_out(self.act(self.W_in(r)))


class ResidMLP(nn.Module):
    def __init__(self, n_features: int = 100, d_embed: int = 1000, d_mlp: int = 50,
                 n_layers: int = 1, feature_probability: float = 0.01, embed_seed: int = 0):
        super().__init__()
        self.n_features, self.d_embed, self.d_mlp, self.n_layers = n_features, d_embed, d_mlp, n_layers
        self.feature_probability = feature_probability
        # The embedding is part of the architecture: drawn from its own seed so
        # that a state_dict trained elsewhere matches a freshly built module.
        g = torch.Generator().manual_seed(embed_seed)
        W_E = torch.randn(d_embed, n_features, generator=g)
        self.register_buffer("W_E", W_E / W_E.norm(dim=0, keepdim=True))
        self.layers = nn.ModuleList(MLPBlock(d_embed, d_mlp) for _ in range(n_layers))

    def forward(self, x: Tensor) -> Tensor:
        r = x @ self.W_E.T
        for block in self.layers:
            r = block(r)
        return r @ self.W_E

    def sample_inputs(self, batch: int, gen: torch.Generator) -> Tensor:
        on = torch.rand(batch, self.n_features, generator=gen) < self.feature_probability
        values = torch.rand(batch, self.n_features, generator=gen) * 2 - 1
        return values * on

    def monosemantic_baseline_mse(self) -> float:
        """Expected MSE of a network that computes ReLU exactly for as many
        features as it has neurons and passes the rest through (error ReLU(x)^2,
        E = p * 1/6 for x ~ U[-1, 1])."""
        exact = min(self.n_features, self.d_mlp * self.n_layers)
        return (self.n_features - exact) / self.n_features * self.feature_probability / 6.0


def fast_sites(model: ResidMLP, x: Tensor) -> tuple[Forward, list[Site]]:
    """Closed-form output Jacobians. y = W_E^T r_L, so dy/dr_L = W_E^T for
    every input, and going back through a block
        dy/dr_k = dy/dr_{k+1} + A_k W_in^k,   A_k = dy/dh_k = dy/dr_{k+1} W_out^k D_k
    (D_k the ReLU mask). So dy/dr_{k+1} = W_E^T + sum_{j>k} A_j W_in^j and
    every A_k is a small (batch, n_out, d_mlp) tensor built from the
    d_mlp-sized products W_E^T W_out^k and W_in^j W_out^k: no per-sample
    (n_out, d_embed) Jacobian is ever formed."""
    W_E = model.W_E
    W_in = [blk.W_in.weight.detach() for blk in model.layers]
    W_out = [blk.W_out.weight.detach() for blk in model.layers]
    L = model.n_layers
    r = x @ W_E.T
    inputs, masks, hidden = [], [], {}
    for k in range(L):
        h = r @ W_in[k].T
        m = torch.relu(h)
        inputs.append(r)
        masks.append((h > 0).to(x.dtype))
        hidden[f"layers.{k}.act"] = m
        r = r + m @ W_out[k].T
    fwd = Forward(r @ W_E, x.shape[0], hidden)
    A: list[Tensor | None] = [None] * L  # dy/dh_k, (batch, n_out, d_mlp)
    for k in reversed(range(L)):
        through = (W_E.T @ W_out[k]).expand(x.shape[0], -1, -1)
        for j in range(k + 1, L):
            through = through + A[j] @ (W_in[j] @ W_out[k])
        A[k] = through * masks[k][:, None, :]

    def contract_in(P: Tensor, k: int) -> Tensor:
        return (A[k] @ P.T).transpose(0, 1)  # (n_out, batch, C)

    def contract_out(P: Tensor, k: int) -> Tensor:
        out = (W_E.T @ P.T)[:, None, :]  # the same for every input
        for j in range(k + 1, L):
            out = out + (A[j] @ (W_in[j] @ P.T)).transpose(0, 1)
        return out

    sites = []
    for k in range(L):
        sites.append(Site(f"layers.{k}.W_in", "linear", inputs[k], lambda P, k=k: contract_in(P, k)))
        sites.append(Site(f"layers.{k}.W_out", "linear", hidden[f"layers.{k}.act"], lambda P, k=k: contract_out(P, k)))
    return fwd, sites


def labels(x: Tensor) -> Tensor:
    return x + torch.relu(x)


def build(**arch) -> ResidMLP:
    return ResidMLP(**arch)


def sample(model: ResidMLP, batch: int, gen: torch.Generator) -> Tensor:
    return model.sample_inputs(batch, gen)


def fit(model: ResidMLP, recipe: dict, gen: torch.Generator, on_step=None) -> float:
    def batches(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        x = model.sample_inputs(n, g)
        return x, labels(x)

    return fit_target(model, batches, recipe, gen, on_step)


def check(model: ResidMLP, gen: torch.Generator, n: int = 20_000) -> HealthReport:
    """Healthy when the trained MLP beats the monosemantic baseline."""
    total = 0.0
    with torch.no_grad():
        for start in range(0, n, 2048):  # chunks keep memory flat
            x = model.sample_inputs(min(2048, n - start), gen)
            total += float(((model(x) - labels(x)) ** 2).sum())
    mse = total / (n * model.n_features)
    baseline = model.monosemantic_baseline_mse()
    return HealthReport(
        healthy=mse < baseline,
        summary=f"MSE {mse:.3e} vs monosemantic baseline {baseline:.3e} (ratio {mse / baseline:.3f})",
        figures={"mse": mse, "monosemantic_baseline_mse": baseline, "ratio_to_baseline": mse / baseline},
    )
