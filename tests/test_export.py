"""--export: the tf.signal front end, VAD and TD-SV phrase trim against features.py, and the
SavedModel and TFLite (float32, int8) models against the in-process d-vectors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from conftest import link_subset

import configuration
import data_preprocess
import export
import features
import ge2e
import main
import model
import training
import utils


def _flag(flags, name):
    """The value argparse takes: the last occurrence."""
    return flags[len(flags) - flags[::-1].index(name)]


@pytest.fixture(scope="session")
def litert():
    """The LiteRT interpreter (tf.lite.Interpreter is deprecated): a skip on a user's machine
    without it, a failure in CI."""
    try:
        import ai_edge_litert.interpreter  # noqa: F401
    except ImportError:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"ai_edge_litert is missing in CI ({export.LITERT_PIN})")
        pytest.skip(f"ai_edge_litert not installed ({export.LITERT_PIN})")


@pytest.fixture(scope="session")
def dsp_files(shared_data) -> list[Path]:
    """Real recordings of isolated words: two takes of each of the six words of two speakers."""
    speakers = sorted(p for p in (shared_data / "dspspeech20").iterdir() if p.is_dir())[-2:]
    return [f for s in speakers for f in sorted(s.glob("*.flac")) if f.stem.endswith(("-01",
                                                                                      "-07"))]


@pytest.fixture(scope="session")
def tiny_tdsv(shared_data, tmp_path_factory) -> list[str]:
    """Flags of a tiny TD-SV model ('signal') trained for a few steps on real recordings."""
    root = tmp_path_factory.mktemp("tdsv")
    audio = link_subset(shared_data / "dspspeech20", root / "dsp", speakers=5, per_speaker=60)
    shutil.copy(shared_data / "dspspeech20" / "manifest.csv", audio / "manifest.csv")
    flags = ["--audio_path", str(audio), "--train_path", str(root / "train"),
             "--test_path", str(root / "test"), "--model_path", str(root / "model"),
             "--results_path", str(root / "results"), "--tdsv", "True", "--tdsv_phrase",
             "signal", "--test_ratio", "0.4", "--hidden", "16", "--proj", "8", "--N", "3",
             "--M", "3"]
    assert data_preprocess.main(flags) == 0
    training.train(configuration.parse_config(flags + ["--iteration", "10", "--save_every", "10"]))
    return flags


def test_tf_log_mel_and_vad_match_features(shared_data):
    config = configuration.Features()
    for path in sorted((shared_data / "dspspeech20").rglob("*.flac"))[:3]:
        wav = features.load_audio(path, config.sr)
        reference = features.log_mel(wav, config)
        for quantizable in (True, False):
            ours = export.tf_log_mel(tf.constant(wav), config, quantizable).numpy()
            assert ours.shape == reference.shape
            np.testing.assert_allclose(ours, reference, atol=1e-4)
        voiced = export.tf_voiced_mask(tf.constant(wav), config).numpy()
        expected = features.voiced_frames(features.frames(wav, config), len(wav), config)
        np.testing.assert_array_equal(voiced, expected)


def test_tf_voiced_mask_of_a_zero_padded_prefix(shared_data):
    """A buffer holding n samples of audio and zeros after them: the VAD of wav[:n] exactly,
    also when n is a multiple of the hop (effects.split drops the frame starting at the end)."""
    config = configuration.Features()
    path = sorted((shared_data / "dspspeech20").rglob("*.flac"))[5]
    wav = features.load_audio(path, config.sr)
    buffer = np.zeros(len(wav) + 4000, np.float32)
    for n in (len(wav), 160 * 150, 160 * 150 + 37, 9000):
        buffer[:] = 0.0
        buffer[:n] = wav[:n]
        mask = export.tf_voiced_mask(tf.constant(buffer), config, tf.constant(n)).numpy()
        expected = features.voiced_frames(features.frames(wav[:n], config), n, config)
        np.testing.assert_array_equal(mask[:len(expected)], expected)
        assert not mask[len(expected):].any()


def test_tf_phrase_keeps_the_frames_of_phrase_waveform(dsp_files):
    config = configuration.Features(tdsv=True)
    for path in dsp_files:
        wav = features.load_audio(path, config.sr)
        span = features.phrase_span(wav, config)
        for n in (len(wav), min(len(wav) - 1, span[1] + 800)):  # whole; cut after the phrase
            buffer = np.zeros(export.tflite_input_samples(config), np.float32)
            buffer[:n] = wav[:n]
            phrase, length = export.tf_phrase(tf.constant(buffer), tf.constant(n), config)
            expected = features.phrase_waveform(wav[:n], config)
            np.testing.assert_array_equal(phrase.numpy(), expected)
            start, end = features.phrase_span(wav[:n], config)
            assert int(length) == end - start


@pytest.mark.parametrize("n_frames", [40, 159, 160, 161, 239, 240, 500])
def test_tf_windows_match_window_starts(n_frames):
    frames = np.arange(n_frames, dtype=np.float32)[:, None]
    windows = export.tf_windows(tf.constant(frames), 160).numpy()
    starts = utils.window_starts(n_frames, 160)
    assert windows.shape[0] == len(starts)
    for window, start in zip(windows, starts):
        np.testing.assert_array_equal(window[:, 0], frames[start:start + 160, 0])


@pytest.mark.slow
def test_savedmodel_in_fresh_process_matches_in_process(tiny_tisv, tmp_path):
    out = tmp_path / "exported"
    assert main.main(tiny_tisv + ["--export", str(out), "--threshold", "0.3"]) == 0
    wav_path = Path(_flag(tiny_tisv, "--synthetic_path")) / "spk03" / "free_04.wav"
    trained = ge2e.DVectorModel(configuration.parse_config(tiny_tisv))
    expected = trained.embed_file(wav_path)
    script = ("import sys, numpy as np, soundfile as sf, tensorflow as tf\n"
              "m = tf.saved_model.load(sys.argv[1])\n"
              "wav, _ = sf.read(sys.argv[2], dtype='float32')\n"
              "out = m.signatures['serving_default'](waveform=tf.constant(wav))['d_vector']\n"
              "np.save(sys.argv[3], out.numpy())\n"
              "meta = m.signatures['metadata']()\n"
              "print(float(meta['operating_threshold']), meta['threshold_source'].numpy()"
              ".decode())\n")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    run = subprocess.run([sys.executable, "-c", script, str(out), str(wav_path),
                          str(tmp_path / "d.npy")], check=True, env=env, cwd=tmp_path,
                         capture_output=True, text=True)
    exported = np.load(tmp_path / "d.npy", allow_pickle=False)
    # Documented tolerance: the tf.signal front end differs from librosa by ~1e-5 in log10 units.
    np.testing.assert_allclose(exported, expected, atol=1e-4)
    assert run.stdout.strip().splitlines()[-1] == "0.30000001192092896 --threshold"
    metadata = json.loads((out / "metadata.json").read_text())
    assert (metadata["operating_threshold"], metadata["threshold_source"]) == (0.3, "--threshold")
    assert metadata["model"] == trained.fingerprint


def test_tdsv_savedmodel_matches_in_process_on_real_recordings(tiny_tdsv, dsp_files, tmp_path):
    out = tmp_path / "exported"
    assert main.main(tiny_tdsv + ["--export", str(out)]) == 0
    trained = ge2e.DVectorModel(configuration.parse_config(tiny_tdsv))
    config, expected = trained.features, trained.embed_files(dsp_files)
    serve = tf.saved_model.load(str(out)).signatures["serving_default"]
    for path, reference in zip(dsp_files, expected):
        wav = features.load_audio(path, config.sr)
        np.testing.assert_allclose(serve(waveform=tf.constant(wav))["d_vector"].numpy(),
                                   reference, atol=1e-4)
    # Not evaluated yet: the metadata says there is no operating threshold, and why.
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["operating_threshold"] is None and metadata["mode"] == "TD-SV"
    assert "evaluation.json does not exist" in metadata["threshold_source"]


@pytest.fixture(scope="module")
def tisv_tflite(tiny_tisv, tmp_path_factory) -> Path:
    """The tiny TI-SV model exported to float/d_vector.tflite and int8/d_vector_int8.tflite."""
    root = tmp_path_factory.mktemp("tflite")
    flags = tiny_tisv + ["--format", "tflite"]
    assert main.main(flags + ["--export", str(root / "float")]) == 0
    assert main.main(flags + ["--export", str(root / "int8"), "--quantize", "int8"]) == 0
    return root


def _window_reference(embed, wav: np.ndarray, config) -> np.ndarray | None:
    """The in-process d-vector of a recording (None: too little voice)."""
    try:
        frames = features.voiced_features(wav, config)
    except features.AudioError:
        return None
    return model.utterance_d_vectors(embed, [frames], config.window_frames)[0]


@pytest.mark.slow
def test_tflite_tisv_window_matches_in_process(tiny_tisv, tisv_tflite, litert):
    tmp_path = tisv_tflite
    parsed = configuration.parse_config(tiny_tisv)
    config, _, encoder = model.load_trained(parsed.model_path, parsed.features, parsed.network)
    embed = model.make_embedder(encoder, config.n_mels)
    run = export.tflite_runner(tmp_path / "float" / "d_vector.tflite")
    run_int8 = export.tflite_runner(tmp_path / "int8" / "d_vector_int8.tflite")
    length = export.tflite_input_samples(config)
    assert length == (config.window_frames - 1) * 160
    root = Path(_flag(tiny_tisv, "--synthetic_path"))
    wav = features.load_audio(root / "spk05" / "free_02.wav", config.sr)
    cases = [(0, length), (4000, length), (1000, length - 7000), (0, 160 * 120), (0, 3000)]
    for start, n in cases:
        piece = wav[start:start + n]
        window = np.pad(piece, (0, length - len(piece)))
        out = run(waveform=window, num_samples=np.array(len(piece), np.int32))
        reference = _window_reference(embed, piece, config)
        assert int(out["usable"]) == (reference is not None)
        if reference is not None:
            np.testing.assert_allclose(out["d_vector"], reference, atol=1e-5)
            quantized = run_int8(waveform=window, num_samples=np.array(len(piece), np.int32))
            assert float(quantized["d_vector"] @ reference) > 0.99
    assert (tmp_path / "int8" / "d_vector_int8.tflite").stat().st_size < \
        (tmp_path / "float" / "d_vector.tflite").stat().st_size
    # The whole-recording recipe: the usable windows' d-vectors, averaged and normalised.
    starts = utils.window_starts(len(wav), length)
    windows = [_window_reference(embed, wav[s:s + length], config) for s in starts]
    mean = np.mean([w for w in windows if w is not None], axis=0)
    np.testing.assert_allclose(export.tflite_utterance_d_vector(run, wav, length),
                               mean / np.linalg.norm(mean), atol=1e-5)
    with pytest.raises(ValueError, match="too little voiced audio"):
        export.tflite_utterance_d_vector(run, np.zeros(2 * length, np.float32), length)
    metadata = json.loads((tmp_path / "int8" / "d_vector_int8.json").read_text())
    assert metadata["quantize"] == "int8" and f"[{length}]" in metadata["input"]["waveform"]


def test_tflite_utterance_signature_matches_in_process(tiny_tisv, tisv_tflite, litert):
    """The `utterance` signature reads a whole recording as the in-process path does: VAD over
    the recording, then windows of its voiced frames (not each window's own VAD)."""
    parsed = configuration.parse_config(tiny_tisv)
    config, _, encoder = model.load_trained(parsed.model_path, parsed.features, parsed.network)
    embed = model.make_embedder(encoder, config.n_mels)
    run = export.tflite_runner(tisv_tflite / "float" / "d_vector.tflite", signature="utterance")
    run_int8 = export.tflite_runner(tisv_tflite / "int8" / "d_vector_int8.tflite",
                                    signature="utterance")
    root = Path(_flag(tiny_tisv, "--synthetic_path"))
    takes = [features.load_audio(p, config.sr) for p in sorted((root / "spk05").glob("*.wav"))]
    pause = np.zeros(config.sr // 2, np.float32)
    # A quiet take between loud ones: the recording's VAD drops frames a window's would keep.
    recording = np.concatenate([takes[0], pause, 0.05 * takes[1], pause, takes[2]])
    assert len(features.voiced_features(recording, config)) > 2 * config.window_frames
    for wav in (recording, takes[0], takes[0][:160 * 120]):
        reference = _window_reference(embed, wav, config)
        out = run(waveform=wav)
        assert int(out["usable"]) == 1
        np.testing.assert_allclose(out["d_vector"], reference, atol=1e-5)
        assert float(run_int8(waveform=wav)["d_vector"] @ reference) > 0.99
    assert _window_reference(embed, takes[0][:3000], config) is None
    assert int(run(waveform=takes[0][:3000])["usable"]) == 0
    assert int(run(waveform=np.zeros(config.sr, np.float32))["usable"]) == 0  # load_audio: silent
    metadata = json.loads((tisv_tflite / "float" / "d_vector.json").read_text())
    assert set(metadata["signatures"]) == {"serving_default", "utterance"}


@pytest.mark.slow
def test_tflite_tdsv_matches_in_process_on_real_recordings(tiny_tdsv, dsp_files, litert,
                                                           tmp_path, capsys):
    assert main.main(tiny_tdsv + ["--train", "False"]) == 0
    flags = tiny_tdsv + ["--format", "tflite", "--export", str(tmp_path)]
    assert main.main(flags) == 0
    assert main.main(flags + ["--quantize", "int8"]) == 0
    trained = ge2e.DVectorModel(configuration.parse_config(tiny_tdsv))
    config, expected = trained.features, trained.embed_files(dsp_files)
    run = export.tflite_runner(tmp_path / "d_vector.tflite")
    run_int8 = export.tflite_runner(tmp_path / "d_vector_int8.tflite")
    length = export.tflite_input_samples(config)
    for path, reference in zip(dsp_files, expected):
        wav = features.load_audio(path, config.sr)
        inputs = {"waveform": np.pad(wav, (0, length - len(wav))),
                  "num_samples": np.array(len(wav), np.int32)}
        out = run(**inputs)
        assert int(out["usable"]) == 1
        np.testing.assert_allclose(out["d_vector"], reference, atol=1e-5)
        assert float(run_int8(**inputs)["d_vector"] @ reference) > 0.99
    # The `utterance` signature takes a recording of any length, longer than the buffer too.
    utterance = export.tflite_runner(tmp_path / "d_vector.tflite", signature="utterance")
    for path, reference in zip(dsp_files, expected):
        wav = features.load_audio(path, config.sr)
        longer = np.concatenate([np.zeros(length, np.float32), wav])
        for recording, expected_vector in ((wav, reference),
                                           (longer, trained.embed_waveform(longer, config.sr))):
            out = utterance(waveform=recording)
            assert int(out["usable"]) == 1
            np.testing.assert_allclose(out["d_vector"], expected_vector, atol=1e-5)
    # The operating threshold of the model's own test, with its source, travels with the file.
    evaluation = json.loads((Path(_flag(tiny_tdsv, "--model_path")) /
                             "evaluation.json").read_text())
    metadata = json.loads((tmp_path / "d_vector.json").read_text())
    assert metadata["operating_threshold"] == evaluation["threshold"]
    assert metadata["threshold_source"] == f"operating threshold: {evaluation['threshold_source']}"
    assert "threshold of the model's test split" in capsys.readouterr().out
