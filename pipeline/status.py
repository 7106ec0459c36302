"""What a store holds, stage by stage, for ``apd status``."""

from __future__ import annotations

from pathlib import Path

from apdkit.stores.run import STAGE1, STAGES, TARGET, Run


# the scores `apd status` shows, of those a target's ground truth gives
STAGE1_HEADLINES = ("tms/mmcs", "tms/grouped_ml2r", "resid/dedicated", "faithfulness", "induction/prev_token/active",
                    "induction/induction/active", "modadd/pieces/mean_purity", "tiny_lm/pieces/ce_recovered")
GROUP_HEADLINES = ("ari", "induction/prev_token/recovered", "induction/induction/recovered", "modadd/mean_purity",
                   "modadd/dedicated_key_fraction", "tiny_lm/l0_per_token", "tiny_lm/ce_recovered")


def missed_criteria(store: Path, scores: dict[str, float]) -> list[str]:
    """The scores that miss the store's built-in target's recovery criteria,
    and, for any target, a matrix whose pieces miss its weights by more than
    verify's default faithfulness threshold (so stage 1 says at once what
    verify will fail)."""
    from apdkit.stages.config import VerifyConfig
    from apdkit.stages.stage1.stage import FAITHFULNESS_KEY
    from apdkit.targets.load import TargetRef
    from apdkit.targets.spec import missed_criteria as missed

    faithfulness_max = VerifyConfig.model_fields["faithfulness_max"].default
    generic = missed(scores, {}, {k: faithfulness_max for k in scores if k.startswith(FAITHFULNESS_KEY)})
    run = Run(store)
    if run.status(TARGET) != "done":
        return generic
    spec = TargetRef.from_dict(run.target_ref()).builtin
    return (missed(scores, spec.criteria, spec.criteria_max) if spec is not None else []) + generic


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
            if "health" in attrs:  # a built-in trained here: what its health check measured when it accepted it
                detail += "; health " + ", ".join(f"{k} {v:.4g}" for k, v in attrs["health"].items())
        elif stage == STAGE1 and status == "done":
            scores = attrs.get("scores", {})
            keys = [k for k in scores if k.startswith(STAGE1_HEADLINES)]
            detail = ", ".join(f"{k} {scores[k]:.4g}" for k in keys)
            missed = missed_criteria(path, scores)
            detail += f"; MISSED: {'; '.join(missed)}" if missed else ""
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
        scores = info.get("scores", {})
        detail += "".join(f", {k} {scores[k]:.3g}" for k in GROUP_HEADLINES if k in scores)
        missed = missed_criteria(path, scores)
        rows.append((f"group {name}", "done", detail + _took(info) + (f"; MISSED: {'; '.join(missed)}" if missed else "")))
        ver = run.verification(name)
        if ver is not None:
            verdicts = ", ".join(f"{c} {'pass' if b['passed'] else 'FAIL'}" for c, b in ver["checks"].items())
            verdicts += "".join(f"; MISSED: {m}" for m in missed_criteria(path, ver.get("truth", {})))
            rows.append((f"verify {name}", "passed" if ver["passed"] else "failed", verdicts + _took(ver)))
    return rows
