"""The built-in targets, by name. Adding one: a module with build/sample/fit/
check and one line here."""

from __future__ import annotations

from targets import resid_mlp, tms
from targets.base import TargetSpec


def _tms(name: str, n: int, m: int, identity: bool, batch: int, steps: int, **extra) -> TargetSpec:
    return TargetSpec(
        name=name, family="tms",
        arch={"n_features": n, "d_hidden": m, "hidden_identity": identity, **extra},
        train={"lr": 5e-3, "weight_decay": 0.01, "batch": batch, "steps": steps,
               "warmup": 0.0, "schedule": "constant"},
        build=tms.build, sample=tms.sample, fit=tms.fit, check=tms.check,
    )


def _resid(name: str, n: int, d_mlp: int, layers: int, steps: int) -> TargetSpec:
    return TargetSpec(
        name=name, family="resid_mlp",
        arch={"n_features": n, "d_embed": 1000, "d_mlp": d_mlp, "n_layers": layers},
        train={"lr": 3e-3, "weight_decay": 0.01, "batch": 2048, "steps": steps,
               "warmup": 0.0, "schedule": "cosine"},
        build=resid_mlp.build, sample=resid_mlp.sample, fit=resid_mlp.fit, check=resid_mlp.check,
    )


TARGETS: dict[str, TargetSpec] = {
    spec.name: spec
    for spec in (
        _tms("tms_5-2", 5, 2, False, 1024, 5000),
        _tms("tms_40-10", 40, 10, False, 2048, 10000),
        _tms("tms_5-2-id", 5, 2, True, 1024, 5000),
        _tms("tms_40-10-id", 40, 10, True, 2048, 10000),
        _tms("tms_6-3-synced", 6, 3, False, 1024, 5000, synced_features=(0, 1)),
        _resid("resid_mlp", 100, 50, 1, 3000),
        _resid("resid_mlp2", 100, 25, 2, 3000),
        _resid("resid_mlp3", 102, 17, 3, 3000),
    )
}


class UnknownTarget(ValueError):
    pass


def get_target(name: str) -> TargetSpec:
    try:
        return TARGETS[name]
    except KeyError:
        raise UnknownTarget(
            f"unknown model {name!r}; built-in targets: {', '.join(TARGETS)}"
        ) from None


FAMILIES = {"tms": tms.build, "resid_mlp": resid_mlp.build}


def spec_to_dict(spec: TargetSpec) -> dict:
    """What the store keeps: enough to rebuild the module."""
    return {"name": spec.name, "family": spec.family, "arch": dict(spec.arch), "train": dict(spec.train)}


def module_from_spec(spec: dict):
    """Rebuild an (untrained) target module from a stored spec."""
    try:
        builder = FAMILIES[spec["family"]]
    except KeyError:
        raise UnknownTarget(f"unknown target family {spec.get('family')!r}") from None
    return builder(**spec["arch"])
