"""Stage 3: re-check a grouping independently of how it was trained.

- faithfulness: the mechanisms, with the pieces set aside as dead, sum to the
  target's weights (relative error per matrix; parameters that are not
  decomposed are the target's own); the dead pieces' share is reported;
- minimality: on fresh inputs, mechanisms are attributed as wholes, the
  batch top-k of them is kept, and the model run with only those is compared
  with the target, next to the same figures for the stage-1 pieces;
- simplicity: each mechanism's numerical rank per matrix and the description
  length, next to the description length of the ungrouped pieces.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.config import GroupConfig, Stage1Config, VerifyConfig
from stages.attributions import mechanism_attributions
from stages.decompose import score_inputs
from stages.errors import StageError
from stages.mechanisms import description_length, mechanism_ranks, membership_matrices
from stages.coactivation import PieceIndex
from stages.pieces import MaskedPiecesOp, batch_topk_mask, pieces_sum
from stages.progress import Reporter, SilentReporter
from stores.run import STAGE1, Run, RunStore
from targets.registry import get_target

FRESH_SEED_OFFSET = 17  # verification inputs: a stream neither stage has seen


def choose_grouping(run: Run, name: str | None) -> str:
    have = run.groupings()
    if name is not None:
        if name not in have:
            raise StageError(f"{run.path} has no finished grouping {name!r} (has: {', '.join(have) or 'none'}); run apd group first")
        return name
    if not have:
        raise StageError(f"{run.path} has no grouping to verify: run apd group first")
    if len(have) > 1:
        raise StageError(f"{run.path} has several groupings ({', '.join(have)}): choose one with --method")
    return have[0]


def _output_errors(model, x, ops, target_out, zero_out) -> tuple[float, float]:
    out = model.run(x, ops).output
    mse = float(((out - target_out) ** 2).mean())
    return mse, float(((zero_out - target_out) ** 2).mean())


@torch.no_grad()
def run_verify(store_path: Path, cfg: VerifyConfig, reporter: Reporter | None = None) -> dict:
    reporter = reporter or SilentReporter()
    run = Run(store_path)
    if run.status(STAGE1) != "done":
        raise StageError(f"{store_path} has no finished stage 1: run apd stage1 first")
    name = choose_grouping(run, cfg.grouping)
    info = run.grouping_info(name)
    labels = run.grouping(name)
    stage1_cfg = Stage1Config(**run.config(STAGE1))
    group_cfg = GroupConfig(**info["config"])
    model = run.target()
    spec = get_target(run.model_name)
    factors = run.subcomponents()
    n_groups = int(info["n_groups"])

    # faithfulness: mechanisms plus the set-aside (dead) pieces must give W;
    # how much of W sits in pieces no input uses is reported beside it
    faith, unused = {}, {}
    for param, w in model.decomposed_weights().items():
        U, V = factors[param]
        dead = torch.from_numpy(labels[param] < 0)
        faith[param] = float((w - pieces_sum(U, V)).norm() / w.norm())
        unused[param] = float(pieces_sum(U[dead], V[dead]).norm() / w.norm())

    membership = membership_matrices(labels, n_groups)
    k_mech = float(info["mean_active_mechanisms"])

    gen = torch.Generator().manual_seed(stage1_cfg.seed + FRESH_SEED_OFFSET + cfg.seed)
    sums = {"pieces_mse": 0.0, "mech_mse": 0.0, "ablated_mse": 0.0, "pieces_active": 0.0, "mech_active": 0.0}
    zero_ops = {p: MaskedPiecesOp(U, V, torch.zeros(1, U.shape[0])) for p, (U, V) in factors.items()}
    reporter.start("verifying on fresh inputs", cfg.samples)
    done = 0
    while done < cfg.samples:
        n = min(stage1_cfg.batch_size, cfg.samples - done)
        x = spec.sample(model, n, gen)
        # stage-1 pieces, as trained
        _, piece_masks = score_inputs(model, x, factors, stage1_cfg)
        target_out = model(x)
        zero_out = model.run(x, zero_ops).output
        piece_ops = {p: MaskedPiecesOp(U, V, piece_masks[p].float()) for p, (U, V) in factors.items()}
        mse_p, mse_0 = _output_errors(model, x, piece_ops, target_out, zero_out)
        # mechanisms, attributed as wholes
        mech_scores, _ = mechanism_attributions(model, x, factors, membership)
        mech_mask = batch_topk_mask(mech_scores, k_mech).float()
        mech_ops = {p: MaskedPiecesOp(U, V, mech_mask @ membership[p].T) for p, (U, V) in factors.items()}
        mse_m, _ = _output_errors(model, x, mech_ops, target_out, zero_out)
        sums["pieces_mse"] += mse_p * n
        sums["mech_mse"] += mse_m * n
        sums["ablated_mse"] += mse_0 * n
        sums["pieces_active"] += float(sum(m.sum() for m in piece_masks.values()))
        sums["mech_active"] += float(mech_mask.sum())
        done += n
        reporter.advance("verifying on fresh inputs", done)
    reporter.finish("verifying on fresh inputs")
    avg = {k: v / cfg.samples for k, v in sums.items()}

    index = PieceIndex.from_sizes({p: len(lab) for p, lab in labels.items()})
    flat_labels = np.concatenate([labels[p] for p in index.names])
    np_factors = {p: (U.numpy(), V.numpy()) for p, (U, V) in factors.items()}
    ranks = mechanism_ranks(flat_labels, index, np_factors, n_groups, group_cfg.rank_rtol)
    activity = np.asarray(info["activity"])
    dl = description_length(activity, ranks.sum(1), group_cfg.alpha)
    # description lengths are on stage 1's stored inputs, where stage 2 counted activity
    piece_counts = np.concatenate([np.asarray(info["piece_counts"][p]) for p in index.names])
    alive_counts = piece_counts[flat_labels >= 0]
    dl_pieces = description_length(alive_counts, np.ones_like(alive_counts), group_cfg.alpha)
    n_eval = run.masks()[index.names[0]].shape[0]

    ablated = max(avg["ablated_mse"], 1e-30)
    checks = {
        "faithfulness": {
            "passed": all(e <= cfg.faithfulness_max for e in faith.values()),
            "figures": {**{f"rel_error/{p}": e for p, e in faith.items()},
                        **{f"set_aside_share/{p}": e for p, e in unused.items()}},
            "threshold": f"each rel_error <= {cfg.faithfulness_max}",
        },
        "minimality": {
            "passed": (avg["mech_mse"] / ablated <= cfg.output_error_max
                       and avg["mech_mse"] <= cfg.versus_pieces_max * avg["pieces_mse"]),
            "figures": {
                "mechanisms/output_mse": avg["mech_mse"],
                "mechanisms/fraction_of_ablated": avg["mech_mse"] / ablated,
                "mechanisms/mean_active": avg["mech_active"],
                "pieces/output_mse": avg["pieces_mse"],
                "pieces/fraction_of_ablated": avg["pieces_mse"] / ablated,
                "pieces/mean_active": avg["pieces_active"],
                "ablated/output_mse": avg["ablated_mse"],
            },
            "threshold": (f"mechanisms' fraction_of_ablated <= {cfg.output_error_max} and "
                          f"<= {cfg.versus_pieces_max} x the pieces'"),
        },
        "simplicity": {
            "passed": dl <= dl_pieces,
            "figures": {
                "description_length_per_input": dl / n_eval,
                "pieces_description_length_per_input": dl_pieces / n_eval,
                "max_mechanism_rank": int(ranks.sum(1).max()) if n_groups else 0,
                **{f"mechanisms_of_rank/{r}": int(c) for r, c in zip(*np.unique(ranks.sum(1), return_counts=True))},
            },
            "threshold": "description length <= that of the ungrouped pieces",
        },
    }
    result = {"grouping": name, "samples": cfg.samples, "passed": all(c["passed"] for c in checks.values()),
              "checks": checks, "config": cfg.model_dump()}
    RunStore(store_path, run.model_name).write_verify(name, result)
    return result
