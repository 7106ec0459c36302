"""A self-contained HTML page about one run: figures (matplotlib PNGs,
inlined) and tables, for a researcher to look at instead of reading numbers."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no screen needed
import matplotlib.pyplot as plt  # noqa: E402
import networkx as nx  # noqa: E402
import numpy as np  # noqa: E402

from apdkit.stages.errors import StageError  # noqa: E402
from apdkit.stages.group.coactivation import CoactivationStats, PieceIndex, coactivation_dask  # noqa: E402
from apdkit.stages.group.methods import affinity  # noqa: E402
from apdkit.stages.target import load_from_store  # noqa: E402
from apdkit.stores.run import STAGE1, Run  # noqa: E402


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def loss_curves(run: Run) -> str:
    m = run.metrics()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for key in ("total", "faithfulness", "minimality", "hidden", "simplicity"):
        if key in m and np.any(m[key] > 0):
            ax.plot(m["step"], m[key], label=key)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean over logged interval)")
    ax.legend(fontsize=8)
    ax.set_title("stage 1 training")
    return _png(fig)


def coactivation_graph(run: Run, labels: dict[str, np.ndarray]) -> str:
    pieces = run.pieces()
    index = PieceIndex.from_sizes({n: U.shape[0] for n, (U, _) in pieces.items()})
    masks, scores = run.eval_dask(list(index.names))
    stats = coactivation_dask(masks, scores)
    flat = np.concatenate([labels[n] for n in index.names])
    alive = np.flatnonzero(flat >= 0)
    sub = CoactivationStats(stats.n_samples, stats.counts[alive], stats.co[np.ix_(alive, alive)],
                            stats.weighted[np.ix_(alive, alive)])
    A = affinity(sub)
    G = nx.Graph()
    G.add_nodes_from(range(len(alive)))
    rows, cols = np.nonzero(np.triu(A, k=1) > 0.05)
    G.add_weighted_edges_from((int(i), int(j), float(A[i, j])) for i, j in zip(rows, cols))
    pos = nx.spring_layout(G, weight="weight", seed=0, k=1.5 / np.sqrt(max(len(alive), 1)))
    fig, ax = plt.subplots(figsize=(7, 6))
    widths = [2 * G[u][v]["weight"] for u, v in G.edges()]
    nx.draw_networkx_edges(G, pos, ax=ax, width=widths, alpha=0.3)
    matrix_of = index.matrix_of()[alive]
    markers = "osD^v<>"
    for j, name in enumerate(index.names):
        nodes = [i for i in range(len(alive)) if matrix_of[i] == j]
        nx.draw_networkx_nodes(G, pos, nodelist=nodes, node_color=[flat[alive][i] for i in nodes], cmap="tab20",
                               node_shape=markers[j % len(markers)], node_size=60, ax=ax, label=name)
    ax.legend(fontsize=8)
    ax.set_title("co-activation graph of alive pieces (colour: mechanism, shape: matrix)")
    ax.axis("off")
    return _png(fig)


def _table(rows: list[tuple], header: tuple) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_report(store_path: Path, out: Path, grouping: str | None = None) -> Path:
    run = Run(store_path)
    if run.status(STAGE1) != "done":
        raise StageError(f"{store_path} has no finished stage 1: nothing to report yet")
    target = load_from_store(run)
    parts = [f"<h1>apd run: {html.escape(run.model_name)}</h1>",
             f"<p>store <code>{html.escape(str(store_path))}</code></p>",
             "<h2>Stage 1: rank-1 pieces</h2>", loss_curves(run),
             _table([(k, _fmt(v)) for k, v in run.scores().items()], ("score", "value"))]
    groupings = run.groupings()
    name = grouping or (groupings[0] if groupings else None)
    if name is not None:
        info = run.grouping_info(name)
        labels = run.grouping(name)
        n_groups = int(info["n_groups"])
        parts += [f"<h2>Stage 2: grouping {html.escape(name)!s} ({html.escape(info['method'])})</h2>",
                  _table([("mechanisms", n_groups), ("alive pieces", info["n_alive"]),
                          ("description length / input", _fmt(info["description_length_per_input"])),
                          ("mechanisms by rank", info["group_rank_histogram"]),
                          *[(f"ground truth {k}", _fmt(v)) for k, v in info.get("scores", {}).items()]],
                         ("figure", "value")),
                  coactivation_graph(run, labels)]
        if target.has_ground_truth and target.builtin.figures is not None:
            parts += [_png(fig) for fig in target.builtin.figures(target.model, run.pieces(), labels, n_groups)]
        ver = run.verification(name)
        if ver is not None:
            rows = [(c, "pass" if b["passed"] else "FAIL", k, _fmt(v))
                    for c, b in ver["checks"].items() for k, v in b["figures"].items()]
            parts += [f"<h2>Verify: {'all checks passed' if ver['passed'] else 'FAILED'}</h2>",
                      _table(rows, ("check", "verdict", "figure", "value"))]
    style = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}"
             "img{max-width:100%;display:block;margin:1em 0}")
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>apd {html.escape(run.model_name)}</title>" \
           f"<style>{style}</style></head><body>{''.join(parts)}</body></html>"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(page)
    tmp.replace(out)
    return out
