"""Audio -> VAD -> log-mel features (TI-SV) or fixed-length phrase waveforms (TD-SV), per speaker.

Run as `python data_preprocess.py [flags]`; with no --audio_path it builds and uses the embedded
synthetic corpus. Each speaker is written atomically, so an interrupted run resumes where it
stopped; bad files are skipped and counted with their reason in the split's manifest.json.
The corpus layouts are read in corpora.py; the --workers pool is workers.py.
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    # Before numpy loads OpenBLAS (the run's BLAS is one thread anyway): each OpenBLAS thread
    # spins for ~0.1 s of CPU when it starts, at import, in each forked worker and when the
    # thread count is restored at exit, taking cores from the workers (10 % of a --workers 2 run).
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import functools
import gc
import glob
import re
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm import tqdm

import configuration
import corpora
import features
import utils
import workers
from configuration import Features, Preprocessing

NOISE_SECONDS_PER_FILE = 30.0
SYNTHETIC_PHRASE_PATTERN = r"phrase_\d+\.wav$"
SPEAKER_SKIPPED = "speaker below --min_utterances"  # the kind of a skipped-speaker entry
LANGUAGE_TRIALS = "trials_same_language.txt"
TEXT_TRIALS = "trials_same_text.txt"  # TD corpora (keywords, digits, words): same-text pairs
COPY_MARK = "#augment"  # an augmented copy's utterance name: <path>#augment<k>


@dataclass(frozen=True)
class SpeakerJob:
    """One speaker at one speed, to be written into out_dir: what a --workers process does."""

    split: str
    root: str
    speaker: str
    speed: float
    paths: list[str]  # relative to root, in the corpus's order
    out_dir: Path
    front: Features
    data: Preprocessing
    noise_path: str  # --noise_path, or the corpus's own noise folder standing in for it
    rows: dict[str, str]  # path -> '<tsv>:<line>' it was listed on (Common Voice): in skip entries
    languages: dict[str, str]  # path -> language (Common Voice): kept in the sidecar
    texts: dict[str, str]  # path -> text, when the corpus knows every one: kept in the sidecar
    settings: dict  # the split's feature_settings, with augmentation_settings for training
    babble: list[str]  # other training speakers' utterances: the babble of the copies


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


def speaker_jobs(split: str, root: str, corpus: corpora.Corpus, tree: dict[str, list[str]],
                 speakers: list[str], speeds: list[float], out_dir: Path, front: Features,
                 data: Preprocessing, noise_path: str, settings: dict,
                 train_speakers: list[str]) -> list[SpeakerJob]:
    """The jobs of one split's speakers, one per speed; settings are the split's (augmented
    when they have augmentation_settings)."""
    jobs = []
    for speaker in speakers:
        paths = tree[speaker]
        # Only this speaker's share of the corpus: spawned workers are sent every job.
        rows = {p: corpus.rows[p] for p in paths} if corpus.rows else {}
        languages = {p: corpus.languages[p] for p in paths} if corpus.rows else {}
        texts = ({p: corpus.texts[p] for p in paths}
                 if all(p in corpus.texts for p in paths) else {})
        babble = (babble_sources(tree, train_speakers, speaker, data.seed)
                  if settings.get("augment") and not noise_path else [])
        jobs += [SpeakerJob(split, root, speaker, speed, paths, out_dir, front, data, noise_path,
                            rows, languages, texts, settings, babble) for speed in speeds]
    return jobs


def _speaker_job(job: SpeakerJob) -> tuple[str, str, bool, list[dict]]:
    """Process one speaker (at one speed) into out_dir, skipped if already complete. Returns
    (split, speaker name written, usable, skipped files)."""
    return (job.split, *_process_speaker(job))


def run_jobs(jobs: list[SpeakerJob], count: int) -> Iterator[tuple]:
    """_speaker_job of each job, in the order they finish: in this process with --workers 1,
    else in `count` processes (one start for both splits: a start costs up to a second)."""
    if count == 1:
        features.keep_freed_memory()
        yield from map(_speaker_job, jobs)
        return
    yield from workers.run(_speaker_job, jobs, count, _worker_start)


def _worker_start() -> None:
    """Worker start-up: one BLAS thread (more only slow the small mel matmuls down and spin
    against the other workers; set once, as each call scans the loaded libraries), freed memory
    kept."""
    threadpool_limits(limits=1, user_api="blas")
    features.keep_freed_memory()


def _skip_entry(relative: str, error: features.AudioError, job: SpeakerJob) -> dict:
    """A bad file's manifest entry; a Common Voice clip's names its TSV line."""
    row = job.rows.get(relative)
    return {"path": relative, "kind": error.kind,
            "reason": "{} line {}: {}".format(*row.rsplit(":", 1), error) if row else str(error),
            **({"row": row} if row else {}),
            **({"speed": job.speed} if job.speed != 1.0 else {})}


def _process_speaker(job: SpeakerJob) -> tuple[str, bool, list[dict]]:
    """Write one job's features and sidecar (or only the sidecar, if too few files are usable).
    Returns (speaker name written, usable, skipped files)."""
    root, speed, paths, out_dir = job.root, job.speed, job.paths, job.out_dir
    front, data, speaker = job.front, job.data, job.speaker
    settings = dict(job.settings)
    if speed != 1.0:
        speaker = perturbed_name(speaker, speed)
        settings["speed"] = speed
    if job.babble:
        settings["babble"] = job.babble
    sidecar = out_dir / f"{speaker}.json"
    done = _finished_speaker(sidecar, out_dir / f"{speaker}.npy", settings, paths)
    if done is not None:
        return speaker, bool(done["utterances"]), done["skipped"]
    copies = settings.get("augment", 0)
    if copies:
        # Imported when used: pyroomacoustics and scipy.signal take ~1 s to import.
        import augment
    noise, talkers = _augmentation_noise(job) if copies else (None, [])
    arrays, kept, sources, skipped, spans, recipes = [], [], [], [], [], {}
    for relative in paths:
        try:
            wav = features.load_audio(Path(root) / relative, front.sr)
            if speed != 1.0:
                wav = features.speed_perturb(wav, speed, front.sr)
            span = features.phrase_span(wav, front) if front.tdsv else None
            arrays.append(features.centred_phrase(wav, span, front) if front.tdsv
                          else features.voiced_features(wav, front))
        except features.AudioError as error:
            # Each speed copy of a bad file is its own entry: one per file written (or not).
            skipped.append(_skip_entry(relative, error, job))
            continue
        kept.append(relative)
        sources.append(relative)
        for copy in range(1, copies + 1):
            # The phrase is where it was in the clean recording: the room delays it ~1 ms.
            signal, recipe = augment.augmented_copy(
                wav, front.sr, augment.copy_rng(data.seed, speaker, relative, copy),
                data.augment_snr_db, noise, talkers)
            try:
                arrays.append(features.centred_phrase(signal, span, front) if front.tdsv
                              else features.voiced_features(signal, front))
            except features.AudioError as error:
                skipped.append(_skip_entry(relative, error, job) | {"copy": copy})
                continue
            kept.append(f"{relative}{COPY_MARK}{copy}")
            sources.append(relative)
            recipes[kept[-1]] = recipe
        if front.tdsv:
            spans += [features.phrase_frames(span, front)] * (len(kept) - len(spans))
    originals = len(set(sources))
    usable = originals >= data.min_utterances
    if not usable:
        skipped.append({"path": speaker, "kind": SPEAKER_SKIPPED,
                        "reason": f"{originals} usable utterances, expected at least "
                                  f"--min_utterances {data.min_utterances}"})
        kept, sources, arrays, spans, recipes = [], [], [], [], {}
    else:
        stacked = np.stack(arrays) if front.tdsv else np.concatenate(arrays)
        utils.atomic_save_npy(out_dir / f"{speaker}.npy", stacked)
    utils.atomic_save_json(sidecar, {
        "settings": settings, "paths": paths, "utterances": kept, "skipped": skipped,
        "lengths": [len(a) for a in arrays],
        **({"languages": [job.languages[p] for p in sources]} if job.languages else {}),
        **({"texts": [job.texts[p] for p in sources]} if job.texts else {}),
        **({"augmented": recipes} if copies else {}),
        **({"phrase_frames": spans} if front.tdsv else {})})
    return speaker, usable, skipped


def augmentation_settings(data: Preprocessing, noise_path: str) -> dict:
    """What --augment's copies depend on, for the training split's settings (a change redoes
    the speakers); empty without --augment."""
    if not data.augment:
        return {}
    import augment

    return {"augment": data.augment, "augment_snr_db": list(data.augment_snr_db),
            "augment_seed": data.seed, "augment_rt60_s": list(augment.RT60_S),
            "augment_room_m": [list(side) for side in augment.ROOM_SIZE_M],
            "augment_noise": str(Path(noise_path).resolve()) if noise_path else "generated",
            **({"noise_filenum": data.noise_filenum} if noise_path else {})}


def babble_sources(tree: dict[str, list[str]], train_speakers: list[str], speaker: str,
                   seed: int) -> list[str]:
    """One utterance each of a few other training speakers: the babble of speaker's copies."""
    import augment

    others = [s for s in train_speakers if s != speaker]
    rng = augment.copy_rng(seed, speaker, "babble", 0)
    chosen = sorted(rng.choice(len(others), min(augment.BABBLE_TALKERS, len(others)),
                               replace=False).tolist())
    return [tree[others[i]][int(rng.integers(len(tree[others[i]])))] for i in chosen]


def _augmentation_noise(job: SpeakerJob) -> tuple[np.ndarray | None, list[np.ndarray]]:
    """(the --noise_path stream or None, the babble talkers' waveforms) of a speaker's copies."""
    if job.noise_path:
        return _noise_stream(job.noise_path, job.data.noise_filenum, job.front.sr)[0], []
    talkers = []
    for relative in job.babble:
        try:
            talkers.append(features.load_audio(Path(job.root) / relative, job.front.sr))
        except features.AudioError:  # counted where its own speaker is processed
            pass
    return None, talkers


@functools.lru_cache(maxsize=1)
def _noise_stream(noise_path: str, noise_filenum: int, sr: int) -> tuple[np.ndarray, list[dict]]:
    """build_noise, once per process (forked --workers inherit the parent's)."""
    return build_noise(noise_path, noise_filenum, sr)


def _finished_speaker(sidecar: Path, array: Path, settings: dict, paths: list[str]
                      ) -> dict | None:
    """The sidecar of a speaker completed with these settings and files, else None (redo it)."""
    try:
        done = utils.read_json(sidecar, "a speaker sidecar")
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
                   if p.suffix.lower() in utils.AUDIO_EXTENSIONS and p.is_file())
    if not files:
        raise FileNotFoundError(f"--noise_path {noise_path}: no audio files "
                                f"({', '.join(utils.AUDIO_EXTENSIONS)})")
    by_name = {p.name: p for p in files}
    found = []
    for path in files:
        if "_clean" in path.stem:
            continue
        clean = by_name.get(path.name.replace("_noisy", "_clean")) if "_noisy" in path.stem \
            else None
        found.append((path, clean))
    return found


def build_noise(noise_path: str, noise_filenum: int, sr: int) -> tuple[np.ndarray, list[dict]]:
    """One RMS-normalised noise stream at sr from the first noise_filenum files of noise_path:
    noise files, or noisy minus clean."""
    pieces, skipped = [], []
    limit = int(NOISE_SECONDS_PER_FILE * sr)
    for noisy, clean in find_noise_files(noise_path)[:noise_filenum]:
        try:
            noise = features.load_audio(noisy, sr)
            if clean is not None:
                reference = features.load_audio(clean, sr)
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
        raise ValueError(f"--noise_path {noise_path}: no usable noise file")
    return np.concatenate(pieces).astype(np.float32), skipped


def shard_name(shard: int, num_shards: int) -> str:
    """The manifest file of one shard's run."""
    return f"manifest.shard-{shard}-of-{num_shards}.json"


def merge_shards(out_dir: str | Path) -> dict:
    """Merge the shard manifests in out_dir into the manifest.json that training reads."""
    out_dir = Path(out_dir)
    found = sorted(out_dir.glob("manifest.shard-*-of-*.json"))
    if not found:
        raise FileNotFoundError(f"--merge: no manifest.shard-*-of-*.json in {out_dir}")
    shards = [utils.read_json(file, "a shard manifest") for file in found]
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
        write_trial_lists(out_dir, manifest["speakers"])
    return manifest


def write_group_trials(out_dir: Path, speakers: list[str], key: str, name: str) -> None:
    """Every pair of the test split's utterances that share a language (Common Voice) or a text
    (keywords, digits, words), as a VoxCeleb trial list (`1|0 enrol test`, paths relative to
    --audio_path) in out_dir; nothing when the sidecars do not record `key`."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for speaker in speakers:
        done = utils.read_json(out_dir / f"{speaker}.json", "a speaker sidecar")
        if key not in done:
            return
        for path, group in zip(done["utterances"], done[key]):
            groups.setdefault(group, []).append((path, speaker))
    lines = []
    for group in sorted(groups):
        found = sorted(groups[group])
        lines += [f"{int(a[1] == b[1])} {a[0]} {b[0]}"
                  for i, a in enumerate(found) for b in found[i + 1:]]
    if not any(line.startswith("1") for line in lines):
        return  # no text is said twice by one speaker: not a text-dependent corpus
    trials = out_dir / name
    utils.atomic_write_text(trials, "".join(line + "\n" for line in lines))
    targets = sum(line.startswith("1") for line in lines)
    print(f"test: {len(lines)} same-{key[:-1]} trials ({targets} target) of {len(groups)} "
          f"{key} written to {trials}")


def write_trial_lists(out_dir: Path, speakers: list[str]) -> None:
    """The test split's same-language and same-text trial lists, where the corpus has them."""
    write_group_trials(out_dir, speakers, "languages", LANGUAGE_TRIALS)
    write_group_trials(out_dir, speakers, "texts", TEXT_TRIALS)


def _remove_leftovers(out_dir: Path, speakers: list[str], sharded: bool) -> None:
    """Delete the temp files of a killed run: all of them, or only this shard's own."""
    if not sharded:
        for leftover in out_dir.glob("*.tmp"):
            leftover.unlink(missing_ok=True)
        return
    for speaker in speakers:
        for leftover in out_dir.glob(f"{glob.escape(speaker)}.*.tmp"):
            leftover.unlink(missing_ok=True)


@dataclass(frozen=True)
class Split:
    """One split of this run: where it is written, its speakers (this shard's), and how many
    speakers each becomes (1 + the --speed_perturb factors)."""

    name: str
    out_dir: Path
    speakers: list[str]
    copies: int


def preprocess(config: argparse.Namespace) -> dict:
    """Preprocess --audio_path (or the synthetic corpus) into --train_path and --test_path.

    With --num_shards n, this run does every n-th speaker (--shard); the shard that finds all
    n shard manifests written merges them into manifest.json.
    """
    front, data = config.features, config.data
    root, corpus, tree, pattern, noise_path = _read_corpus(front, data)
    train_speakers, test_speakers = split_speakers(list(tree), data.test_ratio, data.seed,
                                                   data.folds, data.fold)
    sharded = data.num_shards > 1
    augmenting = augmentation_settings(data, noise_path)
    if augmenting and noise_path:
        _noise_stream(noise_path, data.noise_filenum, front.sr)  # fails before any job

    settings = features.feature_settings(front, data.tdsv_phrase, pattern)
    summary = {"source": str(Path(root).resolve()), "settings": settings}
    splits, jobs = [], []
    for name, speakers, out_dir in (("train", train_speakers, data.train_path),
                                    ("test", test_speakers, data.test_path)):
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        speakers = speakers[data.shard::data.num_shards]
        speeds = [1.0, *data.speed_perturb] if name == "train" else [1.0]
        # A run killed mid-write leaves its temp files; the finished files are all renamed ones.
        _remove_leftovers(out_dir, [s if speed == 1.0 else perturbed_name(s, speed)
                                    for s in speakers for speed in speeds], sharded)
        if sharded:
            (out_dir / "manifest.json").unlink(missing_ok=True)  # stale until all shards are in
        splits.append(Split(name, out_dir, speakers, len(speeds)))
        split_settings = settings | (augmenting if name == "train" else {})
        jobs += speaker_jobs(name, root, corpus, tree, speakers, speeds, out_dir, front, data,
                             noise_path, split_settings, train_speakers)
    # One queue for both splits, largest speakers first: no worker idles at the end of a split
    # or waits on one long speaker started last.
    jobs.sort(key=lambda job: -_audio_bytes(job.root, job.paths))
    usable = {split.name: [] for split in splits}
    skipped = {split.name: [] for split in splits}
    with threadpool_limits(limits=1, user_api="blas"):
        for name, speaker, ok, bad in tqdm(run_jobs(jobs, data.workers), total=len(jobs),
                                           desc="preprocess", unit="speaker",
                                           dynamic_ncols=True):
            if ok:
                usable[name].append(speaker)
            skipped[name].extend(bad)
    for split in splits:
        split_settings = settings | (augmenting if split.name == "train" else {})
        summary[split.name] = _write_manifest(split, usable[split.name], skipped[split.name],
                                              corpus, tree, front, data, noise_path,
                                              split_settings, summary["source"])
    return summary


def _read_corpus(front: Features, data: Preprocessing
                 ) -> tuple[str, corpora.Corpus, dict[str, list[str]], str, str]:
    """(root, corpus, speaker -> paths to preprocess, the TD-SV pattern and the noise folder
    the jobs run with): TD-SV keeps the phrase's paths; the synthetic corpus has its own
    phrase, a corpus's own noise folder stands in for a missing --noise_path."""
    root, pattern, noise_path = data.audio_path, data.tdsv_pattern, data.noise_path
    if not root:
        # Imported here: scipy.signal costs each spawned --workers process almost a second.
        import synthetic_corpus

        root = synthetic_corpus.build(data.synthetic_path, sr=front.sr, seed=data.seed)
        if front.tdsv and not (data.tdsv_phrase or pattern):
            pattern = SYNTHETIC_PHRASE_PATTERN
    corpus = corpora.find_corpus(root)
    tree = corpus.tree
    if front.tdsv:
        if not (data.tdsv_phrase or pattern):
            raise ValueError("--tdsv True needs --tdsv_phrase or --tdsv_pattern to pick the phrase")
        tree = select_phrase(tree, corpus.texts, data.tdsv_phrase, pattern)
    if corpus.noise and not noise_path and (front.tdsv or data.augment):
        noise_path = corpus.noise
        print(f"noise: {corpus.noise}, the corpus's {corpora.BACKGROUND_NOISE} folder, stands in "
              f"for --noise_path")
    return str(root), corpus, tree, pattern, noise_path


def _write_manifest(split: Split, usable: list[str], skipped: list[dict], corpus: corpora.Corpus,
                    tree: dict[str, list[str]], front: Features, data: Preprocessing,
                    noise_path: str, settings: dict, source: str) -> dict | None:
    """Write one split's manifest (this shard's, merged once all shards are in) and print its
    summary; returns the manifest, None while a sharded run waits for other shards."""
    out_dir, speakers, copies = split.out_dir, split.speakers, split.copies
    sharded, train = data.num_shards > 1, split.name == "train"
    # Sorted: with --workers > 1 speakers finish in any order, the manifest must not vary.
    manifest = {"settings": settings, "source": source, "split": split.name,
                "speakers": sorted(usable),
                "skipped": sorted(skipped, key=lambda entry: entry["path"])}
    # Augmented copies count as files: each is skipped (or written) on its own.
    n_files = copies * sum(len(tree[s]) for s in speakers) * (1 + data.augment * train)
    if train and data.shard == 0:
        manifest["skipped"] = sorted(manifest["skipped"] + corpus.skipped,
                                     key=lambda entry: entry["path"])
        n_files += len(corpus.skipped)
    if train and (front.tdsv or data.augment) and noise_path and data.shard == 0:
        noise, bad_noise = _noise_stream(noise_path, data.noise_filenum, front.sr)
        if front.tdsv:
            utils.atomic_save_npy(out_dir / "noise.npy", noise)
            manifest["noise_seconds"] = len(noise) / front.sr
        manifest["skipped"].extend(bad_noise)
    if front.tdsv:
        manifest["phrase_frames"] = _written_phrase_lengths(out_dir, usable, front.tdsv_frame)
    shard_text = f" (shard {data.shard} of {data.num_shards})" if sharded else ""
    manifest_file = out_dir / (shard_name(data.shard, data.num_shards) if sharded
                               else "manifest.json")
    if sharded:
        manifest.update(shard=data.shard, num_shards=data.num_shards)
    utils.atomic_save_json(manifest_file, manifest)
    print(f"{split.name}{shard_text}: {len(usable)} of {copies * len(speakers)} speakers "
          f"written to {out_dir}; skipped {skip_summary(manifest['skipped'])} of {n_files} files "
          f"(reasons in {manifest_file})")
    cut = manifest.get("phrase_frames", {}).get("longer_than_tdsv_frame", 0)
    if cut:
        summary_frames = manifest["phrase_frames"]
        print(f"{split.name}{shard_text}: {cut} of {summary_frames['phrases']} phrases are "
              f"longer than --tdsv_frame {front.tdsv_frame} frames and were cut to it (phrase "
              f"lengths: median {summary_frames['median']}, 90th percentile "
              f"{summary_frames['p90']} frames; --tdsv_frame {summary_frames['p90']} would "
              f"keep 90 % of them whole)")
    if sharded:
        return _merge_if_complete(out_dir, data.num_shards)
    if split.name == "test":
        write_trial_lists(out_dir, manifest["speakers"])
    return manifest


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
    return phrase_length_summary([n for speaker in speakers for n in utils.read_json(
        out_dir / f"{speaker}.json", "a speaker sidecar").get("phrase_frames", [])], tdsv_frame)


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


def main(argv: list[str] | None = None) -> int:
    """The command line: 0 on success, 2 on bad input, 1 when no usable speaker is left."""
    config = configuration.parse_config(argv)
    try:
        if config.merge:
            for path in (config.train_path, config.test_path):
                manifest = merge_shards(path)
                print(f"merged {len(manifest['speakers'])} speakers into "
                      f"{Path(path) / 'manifest.json'}")
            return 0
        summary = preprocess(config)
    except (ValueError, OSError, RuntimeError) as error:  # RuntimeError: a worker died
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
