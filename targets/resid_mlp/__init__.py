"""Residual MLPs (resid_mlp, resid_mlp2, resid_mlp3): model, data, training,
ground truth and figures."""

from __future__ import annotations

from apdkit.targets.resid_mlp import figures, model, scoring
from apdkit.targets.spec import TargetSpec


def spec(name: str, n: int, d_mlp: int, layers: int, steps: int, stage1: dict,
         whole_w_out: bool = False) -> TargetSpec:
    """``whole_w_out``: each W_out as d_mlp pieces with top-k d_mlp, so every
    piece that acts on an input is kept and every input uses the whole matrix
    (SPD's answer for W_out); W_in keeps the ``n_pieces`` and ``topk`` of
    ``stage1``."""
    if whole_w_out:
        def per_matrix(w_in, w_out):
            return {f"layers.{i}.{m}": v for i in range(layers) for m, v in (("W_in", w_in), ("W_out", w_out))}
        stage1 = dict(stage1, n_pieces=per_matrix(stage1["n_pieces"], d_mlp),
                      topk=per_matrix(stage1["topk"], float(d_mlp)))
    return TargetSpec(
        name=name, build=model.build,
        arch={"n_features": n, "d_embed": 1000, "d_mlp": d_mlp, "n_layers": layers},
        train={"lr": 3e-3, "weight_decay": 0.01, "batch": 2048, "steps": steps, "warmup": 0.0, "schedule": "cosine"},
        sample=model.sample, fit=model.fit, check=model.check,
        modules=("layers.*.W_in", "layers.*.W_out"), hidden=("layers.*.act",),
        stage1=stage1, fast_sites=model.fast_sites,
        scores=scoring.scores, truth_labels=scoring.truth_labels,
        dedicated_labels=scoring.dedicated_labels, figures=figures.figures,
        criteria={"resid/dedicated_features": 98.0},  # of 100 (102 for resid_mlp3), in any layer
    )
