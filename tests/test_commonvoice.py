"""Common Voice layout: speakers from validated.tsv, MP3/OGG decoding, bad rows, same-language
trials; on a synthetic tree and on the sample in ../shared/data/commonvoice."""

import csv
import hashlib
import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import SHARED_DATA
from robust_corpus import speech_like

import corpora
import data_preprocess
import features
import utils

HEADER = "client_id\tpath\tsentence\tup_votes\tdown_votes\tage\tgender\taccent\tlocale\tsegment"
# A in both languages; C and D share their first 20 characters, so names need 21.
A, B = "a1" * 20, "b2" * 20
C, D = "c3" * 10 + "0" * 20, "c3" * 10 + "1" * 20
CLIP_FORMAT = ("MP3", "MPEG_LAYER_III", ".mp3") if "MP3" in sf.available_formats() \
    else ("OGG", "VORBIS", ".ogg")


def write_clip(path: Path, seed: int, sr: int = 48000) -> None:
    fmt, subtype, _ = CLIP_FORMAT
    sf.write(path, speech_like(1.6, sr=sr, pitch=100.0 + 10 * seed, seed=seed), sr,
             format=fmt, subtype=subtype)


def build_commonvoice(root: Path) -> dict:
    """Two languages with one malformed line, an empty client_id, a missing and an undecodable
    clip; CRLF TSVs with a CSV-quoted sentence. Returns what a reader must find."""
    ext = CLIP_FORMAT[2]
    good = {"aa": [(A, 0), (A, 1), (B, 2), (B, 3), (B, 4), (D, 5), (D, 6), (D, 7)],
            "bb": [(A, 8), (A, 9), (C, 10), (C, 11), (C, 12)]}
    clips = {}  # path -> (client_id, language)
    lines = {language: [HEADER] for language in good}
    for language, rows in good.items():
        (root / language / "clips").mkdir(parents=True)
        for client, seed in rows:
            name = f"common_voice_{language}_{seed}{ext}"
            write_clip(root / language / "clips" / name, seed)
            clips[f"{language}/clips/{name}"] = (client, language)
            sentence = '"He said ""hi"" twice."' if seed == 1 else f"Sentence {seed}."
            lines[language].append(f"{client}\t{name}\t{sentence}\t2\t0\t\t\t\t{language}\t")
    lines["aa"].insert(3, f"{B}\tbroken.mp3\tToo few columns")  # line 4
    lines["aa"].insert(5, f"\tcommon_voice_aa_99{ext}\tNo speaker.\t2\t0\t\t\t\taa\t")  # line 6
    lines["bb"].insert(2, f"{C}\tcommon_voice_bb_50{ext}\tNo file.\t2\t0\t\t\t\tbb\t")  # line 3
    lines["bb"].append(f"{C}\tcommon_voice_bb_51{ext}\tNo audio.\t2\t0\t\t\t\tbb\t")  # line 8
    (root / "bb" / "clips" / f"common_voice_bb_51{ext}").write_bytes(b"\xff\xfb" + bytes(500))
    for language, text in lines.items():
        (root / language / "validated.tsv").write_bytes("\r\n".join(text + [""]).encode())
    return {"clips": clips,
            "malformed": {"aa/validated.tsv:4", "aa/validated.tsv:6"},
            "bad_clips": {f"bb/clips/common_voice_bb_50{ext}": ("missing", "bb/validated.tsv:3"),
                          f"bb/clips/common_voice_bb_51{ext}": ("unreadable",
                                                                 "bb/validated.tsv:8")}}


def test_speaker_names_are_short_unique_and_safe():
    assert corpora.speaker_names([A, B]) == {A: A[:16], B: B[:16]}
    assert corpora.speaker_names([A, C, D]) == {A: A[:21], C: C[:21], D: D[:21]}
    odd = corpora.speaker_names(["../x y", "abc"])
    assert odd == {"abc": "abc", "../x y": hashlib.sha1(b"../x y").hexdigest()[:16]}


def test_reader_finds_speakers_across_languages_and_counts_bad_rows(tmp_path):
    expected = build_commonvoice(tmp_path / "cv")
    corpus = corpora.find_corpus(tmp_path / "cv")
    by_speaker = {}
    for path, (client, _) in expected["clips"].items():
        by_speaker.setdefault(client[:21], []).append(path)
    for path in expected["bad_clips"]:  # listed rows: found, rejected when decoded
        by_speaker.setdefault(C[:21], []).append(path)
    assert corpus.tree == {s: sorted(p) for s, p in sorted(by_speaker.items())}
    assert corpus.languages == {p: p.split("/")[0] for paths in by_speaker.values() for p in paths}
    assert {entry["path"] for entry in corpus.skipped} == expected["malformed"]
    assert all(entry["kind"] == "malformed" for entry in corpus.skipped)
    reasons = sorted(entry["reason"] for entry in corpus.skipped)
    assert reasons[0].startswith("aa/validated.tsv line 4: 3 tab-separated columns")
    assert reasons[1] == "aa/validated.tsv line 6: empty client_id"
    # One release folder alone: the same rows, paths relative to it.
    single = corpora.find_corpus(tmp_path / "cv" / "bb")
    assert sorted(p for paths in single.tree.values() for p in paths) == sorted(
        p[3:] for p in corpus.languages if p.startswith("bb/"))
    assert set(single.languages.values()) == {"bb"}


def test_preprocessing_writes_speakers_bad_rows_and_same_language_trials(tmp_path):
    expected = build_commonvoice(tmp_path / "cv")
    names = {client: client[:21] for client, _ in expected["clips"].values()}
    for fold in (0, 1):  # the fold whose test split holds A, the speaker of two languages
        out = tmp_path / f"fold{fold}"
        assert data_preprocess.main([
            "--audio_path", str(tmp_path / "cv"), "--train_path", str(out / "train"),
            "--test_path", str(out / "test"), "--folds", "2", "--fold", str(fold)]) == 0
        manifests = {split: json.loads((out / split / "manifest.json").read_text())
                     for split in ("train", "test")}
        if names[A] in manifests["test"]["speakers"]:
            break
    assert sorted(manifests["train"]["speakers"] + manifests["test"]["speakers"]) == sorted(
        set(names.values()))
    skipped = [entry for m in manifests.values() for entry in m["skipped"]]
    assert {e["path"] for e in skipped if e["kind"] == "malformed"} == expected["malformed"]
    assert {e["path"]: (e["kind"], e["row"]) for e in skipped
            if e["kind"] != "malformed"} == expected["bad_clips"]
    test_clips = {path: client for path, (client, _) in expected["clips"].items()
                  if names[client] in manifests["test"]["speakers"]}
    for speaker in manifests["test"]["speakers"]:
        sidecar = json.loads((out / "test" / f"{speaker}.json").read_text())
        assert sidecar["utterances"] == sorted(p for p, c in test_clips.items()
                                               if names[c] == speaker)
    reference = {(int(test_clips[a] == test_clips[b]), a, b)
                 for a, b in itertools.combinations(sorted(test_clips), 2)
                 if a.split("/")[0] == b.split("/")[0]}
    lines = (out / "test" / data_preprocess.LANGUAGE_TRIALS).read_text().splitlines()
    assert len(lines) == len(reference) and {0, 1} <= {label for label, _, _ in reference}
    assert {(int(label), a, b) for label, a, b in map(str.split, lines)} == reference


@pytest.mark.parametrize("fmt, subtype, ext", [("MP3", "MPEG_LAYER_III", ".mp3"),
                                               ("OGG", "VORBIS", ".ogg"),
                                               ("OGG", "OPUS", ".opus")])
def test_load_audio_decodes_compressed_formats(tmp_path, fmt, subtype, ext):
    if fmt not in sf.available_formats() or subtype not in sf.available_subtypes(fmt):
        pytest.skip(f"this libsndfile cannot write {fmt}/{subtype}")
    assert ext in utils.AUDIO_EXTENSIONS
    sr = 48000
    tone = 0.5 * np.sin(2 * np.pi * 440.0 * np.arange(2 * sr) / sr).astype(np.float32)
    sf.write(tmp_path / f"tone{ext}", tone, sr, format=fmt, subtype=subtype)
    wav = features.load_audio(tmp_path / f"tone{ext}", 16000)
    # Codecs pad with their encoder delay: the length is close, not exact.
    assert abs(len(wav) - 32000) < 0.05 * 32000
    spectrum = np.abs(np.fft.rfft(wav))
    assert abs(np.argmax(spectrum) * 16000 / len(wav) - 440.0) < 2.0


@pytest.fixture(scope="module")
def commonvoice() -> Path:
    root = SHARED_DATA / "commonvoice"
    if not (root / "manifest.csv").exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{root} is missing in CI")
        pytest.skip(f"{root} not present")
    return root


def test_real_commonvoice_sample_is_read_as_its_manifest_says(commonvoice):
    with open(commonvoice / "manifest.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    corpus = corpora.find_corpus(commonvoice)
    assert len(corpus.tree) == 350 and len(rows) == 1620 and not corpus.skipped
    assert {p: s for s, paths in corpus.tree.items() for p in paths} == {
        row["path"]: row["speaker"] for row in rows}
    assert corpus.languages == {row["path"]: row["language"] for row in rows}
    by_rate = {}
    for row in rows:
        by_rate.setdefault(int(row["sample_rate"]), row)
    assert set(by_rate) == {32000, 44100, 48000}
    for rate, row in by_rate.items():
        assert sf.info(commonvoice / row["path"]).samplerate == rate
        wav = features.load_audio(commonvoice / row["path"], 16000)
        assert abs(len(wav) / 16000 - float(row["duration_s"])) < 0.01
