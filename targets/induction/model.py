"""A 2-layer attention-only transformer, one head per layer, that does
in-context copying (induction): in ``[BOS] ... S M ... S`` it predicts M.

Tokens 1..vocab-1 appear at most once in a sequence except for one repeated
S, so the only way to the answer is the known circuit: a previous-token head
in layer 0 writes "the token before me was S" into M's position, and the
induction head in layer 1 attends from the second S to that position and
copies M. Each head's Q, K, V and O are plain ``nn.Linear`` modules; the
attention pattern passes through an ``nn.Identity`` (``layers.<l>.pattern``)
so that scoring can read it with a hook.

Two ways to train it. ``away="next_token"`` (the built-in ``induction``):
away from the answer the loss is the next token's, an unseen one at random,
so the model learns to lower the tokens it has seen, and both heads work at
every position. ``away="uniform"`` with sinks (``induction-sink``): away
from the answer the loss asks for flat logits whatever the context, and each
head has a learned sink logit (a key no position owns, as in gpt-oss) that
takes its attention when no key matches, so a head's output can be zero
where it is not needed: the induction head works only where the circuit's
story says it does. induction-sink also keeps positions out of the residual
stream (``positions="layer0_qk"``) and rests its induction head on the sink
away from the circuit from half-way through training (``rest``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from apdkit.targets.spec import HealthReport
from apdkit.targets.training import train_loop

BOS = 0
FLAT_WEIGHT = 0.2  # weight of the loss away from the answer: enough to flatten the logits there
# A sink target's induction head must rest on its sink away from the circuit at least this much: the learned
# gates found the head at shares of 0.97-0.99 and left its O on elsewhere at 0.93-0.95 (RESULTS.md,
# "induction-sink with a batch of 256", "positions only in layer 0's queries and keys")
SINK_SHARE_HEALTHY = 0.97


class AttentionHead(nn.Module):
    def __init__(self, d_model: int, sink: bool = False):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d_model, d_model, bias=False) for _ in range(4))
        self.sink = nn.Parameter(torch.zeros(())) if sink else None
        self.pattern = nn.Identity()

    def forward(self, x: Tensor, qk_input: Tensor | None = None) -> Tensor:
        """``qk_input``: what the queries and keys read, when not ``x``."""
        T = x.shape[1]
        src = x if qk_input is None else qk_input
        scores = self.q(src) @ self.k(src).transpose(-1, -2) / x.shape[-1] ** 0.5
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        scores = scores.masked_fill(causal, float("-inf"))
        if self.sink is None:
            weights = scores.softmax(-1)
        else:  # the sink's share is dropped: attention rows sum to less than 1
            weights = torch.cat([scores, self.sink.expand(*scores.shape[:-1], 1)], -1).softmax(-1)[..., :T]
        pattern = self.pattern(weights)
        return x + self.o(pattern @ self.v(x))


PLACEMENTS = ("uniform", "second_first")
POSITIONS = ("residual", "layer0_qk")
SINKS = ("none", "all", "last")


def sinusoids(seq_len: int, d_model: int) -> Tensor:
    """(seq_len, d_model) fixed sinusoidal position codes, as in the first
    transformer: a shift by one position is a fixed rotation of them."""
    freqs = 10000.0 ** (-torch.arange(0, d_model, 2).float() / d_model)
    angles = torch.arange(seq_len).float()[:, None] * freqs
    return torch.stack([angles.sin(), angles.cos()], -1).flatten(1)[:, :d_model]


def check_placement(placement: str) -> None:
    if placement not in PLACEMENTS:
        raise ValueError(f"induction placement must be one of {', '.join(PLACEMENTS)}, not {placement!r}")


class InductionTransformer(nn.Module):
    """``placement``: how its data places the repeated pair (``induction_batch``).
    ``positions``: "residual", learned position embeddings added to the token
    embeddings; "layer0_qk", fixed sinusoidal codes are only what layer 0's
    queries and keys read, never in the residual stream, so layer 0 can attend
    only by position and no later layer can look a position up: copying has
    one way left, the previous-token head and the induction head. (With
    sinks and the pair placed uniformly, "residual" targets copied another
    way: layer 0 attended from the second S to the first, a duplicate-token
    head, and layer 1 looked up the position after it; RESULTS.md,
    "induction-sink: positions only in layer 0's queries and keys".)
    ``sink``: which heads have a sink logit, "none", "all" or "last" (the
    induction head only). With one in layer 0 too, the induction-sink targets
    whose copy formed late had parked layer 0 on its sink (0.55-0.68 of its
    attention); with "last" the copy formed by step 800 on seeds 0-4, but
    verify with spectral grouping failed on most of them, so the registry
    keeps "all" (RESULTS.md, "induction-sink: a sink on the induction head
    only")."""

    def __init__(self, vocab: int = 128, d_model: int = 16, seq_len: int = 64, n_layers: int = 2,
                 sink: str | bool = "none", placement: str = "second_first", positions: str = "residual"):
        # the defaults are the ones from before each argument existed: a store written then holds an arch
        # without it, and is rebuilt with them (stages/target.py, load_from_store); the registry names its own
        super().__init__()
        sink = {False: "none", True: "all"}.get(sink, sink)  # a store written before "last" existed holds a bool
        if sink not in SINKS:
            raise ValueError(f"induction sink must be one of {', '.join(SINKS)}, not {sink!r}")
        check_placement(placement)  # at build, not at the first batch
        if positions not in POSITIONS:
            raise ValueError(f"induction positions must be one of {', '.join(POSITIONS)}, not {positions!r}")
        self.vocab, self.seq_len, self.placement, self.positions = vocab, seq_len, placement, positions
        self.embed = nn.Embedding(vocab, d_model)
        if positions == "residual":
            self.pos = nn.Parameter(torch.randn(seq_len, d_model) * 0.5)
        else:
            self.register_buffer("pos", sinusoids(seq_len, d_model))
        self.layers = nn.ModuleList(AttentionHead(d_model, sink == "all" or (sink == "last" and i == n_layers - 1))
                                    for i in range(n_layers))
        self.unembed = nn.Linear(d_model, vocab, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        pos = self.pos[: tokens.shape[1]]
        if self.positions == "residual":
            x = self.embed(tokens) + pos
            for layer in self.layers:
                x = layer(x)
        else:  # layer0_qk; expanded to the batch so that each row of q's and k's input is one token's
            x = self.layers[0](self.embed(tokens), pos.expand(tokens.shape[0], -1, -1))
            for layer in self.layers[1:]:
                x = layer(x)
        return self.unembed(x)


def induction_batch(n: int, vocab: int, seq_len: int, gen: torch.Generator,
                    placement: str = "uniform") -> tuple[Tensor, Tensor, Tensor]:
    """Sequences with one repeated pair: tokens (n, seq_len), the position q of
    the second S and the answer M (the token after the first S). "uniform":
    the first S uniform over 1..seq_len-3, the second uniform after it, so
    every position is as often where the copy starts. "second_first" (the
    placement before it, kept by induction-sink): the second S uniform over
    3..seq_len-1, the first uniform before it, so a first S in the last quarter
    comes in 4% of sequences, and the targets trained on it copied little
    from there (RESULTS.md, "Where the pair sits")."""
    check_placement(placement)
    # distinct content tokens per sequence: the first seq_len-1 of a random permutation of 1..vocab-1
    perm = torch.rand(n, vocab - 1, generator=gen).argsort(dim=1)[:, : seq_len - 1] + 1
    tokens = torch.cat([torch.full((n, 1), BOS, dtype=torch.long), perm], dim=1)
    if placement == "uniform":
        first = (torch.rand(n, generator=gen) * (seq_len - 3)).long() + 1  # in [1, seq_len-3]
        q = first + 2 + (torch.rand(n, generator=gen) * (seq_len - 2 - first).float()).long()  # in [first+2, seq_len-1]
    else:  # second_first
        q = torch.randint(3, seq_len, (n,), generator=gen)
        first = (torch.rand(n, generator=gen) * (q - 2).float()).long() + 1  # in [1, q-2]
    rows = torch.arange(n)
    tokens[rows, q] = tokens[rows, first]
    return tokens, q, tokens[rows, first + 1]


def batch_for(model: InductionTransformer, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """``induction_batch`` with the model's vocabulary, length and placement."""
    return induction_batch(n, model.vocab, model.seq_len, gen, model.placement)


def first_s(tokens: Tensor, q: Tensor) -> Tensor:
    """Per sequence, the position of the first S (the token repeated at ``q``)."""
    return (tokens == tokens[torch.arange(len(q)), q][:, None]).float().argmax(1)


def first_s_quarter(tokens: Tensor, q: Tensor) -> Tensor:
    """Per sequence, the quarter (0-3) of the first S's possible positions
    (1..seq_len-3) that it sits in."""
    return (first_s(tokens, q) - 1) * 4 // (tokens.shape[1] - 3)


def circuit_positions(tokens: Tensor, q: Tensor) -> Tensor:
    """(n, T) bool: where the circuit's story says the heads act, the first S,
    the M after it and the second S (at ``q``)."""
    rows, first = torch.arange(len(q)), first_s(tokens, q)
    where = torch.zeros(tokens.shape, dtype=torch.bool)
    where[rows, first] = where[rows, first + 1] = where[rows, q] = True
    return where


def build(**arch) -> InductionTransformer:
    return InductionTransformer(**arch)


def sample(model: InductionTransformer, batch: int, gen: torch.Generator) -> Tensor:
    return batch_for(model, batch, gen)[0]


def answered(logits: Tensor, q: Tensor, answer: Tensor) -> Tensor:
    """(n,) bool: whether the top logit at the second S is the answer."""
    return logits[torch.arange(len(q)), q].argmax(-1) == answer


@torch.no_grad()
def copied(model: nn.Module, tokens: Tensor, q: Tensor, answer: Tensor) -> Tensor:
    """(n,) bool: whether the model's top logit at the second S is the answer."""
    return answered(model(tokens), q, answer)


def fit(model: InductionTransformer, recipe: dict, gen: torch.Generator, on_step=None) -> float:
    """Cross-entropy on the answer M at the second S, plus FLAT_WEIGHT times a
    loss elsewhere, by ``recipe["away"]``: "next_token" (the default), the
    next token, an unseen one at random, which rewards lowering the tokens
    already seen, so the heads work everywhere (measured: RESULTS.md, "Where
    the induction target uses its heads"); "uniform", cross-entropy against
    the uniform distribution, which no context helps with.

    ``recipe["rest"]`` (sink models): from ``rest_from`` (a share of the
    steps) on, that weight times the induction head's attention off its sink
    where the circuit does not act. Without it the head stayed partly on there
    (its sink share 0.70-0.92), and decompositions found neither head
    (RESULTS.md, "induction-sink: positions only in layer 0's queries and
    keys"); from the first step it kept the head from ever forming (measured
    with positions in the residual stream: "Where the pair sits")."""
    away, rest, rest_from = recipe.get("away", "next_token"), recipe.get("rest", 0.0), recipe.get("rest_from", 0.0)
    if away not in ("next_token", "uniform"):
        raise ValueError(f"induction recipe: away must be 'next_token' or 'uniform', not {away!r}")
    if rest and model.layers[-1].sink is None:
        raise ValueError("induction recipe: rest asks the induction head onto its sink; the model has none "
                         "(sink 'last' or 'all')")
    if not 0.0 <= rest_from < 1.0:
        raise ValueError(f"induction recipe: rest_from is a share of the steps in [0, 1), not {rest_from!r}")
    first_rest_step = int(rest_from * recipe["steps"])

    def batch_loss(g: torch.Generator, step: int) -> Tensor:
        tokens, q, answer = batch_for(model, recipe["batch"], g)
        rows = torch.arange(len(q))
        logits, pattern = logits_and_last_pattern(model, tokens) if rest else (model(tokens), None)
        answer_loss = nn.functional.cross_entropy(logits[rows, q], answer)
        if away == "uniform":
            elsewhere = torch.ones(tokens.shape, dtype=torch.bool)
            elsewhere[rows, q] = False
            flat_loss = -logits[elsewhere].log_softmax(-1).mean()
        else:
            labels = torch.cat([tokens[:, 1:], torch.full((len(q), 1), -100)], dim=1)
            labels[rows, q] = answer
            flat_loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        loss = answer_loss + FLAT_WEIGHT * flat_loss
        if rest and step >= first_rest_step:  # the head's attention off its sink away from the circuit
            loss = loss + rest * pattern.sum(-1)[~circuit_positions(tokens, q)].mean()
        return loss

    return train_loop(model, batch_loss, recipe, gen, on_step)


def logits_and_last_pattern(model: InductionTransformer, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """The logits and the last layer's (the induction head's) attention pattern."""
    captured = {}
    hook = model.layers[-1].pattern.register_forward_hook(lambda mod, args, out: captured.__setitem__("p", out))
    try:
        logits = model(tokens)
    finally:
        hook.remove()
    return logits, captured["p"]


def sink_share_off_circuit(pattern: Tensor, tokens: Tensor, q: Tensor) -> float:
    """The last layer's mean attention on its sink (``pattern``'s rows sum to
    1 less the sink's share) at the positions where the circuit does not act:
    how fully the induction head is off there."""
    return float((1 - pattern.sum(-1))[~circuit_positions(tokens, q)].mean())


def check(model: InductionTransformer, gen: torch.Generator, n: int = 4096) -> HealthReport:
    """Healthy when held-out in-context copy accuracy is >= 95%. Not part of
    the verdict, it also reports the copy accuracy where the first S sits in
    the worst quarter of its positions: placed "second_first", the first S
    is in the last quarter in 4% of sequences, and the targets trained on it
    copied 0.003-0.48 from there (0.15-0.87 at a batch of 256), their
    previous-token heads attending to t-1 at 0.96-1.00 in positions 1-15 and
    0.01-0.49 in 48-63 (RESULTS.md, "Where the pair sits"). With sinks the
    induction head must also be off away from the circuit: its attention on
    its sink there at least SINK_SHARE_HEALTHY."""
    tokens, q, answer = batch_for(model, n, gen)
    sink = model.layers[-1].sink is not None
    with torch.no_grad():
        logits, pattern = logits_and_last_pattern(model, tokens) if sink else (model(tokens), None)
    ok = answered(logits, q, answer).float()
    quarter = first_s_quarter(tokens, q)
    acc, worst = float(ok.mean()), min(float(ok[quarter == i].mean()) for i in quarter.unique())
    summary = (f"in-context copy accuracy {acc:.3f} (healthy >= 0.95); "
               f"with the first S in its worst quarter of positions {worst:.3f}")
    figures = {"copy_accuracy": acc, "copy_accuracy_worst_quarter": worst}
    healthy = acc >= 0.95
    if sink:
        figures["sink_share_off_circuit"] = share = sink_share_off_circuit(pattern, tokens, q)
        summary += f"; induction head on its sink away from the circuit {share:.3f} (healthy >= {SINK_SHARE_HEALTHY})"
        healthy = healthy and share >= SINK_SHARE_HEALTHY
    return HealthReport(healthy=healthy, summary=summary, figures=figures)
