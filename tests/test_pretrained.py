"""The ready model in pretrained/: used by the use commands when no model is named, and right on
real speakers it never saw in training (speechocean762's test split)."""

import shutil

import pytest

import configuration
import corpora
import data_preprocess
import main

READY = configuration.READY_MODEL


@pytest.fixture()
def ready_copy(tmp_path, monkeypatch):
    """A copy of the ready model (profiles are written beside it), standing in for pretrained/."""
    if not (READY / "config.json").exists():
        pytest.fail(f"{READY} holds no ready model")
    copy = tmp_path / "pretrained"
    shutil.copytree(READY, copy, ignore=shutil.ignore_patterns("profiles"))
    monkeypatch.setattr(configuration, "READY_MODEL", copy)
    monkeypatch.chdir(tmp_path)  # no ./tisv_model here
    return copy


def test_one_rule_for_which_model_a_command_uses(tmp_path, monkeypatch):
    """Training and --train False use --model_path; the use commands use the ready model unless
    --model_path names another, even when ./tisv_model holds a trained model; each says which."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tisv_model").mkdir()
    (tmp_path / "tisv_model" / "config.json").write_text("{}")
    for command in (["--verify", "x", "--audio", "a.wav"], ["--identify", "--audio", "a.wav"],
                    ["--enroll", "x", "--audio", "a.wav"], ["--pairs", "p.txt"],
                    ["--embed", "--audio_path", "d", "--out", "v.npz"], ["--export", "e"]):
        config = configuration.parse_config(command)
        assert "the ready model" in main.model_line(config)
        assert config.model_path == str(READY)
        named = configuration.parse_config(command + ["--model_path", "M"])
        assert main.model_line(named) == "model: M (--model_path)"
        assert named.model_path == "M"
    for command, said in ((["--train", "True"], "training into ./tisv_model (--model_path)"),
                          (["--train", "False"], "model: ./tisv_model (--model_path)")):
        config = configuration.parse_config(command)
        assert main.model_line(config) == said
        assert config.model_path == "./tisv_model"


def test_ready_model_accepts_and_rejects_held_out_speakers(shared_data, ready_copy, capsys):
    corpus = shared_data / "speechocean762"
    tree = corpora.find_utterances(corpus)
    split = configuration.load_config(ready_copy / "config.json")["data"]
    _, test = data_preprocess.split_speakers(sorted(tree), split["test_ratio"], split["seed"])
    alice, bob = test[0], test[1]
    enroll = [str(corpus / p) for p in tree[alice][:5]]
    assert main.main(["--enroll", alice, "--audio", *enroll]) == 0
    assert "model: the ready model" in capsys.readouterr().out
    for probe, decision in ((tree[alice][6], "ACCEPT"), (tree[bob][0], "REJECT")):
        assert main.main(["--verify", alice, "--audio", str(corpus / probe)]) == 0
        line = capsys.readouterr().out.strip().splitlines()[-1]
        assert line.endswith(decision), line
        assert "operating threshold" in line
