"""Stage 1 on a GPT-style model of 10M+ parameters (random weights), every MLP
matrix decomposed: step time by phase, peak memory, and the random-probe
attribution estimate against exact attributions as the number of probes grows.

    .venv/bin/python benchmarks/gpt_bench.py            # about 5 minutes on 2 cores
    .venv/bin/python benchmarks/gpt_bench.py --quick    # a tiny model, to check it runs
    .venv/bin/python benchmarks/gpt_bench.py --size 124m --pieces 64 256 1024 --device cuda
        # GPT-2 small's shape (124M parameters): step time and peak memory as C grows
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from torch import Tensor, nn

from apdkit.core.attributions import attributions
from apdkit.core.masks import topk_masks
from apdkit.core.model import DecomposedModel
from apdkit.core.pieces import unit_rows
from apdkit.stages.config import Stage1Config
from apdkit.stages.stage1.objective import objective
from apdkit.stages.stage1.train import coefficients, new_state
from stage1_bench import Stopwatch, peak_rss_mib  # this folder's shared stopwatch


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc_in, self.fc_out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(B, T, d))
        return x + self.fc_out(nn.functional.gelu(self.fc_in(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, seq: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight  # tied, as in GPT-2

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


SIZES = {
    "quick": dict(vocab=256, d=32, layers=2, heads=2, seq=16),
    "14m": dict(vocab=8192, d=384, layers=6, heads=6, seq=64),
    "124m": dict(vocab=50257, d=768, layers=12, heads=12, seq=128),  # GPT-2 small's shape
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--size", choices=SIZES, default="14m")
    parser.add_argument("--pieces", type=int, nargs="+", default=None,
                        help="C per matrix; several: step time and peak memory for each (growth in C)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--probes", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.pieces is not None:
        return growth_in_pieces(args)
    size = SIZES["quick" if args.quick else args.size]
    batch, C, steps = (2, 8, 2) if args.quick else (8, 64, 10)
    torch.manual_seed(0)
    model = GPT(**size).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    dm = DecomposedModel(model, ["blocks.*.fc_in", "blocks.*.fc_out"])
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"model: GPT {size}, {n_params / 1e6:.1f}M parameters; {len(dm.names)} MLP matrices decomposed, "
          f"C = {C} each; batch {batch} x {size['seq']} positions, outputs per input "
          f"{size['seq'] * size['vocab']} (estimated with 64 probes)")
    cfg = Stage1Config(n_pieces=C, topk=2.0, batch_size=batch, attribution_probes=64, init="random")
    sample = lambda n, g: torch.randint(size["vocab"], (n, size["seq"]), generator=g)  # noqa: E731
    state = new_state(dm, cfg, {n: C for n in dm.names}, torch.device("cpu"), sample)
    weights = dm.weights()
    topk = {n: 2.0 for n in dm.names}
    gen = torch.Generator().manual_seed(0)
    rss0 = peak_rss_mib()

    def one_step(watch):
        x = sample(batch, gen)
        V = {n: unit_rows(v) for n, v in state.V_raw.items()}
        losses = objective(dm, x, weights, state.U, V, topk, coefficients(cfg), cfg.schatten_p, 1.0,
                           cfg.max_exact_outputs, cfg.attribution_probes, gen, watch)
        with watch("backward"):
            state.optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
        with watch("optimizer"):
            state.optimizer.step()

    one_step(Stopwatch())
    watch, totals = Stopwatch(), []
    for _ in range(steps):
        t = time.perf_counter()
        one_step(watch)
        totals.append(time.perf_counter() - t)
    with torch.no_grad():
        t = time.perf_counter()
        for _ in range(3):
            model(sample(batch, gen))
        fwd_ms = 1e3 * (time.perf_counter() - t) / 3
    print(f"\n== stage-1 step (median of {steps}): {1e3 * statistics.median(totals):.0f} ms "
          f"= {statistics.median(totals) * 1e3 / fwd_ms:.1f}x one plain forward pass ({fwd_ms:.0f} ms)")
    for k, v in watch.times.items():
        print(f"  {k:45s} {1e3 * statistics.median(v):8.1f} ms")
    print(f"peak RSS {peak_rss_mib():.0f} MiB (model and pieces built: {rss0:.0f} MiB)")

    # exact against the estimate, on one short sequence (exact needs one VJP per output)
    positions = 4 if not args.quick else 4
    x = sample(1, gen)[:, :positions]
    pieces = state.pieces()
    t = time.perf_counter()
    exact, _ = attributions(dm, x, pieces, max_exact_outputs=10**9)
    exact_s = time.perf_counter() - t
    print(f"\n== attribution estimate against exact (1 sequence x {positions} positions, "
          f"{positions * size['vocab']} outputs; exact took {exact_s:.1f} s)")
    print(f"  {'probes':>6s} {'time':>8s} {'rel. error of A^2':>18s} {'top-k agreement':>16s}")
    exact_masks = topk_masks(exact, topk)
    for K in (4, 16, 64, 256):
        t = time.perf_counter()
        est, _ = attributions(dm, x, pieces, max_exact_outputs=1, probes=K, gen=torch.Generator().manual_seed(K))
        secs = time.perf_counter() - t
        err = statistics.mean(float((est[n] ** 2 - exact[n] ** 2).norm() / (exact[n] ** 2).norm()) for n in dm.names)
        est_masks = topk_masks(est, topk)
        agree = sum(int((est_masks[n] & exact_masks[n]).sum()) for n in dm.names) / \
            max(1, sum(int(exact_masks[n].sum()) for n in dm.names))
        print(f"  {K:6d} {secs:7.2f}s {err:18.3f} {agree:16.3f}")


def growth_in_pieces(args) -> None:
    """One stage-1 step (median of --steps) and peak memory for each C."""
    device = torch.device(args.device)
    size = SIZES["quick" if args.quick else args.size]
    batch, steps = args.batch or 1, args.steps or 3
    torch.manual_seed(0)
    model = GPT(**size).eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    dm = DecomposedModel(model, ["blocks.*.fc_in", "blocks.*.fc_out"])
    n_mlp = sum(w.numel() for w in dm.weights().values())
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or platform.machine()}"
          f" ({os.cpu_count()} cores), torch {torch.__version__}")
    print(f"model: GPT {size}, {n_params / 1e6:.1f}M parameters, {len(dm.names)} MLP matrices "
          f"({n_mlp / 1e6:.1f}M weights) decomposed; batch {batch} x {size['seq']} positions; "
          f"{args.probes} attribution probes")
    sample = lambda n, g: torch.randint(size["vocab"], (n, size["seq"]), generator=g)  # noqa: E731
    print("| C per matrix | piece parameters | step (median) | peak memory |")
    print("|---|---|---|---|")
    for C in args.pieces:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        cfg = Stage1Config(n_pieces=C, topk=2.0, batch_size=batch, attribution_probes=args.probes, init="random")
        state = new_state(dm, cfg, {n: C for n in dm.names}, device, sample)
        weights = {n: w.to(device) for n, w in dm.weights().items()}
        topk = {n: 2.0 for n in dm.names}
        gen = torch.Generator().manual_seed(0)
        times = []
        for i in range(steps + 1):
            t = time.perf_counter()
            x = sample(batch, gen).to(device)
            V = {n: unit_rows(v) for n, v in state.V_raw.items()}
            losses = objective(dm, x, weights, state.U, V, topk, coefficients(cfg), cfg.schatten_p, 1.0,
                               cfg.max_exact_outputs, cfg.attribution_probes, gen)
            state.optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
            state.optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:  # the first step warms up
                times.append(time.perf_counter() - t)
        n_piece = sum(u.numel() + v.numel() for u, v in zip(state.U.values(), state.V_raw.values()))
        peak = (f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB GPU" if device.type == "cuda"
                else f"{peak_rss_mib() / 1024:.2f} GiB RSS (process peak so far)")
        print(f"| {C} | {n_piece / 1e6:.1f}M | {1e3 * statistics.median(times):.0f} ms | {peak} |", flush=True)
        del state, weights


if __name__ == "__main__":
    main()
