"""resid_mlp report figures: mechanisms' response to one-hot inputs."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from apdkit.core.attributions import mechanism_attributions
from apdkit.core.model import DecomposedModel
from apdkit.core.pieces import Pieces, membership_matrices


@torch.no_grad()
def figures(model: DecomposedModel, pieces: Pieces, labels: Mapping[str, np.ndarray], n_groups: int) -> list:
    """Features x mechanisms attribution on one-hot inputs, and the output
    error per feature with only its top mechanism on."""
    import matplotlib.pyplot as plt

    member = membership_matrices(labels, n_groups)
    x = torch.eye(model.module.n_features)
    scores, _ = mechanism_attributions(model, x, pieces, member)
    scores = scores.numpy()
    order = np.argsort(scores.argmax(axis=0))
    fig, ax = plt.subplots(figsize=(8, 6))
    im = ax.imshow(scores[:, order] / (scores.max(axis=1, keepdims=True) + 1e-12), aspect="auto", cmap="magma")
    ax.set_xlabel("mechanism (sorted by the feature it responds to most)")
    ax.set_ylabel("one-hot input feature")
    ax.set_title("mechanism attribution on one-hot inputs (row-normalised)")
    fig.colorbar(im, ax=ax)
    top = torch.from_numpy(scores.argmax(axis=1))
    mask = torch.nn.functional.one_hot(top, n_groups).float()
    out = model.run(x, pieces, {n: mask @ member[n].T for n in pieces}).output
    err = ((out - model.forward(x).output) ** 2).mean(dim=1).numpy()
    fig2, ax = plt.subplots(figsize=(8, 2.8))
    ax.bar(np.arange(len(err)), err, color="C0")
    ax.set_xlabel("feature")
    ax.set_ylabel("output MSE")
    ax.set_title("one-hot input, only its top mechanism on: error against the target")
    return [fig, fig2]
