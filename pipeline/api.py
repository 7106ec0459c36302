"""The Python API: decompose a model, then group, verify and read results.

    import apdkit as apd
    run = apd.decompose(model, data, modules=["blocks.*.mlp.*"], store="runs/mine.zarr")
    run.group("spectral")
    run.verify()
    run = apd.open_run("runs/mine.zarr")   # any finished run, later

Every result is a torch tensor; mechanism g is the sum of the pieces labelled g.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from apdkit.core.pieces import membership_matrices
from apdkit.stages.config import (GroupConfig, Stage1Config, VerifyConfig, resolve_group, resolve_stage1,
                                  resolve_verify)
from apdkit.stages.group.stage import run_group
from apdkit.stages.progress import Reporter
from apdkit.stages.selection import mechanism_masks
from apdkit.stages.stage1.stage import run_stage1
from apdkit.stages.target import Target, load_from_store
from apdkit.stages.verify.stage import run_verify
from apdkit.stores.run import STAGE1, Run, StoreError
from apdkit.targets.load import TargetRef, resolve_ref


def stage1_config(ref: TargetRef, config: Stage1Config | Mapping[str, Any] | str | os.PathLike | None = None,
                  **flags: Any) -> Stage1Config:
    """Generic < the target's defaults < ``config`` (YAML path or mapping) < flags."""
    if isinstance(config, Stage1Config):
        return config.model_copy(update={k: v for k, v in flags.items() if v is not None})
    defaults = dict(ref.builtin.stage1) if ref.builtin is not None else {}
    if isinstance(config, Mapping):
        return resolve_stage1({**defaults, **config}, None, **flags)
    return resolve_stage1(defaults, Path(config) if config is not None else None, **flags)


def group_config(ref: TargetRef | None, config: str | os.PathLike | None = None, **flags: Any) -> GroupConfig:
    """Generic < the target's grouping defaults (a built-in's ``group``) < ``config`` (YAML path) < flags."""
    defaults = dict(ref.builtin.group) if ref is not None and ref.builtin is not None else {}
    return resolve_group(Path(config) if config is not None else None, defaults, **flags)


def stored_ref(store: str | os.PathLike) -> TargetRef | None:
    """The target a store was made for; None where it holds none yet (the
    stage that needs one says so)."""
    try:
        return TargetRef.from_dict(Run(Path(store)).target_ref())
    except StoreError:
        return None


def decompose(model: nn.Module | str, data: Any = None, modules: Sequence[str] = (), store: str | os.PathLike = "",
              config: Stage1Config | Mapping[str, Any] | str | os.PathLike | None = None, *, output: str | None = None,
              insert_identity: Sequence[str] = (), hidden: Sequence[str] = (), force: bool = False,
              reporter: Reporter | None = None) -> "RunResults":
    """Run stage 1 on ``model`` (an nn.Module, or a name: built-in target,
    ``module:factory``, ``hf:NAME``) with inputs from ``data`` (a callable
    ``sample(n, generator)``, a tensor of inputs, an iterable of batches, or
    an import path / .pt / .npy file) and return the run."""
    if not store:
        raise ValueError("decompose needs store= (a directory for the run)")
    module = None
    if isinstance(model, nn.Module):
        module = model
        name = f"object:{type(model).__module__}.{type(model).__qualname__}"
        ref = TargetRef(name, {}, tuple(modules), output, tuple(hidden), tuple(insert_identity),
                        data if isinstance(data, str) else "object")
        if not modules:
            raise ValueError("decompose needs modules= (name patterns of the layers to decompose)")
    else:
        ref = resolve_ref(model, modules, output, hidden, insert_identity,
                          data if isinstance(data, str) else None)
    live_data = None if isinstance(data, str) else data
    cfg = stage1_config(ref, config)
    run_stage1(Path(store), ref, cfg, module=module, data=live_data, force=force, reporter=reporter)
    return RunResults(Path(store), module=module, data=live_data)


def open_run(path: str | os.PathLike, module: nn.Module | None = None, data: Any = None) -> "RunResults":
    """Read a run. ``module``/``data``: for runs whose model or data were given
    as Python objects (the store rebuilds everything else itself)."""
    return RunResults(Path(path), module=module, data=data)


class RunResults(Run):
    """A run with its target: stage 1's pieces, groupings, verify results, and
    mechanisms applied to new inputs."""

    def __init__(self, path: Path, module: nn.Module | None = None, data: Any = None):
        super().__init__(path)
        self._module, self._data = module, data
        self._target: Target | None = None

    def _loaded(self) -> Target:
        if self._target is None:
            self._target = load_from_store(self, module=self._module, data=self._data)
        return self._target

    def target(self, module: nn.Module | None = None) -> nn.Module:
        """The target network, stored weights loaded, in eval mode."""
        if module is not None:
            self._module, self._target = module, None
        return self._loaded().module

    # -- stages -------------------------------------------------------------
    def group(self, method: str | None = None, *, force: bool = False, reporter: Reporter | None = None,
              **settings: Any) -> dict:
        """Group the pieces; ``method`` None: the target's default (spectral unless a built-in names another)."""
        cfg = settings.pop("config", None) or group_config(self._loaded().ref, None, method=method, **settings)
        return run_group(self.path, cfg, force=force, reporter=reporter, target=self._loaded())

    def verify(self, grouping: str | None = None, *, reporter: Reporter | None = None, **settings: Any) -> dict:
        cfg = settings.pop("config", None) or resolve_verify(None, grouping=grouping, **settings)
        return run_verify(self.path, cfg, reporter=reporter, target=self._loaded())

    # -- results ------------------------------------------------------------
    def _grouping(self, grouping: str | None) -> tuple[str, dict[str, np.ndarray], int]:
        names = self.groupings()
        if grouping is None:
            if len(names) != 1:
                raise ValueError(f"name the grouping (have: {', '.join(names) or 'none'})")
            grouping = names[0]
        return grouping, self.grouping(grouping), int(self.grouping_info(grouping)["n_groups"])

    def mechanism_weights(self, mechanism: int, grouping: str | None = None) -> dict[str, Tensor]:
        """Mechanism ``mechanism`` as a weight matrix per decomposed matrix
        (zeros where it has no piece)."""
        _, labels, _ = self._grouping(grouping)
        out = {}
        for name, (U, V) in self.pieces().items():
            members = torch.from_numpy(np.asarray(labels[name]) == mechanism)
            out[name] = U[members].T @ V[members]
        return out

    @torch.no_grad()
    def active_mechanisms(self, x: Tensor, grouping: str | None = None) -> tuple[Tensor, Tensor]:
        """(active (rows, G) bool, attributions (rows, G)) on new inputs: each
        mechanism attributed as a whole, batch top-k at the grouping's mean
        number of active mechanisms."""
        name, labels, n_groups = self._grouping(grouping)
        target = self._loaded()
        cfg = Stage1Config(**self.config(STAGE1))
        member = membership_matrices(labels, n_groups)
        k = float(self.grouping_info(name)["mean_active_mechanisms"])
        scores, active = mechanism_masks(target.model, x, self.pieces(), self.gates(), member, k, cfg,
                                         torch.Generator().manual_seed(0))
        return active, scores

    @torch.no_grad()
    def forward(self, x: Tensor, keep: Sequence[int] | Tensor | None = None, ablate: Sequence[int] = (),
                grouping: str | None = None) -> Tensor:
        """The model's output rows with decomposed matrices replaced by the
        chosen mechanisms: ``keep`` (ids, or a (rows, G) 0/1 mask; default all)
        minus ``ablate``. Biases and undecomposed parameters stay on."""
        _, labels, n_groups = self._grouping(grouping)
        target = self._loaded()
        rows = target.model.forward(x).output.shape[0]
        if isinstance(keep, Tensor) and keep.dim() == 2:
            mask = keep.float()
        else:
            mask = torch.zeros(rows, n_groups)
            mask[:, list(range(n_groups)) if keep is None else list(keep)] = 1.0
        mask[:, list(ablate)] = 0.0
        member = membership_matrices(labels, n_groups)
        pieces = self.pieces()
        return target.model.run(x, pieces, {n: mask @ member[n].T for n in pieces}).output


__all__ = ["decompose", "open_run", "RunResults", "Stage1Config", "GroupConfig", "VerifyConfig"]
