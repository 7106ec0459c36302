"""mdl grouping's time on real stores, against another revision's mdl in the
same process, on the same inputs.

    python benchmarks/mdl_speed.py STORE [STORE ...] [--baseline REV]

Each store is copied to a temporary folder; the group stage runs on the copy up
to the method (co-activation, alive pieces, the masks sample), then mdl runs
as the working tree has it and, with ``--baseline``, as ``git show
REV:stages/group/methods.py`` has it. Prints per store: alive pieces, sample
rows, mechanisms, both times, their ratio and whether the labels are identical.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from apdkit.stages.config import resolve_group
from apdkit.stages.group import methods, stage


class _Captured(Exception):
    pass


def grouping_input(store: Path):
    """The stage's own GroupingInput and settings for mdl on a copy of ``store``."""
    seen = {}

    def capture(method, inp, settings):
        seen.update(inp=inp, settings=settings)
        raise _Captured

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / store.name
        shutil.copytree(store, copy)
        real, stage.group_pieces = stage.group_pieces, capture
        try:
            stage.run_group(copy, resolve_group(None, method="mdl"), force=True)
        except _Captured:
            pass
        finally:
            stage.group_pieces = real
    return seen["inp"], seen["settings"]


def baseline_module(rev: str):
    source = subprocess.run(["git", "show", f"{rev}:stages/group/methods.py"], check=True, capture_output=True,
                            text=True, cwd=Path(__file__).resolve().parents[1]).stdout
    path = Path(tempfile.mkdtemp()) / "baseline_methods.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_methods", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["baseline_methods"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stores", nargs="+", type=Path)
    parser.add_argument("--baseline", help="git revision whose mdl is the baseline")
    args = parser.parse_args()
    base = baseline_module(args.baseline) if args.baseline else None
    print("| store | alive pieces | sample rows | mechanisms | mdl s | baseline s | baseline / mdl | labels identical |")
    print("|---|---|---|---|---|---|---|---|")
    for store in args.stores:
        inp, settings = grouping_input(store)
        labels, seconds = timed(methods.mdl, inp, settings)
        row = [str(store), inp.sample_masks.shape[1], inp.sample_masks.shape[0], int(labels.max()) + 1,
               f"{seconds:.1f}"]
        if base is not None:
            base_labels, base_seconds = timed(base.mdl, inp, settings)
            row += [f"{base_seconds:.1f}", f"{base_seconds / seconds:.1f}", np.array_equal(labels, base_labels)]
        else:
            row += ["", "", ""]
        print("| " + " | ".join(map(str, row)) + " |", flush=True)


if __name__ == "__main__":
    main()
