"""The commands that use a trained model on recordings: enroll, verify, identify, verify a list of
pairs, embed a folder. Each is a thin printer over the Python API (ge2e.py); run() picks the one
the command line names."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

import ge2e
import utils


def run(config: argparse.Namespace) -> None:
    """Load the model once and run the use command given: --enroll, --verify, --pairs,
    --identify or --embed."""
    model = ge2e.DVectorModel(config)
    if config.enroll:
        enroll(model, config.enroll, config.audio, config.extend)
    elif config.embed:
        embed_folder(model, Path(config.audio_path), Path(config.out))
    elif config.identify:
        identify(model, config.audio)
    else:
        pairs = (read_pairs(config.pairs) if config.pairs
                 else [(config.verify, probe) for probe in config.audio])
        verify_pairs(model, model.decide_threshold(config.threshold, config.threshold_from),
                     pairs)


def enroll(model: ge2e.DVectorModel, name: str, audio: list[str], extend: bool) -> str:
    """Embed the files and store (or extend) the speaker's profile."""
    action = model.enroll(name, audio, extend=extend)
    print(f"{action} {name!r} with {len(model.profile(name))} file(s) -> "
          f"{utils.record_path(model.profiles_path / (name + '.json'))}")
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


def verify_pairs(model: ge2e.DVectorModel, decided: tuple[float, str],
                 pairs: list[tuple[str, str]]) -> list[ge2e.Decision]:
    """Score each (profile, probe) pair at the threshold decided: one line each (after the
    threshold's source), then a summary when there are several."""
    threshold, source = decided
    speakers = {name: ge2e.speaker_model(model.profile(name))
                for name in sorted({n for n, _ in pairs})}
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


def identify(model: ge2e.DVectorModel, audio: list[str]) -> dict[str, list[tuple[str, float]]]:
    """Rank every enrolled profile against each file (the whole ranking for one file, the best
    three for several), then a summary."""
    profiles = model.speaker_models()
    started = time.perf_counter()
    vectors = _embed_probes(model, audio)
    rankings = {probe: model.identify(vectors[probe], profiles) for probe in audio
                if probe in vectors}
    for probe, ranking in rankings.items():
        if len(audio) == 1:
            print(f"{probe}:")
            for rank, (name, score) in enumerate(ranking, 1):
                print(f"  {rank}. {name:20s} {score:.4f}")
        else:
            print(f"{probe}: " + ", ".join(f"{rank}. {name} {score:.4f}"
                                            for rank, (name, score) in enumerate(ranking[:3], 1)))
    if len(audio) > 1:
        print(f"{len(rankings)} identified; {len(audio) - len(rankings)} skipped; "
              f"{len(rankings) / (time.perf_counter() - started):.1f} probes/s")
    return rankings


def audio_files(root: Path) -> list[Path]:
    """Every audio file under root, following symlinked folders, in sorted order."""
    found = []
    for folder, _, names in os.walk(root, followlinks=True):
        found += [Path(folder) / n for n in names if Path(n).suffix.lower() in utils.AUDIO_EXTENSIONS]
    return sorted(found)


def embed_folder(model: ge2e.DVectorModel, root: Path, out: Path) -> Path:
    """d-vectors of every audio file under root, saved with their relative paths to out (.npz)."""
    files = audio_files(root)
    vectors, errors = model.embed_files_or_errors(files)
    if not vectors:
        path, reason = next(iter(errors.items()))
        raise ValueError(f"--audio_path {root}: no usable audio ({path}: {reason})")
    names = [f for f in map(str, files) if f in vectors]
    out.parent.mkdir(parents=True, exist_ok=True)
    utils.atomic_save_npz(out, paths=np.array([Path(n).relative_to(root).as_posix() for n in names],
                                              dtype=str),
                          d_vectors=np.stack([vectors[n] for n in names]))
    print(f"{len(names)} d-vectors -> {out}; {len(errors)} file(s) skipped")
    for path, reason in errors.items():
        print(f"  skipped {path}: {reason}")
    return out
