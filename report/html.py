"""A self-contained HTML page about one run: figures (matplotlib PNGs,
inlined) and tables, for a researcher to look at instead of reading numbers."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import matplotlib
import torch

matplotlib.use("Agg")  # no screen needed
import matplotlib.pyplot as plt  # noqa: E402
import networkx as nx  # noqa: E402
import numpy as np  # noqa: E402
from scipy import sparse  # noqa: E402

from apdkit.stages.errors import StageError  # noqa: E402
from apdkit.stages.group.coactivation import PieceIndex, coactivation_dask  # noqa: E402
from apdkit.stages.group.methods import affinity  # noqa: E402
from apdkit.stages.target import load_from_store  # noqa: E402
from apdkit.core.model import TargetError  # noqa: E402
from apdkit.core.pieces import membership_matrices  # noqa: E402
from apdkit.stores.run import STAGE1, Run  # noqa: E402

MAX_CARDS = 120  # mechanisms shown as cards (the largest by activity first)
CARD_INPUTS = 256  # evaluation inputs used for each card's ablation effect


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def loss_curves(run: Run) -> str:
    m = run.metrics()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for key in ("total", "faithfulness", "minimality", "hidden", "simplicity", "importance"):
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
    stats = coactivation_dask(run.eval_masks_dask(list(index.names)))
    flat = np.concatenate([labels[n] for n in index.names])
    alive = np.flatnonzero(flat >= 0)
    A = sparse.triu(affinity(stats.restrict(alive)), k=1).tocoo()
    strong = A.data > 0.05
    G = nx.Graph()
    G.add_nodes_from(range(len(alive)))
    G.add_weighted_edges_from(zip(A.row[strong].tolist(), A.col[strong].tolist(), A.data[strong].tolist()))
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


def warnings_for(run: Run, name: str | None) -> list[str]:
    """What a reader must not miss: failed checks and figures out of range."""
    out = []
    for key, value in run.scores().items():
        if key.startswith("faithfulness_rel_error/") and value > 0.02:
            out.append(f"stage 1: {key} is {value:.3g} (> 0.02): the pieces do not sum to the weights")
        if key == "tms/mmcs" and value < 0.99:
            out.append(f"stage 1: tms/mmcs is {value:.4f} (< 0.99): features not recovered")
    if name is not None:
        info = run.grouping_info(name)
        ari = info.get("scores", {}).get("ari")
        if ari is not None and ari < 0.9:
            out.append(f"grouping {name}: ARI against the ground truth is {ari:.3f} (< 0.9)")
        for matrix, ident in info.get("identity", {}).items():
            if not ident["one_mechanism"]:
                out.append(f"grouping {name}: the inserted identity {matrix} is split over "
                           f"{ident['n_mechanisms']} mechanisms (expected one)")
        ver = run.verification(name)
        if ver is None:
            out.append(f"grouping {name} has not been verified (apd verify)")
        elif not ver["passed"]:
            failed = [c for c, b in ver["checks"].items() if not b["passed"]]
            out.append(f"verify FAILED: {', '.join(failed)}")
    return out


def _describe_input(x: np.ndarray) -> str:
    if np.issubdtype(x.dtype, np.integer):
        return "tokens " + " ".join(str(int(t)) for t in x.reshape(-1)[:12])
    flat = x.reshape(-1)
    nz = np.flatnonzero(flat)
    return ", ".join(f"x{i}={flat[i]:.2f}" for i in nz[:6]) + (" ..." if len(nz) > 6 else "") if len(nz) else "all zero"


@torch.no_grad()
def mechanism_cards(run: Run, target, labels: dict, info: dict) -> str:
    """One card per mechanism: its matrices and ranks, how often it is active,
    the stored inputs it is most attributed on, and what ablating it does."""
    n_groups = int(info["n_groups"])
    activity = np.asarray(info["activity"])
    n_rows = next(iter(run.masks().values())).shape[0]
    inputs = run.eval_inputs()
    per_input = n_rows // inputs.shape[0]
    rows = min(n_rows, 4096)
    names = sorted(labels)
    member = membership_matrices(labels, n_groups)
    scores = {n: torch.from_numpy(np.asarray(run.attribution_scores()[n][:rows])) for n in names}
    mech_scores = sum(scores[n] @ member[n] for n in names)  # (rows, G): summed member attributions
    x = torch.from_numpy(np.asarray(inputs[:min(CARD_INPUTS, inputs.shape[0])]))
    pieces = run.pieces()
    model = target.model
    reference = model.forward(x).output
    keep_all = torch.ones(reference.shape[0], n_groups)
    full = model.run(x, pieces, {n: keep_all @ member[n].T for n in names}).output
    scale = float((reference ** 2).mean()) or 1.0
    order = np.argsort(-activity)[:MAX_CARDS]
    cards = []
    for g in order:
        ranks = ", ".join(f"{html.escape(n)} rank {info['ranks'][n][g]}" for n in names if info["ranks"][n][g] > 0)
        keep = torch.ones(reference.shape[0], n_groups)
        keep[:, g] = 0.0
        ablated = model.run(x, pieces, {n: keep @ member[n].T for n in names}).output
        effect = float(((ablated - full) ** 2).mean()) / scale
        top = torch.topk(mech_scores[:, g], min(3, rows)).indices.tolist()
        seen = [r for r in top if mech_scores[r, g] > 0]
        where = "; ".join(f"#{r // per_input}" + (f" pos {r % per_input}" if per_input > 1 else "") + ": "
                          + html.escape(_describe_input(np.asarray(inputs[r // per_input]))) for r in seen)
        cards.append(f"<div class='card'><b>mechanism {int(g)}</b><br>{ranks}<br>active on "
                     f"{100 * activity[g] / n_rows:.2f}% of rows<br>ablating it: output change "
                     f"{effect:.3g} of the output's mean square<br><small>top inputs: {where or 'none'}</small></div>")
    more = f"<p>{n_groups - len(order)} less active mechanisms not shown.</p>" if n_groups > len(order) else ""
    return f"<div class='cards'>{''.join(cards)}</div>{more}"


def identity_panel(run: Run, target, labels: dict, info: dict) -> str:
    """Where the always-on matrices went: inserted identities, and matrices a
    built-in declares shared (the TMS hidden identity)."""
    shared = list(info.get("identity", {}))
    if target.has_ground_truth and getattr(target.module, "hidden", None) is not None and "hidden" in labels:
        shared.append("hidden")
    if not shared:
        return ""
    n_rows = next(iter(run.masks().values())).shape[0]
    rows = []
    for matrix in shared:
        lab = np.asarray(labels[matrix])
        groups = sorted(set(lab[lab >= 0].tolist()))
        share = ", ".join(f"{100 * info['activity'][g] / n_rows:.1f}%" for g in groups)
        rows.append((matrix, ", ".join(map(str, groups)) or "none", int((lab < 0).sum()), share,
                     "yes" if len(groups) == 1 and (lab >= 0).all() else "NO"))
    return "<h3>Identity</h3>" + _table(rows, ("matrix", "mechanisms holding its pieces", "pieces set aside",
                                              "active on (rows)", "one mechanism"))


def write_report(store_path: Path, out: Path, grouping: str | None = None) -> Path:
    run = Run(store_path)
    if run.status(STAGE1) != "done":
        raise StageError(f"{store_path} has no finished stage 1: nothing to report yet")
    run.check(*run.finished_nodes())
    try:
        target = load_from_store(run)
    except TargetError as e:  # a model given as a Python object: no figures that need it
        target, missing = None, str(e)
    groupings = run.groupings()
    name = grouping or (groupings[0] if groupings else None)
    alerts = warnings_for(run, name)
    if target is None:
        alerts.append(f"mechanism cards and the target's figures need the model: {missing}")
    parts = [f"<h1>apd run: {html.escape(run.model_name)}</h1>",
             f"<p>store <code>{html.escape(str(store_path))}</code></p>",
             "".join(f"<div class='warn'>{html.escape(a)}</div>" for a in alerts),
             "<h2>Stage 1: rank-1 pieces</h2>", loss_curves(run),
             _table([(k, _fmt(v)) for k, v in run.scores().items()], ("score", "value"))]
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
        if target is not None:
            parts.append(identity_panel(run, target, labels, info))
            if target.has_ground_truth and target.builtin.figures is not None:
                parts += [_png(fig) for fig in target.builtin.figures(target.model, run.pieces(), labels, n_groups)]
            parts += ["<h3>Mechanisms</h3>", mechanism_cards(run, target, labels, info)]
        ver = run.verification(name)
        if ver is not None:
            rows = [(c, "pass" if b["passed"] else "FAIL", k, _fmt(v))
                    for c, b in ver["checks"].items() for k, v in b["figures"].items()]
            parts += [f"<h2>Verify: {'all checks passed' if ver['passed'] else 'FAILED'}</h2>",
                      _table(rows, ("check", "verdict", "figure", "value"))]
    style = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}"
             "img{max-width:100%;display:block;margin:1em 0}"
             ".warn{background:#fff3cd;border:1px solid #e0b800;padding:6px 10px;margin:4px 0}"
             ".cards{display:flex;flex-wrap:wrap;gap:8px}.card{border:1px solid #ccc;border-radius:4px;"
             "padding:6px 8px;font-size:12px;width:300px}")
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>apd {html.escape(run.model_name)}</title>" \
           f"<style>{style}</style></head><body>{''.join(parts)}</body></html>"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(page)
    tmp.replace(out)
    return out
