"""The training step never reads a value back to the host (no .item(), no
data-dependent shapes), so on CUDA it queues work without stalling. Checked
on CPU by watching the ops the step dispatches: a host read is
aten._local_scalar_dense, a data-dependent shape is aten.nonzero."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.config import resolve_stage1
from stages.decompose import new_state, objective, simplicity_weight_at, unit_rows
from targets.registry import TARGETS

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
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = spec.make()
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = resolve_stage1(name, batch_size=64)
    sample = lambda b, g: spec.sample(model, b, g)  # noqa: E731
    state = new_state(model, cfg, torch.device("cpu"), sample)
    weights = {n: w.detach() for n, w in model.decomposed_weights().items()}
    x = sample(64, torch.Generator().manual_seed(0))
    detector = HostSyncDetector()
    with detector:
        V = {n: unit_rows(v) for n, v in state.V_raw.items()}
        losses = objective(model, x, weights, state.U, V, cfg, simplicity_weight_at(cfg, 300))
        losses["total"].backward()
    assert detector.hits == []
    # the detector does see a host read when there is one
    with detector:
        float(losses["total"].detach())
    assert detector.hits == ["aten._local_scalar_dense.default"]
