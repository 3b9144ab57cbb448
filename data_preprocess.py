"""Audio -> VAD -> log-mel features (TI-SV) or fixed-length phrase waveforms (TD-SV), per speaker.

Run as `python data_preprocess.py [flags]`; with no --audio_path it builds and uses the embedded
synthetic corpus. Each speaker is written atomically, so an interrupted run resumes where it
stopped; bad files are skipped and counted with their reason in the split's manifest.json.
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    # Before numpy loads OpenBLAS (the run's BLAS is one thread anyway): each OpenBLAS thread
    # spins for ~0.1 s of CPU when it starts, at import, in each forked worker and when the
    # thread count is restored at exit, taking cores from the workers (10 % of a --workers 2 run).
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import csv
import ctypes
import functools
import gc
import glob
import hashlib
import multiprocessing
import queue
import re
import signal
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm import tqdm

import configuration
import features
import utils

NOISE_SECONDS_PER_FILE = 30.0
SYNTHETIC_PHRASE_PATTERN = r"phrase_\d+\.wav$"
SPEAKER_SKIPPED = "speaker below --min_utterances"  # the kind of a skipped-speaker entry
PR_SET_PDEATHSIG = 1  # Linux prctl option (sys/prctl.h)
CV_TSV = "validated.tsv"  # Common Voice's list of validated clips, one per language
SPEAKER_NAME_LENGTH = 16  # characters of a client_id kept as the speaker name
LANGUAGE_TRIALS = "trials_same_language.txt"
COPY_MARK = "#augment"  # an augmented copy's utterance name: <path>#augment<k>


def find_utterances(root: str | Path) -> dict[str, list[str]]:
    """speaker -> sorted audio paths relative to root; the speaker is the first folder level.
    Symlinked folders are followed (corpus subsets are often built from links), each once."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--audio_path {root}: not a folder")
    tree: dict[str, list[str]] = {}
    seen = set()
    # Plain strings, not Path objects: at VoxCeleb2's million files pathlib costs a minute.
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link loop, or two links to one folder
            subfolders.clear()
            continue
        seen.add(real)
        relative = os.path.relpath(folder, root)
        if relative == os.curdir:
            continue
        speaker = relative.split(os.sep, 1)[0]
        prefix = relative.replace(os.sep, "/") + "/"
        for name in names:
            if (os.path.splitext(name)[1].lower() in features.AUDIO_EXTENSIONS
                    and os.path.isfile(os.path.join(folder, name))):
                tree.setdefault(speaker, []).append(prefix + name)
    if not tree:
        raise FileNotFoundError(f"--audio_path {root}: no <speaker>/**/<file> audio files "
                                f"({', '.join(features.AUDIO_EXTENSIONS)}) and no Common Voice "
                                f"<lang>/{CV_TSV}")
    return {speaker: sorted(paths) for speaker, paths in sorted(tree.items())}


class Corpus(NamedTuple):
    """The utterances found under --audio_path, and what the Common Voice reader knows of them."""

    tree: dict[str, list[str]]  # speaker -> sorted paths relative to the root
    languages: dict[str, str]  # path -> language folder (Common Voice only)
    rows: dict[str, str]  # path -> '<tsv>:<line>' it was listed on (Common Voice only)
    skipped: list[dict]  # unusable TSV lines, which belong to no speaker


def find_corpus(root: str | Path) -> Corpus:
    """Common Voice (ROOT/<lang>/validated.tsv, or one release folder ROOT/validated.tsv with
    ROOT/clips/) when its TSVs are there, else the <speaker>/**/<utt> tree."""
    root = Path(root)
    if (root / CV_TSV).is_file() and (root / "clips").is_dir():
        return read_commonvoice(root, [(root, "", root.resolve().name)])
    folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if any((folder / CV_TSV).is_file() for folder in folders):
        return read_commonvoice(root, [(folder, folder.name + "/", folder.name)
                                       for folder in folders])
    return Corpus(find_utterances(root), {}, {}, [])


def read_commonvoice(root: Path, languages: list[tuple[Path, str, str]]) -> Corpus:
    """Speakers (client_id) and clips of each (folder, path prefix, language)'s validated.tsv;
    a malformed line is skipped with its file and line number, a language without a TSV too."""
    clips: dict[str, list[str]] = {}  # client_id -> paths
    languages_of, rows, skipped = {}, {}, []
    for folder, prefix, language in languages:
        tsv = f"{prefix}{CV_TSV}"
        if not (folder / CV_TSV).is_file():
            skipped.append({"path": prefix.rstrip("/"), "kind": "malformed",
                            "reason": f"{prefix}: a language folder without {CV_TSV}"})
            continue
        for line, client_id, clip, problem in _tsv_rows(folder / CV_TSV):
            path = f"{prefix}clips/{clip}"
            if problem is None and path in rows:
                problem = f"clip already listed on {rows[path]}"
            if problem is not None:
                skipped.append({"path": f"{tsv}:{line}", "kind": "malformed",
                                "reason": f"{tsv} line {line}: {problem}"})
                continue
            clips.setdefault(client_id, []).append(path)
            languages_of[path] = language
            rows[path] = f"{tsv}:{line}"
    if not clips:
        raise FileNotFoundError(f"--audio_path {root}: no usable row in its Common Voice "
                                f"{CV_TSV} files")
    names = speaker_names(list(clips))
    tree = {names[client]: sorted(paths) for client, paths in clips.items()}
    return Corpus(dict(sorted(tree.items())), languages_of, rows, skipped)


def _tsv_rows(tsv: Path) -> Iterator[tuple[int, str, str, str | None]]:
    """(line number, client_id, clip file name, problem or None) of each row after the header.
    Parsed line by line (CRLF or LF), so a stray quote spoils its own line only."""
    lines = tsv.read_bytes().splitlines()
    header = next(csv.reader([lines[0].decode("utf-8-sig", "replace")], delimiter="\t")) \
        if lines else []
    if "client_id" not in header or "path" not in header:
        yield 1, "", "", f"the header {header[:3]}... lacks the client_id and path columns"
        return
    id_column, path_column = header.index("client_id"), header.index("path")
    for number, raw in enumerate(lines[1:], 2):
        if not raw.strip():
            continue
        try:
            fields = next(csv.reader([raw.decode("utf-8")], delimiter="\t", strict=True))
        except UnicodeDecodeError:
            yield number, "", "", "not UTF-8 text"
            continue
        except csv.Error as error:
            yield number, "", "", f"unbalanced CSV quoting ({error})"
            continue
        if len(fields) != len(header):
            yield number, "", "", (f"{len(fields)} tab-separated columns, expected "
                                   f"{len(header)} as in the header")
            continue
        client_id, clip = fields[id_column].strip(), fields[path_column].strip()
        if not client_id:
            yield number, "", "", "empty client_id"
        elif not clip or clip in (".", "..") or "/" in clip or "\\" in clip:
            yield number, "", "", f"path {clip!r} is not a file name in clips/"
        else:
            yield number, client_id, clip, None


def speaker_names(client_ids: list[str]) -> dict[str, str]:
    """client_id -> a short, safe file name: its first 16 characters (client_ids are hex),
    longer until no two collide; a client_id with other characters goes by its SHA-1."""
    safe = {c: c if re.fullmatch(r"[0-9A-Za-z]+", c) else hashlib.sha1(c.encode()).hexdigest()
            for c in client_ids}
    longest = max(len(name) for name in safe.values())
    for length in range(min(SPEAKER_NAME_LENGTH, longest), longest + 1):
        names = {c: name[:length] for c, name in safe.items()}
        if len(set(names.values())) == len(names):
            return names
    raise ValueError("two Common Voice client_ids give one speaker name")


def read_transcripts(root: str | Path) -> dict[str, str]:
    """path -> transcript from <root>/manifest.csv (columns path and text_if_known or text)."""
    manifest = Path(root) / "manifest.csv"
    if not manifest.exists():
        return {}
    with open(manifest, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    column = next((c for c in ("text_if_known", "text", "transcript") if rows and c in rows[0]),
                  None)
    if column is None or "path" not in rows[0]:
        return {}
    return {row["path"]: row[column].strip() for row in rows}


def select_phrase(tree: dict[str, list[str]], transcripts: dict[str, str], phrase: str,
                  pattern: str) -> dict[str, list[str]]:
    """Keep the TD-SV phrase's utterances: transcript equal to phrase and/or path matching pattern."""
    regex = re.compile(pattern) if pattern else None
    wanted = phrase.strip().lower()
    if wanted and not transcripts:
        raise ValueError("--tdsv_phrase needs a manifest.csv with path and text columns in "
                         "--audio_path; use --tdsv_pattern to select by file name instead")
    selected = {}
    for speaker, paths in tree.items():
        keep = [p for p in paths
                if (not wanted or transcripts.get(p, "").lower() == wanted)
                and (regex is None or regex.search(p))]
        if keep:
            selected[speaker] = keep
    if not selected:
        raise ValueError(f"no utterance matches --tdsv_phrase {phrase!r} / --tdsv_pattern "
                         f"{pattern!r}")
    return selected


def perturbed_name(speaker: str, factor: float) -> str:
    """The new speaker that --speed_perturb makes of `speaker` at `factor`."""
    return f"{speaker}_sp{factor:g}"


def split_speakers(speakers: list[str], test_ratio: float, seed: int, folds: int = 0,
                   fold: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic (seeded) speaker split into train and test; both get at least one speaker.
    With folds > 0 the test split is fold `fold` of the seeded order (k-fold cross-validation)."""
    if len(speakers) < 2:
        raise ValueError(f"need at least 2 speakers to split into train and test, "
                         f"found {len(speakers)}")
    order = np.random.default_rng(seed).permutation(sorted(speakers)).tolist()
    if folds:
        if not 2 <= folds <= len(speakers) or fold >= folds:
            raise ValueError(f"--folds {folds} --fold {fold}: expected 2 <= --folds <= "
                             f"{len(speakers)} speakers and --fold < --folds")
        # Rounded boundaries make fold 0 the same speakers as --test_ratio 1/folds.
        edges = [int(round(k * len(speakers) / folds)) for k in range(folds + 1)]
        test = order[edges[fold]:edges[fold + 1]]
        return sorted(set(order) - set(test)), sorted(test)
    n_test = min(max(1, int(round(test_ratio * len(speakers)))), len(speakers) - 1)
    return sorted(order[n_test:]), sorted(order[:n_test])


def _speaker_job(job: tuple) -> tuple[str, str, bool, list[dict]]:
    """Process one speaker (at one speed) into out_dir, skipped if already complete. Returns
    (split, speaker name written, usable, skipped files)."""
    split, root, speaker, speed, paths, out_dir, config, meta = job
    return (split, *_process_speaker(root, speaker, speed, paths, Path(out_dir), config, meta))


def run_jobs(jobs: list[tuple], workers: int) -> Iterator[tuple]:
    """_speaker_job of each job, in the order they finish: in this process with --workers 1,
    else in `workers` processes (one start for both splits: a start costs up to a second)."""
    if workers == 1:
        features.keep_freed_memory()
        yield from map(_speaker_job, jobs)
        return
    context = _worker_context()
    next_job = context.Value("i", 0)
    results = context.Queue()
    processes = [context.Process(target=_worker, args=(jobs, next_job, results, os.getpid()),
                                 daemon=True) for _ in range(workers)]
    for process in processes:
        process.start()
    finished = False
    try:
        for _ in jobs:
            result = _next_result(results, processes)
            if isinstance(result, BaseException):
                raise result
            yield result
        finished = True
    finally:
        for process in processes:
            if not finished:  # an error, or the caller stopped early: its files stay atomic
                process.terminate()
            process.join()


def _worker(jobs: list[tuple], next_job, results, parent: int) -> None:
    """One --workers process: takes the next job from the shared counter until none is left,
    or the parent is gone (killed). No task queue: the parent only collects results, so it
    takes no CPU from the workers."""
    _die_with_parent()
    _worker_start()
    while os.getppid() == parent:
        with next_job.get_lock():
            index = next_job.value
            next_job.value += 1
        if index >= len(jobs):
            return
        try:
            results.put(_speaker_job(jobs[index]))
        except Exception as error:  # re-raised by the parent, as multiprocessing.Pool does
            results.put(error)
            return


def _die_with_parent() -> None:
    """On Linux, be killed with the parent: a re-run started right after `kill -9` must not
    race a worker of the killed run that is still writing (elsewhere the worker stops after its
    speaker, when it sees the parent gone)."""
    prctl = getattr(ctypes.CDLL(None), "prctl", None) if sys.platform == "linux" else None
    if prctl is not None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _next_result(results, processes: list) -> tuple | BaseException:
    """The next result from the workers; an error if one of them died without giving one."""
    while True:
        try:
            return results.get(timeout=1.0)
        except queue.Empty:
            dead = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
            if dead or not any(p.is_alive() for p in processes):
                raise RuntimeError(f"a --workers process exited with code {dead[0] if dead else 0}"
                                   " before its speaker was written; re-run to resume (finished "
                                   "speakers are kept)") from None


def _worker_start() -> None:
    """Worker start-up: one BLAS thread (more only slow the small mel matmuls down and spin
    against the other workers; set once, as each call scans the loaded libraries), freed memory
    kept."""
    threadpool_limits(limits=1, user_api="blas")
    features.keep_freed_memory()


def _speaker_meta(corpus: Corpus, paths: list[str]) -> dict:
    """What a speaker's job needs to know of its paths beyond the audio: the Common Voice TSV
    line each came from (named in its skip entry) and its language (kept in the sidecar)."""
    if not corpus.rows:
        return {}
    return {"rows": {p: corpus.rows[p] for p in paths},
            "languages": {p: corpus.languages[p] for p in paths}}


def _skip_entry(relative: str, error: features.AudioError, meta: dict, speed: float) -> dict:
    """A bad file's manifest entry; a Common Voice clip's names its TSV line."""
    row = meta.get("rows", {}).get(relative)
    return {"path": relative, "kind": error.kind,
            "reason": "{} line {}: {}".format(*row.rsplit(":", 1), error) if row else str(error),
            **({"row": row} if row else {}), **({"speed": speed} if speed != 1.0 else {})}


def _process_speaker(root: str, speaker: str, speed: float, paths: list[str], out_dir: Path,
                     config: argparse.Namespace, meta: dict) -> tuple[str, bool, list[dict]]:
    settings = features.feature_settings(config) | meta.get("augment", {})
    if speed != 1.0:
        speaker = perturbed_name(speaker, speed)
        settings["speed"] = speed
    if meta.get("babble"):
        settings["babble"] = meta["babble"]
    sidecar = out_dir / f"{speaker}.json"
    done = _finished_speaker(sidecar, out_dir / f"{speaker}.npy", settings, paths)
    if done is not None:
        return speaker, bool(done["utterances"]), done["skipped"]
    copies = settings.get("augment", 0)
    if copies:
        # Imported when used: pyroomacoustics and scipy.signal take ~1 s to import.
        import augment
    noise, talkers = _augmentation_noise(root, meta, config) if copies else (None, [])
    arrays, kept, sources, skipped, spans, recipes = [], [], [], [], [], {}
    for relative in paths:
        try:
            wav = features.load_audio(Path(root) / relative, config.sr)
            if speed != 1.0:
                wav = features.speed_perturb(wav, speed, config.sr)
            span = features.phrase_span(wav, config) if config.tdsv else None
            arrays.append(features.centred_phrase(wav, span, config) if config.tdsv
                          else features.voiced_features(wav, config))
        except features.AudioError as error:
            # Each speed copy of a bad file is its own entry: one per file written (or not).
            skipped.append(_skip_entry(relative, error, meta, speed))
            continue
        kept.append(relative)
        sources.append(relative)
        for copy in range(1, copies + 1):
            # The phrase is where it was in the clean recording: the room delays it ~1 ms.
            signal, recipe = augment.augmented_copy(
                wav, config.sr, augment.copy_rng(config.seed, speaker, relative, copy),
                config.augment_snr_db, noise, talkers)
            try:
                arrays.append(features.centred_phrase(signal, span, config) if config.tdsv
                              else features.voiced_features(signal, config))
            except features.AudioError as error:
                skipped.append(_skip_entry(relative, error, meta, speed) | {"copy": copy})
                continue
            kept.append(f"{relative}{COPY_MARK}{copy}")
            sources.append(relative)
            recipes[kept[-1]] = recipe
        if config.tdsv:
            spans += [features.phrase_frames(span, config)] * (len(kept) - len(spans))
    originals = len(set(sources))
    usable = originals >= config.min_utterances
    if not usable:
        skipped.append({"path": speaker, "kind": SPEAKER_SKIPPED,
                        "reason": f"{originals} usable utterances, expected at least "
                                  f"--min_utterances {config.min_utterances}"})
        kept, sources, arrays, spans, recipes = [], [], [], [], {}
    else:
        stacked = np.stack(arrays) if config.tdsv else np.concatenate(arrays)
        utils.atomic_save_npy(out_dir / f"{speaker}.npy", stacked)
    utils.atomic_save_json(sidecar, {
        "settings": settings, "paths": paths, "utterances": kept, "skipped": skipped,
        "lengths": [len(a) for a in arrays],
        **({"languages": [meta["languages"][p] for p in sources]} if "languages" in meta else {}),
        **({"augmented": recipes} if copies else {}),
        **({"phrase_frames": spans} if config.tdsv else {})})
    return speaker, usable, skipped


def augmentation_settings(config: argparse.Namespace) -> dict:
    """What --augment's copies depend on, for the training split's settings (a change redoes
    the speakers); empty without --augment."""
    if not config.augment:
        return {}
    import augment

    return {"augment": config.augment, "augment_snr_db": list(config.augment_snr_db),
            "augment_seed": config.seed, "augment_rt60_s": list(augment.RT60_S),
            "augment_room_m": [list(side) for side in augment.ROOM_SIZE_M],
            "augment_noise": (str(Path(config.noise_path).resolve()) if config.noise_path
                              else "generated"),
            **({"noise_filenum": config.noise_filenum} if config.noise_path else {})}


def babble_sources(tree: dict[str, list[str]], train_speakers: list[str], speaker: str,
                   seed: int) -> list[str]:
    """One utterance each of a few other training speakers: the babble of speaker's copies."""
    import augment

    others = [s for s in train_speakers if s != speaker]
    rng = augment.copy_rng(seed, speaker, "babble", 0)
    chosen = sorted(rng.choice(len(others), min(augment.BABBLE_TALKERS, len(others)),
                               replace=False).tolist())
    return [tree[others[i]][int(rng.integers(len(tree[others[i]])))] for i in chosen]


def _augmentation_noise(root: str, meta: dict, config: argparse.Namespace
                        ) -> tuple[np.ndarray | None, list[np.ndarray]]:
    """(the --noise_path stream or None, the babble talkers' waveforms) of a speaker's copies."""
    if config.noise_path:
        return _noise_stream(config.noise_path, config.noise_filenum, config.sr)[0], []
    talkers = []
    for relative in meta.get("babble", []):
        try:
            talkers.append(features.load_audio(Path(root) / relative, config.sr))
        except features.AudioError:  # counted where its own speaker is processed
            pass
    return None, talkers


@functools.lru_cache(maxsize=1)
def _noise_stream(noise_path: str, noise_filenum: int, sr: int) -> tuple[np.ndarray, list[dict]]:
    """build_noise, once per process (forked --workers inherit the parent's)."""
    return build_noise(argparse.Namespace(noise_path=noise_path, noise_filenum=noise_filenum,
                                          sr=sr))


def _finished_speaker(sidecar: Path, array: Path, settings: dict, paths: list[str]
                      ) -> dict | None:
    """The sidecar of a speaker completed with these settings and files, else None (redo it)."""
    try:
        done = configuration.load_config(sidecar)
    except ValueError:  # missing, or left unreadable by something other than this program
        return None
    complete = (done.get("settings") == settings and done.get("paths") == paths
                and isinstance(done.get("utterances"), list)
                and isinstance(done.get("skipped"), list)
                # written before phrase lengths were recorded: redo, so the manifest counts them
                and (settings["kind"] != "tdsv" or isinstance(done.get("phrase_frames"), list)))
    if not complete or (done["utterances"] and not array.exists()):
        return None
    return done


def skip_summary(skipped: list[dict]) -> str:
    """'3 files (2 unreadable, 1 silent) and 1 speaker' for a summary line."""
    kinds = Counter(entry.get("kind", "other") for entry in skipped)
    speakers = kinds.pop(SPEAKER_SKIPPED, 0)
    files = sum(kinds.values())
    detail = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items()))
    text = f"{files} file{'s' * (files != 1)}" + (f" ({detail})" if detail else "")
    if speakers:
        text += (f" and {speakers} speaker{'s' * (speakers != 1)} with too few usable "
                 f"utterances")
    return text


def find_noise_files(noise_path: str | Path) -> list[tuple[Path, Path | None]]:
    """(noise or noisy file, clean partner or None) for every audio file under noise_path."""
    files = sorted(p for p in Path(noise_path).rglob("*")
                   if p.suffix.lower() in features.AUDIO_EXTENSIONS and p.is_file())
    if not files:
        raise FileNotFoundError(f"--noise_path {noise_path}: no audio files "
                                f"({', '.join(features.AUDIO_EXTENSIONS)})")
    by_name = {p.name: p for p in files}
    found = []
    for path in files:
        if "_clean" in path.stem:
            continue
        clean = by_name.get(path.name.replace("_noisy", "_clean")) if "_noisy" in path.stem \
            else None
        found.append((path, clean))
    return found


def build_noise(config: argparse.Namespace) -> tuple[np.ndarray, list[dict]]:
    """One RMS-normalised noise stream from --noise_path: noise files, or noisy minus clean."""
    pieces, skipped = [], []
    limit = int(NOISE_SECONDS_PER_FILE * config.sr)
    for noisy, clean in find_noise_files(config.noise_path)[:config.noise_filenum]:
        try:
            noise = features.load_audio(noisy, config.sr)
            if clean is not None:
                reference = features.load_audio(clean, config.sr)
                n = min(len(noise), len(reference))
                noise = noise[:n] - reference[:n]
            noise = noise[:limit]
            rms = float(np.sqrt(np.mean(noise ** 2)))
            if rms < 1e-6:
                raise features.AudioError("no noise", "noisy and clean files are identical")
            pieces.append(noise / rms)
        except features.AudioError as error:
            skipped.append({"path": str(noisy), "kind": error.kind, "reason": str(error)})
    if not pieces:
        raise ValueError(f"--noise_path {config.noise_path}: no usable noise file")
    return np.concatenate(pieces).astype(np.float32), skipped


def shard_name(shard: int, num_shards: int) -> str:
    return f"manifest.shard-{shard}-of-{num_shards}.json"


def merge_shards(out_dir: str | Path) -> dict:
    """Merge the shard manifests in out_dir into the manifest.json that training reads."""
    out_dir = Path(out_dir)
    found = sorted(out_dir.glob("manifest.shard-*-of-*.json"))
    if not found:
        raise FileNotFoundError(f"--merge: no manifest.shard-*-of-*.json in {out_dir}")
    shards = [configuration.load_config(file) for file in found]
    num_shards = {shard.get("num_shards") for shard in shards}
    present = {shard.get("shard") for shard in shards}
    if len(num_shards) != 1:
        raise ValueError(f"--merge: {out_dir} mixes runs with different --num_shards "
                         f"{sorted(num_shards, key=str)}; delete the stale shard manifests")
    total = num_shards.pop()
    missing = sorted(set(range(total)) - present)
    if missing:
        raise ValueError(f"--merge: {out_dir} lacks shard(s) {missing} of {total}; run them "
                         f"(--shard i --num_shards {total}) or copy their output here")
    for shard in shards[1:]:
        if (shard["settings"], shard["source"]) != (shards[0]["settings"], shards[0]["source"]):
            raise ValueError(f"--merge: the shards in {out_dir} were preprocessed from different "
                             f"corpora or with different feature settings")
    manifest = {"settings": shards[0]["settings"], "source": shards[0]["source"],
                "split": shards[0]["split"],
                "speakers": sorted(s for shard in shards for s in shard["speakers"]),
                "skipped": sorted((e for shard in shards for e in shard["skipped"]),
                                  key=lambda entry: entry["path"])}
    if manifest["settings"].get("kind") == "tdsv":
        manifest["phrase_frames"] = _written_phrase_lengths(
            out_dir, manifest["speakers"], manifest["settings"]["tdsv_frame"])
    for shard in shards:
        if "noise_seconds" in shard:
            manifest["noise_seconds"] = shard["noise_seconds"]
    utils.atomic_save_json(out_dir / "manifest.json", manifest)
    if manifest["split"] == "test":
        write_language_trials(out_dir, manifest["speakers"])
    return manifest


def write_language_trials(out_dir: Path, speakers: list[str]) -> None:
    """Common Voice: every pair of the test split's utterances in one language, as a VoxCeleb
    trial list (`1|0 enrol test`, paths relative to --audio_path) in out_dir; else nothing."""
    by_language: dict[str, list[tuple[str, str]]] = {}
    for speaker in speakers:
        done = configuration.load_config(out_dir / f"{speaker}.json")
        if "languages" not in done:
            return
        for path, language in zip(done["utterances"], done["languages"]):
            by_language.setdefault(language, []).append((path, speaker))
    lines = []
    for language in sorted(by_language):
        found = sorted(by_language[language])
        lines += [f"{int(a[1] == b[1])} {a[0]} {b[0]}"
                  for i, a in enumerate(found) for b in found[i + 1:]]
    trials = out_dir / LANGUAGE_TRIALS
    tmp = trials.with_name(f"{trials.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, trials)
    targets = sum(line.startswith("1") for line in lines)
    print(f"test: {len(lines)} same-language trials ({targets} target) of "
          f"{len(by_language)} languages written to {trials}")


def _remove_leftovers(out_dir: Path, speakers: list[str], sharded: bool) -> None:
    """Delete the temp files of a killed run: all of them, or only this shard's own."""
    if not sharded:
        for leftover in out_dir.glob("*.tmp"):
            leftover.unlink(missing_ok=True)
        return
    for speaker in speakers:
        for leftover in out_dir.glob(f"{glob.escape(speaker)}.*.tmp"):
            leftover.unlink(missing_ok=True)


def preprocess(config: argparse.Namespace) -> dict:
    """Preprocess --audio_path (or the synthetic corpus) into --train_path and --test_path.

    With --num_shards n, this run does every n-th speaker (--shard); the shard that finds all
    n shard manifests written merges them into manifest.json.
    """
    root = config.audio_path
    if not root:
        # Imported here: scipy.signal costs each spawned --workers process almost a second.
        import synthetic_corpus

        root = synthetic_corpus.build(config.synthetic_path, sr=config.sr, seed=config.seed)
        if config.tdsv and not (config.tdsv_phrase or config.tdsv_pattern):
            config.tdsv_pattern = SYNTHETIC_PHRASE_PATTERN
    corpus = find_corpus(root)
    tree = corpus.tree
    if config.tdsv:
        if not (config.tdsv_phrase or config.tdsv_pattern):
            raise ValueError("--tdsv True needs --tdsv_phrase or --tdsv_pattern to pick the phrase")
        tree = select_phrase(tree, read_transcripts(root), config.tdsv_phrase, config.tdsv_pattern)
    train_speakers, test_speakers = split_speakers(list(tree), config.test_ratio, config.seed,
                                                   config.folds, config.fold)
    sharded = config.num_shards > 1
    augmenting = augmentation_settings(config)
    if augmenting and config.noise_path:
        _noise_stream(config.noise_path, config.noise_filenum, config.sr)  # fails before any job

    summary = {"source": str(Path(root).resolve()), "settings": features.feature_settings(config)}
    splits = {}
    jobs = []
    for split, speakers, out_dir in (("train", train_speakers, config.train_path),
                                     ("test", test_speakers, config.test_path)):
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        speakers = speakers[config.shard::config.num_shards]
        speeds = [1.0, *config.speed_perturb] if split == "train" else [1.0]
        # A run killed mid-write leaves its temp files; the finished files are all renamed ones.
        _remove_leftovers(out_dir, [s if speed == 1.0 else perturbed_name(s, speed)
                                    for s in speakers for speed in speeds], sharded)
        if sharded:
            (out_dir / "manifest.json").unlink(missing_ok=True)  # stale until all shards are in
        splits[split] = (out_dir, speakers, len(speeds))
        for s in speakers:
            meta = _speaker_meta(corpus, tree[s])
            if split == "train" and augmenting:
                meta["augment"] = augmenting
                if not config.noise_path:
                    meta["babble"] = babble_sources(tree, train_speakers, s, config.seed)
            jobs += [(split, root, s, speed, tree[s], out_dir, config, meta) for speed in speeds]
    # One queue for both splits, largest speakers first: no worker idles at the end of a split
    # or waits on one long speaker started last.
    jobs.sort(key=lambda job: -_audio_bytes(root, job[4]))
    usable = {split: [] for split in splits}
    skipped = {split: [] for split in splits}
    with threadpool_limits(limits=1, user_api="blas"):
        for split, speaker, ok, bad in tqdm(run_jobs(jobs, config.workers), total=len(jobs),
                                            desc="preprocess", unit="speaker",
                                            dynamic_ncols=True):
            if ok:
                usable[split].append(speaker)
            skipped[split].extend(bad)
    for split, (out_dir, speakers, copies) in splits.items():
        # Sorted: with --workers > 1 speakers finish in any order, the manifest must not vary.
        settings = features.feature_settings(config) | (augmenting if split == "train" else {})
        manifest = {"settings": settings, "source": summary["source"],
                    "split": split, "speakers": sorted(usable[split]),
                    "skipped": sorted(skipped[split], key=lambda entry: entry["path"])}
        # Augmented copies count as files: each is skipped (or written) on its own.
        n_files = copies * sum(len(tree[s]) for s in speakers) * (
            1 + config.augment * (split == "train"))
        if split == "train" and config.shard == 0:
            manifest["skipped"] = sorted(manifest["skipped"] + corpus.skipped,
                                         key=lambda entry: entry["path"])
            n_files += len(corpus.skipped)
        if split == "train" and (config.tdsv or augmenting) and config.noise_path \
                and config.shard == 0:
            noise, bad_noise = _noise_stream(config.noise_path, config.noise_filenum, config.sr)
            if config.tdsv:
                utils.atomic_save_npy(out_dir / "noise.npy", noise)
                manifest["noise_seconds"] = len(noise) / config.sr
            manifest["skipped"].extend(bad_noise)
        if config.tdsv:
            manifest["phrase_frames"] = _written_phrase_lengths(out_dir, usable[split],
                                                                config.tdsv_frame)
        shard_text = f" (shard {config.shard} of {config.num_shards})" if sharded else ""
        manifest_file = out_dir / (shard_name(config.shard, config.num_shards) if sharded
                                   else "manifest.json")
        if sharded:
            manifest.update(shard=config.shard, num_shards=config.num_shards)
        utils.atomic_save_json(manifest_file, manifest)
        print(f"{split}{shard_text}: {len(usable[split])} of {copies * len(speakers)} speakers "
              f"written to {out_dir}; skipped {skip_summary(manifest['skipped'])} of {n_files} files "
              f"(reasons in {manifest_file})")
        cut = manifest.get("phrase_frames", {}).get("longer_than_tdsv_frame", 0)
        if cut:
            summary_frames = manifest["phrase_frames"]
            print(f"{split}{shard_text}: {cut} of {summary_frames['phrases']} phrases are longer "
                  f"than --tdsv_frame {config.tdsv_frame} frames and were cut to it (phrase "
                  f"lengths: median {summary_frames['median']}, 90th percentile "
                  f"{summary_frames['p90']} frames; --tdsv_frame {summary_frames['p90']} would "
                  f"keep 90 % of them whole)")
        if sharded:
            manifest = _merge_if_complete(out_dir, config.num_shards)
        elif split == "test":
            write_language_trials(out_dir, manifest["speakers"])
        summary[split] = manifest
    return summary


def phrase_length_summary(lengths: list[int], tdsv_frame: int) -> dict:
    """How long the VAD-trimmed phrases are, in frames, and how many a --tdsv_frame window cuts."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if not lengths.size:
        return {"phrases": 0, "longer_than_tdsv_frame": 0}
    return {"phrases": int(lengths.size), "median": int(np.median(lengths)),
            # rounded up, so that a window of p90 frames does hold 90 % of the phrases
            "p90": int(np.ceil(np.percentile(lengths, 90))), "max": int(lengths.max()),
            "longer_than_tdsv_frame": int(np.sum(lengths > tdsv_frame))}


def _written_phrase_lengths(out_dir: Path, speakers: list[str], tdsv_frame: int) -> dict:
    """phrase_length_summary of the phrases written for these speakers (from their sidecars)."""
    return phrase_length_summary([n for speaker in speakers for n in configuration.load_config(
        out_dir / f"{speaker}.json").get("phrase_frames", [])], tdsv_frame)


def _audio_bytes(root: str | Path, paths: list[str]) -> int:
    """A speaker's audio size on disk: the cost estimate that orders the jobs."""
    total = 0
    for relative in paths:
        try:
            total += os.path.getsize(Path(root) / relative)
        except OSError:  # reported as unreadable when the speaker is processed
            pass
    return total


def _merge_if_complete(out_dir: Path, num_shards: int) -> dict | None:
    """The merged manifest once every shard has written its own, else None."""
    if not all((out_dir / shard_name(i, num_shards)).exists() for i in range(num_shards)):
        return None
    manifest = merge_shards(out_dir)
    print(f"all {num_shards} shards done: merged into {out_dir / 'manifest.json'}")
    return manifest


def _worker_context() -> multiprocessing.context.BaseContext:
    """fork where it is safe: forked workers start with every module imported (spawned ones
    import them again, ~0.6 s each). TensorFlow's threads in this process make fork unsafe."""
    if sys.platform == "linux" and "tensorflow" not in sys.modules:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def main(argv: list[str] | None = None) -> int:
    config = configuration.parse_config(argv)
    try:
        if config.merge:
            for path in (config.train_path, config.test_path):
                manifest = merge_shards(path)
                print(f"merged {len(manifest['speakers'])} speakers into "
                      f"{Path(path) / 'manifest.json'}")
            return 0
        summary = preprocess(config)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for split in ("train", "test"):
        if summary[split] is not None and not summary[split]["speakers"]:
            manifest = Path(getattr(config, f"{split}_path")) / "manifest.json"
            print(f"error: no usable {split} speaker was left after skipping bad files "
                  f"(reasons in {manifest})", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    status = main()
    # Nothing is left to free, yet the exit's garbage collections would walk every object of the
    # loaded modules: the exit takes 0.09-0.10 s without this, 0.02 s with it.
    gc.freeze()
    sys.exit(status)
