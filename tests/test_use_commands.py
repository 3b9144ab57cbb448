"""The use commands as a user meets them: many probes in one process, a list of pairs, errors
before TensorFlow loads, the Python API of the README, and a clean checkout after the quick start."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

import configuration
import ge2e
import main
import utils

DECISION = re.compile(r"^(\S+) vs '(\w+)': score (-?[\d.]+), threshold (-?[\d.]+) \((.*)\) -> "
                      r"(ACCEPT|REJECT)$")


def _flag(flags, name):
    return flags[len(flags) - flags[::-1].index(name)]


@pytest.fixture
def enrolled(tiny_tisv, tmp_path, capsys):
    """A copy of the tiny model with profiles 'alice' (spk00) and 'bob' (spk01)."""
    shutil.copytree(_flag(tiny_tisv, "--model_path"), tmp_path / "model")
    flags = tiny_tisv + ["--model_path", str(tmp_path / "model")]
    root = Path(_flag(tiny_tisv, "--synthetic_path"))
    for name, speaker in (("alice", "spk00"), ("bob", "spk01")):
        files = [str(root / speaker / f"free_0{i}.wav") for i in range(3)]
        assert main.main(flags + ["--enroll", name, "--audio", *files]) == 0
    capsys.readouterr()
    return flags, root


def _decisions(out: str) -> dict[tuple[str, str], tuple[float, float, str]]:
    found = {}
    for line in out.splitlines():
        match = DECISION.match(line)
        if match:
            score, threshold = float(match[3]), float(match[4])
            if abs(score - threshold) > 1e-4:  # both are printed to 4 decimals
                assert match[6] == ("ACCEPT" if score >= threshold else "REJECT"), line
            found[(match[1], match[2])] = (score, threshold, match[6])
    return found


def test_verify_many_probes_in_one_run_scores_as_one_at_a_time(enrolled, tmp_path, capsys):
    flags, root = enrolled
    probes = [str(root / s / "free_05.wav") for s in ("spk00", "spk01", "spk02")]
    bad = [str(tmp_path / "missing.wav"), str(REPO / "README.md")]
    assert main.main(flags + ["--verify", "alice", "--threshold", "0.5", "--audio", *probes,
                              *bad]) == 0
    out = capsys.readouterr().out
    batch = _decisions(out)
    assert sorted(p for p, _ in batch) == sorted(probes)
    assert f"{bad[0]}: skipped (file not found)" in out
    assert f"{bad[1]}: skipped (not readable audio" in out
    accepted = sum(decision == "ACCEPT" for _, _, decision in batch.values())
    assert re.search(rf"^3 scored: {accepted} accepted, {3 - accepted} rejected; 2 skipped; "
                     rf"[\d.]+ probes/s$", out, re.MULTILINE), out
    # The same scores as one probe per run, and as the API's cosine of d-vector and profile.
    model = ge2e.DVectorModel(configuration.parse_config(flags))
    alice = utils.speaker_model(model.profile("alice"))
    for probe in probes:
        assert main.main(flags + ["--verify", "alice", "--threshold", "0.5", "--audio", probe]) == 0
        (single,) = _decisions(capsys.readouterr().out).values()
        assert single[0] == pytest.approx(batch[(probe, "alice")][0], abs=2e-4)
        assert ge2e.cosine(model.embed_file(probe), alice) == pytest.approx(single[0], abs=2e-4)


def test_pairs_file_scores_every_pair(enrolled, tmp_path, capsys):
    flags, root = enrolled
    (tmp_path / "audio").symlink_to(root)
    lines = ["# profile probe", "alice audio/spk00/free_06.wav", "bob audio/spk00/free_06.wav",
             "", "bob audio/spk01/free_07.wav", f"alice {root / 'spk03' / 'free_01.wav'}"]
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("\n".join(lines) + "\n")
    assert main.main(flags + ["--pairs", str(pairs), "--threshold", "0.5"]) == 0
    out = capsys.readouterr().out
    found = _decisions(out)
    expected = [("alice", tmp_path / "audio/spk00/free_06.wav"),
                ("bob", tmp_path / "audio/spk00/free_06.wav"),
                ("bob", tmp_path / "audio/spk01/free_07.wav"),
                ("alice", root / "spk03" / "free_01.wav")]
    assert sorted(found) == sorted((str(p), n) for n, p in expected)
    assert "4 scored:" in out
    for name, probe in expected:
        assert main.main(flags + ["--verify", name, "--threshold", "0.5", "--audio",
                                  str(probe)]) == 0
        (single,) = _decisions(capsys.readouterr().out).values()
        assert single[0] == pytest.approx(found[(str(probe), name)][0], abs=2e-4)

    pairs.write_text("alice\n")
    assert main.main(flags + ["--pairs", str(pairs)]) == 2
    assert f"{pairs}:1: expected 'NAME audio_path'" in capsys.readouterr().err


def test_identify_many_probes_ranks_by_cosine_to_the_stored_profiles(enrolled, capsys):
    """Each line's scores are the cosines, computed here in numpy, of the probe's d-vector and
    the mean of each stored profile's file d-vectors, best first."""
    flags, root = enrolled
    probes = [str(root / s / "free_08.wav") for s in ("spk00", "spk01")]
    assert main.main(flags + ["--identify", "--audio", *probes]) == 0
    out = capsys.readouterr().out.splitlines()
    model = ge2e.DVectorModel(configuration.parse_config(flags))
    profiles = Path(_flag(flags, "--model_path")) / "profiles"
    means = {name: np.load(profiles / f"{name}.npy", allow_pickle=False).astype(np.float64)
             .mean(0) for name in ("alice", "bob")}
    for probe in probes:
        (line,) = [x for x in out if x.startswith(f"{probe}: ")]
        ranked = [(name, float(score)) for name, score in
                  re.findall(r"\d\. (\w+) (-?[\d.]+)", line)]
        vector = model.embed_file(probe).astype(np.float64)
        cosines = {name: vector @ m / np.linalg.norm(vector) / np.linalg.norm(m)
                   for name, m in means.items()}
        assert sorted(name for name, _ in ranked) == sorted(cosines)
        for name, shown in ranked:
            assert shown == pytest.approx(cosines[name], abs=2e-4)
        assert all(a[1] >= b[1] for a, b in zip(ranked, ranked[1:]))
    assert out[-1].startswith("2 identified; 0 skipped;")


ERROR_CASES = [
    (["--verify", "nobody", "--model_path", "untrained", "--audio", "x.wav"],
     "no profile 'nobody' in untrained/profiles"),
    (["--enroll", "alice", "--audio", "nowhere.wav"], "nowhere.wav: no such audio file"),
    (["--enroll", "alice", "--model_path", "no_model", "--audio", "x.wav"],
     "--model_path no_model: no trained model there"),
    (["--train", "False", "--model_path", "no_model"], "--model_path no_model: no trained model"),
    (["--train", "True", "--train_path", "no_data"], "--train_path no_data: no such folder"),
    (["--embed", "--audio_path", "empty", "--out", "v.npz"],
     "--audio_path empty: no audio files (WAV, FLAC, MP3, OGG/Opus)"),
    (["--pairs", "no_list.txt"], "--pairs no_list.txt: no such file"),
    (["--summarize", "empty"], "--summarize empty: no evaluation.json there"),
    (["--identify", "--model_path", "untrained", "--audio", "x.wav"],
     "no profiles in untrained/profiles"),
    (["--train", "False", "--model_path", "untrained", "--trials", "bad_trials.txt",
      "--audio_path", "empty"], "bad_trials.txt:1: expected 'label enrol test'"),
]


@pytest.mark.parametrize("argv, expected", ERROR_CASES)
def test_bad_paths_answer_before_tensorflow_loads(tmp_path, argv, expected):
    """Each error is one line naming the path, and TensorFlow was never imported."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not audio")
    # A model folder as the checks see it (config.json, a checkpoint state), without profiles.
    (tmp_path / "untrained" / "checkpoints").mkdir(parents=True)
    (tmp_path / "untrained" / "config.json").write_text("{}")
    (tmp_path / "untrained" / "checkpoints" / "checkpoint").write_text("")
    (tmp_path / "bad_trials.txt").write_text("1 only_one.wav\n")
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import main; "
              "code = main.main(sys.argv[2:]); "
              "print(code, 'tensorflow' in sys.modules, 'librosa' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script, str(REPO), *argv], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.splitlines()[-1] == "2 False False", done.stdout + done.stderr
    assert done.stderr.count("\n") == 1 and expected in done.stderr, done.stderr


@pytest.mark.parametrize("argv, expected", [
    (["--cohort", "--train_path", "x"], "--cohort writes <model_path>/cohort.npz"),
    (["--export", "e", "--ensemble", "m2"], "--export takes one model"),
])
def test_flags_that_would_write_the_wrong_model_are_refused(argv, expected, capsys):
    with pytest.raises(SystemExit) as refused:
        configuration.parse_config(argv)
    assert refused.value.code == 2 and expected in capsys.readouterr().err


def test_importing_the_api_loads_no_tensorflow():
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import ge2e; "
              "print('tensorflow' in sys.modules, 'librosa' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script, str(REPO)], capture_output=True,
                          text=True, timeout=120)
    assert done.stdout.strip() == "False False", done.stderr


def _readme_block(heading: str) -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index(heading):]
    return section[section.index("```python\n") + 10:section.index("\n```", section.index("```python"))]


def test_readme_api_example_runs_as_written(tmp_path, monkeypatch, capsys):
    """The README's Python example, run in a folder holding the quick start's synthetic corpus,
    against a copy of the ready model (its profiles go there, not into the repository)."""
    import synthetic_corpus

    synthetic_corpus.build(tmp_path / "data" / "synthetic", sr=16000, seed=0)
    copy = tmp_path / "ready"
    shutil.copytree(configuration.READY_MODEL, copy, ignore=shutil.ignore_patterns("profiles"))
    monkeypatch.setattr(configuration, "READY_MODEL", copy)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(_readme_block("## Python API"), namespace)
    out = capsys.readouterr().out
    assert "ACCEPT" in out or "REJECT" in out
    d_vector = namespace["d_vector"]
    assert d_vector.shape == (64,) and abs(np.linalg.norm(d_vector) - 1) < 1e-5
    assert (copy / "profiles").is_dir()


@pytest.mark.slow
def test_quick_start_leaves_the_checkout_clean(tmp_path):
    """The README's quick start and its ready-model commands, run in a copy of the tracked
    files: every decision names the model the README says, and git status stays clean."""
    tracked = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=REPO, capture_output=True,
                             check=True).stdout.decode().split("\0")
    clone = tmp_path / "clone"
    for name in filter(None, tracked):
        if (REPO / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, clone / name)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q"], cwd=clone, check=True)
    subprocess.run(git + ["add", "-A"], cwd=clone, check=True)
    subprocess.run(git + ["commit", "-qm", "clone"], cwd=clone, check=True)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="")

    def run(*argv: str) -> str:
        done = subprocess.run([sys.executable, *argv], cwd=clone, env=env, capture_output=True,
                              text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    run("data_preprocess.py")
    assert "training into ./tisv_model" in run("main.py", "--train", "True", "--iteration", "20")
    assert "model: ./tisv_model" in run("main.py", "--train", "False")
    files = [f"data/synthetic/spk00/free_0{i}.wav" for i in range(3)]
    assert "model: the ready model pretrained" in run("main.py", "--enroll", "alice", "--audio",
                                                       *files)
    verified = run("main.py", "--verify", "alice", "--audio", "data/synthetic/spk00/free_05.wav")
    assert "model: the ready model pretrained" in verified
    assert "operating threshold" in verified
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=clone,
                            capture_output=True, text=True, check=True).stdout
    assert status == "", status


@pytest.mark.slow
def test_shipped_cohort_gives_the_as_norm_of_the_training_speakers(tiny_tisv, tmp_path, capsys):
    """--cohort ships the training speakers' models beside the model; a test without --train_path
    then normalises with them exactly as with --train_path; other weights' cohort is refused."""
    model_path = tmp_path / "model"
    shutil.copytree(_flag(tiny_tisv, "--model_path"), model_path)
    train_path = _flag(tiny_tisv, "--train_path")
    without = [f for i, f in enumerate(tiny_tisv)
               if "--train_path" not in tiny_tisv[max(i - 1, 0):i + 1]]
    flags = without + ["--model_path", str(model_path)]
    assert main.main(flags + ["--cohort", "--train_path", train_path]) == 0
    assert "AS-norm cohort: 19 speaker models" in capsys.readouterr().out
    with np.load(model_path / "cohort.npz", allow_pickle=False) as saved:
        assert saved["speaker_models"].shape == (19, 8)
    shipped, given = tmp_path / "shipped", tmp_path / "given"
    assert main.main(flags + ["--train", "False", "--results_path", str(shipped)]) == 0
    assert main.main(flags + ["--train", "False", "--results_path", str(given), "--train_path",
                              train_path]) == 0
    records = [utils.read_json(folder / "evaluation.json", "record") for folder in (shipped, given)]
    assert records[0]["cohort"] == records[1]["cohort"] == 19
    assert records[0]["as_norm"]["eer"] == pytest.approx(records[1]["as_norm"]["eer"], abs=1e-9)

    with np.load(model_path / "cohort.npz", allow_pickle=False) as saved:
        np.savez(model_path / "cohort.npz", speaker_models=saved["speaker_models"],
                 speakers=saved["speakers"], model=np.array("0" * 16))
    capsys.readouterr()
    assert main.main(flags + ["--train", "False", "--results_path", str(shipped)]) == 2
    assert "cohort.npz was made with other weights" in capsys.readouterr().err


def test_embed_follows_symlinked_speaker_folders(tiny_tisv, tmp_path, capsys):
    """A tree of symlinked speaker folders (as link_subset builds) is embedded file by file."""
    root = Path(_flag(tiny_tisv, "--synthetic_path"))
    tree = tmp_path / "tree"
    tree.mkdir()
    for speaker in ("spk02", "spk03"):
        (tree / speaker).symlink_to(root / speaker, target_is_directory=True)
    out = tmp_path / "vectors.npz"
    assert main.main(tiny_tisv + ["--embed", "--audio_path", str(tree), "--out", str(out)]) == 0
    expected = sorted(f"{s}/{p.name}" for s in ("spk02", "spk03") for p in (root / s).glob("*.wav"))
    with np.load(out, allow_pickle=False) as saved:
        assert list(saved["paths"]) == expected
    assert f"{len(expected)} d-vectors" in capsys.readouterr().out
