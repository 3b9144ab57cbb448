"""Tiny audio corpora written with soundfile, and a cached tiny preprocessed store and model,
for the robustness tests (bad input, interruption, numerical faults, safe loading)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

SR = 16000
# A tiny model: the robustness tests check behaviour, not accuracy.
TINY = ["--hidden", "16", "--proj", "8", "--num_layer", "1", "--N", "3", "--M", "3",
        "--log_every", "5"]


def speech_like(seconds: float = 1.6, sr: int = SR, pitch: float = 150.0, seed: int = 0
                ) -> np.ndarray:
    """Loud harmonic bursts separated by near-silent gaps, so VAD keeps some frames but not all."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    voice = sum(np.sin(2 * np.pi * pitch * k * t + rng.uniform(0, 6.3)) / k for k in range(1, 6))
    gate = (np.sin(2 * np.pi * 2.5 * t) > -0.3).astype(float)  # ~60% voiced, 2.5 bursts a second
    wav = 0.3 * voice * gate / np.max(np.abs(voice)) + 1e-4 * rng.standard_normal(t.size)
    return wav.astype(np.float32)


def write_speakers(root: Path, speakers: int, utterances: int, seconds: float = 1.6,
                   first: int = 0) -> list[str]:
    """Good speakers spk<first>.. with their own pitch, `utterances` 16 kHz int16 WAVs each."""
    names = []
    for s in range(first, first + speakers):
        name = f"spk{s:02d}"
        (root / name).mkdir(parents=True, exist_ok=True)
        for u in range(utterances):
            sf.write(root / name / f"utt{u:02d}.wav",
                     speech_like(seconds, pitch=110.0 + 23.0 * s, seed=100 * s + u), SR,
                     subtype="PCM_16")
        names.append(name)
    return names


_CACHE: dict[str, list[str]] = {}


def preprocessed(tmp_path_factory) -> list[str]:
    """Flags of a preprocessed tiny corpus (6 speakers x 4 utterances: 4 train, 2 test)."""
    if "store" not in _CACHE:
        import data_preprocess

        root = tmp_path_factory.mktemp("robust_store")
        write_speakers(root / "audio", speakers=6, utterances=4)
        flags = ["--audio_path", str(root / "audio"), "--train_path", str(root / "train"),
                 "--test_path", str(root / "test"), "--test_ratio", "0.34",
                 "--results_path", str(root / "results"), "--draws", "1"] + TINY
        assert data_preprocess.main(flags) == 0
        _CACHE["store"] = flags
    return list(_CACHE["store"])


def trained(tmp_path_factory) -> list[str]:
    """Flags of a tiny model trained for 4 steps on preprocessed() (checkpoints at 2 and 4)."""
    if "model" not in _CACHE:
        import configuration
        import training

        flags = preprocessed(tmp_path_factory) + [
            "--model_path", str(tmp_path_factory.mktemp("robust_model") / "model")]
        training.train(configuration.parse_config(flags + ["--iteration", "4", "--save_every", "2"]))
        _CACHE["model"] = flags
    return list(_CACHE["model"])


def copy_split(source: Path, destination: Path) -> Path:
    """A writable copy of a preprocessed split folder, to damage in a test."""
    destination.mkdir()
    for file in source.iterdir():
        (destination / file.name).write_bytes(file.read_bytes())
    return destination
