#!/usr/bin/env bash
# The transformer targets' ground-truth figures, as a user gets them: for each
# target and seed, `apd run` with the defaults (the target's grouping), spectral
# and mdl on the same stage 1 (the one apd run made is kept), and the same again with `init: random` on a copy of the store
# (same target). Prints one JSON line per (target, seed, init, grouping).
# Usage: bash benchmarks/transformer_targets.sh OUT_DIR "induction modadd" "0 1 2"
set -u
out=${1:-runs/transformer_targets}; targets=${2:-"induction modadd"}; seeds=${3:-"0 1 2"}
mkdir -p "$out"
printf 'init: random\n' > "$out/random.yaml"
for model in $targets; do
  for seed in $seeds; do
    store="$out/$model-$seed.zarr"
    start=$(date +%s)
    apd run --model "$model" --seed "$seed" --store "$store" -q > "$out/$model-$seed.run.txt" 2>&1
    echo "{\"target\": \"$model\", \"seed\": $seed, \"apd_run_seconds\": $(( $(date +%s) - start ))}"
    for m in spectral mdl; do
      apd group --store "$store" --method $m -q > /dev/null 2>&1
      apd verify --store "$store" --method $m -q > "$out/$model-$seed.verify-$m.txt" 2>&1
    done
    rm -rf "$out/$model-$seed-random.zarr"; cp -r "$store" "$out/$model-$seed-random.zarr"
    apd stage1 --model "$model" --seed "$seed" --store "$out/$model-$seed-random.zarr" --config "$out/random.yaml" \
      --force -q > /dev/null 2>&1
    for m in spectral mdl; do
      apd group --store "$out/$model-$seed-random.zarr" --method $m --force -q > /dev/null 2>&1
      apd verify --store "$out/$model-$seed-random.zarr" --method $m -q > /dev/null 2>&1
    done
    python - "$store" "$out/$model-$seed-random.zarr" "$model" "$seed" <<'PY'
import json, sys
from apdkit import open_run
for path, init in ((sys.argv[1], "data"), (sys.argv[2], "random")):
    run = open_run(path)
    for name in run.groupings():
        ver = run.verification(name) or {}
        print(json.dumps({"target": sys.argv[3], "seed": int(sys.argv[4]), "init": init, "grouping": name,
                          "health": run.attrs("target").get("health"), "stage1": run.scores(),
                          "groups": run.grouping_info(name)["n_groups"],
                          "group_truth": run.grouping_info(name).get("scores", {}),
                          "verify_passed": ver.get("passed"),
                          "verify_failed": [c for c, b in ver.get("checks", {}).items() if not b["passed"]],
                          "verify_truth": ver.get("truth", {})}))
PY
  done
done
