"""Light helpers (numpy and the standard library only): verification metrics, AS-norm, sliding
windows, trial lists, safe JSON reads, atomic file writes and the audio types read."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus")  # all read by libsndfile >= 1.1
AUDIO_TYPES = "WAV, FLAC, MP3, OGG/Opus"  # the same, as messages name them


def error_rates(target_scores: np.ndarray, nontarget_scores: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FAR and FRR when accepting scores >= each distinct score (plus +inf). Returns thr, far, frr."""
    target = np.asarray(target_scores, dtype=np.float64).ravel()
    nontarget = np.asarray(nontarget_scores, dtype=np.float64).ravel()
    if target.size == 0 or nontarget.size == 0:
        raise ValueError("EER needs at least one target and one nontarget score")
    if not (np.all(np.isfinite(target)) and np.all(np.isfinite(nontarget))):
        raise ValueError("scores must be finite")
    thresholds = np.append(np.unique(np.concatenate([target, nontarget])), np.inf)
    target_sorted = np.sort(target)
    nontarget_sorted = np.sort(nontarget)
    frr = np.searchsorted(target_sorted, thresholds, side="left") / target.size
    far = 1.0 - np.searchsorted(nontarget_sorted, thresholds, side="left") / nontarget.size
    return thresholds, far, frr


def equal_error_rate(target_scores: np.ndarray, nontarget_scores: np.ndarray
                     ) -> tuple[float, float]:
    """EER and its threshold, interpolated linearly where FAR and FRR cross (NIST convention)."""
    thresholds, far, frr = error_rates(target_scores, nontarget_scores)
    # far falls and frr rises with the threshold; find the first point where frr >= far.
    i = int(np.argmax(frr >= far))
    if i == 0:
        return float(frr[0] + far[0]) / 2.0, float(thresholds[0])
    d_prev = far[i - 1] - frr[i - 1]
    d_here = far[i] - frr[i]
    alpha = d_prev / (d_prev - d_here)
    eer = far[i - 1] + alpha * (far[i] - far[i - 1])
    t_here = thresholds[i] if np.isfinite(thresholds[i]) else thresholds[i - 1]
    threshold = thresholds[i - 1] + alpha * (t_here - thresholds[i - 1])
    return float(eer), float(threshold)


def min_dcf(target_scores: np.ndarray, nontarget_scores: np.ndarray, p_target: float,
            c_miss: float = 1.0, c_fa: float = 1.0) -> tuple[float, float]:
    """Normalised minimum detection cost (NIST SRE) and the threshold that reaches it."""
    thresholds, far, frr = error_rates(target_scores, nontarget_scores)
    cost = c_miss * p_target * frr + c_fa * (1.0 - p_target) * far
    default = min(c_miss * p_target, c_fa * (1.0 - p_target))
    i = int(np.argmin(cost))
    return float(cost[i] / default), float(thresholds[i])


def window_starts(n_frames: int, window: int) -> list[int]:
    """Start frames of sliding windows with 50% overlap; one window if the utterance is short."""
    if n_frames <= window:
        return [0]
    hop = max(1, window // 2)
    starts = list(range(0, n_frames - window + 1, hop))
    if starts[-1] + window < n_frames:
        starts.append(n_frames - window)
    return starts


def as_norm(scores: np.ndarray, enroll_cohort: np.ndarray, test_cohort: np.ndarray,
            top_k: int) -> np.ndarray:
    """Adaptive S-norm: average of the scores z-normalised by each side's top-k cohort scores.

    scores [T]; enroll_cohort, test_cohort [T, C] are each trial side scored against the cohort.
    """
    k = min(top_k, enroll_cohort.shape[1])
    top_e = -np.sort(-enroll_cohort, axis=1)[:, :k]
    top_t = -np.sort(-test_cohort, axis=1)[:, :k]
    z_e = (scores - top_e.mean(1)) / np.maximum(top_e.std(1), 1e-8)
    z_t = (scores - top_t.mean(1)) / np.maximum(top_t.std(1), 1e-8)
    return 0.5 * (z_e + z_t)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary handle to a temp file beside path that replaces path when the block ends without
    an error, so a killed run never leaves a torn file; every writer of the project uses it."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # concurrent writers never share it
    try:
        with open(tmp, "wb") as handle:
            yield handle
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as handle:
        handle.write(text.encode("utf-8"))


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_file(path) as handle:
        np.save(handle, array, allow_pickle=False)


def atomic_save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    with atomic_file(path) as handle:
        np.savez(handle, **arrays)


def record_path(path: str | os.PathLike) -> str:
    """A path as records store it: relative to the working directory when inside it, so a
    committed evaluation does not name the machine it ran on; else absolute."""
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(resolved)


def atomic_save_json(path: str | os.PathLike, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True))


def read_json(path: str | os.PathLike, what: str) -> dict:
    """A JSON object from a file, or a one-line ValueError naming the file and `what` it should be."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read {what} ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected {what} (a JSON object), got {type(data).__name__}")
    return data


def speaker_model(d_vectors: np.ndarray) -> np.ndarray:
    """A speaker's enrollment model: the L2-normalised mean of its d-vectors."""
    mean = np.asarray(d_vectors, dtype=np.float64).mean(axis=0)
    return (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)


def parse_trials(path: str | os.PathLike) -> list[tuple[int, str, str]]:
    """VoxCeleb-format trial lines `label enrol test` (1 target, 0 nontarget)."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"--trials {path}: expected a UTF-8 text file") from None
    except OSError as error:
        raise FileNotFoundError(f"--trials {path}: cannot read the trial list "
                                f"({error.strerror})") from None
    trials = []
    for number, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 3 or fields[0] not in ("0", "1"):
            raise ValueError(f"{path}:{number}: expected 'label enrol test' with label 0 or 1,"
                             f" got {line.strip()!r}")
        for name in fields[1:]:
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise ValueError(f"{path}:{number}: {name!r} must be a path inside "
                                 f"--audio_path (no absolute paths or '..')")
        trials.append((int(fields[0]), fields[1], fields[2]))
    if not trials:
        raise ValueError(f"--trials {path}: no trials; expected lines 'label enrol test'")
    return trials
