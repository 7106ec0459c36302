"""The induction target: a 2-layer attention-only transformer with a known
previous-token head and induction head (model, data, training, ground truth)."""

from __future__ import annotations

from apdkit.targets.induction import model, scoring
from apdkit.targets.spec import TargetSpec


def spec(name: str, arch: dict, train: dict, stage1: dict, group: dict | None = None) -> TargetSpec:
    return TargetSpec(
        name=name, build=model.build, arch=arch, train=train,
        sample=model.sample, fit=model.fit, check=model.check,
        modules=("layers.*.q", "layers.*.k", "layers.*.v", "layers.*.o"),
        stage1=stage1, group=dict(group or {}), scores=scoring.scores, mechanism_scores=scoring.mechanism_scores,
        criteria={f"induction/{f}/recovered": 1.0 for f in scoring.FUNCTIONS},
    )
