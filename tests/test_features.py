"""Issue #5, features: the single-framing-pass log-mel and VAD equal the original librosa recipe
(librosa.stft + mel + log10, and librosa.effects.split intervals), frame for frame."""

import ast
import json
from pathlib import Path

import librosa
import numpy as np
import pytest
import soundfile as sf
from conftest import REPO

import configuration
import data_preprocess
import features

CONFIG = configuration.Features()


def reference_log_mel(wav: np.ndarray) -> np.ndarray:
    """The original recipe, written with librosa's stft."""
    hop = CONFIG.hop_samples
    spectrum = librosa.stft(wav, n_fft=CONFIG.nfft, hop_length=hop,
                            win_length=CONFIG.window_samples, center=True,
                            pad_mode="constant")
    basis = librosa.filters.mel(sr=CONFIG.sr, n_fft=CONFIG.nfft, n_mels=CONFIG.n_mels)
    return np.swapaxes(np.log10(basis @ np.abs(spectrum) ** 2 + 1e-6), -1, -2)


def reference_voiced_features(wav: np.ndarray) -> np.ndarray:
    """Frames inside librosa.effects.split's intervals (sample intervals back to frames)."""
    hop = CONFIG.hop_samples
    log_mel = reference_log_mel(wav)
    keep = np.zeros(len(log_mel), dtype=bool)
    for start, end in librosa.effects.split(wav, top_db=CONFIG.top_db, frame_length=CONFIG.nfft,
                                            hop_length=hop):
        keep[start // hop:-(-end // hop)] = True
    return log_mel[keep]


def bursts(samples: int, seed: int) -> np.ndarray:
    """Tones switched on and off, so the VAD has edges to find."""
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / CONFIG.sr
    gate = np.sin(2 * np.pi * rng.uniform(1, 4) * t) > rng.uniform(-0.5, 0.5)
    voice = np.sin(2 * np.pi * rng.uniform(100, 300) * t) + 0.3 * rng.standard_normal(samples)
    return (0.5 * voice * gate + 1e-4 * rng.standard_normal(samples)).astype(np.float32)


@pytest.mark.parametrize("samples", [16000, 16160, 16001, 24159, 400])
def test_log_mel_equals_librosa_stft_recipe(samples):
    wav = bursts(samples, samples)
    np.testing.assert_allclose(features.log_mel(wav, CONFIG), reference_log_mel(wav),
                               atol=1e-4)


def test_batched_log_mel_equals_one_at_a_time():
    batch = np.stack([bursts(12800, seed) for seed in range(3)])
    ours = features.log_mel(batch, CONFIG)
    assert ours.shape == (3, 81, CONFIG.n_mels)
    for row, wav in zip(ours, batch):
        np.testing.assert_allclose(row, reference_log_mel(wav), atol=1e-4)


# Lengths that are and are not a multiple of the hop: the last frame is a special case.
@pytest.mark.parametrize("samples, seed", [(32000, 1), (32001, 2), (48160, 3), (47999, 4)])
def test_voiced_features_equal_effects_split(samples, seed):
    wav = bursts(samples, seed)
    wav[-800:] = 0.4 * np.sin(np.arange(800))  # loud to the very end
    reference = reference_voiced_features(wav)
    ours = features.voiced_features(wav, CONFIG)
    assert 0 < len(ours) < len(reference_log_mel(wav))
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours, reference, atol=1e-4)


def test_voiced_features_of_real_recordings_equal_effects_split(shared_data):
    files = sorted((shared_data / "speechocean762").rglob("*.flac"))[::200]
    files += sorted((shared_data / "dspspeech20").rglob("*.flac"))[::300]
    files += sorted((shared_data / "fsdd").rglob("*.flac"))[::600]
    config = configuration.Features(min_frames=1)  # short digits included
    for file in files:
        wav = features.load_audio(file, CONFIG.sr)
        for cut in (wav, wav[:len(wav) // 160 * 160]):
            reference = reference_voiced_features(cut)
            ours = features.voiced_features(cut, config)
            assert ours.shape == reference.shape, file
            np.testing.assert_allclose(ours, reference, atol=1e-4, err_msg=str(file))


@pytest.mark.parametrize("sr, nfft, n_mels", [(16000, 512, 40), (8000, 256, 40), (22050, 2048, 128),
                                              (16000, 400, 24)])
def test_mel_basis_equals_librosa(sr, nfft, n_mels):
    ours = features.mel_basis(sr, nfft, n_mels)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, librosa.filters.mel(sr=sr, n_fft=nfft, n_mels=n_mels),
                               rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("length", [400, 401, 160])
def test_hann_window_equals_librosa(length):
    np.testing.assert_allclose(features.hann_window(length),
                               librosa.filters.get_window("hann", length, fftbins=True), atol=1e-7)


def reference_phrase_waveform(wav: np.ndarray, config) -> np.ndarray:
    """phrase_waveform with librosa.effects.trim finding the phrase."""
    hop = config.hop_samples
    length = (config.tdsv_frame - 1) * hop
    _, (start, end) = librosa.effects.trim(wav, top_db=config.top_db, frame_length=config.nfft,
                                           hop_length=hop)
    lo = max(0, min((start + end) // 2 - length // 2, len(wav) - length))
    segment = wav[lo:lo + length]
    return np.pad(segment, (0, length - len(segment)))


@pytest.mark.parametrize("samples, seed", [(32000, 1), (32001, 2), (48160, 3), (7999, 4)])
def test_phrase_waveform_equals_librosa_trim(samples, seed):
    config = configuration.Features(min_frames=1)
    wav = bursts(samples, seed)
    np.testing.assert_array_equal(features.phrase_waveform(wav, config),
                                  reference_phrase_waveform(wav, config))


def test_phrase_waveform_of_real_recordings_equals_librosa_trim(shared_data):
    config = configuration.Features(min_frames=1)
    files = sorted((shared_data / "dspspeech20").rglob("*.flac"))[::40]
    files += sorted((shared_data / "fsdd").rglob("*.flac"))[::300]
    for file in files:
        wav = features.load_audio(file, CONFIG.sr)
        np.testing.assert_array_equal(features.phrase_waveform(wav, config),
                                      reference_phrase_waveform(wav, config), err_msg=str(file))


@pytest.mark.parametrize("samples, seed", [(32000, 1), (32001, 2), (48160, 3), (7999, 4)])
def test_phrase_frames_count_the_librosa_trim_span(samples, seed):
    config = configuration.Features(min_frames=1)
    wav = bursts(samples, seed)
    hop = config.hop_samples
    _, (start, end) = librosa.effects.trim(wav, top_db=config.top_db, frame_length=config.nfft,
                                           hop_length=hop)
    span = features.phrase_span(wav, config)
    frames = features.phrase_frames(span, config)
    assert frames == 1 + -(-(end - start) // hop)
    # The window of exactly that many frames holds the phrase; one frame fewer cuts it.
    for tdsv_frame, cut in ((frames, False), (frames - 1, True)):
        window = (tdsv_frame - 1) * hop
        assert (end - start > window) == cut


def tone_in_silence(tone_seconds: float, seconds: float = 2.0, sr: int = 16000) -> np.ndarray:
    """A 200 Hz tone of tone_seconds in the middle of near-silence: a phrase of known length."""
    t = np.arange(int(seconds * sr)) / sr
    on = np.abs(t - seconds / 2) < tone_seconds / 2
    return (0.5 * np.sin(2 * np.pi * 200 * t) * on + 1e-5 * np.cos(t)).astype(np.float32)


def test_tdsv_manifest_counts_phrases_longer_than_the_window(tmp_path, capsys):
    # Phrases of 0.5 s and 1.2 s; a window of 80 frames (0.8 s) cuts exactly the long ones.
    durations = {"spk0": [0.5, 1.2, 0.5], "spk1": [1.2, 1.2, 0.5], "spk2": [0.5, 0.5, 0.5]}
    for speaker, tones in durations.items():
        (tmp_path / "audio" / speaker).mkdir(parents=True)
        for u, tone in enumerate(tones):
            sf.write(tmp_path / "audio" / speaker / f"u{u}.wav", tone_in_silence(tone), 16000)
    flags = ["--tdsv", "True", "--tdsv_pattern", ".", "--tdsv_frame", "80",
             "--audio_path", str(tmp_path / "audio"), "--test_ratio", "0.34",
             "--train_path", str(tmp_path / "train"), "--test_path", str(tmp_path / "test")]
    assert data_preprocess.main(flags) == 0
    out = capsys.readouterr().out
    counted = 0
    for split in ("train", "test"):
        manifest = json.loads((tmp_path / split / "manifest.json").read_text())
        long = sum(tone > 0.8 for sp in manifest["speakers"] for tone in durations[sp])
        summary = manifest["phrase_frames"]
        assert summary["phrases"] == 3 * len(manifest["speakers"])
        assert summary["longer_than_tdsv_frame"] == long
        # the VAD's span is the tone give or take the edge frames
        longest = 100 * max(tone for sp in manifest["speakers"] for tone in durations[sp])
        assert longest - 2 <= summary["max"] <= longest + 4
        counted += long
        if long:
            assert f"{split}: {long} of {summary['phrases']} phrases are longer than " \
                   f"--tdsv_frame 80 frames" in out
            assert f"--tdsv_frame {summary['p90']} would keep 90 % of them whole" in out
    assert counted == 3
    # A sidecar written before phrase lengths were recorded is redone on a re-run, not counted
    # as a speaker with no phrases.
    first = json.loads((tmp_path / "train" / "manifest.json").read_text())["speakers"][0]
    sidecar = tmp_path / "train" / f"{first}.json"
    old = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({k: v for k, v in old.items() if k != "phrase_frames"}))
    before = json.loads((tmp_path / "train" / "manifest.json").read_text())["phrase_frames"]
    assert data_preprocess.main(flags) == 0
    assert json.loads(sidecar.read_text())["phrase_frames"] == old["phrase_frames"]
    assert json.loads((tmp_path / "train" / "manifest.json").read_text())["phrase_frames"] == before
    capsys.readouterr()
    # A window that holds every phrase cuts none, and says nothing about it.
    assert data_preprocess.main(flags[:5] + ["130"] + flags[6:-4] + [
        "--train_path", str(tmp_path / "train130"), "--test_path", str(tmp_path / "test130")]) == 0
    assert "phrases are longer" not in capsys.readouterr().out
    for split in ("train130", "test130"):
        manifest = json.loads((tmp_path / split / "manifest.json").read_text())
        assert manifest["phrase_frames"]["longer_than_tdsv_frame"] == 0


# --- speed perturbation (speaker augmentation) --------------------------------------------------

@pytest.mark.parametrize("factor", [0.9, 1.1])
def test_speed_perturb_scales_pitch_and_duration(factor):
    sr, seconds, pitch = 16000, 2.0, 200.0
    wav = np.sin(2 * np.pi * pitch * np.arange(int(seconds * sr)) / sr).astype(np.float32)
    perturbed = features.speed_perturb(wav, factor, sr)
    assert abs(len(perturbed) - len(wav) / factor) <= 1
    spectrum = np.abs(np.fft.rfft(perturbed * np.hanning(len(perturbed))))
    peak_hz = np.argmax(spectrum) * sr / len(perturbed)
    assert abs(peak_hz - pitch * factor) < 1.0


def test_speed_perturb_adds_training_speakers_only(tmp_path):
    from robust_corpus import write_speakers

    audio = tmp_path / "audio"
    write_speakers(audio, speakers=5, utterances=3)
    out = tmp_path / "out"
    flags = ["--audio_path", str(audio), "--train_path", str(out / "train"),
             "--test_path", str(out / "test"), "--test_ratio", "0.2"]
    assert data_preprocess.main(flags) == 0
    plain = {split: json.loads((out / split / "manifest.json").read_text())["speakers"]
             for split in ("train", "test")}
    assert data_preprocess.main(flags + ["--speed_perturb", "0.9", "1.1"]) == 0
    train = json.loads((out / "train" / "manifest.json").read_text())["speakers"]
    test = json.loads((out / "test" / "manifest.json").read_text())["speakers"]
    assert test == plain["test"]
    assert sorted(train) == sorted(plain["train"] + [f"{s}_sp{f}" for s in plain["train"]
                                                     for f in ("0.9", "1.1")])
    speaker = plain["train"][0]
    original = np.load(out / "train" / f"{speaker}.npy", allow_pickle=False)
    for factor in (0.9, 1.1):
        sidecar = json.loads((out / "train" / f"{speaker}_sp{factor}.json").read_text())
        assert sidecar["settings"]["speed"] == factor
        perturbed = np.load(out / "train" / f"{speaker}_sp{factor}.npy", allow_pickle=False)
        # Slower speech has more voiced frames, faster speech fewer.
        assert (len(perturbed) > len(original)) == (factor < 1)
    # A re-run finds every copy finished and rewrites nothing.
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "train").glob("*.npy")}
    assert data_preprocess.main(flags + ["--speed_perturb", "0.9", "1.1"]) == 0
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (out / "train").glob("*.npy")}


def test_speed_perturb_lists_a_bad_file_once_per_copy(tmp_path):
    from robust_corpus import write_speakers

    audio = tmp_path / "audio"
    write_speakers(audio, speakers=4, utterances=3)
    out = tmp_path / "out"
    flags = ["--audio_path", str(audio), "--train_path", str(out / "train"), "--test_path",
             str(out / "test"), "--test_ratio", "0.25", "--min_utterances", "2"]
    train_speakers, _ = data_preprocess.split_speakers(
        sorted(p.name for p in audio.iterdir()), 0.25, configuration.parse_config(flags).seed)
    bad = sorted((audio / train_speakers[0]).rglob("*.wav"))[0]
    bad.write_bytes(b"not audio")
    assert data_preprocess.main(flags + ["--speed_perturb", "0.9", "1.1"]) == 0
    manifest = json.loads((out / "train" / "manifest.json").read_text())
    entries = [e for e in manifest["skipped"] if e["path"] == str(bad.relative_to(audio))]
    assert sorted(e.get("speed", 1.0) for e in entries) == [0.9, 1.0, 1.1]
    assert all(e["kind"] == "unreadable" for e in entries)


def _project_imports(path: Path) -> set[str]:
    modules = {p.stem for p in REPO.glob("*.py")}
    tree = ast.parse(path.read_text())
    names = {alias.name.split(".")[0] for node in ast.walk(tree)
             if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
    names |= {node.module.split(".")[0] for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom) and node.module}
    return names & modules


def _project_imports_of(node: ast.Import | ast.ImportFrom) -> set[str]:
    modules = {p.stem for p in REPO.glob("*.py")}
    names = {alias.name.split(".")[0] for alias in node.names}
    if isinstance(node, ast.ImportFrom) and node.module:
        names.add(node.module.split(".")[0])
    return names & modules


def test_features_sit_at_the_bottom_of_the_import_graph():
    # features.py is audio in, features out: it needs no other module of the project but the
    # settings it takes (configuration.Features) and the light helpers (utils), neither of which
    # imports another at load time, and no module reaches features through the preprocessing
    # command line.
    assert _project_imports(REPO / "features.py") == {"configuration", "utils"}
    for leaf in ("configuration.py", "utils.py"):
        top_level = ast.parse((REPO / leaf).read_text()).body
        assert not any(isinstance(node, (ast.Import, ast.ImportFrom))
                       and _project_imports_of(node) for node in top_level), leaf
    importers = {p.name for p in REPO.glob("*.py")
                 if "data_preprocess" in _project_imports(p) and p.name != "data_preprocess.py"}
    assert importers == set()
