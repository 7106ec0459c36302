"""Stage 2 as a store-to-store function: stage 1's masks and scores in, a
named grouping of pieces into mechanisms out."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from scipy import sparse

from apdkit.core.model import TargetError
from apdkit.stages.config import TOGETHER_MIN, GroupConfig, Stage1Config
from apdkit.stages.errors import StageError
from apdkit.stages.group.coactivation import (CoactivationStats, PieceIndex, alive_pieces, coactivation_dask,
                                              coactivation_numpy, group_activity_counts, sample_masks, sample_rows)
from apdkit.stages.group.mechanisms import (description_length, feature_merges, identity_mechanisms, mechanism_ranks,
                                            partition_scores, rank_function, relabel)
from apdkit.stages.group.methods import (METHODS, GroupingError, GroupingInput, GroupingSettings, always_on_applies,
                                         group_pieces, module_name, splits_apply)
from apdkit.stages.progress import Reporter, SilentReporter
from apdkit.stages.seeds import generator
from apdkit.stages.selection import Gates, piece_masks, scorer_activity
from apdkit.stages.target import Target, load_from_store, matrix_settings
from apdkit.stores.run import STAGE1, TARGET, Run, RunStore, grouping_path, writer_lock


def _extra_stats(target: Target, pieces, gates: Gates, index: PieceIndex, n_extra: int, stage1_cfg: Stage1Config,
                 chunk: int, reporter: Reporter) -> CoactivationStats:
    """Statistics on ``n_extra`` new inputs, scored with the stage-1 pieces
    chunk by chunk (nothing held beyond one chunk, nothing written)."""
    _, topk = matrix_settings(target, stage1_cfg)
    gen = generator(stage1_cfg.seed, "group_samples")
    total = None
    reporter.start("collecting new samples", n_extra)
    done = 0
    while done < n_extra:
        n = min(chunk, n_extra - done)
        x = target.sample(n, gen)
        _, masks = piece_masks(target.model, x, pieces, gates, topk, stage1_cfg, gen)
        stats = coactivation_numpy(np.concatenate([masks[k].numpy() for k in index.names], axis=1))
        total = stats if total is None else total.merge(stats)
        done += n
        reporter.advance("collecting new samples", done)
    reporter.finish("collecting new samples")
    return total


def run_group(store_path: Path, cfg: GroupConfig, *, scheduler=None, force: bool = False,
              reporter: Reporter | None = None, target: Target | None = None) -> dict:
    """See _run_group_locked; holds the store's writer lock."""
    with writer_lock(store_path):
        return _run_group_locked(store_path, cfg, scheduler=scheduler, force=force, reporter=reporter, target=target)


def _run_group_locked(store_path: Path, cfg: GroupConfig, *, scheduler=None, force: bool = False,
                      reporter: Reporter | None = None, target: Target | None = None) -> dict:
    """Group stage 1's pieces; returns the grouping's summary (also stored)."""
    started = time.perf_counter()
    reporter = reporter or SilentReporter()
    run = Run(store_path)
    if run.status(STAGE1) != "done":
        raise StageError(f"{store_path} has no finished stage 1 (stage1 is {run.status(STAGE1)}): run apd stage1 first")
    run.check(TARGET, STAGE1)
    name = cfg.grouping_name
    if name in run.groupings() and not force and run.damage(grouping_path(name)) is not None:
        reporter.message(f"grouping {name!r} is damaged ({run.damage(grouping_path(name))}): redoing it")
        force = True
    if name in run.groupings() and not force:
        info = run.grouping_info(name)
        if info.get("config") != cfg.model_dump():
            raise StageError(f"grouping {name!r} exists in {store_path} with other settings: "
                             "give --name for a new one, or --force to replace it")
        reporter.message(f"grouping {name!r} already done in {store_path} (use --force to redo)")
        return info
    stage1_cfg = Stage1Config(**run.config(STAGE1))
    pieces_t = run.pieces()
    if target is None:
        try:
            target = load_from_store(run)
        except TargetError:  # a model given as a Python object: grouping needs it only for new inputs
            if (cfg.samples or 0) > run.masks()[next(iter(pieces_t))].shape[0]:
                raise
            target = None
    pieces = {n: (U.numpy(), V.numpy()) for n, (U, V) in pieces_t.items()}
    index = PieceIndex.from_sizes({n: U.shape[0] for n, (U, _) in pieces.items()})
    masks = run.eval_masks_dask(list(index.names))
    n_stored = masks.shape[0]

    n_use = cfg.samples or n_stored
    reporter.message(f"co-activation over {n_use} inputs x {index.total} pieces")
    stored_rows = min(n_use, n_stored)
    stored_stats = coactivation_dask(masks[:stored_rows], scheduler=scheduler)
    stats = stored_stats
    if n_use > n_stored:
        stats = stats.merge(_extra_stats(target, pieces_t, run.gates(), index, n_use - n_stored, stage1_cfg, cfg.chunk,
                                         reporter))

    alive = alive_pieces(stats, cfg.min_rate)
    alive_idx = np.flatnonzero(alive)
    if len(alive_idx) == 0:
        raise StageError("no piece is alive: every piece is active on fewer than min_rate of the inputs")
    if cfg.n_groups is not None and cfg.n_groups > len(alive_idx):
        raise StageError(f"--n-groups {cfg.n_groups} is more than the {len(alive_idx)} alive pieces")
    sub = stats.restrict(alive)
    methods = [m for m in METHODS if m != "leiden"] if cfg.method == "auto" else [cfg.method]
    together_min = cfg.together_min
    if together_min is None:
        together_min = TOGETHER_MIN if run.mask_rows_are_inputs() else 0.0
    settings = GroupingSettings(n_groups=cfg.n_groups, alpha=cfg.alpha, threshold=cfg.threshold,
                                resolution=cfg.resolution, together_min=together_min,
                                shared_pieces=cfg.shared_pieces, always_on=cfg.always_on, seed=cfg.seed)
    module_of = np.unique([module_name(n) for n in index.names], return_inverse=True)[1][index.matrix_of()]
    # a sample of the masks (dl_samples x alive pieces, sparse), read only where it is used: mdl's description
    # lengths, the union split, and the always-on split (which needs two modules)
    if ("mdl" in methods or splits_apply(settings)
            or (always_on_applies(settings) and len(np.unique(module_of[alive])) > 1)):
        sampled = sample_masks(masks[:stored_rows], sample_rows(stored_rows, cfg.dl_samples, cfg.seed), alive_idx,
                               scheduler=scheduler)
    else:
        sampled = sparse.csc_array((0, len(alive_idx)), dtype=np.int8)
    union_rank = rank_function(index, pieces, alive_idx, cfg.rank_rtol)
    inp = GroupingInput(sub, sampled, index.matrix_of()[alive], union_rank, module_of[alive])
    results = []
    for method in methods:
        reporter.message(f"grouping with {method}")
        try:
            labels_alive = group_pieces(method, inp, settings)
        except GroupingError as e:
            raise StageError(str(e)) from None
        labels = np.full(index.total, -1, dtype=np.int64)
        labels[alive_idx] = labels_alive
        labels = relabel(labels)
        n_groups = int(labels.max()) + 1
        ranks = mechanism_ranks(labels, index, pieces, n_groups, cfg.rank_rtol)
        activity = group_activity_counts(masks[:stored_rows], labels, n_groups, scheduler=scheduler)
        dl = description_length(activity, ranks.sum(1), cfg.alpha)
        results.append((dl, method, labels, ranks, activity))
    dl, method, labels, ranks, activity = min(results, key=lambda r: r[0])

    summary = {
        "method": method,
        "config": cfg.model_dump(),
        "n_samples": int(stats.n_samples),
        "n_alive": int(alive.sum()),
        "n_groups": int(labels.max()) + 1,
        "together_min": together_min,
        "description_length": dl,
        "description_length_per_input": dl / stored_rows,
        "ranks": {n: ranks[:, j].tolist() for j, n in enumerate(index.names)},
        "activity": activity.tolist(),
        "piece_counts": {n: c.tolist() for n, c in index.split(stored_stats.counts).items()},
        "mean_active_mechanisms": float(activity.sum() / stored_rows),
        "group_rank_histogram": {str(r): int(c) for r, c in zip(*np.unique(ranks.sum(1), return_counts=True))},
        "candidates": {m: d for d, m, *_ in results},
    }
    identities = [n for n, m in run.attrs(STAGE1)["matrices"].items() if not m["param"]]  # inserted ones
    if identities:
        ident = identity_mechanisms(index.split(labels), identities)
        for info in ident.values():
            g = info["mechanism"]
            info["active_share"] = float(activity[g] / stored_rows) if g is not None else 0.0
        summary["identity"] = ident
    if target is not None and target.has_ground_truth and target.builtin.truth_labels is not None:
        _, topk = matrix_settings(target, stage1_cfg)
        truth = target.builtin.truth_labels(target.model, pieces_t, topk, index.names)
        summary["scores"] = partition_scores(labels[alive], truth[alive])
        if target.builtin.dedicated_labels is not None:
            dedicated = target.builtin.dedicated_labels(target.model, pieces_t, topk, index.names)
            summary["scores"].update(feature_merges(labels, dedicated))
    if target is not None and target.has_ground_truth and target.builtin.mechanism_scores is not None:
        reporter.message("scoring mechanisms against the ground truth")
        _, topk = matrix_settings(target, stage1_cfg)
        summary["scores"] = target.builtin.mechanism_scores(target.model, pieces_t, index.split(labels), topk,
                                                            generator(stage1_cfg.seed, "truth"),
                                                            scorer_activity(target.model, pieces_t, run.gates(),
                                                                            stage1_cfg))
    summary["wall_seconds"] = round(time.perf_counter() - started, 3)
    store = RunStore(store_path, run.model_name)
    store.write_grouping(name, index.split(labels), **summary)
    return summary
