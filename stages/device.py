"""Which device a stage computes on: ``auto`` is the GPU when torch sees one."""

from __future__ import annotations

import re

import torch

from apdkit.stages.errors import StageError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``; a one-line error for a GPU torch cannot see."""
    if name not in DEVICES and not re.fullmatch(r"cuda:\d+", name):
        raise StageError(f"--device {name!r} is not one of {', '.join(DEVICES)} (or cuda:N)")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise StageError(f"--device {name} asked for, but torch sees no CUDA device")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
