"""Residual MLPs (resid_mlp, resid_mlp2, resid_mlp3): model, data, training,
ground truth and figures."""

from __future__ import annotations

from apdkit.targets.resid_mlp import figures, model, scoring
from apdkit.targets.spec import TargetSpec


def spec(name: str, n: int, d_mlp: int, layers: int, steps: int, stage1: dict) -> TargetSpec:
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
