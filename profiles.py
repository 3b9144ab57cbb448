"""The commands that use a trained model on recordings: enroll, verify, identify, verify a list of
pairs, embed a folder. Each is a thin printer over the Python API (ge2e.py)."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

import ge2e
import utils


def threshold_for(model: ge2e.DVectorModel, threshold: float | None, threshold_from: str
                  ) -> tuple[float, str]:
    """The decision threshold and its source: --threshold, --threshold_from, else the model's."""
    if threshold is not None:
        return threshold, "--threshold"
    if threshold_from:
        import evaluation

        return evaluation.threshold_from(threshold_from, model.fingerprint)
    if model.threshold is None:
        raise ValueError(f"no operating threshold: {model.threshold_source}; or pass --threshold")
    return model.threshold, model.threshold_source


def enroll(config: argparse.Namespace) -> str:
    """Embed --audio files and store (or extend with --extend True) the speaker's profile."""
    model = ge2e.DVectorModel(config)
    action = model.enroll(config.enroll, config.audio, extend=config.extend)
    files = len(model.profile(config.enroll))
    print(f"{action} {config.enroll!r} with {files} file(s) -> "
          f"{utils.record_path(model.profiles_path / (config.enroll + '.json'))}")
    return action


def _embed_probes(model: ge2e.DVectorModel, probes: list[str]) -> dict[str, np.ndarray]:
    """d-vectors of the usable probes; each unusable one is listed, and if none is usable, or the
    only one is not, that is an error naming it."""
    vectors, errors = model.embed_files_or_errors(sorted(set(probes)))
    if not vectors:
        path, reason = next(iter(errors.items()))
        raise ValueError(f"{path}: {reason}")
    for path, reason in errors.items():
        print(f"{path}: skipped ({reason})")
    return vectors


def _decision_line(decision: ge2e.Decision, source: str) -> str:
    return (f"{decision.probe} vs {decision.name!r}: score {decision.score:.4f}, threshold "
            f"{decision.threshold:.4f} ({source}) -> "
            f"{'ACCEPT' if decision.accepted else 'REJECT'}")


def _summary(decisions: list[ge2e.Decision], skipped: int, seconds: float) -> str:
    accepted = sum(d.accepted for d in decisions)
    return (f"{len(decisions)} scored: {accepted} accepted, {len(decisions) - accepted} "
            f"rejected; {skipped} skipped; {len(decisions) / seconds:.1f} probes/s")


def verify(config: argparse.Namespace) -> list[ge2e.Decision]:
    """Score each --audio file against the --verify profile: one line each, then a summary."""
    model = ge2e.DVectorModel(config)
    return _verify_pairs(model, threshold_for(model, config.threshold, config.threshold_from),
                         [(config.verify, probe) for probe in config.audio])


def verify_pairs(config: argparse.Namespace) -> list[ge2e.Decision]:
    """Score every 'NAME audio_path' line of --pairs: one line each, then a summary."""
    pairs = read_pairs(config.pairs)
    model = ge2e.DVectorModel(config)
    return _verify_pairs(model, threshold_for(model, config.threshold, config.threshold_from),
                         pairs)


def _verify_pairs(model: ge2e.DVectorModel, decided: tuple[float, str],
                  pairs: list[tuple[str, str]]) -> list[ge2e.Decision]:
    threshold, source = decided
    speakers = {name: ge2e.speaker_model(model.profile(name)) for name in sorted({n for n, _ in pairs})}
    started = time.perf_counter()
    vectors = _embed_probes(model, [probe for _, probe in pairs])
    short = source.split(":")[0]
    if len(pairs) > 1 or short != source:
        print(f"threshold {threshold:.4f}: {source}")
    decisions = []
    for name, probe in pairs:
        if probe in vectors:
            decisions.append(ge2e.Decision(probe, name, ge2e.cosine(vectors[probe],
                                                                    speakers[name]), threshold))
            print(_decision_line(decisions[-1], short))
    if len(pairs) > 1:
        print(_summary(decisions, len(pairs) - len(decisions), time.perf_counter() - started))
    return decisions


def read_pairs(path: str) -> list[tuple[str, str]]:
    """(profile, audio path) lines of a --pairs file; relative paths are relative to its folder."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"--pairs {path}: cannot read the list ({error})") from None
    base, pairs = Path(path).parent, []
    for number, line in enumerate(lines, 1):
        fields = line.split(maxsplit=1)
        if not fields or line.lstrip().startswith("#"):
            continue
        if len(fields) != 2:
            raise ValueError(f"{path}:{number}: expected 'NAME audio_path', got {line.strip()!r}")
        pairs.append((fields[0], str(base / fields[1].strip())))
    if not pairs:
        raise ValueError(f"--pairs {path}: no pairs; expected lines 'NAME audio_path'")
    return pairs


def identify(config: argparse.Namespace) -> dict[str, list[tuple[str, float]]]:
    """Rank every enrolled profile against each --audio file (the whole ranking for one file,
    the best three for several), then a summary."""
    model = ge2e.DVectorModel(config)
    if not model.profile_names():
        raise ValueError(f"no profiles in {model.profiles_path}; enroll speakers first "
                         f"(--enroll NAME)")
    started = time.perf_counter()
    vectors = _embed_probes(model, config.audio)
    rankings = {probe: model.identify(vectors[probe]) for probe in config.audio
                if probe in vectors}
    for probe, ranking in rankings.items():
        if len(config.audio) == 1:
            print(f"{probe}:")
            for rank, (name, score) in enumerate(ranking, 1):
                print(f"  {rank}. {name:20s} {score:.4f}")
        else:
            print(f"{probe}: " + ", ".join(f"{rank}. {name} {score:.4f}"
                                            for rank, (name, score) in enumerate(ranking[:3], 1)))
    if len(config.audio) > 1:
        print(f"{len(rankings)} identified; {len(config.audio) - len(rankings)} skipped; "
              f"{len(rankings) / (time.perf_counter() - started):.1f} probes/s")
    return rankings


def audio_files(root: Path) -> list[Path]:
    """Every audio file under root, following symlinked folders, in sorted order."""
    found = []
    for folder, _, names in os.walk(root, followlinks=True):
        found += [Path(folder) / n for n in names if Path(n).suffix.lower() in utils.AUDIO_EXTENSIONS]
    return sorted(found)


def embed_folder(config: argparse.Namespace) -> Path:
    """d-vectors of every audio file under --audio_path, saved with relative paths to --out."""
    model = ge2e.DVectorModel(config)
    root = Path(config.audio_path)
    files = audio_files(root)
    vectors, errors = model.embed_files_or_errors(files)
    if not vectors:
        path, reason = next(iter(errors.items()))
        raise ValueError(f"--audio_path {root}: no usable audio ({path}: {reason})")
    names = [f for f in map(str, files) if f in vectors]
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    utils.atomic_save_npz(out, paths=np.array([Path(n).relative_to(root).as_posix() for n in names],
                                              dtype=str),
                          d_vectors=np.stack([vectors[n] for n in names]))
    print(f"{len(names)} d-vectors -> {out}; {len(errors)} file(s) skipped")
    for path, reason in errors.items():
        print(f"  skipped {path}: {reason}")
    return out
