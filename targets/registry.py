"""The built-in targets, by name: the one registry. Adding one: a folder with
its model, data, training and ground truth, and one line here."""

from __future__ import annotations

from apdkit.targets import resid_mlp, tms
from apdkit.targets.spec import TargetSpec

_TMS_SMALL = dict(steps=2000, batch_size=2048, lr=3e-2, lr_schedule="cosine", warmup=0.05,
                  simplicity_coeff=0.7, schatten_p=1.0)
_TMS_LARGE = dict(steps=5000, batch_size=2048, lr=1e-2, warmup=0.05, minimality_coeff=10.0,
                  simplicity_coeff=20.0, schatten_p=0.9)
_RESID = dict(n_pieces=130, topk=0.5, steps=3000, batch_size=256, lr=3e-3, warmup=0.01,
              faithfulness_coeff=10.0, hidden_coeff=1.0, schatten_p=0.9)
_RESID_DEEP = dict(_RESID, minimality_coeff=2.0, simplicity_coeff=7.0)

TARGETS: dict[str, TargetSpec] = {
    spec.name: spec
    for spec in (
        tms.spec("tms_5-2", 5, 2, False, 1024, 5000, dict(_TMS_SMALL, n_pieces=10, topk=0.211)),
        tms.spec("tms_40-10", 40, 10, False, 2048, 10000, dict(_TMS_LARGE, n_pieces=60, topk=1.0)),
        tms.spec("tms_5-2-id", 5, 2, True, 1024, 5000,
                 dict(_TMS_SMALL, n_pieces=10, topk={"W": 0.211, "hidden": 2.0})),
        tms.spec("tms_40-10-id", 40, 10, True, 2048, 10000,
                 dict(_TMS_LARGE, n_pieces=60, topk={"W": 1.0, "hidden": 10.0})),
        tms.spec("tms_6-3-synced", 6, 3, False, 1024, 5000, dict(_TMS_SMALL, n_pieces=12, topk=0.3),
                 synced_features=(0, 1)),
        resid_mlp.spec("resid_mlp", 100, 50, 1, 3000, dict(_RESID, simplicity_coeff=10.0)),
        resid_mlp.spec("resid_mlp2", 100, 25, 2, 3000, _RESID_DEEP),
        resid_mlp.spec("resid_mlp3", 102, 17, 3, 3000, _RESID_DEEP),
    )
}


class UnknownTarget(ValueError):
    pass


def get_target(name: str) -> TargetSpec:
    try:
        return TARGETS[name]
    except KeyError:
        raise UnknownTarget(f"unknown model {name!r}; built-in targets: {', '.join(TARGETS)} "
                            "(or an import path module:factory, hf:NAME, or a target YAML)") from None
