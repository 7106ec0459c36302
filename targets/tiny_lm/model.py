"""A small GPT on bytes, trained on the Python standard library's own source
(text that ships with every Python install: nothing is downloaded). There is
no ground truth; it is the realistic case, scored the way the successor
method scores language models.

The corpus is the stdlib's ``*.py`` files in sorted order, up to
CORPUS_BYTES; its last tenth is held out. It depends on the Python version,
so a run records its text's size with the target's health.
"""

from __future__ import annotations

import math
import sysconfig
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor, nn

from apdkit.targets.spec import HealthReport
from apdkit.targets.training import train_loop

CORPUS_BYTES = 4_000_000
HELD_OUT = 0.1


@lru_cache(maxsize=1)
def corpus() -> Tensor:
    """The stdlib source as uint8 bytes (read once per process)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, size = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts or "tests" in path.parts:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        size += len(data)
        if size >= CORPUS_BYTES:
            break
    text = b"".join(chunks)[:CORPUS_BYTES]
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).clone()


def corpus_split(held_out: bool) -> Tensor:
    text = corpus()
    cut = int(len(text) * (1 - HELD_OUT))
    return text[cut:] if held_out else text[:cut]


def windows(text: Tensor, n: int, length: int, gen: torch.Generator) -> Tensor:
    """n random windows of ``length`` bytes, as int64 tokens."""
    starts = torch.randint(0, len(text) - length, (n,), generator=gen)
    return text[starts[:, None] + torch.arange(length)].long()


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.fc_in = nn.Linear(d, 4 * d)
        self.act = nn.GELU()
        self.fc_out = nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(B, T, d))
        return x + self.fc_out(self.act(self.fc_in(self.ln2(x))))


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 256, d_model: int = 128, n_layers: int = 2, heads: int = 4, context: int = 64):
        super().__init__()
        self.vocab, self.context = vocab, context
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.unembed = nn.Linear(d_model, vocab, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens) + self.pos.weight[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.unembed(self.ln_f(x))


def build(**arch) -> TinyLM:
    return TinyLM(**arch)


def sample(model: TinyLM, batch: int, gen: torch.Generator) -> Tensor:
    """Windows of the training text."""
    return windows(corpus_split(held_out=False), batch, model.context, gen)


def next_token_loss(logits: Tensor, tokens: Tensor) -> Tensor:
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())


def fit(model: TinyLM, recipe: dict, gen: torch.Generator, on_step=None) -> float:
    text = corpus_split(held_out=False)

    def batch_loss(g: torch.Generator, step: int) -> Tensor:
        tokens = windows(text, recipe["batch"], model.context, g)
        return next_token_loss(model(tokens), tokens)

    return train_loop(model, batch_loss, recipe, gen, on_step)


def unigram_entropy(text: Tensor) -> float:
    counts = torch.bincount(text.long(), minlength=256).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


@torch.no_grad()
def held_out_loss(model: nn.Module, context: int, gen: torch.Generator, n: int = 256) -> float:
    tokens = windows(corpus_split(held_out=True), n, context, gen)
    return float(next_token_loss(model(tokens), tokens))


def check(model: TinyLM, gen: torch.Generator) -> HealthReport:
    """Healthy when held-out cross-entropy is under 0.7 x the byte unigram
    entropy (it has learned more than byte frequencies)."""
    ce = held_out_loss(model, model.context, gen)
    unigram = unigram_entropy(corpus_split(held_out=True))
    return HealthReport(
        healthy=ce < 0.7 * unigram,
        summary=f"held-out cross-entropy {ce:.3f} nats/byte ({ce / math.log(2):.2f} bits), unigram {unigram:.3f}",
        figures={"held_out_ce": ce, "unigram_entropy": unigram, "corpus_bytes": float(len(corpus()))},
    )
