"""The 'target' stage: put a healthy target in the store and load it back.

A built-in toy is trained here from the seed (or read from a user's
state_dict file); a user's model is taken as it comes. Either way its weights
go into the store as arrays with the reference that rebuilds the module, so
every later stage, and ``open_run(path).target()``, reads the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from apdkit.core.model import DecomposedModel
from apdkit.stages.config import Stage1Config
from apdkit.stages.errors import StageError
from apdkit.stages.progress import Reporter, SilentReporter
from apdkit.stages.seeds import target_attempt_seed
from apdkit.stores.run import TARGET, Run, RunStore
from apdkit.targets.load import (Sampler, TargetRef, build_module, check_data, check_weights, decomposed_model,
                                 load_data, sampler_from)
from apdkit.targets.spec import TargetSpec

MAX_TRAINING_ATTEMPTS = 5  # TMS seeds can give dead features: retry with derived seeds


@dataclass
class Target:
    """A target ready for the stages: the module, its decomposed view, its data."""

    ref: TargetRef
    module: nn.Module
    model: DecomposedModel
    sampler: Sampler | None = None  # loaded on first use: reading a run needs no data

    @property
    def builtin(self) -> TargetSpec | None:
        return self.ref.builtin

    @property
    def has_ground_truth(self) -> bool:
        """A built-in toy decomposed as designed: its scores apply."""
        spec = self.builtin
        return spec is not None and spec.scores is not None and set(self.ref.modules) == set(spec.modules) \
            and not self.ref.insert_identity

    def sample(self, n: int, gen: torch.Generator) -> torch.Tensor:
        if self.sampler is None:
            self.sampler = load_data(self.ref, self.module)
        return self.sampler(n, gen)


def prepare(ref: TargetRef, module: nn.Module | None = None, data: Any = None) -> Target:
    """Build (or take) the module and its data and check them together, before
    anything is written: patterns, layer types, weights, data shapes."""
    module = module if module is not None else build_module(ref)
    target = _assemble(ref, module, data)
    if target.sampler is None:
        target.sampler = load_data(ref, target.module)
    if ref.builtin is None:
        check_data(target.model, target.sampler)
    return target


def _assemble(ref: TargetRef, module: nn.Module, data: Any) -> Target:
    check_weights(module)
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    model = decomposed_model(ref, module)
    return Target(ref, module, model, sampler_from(data, "data") if data is not None else None)


def train_builtin(spec: TargetSpec, seed: int, reporter: Reporter) -> tuple[nn.Module, dict]:
    """Deterministic on one machine: the same (spec, seed) gives the same
    weights, bit for bit, whatever the thread count. Another CPU may round
    differently and train other weights (RESULTS.md, "The gate's leak")."""
    for attempt in range(MAX_TRAINING_ATTEMPTS):
        attempt_seed = target_attempt_seed(seed, attempt)
        with torch.random.fork_rng():
            torch.manual_seed(attempt_seed)
            module = spec.make()
        gen = torch.Generator().manual_seed(attempt_seed)
        task = f"training target {spec.name}" + (f" (attempt {attempt + 1})" if attempt else "")
        reporter.start(task, spec.train["steps"])
        final_loss = spec.fit(module, spec.train, gen,
                              lambda step, loss: reporter.advance(task, step + 1, f"loss {loss:.2e}"))
        reporter.finish(task)
        health = spec.check(module, torch.Generator().manual_seed(attempt_seed + 1))
        if health.healthy:
            reporter.message(f"target {spec.name}: {health.summary}")
            return module, {"seed": attempt_seed, "source": "trained", "final_loss": final_loss,
                            "health": health.figures, "healthy": True}
        if attempt + 1 < MAX_TRAINING_ATTEMPTS:  # shown without -v: the user sees why training starts again
            reporter.message(f"warning: target {spec.name} unhealthy on attempt {attempt + 1} ({health.summary}); "
                             "training again from a derived seed")
    raise StageError(f"target {spec.name} unhealthy after {MAX_TRAINING_ATTEMPTS} training attempts: {health.summary}")


def load_state_file(spec: TargetSpec, path: Path) -> nn.Module:
    """A user's state_dict for a built-in architecture."""
    module = spec.make()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise StageError(f"target file {path} does not exist") from None
    except Exception as e:  # unpickling errors come in many types
        raise StageError(f"target file {path} is not a torch state_dict: {str(e).splitlines()[0]}") from None
    if not isinstance(state, dict):
        raise StageError(f"target file {path} holds a {type(state).__name__}, not a state_dict")
    tied: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(name)
    for names in tied.values():  # loading would keep the last name's values silently
        present = [n for n in names if n in state]
        first = state[present[0]]
        same = lambda t: t.shape == first.shape and bool(((t == first) | (t.isnan() & first.isnan())).all())  # noqa: E731
        if not all(same(state[n]) for n in present[1:]):
            raise StageError(f"target file {path}: {' and '.join(present)} are one tied parameter but differ")
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        lines = str(e).splitlines()
        raise StageError(f"target file {path} does not fit {spec.name}: "
                         f"{lines[1].strip() if len(lines) > 1 else lines[0]}") from None
    return module


def ensure_target(store: RunStore, ref: TargetRef, seed: int, module: nn.Module | None = None, data: Any = None,
                  source: str = "given", reporter: Reporter | None = None) -> Target:
    """The store's target, putting one there first if it has none: ``module``
    (a user's, or a built-in architecture's from a state_dict file; ``source``
    says which) or a built-in trained here from the seed."""
    reporter = reporter or SilentReporter()
    if store.stage_status(TARGET) == "done":
        run = Run(store.path)
        run.check(TARGET)
        if module is not None and source != ref.model:  # a module object or file, not rebuilt from the reference
            stored = run.target_state()
            if any(not torch.equal(v.cpu(), stored[k]) for k, v in module.state_dict().items() if k in stored):
                raise StageError(f"{store.path} already holds a different target ({run.attrs(TARGET).get('source')}); "
                                 "use a new --store")
        return load_from_store(run, module=module, data=data)
    spec = ref.builtin
    if module is None:  # trained here: stored with the check that accepted it, not checked again on another sample
        module, info = train_builtin(spec, seed, reporter)
        target = prepare(ref, module, data)
    else:
        info = {"seed": seed, "source": source}
        target = prepare(ref, module, data)
        if spec is not None:  # weights from elsewhere for a built-in architecture
            health = spec.check(target.module, torch.Generator().manual_seed(seed))
            info.update(health=health.figures, healthy=health.healthy)
            reporter.message(f"target {spec.name}: {health.summary}")
    store.write_target(ref.as_dict(), dict(target.module.state_dict()),
                       arch=dict(spec.arch) if spec is not None else {}, **info)
    return target


def load_from_store(run: Run, module: nn.Module | None = None, data: Any = None) -> Target:
    """The stored target: the module rebuilt from its reference (or the one
    given) with the stored weights, and its data. A built-in is built with the
    architecture stored with it, not the registry's of today: a change to the
    registry (induction's placement, induction-sink's positions) must not
    change what an older store's weights compute; a key the store lacks takes
    the builder's default, which is the one from before that key existed."""
    ref = TargetRef.from_dict(run.target_ref())
    if module is None:
        stored_arch = run.attrs(TARGET).get("arch")
        if ref.builtin is not None and stored_arch:
            try:
                module = ref.builtin.build(**stored_arch)
            except (TypeError, ValueError) as e:
                raise StageError(f"the store's {ref.model} architecture {stored_arch} no longer builds: {e}") from None
        else:
            module = build_module(ref)
    try:
        module.load_state_dict(run.target_state())
    except RuntimeError as e:
        lines = str(e).splitlines()
        raise StageError(f"the stored weights do not fit the module {ref.model} builds now: "
                         f"{lines[1].strip() if len(lines) > 1 else lines[0]}") from None
    return _assemble(ref, module, data)


def matrix_settings(target: Target, cfg: Stage1Config) -> tuple[dict[str, int], dict[str, float]]:
    """Pieces and top-k per matrix. A matrix kept whole (``cfg.whole``) and an
    inserted identity get min(d_out, d_in) pieces, all active (an identity's
    known answer is one full-rank mechanism)."""
    names = target.model.names
    whole = [*cfg.whole_matrices(names), *target.model.identities]
    fixed = {n: float(min(target.model.matrices[n].shape)) for n in whole}
    n_pieces = {n: int(v) for n, v in cfg.per_matrix("n_pieces", names, fixed).items()}
    return n_pieces, cfg.per_matrix("topk", names, fixed)


def builtin_target(name: str, arch_overrides: dict | None = None, seed: int = 0,
                   module: nn.Module | None = None) -> Target:
    """A built-in target with fresh (untrained) weights from ``seed``, or
    ``module`` when given: for benchmarks and tests."""
    from apdkit.targets.load import resolve_ref
    from apdkit.targets.registry import get_target

    spec = get_target(name)
    if module is None:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            module = spec.build(**{**spec.arch, **(arch_overrides or {})})
    target = _assemble(resolve_ref(name), module, None)
    target.sampler = lambda n, gen: spec.sample(module, n, gen)
    return target
