"""Run stores: ``open_run(path)`` gives read access to a run (see README)."""

from apdkit.stores.run import Run, RunStore, StoreError, open_run

__all__ = ["Run", "RunStore", "StoreError", "open_run"]
