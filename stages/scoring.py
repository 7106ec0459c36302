"""Ground-truth scores of a rank-1 decomposition on the built-in targets.

Pure functions: a target module, factors and masks in; plain floats out.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from pipeline.config import Stage1Config
from stages.decompose import score_inputs
from stages.pieces import MaskedPiecesOp, pieces_sum
from targets.base import TargetModel

Factors = Mapping[str, tuple[Tensor, Tensor]]


def faithfulness_errors(model: TargetModel, factors: Factors) -> dict[str, float]:
    """|W - sum of pieces|_F / |W|_F per decomposed matrix."""
    out = {}
    for name, w in model.decomposed_weights().items():
        U, V = factors[name]
        out[name] = float((w.detach() - pieces_sum(U, V)).norm() / w.detach().norm())
    return out


def tms_feature_recovery(W: Tensor, U: Tensor, V: Tensor) -> dict[str, float]:
    """MMCS and ML2R of W's feature columns against the pieces' columns.

    Column j of piece c is U[c] * V[c, j]. For each feature j: the best cosine
    over pieces, and that piece's column norm over |W[:, j]|; both averaged.
    """
    cols = U[:, :, None] * V[:, None, :]  # (C, d_hidden, n_features), tiny for TMS
    W = W.detach()
    cos = (cols * W[None]).sum(1) / (cols.norm(dim=1) * W.norm(dim=0)[None]).clamp_min(1e-12)
    best_cos, best = cos.max(dim=0)
    ratio = cols.norm(dim=1).gather(0, best[None])[0] / W.norm(dim=0)
    # Shrinkage apart from splitting: sum the pieces of each feature (a piece
    # belongs to the feature its column norm is largest on; pieces under 5% of
    # the largest piece are dead) and compare that sum's column with W's.
    col_norms = cols.norm(dim=1)  # (C, n_features)
    alive = col_norms.max(dim=1).values > 0.05 * col_norms.max()
    owner = col_norms.argmax(dim=1)
    grouped = torch.stack([
        (cols[(owner == j) & alive, :, j]).sum(0) for j in range(W.shape[1])
    ], dim=1)  # (d_hidden, n_features)
    grouped_ratio = grouped.norm(dim=0) / W.norm(dim=0)
    grouped_cos = (grouped * W).sum(0) / (grouped.norm(dim=0) * W.norm(dim=0)).clamp_min(1e-12)
    return {"mmcs": float(best_cos.mean()), "ml2r": float(ratio.mean()),
            "min_cos": float(best_cos.min()), "grouped_mmcs": float(grouped_cos.mean()),
            "grouped_ml2r": float(grouped_ratio.mean())}


def one_hot_probe(model: TargetModel, factors: Factors, cfg: Stage1Config, value: float = 1.0):
    """Scores, masks and active-piece outputs on the one-hot inputs value * e_i.
    Batch top-k runs over the n probes together, with at least one active
    piece per probe and matrix (k = max(1, k)): each probe holds one feature."""
    n = model.n_features
    x = torch.eye(n) * value
    topk = cfg.topk
    probe_topk = {k: max(1.0, v) for k, v in topk.items()} if isinstance(topk, dict) else max(1.0, topk)
    scores, masks = score_inputs(model, x, factors, cfg.model_copy(update={"batch_size": n, "topk": probe_topk}))
    with torch.no_grad():
        target = model(x)
        ops = {k: MaskedPiecesOp(U, V, masks[k].to(x.dtype)) for k, (U, V) in factors.items()}
        active_out = model.run(x, ops).output
    per_feature_mse = ((active_out - target) ** 2).mean(dim=1)
    return scores, masks, per_feature_mse


def dedicated_pieces(scores: Tensor, masks: Tensor) -> Tensor:
    """For each one-hot input i (row), whether some piece is active on i and on
    no other one-hot input. Returns a bool vector over features."""
    only_here = masks & (masks.sum(dim=0, keepdim=True) == 1)
    return only_here.any(dim=1)


def stage1_scores(model: TargetModel, family: str, factors: Factors, cfg: Stage1Config,
                  active_counts: Mapping[str, Tensor], n_eval: int) -> dict[str, float]:
    """All built-in scores of a finished stage 1, as a flat name -> float map.
    ``active_counts[name][c]``: on how many of the ``n_eval`` evaluation inputs
    piece c was active."""
    out: dict[str, float] = {}
    for name, err in faithfulness_errors(model, factors).items():
        out[f"faithfulness_rel_error/{name}"] = err
    out["mean_active_pieces"] = sum(int(c.sum()) for c in active_counts.values()) / n_eval
    for name, counts in active_counts.items():
        out[f"alive_pieces/{name}"] = float((counts > 0).sum())
    if family == "tms":
        U, V = factors["W"]
        out.update({f"tms/{k}": v for k, v in tms_feature_recovery(model.W, U, V).items()})
    if family == "resid_mlp":
        for value in (1.0, 0.75):
            scores, masks, mse = one_hot_probe(model, factors, cfg, value)
            tag = f"one_hot_{value:g}"
            out[f"resid/{tag}/mean_output_mse"] = float(mse.mean())
            out[f"resid/{tag}/max_output_mse"] = float(mse.max())
            if value == 1.0:
                for name in factors:
                    if name.endswith("W_in"):
                        out[f"resid/dedicated_features/{name}"] = float(dedicated_pieces(scores[name], masks[name]).sum())
    return out
