"""Trial lists, all-pairs scoring, score files and figures of `main.py --train False`."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import evaluation
import main
import utils


def test_parse_trials_reads_voxceleb_format(tmp_path):
    trials = tmp_path / "trials.txt"
    trials.write_text("1 a/x.wav a/y.wav\n\n0 a/x.wav b/z.flac\n")
    assert utils.parse_trials(trials) == [(1, "a/x.wav", "a/y.wav"), (0, "a/x.wav", "b/z.flac")]


@pytest.mark.parametrize("line", ["1 a.wav", "2 a.wav b.wav", "yes a.wav b.wav",
                                  "1 a.wav b.wav c.wav", "1 ../a.wav b.wav", "0 /etc/a.wav b.wav"])
def test_parse_trials_rejects_malformed_line_with_its_number(tmp_path, line):
    trials = tmp_path / "trials.txt"
    trials.write_text(f"1 a.wav b.wav\n{line}\n")
    with pytest.raises(ValueError, match=r"trials.txt:2:"):
        utils.parse_trials(trials)


def test_all_pairs_trials_counts_and_labels():
    names = {"s1": ["s1/a", "s1/b", "s1/c"], "s2": ["s2/a", "s2/b"]}
    trials = evaluation.all_pairs_trials(names)
    assert len(trials) == 10  # C(5, 2)
    assert sum(label for label, _, _ in trials) == 3 + 1  # C(3,2) + C(2,2)
    for label, a, b in trials:
        assert label == int(a.split("/")[0] == b.split("/")[0])


def test_trial_list_run_writes_scores_and_metrics(tiny_tisv, tmp_path, capsys):
    flags = tiny_tisv
    root = Path(flags[flags.index("--synthetic_path") + 1])
    lines = ["1 spk00/free_00.wav spk00/free_01.wav", "0 spk00/free_00.wav spk01/free_00.wav",
             "1 spk01/free_02.wav spk01/free_03.wav", "0 spk02/free_00.wav spk01/free_03.wav"]
    (tmp_path / "trials.txt").write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    code = main.main(flags + ["--train", "False", "--trials", str(tmp_path / "trials.txt"),
                              "--audio_path", str(root)])
    out = capsys.readouterr().out
    assert code == 0
    assert "trials: 4 (2 target, 2 nontarget)" in out
    assert "minDCF(p=0.01)" in out and "minDCF(p=0.05)" in out and "AS-norm" in out
    results = Path(flags[flags.index("--results_path") + 1])
    rows = [line.split() for line in (results / "scores.txt").read_text().splitlines()]
    assert [(r[0], r[1], r[3]) for r in rows] == [
        (a, b, "target" if label == "1" else "nontarget")
        for label, a, b in (line.split() for line in lines)]
    scores = np.array([float(r[2]) for r in rows])
    assert np.all(np.abs(scores) <= 1.0 + 1e-6)
    # A trial list's evaluation is written to its --results_path, not over the model's own.
    result = json.loads((results / "evaluation.json").read_text())
    target, nontarget = scores[[0, 2]], scores[[1, 3]]
    assert result["raw"]["eer"] == pytest.approx(utils.equal_error_rate(target, nontarget)[0],
                                                 abs=1e-5)


def test_trial_list_missing_file_is_named(tiny_tisv, tmp_path, capsys):
    """A missing file drops its trials and is named; a list left without targets is an error."""
    root = Path(tiny_tisv[tiny_tisv.index("--synthetic_path") + 1])
    (tmp_path / "trials.txt").write_text("1 spk00/free_00.wav spk00/nothere.wav\n"
                                         "0 spk00/free_00.wav spk01/free_00.wav\n")
    code = main.main(tiny_tisv + ["--train", "False", "--trials", str(tmp_path / "trials.txt"),
                                  "--audio_path", str(root)])
    assert code == 2
    out, err = capsys.readouterr()
    assert "skipped 1 file(s) and the 1 of 2 trials using them: 1 file not found " \
           "(e.g. spk00/nothere.wav)" in out
    assert "need both target (1) and nontarget (0)" in err


def test_all_pairs_run_writes_every_figure(tiny_tisv, capsys):
    capsys.readouterr()
    assert main.main(tiny_tisv + ["--train", "False"]) == 0
    out = capsys.readouterr().out
    assert "similarity-matrix test: EER" in out and "+/-" in out
    assert "trials:" in out and "all pairs" in out
    results = Path(tiny_tisv[tiny_tisv.index("--results_path") + 1])
    for name in ("det_curve", "score_histograms", "similarity_matrix", "d_vectors_pca",
                 "training_loss"):
        assert (results / f"{name}_tisv.png").stat().st_size > 5000
    model_path = Path(tiny_tisv[tiny_tisv.index("--model_path") + 1])
    assert (json.loads((results / "evaluation.json").read_text())
            == json.loads((model_path / "evaluation.json").read_text()))
    eer = float(out.split("similarity-matrix test: EER ")[1].split("%")[0])
    capsys.readouterr()
    assert main.main(["--summarize", str(results), str(results)]) == 0
    assert f"similarity-matrix EER mean {eer:.2f}%" in capsys.readouterr().out


def test_summary_of_tests_by_hand():
    folds = [{"eer_mean": 0.04, "speakers": 5, "raw": {"eer": 0.10}, "as_norm": {"eer": 0.08}},
             {"eer_mean": 0.10, "speakers": 6, "raw": {"eer": 0.20}}]
    summary = evaluation.summary_of_tests(folds)
    assert summary["eer_mean"] == pytest.approx(0.07)
    assert summary["eer_speaker_weighted"] == pytest.approx((5 * 0.04 + 6 * 0.10) / 11)
    assert summary["raw_eer_mean"] == pytest.approx(0.15)
    assert "as_norm_eer_mean" not in summary  # only one of the two tests had it


def test_summarize_names_a_folder_without_evaluation(tmp_path, capsys):
    (tmp_path / "fold0").mkdir()
    (tmp_path / "fold0" / "evaluation.json").write_text(json.dumps({"raw": {"eer": 0.1}}))
    assert main.main(["--summarize", str(tmp_path / "fold0"), str(tmp_path / "fold1")]) == 2
    err = capsys.readouterr().err
    assert "--summarize" in err and "fold1" in err and "evaluation.json" in err


def test_records_name_paths_relative_to_the_working_directory(tiny_tisv, tmp_path,
                                                              monkeypatch, capsys):
    """A committed evaluation must not name the machine it ran on: paths inside the working
    directory are recorded relative to it, others absolute."""
    root = Path(tiny_tisv[tiny_tisv.index("--synthetic_path") + 1]).parent
    shutil.copytree(root / "model", tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    flags = tiny_tisv + ["--model_path", "model", "--results_path", "out"]
    assert main.main(flags + ["--train", "False"]) == 0
    capsys.readouterr()
    for saved in (tmp_path / "model" / "evaluation.json", tmp_path / "out" / "evaluation.json"):
        record = json.loads(saved.read_text())
        assert record["models"] == ["model"]
        assert f"split {(root / 'test').resolve()} (" in record["threshold_source"]
    assert (tmp_path / "out" / "scores.txt").exists()
    assert not (tmp_path / "model" / "scores.txt").exists()
