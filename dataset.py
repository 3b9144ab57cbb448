"""Preprocessed speakers on disk (crops read on demand) and the N x M batches GE2E trains on."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import scipy.signal
import tensorflow as tf

import configuration
import features
from configuration import Features, Training

# Each memory map holds a file descriptor and its touched pages: keep only the recent ones open.
OPEN_ARRAYS = 256


class SpeakerStore:
    """Per-speaker arrays of one split on disk; only utterance offsets are kept in RAM, so a
    corpus far larger than RAM trains. Training reads its crops with plain reads, evaluation
    memory-maps whole arrays.

    Several preprocessed folders can be pooled (the paper's MultiReader idea: more speakers from
    other material); their speakers are then named `<index>:<speaker>`. Each comma-separated
    entry is one source; `a+b` pools folders a and b into one source.
    """

    def __init__(self, parts: list[tuple[Path, dict, int]], front: Features):
        self.front = front
        self.tdsv = parts[0][1]["settings"]["kind"] == "tdsv"
        self.speakers: list[str] = []
        # Indices into speakers, one array per MultiReader source (a --train_path entry).
        self.sources: list[np.ndarray] = [np.zeros(0, int)] * (parts[-1][2] + 1)
        self.offsets: dict[str, np.ndarray] = {}
        self._files: dict[str, Path] = {}
        for index, (path, manifest, source) in enumerate(parts):
            first = len(self.speakers)
            for speaker in manifest["speakers"]:
                key = speaker if len(parts) == 1 else f"{index}:{speaker}"
                sidecar = _read_json(path / f"{speaker}.json", ("lengths", "utterances"))
                self.speakers.append(key)
                self.offsets[key] = np.concatenate([[0], np.cumsum(sidecar["lengths"])])
                self._files[key] = path / f"{speaker}.npy"
            self.sources[source] = np.concatenate([self.sources[source],
                                                   np.arange(first, len(self.speakers))])
        self._arrays: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._layouts: dict[str, tuple[int, tuple[int, ...]]] = {}  # data offset, row shape
        noise = parts[0][0] / "noise.npy"
        self.noise = np.load(noise, mmap_mode="r", allow_pickle=False) if noise.exists() else None
        # Median utterance length (frames) of each source: --short_crops caps its crops there.
        self.median_frames = [int(np.median(np.concatenate(
            [np.diff(self.offsets[self.speakers[s]]) for s in source]))) if len(source) else 0
            for source in self.sources]

    @property
    def num_speakers(self) -> int:
        return len(self.speakers)

    def num_utterances(self, speaker: str) -> int:
        return len(self.offsets[speaker]) - 1

    def utterance_names(self, speaker: str) -> list[str]:
        """The relative paths of a speaker's utterances (read on demand, not kept in RAM)."""
        file = self._files[speaker].with_suffix(".json")
        return _read_json(file, ("utterances",))["utterances"]

    def array(self, speaker: str) -> np.ndarray:
        if speaker in self._arrays:
            self._arrays.move_to_end(speaker)
            return self._arrays[speaker]
        file = self._files[speaker]
        try:
            array = np.load(file, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as error:
            raise ValueError(f"{file}: unreadable ({error}); re-run data_preprocess.py") from None
        # A plain ndarray view of the same pages: slicing a np.memmap costs ~10x more.
        array = array.view(np.ndarray)
        self._arrays[speaker] = array
        if len(self._arrays) > OPEN_ARRAYS:
            self._arrays.popitem(last=False)
        return array

    def read_rows(self, speaker: str, spans: list[tuple[int, int]],
                  out: list[np.ndarray | None] | None = None) -> list[np.ndarray]:
        """Rows start..stop of a speaker's array for each (start, stop), into out[i] where given
        (C-contiguous float32): one open per call and one read per span. A crop costs its own
        bytes only (no memory-mapped pages to fault in, the GIL released while reading), so
        tf.data's parallel calls overlap."""
        file = self._files[speaker]
        rows = []
        try:
            with open(file, "rb", buffering=0) as handle:
                offset, row_shape = self._layouts.get(speaker) or self._layout(speaker, handle)
                row_bytes = 4 * int(np.prod(row_shape))
                for (start, stop), into in zip(spans, out or [None] * len(spans)):
                    if into is None:
                        into = np.empty((stop - start, *row_shape), np.float32)
                    handle.seek(offset + start * row_bytes)
                    if handle.readinto(into) != (stop - start) * row_bytes:
                        raise ValueError("shorter than its header says")
                    rows.append(into)
        except (OSError, ValueError) as error:
            raise ValueError(f"{file}: unreadable ({error}); re-run data_preprocess.py") from None
        return rows

    def _layout(self, speaker: str, handle) -> tuple[int, tuple[int, ...]]:
        """(data offset, row shape) of a speaker's .npy from its header, checked against the
        sidecar's lengths; read once per speaker."""
        version = np.lib.format.read_magic(handle)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f".npy format version {version}, expected 1.0 or 2.0")
        shape, fortran_order, dtype = read_header(handle)
        rows = self.num_utterances(speaker) if self.tdsv else int(self.offsets[speaker][-1])
        if dtype != np.float32 or fortran_order or len(shape) != 2 or shape[0] != rows:
            raise ValueError(f"holds {dtype} {'Fortran' if fortran_order else 'C'}-ordered "
                             f"{shape}, expected float32 C-ordered ({rows}, ...) as its sidecar "
                             f"lists")
        self._layouts[speaker] = layout = (handle.tell(), tuple(shape[1:]))
        return layout

    def utterance(self, speaker: str, index: int) -> np.ndarray:
        """TI-SV: the utterance's voiced log-mel frames; TD-SV: its phrase waveform."""
        if self.tdsv:
            return self.array(speaker)[index]
        lo, hi = self.offsets[speaker][index], self.offsets[speaker][index + 1]
        return self.array(speaker)[lo:hi]

    def test_utterances(self, speaker: str) -> list[np.ndarray]:
        """Clean log-mel frames of every utterance of a speaker."""
        if self.tdsv:
            return list(features.log_mel(np.asarray(self.array(speaker)), self.front))
        return [np.asarray(self.utterance(speaker, i)) for i in range(self.num_utterances(speaker))]


def _read_json(file: Path, keys: tuple[str, ...]) -> dict:
    """A JSON object written by data_preprocess.py that has the given keys."""
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{file}: unreadable ({error}); re-run data_preprocess.py") from None
    missing = [key for key in keys if not isinstance(data, dict) or key not in data]
    if missing:
        raise ValueError(f"{file}: expected the keys {', '.join(keys)} written by "
                         f"data_preprocess.py, {', '.join(missing)} missing; re-run it")
    return data


def open_store(paths: str, front: Features, split: str) -> SpeakerStore:
    """Open a preprocessed split (or several: comma-separated sources, each one folder or several
    joined by +), checking that it was preprocessed with front's settings."""
    parts = []
    folders = [(Path(p), source) for source, entry in enumerate(paths.split(","))
               for p in entry.split("+")]
    for path, source in folders:
        manifest_file = path / "manifest.json"
        if not manifest_file.exists() and list(path.glob("manifest.shard-*.json")):
            raise ValueError(f"{manifest_file} not found but shard manifests are: run the other "
                             f"shards, or merge them (python data_preprocess.py --merge True "
                             f"--train_path ... --test_path ...)")
        if not manifest_file.exists():
            raise ValueError(f"{manifest_file} not found; run python data_preprocess.py first "
                             f"(or point --{split}_path at preprocessed features)")
        manifest = _read_json(manifest_file, ("settings", "speakers"))
        settings = manifest["settings"]
        if settings.get("kind") != front.kind:
            raise ValueError(f"{path} holds {settings.get('kind')} data but --tdsv is "
                             f"{front.tdsv}")
        # What the network reads must be what was stored (the mode is the kind, checked above).
        for key in configuration.fixed_fields(Features, "weights", "input"):
            if key != "tdsv" and settings.get(key) != getattr(front, key):
                raise ValueError(f"{path} was preprocessed with {key}={settings[key]} but --{key}"
                                 f" is {getattr(front, key)}; re-run data_preprocess.py or fix "
                                 f"the flag")
        parts.append((path, manifest, source))
    store = SpeakerStore(parts, front)
    if store.num_speakers < 2:
        raise ValueError(f"{paths}: {store.num_speakers} usable speakers; need at least 2")
    return store


def crop_window(frames: int, length: int, rng: np.random.Generator) -> tuple[int, int, int]:
    """(start, stop, shift) of a random crop of exactly length frames from an utterance of
    `frames`: frames start..stop are read, and an utterance shorter than length is repeated
    cyclically from frame `shift`."""
    if frames >= length:
        start = int(rng.integers(0, frames - length + 1))
        return start, start + length, 0
    return 0, frames, int(rng.integers(0, frames))


def _crops(store: SpeakerStore, picks: list[tuple[str, np.ndarray]], length: int,
           rng: np.random.Generator) -> np.ndarray:
    """[N*M, length, n_mels]: a random crop (crop_window) of each picked utterance. A full-length
    crop is read straight into its place in the batch, a shorter one repeated into it."""
    crops = np.empty((sum(len(u) for _, u in picks), length, store.front.n_mels), np.float32)
    places = iter(crops)
    for speaker, utterances in picks:
        first = store.offsets[speaker][utterances]
        windows = [crop_window(int(n), length, rng)
                   for n in store.offsets[speaker][utterances + 1] - first]
        spans = [(a + start, a + stop) for a, (start, stop, _) in zip(first, windows)]
        mine = [next(places) for _ in utterances]
        into = [place if stop - start == length else None
                for place, (start, stop, _) in zip(mine, windows)]
        for place, rows, (_, _, shift) in zip(mine, store.read_rows(speaker, spans, into), windows):
            if len(rows) < length:
                place[:] = np.take(rows, np.arange(length) + shift, axis=0, mode="wrap")
    return crops


def _noise(store: SpeakerStore, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS noise clips: random cuts of the stored noise, else tilted Gaussian noise."""
    count, length = shape
    if store.noise is not None and len(store.noise) > length:
        starts = rng.integers(0, len(store.noise) - length, count)
        clips = np.stack([store.noise[s:s + length] for s in starts])
    else:
        white = rng.standard_normal(shape)
        tilts = rng.uniform(0.0, 0.95, count)  # one-pole low-pass: from white to brown-ish noise
        clips = np.stack([scipy.signal.lfilter([1.0], [1.0, -a], row)
                          for a, row in zip(tilts, white)])
    return clips / np.maximum(np.sqrt(np.mean(clips ** 2, axis=1, keepdims=True)), 1e-8)


def spec_augment(batch: np.ndarray, max_bands: int, max_frames: int,
                 rng: np.random.Generator) -> np.ndarray:
    """One frequency and one time mask per utterance of [n, T, n_mels] (SpecAugment, Park et
    al. 2019), widths uniform in 0..max; masked cells take the utterance's mean log-mel."""
    n, length, n_mels = batch.shape
    bands = rng.integers(0, min(max_bands, n_mels) + 1, n)
    band_start = rng.integers(0, n_mels - bands + 1)
    spans = rng.integers(0, min(max_frames, length) + 1, n)
    span_start = rng.integers(0, length - spans + 1)
    band = np.arange(n_mels) - band_start[:, None]
    span = np.arange(length) - span_start[:, None]
    masked = (((band >= 0) & (band < bands[:, None]))[:, None, :]
              | ((span >= 0) & (span < spans[:, None]))[:, :, None])
    # The mean, not zero: log10 mels sit far below zero, so a zero mask would read as loud.
    return np.where(masked, batch.mean(axis=(1, 2), keepdims=True), batch)


def batch_speakers(store: SpeakerStore, training: Training, rng: np.random.Generator
                   ) -> tuple[np.ndarray, int | None]:
    """N distinct speaker indices and their source: from all folders pooled (source None), or
    with --source_weights all from one folder, drawn with probability proportional to its
    weight."""
    if not training.source_weights:
        return rng.choice(store.num_speakers, training.N, replace=False), None
    # MultiReader (paper, sec. 2.3): each folder's loss from batches of its own speakers,
    # weighted by how often its batches come.
    weights = np.asarray(training.source_weights, dtype=np.float64)
    source = int(rng.choice(len(weights), p=weights / weights.sum()))
    return rng.choice(store.sources[source], training.N, replace=False), source


def sample_batch(store: SpeakerStore, training: Training, step: int) -> np.ndarray:
    """Batch `step` of training: N speakers x M utterances, speaker-major, [N*M, T, n_mels].

    Seeded by (seed, step), so a resumed run sees exactly the batches of an uninterrupted one.
    """
    rng = np.random.default_rng([training.seed, step])
    picks = []  # (speaker, its M utterance indices)
    speakers, source = batch_speakers(store, training, rng)
    for s in speakers:
        speaker = store.speakers[s]
        count = store.num_utterances(speaker)
        picks.append((speaker, rng.choice(count, training.M, replace=count < training.M)))
    if store.tdsv:
        clean = np.concatenate([row for speaker, utterances in picks for row in store.read_rows(
            speaker, [(u, u + 1) for u in utterances])])
        rms = np.sqrt(np.mean(clean ** 2, axis=1, keepdims=True))
        snr = rng.uniform(*training.snr_db, (len(clean), 1))
        noisy = clean + _noise(store, clean.shape, rng) * rms * 10.0 ** (-snr / 20.0)
        batch = features.log_mel(noisy.astype(np.float32), store.front)
    else:
        length = int(rng.integers(training.tisv_frame_min, training.tisv_frame + 1))
        if training.short_crops and source is not None:
            # One-second keywords train at their own length, as they are embedded at test time,
            # not repeated three or four times to fill a 140-180-frame crop.
            length = min(length, max(store.median_frames[source], store.front.min_frames))
        batch = _crops(store, picks, length, rng)
    if any(training.spec_augment):
        batch = spec_augment(batch, *training.spec_augment, rng)
    return batch


def training_batches(store: SpeakerStore, training: Training, start_step: int,
                     train_path: str) -> tf.data.Dataset:
    """Batches start_step+1 .. iteration of the store opened from train_path, assembled in
    parallel and prefetched by tf.data."""
    if training.source_weights:
        if len(training.source_weights) != len(store.sources):
            raise ValueError(f"--source_weights: {len(training.source_weights)} weights for "
                             f"{len(store.sources)} --train_path folders; give one per folder")
        for weight, source, path in zip(training.source_weights, store.sources,
                                        train_path.split(",")):
            if weight > 0 and len(source) < training.N:
                raise ValueError(f"--source_weights: {path} has {len(source)} speakers, fewer "
                                 f"than --N {training.N}; lower --N or give it weight 0")

    def make(step):
        return sample_batch(store, training, int(step))

    def as_tensor(step):
        batch = tf.numpy_function(make, [step], tf.float32, stateful=False)
        return tf.ensure_shape(batch, [training.N * training.M, None, store.front.n_mels])

    steps = tf.data.Dataset.range(start_step + 1, training.iteration + 1)
    return steps.map(as_tensor, num_parallel_calls=tf.data.AUTOTUNE,
                     deterministic=True).prefetch(tf.data.AUTOTUNE)
