"""The stage-1 algorithm: learn rank-1 pieces of every decomposed matrix with
the APD objective. Pure training code: data, logging and checkpointing come in
as callbacks, so tests, the CLI and benchmarks all run the same loop.

The input-side factor V is kept at unit norm by reparametrisation
(V = V_raw / |V_raw|), so each piece's one singular value is |U[c]|.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Mapping

import torch
from torch import Tensor

from pipeline.config import Stage1Config
from stages.attributions import attributions, no_timer
from stages.pieces import MaskedPiecesOp, batch_topk_mask, init_factors
from targets.base import TargetModel
from targets.jacobians import tapped_run
from targets.training import cosine_lr

LOSS_NAMES = ("total", "faithfulness", "minimality", "hidden", "simplicity")


class NonFiniteLoss(RuntimeError):
    def __init__(self, step: int):
        super().__init__(f"loss became NaN or infinite by step {step}; try a lower lr")
        self.step = step


@dataclass
class DecompositionState:
    """Everything a resumed run needs to continue bit for bit."""

    U: dict[str, torch.nn.Parameter]
    V_raw: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    data_gen: torch.Generator
    step: int = 0  # steps done, warm start included
    history: list[dict[str, float]] = field(default_factory=list)

    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Detached (U, V) with V at unit norm: piece c is outer(U[c], V[c])."""
        return {n: (self.U[n].detach(), unit_rows(self.V_raw[n]).detach()) for n in self.U}

    def state_dict(self) -> dict:
        return {
            "U": {n: p.detach().cpu() for n, p in self.U.items()},
            "V_raw": {n: p.detach().cpu() for n, p in self.V_raw.items()},
            "optimizer": self.optimizer.state_dict(),
            "data_gen": self.data_gen.get_state(),
            "step": self.step,
            "history": list(self.history),
        }

    def load_state_dict(self, sd: dict) -> None:
        with torch.no_grad():
            for n in self.U:
                self.U[n].copy_(sd["U"][n])
                self.V_raw[n].copy_(sd["V_raw"][n])
        self.optimizer.load_state_dict(sd["optimizer"])
        self.data_gen.set_state(sd["data_gen"])
        self.step = int(sd["step"])
        self.history = list(sd["history"])


def unit_rows(V: Tensor) -> Tensor:
    return V / V.norm(dim=1, keepdim=True).clamp_min(1e-12)


def new_state(model: TargetModel, cfg: Stage1Config, device: torch.device,
              sample: Callable[[int, torch.Generator], Tensor]) -> DecompositionState:
    """Fresh pieces and optimizer; ``sample`` draws inputs for the data-driven init."""
    init_gen = torch.Generator().manual_seed(cfg.seed + 1)
    U, V = {}, {}
    acts: dict[str, Tensor] = {}
    if cfg.init == "data":
        x = sample(4 * max(cfg.batch_size, 1024), init_gen).to(device)
        acts = {n: a.cpu() for n, a in input_activations(model, x).items()}
    for name, w in model.decomposed_weights().items():
        C = int(cfg.per_matrix("n_pieces", name))
        if name in acts:
            u, v = init_factors_from_data(w.detach().cpu(), acts[name], C, init_gen)
        else:
            u, v = init_factors(w.detach().cpu(), C, init_gen)
        U[name] = torch.nn.Parameter(u.to(device))
        V[name] = torch.nn.Parameter(v.to(device))
    opt = torch.optim.Adam([*U.values(), *V.values()], lr=cfg.lr)
    return DecompositionState(U, V, opt, torch.Generator().manual_seed(cfg.seed + 2))


@torch.no_grad()
def input_activations(model: TargetModel, x: Tensor) -> dict[str, Tensor]:
    """Each decomposed matrix's input activations (its first use) on ``x``."""
    _, uses = tapped_run(model, x, {n: w.detach() for n, w in model.decomposed_weights().items()})
    acts: dict[str, Tensor] = {}
    for name, a, transposed in uses:
        if name not in acts and not transposed:
            acts[name] = a
    return acts


def init_factors_from_data(weight: Tensor, acts: Tensor, n_pieces: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """V rows: diverse directions of the matrix's input activations, picked by
    k-means++ seeding; U: a ridge least-squares fit of W by those directions,
    so the pieces start near faithful and never huge. A rank-1 piece does not
    care about the sign of v, so each direction is first flipped to make its
    largest coordinate positive (v and -v become one candidate)."""
    from sklearn.cluster import kmeans_plusplus

    live = acts[acts.norm(dim=1) > 1e-6]
    live = live / live.norm(dim=1, keepdim=True)
    lead = live.gather(1, live.abs().argmax(dim=1, keepdim=True))
    candidates = (live * lead.sign()).double().numpy()
    n_distinct = min(n_pieces, candidates.shape[0])
    seed = int(torch.randint(2**31 - 1, (1,), generator=gen))
    centers, _ = kmeans_plusplus(candidates, n_distinct, random_state=seed)
    V = torch.from_numpy(centers).to(weight.dtype)
    if n_distinct < n_pieces:  # fewer distinct inputs than pieces: pad with random directions
        V = torch.cat([V, torch.randn(n_pieces - n_distinct, V.shape[1], generator=gen, dtype=weight.dtype)])
    V = V / V.norm(dim=1, keepdim=True)
    gram = V @ V.T
    ridge = 1e-2 * gram.diagonal().mean() * torch.eye(n_pieces, dtype=weight.dtype)
    U = torch.linalg.solve(gram + ridge, V @ weight.T)  # (C, d_out): W ~ U^T V
    return U, V


def total_steps(cfg: Stage1Config) -> int:
    return cfg.warm_start_steps + cfg.steps


def lr_at(cfg: Stage1Config, step: int) -> float:
    if step < cfg.warm_start_steps:
        return cfg.lr
    s = step - cfg.warm_start_steps
    return cfg.lr * cosine_lr(s, cfg.steps, int(cfg.warmup * cfg.steps), cfg.lr_schedule)


def simplicity_weight_at(cfg: Stage1Config, step: int) -> float:
    """1 until ``simplicity_anneal_from`` of the main phase, then linear to
    ``simplicity_final`` at its last step."""
    progress = min(1.0, max(0, step - cfg.warm_start_steps) / max(1, cfg.steps - 1))
    start = cfg.simplicity_anneal_from
    if progress <= start:
        return 1.0
    return 1.0 + (cfg.simplicity_final - 1.0) * (progress - start) / max(1e-9, 1.0 - start)


def faithfulness_loss(weights: Mapping[str, Tensor], U: Mapping[str, Tensor], V: Mapping[str, Tensor]) -> Tensor:
    n_weights = sum(w.numel() for w in weights.values())
    return sum(((weights[n] - U[n].T @ V[n]) ** 2).sum() for n in weights) / n_weights


def topk_masks(scores: Mapping[str, Tensor], cfg: Stage1Config) -> dict[str, Tensor]:
    return {n: batch_topk_mask(s, float(cfg.per_matrix("topk", n))) for n, s in scores.items()}


def objective(model: TargetModel, x: Tensor, weights: Mapping[str, Tensor], U: Mapping[str, Tensor],
              V: Mapping[str, Tensor], cfg: Stage1Config, simplicity_weight: float,
              timer: Callable[[str], ContextManager] = no_timer) -> dict[str, Tensor]:
    """All loss terms for one batch (the full APD objective)."""
    n_weights = sum(w.numel() for w in weights.values())
    faith = faithfulness_loss(weights, U, V)
    scores, target = attributions(model, x, {n: (U[n].detach(), V[n].detach()) for n in U}, timer)
    with timer("top-k forward"):
        masks = topk_masks(scores, cfg)
        fwd = model.run(x, {n: MaskedPiecesOp(U[n], V[n], masks[n].to(x.dtype)) for n in U})
    minimality = torch.nn.functional.mse_loss(fwd.output, target.output)
    hidden = sum(
        (torch.nn.functional.mse_loss(fwd.hidden[h], target.hidden[h]) for h in target.hidden),
        torch.zeros((), device=x.device),
    )
    # Schatten-p of a rank-1 piece is its one singular value |U[c]| (V unit).
    simplicity = sum(
        (masks[n].sum(0).to(x.dtype) * U[n].norm(dim=1).pow(cfg.schatten_p)).sum() for n in U
    ) / (n_weights * x.shape[0])
    total = (cfg.faithfulness_coeff * faith + cfg.minimality_coeff * minimality
             + cfg.hidden_coeff * hidden + cfg.simplicity_coeff * simplicity_weight * simplicity)
    return {"total": total, "faithfulness": faith, "minimality": minimality, "hidden": hidden,
            "simplicity": simplicity}


def train(
    model: TargetModel,
    sample: Callable[[int, torch.Generator], Tensor],
    cfg: Stage1Config,
    state: DecompositionState,
    on_log: Callable[[dict[str, float]], None] | None = None,
    on_checkpoint: Callable[[DecompositionState], None] | None = None,
    device: torch.device = torch.device("cpu"),
) -> DecompositionState:
    """Run from ``state.step`` to the end. Host syncs happen only every
    ``log_every`` steps (metrics) and at checkpoints."""
    weights = {n: w.detach().to(device) for n, w in model.decomposed_weights().items()}
    loss_fn = torch.compile(objective) if cfg.compile else objective
    end = total_steps(cfg)
    running = {k: torch.zeros((), device=device) for k in LOSS_NAMES}
    since_log = 0
    while state.step < end:
        step = state.step
        for g in state.optimizer.param_groups:
            g["lr"] = lr_at(cfg, step)
        V = {n: unit_rows(v) for n, v in state.V_raw.items()}
        if step < cfg.warm_start_steps:
            faith = faithfulness_loss(weights, state.U, V)
            losses = {k: torch.zeros((), device=device) for k in LOSS_NAMES}
            losses["total"] = losses["faithfulness"] = faith
        else:
            x = sample(cfg.batch_size, state.data_gen).to(device)
            losses = loss_fn(model, x, weights, state.U, V, cfg, simplicity_weight_at(cfg, step))
        state.optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        state.optimizer.step()
        for k in LOSS_NAMES:
            running[k] += losses[k].detach()
        since_log += 1
        state.step += 1
        if state.step % cfg.log_every == 0 or state.step == end:
            row = {k: float(v) / since_log for k, v in running.items()}
            if not all(math.isfinite(v) for v in row.values()):
                raise NonFiniteLoss(state.step)
            row = {"step": float(state.step), "lr": lr_at(cfg, step), **row}
            state.history.append(row)
            if on_log is not None:
                on_log(row)
            running = {k: torch.zeros((), device=device) for k in LOSS_NAMES}
            since_log = 0
        if on_checkpoint is not None and (state.step % cfg.checkpoint_every == 0 or state.step == end):
            if not all(torch.isfinite(p).all() for p in [*state.U.values(), *state.V_raw.values()]):
                raise NonFiniteLoss(state.step)
            on_checkpoint(state)
    return state


@torch.no_grad()
def score_inputs(model: TargetModel, x: Tensor, factors, cfg: Stage1Config) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Attribution scores and top-k masks of the final pieces on ``x``; batch
    top-k is taken over blocks of the training batch size, as in training."""
    scores: dict[str, list[Tensor]] = {n: [] for n in factors}
    masks: dict[str, list[Tensor]] = {n: [] for n in factors}
    for start in range(0, x.shape[0], cfg.batch_size):
        s, _ = attributions(model, x[start:start + cfg.batch_size], factors)
        m = topk_masks(s, cfg)
        for n in factors:
            scores[n].append(s[n])
            masks[n].append(m[n])
    return {n: torch.cat(v) for n, v in scores.items()}, {n: torch.cat(v) for n, v in masks.items()}
