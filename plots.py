"""Figures written into Results/ (matplotlib, PNG, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def similarity_matrix_figure(scores: np.ndarray, labels: np.ndarray, speakers: list[str],
                             out_dir: Path, mode: str) -> Path:
    """Heatmap of verification utterances (rows, grouped by speaker) x enrolled speakers."""
    order = np.argsort(labels, kind="stable")
    fig, ax = plt.subplots(figsize=(7, 6))
    image = ax.imshow(scores[order], aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="cosine similarity")
    ax.set_xlabel(f"enrolled speaker ({len(speakers)})")
    ax.set_ylabel("verification utterance (grouped by true speaker)")
    ax.set_title(f"{mode} similarity matrix")
    return _save(fig, out_dir, "similarity_matrix", mode)


def _save(fig, out_dir: Path, name: str, mode: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}_{mode.lower().replace('-', '')}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def det_curve(target: np.ndarray, nontarget: np.ndarray, out_dir: Path, mode: str) -> Path:
    """DET curve on normal-deviate axes with the EER point."""
    from scipy.stats import norm

    import utils

    _, far, frr = utils.error_rates(target, nontarget)
    eer, _ = utils.equal_error_rate(target, nontarget)
    clip = (1e-4, 1 - 1e-4)
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.plot(norm.ppf(np.clip(far, *clip)), norm.ppf(np.clip(frr, *clip)), lw=1.5)
    ax.plot(norm.ppf(np.clip(eer, *clip)), norm.ppf(np.clip(eer, *clip)), "o", color="C3",
            label=f"EER {100 * eer:.2f}%")
    ticks = np.array([0.001, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4])
    ax.set_xticks(norm.ppf(ticks), [f"{100 * t:g}" for t in ticks])
    ax.set_yticks(norm.ppf(ticks), [f"{100 * t:g}" for t in ticks])
    ax.set_xlim(norm.ppf(0.0005), norm.ppf(0.5))
    ax.set_ylim(norm.ppf(0.0005), norm.ppf(0.5))
    ax.set_xlabel("false acceptance rate (%)")
    ax.set_ylabel("false rejection rate (%)")
    ax.set_title(f"{mode} DET curve")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out_dir, "det_curve", mode)


def score_histograms(target: np.ndarray, nontarget: np.ndarray, threshold: float,
                     out_dir: Path, mode: str) -> Path:
    """Target and nontarget score distributions with the EER threshold."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    bins = np.linspace(min(target.min(), nontarget.min()), max(target.max(), nontarget.max()), 60)
    ax.hist(nontarget, bins=bins, density=True, alpha=0.6, label=f"nontarget ({nontarget.size})")
    ax.hist(target, bins=bins, density=True, alpha=0.6, label=f"target ({target.size})")
    ax.axvline(threshold, color="k", ls="--", label=f"EER threshold {threshold:.3f}")
    ax.set_xlabel("cosine score")
    ax.set_ylabel("density")
    ax.set_title(f"{mode} score distributions")
    ax.legend()
    return _save(fig, out_dir, "score_histograms", mode)


def embedding_projection(d_vectors: dict[str, np.ndarray], out_dir: Path, mode: str) -> Path:
    """Test d-vectors projected on their first two principal components, coloured by speaker."""
    speakers = sorted(d_vectors)
    stacked = np.concatenate([d_vectors[s] for s in speakers])
    centred = stacked - stacked.mean(axis=0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    points = centred @ components[:2].T
    fig, ax = plt.subplots(figsize=(6, 6))
    colours = plt.get_cmap("tab20")
    start = 0
    for i, speaker in enumerate(speakers):
        n = len(d_vectors[speaker])
        ax.scatter(points[start:start + n, 0], points[start:start + n, 1], s=12,
                   color=colours(i % 20), marker="os^D"[(i // 20) % 4])
        start += n
    ax.set_xlabel("principal component 1")
    ax.set_ylabel("principal component 2")
    ax.set_title(f"{mode} test d-vectors ({len(speakers)} speakers, PCA)")
    return _save(fig, out_dir, "d_vectors_pca", mode)


def loss_curve(log_dir: Path, out_dir: Path, mode: str) -> Path | None:
    """Training loss read back from the TensorBoard event files; None when there is no log."""
    import tensorflow as tf

    steps, losses = [], []
    for events in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(str(events)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                if value.tag == "loss":
                    steps.append(event.step)
                    losses.append(float(tf.make_ndarray(value.tensor)))
    if not steps:
        return None
    order = np.argsort(steps, kind="stable")
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(np.asarray(steps)[order], np.asarray(losses)[order], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("GE2E loss (sum over the batch)")
    ax.set_title(f"{mode} training loss")
    ax.grid(alpha=0.3)
    return _save(fig, out_dir, "training_loss", mode)
