"""Stage 1 as a store-to-store function: target in, rank-1 pieces, their
evaluation-set attributions and masks, metrics and scores out. Resumable from
its checkpoint; a finished stage is kept unless ``force``."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from apdkit.core.model import DecomposedModel
from apdkit.core.pieces import Pieces, pieces_sum
from apdkit.stages.config import ConfigError, Stage1Config
from apdkit.stages.device import resolve_device
from apdkit.stages.errors import StageError
from apdkit.stages.progress import Reporter, SilentReporter
from apdkit.stages.seeds import generator
from apdkit.stages.selection import Gates, piece_masks, scorer_activity
from apdkit.stages.stage1.parallel import Replicas, replicas_from_env
from apdkit.stages.stage1.train import DecompositionState, NonFiniteLoss, Sampler, new_state, total_steps, train
from apdkit.stages.target import Target, ensure_target, load_from_store, load_state_file, matrix_settings, prepare
from apdkit.stores.run import GROUPINGS, STAGE1, VERIFY, Run, RunStore, check_writable, iter_chunks, writer_lock
from apdkit.targets.load import TargetRef, build_module

FAITHFULNESS_KEY = "faithfulness_rel_error/"  # + matrix name: |W - sum of its pieces| / |W|


def run_stage1(store_path: Path, ref: TargetRef, cfg: Stage1Config, *, module: nn.Module | None = None,
               data: Any = None, force: bool = False, target_file: Path | None = None,
               reporter: Reporter | None = None,
               on_metrics: Callable[[dict[str, float]], None] | None = None,
               source: str = "given") -> dict[str, float]:
    """Run (or resume, or skip) stage 1; returns its scores. ``source`` says
    where a given ``module`` came from (its import path when the caller built
    it from ``ref``: then the store's weights are the truth on resume)."""
    reporter = reporter or SilentReporter()
    replicas, device_name = replicas_from_env(cfg.device)  # several under torchrun
    try:
        return _run_stage1(store_path, ref, cfg, module, data, force, target_file, reporter, on_metrics, source,
                           replicas, resolve_device(device_name))
    finally:
        replicas.close()


def _run_stage1(store_path: Path, ref: TargetRef, cfg: Stage1Config, module: nn.Module | None, data: Any,
                force: bool, target_file: Path | None, reporter: Reporter,
                on_metrics: Callable[[dict[str, float]], None] | None, source: str, replicas: Replicas,
                device: torch.device) -> dict[str, float] | None:
    # all validation before the first write: device, store, model, layers, data, settings
    if cfg.batch_size % replicas.world_size:
        raise StageError(f"batch_size {cfg.batch_size} does not split evenly over {replicas.world_size} processes")
    check_writable(store_path, ref.model)
    if target_file is not None:
        if ref.builtin is None:
            raise StageError("--target-file is a state_dict for a built-in architecture; "
                             "for your own model, name its factory with --model module:function")
        module, source = load_state_file(ref.builtin, target_file), str(target_file)
    elif module is None and ref.builtin is None:
        module, source = build_module(ref), ref.model
    checked = prepare(ref, module if module is not None else ref.builtin.make(), data)
    check_resources(checked, cfg, matrix_settings(checked, cfg)[0], store_path)
    if not replicas.writes:
        return _follow(store_path, cfg, module, data, device, replicas)
    started = False

    def start(state_dict: dict) -> None:  # the other replicas begin from rank 0's exact state
        nonlocal started
        started = True
        replicas.share(state_dict)

    try:
        with writer_lock(store_path, create=True):
            return _run_locked(store_path, ref, cfg, module, data, force, source, device, reporter, on_metrics,
                               replicas, start)
    finally:
        if not started:  # nothing to train, or a failure before training (a held lock too): release the others
            replicas.share(None)


def _follow(store_path: Path, cfg: Stage1Config, module: nn.Module | None, data: Any, device: torch.device,
            replicas: Replicas) -> None:
    """A replica other than rank 0: wait for rank 0 to prepare the store,
    start from its state, train, write nothing."""
    state_dict = replicas.share()
    if state_dict is None:  # rank 0 found nothing to train, or failed
        return None
    target = load_from_store(Run(store_path), module=module, data=data)
    n_pieces, topk = matrix_settings(target, cfg)
    model = target.model.to(device)
    state = _new_state(model, cfg, n_pieces, device, target.sample)
    state.load_state_dict(state_dict)
    try:
        train(model, target.sample, cfg, topk, state, device=device, replicas=replicas)
    except NonFiniteLoss:
        pass  # rank 0 reports it
    return None


def _available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_resources(target: Target, cfg: Stage1Config, n_pieces: dict[str, int], store_path: Path) -> None:
    """Refuse, in one line and before anything is written, settings whose
    batch cannot fit in memory or whose evaluation arrays cannot fit on disk
    (rough lower bounds: the pieces' activations of one batch, and the stored
    evaluation masks and scores)."""
    with torch.no_grad():
        fwd = target.model.forward(target.sample(2, torch.Generator().manual_seed(0)))
    rows_per_input = fwd.output.shape[0] // 2
    total_c = sum(n_pieces.values())
    widths = sum(sum(m.shape) for m in target.model.matrices.values())
    batch_bytes = 4 * cfg.batch_size * rows_per_input * (total_c + widths + fwd.output.shape[1]) * 4
    free_mem = _available_memory()
    if free_mem is not None and batch_bytes > free_mem:
        raise StageError(f"batch_size {cfg.batch_size} needs at least {batch_bytes / 2**30:.1f} GiB of memory per "
                         f"step, more than the {free_mem / 2**30:.1f} GiB available: use a smaller batch_size")
    eval_bytes = cfg.eval_samples * rows_per_input * total_c * 5
    parent = Path(store_path)
    while not parent.exists():
        parent = parent.parent
    free_disk = shutil.disk_usage(parent).free
    if eval_bytes > free_disk:
        raise StageError(f"eval_samples {cfg.eval_samples} needs about {eval_bytes / 2**30:.1f} GiB on disk for the "
                         f"masks and scores, more than the {free_disk / 2**30:.1f} GiB free: use fewer eval_samples")
    if cfg.eval_chunk * rows_per_input * total_c * 5 > (free_mem or float("inf")):
        raise StageError(f"eval_chunk {cfg.eval_chunk} does not fit in memory: use a smaller eval_chunk")


def _run_locked(store_path: Path, ref: TargetRef, cfg: Stage1Config, module: nn.Module | None, data: Any,
                force: bool, source: str, device: torch.device, reporter: Reporter,
                on_metrics: Callable[[dict[str, float]], None] | None, replicas: Replicas,
                start: Callable[[dict], None]) -> dict[str, float]:
    store = RunStore(store_path, ref.model)
    target = ensure_target(store, ref, cfg.seed, module, data, source, reporter)
    started = time.perf_counter()
    n_pieces, topk = matrix_settings(target, cfg)

    status = store.stage_status(STAGE1)
    problem = Run(store_path).damage(STAGE1) if status == "done" else None
    if problem is not None and not force:
        reporter.message(f"stage1 is damaged ({problem}): rerunning it")
        force = True
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
        for node in (STAGE1, GROUPINGS, VERIFY):  # groupings and verdicts of the old pieces go too
            store.reset_stage(node)
        checkpoint = None

    for name, w in target.model.weights().items():  # fewer pieces than the rank cannot sum to the matrix
        rank = int(torch.linalg.matrix_rank(w.float()))
        if n_pieces[name] < rank:
            reporter.message(f"warning: {name} has rank {rank} but {n_pieces[name]} pieces: they cannot sum to it "
                             "(faithfulness will fail); give n_pieces >= the rank")
    model = target.model.to(device)
    state = _new_state(model, cfg, n_pieces, device, target.sample)
    if checkpoint is not None:
        state.load_state_dict(checkpoint["state"])
        reporter.message(f"resuming stage1 from step {state.step}")
    store.set_stage(STAGE1, "running", config=cfg.model_dump(), world_size=replicas.world_size)
    start(state.state_dict())

    end = total_steps(cfg)
    task = f"stage1 {ref.model}"
    reporter.start(task, end, state.step)

    def on_log(row: dict[str, float]) -> None:
        if on_metrics is not None:  # the same rows the store's metrics are made of
            on_metrics(row)
        reporter.advance(task, int(row["step"]),
                         f"faith {row['faithfulness']:.1e} min {row['minimality']:.1e} simp {row['simplicity']:.1e}")

    def on_checkpoint(s) -> None:
        store.save_checkpoint(STAGE1, {"config": cfg.model_dump(), "state": s.state_dict()})

    try:
        train(model, target.sample, cfg, topk, state, on_log, on_checkpoint, device, replicas=replicas)
    except NonFiniteLoss as e:
        reporter.finish(task)
        store.set_stage(STAGE1, "failed", message=str(e))
        raise StageError(f"stage1 stopped: {e}; the store keeps the last good checkpoint") from None
    reporter.finish(task)

    pieces = state.pieces()
    scores = write_evaluation(store, target, cfg, topk, pieces, device, reporter, state.gate_params())
    store.write_stage1_pieces(pieces)
    if state.gates:
        store.write_stage1_gates(state.gate_params())
    store.write_stage1_metrics(state.history)
    store.set_stage(STAGE1, "done", config=cfg.model_dump(), scores=scores, device=str(device),
                    world_size=replicas.world_size,
                    wall_seconds=round(time.perf_counter() - started, 3),
                    matrices={n: {"param": m.param, "uses": [u.module for u in m.uses], "shape": list(m.shape)}
                              for n, m in target.model.matrices.items()})
    return scores


def write_evaluation(store: RunStore, target: Target, cfg: Stage1Config, topk: dict[str, float], pieces: Pieces,
                     device: torch.device, reporter: Reporter, gates: Gates) -> dict[str, float]:
    """Score and mask a fresh evaluation set chunk by chunk (stage 2 groups
    by the masks; the scores, attributions or gates, are kept for the report
    and readers), then compute the scores: generic ones, and the target's
    ground truth where it has one."""
    model = target.model
    gen = generator(cfg.seed, "eval")
    probe_gen = generator(cfg.seed, "eval", 1)
    n_pieces = {n: U.shape[0] for n, (U, _) in pieces.items()}
    arrays = None
    active = {n: torch.zeros(c, dtype=torch.long) for n, c in n_pieces.items()}
    n_rows = 0
    reporter.start("scoring evaluation set", cfg.eval_samples)
    for sl in iter_chunks(cfg.eval_samples, cfg.eval_chunk):
        x = target.sample(sl.stop - sl.start, gen).to(device)
        scores, masks = piece_masks(model, x, pieces, gates, topk, cfg, probe_gen)
        per_input = next(iter(masks.values())).shape[0] // x.shape[0]
        if arrays is None:
            arrays = store.create_eval_arrays(cfg.eval_samples, tuple(x.shape[1:]), str(x.dtype).replace("torch.", ""),
                                              per_input, n_pieces, cfg.eval_chunk)
        arrays["inputs"][sl] = x.cpu().numpy()
        rows = slice(sl.start * per_input, sl.stop * per_input)
        for n in pieces:
            arrays["scores"][n][rows] = scores[n].float().cpu().numpy()
            arrays["masks"][n][rows] = masks[n].cpu().numpy()
            active[n] += masks[n].sum(0).cpu()
        n_rows += x.shape[0] * per_input
        reporter.advance("scoring evaluation set", sl.stop)
    reporter.finish("scoring evaluation set")
    model.to(torch.device("cpu"))
    cpu_pieces = {n: (U.cpu(), V.cpu()) for n, (U, V) in pieces.items()}
    out: dict[str, float] = {}
    for name, w in model.weights().items():
        U, V = cpu_pieces[name]
        out[FAITHFULNESS_KEY + name] = float((w - pieces_sum(U, V)).norm() / w.norm())
    out["mean_active_pieces"] = sum(int(c.sum()) for c in active.values()) / n_rows
    for name, counts in active.items():
        out[f"alive_pieces/{name}"] = float((counts > 0).sum())
    spec = target.builtin
    if target.has_ground_truth:
        cpu_gates = {n: {k: t.cpu() for k, t in g.items()} for n, g in gates.items()}
        out.update(spec.scores(model, cpu_pieces, topk, scorer_activity(model, cpu_pieces, cpu_gates, cfg)))
    return out


def _new_state(model: DecomposedModel, cfg: Stage1Config, n_pieces: dict[str, int], device: torch.device,
               sample: Sampler) -> DecompositionState:
    """new_state, whose sampling is the model's first forward on ``device``: a
    model that makes a tensor on the CPU inside its forward fails there, in one line."""
    try:
        return new_state(model, cfg, n_pieces, device, sample)
    except RuntimeError as err:
        if device.type == "cpu" or "device" not in str(err):
            raise
        raise StageError(f"the model fails on {device}: {str(err).splitlines()[0]}. A tensor made inside its forward "
                         "must be on the input's device (device=x.device); or add --device cpu") from err
