"""Modular addition: an MLP that generalises with a few key Fourier
frequencies (model, data, training, ground truth)."""

from __future__ import annotations

from apdkit.targets.modadd import model, scoring
from apdkit.targets.spec import TargetSpec


def spec(name: str, arch: dict, train: dict, stage1: dict) -> TargetSpec:
    return TargetSpec(
        name=name, build=model.build, arch=arch, train=train,
        sample=model.sample, fit=model.fit, check=model.check,
        modules=("embed", "W_in", "W_out"),
        stage1=stage1, scores=scoring.scores, mechanism_scores=scoring.mechanism_scores,
        criteria={"modadd/dedicated_key_fraction": 1.0, "modadd/mean_purity": 0.9},
    )
