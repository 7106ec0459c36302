"""Shared test helpers."""

from pathlib import Path

LOCK_FILES = {".apd.lock", ".apd.lock.owner"}  # the writer lock: process bookkeeping, not store content


def store_tree(path: Path) -> list:
    """Every file of a store with its size and modification time, to check
    that a refused command changed nothing."""
    return sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in Path(path).rglob("*") if p.is_file() and p.name not in LOCK_FILES)
