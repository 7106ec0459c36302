"""What the pipeline knows about a built-in target: an ordinary nn.Module
factory plus its data, training recipe, health check, which layers are
decomposed, and (optionally) a closed-form attribution path, ground-truth
scores and report figures. Each toy's folder builds one of these."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class HealthReport:
    healthy: bool
    summary: str
    figures: dict[str, float]


@dataclass(frozen=True)
class TargetSpec:
    """``arch`` holds the factory's arguments (JSON-able), so a stored spec
    rebuilds the module; ``train`` is the target-training recipe; ``stage1``
    and ``group`` the toy's stage-1 and grouping defaults (over the generic
    ones)."""

    name: str
    build: Callable[..., nn.Module]
    arch: dict[str, Any]
    train: dict[str, Any]
    sample: Callable[[nn.Module, int, torch.Generator], Tensor]
    fit: Callable[[nn.Module, dict, torch.Generator, Callable[[int, float], None] | None], float]
    check: Callable[[nn.Module, torch.Generator], HealthReport]
    modules: tuple[str, ...]
    output: str | None = None
    hidden: tuple[str, ...] = ()
    stage1: dict[str, Any] = field(default_factory=dict)
    group: dict[str, Any] = field(default_factory=dict)
    fast_sites: Callable | None = None
    # Ground truth, for toys that have one (see targets/tms/scoring.py):
    # scores(model, pieces, topk, active=None) -> {name: float}; truth_labels(model, pieces, topk, names) -> labels.
    # active (core/masks.py Activity): the pieces each row uses as the run decides it (learned gates), for the
    # scores that run the model on its active pieces (induction, tiny_lm); None: the batch top-k at topk. The toys'
    # one-hot probes keep their own top-k in both modes (targets/probes.py), so they take and ignore it
    scores: Callable | None = None
    truth_labels: Callable | None = None
    # dedicated_labels(model, pieces, topk, names) -> (P,) the feature each piece alone serves, -1 if none
    dedicated_labels: Callable | None = None
    # mechanism_scores(model, pieces, labels {matrix: (C,) int}, topk, generator, active=None) -> {name: float}: a
    # grouping's ground-truth scores, for targets whose answer is about mechanisms (induction, modadd, tiny_lm)
    mechanism_scores: Callable | None = None
    figures: Callable | None = None  # figures(model, pieces, labels, n_groups) -> [(title, html)]
    # {score name: the least value that meets the target's recovery criterion}; every
    # output that prints a score flags one that misses it
    criteria: dict[str, float] = field(default_factory=dict)
    # {score name: the largest value that meets it} (errors)
    criteria_max: dict[str, float] = field(default_factory=dict)

    def make(self) -> nn.Module:
        return self.build(**self.arch)


def missed_criteria(scores: dict[str, float], criteria: dict[str, float],
                    criteria_max: dict[str, float] | None = None) -> list[str]:
    """One line per score below its criterion, or above its ``criteria_max``
    one (scores not given are skipped)."""
    low = [f"{k} = {scores[k]:.4g} misses its criterion >= {v:g}" for k, v in criteria.items()
           if k in scores and scores[k] < v]
    high = [f"{k} = {scores[k]:.4g} misses its criterion <= {v:g}" for k, v in (criteria_max or {}).items()
            if k in scores and scores[k] > v]
    return low + high
