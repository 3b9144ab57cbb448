"""The embedded default corpus: deterministic synthetic 'speakers' so the pipeline runs offline.

Each speaker has its own pitch, vocal-tract length (formant scale), spectral tilt and breathiness.
Utterances are vowel-like syllables separated by pauses (so VAD has work); every speaker also says
one fixed syllable sequence, the TD-SV 'phrase', in files named phrase_NN.wav.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import scipy.signal
import soundfile as sf

import utils

# (F1, F2, F3) in Hz of an average adult vocal tract, for a handful of vowels.
VOWELS = np.array([[730, 1090, 2440], [270, 2290, 3010], [300, 870, 2240], [530, 1840, 2480],
                   [570, 840, 2410], [660, 1720, 2410], [440, 1020, 2240], [490, 1350, 1690]],
                  dtype=float)
PHRASE = (3, 0, 5, 1, 6)  # the vowel sequence every speaker says for TD-SV
SPEAKERS = 24
PHRASE_TAKES = 10
FREE_UTTERANCES = 10


def _speaker_voice(rng: np.random.Generator) -> dict:
    return {"f0": rng.uniform(85, 260), "formant_scale": rng.uniform(0.82, 1.22),
            "tilt": rng.uniform(0.90, 0.98), "breath": rng.uniform(0.0, 0.15),
            "bandwidth": rng.uniform(50, 110), "rate": rng.uniform(0.8, 1.25)}


def _syllable(vowel: int, seconds: float, voice: dict, sr: int,
              rng: np.random.Generator) -> np.ndarray:
    n = int(seconds * sr)
    f0 = voice["f0"] * (1 + 0.08 * np.linspace(0.5, -0.5, n)) * (1 + 0.01 * rng.standard_normal())
    phase = np.cumsum(f0 / sr)
    source = (phase % 1.0) - 0.5  # sawtooth glottal pulses
    source = scipy.signal.lfilter([1.0], [1.0, -voice["tilt"]], source)
    source += voice["breath"] * rng.standard_normal(n)
    out = source
    for formant in VOWELS[vowel] * voice["formant_scale"] * (1 + 0.03 * rng.standard_normal(3)):
        r = np.exp(-np.pi * voice["bandwidth"] / sr)
        a = [1.0, -2 * r * np.cos(2 * np.pi * min(formant, 0.45 * sr) / sr), r * r]
        out = scipy.signal.lfilter([1.0 - r], a, out)
    envelope = np.sin(np.linspace(0, np.pi, n)) ** 0.5
    return out * envelope


def _utterance(vowels: list[int], voice: dict, sr: int, rng: np.random.Generator) -> np.ndarray:
    pieces = [np.zeros(int(rng.uniform(0.1, 0.3) * sr))]
    for vowel in vowels:
        pieces.append(_syllable(vowel, rng.uniform(0.15, 0.28) / voice["rate"], voice, sr, rng))
        pieces.append(np.zeros(int(rng.uniform(0.03, 0.25) * sr)))
    wav = np.concatenate(pieces)
    wav = 0.5 * wav / np.max(np.abs(wav))
    wav += 3e-4 * rng.standard_normal(len(wav))  # room noise, far below the VAD threshold
    return wav.astype(np.float32)


def build(root: str | Path, sr: int = 16000, seed: int = 0) -> Path:
    """Write the corpus under root (once; an existing complete corpus is reused). Returns root."""
    root = Path(root)
    manifest = root / "manifest.csv"
    if manifest.exists():
        return root
    rows = []
    for s in range(SPEAKERS):
        rng = np.random.default_rng([seed, s])
        voice = _speaker_voice(rng)
        speaker = f"spk{s:02d}"
        (root / speaker).mkdir(parents=True, exist_ok=True)
        takes = [(f"phrase_{t:02d}", list(PHRASE), "phrase") for t in range(PHRASE_TAKES)]
        free = [(f"free_{u:02d}", rng.integers(0, len(VOWELS), rng.integers(8, 14)).tolist(), "")
                for u in range(FREE_UTTERANCES)]
        for name, vowels, text in takes + free:
            wav = _utterance(vowels, voice, sr, rng)
            path = f"{speaker}/{name}.wav"
            sf.write(root / path, wav, sr, subtype="PCM_16")
            rows.append({"speaker": speaker, "path": path, "seconds": f"{len(wav) / sr:.3f}",
                         "sample_rate": sr, "text_if_known": text})
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    utils.atomic_write_text(manifest, table.getvalue())
    print(f"built the synthetic corpus: {SPEAKERS} speakers, {len(rows)} files in {root}")
    return root
