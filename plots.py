"""Figures written into Results/ (matplotlib, PNG, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def similarity_matrix_figure(scores: np.ndarray, labels: np.ndarray, speakers: list[str],
                             out_dir: Path, title: str) -> Path:
    """Heatmap of verification utterances (rows, grouped by speaker) x enrolled speakers."""
    out_dir.mkdir(parents=True, exist_ok=True)
    order = np.argsort(labels, kind="stable")
    fig, ax = plt.subplots(figsize=(7, 6))
    image = ax.imshow(scores[order], aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="cosine similarity")
    ax.set_xlabel(f"enrolled speaker ({len(speakers)})")
    ax.set_ylabel("verification utterance (grouped by true speaker)")
    ax.set_title(f"{title} similarity matrix")
    path = out_dir / f"similarity_matrix_{title.lower().replace('-', '')}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
