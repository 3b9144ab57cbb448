"""End to end: preprocess -> train -> test, on the embedded corpus and on real FLAC."""

import json

import numpy as np
import pytest
from conftest import link_subset

import configuration
import corpora
import data_preprocess
import features
import main
import model
import training

SMALL = ["--hidden", "32", "--proj", "16", "--N", "4", "--M", "4", "--save_every", "100",
         "--log_every", "20", "--draws", "3"]


def paths(tmp_path, name):
    return ["--synthetic_path", str(tmp_path / "synthetic"),
            "--train_path", str(tmp_path / name / "train"),
            "--test_path", str(tmp_path / name / "test"),
            "--model_path", str(tmp_path / name / "model"),
            "--results_path", str(tmp_path / name / "results")]


@pytest.mark.parametrize("mode", ["tisv", "tdsv"])
@pytest.mark.slow
def test_embedded_corpus_end_to_end(tmp_path, capsys, mode):
    flags = paths(tmp_path, mode) + SMALL + ["--tdsv", str(mode == "tdsv")]
    assert data_preprocess.main(flags) == 0
    manifest = json.loads((tmp_path / mode / "train" / "manifest.json").read_text())
    assert manifest["settings"]["kind"] == mode and len(manifest["speakers"]) >= 4

    config = configuration.parse_config(flags + ["--iteration", "300", "--optim", "adam",
                                                 "--lr", "3e-3", "--beta1", "0.9",
                                                 "--beta2", "0.999"])
    summary = training.train(config)
    losses = np.asarray(summary["losses"])
    assert len(losses) == 300
    # Chance: every similarity equal, so each utterance's loss (eq. 6) is ln N. A drop relative
    # to the first steps would depend on the seed's trajectory: most of it happens in them.
    chance = config.N * config.M * np.log(config.N)
    assert losses[-50:].mean() < 0.8 * chance
    assert (tmp_path / mode / "model" / "config.json").exists()
    assert list((tmp_path / mode / "model" / "logs").iterdir()), "no TensorBoard events"

    capsys.readouterr()
    assert main.main(flags + ["--train", "False"]) == 0
    out = capsys.readouterr().out
    assert f"{'TD-SV' if mode == 'tdsv' else 'TI-SV'} similarity-matrix test: EER" in out
    result = json.loads((tmp_path / mode / "model" / "evaluation.json").read_text())
    assert 0.0 <= result["eer_mean"] < 0.5  # better than chance after 300 steps
    assert list((tmp_path / mode / "results").glob("similarity_matrix_*.png"))


@pytest.mark.slow
def test_test_refuses_conflicting_shape_flag(tmp_path, capsys):
    flags = paths(tmp_path, "tisv") + SMALL
    assert data_preprocess.main(flags) == 0
    config = configuration.parse_config(flags + ["--iteration", "2"])
    training.train(config)
    capsys.readouterr()
    assert main.main(flags + ["--train", "False", "--hidden", "64"]) == 2
    err = capsys.readouterr().err
    assert "--hidden 64 conflicts" in err and "hidden=32" in err
    # Without the flag the saved shape is used.
    assert main.main(paths(tmp_path, "tisv") + ["--train", "False", "--draws", "1"]) == 0


@pytest.mark.slow
def test_restore_resumes_at_saved_step(tmp_path):
    flags = paths(tmp_path, "tisv") + SMALL
    assert data_preprocess.main(flags) == 0
    training.train(configuration.parse_config(flags + ["--iteration", "20", "--save_every", "10"]))
    resumed = training.train(configuration.parse_config(
        flags + ["--iteration", "30", "--save_every", "10", "--restore", "True"]))
    assert resumed["steps"] == 30 and len(resumed["losses"]) == 10


def test_preprocess_real_flac_tisv(shared_data, tmp_path):
    root = link_subset(shared_data / "speechocean762", tmp_path / "so", speakers=4, per_speaker=3)
    flags = ["--audio_path", str(root), "--train_path", str(tmp_path / "train"),
             "--test_path", str(tmp_path / "test"), "--test_ratio", "0.25"]
    assert data_preprocess.main(flags) == 0
    train = json.loads((tmp_path / "train" / "manifest.json").read_text())
    assert len(train["speakers"]) == 3 and train["skipped"] == []
    speaker = train["speakers"][0]
    stored = np.load(tmp_path / "train" / f"{speaker}.npy", allow_pickle=False)
    sidecar = json.loads((tmp_path / "train" / f"{speaker}.json").read_text())
    assert stored.shape == (sum(sidecar["lengths"]), 40)
    assert np.all(np.isfinite(stored))
    # VAD removed silence: fewer frames than the 10 ms grid of the whole files.
    seconds = sum(features.load_audio(root / p, 16000).size / 16000
                  for p in sidecar["utterances"])
    assert stored.shape[0] < seconds * 100


def test_preprocess_real_flac_tdsv_by_transcript(shared_data, tmp_path):
    root = link_subset(shared_data / "dspspeech20", tmp_path / "dsp", speakers=3, per_speaker=60)
    (root / "manifest.csv").write_text(
        (shared_data / "dspspeech20" / "manifest.csv").read_text(encoding="utf-8"),
        encoding="utf-8")
    flags = ["--audio_path", str(root), "--train_path", str(tmp_path / "train"),
             "--test_path", str(tmp_path / "test"), "--tdsv", "True", "--tdsv_phrase", "signal"]
    assert data_preprocess.main(flags) == 0
    train = json.loads((tmp_path / "train" / "manifest.json").read_text())
    speaker = train["speakers"][0]
    sidecar = json.loads((tmp_path / "train" / f"{speaker}.json").read_text())
    assert len(sidecar["utterances"]) == 10
    assert all("-14-" in p for p in sidecar["utterances"])  # word 14 is "signal"
    waves = np.load(tmp_path / "train" / f"{speaker}.npy", allow_pickle=False)
    assert waves.shape == (10, 79 * 160)


def test_preprocess_fsdd_resamples_8k(shared_data, tmp_path):
    root = link_subset(shared_data / "fsdd", tmp_path / "fsdd", speakers=2, per_speaker=5)
    flags = ["--audio_path", str(root), "--train_path", str(tmp_path / "train"),
             "--test_path", str(tmp_path / "test"), "--min_frames", "20"]
    assert data_preprocess.main(flags) == 0
    wav = features.load_audio(next(root.rglob("*.flac")), 16000)
    import soundfile
    assert wav.size == pytest.approx(2 * soundfile.info(next(root.rglob("*.flac"))).frames, abs=2)


def test_checkpoint_restores_the_trained_weights(tiny_tisv):
    """Two restores agree with each other and not with a fresh initialisation."""
    config = configuration.parse_config(tiny_tisv)
    front, network, first = model.load_trained(config.model_path, config.features, config.network)
    _, _, second = model.load_trained(config.model_path, config.features, config.network)
    fresh, _ = model.build_model(network, front.n_mels)
    for a, b, c in zip(first.get_weights(), second.get_weights(), fresh.get_weights()):
        np.testing.assert_array_equal(a, b)
        if a.ndim == 2:
            assert not np.allclose(a, c)


def test_symlinked_speaker_folders_are_followed_once(tmp_path):
    """A corpus subset built from folder links reads like the corpus; a link loop ends."""
    from robust_corpus import write_speakers

    write_speakers(tmp_path / "corpus", speakers=3, utterances=2)
    subset = tmp_path / "subset"
    subset.mkdir()
    for speaker in ("spk00", "spk02"):
        (subset / speaker).symlink_to(tmp_path / "corpus" / speaker)
    (tmp_path / "corpus" / "spk00" / "loop").symlink_to(tmp_path / "corpus" / "spk00")
    tree = corpora.find_utterances(subset)
    assert tree == {"spk00": ["spk00/utt00.wav", "spk00/utt01.wav"],
                    "spk02": ["spk02/utt00.wav", "spk02/utt01.wav"]}


def test_find_utterances_reads_nested_corpus_layouts(tmp_path):
    """VCTK, LibriSpeech and VoxCeleb nest utterances under the speaker; only audio files count."""
    for relative in ("p225/p225_001.wav", "19/198/19-198-0001.FLAC", "19/198/19-198.trans.txt",
                     "id001/vid_a/00001.wav", "id001/vid_b/00001.wav", "notes.wav",
                     "id001/folder.wav/inner.flac"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"")
    (tmp_path / "empty_speaker").mkdir()
    assert corpora.find_utterances(tmp_path) == {
        "19": ["19/198/19-198-0001.FLAC"],
        "id001": ["id001/folder.wav/inner.flac", "id001/vid_a/00001.wav", "id001/vid_b/00001.wav"],
        "p225": ["p225/p225_001.wav"]}
