"""Run the same ``apd`` command as N data-parallel processes on this machine.

Each process gets the environment torchrun would give it (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and joins the group from there, so
``torchrun --nproc-per-node N -m apdkit.cli stage1 ...`` works the same; this
launcher only keeps the output to the command's own (one error line, not a
launcher traceback) and stops every process when one dies.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time


def is_replica() -> bool:
    """True inside a process of a data-parallel group."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_follower() -> bool:
    """A replica other than rank 0: it computes but prints and writes nothing."""
    return int(os.environ.get("RANK", "0")) > 0


def without_option(argv: list[str], option: str) -> list[str]:
    """``argv`` with ``option VALUE`` and ``option=VALUE`` removed."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == option:
            skip = True
        elif not a.startswith(option + "="):
            out.append(a)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``apd *argv`` in ``nproc`` processes; 0, or the exit code of the
    first process that failed (128 + N for a signal N, as a shell says)."""
    port = str(_free_port())
    threads = str(max(1, (os.cpu_count() or 1) // nproc))  # an equal share of the cores each
    procs, failed = [], []
    for rank in range(nproc):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
               "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        env.setdefault("OMP_NUM_THREADS", threads)
        procs.append(subprocess.Popen([sys.executable, "-m", "apdkit.cli", *argv], env=env))
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed or all(c == 0 for c in codes):
                break
            time.sleep(0.1)
    finally:
        for p in procs:  # a dead replica leaves the others waiting in a collective: stop them
            if p.poll() is None:
                p.terminate()
        for p in procs:
            p.wait()
    code = failed[0] if failed else 0
    return 128 - code if code < 0 else code
