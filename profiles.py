"""Use a trained model on new recordings: enroll, verify, identify, embed a folder."""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np

import configuration
import features
import model
import utils

PROFILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def files_features(paths: list[str | Path], config: argparse.Namespace
                   ) -> list[np.ndarray | ValueError]:
    """Features of audio files; a missing, unreadable, silent or too-short file gives a
    ValueError naming it in its place."""
    paths = [Path(p) for p in paths]
    readable = [p for p in paths if p.is_file()]
    found = dict(zip(readable, features.files_inference_features(readable, config)))
    results = []
    for path in paths:
        if path not in found:
            results.append(ValueError(f"{path}: no such audio file"))
        elif isinstance(found[path], features.AudioError):
            results.append(ValueError(f"{path}: {found[path]}"))
        else:
            results.append(found[path])
    return results


def embed_paths(embed, paths: list[str], config: argparse.Namespace) -> np.ndarray:
    """Utterance d-vectors [F,P] of audio files (sliding windows, as in evaluation); a bad file
    is an error."""
    utterances = files_features(paths, config)
    for result in utterances:
        if isinstance(result, ValueError):
            raise result
    return model.utterance_d_vectors(embed, utterances, config.window_frames)


def _profile_paths(config: argparse.Namespace, name: str) -> tuple[Path, Path]:
    if not PROFILE_NAME.match(name):
        raise ValueError(f"profile name {name!r}: use letters, digits, '_', '-' or '.', "
                         f"starting with a letter or digit")
    folder = Path(config.model_path) / "profiles"
    return folder / f"{name}.npy", folder / f"{name}.json"


def load_profile(config: argparse.Namespace, name: str, fingerprint: str
                 ) -> tuple[np.ndarray, dict]:
    """A stored profile's file d-vectors and metadata; refused if made by another model."""
    vectors_path, meta_path = _profile_paths(config, name)
    if not meta_path.exists():
        known = sorted(p.stem for p in meta_path.parent.glob("*.json"))
        raise ValueError(f"no profile {name!r} in {meta_path.parent} (enrolled: "
                         f"{', '.join(known) or 'none'})")
    meta = json.loads(meta_path.read_text())
    if meta["model"] != fingerprint:
        raise ValueError(f"profile {name!r} was enrolled with another model ({meta['model']}, "
                         f"this model is {fingerprint}); enroll it again")
    return np.load(vectors_path, allow_pickle=False), meta


def enroll(config: argparse.Namespace) -> dict:
    """Embed --audio files and store (or extend with --extend True) the speaker's profile."""
    config, encoder = model.load_trained(config)
    fingerprint = model.model_fingerprint(encoder)
    name = config.enroll
    vectors_path, meta_path = _profile_paths(config, name)
    vectors = embed_paths(model.make_embedder(encoder, config.n_mels), config.audio, config)
    files = [str(Path(p).resolve()) for p in config.audio]
    action = "enrolled"
    if meta_path.exists():
        if config.extend:
            old_vectors, old_meta = load_profile(config, name, fingerprint)
            vectors, files = np.concatenate([old_vectors, vectors]), old_meta["files"] + files
            action = "extended"
        else:
            action = "replaced"
    vectors_path.parent.mkdir(parents=True, exist_ok=True)
    utils.atomic_save_npy(vectors_path, vectors)
    meta = {"name": name, "files": files, "model": fingerprint,
            "model_path": str(Path(config.model_path).resolve()),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
    utils.atomic_save_json(meta_path, meta)
    print(f"{action} {name!r} with {len(files)} file(s) -> {meta_path}")
    return meta


def operating_threshold(config: argparse.Namespace, fingerprint: str) -> tuple[float, str]:
    """The decision threshold and where it came from: --threshold, else the EER threshold of
    the --threshold_from evaluation, else the model's own (its test split's) operating threshold."""
    if config.threshold is not None:
        return config.threshold, "--threshold"
    if config.threshold_from:
        evaluation = Path(config.threshold_from) / "evaluation.json"
        if not evaluation.is_file():
            raise ValueError(f"--threshold_from {config.threshold_from}: no evaluation.json there "
                             f"(expected the --results_path of a --train False run)")
    else:
        evaluation = Path(config.model_path) / "evaluation.json"
        if not evaluation.exists():
            raise ValueError(f"no --threshold given and {evaluation} does not exist; run "
                             f"python main.py --train False first or pass --threshold")
    saved = configuration.load_config(evaluation)
    # Evaluations written before the fingerprint was recorded are of --model_path alone.
    if saved.get("model", None if config.ensemble else fingerprint) != fingerprint:
        raise ValueError(f"{evaluation} holds the threshold of other weights "
                         f"({' + '.join(saved.get('models', [config.model_path]))}), not of "
                         f"this --model_path/--ensemble; run python main.py --train False with "
                         f"them first or pass --threshold")
    if not isinstance(saved.get("threshold"), (int, float)):
        raise ValueError(f"{evaluation}: no 'threshold'; expected the evaluation.json of a "
                         f"--train False run")
    source = saved.get("threshold_source", "")
    if config.threshold_from:
        return float(saved["threshold"]), f"--threshold_from {config.threshold_from}: {source}"
    # Earlier versions let a --trials run overwrite the model's threshold with that list's; only
    # the similarity-matrix test of the test split records eer_mean.
    if "eer_mean" not in saved:
        raise ValueError(f"{evaluation} holds the threshold of a trial list ({source}), not of "
                         f"the model's test split; run python main.py --train False without "
                         f"--trials, or pass --threshold or --threshold_from")
    if "threshold_eer" not in saved:  # written before the source was spelled out
        source = (f"EER threshold of the model's test split (similarity-matrix test), EER "
                  f"{100 * saved['eer_mean']:.2f} %")
    return float(saved["threshold"]), f"operating threshold: {source}"


def verify(config: argparse.Namespace) -> tuple[float, bool]:
    """Cosine score of --audio against a profile, and the ACCEPT/REJECT decision with the
    threshold it used and that threshold's source."""
    config, encoder = model.load_trained(config)
    fingerprint = model.model_fingerprint(encoder)
    vectors, _ = load_profile(config, config.verify, fingerprint)
    threshold, source = operating_threshold(config, fingerprint)
    probe = embed_paths(model.make_embedder(encoder, config.n_mels), config.audio, config)[0]
    score = float(probe @ utils.speaker_model(vectors))
    accepted = score >= threshold
    print(f"{config.audio[0]} vs {config.verify!r}: score {score:.4f}, threshold "
          f"{threshold:.4f} ({source}) -> {'ACCEPT' if accepted else 'REJECT'}")
    return score, accepted


def identify(config: argparse.Namespace) -> list[tuple[str, float]]:
    """Rank every enrolled profile of this model by cosine score against --audio."""
    config, encoder = model.load_trained(config)
    fingerprint = model.model_fingerprint(encoder)
    folder = Path(config.model_path) / "profiles"
    names = sorted(p.stem for p in folder.glob("*.json"))
    if not names:
        raise ValueError(f"no profiles in {folder}; enroll speakers first (--enroll NAME)")
    probe = embed_paths(model.make_embedder(encoder, config.n_mels), config.audio, config)[0]
    ranking = sorted(((name, float(probe @ utils.speaker_model(
        load_profile(config, name, fingerprint)[0]))) for name in names),
        key=lambda item: -item[1])
    print(f"{config.audio[0]}:")
    for rank, (name, score) in enumerate(ranking, 1):
        print(f"  {rank}. {name:20s} {score:.4f}")
    return ranking


def embed_folder(config: argparse.Namespace) -> Path:
    """d-vectors of every audio file under --audio_path, saved with relative paths to --out."""
    config, encoder = model.load_trained(config)
    if not config.out:
        raise ValueError("--embed needs --out FILE.npz")
    root = Path(config.audio_path)
    if not root.is_dir():
        raise FileNotFoundError(f"--audio_path {root}: not a folder")
    files = sorted(p for p in root.rglob("*")
                   if p.suffix.lower() in features.AUDIO_EXTENSIONS and p.is_file())
    if not files:
        raise FileNotFoundError(f"--audio_path {root}: no .wav or .flac files")
    names, utterances, skipped = [], [], []
    for path, result in zip(files, files_features(files, config)):
        if isinstance(result, ValueError):
            skipped.append(str(result))
        else:
            utterances.append(result)
            names.append(path.relative_to(root).as_posix())
    if not utterances:
        raise ValueError(f"--audio_path {root}: no usable audio ({skipped[0]})")
    embed = model.make_embedder(encoder, config.n_mels, config.window_frames)
    vectors = model.utterance_d_vectors(embed, utterances, config.window_frames)
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez(tmp, paths=np.array(names, dtype=str), d_vectors=vectors)
    tmp.replace(out)
    print(f"{len(names)} d-vectors -> {out}; {len(skipped)} file(s) skipped")
    for reason in skipped:
        print(f"  skipped {reason}")
    return out
