"""Corpus layouts: Speech Commands as it unpacks (speaker from the file name, word from the
folder, _background_noise_ as the noise), told apart from the plain speaker tree; on a synthetic
tree and on the copy in ../shared/data/speechcommands."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from robust_corpus import SR, speech_like, write_speakers

import corpora
import data_preprocess

WORDS = ("yes", "no", "up")
SPEAKERS = ("0a1b2c3d", "1b2c3d4e", "2c3d4e5f", "3d4e5f60")
MISNAMED = "no/recording 1.wav"
NOISE_SECONDS = 3.0
CAN_WRITE_OPUS = "OPUS" in sf.available_subtypes("OGG")


def write_clip(path: Path, speaker: int, take: int) -> None:
    """One second of a speaker's voice (its own pitch), as 16-bit WAV or, by the name, Opus."""
    wav = speech_like(1.0, pitch=110.0 + 23.0 * speaker, seed=10 * speaker + take)
    if path.suffix == ".opus":
        sf.write(path, wav, SR, format="OGG", subtype="OPUS")
    else:
        sf.write(path, wav, SR, subtype="PCM_16")


def build_speechcommands(root: Path) -> dict[str, tuple[str, str]]:
    """Word folders of <speaker>_nohash_<n> clips (two takes of 'yes'), an _unknown_ clip named
    as in the test set, _silence_, _background_noise_, a misnamed clip and non-audio files.
    Returns path -> (speaker, word) of the clips a reader must find."""
    expected = {}
    for word in WORDS:
        (root / word).mkdir(parents=True)
        for s, speaker in enumerate(SPEAKERS):
            for take in range(2 if word == "yes" else 1):
                ext = ".opus" if CAN_WRITE_OPUS and (s + take) % 3 == 0 else ".wav"
                path = f"{word}/{speaker}_nohash_{take}{ext}"
                write_clip(root / path, s, take)
                expected[path] = (speaker, word)
    (root / "_unknown_").mkdir()
    write_clip(root / "_unknown_" / f"bed_{SPEAKERS[0]}_nohash_0.wav.wav", 0, 5)
    expected[f"_unknown_/bed_{SPEAKERS[0]}_nohash_0.wav.wav"] = (SPEAKERS[0], "bed")
    write_clip(root / MISNAMED, 1, 6)
    (root / "_silence_").mkdir()
    sf.write(root / "_silence_" / "5e3b7a84_nohash_0.wav", np.zeros(SR, np.float32), SR)
    (root / "_background_noise_").mkdir()
    noise = np.random.default_rng(7).uniform(-0.5, 0.5, int(NOISE_SECONDS * SR))
    sf.write(root / "_background_noise_" / "white_noise.wav", noise, SR, subtype="FLOAT")
    (root / "_background_noise_" / "README.md").write_text("noise recordings\n")
    (root / "validation_list.txt").write_text("no/0a1b2c3d_nohash_0.wav\n")
    (root / "yes" / "notes.txt").write_text("not audio\n")
    return expected


def test_speech_commands_speaker_from_file_name_word_from_folder(tmp_path):
    expected = build_speechcommands(tmp_path / "sc")
    corpus = corpora.find_corpus(tmp_path / "sc")
    assert corpus.layout == "speechcommands"
    assert {u.path: (u.speaker, u.text) for u in corpus.utterances} == expected
    assert corpus.tree == {speaker: sorted(p for p, (s, _) in expected.items() if s == speaker)
                           for speaker in SPEAKERS}
    assert corpus.noise == str(tmp_path / "sc" / "_background_noise_")
    assert [(entry["path"], entry["kind"]) for entry in corpus.skipped] == [(MISNAMED, "misnamed")]
    assert "<speaker>_nohash_<n>" in corpus.skipped[0]["reason"]


def test_a_speaker_tree_with_a_stray_nohash_name_stays_a_tree(tmp_path):
    write_speakers(tmp_path, speakers=3, utterances=2)
    (tmp_path / "spk01" / "0a1b2c3d_nohash_0.wav").write_bytes(b"")
    corpus = corpora.find_corpus(tmp_path)
    assert corpus.layout == "tree" and not corpus.skipped and not corpus.noise
    assert corpus.tree == corpora.find_utterances(tmp_path)
    assert "spk01/0a1b2c3d_nohash_0.wav" in corpus.tree["spk01"]


def test_preprocessing_keeps_one_keyword_counts_the_misnamed_and_uses_the_corpus_noise(
        tmp_path, capsys):
    expected = build_speechcommands(tmp_path / "sc")
    out = tmp_path / "out"
    assert data_preprocess.main([
        "--audio_path", str(tmp_path / "sc"), "--train_path", str(out / "train"),
        "--test_path", str(out / "test"), "--test_ratio", "0.25", "--tdsv", "True",
        "--tdsv_phrase", "yes", "--min_frames", "20", "--augment", "1"]) == 0
    printed = capsys.readouterr().out
    noise_folder = tmp_path / "sc" / "_background_noise_"
    assert str(noise_folder) in printed
    assert "skipped 1 file (1 misnamed) of 13 files" in printed  # 3 speakers x 2 takes x 2 + 1
    manifests = {split: json.loads((out / split / "manifest.json").read_text())
                 for split in ("train", "test")}
    assert sorted(manifests["train"]["speakers"] + manifests["test"]["speakers"]) == list(SPEAKERS)
    assert [e["path"] for e in manifests["train"]["skipped"]] == [MISNAMED]
    assert not manifests["test"]["skipped"]
    assert manifests["train"]["settings"]["augment_noise"] == str(noise_folder.resolve())
    for split, manifest in manifests.items():
        for speaker in manifest["speakers"]:
            sidecar = json.loads((out / split / f"{speaker}.json").read_text())
            originals = [u for u in sidecar["utterances"] if data_preprocess.COPY_MARK not in u]
            assert originals == sorted(
                p for p, (s, word) in expected.items() if s == speaker and word == "yes")
            assert len(sidecar["utterances"]) == len(originals) * (1 + (split == "train"))
    # The TD-SV noise is the corpus's noise recording, RMS-normalised.
    noise, _ = sf.read(noise_folder / "white_noise.wav")
    stored = np.load(out / "train" / "noise.npy")
    assert manifests["train"]["noise_seconds"] == pytest.approx(NOISE_SECONDS)
    np.testing.assert_allclose(stored, noise / np.sqrt(np.mean(noise ** 2)), atol=1e-5)


def test_the_noise_path_flag_wins_over_the_corpus_noise(tmp_path):
    build_speechcommands(tmp_path / "sc")
    write_speakers(tmp_path / "noise", speakers=1, utterances=1)
    out = tmp_path / "out"
    assert data_preprocess.main([
        "--audio_path", str(tmp_path / "sc"), "--train_path", str(out / "train"),
        "--test_path", str(out / "test"), "--test_ratio", "0.25", "--tdsv", "True",
        "--tdsv_phrase", "yes", "--min_frames", "20", "--noise_path", str(tmp_path / "noise")
    ]) == 0
    flag_noise, _ = sf.read(tmp_path / "noise" / "spk00" / "utt00.wav")
    np.testing.assert_allclose(np.load(out / "train" / "noise.npy"),
                               flag_noise / np.sqrt(np.mean(flag_noise ** 2)), atol=1e-3)


def test_real_speech_commands_is_read_as_its_manifest_says(shared_data):
    root = shared_data / "speechcommands"
    with open(root / "manifest.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    corpus = corpora.find_corpus(root)
    assert corpus.layout == "speechcommands" and not corpus.skipped
    # SOURCE.md: 184 speakers, 3,572 clips of 35 words, no _background_noise_ in this copy.
    assert (len(corpus.tree), len(corpus.utterances)) == (184, 3572) == (
        len({row["speaker"] for row in rows}), len(rows))
    assert len({u.text for u in corpus.utterances}) == 35 and corpus.noise == ""
    assert {u.path: (u.speaker, u.text) for u in corpus.utterances} == {
        row["path"]: (row["speaker"], row["text_if_known"]) for row in rows}


def test_test_split_of_a_keyword_corpus_gets_every_same_word_pair(tmp_path):
    """trials_same_text.txt: every pair of test clips of one word, target when one speaker says
    both; counted by hand from the tree."""
    root = tmp_path / "sc"
    found = build_speechcommands(root)
    test = tmp_path / "test"
    assert data_preprocess.main([
        "--audio_path", str(root), "--train_path", str(tmp_path / "train"), "--test_path",
        str(test), "--test_ratio", "0.5", "--min_frames", "10", "--min_utterances", "1"]) == 0
    speakers = json.loads((test / "manifest.json").read_text())["speakers"]
    kept = {p: found[p] for s in speakers
            for p in json.loads((test / f"{s}.json").read_text())["utterances"]}
    expected = {(int(kept[a][0] == kept[b][0]), a, b) for a in kept for b in kept
                if a < b and kept[a][1] == kept[b][1]}
    lines = (test / data_preprocess.TEXT_TRIALS).read_text().splitlines()
    assert {(int(label), a, b) for label, a, b in map(str.split, lines)} == expected
    assert len(lines) == len(expected) and any(label for label, _, _ in expected)
