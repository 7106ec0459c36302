"""Stage 3: re-check a grouping independently of how it was trained.

- faithfulness: the mechanisms, with the pieces set aside as dead, sum to the
  target's weights (relative error per matrix; parameters that are not
  decomposed are the target's own), and the pieces set aside as dead do not
  matter: with every mechanism on and them off, the output stays within
  set_aside_error_max of the target (per matrix, their share of its norm and
  the output error with only that matrix's set-aside pieces off are reported);
- minimality: on fresh inputs, mechanisms are attributed as wholes, the
  batch top-k of them is kept, and the model run with only those is compared
  with the target, next to the same figures for the stage-1 pieces;
- simplicity: each mechanism's numerical rank per matrix and the description
  length, next to the description length of the ungrouped pieces; no
  mechanism may be a union (mechanisms.split_unions would split it);
- stochastic, resample, adversarial: with an input's top-k mechanisms on,
  the others at random values, at another input's choice, or at the worst
  values a projected gradient search finds (core/inactive.py); the
  adversarial figure is reported beside the typical (stochastic) one.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from apdkit.core.inactive import adversarial_masks, mechanism_output_error, resample_masks, stochastic_masks
from apdkit.core.pieces import membership_matrices, pieces_sum
from apdkit.stages.config import GroupConfig, Stage1Config, VerifyConfig
from apdkit.stages.device import resolve_device
from apdkit.stages.errors import StageError
from apdkit.stages.group.coactivation import PieceIndex, sample_masks, sample_rows
from apdkit.stages.group.mechanisms import (description_length, identity_mechanisms, mechanism_ranks, rank_function,
                                            union_mechanisms)
from apdkit.stages.group.methods import ALWAYS_TOGETHER
from apdkit.stages.progress import Reporter, SilentReporter
from apdkit.stages.seeds import generator
from apdkit.stages.selection import mechanism_masks, piece_masks, scorer_activity
from apdkit.stages.target import Target, load_from_store, matrix_settings
from apdkit.stores.run import STAGE1, TARGET, Run, RunStore, grouping_path, writer_lock


USED_SHARE = 0.01  # a mechanism is "used" on an input where its attribution is at least this share of the largest


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


def run_verify(store_path: Path, cfg: VerifyConfig, reporter: Reporter | None = None,
               target: Target | None = None, device: str = "auto") -> dict:
    """See _run_verify_locked; holds the store's writer lock. ``device``
    (auto, cpu, cuda) is where the checks compute; it changes no verdict."""
    dev = resolve_device(device)
    with writer_lock(store_path):
        return _run_verify_locked(store_path, cfg, reporter=reporter, target=target, device=dev)


@torch.no_grad()
def _run_verify_locked(store_path: Path, cfg: VerifyConfig, reporter: Reporter | None = None,
                       target: Target | None = None, device: torch.device = torch.device("cpu")) -> dict:
    started = time.perf_counter()
    reporter = reporter or SilentReporter()
    run = Run(store_path)
    if run.status(STAGE1) != "done":
        raise StageError(f"{store_path} has no finished stage 1: run apd stage1 first")
    name = choose_grouping(run, cfg.grouping)
    run.check(TARGET, STAGE1, grouping_path(name))
    info = run.grouping_info(name)
    labels = run.grouping(name)
    stage1_cfg = Stage1Config(**run.config(STAGE1))
    group_cfg = GroupConfig(**info["config"])
    if target is None:
        target = load_from_store(run)
    model = target.model
    _, topk = matrix_settings(target, stage1_cfg)
    pieces = run.pieces()
    n_groups = int(info["n_groups"])

    # faithfulness: mechanisms plus the set-aside (dead) pieces must give W;
    # how much of W sits in pieces no input uses is reported beside it
    faith, unused = {}, {}
    for matrix, w in model.weights().items():
        U, V = pieces[matrix]
        dead = torch.from_numpy(labels[matrix] < 0)
        faith[matrix] = float((w - pieces_sum(U, V)).norm() / w.norm())
        unused[matrix] = float(pieces_sum(U[dead], V[dead]).norm() / w.norm())

    model.to(device)
    pieces_on = {n: (U.to(device), V.to(device)) for n, (U, V) in pieces.items()}
    gates_on = {n: {k: t.to(device) for k, t in g.items()} for n, g in run.gates().items()}
    membership = {n: m.to(device) for n, m in membership_matrices(labels, n_groups).items()}
    k_mech = float(info["mean_active_mechanisms"])
    if cfg.attribution is not None and stage1_cfg.minimality == "learned":
        raise StageError("--attribution does not apply: this store's stage 1 learned gates (minimality learned)")
    method = cfg.attribution or stage1_cfg.attribution

    gen = generator(stage1_cfg.seed, "verify", cfg.seed)
    sums = {"pieces_mse": 0.0, "mech_mse": 0.0, "ablated_mse": 0.0, "all_mech_mse": 0.0,
            "pieces_active": 0.0, "mech_active": 0.0,
            "stochastic_mse": 0.0, "resample_mse": 0.0, **{f"set_aside_mse/{p}": 0.0 for p in pieces}}
    # adversarial search on the first inputs only: per row, worst and typical (stochastic) error, ablated error
    adv = {"worst": [], "typical": [], "ablated": []}
    adv_inputs = 0
    n_rows = 0
    mech_counts = torch.zeros(n_groups, device=device)  # rows on which each mechanism is in the top-k
    mech_used = torch.zeros(n_groups, device=device)  # rows on which its attribution is >= USED_SHARE of the largest
    zero_masks = {n: torch.zeros(1, U.shape[0], device=device) for n, (U, V) in pieces.items()}
    n_samples = cfg.samples or stage1_cfg.eval_samples
    reporter.start("verifying on fresh inputs", n_samples)
    done = 0
    while done < n_samples:
        n = min(stage1_cfg.batch_size, n_samples - done)
        x = target.sample(n, gen).to(device)
        target_out = model.forward(x).output
        rows = target_out.shape[0]
        zero_out = model.run(x, pieces_on, {k: m.expand(rows, -1) for k, m in zero_masks.items()}).output
        # stage-1 pieces, as trained
        _, p_masks = piece_masks(model, x, pieces_on, gates_on, topk, stage1_cfg, gen, method)
        out_p = model.run(x, pieces_on, {k: m.float() for k, m in p_masks.items()}).output
        # mechanisms, attributed as wholes (or gated: by their largest piece gate)
        mech_scores, mech_mask = mechanism_masks(model, x, pieces_on, gates_on, membership, k_mech, stage1_cfg, gen,
                                                 method)
        mech_mask = mech_mask.float()
        out_m = model.run(x, pieces_on, {k: mech_mask @ membership[k].T for k in pieces}).output
        zero_err = ((zero_out - target_out) ** 2).mean(dim=1)
        # every mechanism on, the set-aside pieces off: what the weight no input uses does to the output
        alive_on = {k: m.sum(1).unsqueeze(0).expand(rows, -1) for k, m in membership.items()}
        all_on = model.run(x, pieces_on, alive_on).output
        sums["all_mech_mse"] += float(((all_on - target_out) ** 2).mean()) * rows
        # one matrix's set-aside pieces off, every other piece on: a share of the norm can mislead (small
        # pieces can matter, large ones cancel), so each matrix's effect on the output is reported
        # (a matrix with no set-aside pieces gives the every-piece-on error, run once for all of them)
        every_on = {k: torch.ones(rows, U.shape[0], device=device) for k, (U, V) in pieces_on.items()}
        none_set_aside = [k for k in pieces_on if bool(alive_on[k].all())]
        if none_set_aside:
            every_err = float(((model.run(x, pieces_on, every_on).output - target_out) ** 2).mean()) * rows
        for k in pieces_on:
            if k in none_set_aside:
                sums[f"set_aside_mse/{k}"] += every_err
                continue
            only_k = model.run(x, pieces_on, {**every_on, k: alive_on[k]}).output
            sums[f"set_aside_mse/{k}"] += float(((only_k - target_out) ** 2).mean()) * rows
        for _ in range(cfg.stochastic_samples):
            stoch_err = mechanism_output_error(model, x, pieces_on, membership, stochastic_masks(mech_mask, gen),
                                               target_out)
            resample_err = mechanism_output_error(model, x, pieces_on, membership, resample_masks(mech_mask, gen),
                                                  target_out)
            sums["stochastic_mse"] += float(stoch_err.mean()) * rows / cfg.stochastic_samples
            sums["resample_mse"] += float(resample_err.mean()) * rows / cfg.stochastic_samples
        adv_rows = sum(len(w) for w in adv["worst"])
        if cfg.adversarial_steps and adv_rows < cfg.adversarial_rows:
            per_input = rows // n
            n_inputs = min(n, max(1, (cfg.adversarial_rows - adv_rows) // per_input))
            keep = n_inputs * per_input  # whole inputs: every position of a sequence
            adv_inputs += n_inputs
            xa, ta, ma = x[:n_inputs], target_out[:keep], mech_mask[:keep]
            _, worst = adversarial_masks(model, xa, pieces_on, membership, ma, ta, cfg.adversarial_steps,
                                         cfg.adversarial_step_size, gen)
            adv["worst"].append(worst)
            adv["typical"].append(mechanism_output_error(model, xa, pieces_on, membership, stochastic_masks(ma, gen), ta))
            adv["ablated"].append(zero_err[:keep])
        sums["pieces_mse"] += float(((out_p - target_out) ** 2).mean()) * rows
        sums["mech_mse"] += float(((out_m - target_out) ** 2).mean()) * rows
        sums["ablated_mse"] += float(((zero_out - target_out) ** 2).mean()) * rows
        sums["pieces_active"] += float(sum(m.sum() for m in p_masks.values()))
        sums["mech_active"] += float(mech_mask.sum())
        mech_counts += mech_mask.sum(0)
        mech_used += (mech_scores >= USED_SHARE * mech_scores.max(dim=1, keepdim=True).values.clamp_min(1e-30)).sum(0)
        n_rows += rows
        done += n
        reporter.advance("verifying on fresh inputs", done)
    reporter.finish("verifying on fresh inputs")
    model.to(torch.device("cpu"))
    mech_counts, mech_used = mech_counts.cpu(), mech_used.cpu()
    avg = {k: v / n_rows for k, v in sums.items()}

    index = PieceIndex.from_sizes({p: len(lab) for p, lab in labels.items()})
    flat_labels = np.concatenate([labels[p] for p in index.names])
    np_pieces = {p: (U.numpy(), V.numpy()) for p, (U, V) in pieces.items()}
    ranks = mechanism_ranks(flat_labels, index, np_pieces, n_groups, group_cfg.rank_rtol)
    activity = np.asarray(info["activity"])
    dl = description_length(activity, ranks.sum(1), group_cfg.alpha)
    # description lengths are on stage 1's stored inputs, where stage 2 counted activity
    piece_counts = np.concatenate([np.asarray(info["piece_counts"][p]) for p in index.names])
    alive_counts = piece_counts[flat_labels >= 0]
    dl_pieces = description_length(alive_counts, np.ones_like(alive_counts), group_cfg.alpha)
    n_eval = run.masks()[index.names[0]].shape[0]
    # unions: mechanisms that would be described in fewer bits as two (one class of twin pieces taken out),
    # on the sample of stage 1's stored inputs that grouping used. Not where rows are a sequence's positions:
    # there one head's query and key pieces fire at different positions (as for grouping's apart rule)
    unions = None
    if run.mask_rows_are_inputs():
        alive_cols = np.flatnonzero(flat_labels >= 0)
        stored = sample_masks(run.eval_masks_dask(list(index.names)),
                              sample_rows(n_eval, group_cfg.dl_samples, group_cfg.seed), alive_cols)
        unions = union_mechanisms(flat_labels[alive_cols], stored,
                                  rank_function(index, np_pieces, alive_cols, group_cfg.rank_rtol), group_cfg.alpha,
                                  ALWAYS_TOGETHER)

    ablated = max(avg["ablated_mse"], 1e-30)
    checks = {
        "faithfulness": {
            "passed": (all(e <= cfg.faithfulness_max for e in faith.values())
                       and avg["all_mech_mse"] / ablated <= cfg.set_aside_error_max),
            "figures": {**{f"rel_error/{p}": e for p, e in faith.items()},
                        **{f"set_aside_share/{p}": e for p, e in unused.items()},
                        **{f"set_aside_effect/{p}": avg[f"set_aside_mse/{p}"] / ablated for p in unused},
                        "set_aside/fraction_of_ablated": avg["all_mech_mse"] / ablated},
            "threshold": (f"each rel_error <= {cfg.faithfulness_max}; every mechanism on and the set-aside pieces off: "
                          f"fraction_of_ablated <= {cfg.set_aside_error_max}"),
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
            "passed": dl <= dl_pieces and not unions,
            "figures": {
                "description_length_per_input": dl / n_eval,
                "pieces_description_length_per_input": dl_pieces / n_eval,
                **({} if unions is None else {"unions": len(unions)}),
                "max_mechanism_rank": int(ranks.sum(1).max()) if n_groups else 0,
                **{f"mechanisms_of_rank/{r}": int(c) for r, c in zip(*np.unique(ranks.sum(1), return_counts=True))},
            },
            "threshold": ("description length <= that of the ungrouped pieces, and no mechanism is a union (taking "
                          "one class of pieces that fire together out of it as a mechanism of its own does not "
                          "shorten the description; not checked where rows are a sequence's positions)"),
        },
    }
    if cfg.stochastic_samples:
        for check, key in (("stochastic", "stochastic_mse"), ("resample", "resample_mse")):
            checks[check] = {
                "passed": avg[key] / ablated <= cfg.output_error_max,
                "figures": {"output_mse": avg[key], "fraction_of_ablated": avg[key] / ablated,
                            "draws_per_input": cfg.stochastic_samples},
                "threshold": f"fraction_of_ablated <= {cfg.output_error_max}",
            }
    if adv["worst"]:
        worst, typical, abl = (torch.cat(adv[k]).cpu() for k in ("worst", "typical", "ablated"))
        abl_mean = max(float(abl.mean()), 1e-30)
        checks["adversarial"] = {
            "passed": float(worst.mean()) / abl_mean <= cfg.adversarial_error_max,
            "figures": {
                "fraction_of_ablated": float(worst.mean()) / abl_mean,
                "typical/fraction_of_ablated": float(typical.mean()) / abl_mean,
                "worst_over_typical": float(worst.mean()) / max(float(typical.mean()), 1e-30),
                "worst_input/fraction_of_ablated": float(worst.max()) / abl_mean,
                "steps": cfg.adversarial_steps,
                "inputs": adv_inputs,
                "rows": len(worst),
            },
            "threshold": (f"fraction_of_ablated at the worst masks found <= {cfg.adversarial_error_max} "
                          "(typical: random masks of the same inactive mechanisms)"),
        }
    if model.identities:
        ident = identity_mechanisms(labels, list(model.identities))
        used = {n: float(mech_used[i["mechanism"]] / n_rows) if i["mechanism"] is not None else 0.0
                for n, i in ident.items()}
        in_topk = {n: float(mech_counts[i["mechanism"]] / n_rows) if i["mechanism"] is not None else 0.0
                   for n, i in ident.items()}
        checks["identity"] = {
            "passed": all(i["one_mechanism"] and i["exclusive"] and used[n] >= cfg.identity_active_min
                          for n, i in ident.items()),
            "figures": {**{f"mechanisms/{n}": i["n_mechanisms"] for n, i in ident.items()},
                        **{f"exclusive/{n}": int(i["exclusive"]) for n, i in ident.items()},
                        **{f"used_share/{n}": used[n] for n in ident},
                        **{f"topk_share/{n}": in_topk[n] for n in ident}},
            "threshold": (f"each inserted identity is one mechanism of its own, used (attribution >= {USED_SHARE} of "
                          f"the input's largest) on >= {cfg.identity_active_min} of inputs"),
        }
    result = {"grouping": name, "attribution": method if stage1_cfg.minimality == "topk" else "learned gates",
              "samples": n_samples, "passed": all(c["passed"] for c in checks.values()),
              "checks": checks, "config": cfg.model_dump()}
    if target.has_ground_truth and target.builtin.mechanism_scores is not None:
        # on fresh inputs, beside the checks: ground truth is not a verdict on a user's model
        reporter.message("scoring mechanisms against the ground truth on fresh inputs")
        result["truth"] = target.builtin.mechanism_scores(model, pieces, labels, topk, generator(stage1_cfg.seed, "truth",
                                                                                           1 + cfg.seed),
                                                          scorer_activity(model, pieces, run.gates(), stage1_cfg))
    result["wall_seconds"] = round(time.perf_counter() - started, 3)
    RunStore(store_path, run.model_name).write_verify(name, result)
    return result
