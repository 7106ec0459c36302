"""The training step never reads a value back to the host (no .item(), no
data-dependent shapes), so on CUDA it queues work without stalling. Checked
on CPU by watching the ops the step dispatches: a host read is
aten._local_scalar_dense, a data-dependent shape is aten.nonzero."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from apdkit.core.pieces import unit_rows
from apdkit.stages.config import resolve_stage1
from apdkit.stages.stage1.objective import objective
from apdkit.stages.stage1.train import coefficients, new_state, simplicity_weight_at
from apdkit.stages.target import Target, matrix_settings
from apdkit.targets.load import TargetRef, decomposed_model
from apdkit.targets.registry import TARGETS
from tests.helpers import made_target

aten = torch.ops.aten
HOST_SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default}


class HostSyncDetector(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.hits = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_SYNC_OPS:
            self.hits.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["tms_5-2-id", "resid_mlp2"])
def test_objective_and_backward_do_not_sync(name):
    spec = TARGETS[name]
    module = made_target(name, 0)
    for p in module.parameters():
        p.requires_grad_(False)
    ref = TargetRef(name, modules=spec.modules, hidden=spec.hidden)
    model = decomposed_model(ref, module)
    cfg = resolve_stage1(spec.stage1, batch_size=64)
    sample = lambda b, g: spec.sample(module, b, g)  # noqa: E731
    n_pieces, topk = matrix_settings(Target(ref, module, model, sample), cfg)
    state = new_state(model, cfg, n_pieces, torch.device("cpu"), sample)
    weights = model.weights()
    x = sample(64, torch.Generator().manual_seed(0))
    detector = HostSyncDetector()
    with detector:
        V = {n: unit_rows(v) for n, v in state.V_raw.items()}
        losses = objective(model, x, weights, state.U, V, topk, coefficients(cfg), cfg.schatten_p,
                           simplicity_weight_at(cfg, 300))
        losses["total"].backward()
    assert detector.hits == []
    # the detector does see a host read when there is one
    with detector:
        float(losses["total"].detach())
    assert detector.hits == ["aten._local_scalar_dense.default"]
