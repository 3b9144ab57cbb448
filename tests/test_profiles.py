"""Enroll / verify / identify / embed on a trained model (export: test_export.py)."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import soundfile as sf
from conftest import REPO, link_subset

import configuration
import data_preprocess
import main
import model
import utils


def _flag(flags, name):
    return flags[flags.index(name) + 1]


def test_enroll_replace_extend_and_errors(tiny_tisv, capsys):
    root = Path(_flag(tiny_tisv, "--synthetic_path"))
    files = [str(root / "spk00" / f"free_0{i}.wav") for i in range(3)]
    assert main.main(tiny_tisv + ["--enroll", "alice", "--audio", *files[:2]]) == 0
    assert "enrolled 'alice' with 2 file(s)" in capsys.readouterr().out
    assert main.main(tiny_tisv + ["--enroll", "alice", "--extend", "True", "--audio",
                                  files[2]]) == 0
    assert "extended 'alice' with 3 file(s)" in capsys.readouterr().out
    profile = Path(_flag(tiny_tisv, "--model_path")) / "profiles"
    assert np.load(profile / "alice.npy", allow_pickle=False).shape[0] == 3
    assert main.main(tiny_tisv + ["--enroll", "alice", "--audio", files[0]]) == 0
    assert "replaced 'alice' with 1 file(s)" in capsys.readouterr().out

    assert main.main(tiny_tisv + ["--verify", "bob", "--audio", files[0]]) == 2
    assert "no profile 'bob'" in capsys.readouterr().err
    assert main.main(tiny_tisv + ["--verify", "alice", "--threshold", "0.5", "--audio",
                                  str(root / "missing.wav")]) == 2
    assert "missing.wav: no such audio file" in capsys.readouterr().err
    assert main.main(tiny_tisv + ["--verify", "alice", "--threshold", "0.5", "--audio",
                                  str(REPO / "README.md")]) == 2
    assert "README.md: not readable audio" in capsys.readouterr().err
    assert main.main(tiny_tisv + ["--enroll", "../evil", "--audio", files[0]]) == 2
    assert "profile name" in capsys.readouterr().err

    meta = json.loads((profile / "alice.json").read_text())
    meta["model"] = "0" * 16
    (profile / "alice.json").write_text(json.dumps(meta))
    assert main.main(tiny_tisv + ["--verify", "alice", "--threshold", "0.5", "--audio",
                                  files[1]]) == 2
    assert "enrolled with another model" in capsys.readouterr().err


def test_ensemble_test_verify_and_mismatched_member(tiny_tisv, tmp_path, capsys):
    """--ensemble: evaluated and thresholded as one model; a member reading other features is
    refused by name."""
    primary, member = tmp_path / "primary", tmp_path / "member"
    shutil.copytree(_flag(tiny_tisv, "--model_path"), primary)
    member_flags = tiny_tisv + ["--model_path", str(member), "--seed", "1"]
    model.train(configuration.parse_config(member_flags + ["--iteration", "10"]))
    flags = tiny_tisv + ["--model_path", str(primary), "--results_path", str(tmp_path / "r")]
    assert main.main(flags + ["--train", "False", "--ensemble", str(member)]) == 0
    evaluation = json.loads((primary / "evaluation.json").read_text())
    assert evaluation["models"] == [str(primary.resolve()), str(member.resolve())]

    root = Path(_flag(tiny_tisv, "--synthetic_path"))
    audio = ["--audio", str(root / "spk00" / "free_00.wav")]
    assert main.main(flags + ["--enroll", "alice", "--ensemble", str(member), *audio]) == 0
    capsys.readouterr()
    assert main.main(flags + ["--verify", "alice", "--ensemble", str(member), *audio]) == 0
    assert "ACCEPT" in capsys.readouterr().out  # its own enrollment file, the ensemble threshold
    # The primary alone is another model: its profile fingerprint and threshold do not apply.
    assert main.main(flags + ["--verify", "alice", *audio]) == 2
    assert "enrolled with another model" in capsys.readouterr().err
    assert main.main(flags + ["--enroll", "bob", *audio]) == 0
    assert main.main(flags + ["--verify", "bob", *audio]) == 2
    assert "holds the threshold of" in capsys.readouterr().err
    assert main.main(flags + ["--export", str(tmp_path / "e"), "--ensemble", str(member)]) == 2
    assert "--export takes one model" in capsys.readouterr().err

    saved = json.loads((member / "config.json").read_text())
    saved["hop"] = 0.02
    (member / "config.json").write_text(json.dumps(saved))
    assert main.main(flags + ["--train", "False", "--ensemble", str(member)]) == 2
    assert f"--ensemble {member}: its hop=0.02 differs" in capsys.readouterr().err


def test_embed_folder_writes_safe_npz_and_skips_bad_files(tiny_tisv, tmp_path, capsys):
    root = Path(_flag(tiny_tisv, "--synthetic_path"))
    folder = tmp_path / "audio"
    (folder / "a").mkdir(parents=True)
    for name in ("free_00.wav", "free_01.wav"):
        (folder / "a" / name).symlink_to(root / "spk01" / name)
    sf.write(folder / "a" / "silence.wav", np.zeros(16000, np.float32), 16000)
    out = tmp_path / "vectors.npz"
    assert main.main(tiny_tisv + ["--embed", "--audio_path", str(folder), "--out", str(out)]) == 0
    assert "1 file(s) skipped" in capsys.readouterr().out
    with np.load(out, allow_pickle=False) as data:
        assert list(data["paths"]) == ["a/free_00.wav", "a/free_01.wav"]
        assert data["d_vectors"].shape == (2, 8)
        np.testing.assert_allclose(np.linalg.norm(data["d_vectors"], axis=1), 1.0, atol=1e-5)


def test_real_speech_enroll_verify_identify(shared_data, tmp_path, capsys):
    """A small model trained on real voices separates two held-out speakers."""
    root = link_subset(shared_data / "dspspeech20", tmp_path / "dsp", speakers=20,
                       per_speaker=60)
    flags = ["--audio_path", str(root), "--train_path", str(tmp_path / "train"),
             "--test_path", str(tmp_path / "test"), "--model_path", str(tmp_path / "model"),
             "--results_path", str(tmp_path / "results"), "--test_ratio", "0.2",
             "--hidden", "64", "--proj", "32", "--N", "8", "--M", "6", "--draws", "2"]
    assert data_preprocess.main(flags) == 0
    model.train(configuration.parse_config(flags + [
        "--iteration", "300", "--optim", "adam", "--lr", "3e-3", "--beta1", "0.9",
        "--beta2", "0.999", "--save_every", "250"]))
    assert main.main(flags + ["--train", "False"]) == 0
    speakers = json.loads((tmp_path / "test" / "manifest.json").read_text())["speakers"]
    # Text-dependent use, as dspspeech20 is meant: enroll on five takes of a word, verify and
    # identify on its other takes.
    word = {s: sorted(str(f) for f in (root / s).glob("*-19-*.flac")) for s in speakers}
    for speaker in speakers:
        assert main.main(flags + ["--enroll", speaker, "--audio", *word[speaker][:5]]) == 0
    alice, bob = speakers[:2]
    for file in (word[alice][5], word[bob][5]):
        capsys.readouterr()
        assert main.main(flags + ["--verify", alice, "--audio", file]) == 0
        line = capsys.readouterr().out.strip()
        score, threshold = (float(x) for x in re.findall(r"(?:score|threshold) (-?[\d.]+)", line))
        assert line.endswith("ACCEPT" if score >= threshold else "REJECT"), line
    assert main.main(flags + ["--identify", "--audio", word[bob][5]]) == 0
    ranking = capsys.readouterr().out.splitlines()[1:]
    assert sorted(line.split()[1] for line in ranking) == sorted(speakers)
    # A 300-step model errs on about a quarter of single trials, so separation is judged on
    # every held-out take of every test speaker, not on one pair.
    vectors = tmp_path / "held_out.npz"
    assert main.main(flags + ["--embed", "--audio_path", str(root), "--out", str(vectors)]) == 0
    with np.load(vectors, allow_pickle=False) as saved:
        index = {p: i for i, p in enumerate(saved["paths"])}
        d_vectors = saved["d_vectors"]
    profiles = np.stack([utils.speaker_model(np.load(
        tmp_path / "model" / "profiles" / f"{s}.npy", allow_pickle=False)) for s in speakers])
    probes = [(k, index[f"{s}/{Path(f).name}"]) for k, s in enumerate(speakers)
              for f in word[s][5:]]
    scores = np.stack([d_vectors[i] @ profiles.T for _, i in probes])
    truth = np.array([k for k, _ in probes])
    target = scores[np.arange(len(probes)), truth]
    assert target.mean() > (scores.sum(1) - target).mean() / (len(speakers) - 1), scores
    assert (scores.argmax(1) == truth).mean() >= 0.5, scores
