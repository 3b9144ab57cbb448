"""Issue #7, interruption: `kill -9` during preprocessing or training, then a re-run, gives the
uninterrupted run's output; nothing finished is redone and no file is ever torn."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO
from robust_corpus import TINY, preprocessed, write_speakers

import configuration
import data_preprocess
import main
import training


def start(script: str, argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, script, *argv], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


def kill_when(process: subprocess.Popen, ready, timeout: float = 120.0) -> None:
    """SIGKILL the process as soon as ready() is true; fail if it ended first."""
    deadline = time.time() + timeout
    while not ready():
        assert process.poll() is None, "the run ended before it could be interrupted"
        assert time.time() < deadline, "the run produced no output in time"
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_kill_9_during_preprocessing_then_rerun(tmp_path):
    audio = tmp_path / "audio"
    write_speakers(audio, speakers=10, utterances=6, seconds=3.0)
    out = tmp_path / "killed"
    flags = ["--audio_path", str(audio), "--train_path", str(out / "train"),
             "--test_path", str(out / "test"), "--test_ratio", "0.2"]
    # Two forked workers in the killed run: the rerun and the reference are single-process.
    process = start("data_preprocess.py", flags + ["--workers", "2"])
    kill_when(process, lambda: any((out / "train").glob("spk*.json")))

    finished = {p: p.stat() for p in (out / "train").glob("spk*")
                if p.with_suffix(".json").exists()}
    assert finished and len(finished) < 2 * 8, "kill -9 landed after the last speaker"
    assert not (out / "test" / "manifest.json").exists()

    assert data_preprocess.main(flags) == 0
    for path, before in finished.items():  # finished speakers are not redone
        after = path.stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), path

    reference = tmp_path / "reference"
    assert data_preprocess.main(["--audio_path", str(audio), "--train_path",
                                 str(reference / "train"), "--test_path",
                                 str(reference / "test"), "--test_ratio", "0.2"]) == 0
    for split in ("train", "test"):
        assert snapshot(out / split) == snapshot(reference / split), split


# A fresh interpreter without TensorFlow, so the --workers processes fork and run this job.
WORKERS_SCRIPT = """
import os, sys, time
from pathlib import Path
import data_preprocess

def job(number):
    if number == int(sys.argv[2]):
        os._exit(7)
    if number == int(sys.argv[3]):
        raise ValueError(f"job {number} is bad")
    Path(sys.argv[1], str(number)).touch()
    time.sleep(float(sys.argv[4]))
    return number

data_preprocess._speaker_job = job
try:
    print(sorted(data_preprocess.run_jobs(list(range(40)), 2)))
except Exception as error:
    print(type(error).__name__, error)
"""


def run_workers_script(tmp_path: Path, exit_at: int = -1, raise_at: int = -1,
                       seconds: float = 0.0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WORKERS_SCRIPT, str(tmp_path), str(exit_at),
                             str(raise_at), str(seconds)], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)


def test_workers_do_each_job_once_and_report_errors(tmp_path):
    outcomes = []
    for exit_at, raise_at in ((-1, -1), (-1, 25), (25, -1)):
        process = run_workers_script(tmp_path, exit_at, raise_at)
        outcomes.append(process.communicate(timeout=60)[0].strip())
    assert outcomes[0] == str(list(range(40)))
    assert outcomes[1] == "ValueError job 25 is bad"
    assert outcomes[2].startswith("RuntimeError a --workers process exited with code 7")


def test_workers_stop_when_their_parent_is_killed(tmp_path):
    process = run_workers_script(tmp_path, seconds=0.2)
    kill_when(process, lambda: len(list(tmp_path.iterdir())) >= 4)
    started = len(list(tmp_path.iterdir()))
    time.sleep(1.5)  # time for 14 more jobs if the workers went on
    assert len(list(tmp_path.iterdir())) <= started + 2  # each finishes the job it was on


def checkpoint_values(path: str) -> dict[str, np.ndarray]:
    reader = tf.train.load_checkpoint(path)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if "OBJECT_GRAPH" not in name}


@pytest.mark.parametrize("optim", ["adam"])
@pytest.mark.slow
def test_kill_9_during_training_then_restore(tmp_path_factory, tmp_path, optim):
    flags = preprocessed(tmp_path_factory) + ["--optim", optim, "--lr", "3e-3",
                                              "--save_every", "10", "--lr_decay_every", "15"]
    killed = tmp_path / "killed"
    process = start("main.py", flags + ["--model_path", str(killed), "--iteration", "100000"])
    kill_when(process, lambda: (killed / "checkpoints" / "checkpoint").exists())
    last = tf.train.latest_checkpoint(killed / "checkpoints")
    step = int(last.rsplit("-", 1)[1])
    assert step % 10 == 0 and step > 0
    target = step + 10 + 5  # crosses a checkpoint, and a learning-rate halving at 15 or beyond

    # Resumed without repeating --lr etc.: the saved config supplies them.
    resumed_flags = [f for f in flags if f not in ("--lr", "3e-3")]
    assert main.main(resumed_flags + ["--model_path", str(killed), "--restore", "True",
                                      "--iteration", str(target)]) == 0
    assert configuration.load_config(killed / "config.json")["training"]["lr"] == 3e-3

    straight = tmp_path / "straight"
    training.train(configuration.parse_config(flags + ["--model_path", str(straight),
                                                    "--iteration", str(target)]))
    resumed = checkpoint_values(str(killed / "checkpoints" / f"ckpt-{target}"))
    uninterrupted = checkpoint_values(str(straight / "checkpoints" / f"ckpt-{target}"))
    assert resumed.keys() == uninterrupted.keys()
    assert any("optimizer" in name and "iter" in name for name in resumed)
    for name in resumed:
        np.testing.assert_allclose(resumed[name], uninterrupted[name], rtol=1e-5, atol=1e-6,
                                   err_msg=name)
    assert not list(killed.rglob("*.tmp"))


def test_restore_without_a_checkpoint_is_refused(tmp_path_factory, tmp_path, capsys):
    flags = preprocessed(tmp_path_factory) + ["--model_path", str(tmp_path / "m")]
    training.train(configuration.parse_config(flags + ["--iteration", "1", "--save_every", "5"]))
    for file in (tmp_path / "m" / "checkpoints").iterdir():
        file.unlink()
    assert main.main(flags + TINY + ["--restore", "True", "--iteration", "3"]) == 2
    assert f"no checkpoint in {tmp_path / 'm' / 'checkpoints'}" in capsys.readouterr().err
