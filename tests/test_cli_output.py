"""The command line prints the project's lines, not TensorFlow's C++ start-up logging."""

import os
import subprocess
import sys

import pytest
from conftest import REPO
from robust_corpus import preprocessed

import main

NOISE = ("oneDNN custom operations", "absl::InitializeLog", "XLA service", "Compiled cluster",
         "cpu_feature_guard", "I0000 ", "oneDNN supports DT_BOOL")


def _run(flags: list[str], **env: str) -> str:
    environment = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    environment.update(env)
    done = subprocess.run([sys.executable, str(REPO / "main.py"), *flags], cwd=REPO,
                          env=environment, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout + done.stderr


@pytest.mark.slow
def test_train_and_test_print_no_tensorflow_startup_lines(tmp_path_factory, tmp_path):
    flags = preprocessed(tmp_path_factory) + ["--model_path", str(tmp_path / "model"),
                                              "--results_path", str(tmp_path / "results")]
    trained = _run(flags + ["--train", "True", "--iteration", "2", "--save_every", "2"])
    tested = _run(flags + ["--train", "False"])
    audio = sorted((tmp_path_factory.getbasetemp()).glob("robust_store*/audio/spk00/*.wav"))
    enrolled = _run(flags + ["--enroll", "spk00", "--audio", *map(str, audio[:2])])
    assert "trained to step 2" in trained
    assert "EER" in tested
    assert "enrolled 'spk00'" in enrolled
    for line in (trained + tested + enrolled).splitlines():
        assert not any(noise in line for noise in NOISE), line
    # The user's own log level turns TensorFlow's logging back on, untouched.
    loud = _run(flags + ["--train", "False"], TF_CPP_MIN_LOG_LEVEL="0")
    assert any(main.STARTUP_NOISE.match(line) for line in loud.splitlines())


def test_startup_noise_pattern_keeps_other_lines():
    assert main.STARTUP_NOISE.match("I0000 00:00:1796159682.818141    5778 port.cc:153] oneDNN")
    assert main.STARTUP_NOISE.match("WARNING: All log messages before absl::InitializeLog() is")
    assert not main.STARTUP_NOISE.match("E0000 00:00:1796159682.818141    5778 x.cc:1] failed")
    assert not main.STARTUP_NOISE.match("Traceback (most recent call last):")
