"""Markdown tables from transformer_targets.sh's JSON lines:
    python benchmarks/transformer_table.py results.jsonl"""

from __future__ import annotations

import json
import sys


def induction_row(d: dict) -> str:
    s1, v = d["stage1"], d["verify_truth"]
    faith = max(x for k, x in s1.items() if k.startswith("faithfulness"))

    def fn(f: str) -> str:
        return (f"{v[f'induction/{f}/needed_mechanisms']:.0f}, {v[f'induction/{f}/share_in_head']:.2f}, "
                f"{v[f'induction/{f}/kept_only_needed']:.2f}")

    return (f"| {d['seed']} | {d['init']} | {d['grouping']} | {d['groups']} | {faith:.3f} | "
            f"{s1['induction/induction/active_pieces']:.2f} / {s1['induction/induction/target']:.2f} | "
            f"{s1['induction/prev_token/active_pieces']:.2f} / {s1['induction/prev_token/target']:.2f} | "
            f"{_verdict(d)} | {fn('prev_token')} | {fn('induction')} | "
            f"{v['induction/prev_token/recovered']:.0f}, {v['induction/induction/recovered']:.0f} |")


def modadd_row(d: dict) -> str:
    s1, v = d["stage1"], d["verify_truth"]
    faith = max(x for k, x in s1.items() if k.startswith("faithfulness"))
    return (f"| {d['seed']} | {d['init']} | {d['grouping']} | {d['groups']} | {faith:.3f} | "
            f"{s1['modadd/pieces/mean_purity']:.2f} | {s1['modadd/pieces/dedicated_key_fraction']:.2f} | "
            f"{_verdict(d)} | {v['modadd/key_frequencies']:.0f} | {v['modadd/mean_purity']:.2f} | "
            f"{v['modadd/dedicated_key_fraction']:.2f} | {v['modadd/held_out_accuracy_key_mechanisms']:.3f} |")


def _verdict(d: dict) -> str:
    return "pass" if d["verify_passed"] else "fails " + ", ".join(d["verify_failed"])


HEADERS = {
    "induction": ("| seed | init | grouping | mechanisms | max faithfulness error | copy accuracy, active pieces / "
                  "target | prev-token attention, active pieces / target | verify | prev_token: needed, in head, "
                  "kept | induction: needed, in head, kept | recovered (prev, ind) |", 11, induction_row),
    "modadd": ("| seed | init | grouping | mechanisms | max faithfulness error | pieces: purity | pieces: dedicated "
               "key fraction | verify | key frequencies | mechanisms: purity | dedicated key fraction | held-out "
               "accuracy, key mechanisms only |", 12, modadd_row),
}


def main(path: str) -> None:
    rows = [json.loads(line) for line in open(path)]
    for d in rows:
        if "grouping" not in d:
            print(f"- {d['target']} seed {d['seed']}: `apd run` {d['apd_run_seconds']} s")
    for target, (header, n_cols, fmt) in HEADERS.items():
        mine = [d for d in rows if d.get("target") == target and "grouping" in d]
        if mine:
            print(f"\n{header}\n|{'---|' * n_cols}")
            print("\n".join(fmt(d) for d in mine))


if __name__ == "__main__":
    main(sys.argv[1])
