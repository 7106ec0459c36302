"""Toy models of superposition (tms_5-2, tms_40-10, their +ID variants, and
tms_6-3-synced): model, data, training, ground truth and figures."""

from __future__ import annotations

from apdkit.targets.spec import TargetSpec
from apdkit.targets.tms import figures, model, scoring


def spec(name: str, n: int, m: int, identity: bool, batch: int, steps: int, stage1: dict, **extra) -> TargetSpec:
    return TargetSpec(
        name=name, build=model.build,
        arch={"n_features": n, "d_hidden": m, "hidden_identity": identity, **extra},
        train={"lr": 5e-3, "weight_decay": 0.01, "batch": batch, "steps": steps, "warmup": 0.0, "schedule": "constant"},
        sample=model.sample, fit=model.fit, check=model.check,
        modules=("W", "W_T", "hidden") if identity else ("W", "W_T"),
        stage1=stage1, fast_sites=model.fast_sites,
        scores=scoring.scores, truth_labels=scoring.truth_labels,
        dedicated_labels=scoring.dedicated_labels, figures=figures.figures,
        # every feature's column found (SPD publishes 1.000 on all four) at its length (split pieces
        # summed; SPD publishes ML2R near 1.0); the identity summed up
        criteria={"tms/mmcs": 0.99, "tms/grouped_ml2r": 0.9},
        criteria_max={"tms/grouped_ml2r": 1.1, **({"faithfulness_rel_error/hidden": 0.01} if identity else {})},
    )
