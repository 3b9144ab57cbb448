"""Shared fixtures: the real corpora beside the checkout, and quiet TensorFlow."""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED_DATA = REPO.parent / "shared" / "data"


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
