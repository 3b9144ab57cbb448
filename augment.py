"""Training-copy augmentation: reverberation in a random simulated shoebox room (pyroomacoustics'
image-source model) and additive noise at a chosen SNR; pure functions of a seeded Generator."""

from __future__ import annotations

import hashlib

import numpy as np
import pyroomacoustics as pra
import scipy.signal

ROOM_SIZE_M = ((3.0, 3.0, 2.4), (10.0, 8.0, 4.0))  # shoebox length, width, height: low, high
RT60_S = (0.2, 0.8)  # the realised reverberation times (Schroeder T20) fall in this range
WALL_MARGIN_M = 0.5  # source and microphone at least this far from every wall
MIN_DISTANCE_M = 0.75  # source to microphone
# The image order reaches every arrival up to a 30 dB decay; the rest of the tail lies under
# the added noise, and each further order costs quadratically more images.
TAIL_DB = 30.0
ROOM_TRIES = 8  # rooms drawn until the realised RT60 is in range (Sabine's estimate is not exact)
DIRECT_LEAD = 16  # samples kept before the direct-path peak: its fractional-delay filter's lobe
NOISE_KINDS = ("white", "pink", "brown", "babble")
COLOUR_EXPONENTS = {"white": 0.0, "pink": 1.0, "brown": 2.0}  # power spectrum ~ 1 / f^exponent
BABBLE_TALKERS = 3


def copy_rng(seed: int, speaker: str, utterance: str, copy: int) -> np.random.Generator:
    """The generator of one augmented copy: the same in every run, shard and worker."""
    digest = hashlib.sha256(f"{speaker}\0{utterance}".encode()).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little"), copy])


def _shoebox(rng: np.random.Generator, sr: int, rt60: float) -> np.ndarray:
    """The raw image-source RIR of a random room whose Sabine RT60 is rt60."""
    size = rng.uniform(*ROOM_SIZE_M)
    absorption, _ = pra.inverse_sabine(rt60, size)
    reach = pra.constants.get("c") * rt60 * TAIL_DB / 60.0
    # The image of order n farthest in time lies along the diagonal of the image lattice.
    order = int(np.ceil(reach * np.sqrt(np.sum(1.0 / size ** 2))))
    room = pra.ShoeBox(size, fs=sr, materials=pra.Material(absorption), max_order=order,
                       air_absorption=False)
    microphone = rng.uniform(WALL_MARGIN_M, size - WALL_MARGIN_M)
    source = rng.uniform(WALL_MARGIN_M, size - WALL_MARGIN_M)
    while np.linalg.norm(source - microphone) < MIN_DISTANCE_M:
        source = rng.uniform(WALL_MARGIN_M, size - WALL_MARGIN_M)
    room.add_source(source)
    room.add_microphone(microphone)
    room.compute_rir()
    return np.asarray(room.rir[0][0], dtype=np.float64)


def room_impulse_response(rng: np.random.Generator, sr: int,
                          rt60_range: tuple[float, float] = RT60_S) -> np.ndarray:
    """RIR of a random shoebox room with a random RT60 in rt60_range, starting DIRECT_LEAD
    samples before the direct path, which is scaled to 1."""
    best, miss = None, np.inf
    for _ in range(ROOM_TRIES):
        rir = _shoebox(rng, sr, rng.uniform(*rt60_range))
        realised = pra.experimental.measure_rt60(rir, fs=sr, decay_db=20)
        off = max(rt60_range[0] - realised, realised - rt60_range[1], 0.0)
        if off < miss:
            best, miss = rir, off
        if off == 0.0:
            break
    peak = int(np.argmax(np.abs(best)))
    rir = best[max(0, peak - DIRECT_LEAD):] / best[peak]
    return rir.astype(np.float32)


def reverberate(wav: np.ndarray, rir: np.ndarray) -> np.ndarray:
    """wav convolved with rir, cut to wav's length (the tail past the end is dropped)."""
    return scipy.signal.oaconvolve(wav, rir)[:len(wav)].astype(np.float32)


def add_noise(wav: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """wav plus noise (looped or cut to wav's length) scaled to snr_db below wav's mean power."""
    noise = np.resize(np.asarray(noise, dtype=np.float64), len(wav))
    signal_power = float(np.mean(np.square(wav, dtype=np.float64)))
    noise_power = max(float(np.mean(noise ** 2)), 1e-20)
    gain = np.sqrt(signal_power / (noise_power * 10.0 ** (snr_db / 10.0)))
    return (wav + gain * noise).astype(np.float32)


def coloured_noise(rng: np.random.Generator, length: int, exponent: float) -> np.ndarray:
    """Gaussian noise whose power spectrum falls as 1 / f^exponent (0 white, 1 pink, 2 brown),
    unit RMS."""
    spectrum = np.fft.rfft(rng.standard_normal(length))
    frequency = np.fft.rfftfreq(length)
    frequency[0] = frequency[1]  # no infinite gain at DC
    noise = np.fft.irfft(spectrum / frequency ** (exponent / 2.0), n=length)
    return noise / max(float(np.sqrt(np.mean(noise ** 2))), 1e-20)


def babble(rng: np.random.Generator, length: int, talkers: list[np.ndarray]) -> np.ndarray:
    """A few other talkers' speech summed, each at unit RMS, looped to length and started at a
    random point."""
    mixture = np.zeros(length)
    for index in rng.choice(len(talkers), min(BABBLE_TALKERS, len(talkers)), replace=False):
        speech = np.asarray(talkers[index], dtype=np.float64)
        speech = np.roll(np.resize(speech, length), int(rng.integers(length)))
        mixture += speech / max(float(np.sqrt(np.mean(speech ** 2))), 1e-20)
    return mixture


def noise_segment(rng: np.random.Generator, stream: np.ndarray, length: int) -> np.ndarray:
    """A random piece of a noise stream (looped when shorter than length)."""
    start = int(rng.integers(len(stream)))
    return np.resize(np.roll(stream, -start), length)


def augmented_copy(wav: np.ndarray, sr: int, rng: np.random.Generator,
                   snr_db: tuple[float, float], noise_stream: np.ndarray | None,
                   talkers: list[np.ndarray]) -> tuple[np.ndarray, dict]:
    """wav reverberated in a random room plus noise at a random SNR in snr_db: a piece of
    noise_stream when given, else coloured noise or babble of talkers. Returns (copy, recipe)."""
    reverberant = reverberate(wav, room_impulse_response(rng, sr))
    snr = float(rng.uniform(*snr_db))
    if noise_stream is not None:
        kind, noise = "recorded", noise_segment(rng, noise_stream, len(wav))
    else:
        kinds = NOISE_KINDS if talkers else NOISE_KINDS[:-1]
        kind = str(kinds[int(rng.integers(len(kinds)))])
        noise = (babble(rng, len(wav), talkers) if kind == "babble"
                 else coloured_noise(rng, len(wav), COLOUR_EXPONENTS[kind]))
    return add_noise(reverberant, noise, snr), {"noise": kind, "snr_db": round(snr, 2)}
