"""apdkit: Attribution-based Parameter Decomposition for any torch model.

    import apdkit as apd
    run = apd.decompose(model, data, modules=["blocks.*.mlp.*"], store="runs/mine.zarr")
    run.group("spectral"); run.verify()
    apd.open_run("runs/mine.zarr").pieces()

The installed package maps the repository's folders under this one name:
apdkit.cli, apdkit.pipeline, apdkit.stages, apdkit.core (the math),
apdkit.targets, apdkit.stores, apdkit.report.
"""

from apdkit.pipeline.api import RunResults, decompose, open_run
from apdkit.stages.config import GroupConfig, Stage1Config, VerifyConfig

__all__ = ["decompose", "open_run", "RunResults", "Stage1Config", "GroupConfig", "VerifyConfig"]
