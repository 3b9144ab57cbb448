"""The Python API: load a trained d-vector model, embed audio, enroll, verify and identify.

    import ge2e
    model = ge2e.load_model()                      # the ready model in pretrained/
    alice = model.embed_speaker(["a1.wav", "a2.flac"])
    score = ge2e.cosine(alice, model.embed_file("probe.wav"))
    accepted = score >= model.threshold            # the model's operating threshold

Importing this module loads nothing heavy; TensorFlow starts when a model is loaded.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import utils
from utils import speaker_model

PROFILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_profile_name(name: str) -> None:
    """A profile name can never leave the profiles folder: letters, digits, '_', '-', '.'."""
    if not PROFILE_NAME.match(name):
        raise ValueError(f"profile name {name!r}: use letters, digits, '_', '-' or '.', "
                         f"starting with a letter or digit")


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two d-vectors (or speaker models)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


@dataclass(frozen=True)
class Decision:
    """One verification: the probe, the profile, its score and the threshold it was held to."""

    probe: str
    name: str
    score: float
    threshold: float

    @property
    def accepted(self) -> bool:
        return self.score >= self.threshold


def load_model(path: str | Path | None = None, checkpoint: int = 0,
               ensemble: tuple[str | Path, ...] = (), lstmp: str = "kernel") -> DVectorModel:
    """A trained model folder (default: the ready model), at its latest checkpoint or step
    `checkpoint`; `ensemble` adds further models whose cosines are averaged with its own."""
    import configuration

    folder = Path(configuration.READY_MODEL if path is None else path)
    argv = ["--model_path", str(folder), "--model_num", str(checkpoint), "--lstmp", lstmp]
    if ensemble:
        argv += ["--ensemble", ",".join(str(p) for p in ensemble)]
    return DVectorModel(configuration.parse_config(argv))


class DVectorModel:
    """A trained encoder with its feature settings, operating threshold and enrolled profiles."""

    def __init__(self, config) -> None:
        """Load from a parsed configuration (see load_model); prefer load_model."""
        import evaluation
        import model

        self.features, self.network, self.encoder = model.load_trained(
            config.model_path, config.features, config.network, config.explicit,
            config.model_num, config.ensemble)
        self.path = Path(config.model_path)
        self.fingerprint = model.model_fingerprint(self.encoder)
        self._embed = model.make_embedder(self.encoder, self.features.n_mels,
                                          self.features.window_frames)
        self.threshold, self.threshold_source = evaluation.operating_threshold(
            self.path, self.fingerprint, ensemble=bool(config.ensemble))

    @property
    def sample_rate(self) -> int:
        return self.features.sr

    @property
    def profiles_path(self) -> Path:
        return self.path / "profiles"

    # Embedding.
    def embed_features(self, utterances: list[np.ndarray]) -> np.ndarray:
        """Utterance d-vectors [U,P] of log-mel feature arrays [T,n_mels] (sliding windows)."""
        import model

        return model.utterance_d_vectors(self._embed, utterances, self.features.window_frames)

    def embed_waveform(self, wav: np.ndarray, sr: int) -> np.ndarray:
        """The utterance d-vector [P] of a mono waveform at sample rate sr."""
        import features

        wav = features.resample(np.asarray(wav, dtype=np.float32), sr, self.features.sr)
        return self.embed_features([features.inference_features(wav, self.features)])[0]

    def embed_files_or_errors(self, paths: list[str | Path]
                              ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """Utterance d-vectors of audio files by path, and why each unusable file was skipped."""
        import features

        paths = [str(p) for p in paths]
        results = features.files_inference_features(paths, self.features)
        usable = {p: r for p, r in zip(paths, results) if not isinstance(r, Exception)}
        errors = {p: str(r) for p, r in zip(paths, results) if isinstance(r, Exception)}
        vectors = self.embed_features(list(usable.values())) if usable else []
        return dict(zip(usable, vectors)), errors

    def embed_files(self, paths: list[str | Path]) -> np.ndarray:
        """Utterance d-vectors [F,P] of audio files; an unusable file is a ValueError naming it."""
        vectors, errors = self.embed_files_or_errors(paths)
        if errors:
            path, reason = next(iter(errors.items()))
            raise ValueError(f"{path}: {reason}")
        return np.stack([vectors[str(p)] for p in paths])

    def embed_file(self, path: str | Path) -> np.ndarray:
        """The utterance d-vector [P] of one audio file."""
        return self.embed_files([path])[0]

    def embed_speaker(self, paths: list[str | Path]) -> np.ndarray:
        """A speaker model [P] from several recordings of one speaker."""
        return speaker_model(self.embed_files(paths))

    # Enrolled profiles: <model>/profiles/NAME.npy (file d-vectors) and NAME.json (files, model).
    def _profile_files(self, name: str) -> tuple[Path, Path]:
        check_profile_name(name)
        return self.profiles_path / f"{name}.npy", self.profiles_path / f"{name}.json"

    def profile_names(self) -> list[str]:
        return sorted(p.stem for p in self.profiles_path.glob("*.json"))

    def profile(self, name: str) -> np.ndarray:
        """The file d-vectors [F,P] of an enrolled profile; refused if enrolled with other weights."""
        vectors_path, meta_path = self._profile_files(name)
        if not meta_path.exists():
            raise ValueError(f"no profile {name!r} in {self.profiles_path} (enrolled: "
                             f"{', '.join(self.profile_names()) or 'none'})")
        meta = utils.read_json(meta_path, "a profile record")
        if meta.get("model") != self.fingerprint:
            raise ValueError(f"profile {name!r} was enrolled with another model "
                             f"({meta.get('model')}, this model is {self.fingerprint}); enroll "
                             f"it again")
        return np.load(vectors_path, allow_pickle=False)

    def enroll(self, name: str, paths: list[str | Path], extend: bool = False) -> str:
        """Store NAME's profile from audio files (added to an existing one with extend);
        returns 'enrolled', 'extended' or 'replaced'."""
        vectors_path, meta_path = self._profile_files(name)
        vectors = self.embed_files(paths)
        files = [str(Path(p).resolve()) for p in paths]
        action = "enrolled"
        if meta_path.exists():
            action = "extended" if extend else "replaced"
            if extend:
                vectors = np.concatenate([self.profile(name), vectors])
                files = utils.read_json(meta_path, "a profile record").get("files", []) + files
        vectors_path.parent.mkdir(parents=True, exist_ok=True)
        utils.atomic_save_npy(vectors_path, vectors)
        utils.atomic_save_json(meta_path, {
            "name": name, "files": files, "model": self.fingerprint,
            "model_path": str(self.path.resolve()), "updated": time.strftime("%Y-%m-%dT%H:%M:%S")})
        return action

    def decide_threshold(self, threshold: float | None = None, threshold_from: str = "",
                         required: bool = True) -> tuple[float | None, str]:
        """The decision threshold and its source: `threshold`, else the EER threshold recorded by
        the evaluation in `threshold_from`, else the model's operating threshold."""
        if threshold is not None:
            return threshold, "--threshold"
        if threshold_from:
            import evaluation

            return evaluation.threshold_from(threshold_from, self.fingerprint)
        if self.threshold is None and required:
            raise ValueError(f"no operating threshold: {self.threshold_source}; or pass a "
                             f"threshold (--threshold)")
        return self.threshold, self.threshold_source

    def verify(self, name: str, probe: str | Path | np.ndarray,
               threshold: float | None = None) -> Decision:
        """Score a probe (file or d-vector) against NAME's profile at the operating threshold."""
        threshold, _ = self.decide_threshold(threshold)
        vector = probe if isinstance(probe, np.ndarray) else self.embed_file(probe)
        label = "d-vector" if isinstance(probe, np.ndarray) else str(probe)
        return Decision(label, name, cosine(vector, speaker_model(self.profile(name))), threshold)

    def identify(self, probe: str | Path | np.ndarray,
                 profiles: tuple[list[str], np.ndarray] | None = None) -> list[tuple[str, float]]:
        """Every enrolled profile with its cosine against the probe, best first; `profiles`
        (speaker_models()) saves reading them again for each of many probes."""
        names, models = profiles or self.speaker_models()
        vector = probe if isinstance(probe, np.ndarray) else self.embed_file(probe)
        scores = models @ (vector / max(float(np.linalg.norm(vector)), 1e-12))
        return sorted(zip(names, map(float, scores)), key=lambda item: -item[1])

    def speaker_models(self) -> tuple[list[str], np.ndarray]:
        """The enrolled profiles' names and their speaker models [S,P] (unit length)."""
        names = self.profile_names()
        if not names:
            raise ValueError(f"no profiles in {self.profiles_path}; enroll speakers first "
                             f"(--enroll NAME)")
        return names, np.stack([speaker_model(self.profile(name)) for name in names])
