"""The whole pipeline into one store: target, stage 1, grouping, verify.
Each stage is skipped when finished and resumes when interrupted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from apdkit.stages.config import GroupConfig, Stage1Config, VerifyConfig
from apdkit.stages.group.stage import run_group
from apdkit.stages.progress import Reporter, SilentReporter
from apdkit.stages.stage1.stage import run_stage1
from apdkit.stages.target import load_from_store
from apdkit.stages.verify.stage import run_verify
from apdkit.stores.run import Run
from apdkit.targets.load import TargetRef, build_module


def run_pipeline(store_path: Path, ref: TargetRef, stage1_cfg: Stage1Config, group_cfg: GroupConfig,
                 verify_cfg: VerifyConfig, reporter: Reporter | None = None, module: nn.Module | None = None,
                 data: Any = None, force: bool = False, on_metrics=None) -> dict:
    """Returns the verify result of the pipeline's grouping. ``force`` reruns
    every stage (the target is kept)."""
    reporter = reporter or SilentReporter()
    source = "given"
    if module is None and ref.builtin is None:  # build a user's model once, for every stage
        module, source = build_module(ref), ref.model
    run_stage1(store_path, ref, stage1_cfg, module=module, data=data, force=force, reporter=reporter,
               on_metrics=on_metrics, source=source)
    target = load_from_store(Run(store_path), module=module, data=data)
    run_group(store_path, group_cfg, reporter=reporter, target=target, force=force)
    name = group_cfg.grouping_name
    verify_cfg = verify_cfg.model_copy(update={"grouping": name})
    previous = Run(store_path).verification(name)
    if not force and previous is not None and previous.get("config") == verify_cfg.model_dump():
        reporter.message(f"verify of {name!r} already done")
        return previous
    return run_verify(store_path, verify_cfg, reporter=reporter, target=target, device=stage1_cfg.device)
