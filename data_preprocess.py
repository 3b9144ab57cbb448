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
import multiprocessing
import queue
import re
import signal
import struct
import sys
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import librosa
import numpy as np
import scipy.fft
import soundfile as sf
from threadpoolctl import threadpool_limits
from tqdm import tqdm

import configuration
import utils

AUDIO_EXTENSIONS = (".wav", ".flac")
LOG_FLOOR = 1e-6  # digital silence in the recordings must not give log(0)
NOISE_SECONDS_PER_FILE = 30.0
SYNTHETIC_PHRASE_PATTERN = r"phrase_\d+\.wav$"
SPEAKER_SKIPPED = "speaker below --min_utterances"  # the kind of a skipped-speaker entry
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
PR_SET_PDEATHSIG = 1  # Linux prctl option (sys/prctl.h)


class AudioError(ValueError):
    """A file that cannot be used: a short kind (counted in the summary line) and the details."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


def feature_settings(config: argparse.Namespace) -> dict:
    """The settings that determine the stored arrays; training and test check them."""
    return {"kind": "tdsv" if config.tdsv else "tisv", "sr": config.sr, "nfft": config.nfft,
            "window": config.window, "hop": config.hop, "n_mels": config.n_mels,
            "top_db": config.top_db, "tdsv_frame": config.tdsv_frame,
            "min_frames": config.min_frames, "tdsv_phrase": config.tdsv_phrase,
            "tdsv_pattern": config.tdsv_pattern}


def hop_samples(config: argparse.Namespace) -> int:
    return int(round(config.hop * config.sr))


def window_samples(config: argparse.Namespace) -> int:
    return int(round(config.window * config.sr))


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
            if (os.path.splitext(name)[1].lower() in AUDIO_EXTENSIONS
                    and os.path.isfile(os.path.join(folder, name))):
                tree.setdefault(speaker, []).append(prefix + name)
    if not tree:
        raise FileNotFoundError(f"--audio_path {root}: no <speaker>/**/*.wav or *.flac files")
    return {speaker: sorted(paths) for speaker, paths in sorted(tree.items())}


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


def wav_truncation(path: str | Path) -> str | None:
    """Why a RIFF/WAVE file is cut short (its data chunk runs past the end), else None."""
    with open(path, "rb") as handle:
        header = handle.read(12)
        if len(header) < 12 or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
            return None
        size = Path(path).stat().st_size
        position = 12
        while position + 8 <= size:
            handle.seek(position)
            chunk_id, length = struct.unpack("<4sI", handle.read(8))
            if chunk_id == b"data":
                # 0 and 0xFFFFFFFF are placeholders of streaming writers, not a promise.
                if 0 < length < 0xFFFFFFFF and position + 8 + length > size:
                    return (f"the data chunk declares {length} bytes but the file holds "
                            f"{size - position - 8}")
                return None
            position += 8 + length + (length & 1)
    return None


def load_audio(path: str | Path, sr: int) -> np.ndarray:
    """Mono float32 waveform at sr: any channel count, sample format or rate; soxr resampling."""
    try:
        # libsndfile silently reads what is left of a truncated WAV; a cut recording is a bad file.
        truncated = wav_truncation(path)
        wav, file_sr = sf.read(path, dtype="float32", always_2d=True)
    except sf.LibsndfileError as error:
        raise AudioError("unreadable", f"not readable audio ({error.error_string.strip()})"
                         ) from None
    except (RuntimeError, OSError) as error:
        raise AudioError("unreadable", f"not readable audio ({str(error).splitlines()[0]})") from None
    if truncated:
        raise AudioError("truncated", f"truncated: {truncated}")
    if wav.shape[0] == 0:
        raise AudioError("empty", "no samples")
    wav = wav[:, 0] if wav.shape[1] == 1 else wav.mean(axis=1)
    # One fast reduction first; the elementwise check only when the sum is not finite (a sum
    # of huge but finite samples can overflow).
    if not np.isfinite(wav.sum()) and not np.all(np.isfinite(wav)):
        raise AudioError("non-finite", "NaN or Inf samples")
    if file_sr != sr:
        wav = librosa.resample(wav, orig_sr=file_sr, target_sr=sr, res_type="soxr_hq")
    if max(wav.max(), -wav.min()) < 1e-5:
        raise AudioError("silent", "silent (peak below -100 dBFS)")
    return np.ascontiguousarray(wav, dtype=np.float32)


def speed_perturb(wav: np.ndarray, factor: float, sr: int) -> np.ndarray:
    """wav played `factor` times faster (tempo and pitch, as sox's speed): read as if sampled at
    sr * factor, resampled back to sr."""
    return librosa.resample(wav, orig_sr=sr * factor, target_sr=sr, res_type="soxr_hq")


def perturbed_name(speaker: str, factor: float) -> str:
    """The new speaker that --speed_perturb makes of `speaker` at `factor`."""
    return f"{speaker}_sp{factor:g}"


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale (librosa's default): linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    log_part = 15.0 + np.log(np.maximum(hz, 1000.0) / 1000.0) / (np.log(6.4) / 27.0)
    return np.where(hz >= 1000.0, log_part, hz / (200.0 / 3))


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    log_part = 1000.0 * np.exp(np.log(6.4) / 27.0 * (mel - 15.0))
    return np.where(mel >= 15.0, log_part, mel * (200.0 / 3))


@functools.lru_cache(maxsize=8)
def mel_basis(sr: int, nfft: int, n_mels: int) -> np.ndarray:
    """[n_mels, nfft // 2 + 1] Slaney-normalised triangular filters, as librosa.filters.mel.

    Written in numpy because librosa.filters imports scipy.signal and numba: a second of start-up
    in every --workers process."""
    edges = _mel_to_hz(np.linspace(0.0, _hz_to_mel(sr / 2.0), n_mels + 2))
    ramps = edges[:, None] - np.fft.rfftfreq(nfft, 1.0 / sr)[None, :]
    widths = np.diff(edges)
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    return (weights * (2.0 / (edges[2:] - edges[:-2]))[:, None]).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _interleaved_mel_basis(sr: int, nfft: int, n_mels: int) -> np.ndarray:
    """mel_basis.T with each row twice, for the interleaved (re, im) squares of an rfft."""
    return np.ascontiguousarray(np.repeat(mel_basis(sr, nfft, n_mels).T, 2, axis=0))


@functools.lru_cache(maxsize=8)
def hann_window(length: int) -> np.ndarray:
    """Periodic Hann window, as librosa's get_window('hann', fftbins=True)."""
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(length) / length)).astype(np.float32)


def frames(wav: np.ndarray, config: argparse.Namespace) -> np.ndarray:
    """[..., 1 + samples // hop, nfft] strided view of wav (no copy): frames centred on
    multiples of the hop, zero-padded at the ends, as librosa's stft and rms (center=True)."""
    half = config.nfft // 2
    padded = np.zeros((*wav.shape[:-1], wav.shape[-1] + 2 * half), np.float32)
    padded[..., half:half + wav.shape[-1]] = wav
    view = np.lib.stride_tricks.sliding_window_view(padded, config.nfft, axis=-1)
    return view[..., ::hop_samples(config), :]


def frames_log_mel(framed: np.ndarray, config: argparse.Namespace,
                   keep: np.ndarray | None = None) -> np.ndarray:
    """log10 mel power [..., frames, n_mels] of frames from frames() (only the `keep` ones if
    given): the original recipe (Hann window centred in nfft, |FFT|^2, mel, log10) in float32."""
    length = window_samples(config)
    offset = (config.nfft - length) // 2
    # The FFT zero-pads the window at the end instead of around it: a circular shift, which
    # leaves the power spectrum unchanged.
    windowed = framed[..., offset:offset + length]
    if keep is None:
        windowed = windowed * hann_window(length)
    else:
        windowed = windowed[keep]
        windowed *= hann_window(length)
    spectrum = scipy.fft.rfft(windowed, n=config.nfft, axis=-1)
    squares = spectrum.view(np.float32)
    np.square(squares, out=squares)
    mel = squares @ _interleaved_mel_basis(config.sr, config.nfft, config.n_mels)
    return np.log10(mel + LOG_FLOOR, out=mel)


def log_mel(wav: np.ndarray, config: argparse.Namespace) -> np.ndarray:
    """log10 mel power spectrogram [..., frames, n_mels] of wav [..., samples] (original recipe)."""
    return frames_log_mel(frames(np.asarray(wav, dtype=np.float32), config), config)


def voiced_frames(framed: np.ndarray, n_samples: int, config: argparse.Namespace) -> np.ndarray:
    """The frames librosa's VAD (effects.split: frame RMS within --top_db of the loudest) keeps,
    as a boolean mask over frames(wav) of a mono wav."""
    rms = np.sqrt(np.einsum("ij,ij->i", framed, framed) / config.nfft)
    power = np.maximum(rms * rms, 1e-10)  # as librosa's amplitude_to_db (amin 1e-5 squared)
    db = 10.0 * np.log10(power) - 10.0 * np.log10(power.max())
    keep = db > -config.top_db
    # effects.split clips the last interval at the signal's end; the conversion back to frames
    # then drops the last frame when it starts exactly at the end.
    if n_samples % hop_samples(config) == 0:
        keep[-1] = False
    return keep


def voiced_features(wav: np.ndarray, config: argparse.Namespace) -> np.ndarray:
    """Log-mel frames of the intervals that librosa's VAD (effects.split) keeps."""
    framed = frames(wav, config)
    keep = voiced_frames(framed, len(wav), config)
    if keep.sum() < config.min_frames:
        raise AudioError("too short", f"too short: {keep.sum()} voiced frames, expected at "
                                      f"least --min_frames {config.min_frames}")
    return frames_log_mel(framed, config, keep)


def phrase_span(wav: np.ndarray, config: argparse.Namespace) -> tuple[int, int]:
    """(start, end) samples of the phrase: as librosa.effects.trim, from the first to the end of
    the last frame the VAD keeps."""
    hop = hop_samples(config)
    kept = np.flatnonzero(voiced_frames(frames(wav, config), len(wav), config))
    start, end = (kept[0] * hop, min(len(wav), (kept[-1] + 1) * hop)) if kept.size else (0, 0)
    if end - start < config.min_frames * hop // 4:
        raise AudioError("too short", f"too short: {end - start} voiced samples, expected at "
                                      f"least {config.min_frames * hop // 4} (--min_frames / 4)")
    return start, end


def centred_phrase(wav: np.ndarray, span: tuple[int, int], config: argparse.Namespace
                   ) -> np.ndarray:
    """The window of exactly --tdsv_frame frames centred on span (a longer phrase is cut)."""
    length = (config.tdsv_frame - 1) * hop_samples(config)
    centre = (span[0] + span[1]) // 2
    lo = max(0, min(centre - length // 2, len(wav) - length))
    segment = wav[lo:lo + length]
    return np.pad(segment, (0, length - len(segment))).astype(np.float32)


def phrase_waveform(wav: np.ndarray, config: argparse.Namespace) -> np.ndarray:
    """The phrase trimmed by VAD, centred in a window of exactly --tdsv_frame frames."""
    return centred_phrase(wav, phrase_span(wav, config), config)


def phrase_frames(span: tuple[int, int], config: argparse.Namespace) -> int:
    """The --tdsv_frame that just holds the phrase span: a window of n frames spans n - 1 hops."""
    return 1 + int(-(-(span[1] - span[0]) // hop_samples(config)))


def inference_features(wav: np.ndarray, config: argparse.Namespace) -> np.ndarray:
    """Features of one recording as the model saw them in training: VAD'd log-mel (TI-SV) or
    the log-mel of the trimmed, fixed-length phrase (TD-SV)."""
    if config.tdsv:
        return log_mel(phrase_waveform(wav, config), config)
    return voiced_features(wav, config)


def files_inference_features(paths: list[str | Path], config: argparse.Namespace
                             ) -> list[np.ndarray | AudioError]:
    """inference_features of each audio file, on one thread per core (decoding and the FFT
    release the GIL); a file that cannot be used gives its AudioError in its place."""
    def one(path):
        try:
            return inference_features(load_audio(path, config.sr), config)
        except AudioError as error:
            return error

    _keep_freed_memory()  # the threads share one address space, so their page faults contend
    # BLAS threads only slow the small mel matmuls down, and spin against the other threads.
    with threadpool_limits(limits=1, user_api="blas"), \
            ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        return list(tqdm(pool.map(one, paths), total=len(paths), desc="features", unit="file",
                         dynamic_ncols=True, disable=len(paths) < 2))


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
    split, root, speaker, speed, paths, out_dir, config = job
    return (split, *_process_speaker(root, speaker, speed, paths, Path(out_dir), config))


def run_jobs(jobs: list[tuple], workers: int) -> Iterator[tuple]:
    """_speaker_job of each job, in the order they finish: in this process with --workers 1,
    else in `workers` processes (one start for both splits: a start costs up to a second)."""
    if workers == 1:
        _keep_freed_memory()
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
    _keep_freed_memory()


def _keep_freed_memory() -> None:
    """Keep freed heap memory for the next file (glibc only; elsewhere a no-op). By default the
    per-file buffers (0.1-2 MB each) are returned to the system and page-faulted in again for
    every file: 86,000 faults on speechocean762 against 11,000, and half the system time."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None) if sys.platform == "linux" else None
    if mallopt is not None:
        # Both fixed, or glibc's dynamic thresholds stay on for the other (more faults, not fewer).
        mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's maximum on 64-bit
        mallopt(M_TRIM_THRESHOLD, 512 << 20)


def _process_speaker(root: str, speaker: str, speed: float, paths: list[str], out_dir: Path,
                     config: argparse.Namespace) -> tuple[str, bool, list[dict]]:
    settings = feature_settings(config)
    if speed != 1.0:
        speaker = perturbed_name(speaker, speed)
        settings["speed"] = speed
    sidecar = out_dir / f"{speaker}.json"
    done = _finished_speaker(sidecar, out_dir / f"{speaker}.npy", settings, paths)
    if done is not None:
        return speaker, bool(done["utterances"]), done["skipped"]
    arrays, kept, skipped, spans = [], [], [], []
    for relative in paths:
        try:
            wav = load_audio(Path(root) / relative, config.sr)
            if speed != 1.0:
                wav = speed_perturb(wav, speed, config.sr)
            if config.tdsv:
                span = phrase_span(wav, config)
                arrays.append(centred_phrase(wav, span, config))
                spans.append(phrase_frames(span, config))
            else:
                arrays.append(voiced_features(wav, config))
            kept.append(relative)
        except AudioError as error:
            # Each speed copy of a bad file is its own entry: one per file written (or not).
            skipped.append({"path": relative, "kind": error.kind, "reason": str(error),
                            **({"speed": speed} if speed != 1.0 else {})})
    usable = len(kept) >= config.min_utterances
    if not usable:
        skipped.append({"path": speaker, "kind": SPEAKER_SKIPPED,
                        "reason": f"{len(kept)} usable utterances, expected at least "
                                  f"--min_utterances {config.min_utterances}"})
        kept, arrays, spans = [], [], []
    else:
        stacked = np.stack(arrays) if config.tdsv else np.concatenate(arrays)
        utils.atomic_save_npy(out_dir / f"{speaker}.npy", stacked)
    utils.atomic_save_json(sidecar, {
        "settings": settings, "paths": paths, "utterances": kept, "skipped": skipped,
        "lengths": [len(a) for a in arrays], **({"phrase_frames": spans} if config.tdsv else {})})
    return speaker, usable, skipped


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
                   if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())
    if not files:
        raise FileNotFoundError(f"--noise_path {noise_path}: no .wav or .flac files")
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
            noise = load_audio(noisy, config.sr)
            if clean is not None:
                reference = load_audio(clean, config.sr)
                n = min(len(noise), len(reference))
                noise = noise[:n] - reference[:n]
            noise = noise[:limit]
            rms = float(np.sqrt(np.mean(noise ** 2)))
            if rms < 1e-6:
                raise AudioError("no noise", "noisy and clean files are identical")
            pieces.append(noise / rms)
        except AudioError as error:
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
    return manifest


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
    tree = find_utterances(root)
    if config.tdsv:
        if not (config.tdsv_phrase or config.tdsv_pattern):
            raise ValueError("--tdsv True needs --tdsv_phrase or --tdsv_pattern to pick the phrase")
        tree = select_phrase(tree, read_transcripts(root), config.tdsv_phrase, config.tdsv_pattern)
    train_speakers, test_speakers = split_speakers(list(tree), config.test_ratio, config.seed,
                                                   config.folds, config.fold)
    sharded = config.num_shards > 1

    summary = {"source": str(Path(root).resolve()), "settings": feature_settings(config)}
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
        jobs += [(split, root, s, speed, tree[s], out_dir, config)
                 for s in speakers for speed in speeds]
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
        manifest = {"settings": feature_settings(config), "source": summary["source"],
                    "split": split, "speakers": sorted(usable[split]),
                    "skipped": sorted(skipped[split], key=lambda entry: entry["path"])}
        if split == "train" and config.tdsv and config.noise_path and config.shard == 0:
            noise, bad_noise = build_noise(config)
            utils.atomic_save_npy(out_dir / "noise.npy", noise)
            manifest["noise_seconds"] = len(noise) / config.sr
            manifest["skipped"].extend(bad_noise)
        if config.tdsv:
            manifest["phrase_frames"] = _written_phrase_lengths(out_dir, usable[split],
                                                                config.tdsv_frame)
        n_files = copies * sum(len(tree[s]) for s in speakers)
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
