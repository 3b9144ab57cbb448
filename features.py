"""Audio in, features out: load any supported file, resample, mono, VAD, log-mel, TD-SV phrase.

Functions of the feature settings alone, shared by preprocessing, training, evaluation, the API
and the export parity tests, and a thread pool for many files; the front end of the paper
(25 ms windows, 10 ms hop, 40 log-mel bands).
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import struct
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import librosa
import numpy as np
import scipy.fft
import soundfile as sf
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from configuration import Features
from utils import AUDIO_TYPES

LOG_FLOOR = 1e-6  # digital silence in the recordings must not give log(0)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


class AudioError(ValueError):
    """A file that cannot be used: a short kind (counted in the summary line) and the details."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind

    def __reduce__(self):
        # Both arguments, so an error raised in a worker process arrives whole in the parent.
        return AudioError, (self.kind, str(self))


def feature_settings(front: Features, tdsv_phrase: str = "", tdsv_pattern: str = "") -> dict:
    """The settings that determine the stored arrays; training and test check them."""
    return {"kind": front.kind, "sr": front.sr, "nfft": front.nfft, "window": front.window,
            "hop": front.hop, "n_mels": front.n_mels, "top_db": front.top_db,
            "tdsv_frame": front.tdsv_frame, "min_frames": front.min_frames,
            "tdsv_phrase": tdsv_phrase, "tdsv_pattern": tdsv_pattern}


def _wav_truncation(handle, size: int) -> str | None:
    """Why a RIFF/WAVE file is cut short (its data chunk runs past the end), else None."""
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


# kbit/s of MPEG audio bitrate indices 1-14, by (MPEG-1, layer); MPEG-2 and 2.5 share rows.
_MPEG2_LOW_KBPS = (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)
_MPEG_KBPS = {
    (True, 1): (32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (True, 2): (32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (True, 3): (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (False, 1): (32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (False, 2): _MPEG2_LOW_KBPS, (False, 3): _MPEG2_LOW_KBPS}
_MPEG_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}


def _mpeg_frame_bytes(header: int) -> int | None:
    """Length in bytes of the MPEG audio frame that starts with this 32-bit header, else None
    (not a header, or free format, whose length no header states)."""
    if header >> 21 != 0x7FF:
        return None
    version, layer = (header >> 19) & 3, 4 - ((header >> 17) & 3)
    bitrate, rate, padding = (header >> 12) & 15, (header >> 10) & 3, (header >> 9) & 1
    if version == 1 or layer == 4 or bitrate in (0, 15) or rate == 3:
        return None
    bits = _MPEG_KBPS[version == 3, layer][bitrate - 1] * 1000  # version 3 is MPEG-1
    sr = _MPEG_RATES[version][rate]
    if layer == 1:
        return (12 * bits // sr + padding) * 4
    return (144 if version == 3 or layer == 2 else 72) * bits // sr + padding


def _mp3_truncation(data: mmap.mmap, size: int) -> str | None:
    """Why an MPEG audio file is cut short (its last frame runs past the end), else None; a
    stream that does not follow frame after frame (junk, trailing tags) is left to the decoder."""
    position = 0
    if data[:3] == b"ID3" and size >= 10:  # ID3v2 tag: its size in 7-bit bytes, a footer flag
        position = 10 + sum((byte & 0x7F) << (21 - 7 * i) for i, byte in enumerate(data[6:10]))
        position += 10 if data[5] & 0x10 else 0
        if position > size:
            return f"the ID3 tag declares {position} bytes but the file holds {size}"
    while position + 4 <= size:
        length = _mpeg_frame_bytes(struct.unpack_from(">I", data, position)[0])
        if length is None:
            return None
        if position + length > size:
            return (f"the MPEG frame at byte {position} needs {length} bytes but the file "
                    f"ends {size - position} bytes into it")
        position += length
    if position < size and data[position] == 0xFF:
        return f"the file ends inside the MPEG frame header at byte {position}"
    return None


def _ogg_truncation(data: mmap.mmap, size: int) -> str | None:
    """Why an Ogg file is cut short (its last page runs past the end, or a stream has no
    end-of-stream page), else None; anything but page after page is left to the decoder."""
    position, unfinished = 0, set()
    while position < size:
        if size - position < 27 or position + 27 + data[position + 26] > size:
            if b"OggS".startswith(data[position:position + 4]):
                return f"the file ends inside the Ogg page header at byte {position}"
            return None
        if data[position:position + 4] != b"OggS":
            return None
        flags, serial, segments = struct.unpack_from("<B8xI8xB", data, position + 5)
        length = 27 + segments + sum(data[position + 27:position + 27 + segments])
        if position + length > size:
            return (f"the Ogg page at byte {position} needs {length} bytes but the file ends "
                    f"{size - position} bytes into it")
        if flags & 2:  # beginning of a logical stream
            unfinished.add(serial)
        if flags & 4:  # its end
            unfinished.discard(serial)
        position += length
    return "an Ogg stream has no end-of-stream page" if unfinished else None


def truncation(path: str | Path) -> str | None:
    """Why a WAV, MP3 or Ogg file is cut short of the length its own structure states, else None.

    libsndfile decodes what is left of such a file without a word; FLAC fails in the decoder."""
    size = Path(path).stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(12)
        if len(head) == 12 and head[:4] == b"RIFF" and head[8:12] == b"WAVE":
            return _wav_truncation(handle, size)
        is_ogg = head[:4] == b"OggS"
        if size < 4 or not (is_ogg or head[:3] == b"ID3" or
                            _mpeg_frame_bytes(int.from_bytes(head[:4], "big"))):
            return None
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return (_ogg_truncation if is_ogg else _mp3_truncation)(data, size)


def _libsndfile_reason(error: sf.LibsndfileError) -> str:
    """libsndfile's error in words that name the problem."""
    reason = error.error_string.strip().rstrip(".").removeprefix("Error : ")
    # The file exists: for a .mp3 that is not MPEG audio libsndfile says it does not.
    if error.code == 1 or reason.startswith("File does not exist"):
        return f"format not recognised (expected {AUDIO_TYPES})"
    return reason


def load_audio(path: str | Path, sr: int) -> np.ndarray:
    """Mono float32 waveform at sr: any channel count, sample format or rate; soxr resampling."""
    if not os.path.isfile(path):
        raise AudioError("missing", "file not found")
    try:
        if os.path.getsize(path) == 0:
            raise AudioError("unreadable", "not readable audio: empty file (0 bytes)")
        # A cut recording is a bad file, though libsndfile reads what is left of it.
        cut = truncation(path)
        if cut:
            raise AudioError("truncated", f"not readable audio: cut short: {cut}")
        try:
            sound = sf.SoundFile(path)
        except sf.LibsndfileError as error:
            raise AudioError("unreadable", f"not readable audio: {_libsndfile_reason(error)}"
                             ) from None
        with sound:
            file_sr = sound.samplerate
            try:
                wav = sound.read(dtype="float32", always_2d=True)
            except sf.LibsndfileError as error:
                raise AudioError("unreadable", "not readable audio: damaged or cut short after "
                                 f"its header ({_libsndfile_reason(error)})") from None
    except (RuntimeError, OSError) as error:
        raise AudioError("unreadable", f"not readable audio: {str(error).splitlines()[0]}"
                         ) from None
    if wav.shape[0] == 0:
        raise AudioError("empty", "no samples")
    wav = wav[:, 0] if wav.shape[1] == 1 else wav.mean(axis=1)
    # One fast reduction first; the elementwise check only when the sum is not finite (a sum
    # of huge but finite samples can overflow).
    if not np.isfinite(wav.sum()) and not np.all(np.isfinite(wav)):
        raise AudioError("non-finite", "NaN or Inf samples")
    wav = resample(wav, file_sr, sr)
    if max(wav.max(), -wav.min()) < 1e-5:
        raise AudioError("silent", "silent (peak below -100 dBFS)")
    return np.ascontiguousarray(wav, dtype=np.float32)


def resample(wav: np.ndarray, orig_sr: float, sr: int) -> np.ndarray:
    """wav at sample rate sr (soxr's high-quality filter); unchanged when already there."""
    if orig_sr == sr:
        return wav
    return librosa.resample(wav, orig_sr=orig_sr, target_sr=sr, res_type="soxr_hq")


def speed_perturb(wav: np.ndarray, factor: float, sr: int) -> np.ndarray:
    """wav played `factor` times faster (tempo and pitch, as sox's speed): read as if sampled at
    sr * factor, resampled back to sr."""
    return resample(wav, sr * factor, sr)


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


def frames(wav: np.ndarray, front: Features) -> np.ndarray:
    """[..., 1 + samples // hop, nfft] strided view of wav (no copy): frames centred on
    multiples of the hop, zero-padded at the ends, as librosa's stft and rms (center=True)."""
    half = front.nfft // 2
    padded = np.zeros((*wav.shape[:-1], wav.shape[-1] + 2 * half), np.float32)
    padded[..., half:half + wav.shape[-1]] = wav
    view = np.lib.stride_tricks.sliding_window_view(padded, front.nfft, axis=-1)
    return view[..., ::front.hop_samples, :]


def frames_log_mel(framed: np.ndarray, front: Features,
                   keep: np.ndarray | None = None) -> np.ndarray:
    """log10 mel power [..., frames, n_mels] of frames from frames() (only the `keep` ones if
    given): the original recipe (Hann window centred in nfft, |FFT|^2, mel, log10) in float32."""
    length = front.window_samples
    offset = (front.nfft - length) // 2
    # The FFT zero-pads the window at the end instead of around it: a circular shift, which
    # leaves the power spectrum unchanged.
    windowed = framed[..., offset:offset + length]
    if keep is None:
        windowed = windowed * hann_window(length)
    else:
        windowed = windowed[keep]
        windowed *= hann_window(length)
    spectrum = scipy.fft.rfft(windowed, n=front.nfft, axis=-1)
    squares = spectrum.view(np.float32)
    np.square(squares, out=squares)
    mel = squares @ _interleaved_mel_basis(front.sr, front.nfft, front.n_mels)
    return np.log10(mel + LOG_FLOOR, out=mel)


def log_mel(wav: np.ndarray, front: Features) -> np.ndarray:
    """log10 mel power spectrogram [..., frames, n_mels] of wav [..., samples] (original recipe)."""
    return frames_log_mel(frames(np.asarray(wav, dtype=np.float32), front), front)


def voiced_frames(framed: np.ndarray, n_samples: int, front: Features) -> np.ndarray:
    """The frames librosa's VAD (effects.split: frame RMS within --top_db of the loudest) keeps,
    as a boolean mask over frames(wav) of a mono wav."""
    rms = np.sqrt(np.einsum("ij,ij->i", framed, framed) / front.nfft)
    power = np.maximum(rms * rms, 1e-10)  # as librosa's amplitude_to_db (amin 1e-5 squared)
    db = 10.0 * np.log10(power) - 10.0 * np.log10(power.max())
    keep = db > -front.top_db
    # effects.split clips the last interval at the signal's end; the conversion back to frames
    # then drops the last frame when it starts exactly at the end.
    if n_samples % front.hop_samples == 0:
        keep[-1] = False
    return keep


def voiced_features(wav: np.ndarray, front: Features) -> np.ndarray:
    """Log-mel frames of the intervals that librosa's VAD (effects.split) keeps."""
    framed = frames(wav, front)
    keep = voiced_frames(framed, len(wav), front)
    if keep.sum() < front.min_frames:
        raise AudioError("too short", f"too short: {keep.sum()} voiced frames, expected at "
                                      f"least --min_frames {front.min_frames}")
    return frames_log_mel(framed, front, keep)


def phrase_span(wav: np.ndarray, front: Features) -> tuple[int, int]:
    """(start, end) samples of the phrase: as librosa.effects.trim, from the first to the end of
    the last frame the VAD keeps."""
    hop = front.hop_samples
    kept = np.flatnonzero(voiced_frames(frames(wav, front), len(wav), front))
    start, end = (kept[0] * hop, min(len(wav), (kept[-1] + 1) * hop)) if kept.size else (0, 0)
    if end - start < front.min_frames * hop // 4:
        raise AudioError("too short", f"too short: {end - start} voiced samples, expected at "
                                      f"least {front.min_frames * hop // 4} (--min_frames / 4)")
    return start, end


def centred_phrase(wav: np.ndarray, span: tuple[int, int], front: Features
                   ) -> np.ndarray:
    """The window of exactly --tdsv_frame frames centred on span (a longer phrase is cut)."""
    length = (front.tdsv_frame - 1) * front.hop_samples
    centre = (span[0] + span[1]) // 2
    lo = max(0, min(centre - length // 2, len(wav) - length))
    segment = wav[lo:lo + length]
    return np.pad(segment, (0, length - len(segment))).astype(np.float32)


def phrase_waveform(wav: np.ndarray, front: Features) -> np.ndarray:
    """The phrase trimmed by VAD, centred in a window of exactly --tdsv_frame frames."""
    return centred_phrase(wav, phrase_span(wav, front), front)


def phrase_frames(span: tuple[int, int], front: Features) -> int:
    """The --tdsv_frame that just holds the phrase span: a window of n frames spans n - 1 hops."""
    return 1 + int(-(-(span[1] - span[0]) // front.hop_samples))


def inference_features(wav: np.ndarray, front: Features) -> np.ndarray:
    """Features of one recording as the model saw them in training: VAD'd log-mel (TI-SV) or
    the log-mel of the trimmed, fixed-length phrase (TD-SV)."""
    if front.tdsv:
        return log_mel(phrase_waveform(wav, front), front)
    return voiced_features(wav, front)


def files_inference_features(paths: list[str | Path], front: Features
                             ) -> list[np.ndarray | AudioError]:
    """inference_features of each audio file, on one thread per core (decoding and the FFT
    release the GIL); a file that cannot be used gives its AudioError in its place."""
    def one(path):
        try:
            return inference_features(load_audio(path, front.sr), front)
        except AudioError as error:
            return error

    keep_freed_memory()  # the threads share one address space, so their page faults contend
    # BLAS threads only slow the small mel matmuls down, and spin against the other threads.
    with threadpool_limits(limits=1, user_api="blas"), \
            ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        return list(tqdm(pool.map(one, paths), total=len(paths), desc="features", unit="file",
                         dynamic_ncols=True, disable=len(paths) < 2))


def keep_freed_memory() -> None:
    """Keep freed heap memory for the next file (glibc only; elsewhere a no-op). By default the
    per-file buffers (0.1-2 MB each) are returned to the system and page-faulted in again for
    every file: 86,000 faults on speechocean762 against 11,000, and half the system time."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None) if sys.platform == "linux" else None
    if mallopt is not None:
        # Both fixed, or glibc's dynamic thresholds stay on for the other (more faults, not fewer).
        mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's maximum on 64-bit
        mallopt(M_TRIM_THRESHOLD, 512 << 20)
