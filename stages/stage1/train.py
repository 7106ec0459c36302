"""The stage-1 training loop: learn rank-1 pieces of every decomposed matrix
with the APD objective. Data, logging and checkpointing come in as
callbacks, so tests, the CLI and benchmarks all run the same loop.

The input-side factor V is kept at unit norm by reparametrisation
(V = V_raw / |V_raw|), so each piece's one singular value is |U[c]|.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import torch
from torch import Tensor

from apdkit.core.attributions import no_timer
from apdkit.core.gates import init_gates
from apdkit.core.model import DecomposedModel
from apdkit.core.pieces import init_from_data, init_random, unit_rows
from apdkit.stages.config import Stage1Config
from apdkit.stages.seeds import generator
from apdkit.stages.stage1.objective import LOSS_NAMES, faithfulness_loss, learned_objective, objective
from apdkit.stages.stage1.parallel import Replicas
from apdkit.targets.training import cosine_lr

Sampler = Callable[[int, torch.Generator], Tensor]


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
    gates: dict[str, dict[str, torch.nn.Parameter]] = field(default_factory=dict)  # learned mode only
    # learned mode with a minimality target: log of the factor on importance_coeff, moved by the controller
    importance_log_scale: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))

    def pieces(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Detached (U, V) with V at unit norm: piece c is outer(U[c], V[c])."""
        return {n: (self.U[n].detach(), unit_rows(self.V_raw[n]).detach()) for n in self.U}

    def gate_params(self) -> dict[str, dict[str, Tensor]]:
        """Detached gate parameters {matrix: {w1, b1, w2, b2}} (empty in top-k mode)."""
        return {n: {k: p.detach() for k, p in g.items()} for n, g in self.gates.items()}

    def parameters(self) -> list[torch.nn.Parameter]:
        return [*self.U.values(), *self.V_raw.values(), *(p for g in self.gates.values() for p in g.values())]

    def state_dict(self) -> dict:
        """Tensors and plain types only (loadable with weights_only=True)."""
        return {
            "U": {n: p.detach().cpu() for n, p in self.U.items()},
            "V_raw": {n: p.detach().cpu() for n, p in self.V_raw.items()},
            "gates": {n: {k: p.detach().cpu() for k, p in g.items()} for n, g in self.gates.items()},
            "optimizer": self.optimizer.state_dict(),
            "data_gen": self.data_gen.get_state(),
            "step": self.step,
            "history": list(self.history),
            "importance_log_scale": self.importance_log_scale.detach().cpu(),
        }

    def load_state_dict(self, sd: dict) -> None:
        with torch.no_grad():
            for n in self.U:
                self.U[n].copy_(sd["U"][n])
                self.V_raw[n].copy_(sd["V_raw"][n])
            for n, g in self.gates.items():
                for k, p in g.items():
                    p.copy_(sd["gates"][n][k])
        self.optimizer.load_state_dict(sd["optimizer"])
        self.data_gen.set_state(sd["data_gen"])
        self.step = int(sd["step"])
        self.history = list(sd["history"])
        if "importance_log_scale" in sd:  # checkpoints written before the controller have none: factor 1
            self.importance_log_scale.copy_(sd["importance_log_scale"])


def new_state(model: DecomposedModel, cfg: Stage1Config, n_pieces: dict[str, int], device: torch.device,
              sample: Sampler) -> DecompositionState:
    """Fresh pieces and optimizer; ``sample`` draws inputs for the data-driven init."""
    init_gen = generator(cfg.seed, "init")
    U, V = {}, {}
    acts: dict[str, Tensor] = {}
    if cfg.init == "data":
        x = sample(4 * max(cfg.batch_size, 1024), init_gen).to(device)
        acts = {n: a.float().cpu() for n, a in model.input_activations(x).items() if a.is_floating_point()}
    for name, w in model.weights().items():
        w = w.float().cpu()
        if name in acts:
            u, v = init_from_data(w, acts[name], n_pieces[name], init_gen)
        else:
            u, v = init_random(w, n_pieces[name], init_gen)
        U[name] = torch.nn.Parameter(u.to(device))
        V[name] = torch.nn.Parameter(v.to(device))
    gates = {}
    if cfg.minimality == "learned":  # a matrix kept whole has no gates: every one is 1 (core/gates.py)
        gate_gen = generator(cfg.seed, "gates")
        whole = cfg.whole_matrices(list(U))
        gates = {n: {k: torch.nn.Parameter(t.to(device)) for k, t in init_gates(n_pieces[n], cfg.gate_hidden,
                                                                                gate_gen).items()}
                 for n in U if n not in whole}
    state = DecompositionState(U, V, None, generator(cfg.seed, "data"), gates=gates,
                               importance_log_scale=torch.zeros((), dtype=torch.float64, device=device))
    state.optimizer = torch.optim.Adam(state.parameters(), lr=cfg.lr)
    return state


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


def coefficients(cfg: Stage1Config) -> dict[str, float]:
    return {"faithfulness": cfg.faithfulness_coeff, "minimality": cfg.minimality_coeff,
            "hidden": cfg.hidden_coeff, "simplicity": cfg.simplicity_coeff, "stochastic": cfg.stochastic_coeff,
            "set_aside": cfg.set_aside_coeff,
            "importance": cfg.importance_coeff, "learned_faithfulness": cfg.learned_faithfulness_coeff}


# the controller's step in log space per training step, for a masked error e times off its target;
# |log(target / e)| is capped at 1 so one noisy batch moves the coefficient by at most 1%
CONTROL_RATE = 0.01


def importance_log_scale_step(log_scale: Tensor, minimality: Tensor, target: float) -> Tensor:
    """The controller's next log factor on the importance coefficient: up while
    the masked output error is under ``target`` (room to close more gates),
    down while it is over."""
    error = minimality.detach().to(log_scale.dtype).clamp_min(1e-12)
    return log_scale + CONTROL_RATE * torch.log(target / error).clamp(-1.0, 1.0)


def compiled(fn: Callable, device: torch.device) -> Callable:
    """``fn`` compiled with its backward: on a GPU in CUDA graphs (mode
    reduce-overhead: the whole loss and its gradient replayed as one
    recorded launch sequence, which needs fixed shapes: batch top-k keeps a
    fixed number of entries); on CPU as inductor's fused kernels."""
    return torch.compile(fn, mode="reduce-overhead" if device.type == "cuda" else None, dynamic=False)


def train(
    model: DecomposedModel,
    sample: Sampler,
    cfg: Stage1Config,
    topk: dict[str, float],
    state: DecompositionState,
    on_log: Callable[[dict[str, float]], None] | None = None,
    on_checkpoint: Callable[[DecompositionState], None] | None = None,
    device: torch.device = torch.device("cpu"),
    timer: Callable[[str], ContextManager] = no_timer,
    replicas: Replicas = Replicas(),
) -> DecompositionState:
    """Run from ``state.step`` to the end. Host syncs happen only every
    ``log_every`` steps (metrics) and at checkpoints. With several
    ``replicas`` each computes its rows of the global batch; give the
    callbacks to rank 0 only."""
    weights = {n: w.to(device) for n, w in model.weights().items()}
    learned = cfg.minimality == "learned"
    base = learned_objective if learned else objective
    loss_fn = compiled(base, device) if cfg.compile else base
    coeffs = coefficients(cfg)
    low_precision = torch.bfloat16 if cfg.precision == "bfloat16" else None
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
            x = sample(cfg.batch_size, state.data_gen)[replicas.rows(cfg.batch_size)].to(device)
            if learned:
                coeffs["importance"] = cfg.importance_coeff * state.importance_log_scale.exp().float()
                losses = loss_fn(model, x, weights, state.U, V, state.gates, coeffs, cfg.importance_p,
                                 state.data_gen, low_precision)
            else:
                losses = loss_fn(model, x, weights, state.U, V, topk, coeffs, cfg.schatten_p,
                                 simplicity_weight_at(cfg, step), cfg.max_exact_outputs, cfg.attribution_probes,
                                 state.data_gen, timer, replicas.masks, low_precision,
                                 attribution=cfg.attribution, integration_steps=cfg.integration_steps)
        state.optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        replicas.average_gradients(state.parameters())
        state.optimizer.step()
        if learned and cfg.minimality_target is not None and step >= cfg.warm_start_steps:
            with torch.no_grad():  # every replica takes the same step: the error is averaged over them
                error = replicas.average({"minimality": losses["minimality"]})["minimality"]
                state.importance_log_scale = importance_log_scale_step(state.importance_log_scale, error,
                                                                       cfg.minimality_target)
        for k in LOSS_NAMES:
            running[k] += losses[k].detach()
        since_log += 1
        state.step += 1
        if state.step % cfg.log_every == 0 or state.step == end:
            row = {k: float(v) / since_log for k, v in replicas.average(running).items()}
            if not all(math.isfinite(v) for v in row.values()):
                raise NonFiniteLoss(state.step)
            row = {"step": float(state.step), "lr": lr_at(cfg, step), **row}
            if learned:  # the weight the gates' penalty had at this log (importance_coeff unless a target moves it)
                row["importance_coeff"] = cfg.importance_coeff * math.exp(float(state.importance_log_scale))
            state.history.append(row)
            if on_log is not None:
                on_log(row)
            running = {k: torch.zeros((), device=device) for k in LOSS_NAMES}
            since_log = 0
        if on_checkpoint is not None and (state.step % cfg.checkpoint_every == 0 or state.step == end):
            if not all(torch.isfinite(p).all() for p in state.parameters()):
                raise NonFiniteLoss(state.step)
            on_checkpoint(state)
    return state
