"""tiny_lm: a small byte-level GPT trained on the Python standard library's
source; no ground truth, scored as language models are (L0, cross-entropy)."""

from __future__ import annotations

from apdkit.targets.spec import TargetSpec
from apdkit.targets.tiny_lm import model, scoring


def spec(name: str, arch: dict, train: dict, stage1: dict) -> TargetSpec:
    return TargetSpec(
        name=name, build=model.build, arch=arch, train=train,
        sample=model.sample, fit=model.fit, check=model.check,
        modules=("blocks.*.fc_in", "blocks.*.fc_out"), output=None,
        stage1=stage1, scores=scoring.scores, mechanism_scores=scoring.mechanism_scores,
        criteria={"tiny_lm/ce_recovered": 0.9},
    )
