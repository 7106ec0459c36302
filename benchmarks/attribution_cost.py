"""Cost of one attribution call per method, against gradient, at the sizes
stage 1 uses: each built-in target's own pieces per matrix and batch size,
untrained weights and random pieces (the cost does not depend on them).

    python benchmarks/attribution_cost.py                      # resid_mlp, induction
    python benchmarks/attribution_cost.py --targets resid_mlp tiny_lm --repeats 3

Per target it prints the median seconds of one call and the ratio to the
gradient's generic path (vector-Jacobian products) and, where the target has
one, to its closed form.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from apdkit.core.attributions import attributions
from apdkit.core.model import DecomposedModel
from apdkit.core.pieces import init_random
from apdkit.stages.config import Stage1Config
from apdkit.targets.load import TargetRef, decomposed_model
from apdkit.targets.registry import TARGETS


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(name: str, repeats: int, steps: int, batch: int | None) -> None:
    spec = TARGETS[name]
    torch.manual_seed(0)
    module = spec.make()
    cfg = Stage1Config(**spec.stage1)
    fast = decomposed_model(TargetRef(name, modules=spec.modules, hidden=spec.hidden), module)
    generic = DecomposedModel(module, spec.modules, hidden=spec.hidden)
    C = cfg.per_matrix("n_pieces", generic.names)
    gen = torch.Generator().manual_seed(0)
    pieces = {n: init_random(w, int(C[n]), gen) for n, w in generic.weights().items()}
    n = batch or cfg.batch_size
    x = spec.sample(module, n, gen)
    rows = generic.forward(x).output.shape[0]
    call = dict(max_exact_outputs=cfg.max_exact_outputs, probes=cfg.attribution_probes)
    runs = {"gradient (generic)": lambda: attributions(generic, x, pieces, gen=gen, **call)}
    if fast.fast_sites is not None:
        runs["gradient (closed form)"] = lambda: attributions(fast, x, pieces, **call)
    runs[f"integrated_gradients ({steps} steps)"] = lambda: attributions(
        generic, x, pieces, gen=gen, method="integrated_gradients", steps=steps, **call)
    runs["ablation"] = lambda: attributions(generic, x, pieces, method="ablation", **call)
    with torch.no_grad():
        forward = _time(lambda: generic.forward(x), repeats)
    print(f"\n{name}: batch {n} ({rows} sample rows), pieces per matrix {sorted(set(C.values()))}, "
          f"{len(pieces)} matrices; one target forward pass {forward * 1e3:.2f} ms")
    base = None
    for label, fn in runs.items():
        t = _time(fn, repeats)
        base = base or t
        print(f"  {label:34s} {t * 1e3:10.1f} ms  {t / base:7.2f}x gradient (generic)  {t / forward:9.1f} forward passes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", default=["resid_mlp", "induction"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="integrated gradients: path points")
    parser.add_argument("--batch", type=int, default=None, help="inputs per call (default: the target's batch_size)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    for name in args.targets:
        bench(name, args.repeats, args.steps, args.batch)


if __name__ == "__main__":
    main()
