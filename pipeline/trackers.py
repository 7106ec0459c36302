"""Send stage-1 metrics to the experiment trackers researchers use, from the
same callback that feeds the store's metrics. Each tracker's package is an
optional extra, imported only when asked for; nothing is written until the
first metrics arrive (after every check of the run has passed)."""

from __future__ import annotations

from pathlib import Path

from apdkit.stages.errors import StageError

TRACKERS = ("tensorboard", "wandb")


class Tracker:
    """``log(row)`` with a row of stage-1 metrics (``step`` among them); ``close()``."""

    def __init__(self, kind: str, store_path: Path, run_name: str):
        if kind not in TRACKERS:
            raise StageError(f"unknown tracker {kind!r}: {' or '.join(TRACKERS)}")
        try:
            if kind == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            else:
                import wandb  # noqa: F401
        except ImportError:
            raise StageError(f"--log-to {kind} needs {kind}: pip install 'apdkit[{kind}]'") from None
        self.kind, self.store_path, self.run_name = kind, Path(store_path), run_name
        self._sink = None

    def _open(self):
        if self.kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            return SummaryWriter(log_dir=str(self.store_path / "tensorboard"))
        import wandb

        return wandb.init(project="apd", name=self.run_name, dir=str(self.store_path), reinit=True)

    def log(self, row: dict) -> None:
        if self._sink is None:
            self._sink = self._open()
        step = int(row["step"])
        values = {f"stage1/{k}": v for k, v in row.items() if k != "step"}
        if self.kind == "tensorboard":
            for key, value in values.items():
                self._sink.add_scalar(key, value, step)
            self._sink.flush()
        else:
            self._sink.log(values, step=step)

    def close(self) -> None:
        if self._sink is not None:
            self._sink.close() if self.kind == "tensorboard" else self._sink.finish()
