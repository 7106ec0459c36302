"""The whole pipeline into one store: target, stage 1, grouping, verify.
Each stage is skipped when finished and resumes when interrupted."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import GroupConfig, Stage1Config, VerifyConfig
from stages.group import run_group
from stages.progress import Reporter, SilentReporter
from stages.stage1 import run_stage1
from stages.verify import run_verify
from stores.run import Run


def run_pipeline(store_path: Path, model: str, stage1_cfg: Stage1Config, group_cfg: GroupConfig,
                 verify_cfg: VerifyConfig, reporter: Reporter | None = None) -> dict:
    """Returns the verify result of the pipeline's grouping."""
    reporter = reporter or SilentReporter()
    run_stage1(store_path, model, stage1_cfg, reporter=reporter)
    run_group(store_path, group_cfg, reporter=reporter)
    name = group_cfg.grouping_name
    previous = Run(store_path).verification(name)
    if previous is not None and previous.get("config") == verify_cfg.model_copy(update={"grouping": name}).model_dump():
        reporter.message(f"verify of {name!r} already done")
        return previous
    return run_verify(store_path, verify_cfg.model_copy(update={"grouping": name}), reporter=reporter)
