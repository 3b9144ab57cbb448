"""--augment: simulated-room RIRs, additive noise at an SNR, seeded copies, and their wiring in
preprocessing (K copies per training utterance, none in the test split, same arrays when resumed
or sharded)."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from robust_corpus import SR, speech_like, write_speakers

import augment
import data_preprocess


def schroeder_t20(rir: np.ndarray, sr: int) -> float:
    """RT60 from a least-squares line through the Schroeder decay curve's -5 to -25 dB part."""
    energy = np.cumsum(np.asarray(rir, np.float64)[::-1] ** 2)[::-1]
    decay = 10.0 * np.log10(energy / energy[0])
    part = np.flatnonzero((decay <= -5.0) & (decay >= -25.0))
    slope = np.polyfit(part / sr, decay[part], 1)[0]
    return -60.0 / slope


@pytest.mark.parametrize("rt60_range", [(0.25, 0.35), (0.6, 0.75)])
def test_rir_starts_with_the_direct_path_and_decays_in_the_requested_time(rt60_range):
    for seed in range(4):
        rir = augment.room_impulse_response(np.random.default_rng(seed), SR, rt60_range)
        peak = int(np.argmax(np.abs(rir)))
        assert rir[peak] == pytest.approx(1.0)
        # Nothing before the direct path but its fractional-delay filter's small side lobes.
        assert peak <= augment.DIRECT_LEAD and np.max(np.abs(rir[:max(peak - 2, 1)])) < 0.3
        assert rt60_range[0] * 0.9 <= schroeder_t20(rir, SR) <= rt60_range[1] * 1.1, seed


def test_reverberate_is_the_convolution_cut_to_the_input_length():
    rng = np.random.default_rng(1)
    wav, rir = rng.standard_normal(3000).astype(np.float32), rng.standard_normal(700)
    out = augment.reverberate(wav, rir)
    assert out.shape == wav.shape
    np.testing.assert_allclose(out, np.convolve(wav, rir)[:3000], atol=1e-4)


@pytest.mark.parametrize("snr_db", [-5.0, 0.0, 12.5])
def test_add_noise_gives_the_requested_snr(snr_db):
    wav = speech_like(seed=2)
    noise = np.random.default_rng(3).standard_normal(5000) * 7.0  # shorter: looped
    added = augment.add_noise(wav, noise, snr_db).astype(np.float64) - wav
    measured = 10.0 * np.log10(np.mean(wav.astype(np.float64) ** 2) / np.mean(added ** 2))
    assert measured == pytest.approx(snr_db, abs=0.01)
    assert np.corrcoef(added, np.resize(noise, len(wav)))[0, 1] > 0.9999


@pytest.mark.parametrize("kind", ["white", "pink", "brown"])
def test_coloured_noise_has_the_power_law_of_its_colour(kind):
    noise = augment.coloured_noise(np.random.default_rng(4), 2 ** 16, augment.COLOUR_EXPONENTS[kind])
    assert np.sqrt(np.mean(noise ** 2)) == pytest.approx(1.0)
    power = np.abs(np.fft.rfft(noise)) ** 2
    frequency = np.fft.rfftfreq(len(noise), 1.0 / SR)
    band = (frequency > 50) & (frequency < 5000)
    slope = np.polyfit(np.log10(frequency[band]), np.log10(power[band]), 1)[0]
    assert slope == pytest.approx(-augment.COLOUR_EXPONENTS[kind], abs=0.1)


def test_copies_are_determined_by_seed_speaker_utterance_and_index():
    wav = speech_like(seed=5)
    talkers = [speech_like(seed=6), speech_like(seed=7)]

    def copy(*key):
        return augment.augmented_copy(wav, SR, augment.copy_rng(*key), (5.0, 20.0), None,
                                      talkers)[0]

    first = copy(0, "spk", "a.wav", 1)
    np.testing.assert_array_equal(first, copy(0, "spk", "a.wav", 1))
    for other in ((1, "spk", "a.wav", 1), (0, "spk2", "a.wav", 1), (0, "spk", "b.wav", 1),
                  (0, "spk", "a.wav", 2)):
        assert not np.array_equal(first, copy(*other)), other


def run(audio: Path, out: Path, *extra: str) -> dict:
    assert data_preprocess.main(["--audio_path", str(audio), "--train_path", str(out / "train"),
                                 "--test_path", str(out / "test"), "--test_ratio", "0.25",
                                 *extra]) == 0
    return {split: json.loads((out / split / "manifest.json").read_text())
            for split in ("train", "test") if (out / split / "manifest.json").exists()}


def split_files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.glob("spk*.npy"))}


def test_preprocessing_writes_k_copies_per_training_utterance_only(tmp_path):
    write_speakers(tmp_path / "audio", speakers=4, utterances=3)
    manifests = run(tmp_path / "audio", tmp_path / "a", "--augment", "2")
    assert len(manifests["train"]["speakers"]) == 3 and len(manifests["test"]["speakers"]) == 1
    assert manifests["train"]["settings"]["augment"] == 2
    assert "augment" not in manifests["test"]["settings"]
    for split in ("train", "test"):
        for speaker in manifests[split]["speakers"]:
            sidecar = json.loads((tmp_path / "a" / split / f"{speaker}.json").read_text())
            originals = [f"{speaker}/utt{u:02d}.wav" for u in range(3)]
            expected = ([name for o in originals for name in (o, f"{o}#augment1", f"{o}#augment2")]
                        if split == "train" else originals)
            assert sidecar["utterances"] == expected
            array = np.load(tmp_path / "a" / split / f"{speaker}.npy")
            assert array.shape[0] == sum(sidecar["lengths"])
            if split == "train":
                assert sorted(sidecar["augmented"]) == sorted(expected[1::3] + expected[2::3])
                for recipe in sidecar["augmented"].values():
                    assert recipe["noise"] in augment.NOISE_KINDS
                    assert 5.0 <= recipe["snr_db"] <= 20.0
                bounds = np.cumsum([0] + sidecar["lengths"])
                clean, copy = array[bounds[0]:bounds[1]], array[bounds[1]:bounds[2]]
                assert not np.allclose(clean[:min(len(clean), len(copy))],
                                       copy[:min(len(clean), len(copy))], atol=0.1)
    reference = split_files(tmp_path / "a" / "train")

    # Resumed: nothing rewritten. Sharded over two runs: the same arrays.
    before = {f: (tmp_path / "a" / "train" / f).stat().st_mtime_ns for f in reference}
    run(tmp_path / "audio", tmp_path / "a", "--augment", "2")
    assert {f: (tmp_path / "a" / "train" / f).stat().st_mtime_ns for f in reference} == before
    for shard in ("0", "1"):
        run(tmp_path / "audio", tmp_path / "b", "--augment", "2", "--num_shards", "2",
            "--shard", shard)
    assert split_files(tmp_path / "b" / "train") == reference

    # A changed setting redoes the training speakers, not the test split.
    test_before = split_files(tmp_path / "a" / "test")
    run(tmp_path / "audio", tmp_path / "a", "--augment", "2", "--augment_snr_db", "0", "1")
    changed = split_files(tmp_path / "a" / "train")
    assert changed.keys() == reference.keys()
    assert all(changed[f] != reference[f] for f in reference)
    assert split_files(tmp_path / "a" / "test") == test_before


def test_noise_path_recordings_are_the_noise(tmp_path):
    write_speakers(tmp_path / "audio", speakers=3, utterances=2)
    (tmp_path / "noise").mkdir()
    sf.write(tmp_path / "noise" / "hum.wav",
             0.1 * np.sin(2 * np.pi * 60 * np.arange(SR) / SR).astype(np.float32), SR)
    manifests = run(tmp_path / "audio", tmp_path / "out", "--augment", "1", "--noise_path",
                    str(tmp_path / "noise"))
    assert manifests["train"]["settings"]["augment_noise"] == str((tmp_path / "noise").resolve())
    speaker = manifests["train"]["speakers"][0]
    sidecar = json.loads((tmp_path / "out" / "train" / f"{speaker}.json").read_text())
    assert {r["noise"] for r in sidecar["augmented"].values()} == {"recorded"}
    assert "babble" not in sidecar["settings"]
