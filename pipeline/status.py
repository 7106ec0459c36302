"""What a store holds, stage by stage, for ``apd status``."""

from __future__ import annotations

from pathlib import Path

from apdkit.stores.run import STAGE1, STAGES, TARGET, Run


def _took(attrs: dict) -> str:
    return f" in {attrs['wall_seconds']:.1f}s" if "wall_seconds" in attrs else ""


def store_status(path: Path, check: bool = True) -> list[tuple[str, str, str]]:
    """One row per stage; ``check`` first re-reads every finished node
    against its checksums (a damaged store is an error naming the node)."""
    run = Run(path)
    if check:
        run.check(*run.finished_nodes())
    prov = run.provenance()
    rows = [("provenance", "", ", ".join(f"{k} {v}" for k, v in prov.items() if v is not None))] if prov else []
    for stage in STAGES:
        status = run.status(stage)
        attrs = run.attrs(stage)
        detail = ""
        if stage == TARGET and status == "done":
            detail = (f"{attrs['ref']['model']} ({attrs.get('source')}, seed {attrs.get('seed')}), "
                      f"weights sha256 {attrs.get('weights_sha256', '?')[:16]}")
        elif stage == STAGE1 and status == "done":
            scores = attrs.get("scores", {})
            keys = [k for k in scores if k.startswith(("tms/mmcs", "tms/grouped_ml2r", "resid/dedicated", "faithfulness"))]
            detail = ", ".join(f"{k} {scores[k]:.4g}" for k in keys)
            detail += f"; seed {attrs.get('config', {}).get('seed')}, {attrs.get('device', '?')}{_took(attrs)}"
        elif stage == STAGE1 and status in ("running", "failed"):
            detail = attrs.get("message", "")
            step = run.checkpoint_step(STAGE1)
            if step is not None:
                detail = (detail + f" checkpoint at step {step}").strip()
        rows.append((stage, status, detail))
    for name in run.groupings():
        info = run.grouping_info(name)
        detail = f"{info['method']}: {info['n_groups']} mechanisms, DL/input {info['description_length_per_input']:.3f}"
        if "scores" in info:
            detail += f", ARI {info['scores']['ari']:.3f}"
        rows.append((f"group {name}", "done", detail + _took(info)))
        ver = run.verification(name)
        if ver is not None:
            verdicts = ", ".join(f"{c} {'pass' if b['passed'] else 'FAIL'}" for c, b in ver["checks"].items())
            rows.append((f"verify {name}", "passed" if ver["passed"] else "failed", verdicts + _took(ver)))
    return rows
