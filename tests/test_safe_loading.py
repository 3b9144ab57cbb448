"""Issue #7, safe loading: no pickle or eval on user files, every np.load refuses pickles, and
trial-list and profile paths cannot leave their root."""

import ast
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from robust_corpus import copy_split, preprocessed, trained

import configuration
import dataset
import main
import utils

SOURCES = sorted(REPO.glob("*.py"))
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "shelve", "marshal", "joblib"}


def calls(tree: ast.AST):
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)]


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_no_pickle_eval_or_unsafe_np_load(source):
    tree = ast.parse(source.read_text(), filename=str(source))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            assert not UNSAFE_MODULES & {n.split(".")[0] for n in names}, \
                f"{source.name}:{node.lineno} imports {names}"
    for call in calls(tree):
        name = dotted(call.func)
        assert name not in ("eval", "exec", "compile", "__import__", "yaml.load"), \
            f"{source.name}:{call.lineno} calls {name}"
        if name in ("np.load", "numpy.load"):
            safe = [k for k in call.keywords if k.arg == "allow_pickle"
                    and isinstance(k.value, ast.Constant) and k.value.value is False]
            assert safe, f"{source.name}:{call.lineno}: np.load without allow_pickle=False"
        assert "pickle" not in name.lower(), f"{source.name}:{call.lineno} calls {name}"


def test_the_source_scan_sees_the_loaders():
    loads = sum(dotted(c.func) == "np.load" for s in SOURCES for c in calls(ast.parse(
        s.read_text())))
    assert loads >= 3  # dataset (2) and profiles (1): the scan is not vacuous


def test_pickled_feature_file_is_refused(tmp_path_factory, tmp_path):
    flags = preprocessed(tmp_path_factory)
    train = Path(flags[flags.index("--train_path") + 1])
    copy = copy_split(train, tmp_path / "train")
    speaker = json.loads((copy / "manifest.json").read_text())["speakers"][0]
    np.save(copy / f"{speaker}.npy", np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    store = dataset.open_store(str(copy), configuration.parse_config(flags).features, "train")
    with pytest.raises(ValueError, match=rf"{speaker}.npy: unreadable .*re-run data_preprocess"):
        store.array(speaker)


@pytest.mark.parametrize("name", ["../x.wav", "a/../../x.wav", "/etc/passwd", "a/b/../../../x"])
def test_trial_paths_cannot_escape_audio_path(tmp_path, name):
    trials = tmp_path / "trials.txt"
    trials.write_text(f"1 a/x.wav a/y.wav\n0 a/x.wav {name}\n")
    with pytest.raises(ValueError, match="must be a path inside --audio_path"):
        utils.parse_trials(trials)


@pytest.mark.parametrize("command", ["--enroll", "--verify"])
@pytest.mark.parametrize("name", ["../evil", "..", "/tmp/evil", "a/b", ".hidden"])
def test_profile_names_cannot_escape_the_profiles_folder(tmp_path_factory, tmp_path, capsys,
                                                         command, name):
    flags = trained(tmp_path_factory)
    model_path = Path(flags[flags.index("--model_path") + 1])
    audio = Path(flags[flags.index("--audio_path") + 1]) / "spk00" / "utt00.wav"
    before = {p for p in model_path.parent.rglob("*")}
    assert main.main(flags + [command, name, "--audio", str(audio), "--threshold", "0.5"]) == 2
    err = capsys.readouterr().err
    assert f"profile name {name!r}" in err and "letters, digits" in err
    after = {p for p in model_path.parent.rglob("*")}
    assert not [p for p in after - before if "profiles" in p.parts or p.suffix == ".npy"]
    assert not (tmp_path / "evil.npy").exists() and not Path("/tmp/evil.npy").exists()


def test_pickled_profile_is_refused(tmp_path_factory, tmp_path, capsys):
    flags = trained(tmp_path_factory)
    model_path = tmp_path / "model"
    source = Path(flags[flags.index("--model_path") + 1])
    for file in source.rglob("*"):
        target = model_path / file.relative_to(source)
        if file.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(file.read_bytes())
    flags[flags.index("--model_path") + 1] = str(model_path)
    audio = Path(flags[flags.index("--audio_path") + 1]) / "spk00" / "utt00.wav"
    assert main.main(flags + ["--enroll", "alice", "--audio", str(audio)]) == 0
    np.save(model_path / "profiles" / "alice.npy", np.array([{"evil": 1}], dtype=object),
            allow_pickle=True)
    capsys.readouterr()
    assert main.main(flags + ["--verify", "alice", "--audio", str(audio),
                              "--threshold", "0.5"]) == 2
    assert "allow_pickle=False" in capsys.readouterr().err
