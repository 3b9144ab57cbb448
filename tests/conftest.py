"""Shared fixtures: the real corpora beside the checkout, quiet TensorFlow, the `slow` marker."""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_configure(config):
    """Register `slow`: `pytest -m "not slow" tests` is the quick run, plain `pytest tests` all."""
    config.addinivalue_line("markers", "slow: several seconds or more (training, real corpora, "
                            "subprocesses); deselect with -m \"not slow\"")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data: skipped on a user's fresh clone, a failure in CI (CI=true)."""
    if not (SHARED_DATA / "speechocean762" / "manifest.csv").exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{SHARED_DATA} is missing in CI")
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA


def link_subset(corpus: Path, out: Path, speakers: int, per_speaker: int,
                name_filter: str = "") -> Path:
    """A small tree of symlinks to the first files of the first speakers of a corpus."""
    for speaker_dir in sorted(p for p in corpus.iterdir() if p.is_dir())[:speakers]:
        files = sorted(f for f in speaker_dir.iterdir() if name_filter in f.name)[:per_speaker]
        (out / speaker_dir.name).mkdir(parents=True)
        for f in files:
            (out / speaker_dir.name / f.name).symlink_to(f)
    return out


@pytest.fixture(scope="session")
def tiny_tisv(tmp_path_factory) -> list[str]:
    """Flags of a tiny TI-SV model trained for a few steps on the embedded corpus."""
    import configuration
    import data_preprocess
    import training

    root = tmp_path_factory.mktemp("tiny")
    flags = ["--synthetic_path", str(root / "synthetic"), "--train_path", str(root / "train"),
             "--test_path", str(root / "test"), "--model_path", str(root / "model"),
             "--results_path", str(root / "results"), "--hidden", "16", "--proj", "8",
             "--N", "4", "--M", "3", "--draws", "2"]
    assert data_preprocess.main(flags) == 0
    training.train(configuration.parse_config(flags + ["--iteration", "30", "--save_every", "30"]))
    return flags
