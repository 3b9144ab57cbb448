"""The operating threshold: the model's own test split by default, never moved by another trial
list, chosen explicitly with --threshold or --threshold_from, and named by every --verify."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import main
import utils

LINE = re.compile(r"score (-?[\d.]+), threshold (-?[\d.]+) \((.*)\) -> (ACCEPT|REJECT)$")


def _flag(flags, name):
    """The value argparse takes: the last occurrence."""
    return flags[len(flags) - flags[::-1].index(name)]


def _verify(flags, capsys, *extra):
    """The decision line's score, threshold and short source, and the source line above it."""
    capsys.readouterr()
    assert main.main(flags + ["--verify", "alice", *extra]) == 0
    out = capsys.readouterr().out.strip()
    match = LINE.search(out)
    assert match, out
    score, threshold = float(match[1]), float(match[2])
    if abs(score - threshold) > 1e-4:  # both are printed to 4 decimals
        assert match[4] == ("ACCEPT" if score >= threshold else "REJECT"), out
    said = re.search(rf"^threshold {threshold:.4f}: (.*)$", out, re.MULTILINE)
    return score, threshold, match[3], said[1] if said else None


@pytest.fixture
def evaluated(tiny_tisv, tmp_path, capsys):
    """A copy of the tiny model after its own test (--train False), with one profile."""
    shutil.copytree(_flag(tiny_tisv, "--model_path"), tmp_path / "model")
    flags = tiny_tisv + ["--model_path", str(tmp_path / "model"),
                         "--results_path", str(tmp_path / "own")]
    assert main.main(flags + ["--train", "False"]) == 0
    root = Path(_flag(tiny_tisv, "--synthetic_path"))
    assert main.main(flags + ["--enroll", "alice", "--audio",
                              *(str(root / "spk00" / f"free_0{i}.wav") for i in range(3))]) == 0
    capsys.readouterr()
    return flags, root


@pytest.mark.slow
def test_other_trial_list_never_moves_the_operating_threshold(evaluated, tmp_path, capsys):
    flags, root = evaluated
    model_path = Path(_flag(flags, "--model_path"))
    own = json.loads((model_path / "evaluation.json").read_text())
    test_split = str(Path(_flag(flags, "--test_path")).resolve())
    assert own["threshold_source"] == (
        f"EER threshold of the model's test split {test_split} (similarity-matrix test, mean "
        f"of 2 enrollment draws), EER {100 * own['eer_mean']:.2f} %")
    probes = [["--audio", str(root / s / "free_04.wav")] for s in ("spk00", "spk01", "spk02")]
    before = [_verify(flags, capsys, *probe) for probe in probes]
    for _, threshold, source, said in before:
        assert threshold == pytest.approx(own["threshold"], abs=5e-5)
        assert source == "operating threshold"
        assert said == f"operating threshold: {own['threshold_source']}"

    # A list whose pairs cross speakers differently: its EER threshold differs from the split's.
    lines = ["1 spk00/free_00.wav spk00/free_01.wav", "0 spk00/free_00.wav spk01/free_00.wav",
             "1 spk01/free_02.wav spk01/free_03.wav", "0 spk02/free_00.wav spk03/free_03.wav",
             "0 spk02/free_01.wav spk00/free_03.wav"]
    trials = tmp_path / "other.txt"
    trials.write_text("\n".join(lines) + "\n")
    other = tmp_path / "other"
    assert main.main(flags + ["--train", "False", "--trials", str(trials), "--audio_path",
                              str(root), "--results_path", str(other)]) == 0
    assert "the operating threshold is unchanged" in capsys.readouterr().out
    assert json.loads((model_path / "evaluation.json").read_text()) == own
    listed = json.loads((other / "evaluation.json").read_text())
    assert not (model_path / "scores.txt").exists()  # a test never writes into the model
    rows = [line.split() for line in (other / "scores.txt").read_text().splitlines()]
    scores = np.array([float(r[2]) for r in rows])
    labels = np.array([r[3] == "target" for r in rows])
    eer, threshold = utils.equal_error_rate(scores[labels], scores[~labels])
    assert listed["threshold"] == pytest.approx(threshold, abs=1e-5)
    assert listed["threshold_source"] == (f"EER threshold of trial list {trials.resolve()}, "
                                          f"EER {100 * eer:.2f} %")
    assert listed["threshold"] != pytest.approx(own["threshold"], abs=1e-3)

    assert [_verify(flags, capsys, *probe) for probe in probes] == before

    # Choosing that evaluation, or a number, is explicit and said so.
    _, chosen, source, said = _verify(flags, capsys, *probes[0], "--threshold_from", str(other))
    assert chosen == pytest.approx(listed["threshold"], abs=5e-5)
    assert (source, said) == (f"--threshold_from {other}",
                              f"--threshold_from {other}: {listed['threshold_source']}")
    assert _verify(flags, capsys, *probes[0], "--threshold", "0.25")[1:] == (0.25, "--threshold",
                                                                             None)

    # A --trials run into the model's own folder would overwrite its threshold: refused.
    assert main.main(flags + ["--train", "False", "--trials", str(trials), "--audio_path",
                              str(root), "--results_path", str(model_path)]) == 2
    assert "--results_path" in capsys.readouterr().err
    assert json.loads((model_path / "evaluation.json").read_text()) == own


def test_refused_thresholds_are_named(evaluated, tmp_path, capsys):
    flags, root = evaluated
    model_path = Path(_flag(flags, "--model_path"))
    probe = ["--audio", str(root / "spk01" / "free_04.wav")]
    # An earlier version's trial run left its list's threshold as the model's.
    saved = json.loads((model_path / "evaluation.json").read_text())
    stale = {k: v for k, v in saved.items() if k not in ("eer_mean", "threshold_eer")}
    stale["threshold_source"] = "trial EER"
    (model_path / "evaluation.json").write_text(json.dumps(stale))
    assert main.main(flags + ["--verify", "alice", *probe]) == 2
    assert "holds the threshold of a trial list (trial EER)" in capsys.readouterr().err

    other = tmp_path / "foreign"
    other.mkdir()
    (other / "evaluation.json").write_text(json.dumps(dict(saved, model="0" * 16)))
    assert main.main(flags + ["--verify", "alice", *probe, "--threshold_from", str(other)]) == 2
    assert "holds the threshold of other weights" in capsys.readouterr().err
    assert main.main(flags + ["--verify", "alice", *probe, "--threshold_from",
                              str(tmp_path / "nowhere")]) == 2
    assert "--threshold_from" in capsys.readouterr().err
