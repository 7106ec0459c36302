"""TMS report figures: each mechanism's W columns against the target's."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from apdkit.core.model import DecomposedModel
from apdkit.core.pieces import Pieces


def figures(model: DecomposedModel, pieces: Pieces, labels: Mapping[str, np.ndarray], n_groups: int) -> list:
    import matplotlib.pyplot as plt

    W = model.module.W.weight.detach().numpy()
    U, V = (t.numpy() for t in pieces["W"])
    lab = labels["W"]
    mech_W = [U[lab == g].T @ V[lab == g] for g in range(n_groups)]
    if W.shape[0] == 2:
        cols = max(1, min(n_groups, 6))
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
        return [fig]
    sim = np.array([[np.linalg.norm(mw[:, j]) / (np.linalg.norm(W[:, j]) + 1e-12) for j in range(W.shape[1])]
                    for mw in mech_W])
    fig, ax = plt.subplots(figsize=(8, 0.25 * n_groups + 1.5))
    im = ax.imshow(sim, aspect="auto", cmap="viridis", vmin=0, vmax=1.2)
    ax.set_xlabel("feature (column of W)")
    ax.set_ylabel("mechanism")
    ax.set_title("norm of each mechanism's column j over the target's column j")
    fig.colorbar(im, ax=ax)
    return [fig]
