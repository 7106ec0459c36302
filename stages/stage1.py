"""Stage 1 as a store-to-store function: target in, rank-1 pieces, their
evaluation-set attributions and masks, metrics and scores out. Resumable from
its checkpoint; a finished stage is kept unless ``force``."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.config import ConfigError, Stage1Config
from stages.decompose import NonFiniteLoss, new_state, score_inputs, total_steps, train
from stages.errors import StageError
from stages.progress import Reporter, SilentReporter
from stages.scoring import stage1_scores
from stages.target import ensure_target, load_target_file
from stores.run import STAGE1, RunStore, check_writable, iter_chunks
from targets.registry import get_target

EVAL_SEED_OFFSET = 3  # eval inputs come from their own stream, apart from training data


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise StageError("--device cuda asked for, but torch sees no CUDA device")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_stage1(store_path: Path, model_name: str, cfg: Stage1Config, *, force: bool = False,
               target_file: Path | None = None, reporter: Reporter | None = None) -> dict[str, float]:
    """Run (or resume, or skip) stage 1; returns its scores."""
    reporter = reporter or SilentReporter()
    spec = get_target(model_name)
    cfg.check_matrices(list(spec.make().decomposed))
    device = resolve_device(cfg.device)
    check_writable(store_path, model_name)  # all validation before the first write
    user_model = load_target_file(spec, target_file) if target_file is not None else None

    store = RunStore(store_path, model_name)
    model = ensure_target(store, spec, cfg.seed, target_file, reporter, user_model)
    for p in model.parameters():
        p.requires_grad_(False)

    status = store.stage_status(STAGE1)
    if status == "done" and not force:
        reporter.message(f"stage1 already done in {store_path} (use --force to rerun)")
        return dict(store.stage_attrs(STAGE1).get("scores", {}))
    checkpoint = None if force else store.load_checkpoint(STAGE1)
    if checkpoint is not None and checkpoint["config"] != cfg.model_dump():
        raise ConfigError(
            f"stage1 in {store_path} was started with a different config; rerun with the same settings "
            "to resume, or add --force to start over"
        )
    if force or status == "failed":
        store.reset_stage(STAGE1)
        checkpoint = None

    model = model.to(device)
    sample = lambda batch, gen: spec.sample(model, batch, gen)  # noqa: E731
    state = new_state(model, cfg, device, sample)
    if checkpoint is not None:
        state.load_state_dict(checkpoint["state"])
        reporter.message(f"resuming stage1 from step {state.step}")
    store.set_stage(STAGE1, "running", config=cfg.model_dump())

    end = total_steps(cfg)
    task = f"stage1 {model_name}"
    reporter.start(task, end, state.step)

    def on_log(row: dict[str, float]) -> None:
        reporter.advance(task, int(row["step"]),
                         f"faith {row['faithfulness']:.1e} min {row['minimality']:.1e} simp {row['simplicity']:.1e}")

    def on_checkpoint(s) -> None:
        store.save_checkpoint(STAGE1, {"config": cfg.model_dump(), "state": s.state_dict()})

    try:
        train(model, sample, cfg, state, on_log, on_checkpoint, device)
    except NonFiniteLoss as e:
        reporter.finish(task)
        store.set_stage(STAGE1, "failed", message=str(e))
        raise StageError(f"stage1 stopped: {e}; the store keeps the last good checkpoint") from None
    reporter.finish(task)

    factors = state.factors()
    scores = write_evaluation(store, model, spec, cfg, factors, device, reporter)
    store.write_stage1_factors(factors)
    store.write_stage1_metrics(state.history)
    store.set_stage(STAGE1, "done", config=cfg.model_dump(), scores=scores)
    return scores


def write_evaluation(store: RunStore, model, spec, cfg: Stage1Config, factors, device, reporter) -> dict[str, float]:
    """Score and mask a fresh evaluation set chunk by chunk (stage 2 reads
    these), then compute the ground-truth scores."""
    n_pieces = {n: U.shape[0] for n, (U, _) in factors.items()}
    arrays = store.create_eval_arrays(cfg.eval_samples, model.n_features, n_pieces, cfg.eval_chunk)
    gen = torch.Generator().manual_seed(cfg.seed + EVAL_SEED_OFFSET)
    active = {n: torch.zeros(c, dtype=torch.long) for n, c in n_pieces.items()}
    reporter.start("scoring evaluation set", cfg.eval_samples)
    for sl in iter_chunks(cfg.eval_samples, cfg.eval_chunk):
        x = spec.sample(model, sl.stop - sl.start, gen).to(device)
        scores, masks = score_inputs(model, x, factors, cfg)
        arrays["inputs"][sl] = x.cpu().numpy()
        for n in factors:
            arrays["scores"][n][sl] = scores[n].float().cpu().numpy()
            arrays["masks"][n][sl] = masks[n].cpu().numpy()
            active[n] += masks[n].sum(0).cpu()
        reporter.advance("scoring evaluation set", sl.stop)
    reporter.finish("scoring evaluation set")
    cpu_factors = {n: (U.cpu(), V.cpu()) for n, (U, V) in factors.items()}
    return stage1_scores(model.cpu(), spec.family, cpu_factors, cfg, active, cfg.eval_samples)
