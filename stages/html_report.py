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
import torch  # noqa: E402

from pipeline.config import Stage1Config  # noqa: E402
from stages.attributions import mechanism_attributions  # noqa: E402
from stages.coactivation import CoactivationStats, PieceIndex, coactivation_dask  # noqa: E402
from stages.errors import StageError  # noqa: E402
from stages.grouping import affinity  # noqa: E402
from stages.mechanisms import membership_matrices  # noqa: E402
from stages.pieces import MaskedPiecesOp  # noqa: E402
from stores.run import STAGE1, Run  # noqa: E402


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


def tms_directions(run: Run, labels: dict[str, np.ndarray], n_groups: int) -> str:
    """Each mechanism's W columns against the target's feature columns."""
    model = run.target()
    W = model.W.detach().numpy()
    U, V = (t.numpy() for t in run.subcomponents()["W"])
    lab = labels["W"]
    mech_W = [U[lab == g].T @ V[lab == g] for g in range(n_groups)]
    if W.shape[0] == 2:
        cols = min(n_groups, 6)
        rows = int(np.ceil(n_groups / cols))
        fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.3 * rows), squeeze=False)
        lim = 1.2 * np.abs(W).max()
        for g, ax in enumerate(axes.flat):
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_xticks([])
            ax.set_yticks([])
            if g >= n_groups:
                ax.axis("off")
                continue
            for j in range(W.shape[1]):
                ax.annotate("", W[:, j], (0, 0), arrowprops=dict(arrowstyle="->", color="0.8"))
                c = mech_W[g][:, j]
                if np.linalg.norm(c) > 0.05 * np.linalg.norm(W[:, j]):
                    ax.annotate("", c, (0, 0), arrowprops=dict(arrowstyle="->", color="C3", lw=2))
                    ax.text(*(c * 1.08), str(j), fontsize=7, color="C3")
            ax.set_title(f"mechanism {g}", fontsize=8)
        fig.suptitle("feature columns of W (grey) and of each mechanism's W (red)", fontsize=9)
        return _png(fig)
    sim = np.array([[np.linalg.norm(mw[:, j]) / (np.linalg.norm(W[:, j]) + 1e-12) for j in range(W.shape[1])]
                    for mw in mech_W])
    fig, ax = plt.subplots(figsize=(8, 0.25 * n_groups + 1.5))
    im = ax.imshow(sim, aspect="auto", cmap="viridis", vmin=0, vmax=1.2)
    ax.set_xlabel("feature (column of W)")
    ax.set_ylabel("mechanism")
    ax.set_title("norm of each mechanism's column j over the target's column j")
    fig.colorbar(im, ax=ax)
    return _png(fig)


@torch.no_grad()
def resid_feature_map(run: Run, labels: dict[str, np.ndarray], n_groups: int) -> tuple[str, str]:
    """Features x mechanisms attribution on one-hot inputs, and the output
    error per feature with only the top mechanisms of each input on."""
    model = run.target()
    factors = run.subcomponents()
    member = membership_matrices(labels, n_groups)
    x = torch.eye(model.n_features)
    scores, _ = mechanism_attributions(model, x, factors, member)
    scores = scores.numpy()
    order = np.argsort(scores.argmax(axis=0))
    fig, ax = plt.subplots(figsize=(8, 6))
    im = ax.imshow(scores[:, order] / (scores.max(axis=1, keepdims=True) + 1e-12), aspect="auto", cmap="magma")
    ax.set_xlabel("mechanism (sorted by the feature it responds to most)")
    ax.set_ylabel("one-hot input feature")
    ax.set_title("mechanism attribution on one-hot inputs (row-normalised)")
    fig.colorbar(im, ax=ax)
    heat = _png(fig)
    top = torch.from_numpy(scores.argmax(axis=1))
    mask = torch.nn.functional.one_hot(top, n_groups).float()
    ops = {p: MaskedPiecesOp(U, V, mask @ member[p].T) for p, (U, V) in factors.items()}
    err = ((model.run(x, ops).output - model(x)) ** 2).mean(dim=1).numpy()
    fig, ax = plt.subplots(figsize=(8, 2.8))
    ax.bar(np.arange(len(err)), err, color="C0")
    ax.set_xlabel("feature")
    ax.set_ylabel("output MSE")
    ax.set_title("one-hot input, only its top mechanism on: error against the target")
    return heat, _png(fig)


def coactivation_graph(run: Run, labels: dict[str, np.ndarray]) -> str:
    factors = run.subcomponents()
    index = PieceIndex.from_sizes({n: U.shape[0] for n, (U, _) in factors.items()})
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
    family = run.attrs("target")["spec"]["family"]
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
        if family == "tms":
            parts.append(tms_directions(run, labels, n_groups))
        elif family == "resid_mlp":
            heat, err = resid_feature_map(run, labels, n_groups)
            parts += [heat, err]
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
