"""The 'target' stage: put a healthy trained target in the store, trained
here from the seed or loaded from a user's state_dict file."""

from __future__ import annotations

from pathlib import Path

import torch

from stages.errors import StageError
from stages.progress import Reporter, SilentReporter
from stores.run import TARGET, Run, RunStore
from targets.base import TargetModel, TargetSpec
from targets.registry import spec_to_dict

MAX_TRAINING_ATTEMPTS = 5  # TMS seeds can give dead features: retry with derived seeds


def train_target(spec: TargetSpec, seed: int, reporter: Reporter) -> tuple[TargetModel, dict]:
    """Deterministic: the same (spec, seed) gives the same weights, bit for bit."""
    for attempt in range(MAX_TRAINING_ATTEMPTS):
        attempt_seed = seed + 1000 * attempt
        with torch.random.fork_rng():
            torch.manual_seed(attempt_seed)
            model = spec.make()
        gen = torch.Generator().manual_seed(attempt_seed)
        task = f"training target {spec.name}" + (f" (attempt {attempt + 1})" if attempt else "")
        reporter.start(task, spec.train["steps"])
        final_loss = spec.fit(model, spec.train, gen,
                              lambda step, loss: reporter.advance(task, step + 1, f"loss {loss:.2e}"))
        reporter.finish(task)
        health = spec.check(model, torch.Generator().manual_seed(attempt_seed + 1))
        reporter.message(f"target {spec.name}: {health.summary}")
        if health.healthy:
            return model, {"seed": attempt_seed, "source": "trained", "final_loss": final_loss,
                           "health": health.figures, "healthy": True}
    raise StageError(f"target {spec.name} unhealthy after {MAX_TRAINING_ATTEMPTS} training attempts: {health.summary}")


def load_target_file(spec: TargetSpec, path: Path) -> TargetModel:
    model = spec.make()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise StageError(f"target file {path} does not exist") from None
    except Exception as e:  # unpickling errors come in many types
        raise StageError(f"target file {path} is not a torch state_dict: {str(e).splitlines()[0]}") from None
    if not isinstance(state, dict):
        raise StageError(f"target file {path} holds a {type(state).__name__}, not a state_dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise StageError(f"target file {path} does not fit {spec.name}: {first}") from None
    return model


def ensure_target(store: RunStore, spec: TargetSpec, seed: int, target_file: Path | None = None,
                  reporter: Reporter | None = None, user_model: TargetModel | None = None) -> TargetModel:
    """The store's target, putting one there first if it has none: the
    user's (``user_model``, loaded from ``target_file``) or one trained here."""
    reporter = reporter or SilentReporter()
    if store.stage_status(TARGET) == "done":
        if target_file is not None:
            raise StageError(f"{store.path} already holds a target; use a new --store for {target_file}")
        return Run(store.path).target()
    if target_file is not None:
        model = user_model if user_model is not None else load_target_file(spec, target_file)
        health = spec.check(model, torch.Generator().manual_seed(seed))
        reporter.message(f"target from {target_file}: {health.summary}")
        info = {"seed": seed, "source": str(target_file), "health": health.figures, "healthy": health.healthy}
    else:
        model, info = train_target(spec, seed, reporter)
    store.write_target(spec_to_dict(spec), model.state_dict(), **info)
    return model.eval()
