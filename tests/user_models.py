"""Models defined the ordinary way, outside the package, as a user would:
the tests point apd at them by object and by import path."""

from __future__ import annotations

import torch
from torch import Tensor, nn

N_PARTS = 6


class PartsMLP(nn.Module):
    """y_i = 2 ReLU(x_i) for six independent sparse features: six parts that
    never need each other, computed by a plain Linear-ReLU-Linear MLP. No
    biases: trained this way every hidden unit reads one feature."""

    def __init__(self, n: int = N_PARTS, width: int = 12):
        super().__init__()
        self.fc_in = nn.Linear(n, width, bias=False)
        self.act = nn.ReLU()
        self.fc_out = nn.Linear(width, n, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc_out(self.act(self.fc_in(x)))


def sample_parts(n: int, gen: torch.Generator) -> Tensor:
    """Each feature on with probability 0.1, value U[-1, 1]."""
    on = torch.rand(n, N_PARTS, generator=gen) < 0.1
    return (torch.rand(n, N_PARTS, generator=gen) * 2 - 1) * on


def train_parts_mlp(seed: int = 0, steps: int = 1500) -> PartsMLP:
    torch.manual_seed(seed)
    model = PartsMLP()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        x = sample_parts(512, gen)
        loss = ((model(x) - 2 * torch.relu(x)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


_CACHE: dict[int, dict] = {}


def build_parts_mlp() -> PartsMLP:
    """Factory for --model tests.user_models:build_parts_mlp (trained once per process)."""
    if 0 not in _CACHE:
        _CACHE[0] = train_parts_mlp().state_dict()
    model = PartsMLP()
    model.load_state_dict(_CACHE[0])
    return model.eval()


class Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        B, T, d = x.shape
        split = lambda t: t.view(B, T, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = (q @ k.transpose(-1, -2)) / (d // self.heads) ** 0.5
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1), float("-inf")).softmax(-1)
        return self.o((att @ v).transpose(1, 2).reshape(B, T, d))


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.mlp = nn.Sequential()
        self.mlp.fc_in = nn.Linear(d, 4 * d)
        self.mlp.act = nn.GELU()
        self.mlp.fc_out = nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    """Token embedding, causal attention with Linear Q/K/V/O, an MLP, a
    LayerNorm and a read-out: (batch, seq) token ids -> (batch, seq, vocab)."""

    def __init__(self, vocab: int = 64, d: int = 16, heads: int = 2, seq: int = 8, layers: int = 1):
        super().__init__()
        self.vocab, self.seq = vocab, seq
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.1)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.unembed = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.unembed(self.ln(x))


def build_transformer(vocab: int = 64, seed: int = 0) -> TinyTransformer:
    torch.manual_seed(seed)
    return TinyTransformer(vocab=vocab).eval()


def sample_tokens(n: int, gen: torch.Generator) -> Tensor:
    return torch.randint(64, (n, 8), generator=gen)


def build_not_a_module():
    return 3


def build_nan_mlp() -> PartsMLP:
    model = PartsMLP()
    with torch.no_grad():
        model.fc_in.weight[0, 0] = float("nan")
    return model


def sample_wrong_shape(n: int, gen: torch.Generator) -> Tensor:
    return torch.rand(n, N_PARTS + 1, generator=gen)


class CpuBiasMLP(PartsMLP):
    """A forward that makes a tensor on the CPU whatever the input's device."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) + torch.zeros(x.shape[-1])
