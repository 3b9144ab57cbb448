"""Issue #7, bad input: every bad file is skipped and counted with its reason, every user error
ends in one line naming the file or flag and what was expected (exit 2), never a traceback."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import REPO
from robust_corpus import SR, TINY, copy_split, preprocessed, speech_like, trained, write_speakers

import configuration
import data_preprocess
import features
import main
import training
import utils

# file name under the "mixed" speaker -> the kind of skip it must produce
BAD_FILES = {
    "text.wav": "unreadable",  # non-audio with an audio extension
    "random.flac": "unreadable",
    "zero.wav": "unreadable",  # zero-length file
    "truncated.wav": "truncated",
    "truncated.flac": "unreadable",
    "corrupt.flac": "unreadable",
    "silence.wav": "silent",  # all digital silence: VAD keeps nothing
    "short.wav": "too short",  # fewer voiced frames than --min_frames
    "nan.wav": "non-finite",
    "inf.wav": "non-finite",
}
# usable formats: channels, sample rates and sample types
GOOD_FILES = ["stereo.wav", "six_channels.wav", "sr8000.wav", "sr22050.wav", "sr44100.flac",
              "sr48000.wav", "int16.wav", "int24.wav", "float32.wav", "float64.wav", "flac24.flac"]


def write_format(path: Path, wav: np.ndarray) -> None:
    """One good file in the format its name says."""
    stem = path.stem
    if stem == "stereo":
        sf.write(path, np.stack([wav, 0.5 * wav], axis=1), SR, subtype="PCM_16")
    elif stem == "six_channels":
        sf.write(path, np.stack([wav] * 6, axis=1), SR, subtype="PCM_16")
    elif stem.startswith("sr"):
        sr = int(stem[2:])
        t = np.arange(int(len(wav) * sr / SR)) * SR / sr
        sf.write(path, np.interp(t, np.arange(len(wav)), wav), sr)
    elif stem in ("int16", "int24"):
        sf.write(path, wav, SR, subtype={"int16": "PCM_16", "int24": "PCM_24"}[stem])
    elif stem in ("float32", "float64"):
        sf.write(path, wav, SR, subtype={"float32": "FLOAT", "float64": "DOUBLE"}[stem])
    else:
        sf.write(path, wav, SR, subtype="PCM_24")


def write_bad(folder: Path) -> None:
    """The bad files of BAD_FILES, plus the good formats of GOOD_FILES, in folder."""
    wav = speech_like(seed=7)
    (folder / "text.wav").write_text("this is not audio\n" * 20)
    (folder / "random.flac").write_bytes(np.random.default_rng(0).bytes(5000))
    (folder / "zero.wav").write_bytes(b"")
    for suffix in ("wav", "flac"):
        sf.write(folder / f"full.{suffix}", wav, SR, subtype="PCM_16")
        data = (folder / f"full.{suffix}").read_bytes()
        (folder / f"truncated.{suffix}").write_bytes(data[:len(data) // 2])
        if suffix == "flac":
            damaged = bytearray(data)
            damaged[len(data) // 3:len(data) // 3 + 2000] = np.random.default_rng(1).bytes(2000)
            (folder / "corrupt.flac").write_bytes(bytes(damaged))
        (folder / f"full.{suffix}").unlink()
    sf.write(folder / "silence.wav", np.zeros(SR, np.float32), SR, subtype="PCM_16")
    sf.write(folder / "short.wav", speech_like(0.1, seed=8), SR, subtype="PCM_16")
    for name, value in (("nan.wav", np.nan), ("inf.wav", np.inf)):
        broken = wav.copy()
        broken[1000:1010] = value
        sf.write(folder / name, broken, SR, subtype="FLOAT")
    for name in GOOD_FILES:
        write_format(folder / name, wav)


def one_line_error(err: str) -> str:
    """The stderr of a user error: exactly one line starting 'error:' (tqdm bars aside)."""
    lines = [line for line in err.splitlines()
             if line.strip() and not re.match(r"[\w ]+:\s+\d+%\|", line)]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    """One preprocessing run over good speakers, a speaker of bad and odd files, and a speaker
    left with one usable utterance."""
    root = tmp_path_factory.mktemp("matrix")
    audio = root / "audio"
    write_speakers(audio, speakers=3, utterances=3)
    (audio / "mixed").mkdir()
    write_bad(audio / "mixed")
    write_speakers(audio / "nested", speakers=1, utterances=2)  # <speaker>/<session>/<utt>
    (audio / "sparse").mkdir()
    sf.write(audio / "sparse" / "only.wav", speech_like(seed=9), SR, subtype="PCM_16")
    (audio / "sparse" / "broken.wav").write_bytes(b"RIFF")
    (audio / "notes.txt").write_text("not audio, ignored")
    flags = ["--audio_path", str(audio), "--train_path", str(root / "train"),
             "--test_path", str(root / "test"), "--test_ratio", "0.5"]
    result = subprocess.run([sys.executable, "data_preprocess.py", *flags], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    manifests = [json.loads((root / split / "manifest.json").read_text())
                 for split in ("train", "test")]
    return {"root": root, "result": result, "manifests": manifests,
            "skipped": {e["path"]: e for m in manifests for e in m["skipped"]}}


@pytest.mark.slow
def test_preprocessing_with_bad_files_succeeds(matrix):
    assert matrix["result"].returncode == 0, matrix["result"].stderr
    usable = {s for m in matrix["manifests"] for s in m["speakers"]}
    assert usable == {"spk00", "spk01", "spk02", "mixed", "nested"}


@pytest.mark.parametrize("name, kind", sorted(BAD_FILES.items()))
@pytest.mark.slow
def test_bad_file_skipped_with_reason(matrix, name, kind):
    entry = matrix["skipped"][f"mixed/{name}"]
    assert entry["kind"] == kind and entry["reason"]


@pytest.mark.slow
def test_good_formats_kept(matrix):
    root = matrix["root"]
    sidecar = next(root / split / "mixed.json" for split in ("train", "test")
                   if (root / split / "mixed.json").exists())
    kept = json.loads(sidecar.read_text())["utterances"]
    assert sorted(kept) == sorted(f"mixed/{name}" for name in GOOD_FILES)


@pytest.mark.slow
def test_speaker_below_min_utterances_skipped(matrix):
    entry = matrix["skipped"]["sparse"]
    assert entry["kind"] == data_preprocess.SPEAKER_SKIPPED
    assert "1 usable utterances, expected at least --min_utterances 2" in entry["reason"]
    assert matrix["skipped"]["sparse/broken.wav"]["kind"] == "unreadable"


@pytest.mark.slow
def test_summary_line_counts_reasons(matrix):
    out = matrix["result"].stdout
    lines = [line for line in out.splitlines() if line.startswith(("train:", "test:"))]
    assert len(lines) == 2
    total = {}
    for line in lines:
        for kind in set(BAD_FILES.values()):
            marker = f" {kind}"
            if marker in line:
                count = int(line.split(marker)[0].rsplit("(", 1)[-1].rsplit(" ", 1)[-1])
                total[kind] = total.get(kind, 0) + count
    expected = {}
    for kind in BAD_FILES.values():
        expected[kind] = expected.get(kind, 0) + 1
    expected["unreadable"] += 1  # sparse/broken.wav
    assert total == expected
    assert "1 speaker with too few usable utterances" in out


def test_channels_rates_and_sample_types_load_alike(tmp_path):
    wav = speech_like(seed=3)
    write_format(tmp_path / "ref.wav", wav)
    reference = features.load_audio(tmp_path / "ref.wav", SR)
    for name in GOOD_FILES:
        write_format(tmp_path / name, wav)
        loaded = features.load_audio(tmp_path / name, SR)
        assert loaded.dtype == np.float32 and loaded.ndim == 1
        assert abs(len(loaded) - len(reference)) <= 2, name
        n = min(len(loaded), len(reference))
        scale = 0.75 if name == "stereo.wav" else 1.0  # the mean of wav and wav / 2
        # Resampled copies differ by interpolation; all must still be the same signal.
        assert np.corrcoef(loaded[:n], scale * reference[:n])[0, 1] > 0.95, name


@pytest.mark.parametrize("case", ["missing", "file", "empty", "no_audio", "flat", "all_bad"])
def test_nothing_usable_exits_nonzero_with_one_line(tmp_path, capsys, case):
    audio = tmp_path / "audio"
    expected, code = {"missing": ("not a folder", 2), "file": ("not a folder", 2),
                      "empty": ("no <speaker>/**/<file> audio", 2), "no_audio": ("no <speaker>", 2),
                      "flat": ("no <speaker>", 2), "all_bad": ("no usable", 1)}[case]
    if case == "file":
        audio.write_text("x")
    elif case != "missing":
        audio.mkdir()
    if case == "no_audio":
        (audio / "spk").mkdir()
        (audio / "spk" / "a.m4a").write_bytes(b"ID3")
        (audio / "spk" / "readme.txt").write_text("x")
    elif case == "flat":
        sf.write(audio / "a.wav", speech_like(), SR)
    elif case == "all_bad":
        for speaker in ("a", "b", "c"):
            (audio / speaker).mkdir()
            for u in range(3):
                (audio / speaker / f"{u}.wav").write_bytes(b"")
    flags = ["--audio_path", str(audio), "--train_path", str(tmp_path / "train"),
             "--test_path", str(tmp_path / "test")]
    assert data_preprocess.main(flags) == code
    line = one_line_error(capsys.readouterr().err)
    assert expected in line
    assert (str(audio) in line) if code == 2 else ("manifest.json" in line)


def test_killed_run_temp_files_removed_and_unreadable_sidecar_redone(tmp_path):
    audio = tmp_path / "audio"
    write_speakers(audio, speakers=3, utterances=3)
    flags = ["--audio_path", str(audio), "--train_path", str(tmp_path / "train"),
             "--test_path", str(tmp_path / "test"), "--test_ratio", "0.34"]
    assert data_preprocess.main(flags) == 0
    speaker = json.loads((tmp_path / "train" / "manifest.json").read_text())["speakers"][0]
    sidecar = tmp_path / "train" / f"{speaker}.json"
    good = sidecar.read_bytes()
    sidecar.write_text("{not json")
    (tmp_path / "train" / "spkXX.npy.tmp").write_bytes(b"torn")
    assert data_preprocess.main(flags) == 0
    assert sidecar.read_bytes() == good
    assert not list((tmp_path / "train").glob("*.tmp"))


# --- flags ------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, names", [
    (["--N", "-3"], ["--N", "expected a positive integer", "'-3'"]),
    (["--N", "abc"], ["--N", "expected a positive integer", "'abc'"]),
    (["--M", "1"], ["--M", "at least 2"]),
    (["--N", "1"], ["--N", "at least 2"]),
    (["--train", "maybe"], ["--train", "expected True/False", "'maybe'"]),
    (["--loss", "foo"], ["--loss", "invalid choice", "'foo'"]),
    (["--optim", "lbfgs"], ["--optim", "invalid choice"]),
    (["--lr", "nan"], ["--lr", "expected a positive number"]),
    (["--lr=-1e-3"], ["--lr", "expected a positive number"]),
    (["--test_ratio", "1.5"], ["--test_ratio", "between 0 and 1"]),
    (["--seed", "-1"], ["--seed", "expected an integer >= 0"]),
    (["--beta1", "1.0"], ["--beta1", "[0, 1)"]),
    (["--snr_db", "20", "5"], ["--snr_db", "exceeds"]),
    (["--source_weights", "1", "-1"], ["--source_weights", "expected a number >= 0"]),
    (["--source_weights", "0", "0"], ["--source_weights", "above 0"]),
    (["--speed_perturb", "1"], ["--speed_perturb", "between 0.5 and 2, not 1", "'1'"]),
    (["--speed_perturb", "0.9", "3"], ["--speed_perturb", "'3'"]),
    (["--tisv_frame_min", "300"], ["--tisv_frame_min"]),
    (["--nfft", "256"], ["--window", "--nfft 256"]),
    (["--no_such_flag"], ["unrecognized arguments: --no_such_flag"]),
    (["--summarize", "R", "--embed"], ["--summarize", "--embed", "at a time"]),
])
def test_invalid_flag_is_one_line_naming_it(capsys, argv, names):
    with pytest.raises(SystemExit) as exit_info:
        configuration.parse_config(argv)
    assert exit_info.value.code == 2
    line = one_line_error(capsys.readouterr().err)
    for name in names:
        assert name in line


def test_invalid_flag_from_the_command_line_has_no_traceback():
    for argv in (["--N", "-3"], ["--train", "maybe"], ["--loss", "foo"]):
        result = subprocess.run([sys.executable, "main.py", *argv], cwd=REPO,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2
        assert argv[0] in one_line_error(result.stderr)


# --- training and test runs -------------------------------------------------------------------

def test_n_larger_than_speakers(tmp_path_factory, tmp_path, capsys):
    flags = preprocessed(tmp_path_factory) + ["--model_path", str(tmp_path / "m"), "--N", "9"]
    assert main.main(flags + ["--iteration", "1"]) == 2
    assert "--N 9 exceeds the 4 training speakers" in one_line_error(capsys.readouterr().err)


def test_source_weights_not_matching_the_folders(tmp_path_factory, tmp_path, capsys):
    flags = preprocessed(tmp_path_factory) + ["--model_path", str(tmp_path / "m")]
    train_path = flags[flags.index("--train_path") + 1]
    flags[flags.index("--train_path") + 1] = f"{train_path},{train_path}"
    assert main.main(flags + ["--iteration", "1", "--source_weights", "1", "1", "1"]) == 2
    assert "3 weights for 2 --train_path folders" in one_line_error(capsys.readouterr().err)


def test_speakers_with_fewer_than_m_utterances_still_train(tmp_path_factory, tmp_path):
    flags = preprocessed(tmp_path_factory) + ["--model_path", str(tmp_path / "m"), "--M", "6"]
    summary = training.train(configuration.parse_config(flags + ["--iteration", "2"]))
    assert summary["steps"] == 2 and np.all(np.isfinite(summary["losses"]))


def test_missing_features(tmp_path, capsys):
    flags = ["--train_path", str(tmp_path / "none"), "--model_path", str(tmp_path / "m")] + TINY
    assert main.main(flags) == 2
    assert f"--train_path {tmp_path / 'none'}: no such folder (run python data_preprocess.py" in (
        one_line_error(capsys.readouterr().err))
    (tmp_path / "none").mkdir()
    assert main.main(flags) == 2
    assert "manifest.json not found; run python data_preprocess.py" in one_line_error(
        capsys.readouterr().err)


def test_corrupt_manifest_named(tmp_path_factory, tmp_path, capsys):
    flags = preprocessed(tmp_path_factory)
    train = Path(flags[flags.index("--train_path") + 1])
    broken = copy_split(train, tmp_path / "train")
    (broken / "manifest.json").write_text('{"speakers": [')
    flags[flags.index("--train_path") + 1] = str(broken)
    assert main.main(flags + ["--model_path", str(tmp_path / "m")]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert str(broken / "manifest.json") in line and "re-run data_preprocess.py" in line


def test_test_run_flag_conflicts_with_saved_config(tmp_path_factory, capsys):
    flags = trained(tmp_path_factory)
    assert main.main(flags + ["--train", "False", "--hidden", "32"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "--hidden 32 conflicts" in line and "hidden=16" in line


def test_resume_flag_conflicts_with_saved_config(tmp_path_factory, tmp_path, capsys):
    flags = trained(tmp_path_factory)
    model_path = Path(flags[flags.index("--model_path") + 1])
    copy = tmp_path / "model"
    subprocess.run(["cp", "-r", str(model_path), str(copy)], check=True)
    flags[flags.index("--model_path") + 1] = str(copy)
    assert main.main(flags + ["--restore", "True", "--iteration", "6", "--lr", "0.5"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "--lr 0.5 conflicts" in line and "lr=0.01" in line


# --model_num only selects the checkpoint of a test run, so it has no training case.
@pytest.mark.parametrize("damage, train", [
    (damage, train) for train in (False, True)
    for damage in ("no_model", "no_config", "no_checkpoint", "model_num", "data_missing",
                   "data_truncated", "index_missing") if not (train and damage == "model_num")])
def test_missing_or_partial_checkpoint(tmp_path_factory, tmp_path, capsys, request, damage,
                                      train):
    flags = trained(tmp_path_factory)
    model_path = Path(flags[flags.index("--model_path") + 1])
    copy = tmp_path / "model"
    if damage != "no_model":
        subprocess.run(["cp", "-r", str(model_path), str(copy)], check=True)
    flags[flags.index("--model_path") + 1] = str(copy)
    checkpoints = copy / "checkpoints"
    named = str(copy)
    if damage == "no_config":
        (copy / "config.json").unlink()
        named = "config.json"
    elif damage == "no_checkpoint":
        for file in checkpoints.iterdir():
            file.unlink()
        named = str(checkpoints)
    elif damage == "model_num":
        flags += ["--model_num", "3"]
        named = "--model_num 3"
    elif damage.startswith(("data", "index")):
        latest = "ckpt-4"
        data = next(checkpoints.glob(f"{latest}.data-*"))
        if damage == "data_missing":
            data.unlink()
        elif damage == "data_truncated":
            data.write_bytes(data.read_bytes()[:40])
        else:
            (checkpoints / f"{latest}.index").unlink()
        named = latest if damage != "index_missing" else str(checkpoints)
        if damage == "index_missing" and train:
            # The state file still names ckpt-4: resuming must refuse it rather than start over.
            named = "ckpt-4"
    argv = flags + (["--restore", "True", "--iteration", "6"] if train else ["--train", "False"])
    code = main.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    line = one_line_error(err)
    assert named in line, line


@pytest.mark.parametrize("content, expected", [
    (None, "no such file"),
    ("", "no trials; expected lines 'label enrol test'"),
    ("1 spk00/utt00.wav\n", ":1: expected 'label enrol test'"),
    ("1 a.wav b.wav\n2 a.wav b.wav\n", ":2: expected 'label enrol test' with label 0 or 1"),
    ("1 ../spk00/utt00.wav spk00/utt01.wav\n", "must be a path inside --audio_path"),
    ("0 /etc/passwd spk00/utt01.wav\n", "must be a path inside --audio_path"),
    (b"1 \xff\xfe.wav b.wav\n", "expected a UTF-8 text file"),
    ("1 spk00/utt00.wav spk00/nope.wav\n0 spk00/utt00.wav spk01/utt00.wav\n",
     "need both target (1) and nontarget (0)"),  # the target trial's file is missing
    ("1 spk00/utt00.wav spk00/utt01.wav\n", "need both target (1) and nontarget (0)"),
])
def test_malformed_trial_list(tmp_path_factory, tmp_path, capsys, content, expected):
    flags = trained(tmp_path_factory)
    trials = tmp_path / "trials.txt"
    if isinstance(content, bytes):
        trials.write_bytes(content)
    elif content is not None:
        trials.write_text(content)
    code = main.main(flags + ["--train", "False", "--trials", str(trials)])
    err = capsys.readouterr().err
    assert code == 2, err
    line = one_line_error(err)
    assert expected in line
    if expected != "need both target (1) and nontarget (0)":
        assert str(trials) in line


def test_trial_list_scores_every_trial_it_can(tmp_path_factory, tmp_path, capsys):
    """A missing, an unreadable and a silent file drop only their own trials, counted by reason;
    EER is that of the remaining trials' scores."""
    flags = trained(tmp_path_factory)
    shared = Path(flags[flags.index("--audio_path") + 1])
    root = tmp_path / "audio"
    for speaker in ("spk00", "spk01"):
        (root / speaker).parent.mkdir(exist_ok=True)
        (root / speaker).symlink_to(shared / speaker)
    (root / "bad").mkdir()
    (root / "bad" / "noise.wav").write_bytes(b"RIFF....not audio")
    sf.write(root / "bad" / "silence.wav", np.zeros(16000, np.float32), 16000)
    good = ["1 spk00/utt00.wav spk00/utt01.wav", "0 spk00/utt00.wav spk01/utt00.wav",
            "1 spk01/utt00.wav spk01/utt01.wav", "0 spk01/utt01.wav spk00/utt01.wav"]
    bad = ["1 spk00/utt00.wav bad/missing.wav", "0 bad/noise.wav spk01/utt00.wav",
           "0 spk00/utt01.wav bad/silence.wav"]
    trials = tmp_path / "trials.txt"
    trials.write_text("\n".join(good[:2] + bad + good[2:]) + "\n")
    results = tmp_path / "results"
    assert main.main(flags + ["--train", "False", "--trials", str(trials), "--audio_path",
                              str(root), "--results_path", str(results)]) == 0
    out = capsys.readouterr().out
    assert "skipped 3 file(s) and the 3 of 7 trials using them" in out
    for reason in ("file not found", "not readable audio", "silent"):
        assert reason in out
    rows = [line.split() for line in (results / "scores.txt").read_text().splitlines()]
    assert [(r[0], r[1]) for r in rows] == [tuple(t.split()[1:]) for t in good]
    scores = np.array([float(r[2]) for r in rows])
    labels = np.array([r[3] == "target" for r in rows])
    saved = json.loads((results / "evaluation.json").read_text())
    assert saved["raw"]["eer"] == pytest.approx(
        utils.equal_error_rate(scores[labels], scores[~labels])[0], abs=1e-9)
    assert (saved["skipped_files"], saved["skipped_trials"]) == (3, 3)


def test_preprocessing_does_not_need_write_access_to_the_audio(tmp_path):
    audio = tmp_path / "audio"
    write_speakers(audio, speakers=2, utterances=2)
    for path in audio.rglob("*"):
        os.chmod(path, 0o555 if path.is_dir() else 0o444)
    try:
        flags = ["--audio_path", str(audio), "--train_path", str(tmp_path / "train"),
                 "--test_path", str(tmp_path / "test")]
        assert data_preprocess.main(flags) == 0
    finally:
        for path in audio.rglob("*"):
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
