"""Issue #7, numerical faults: a NaN/Inf loss stops training with a one-line message naming the
step, and the last good checkpoint stays the latest one (and can be resumed from)."""

import re

import numpy as np
import pytest
import tensorflow as tf
from robust_corpus import preprocessed

import dataset
import main


def poison_batches(monkeypatch, bad_step: int, value: float) -> None:
    """Batch bad_step (and every later one) carries a non-finite feature."""
    clean = dataset.sample_batch

    def sample_batch(store, training, step):
        batch = clean(store, training, step)
        if step >= bad_step:
            batch[0, 0, 0] = value
        return batch

    monkeypatch.setattr(dataset, "sample_batch", sample_batch)


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# An Inf feature can leave the loss finite while the gradients are NaN: the update at step 10
# would poison the weights and, 10 being a --save_every step, ckpt-10 would hold NaN weights.
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_step_stops_there_and_keeps_last_good_checkpoint(
        tmp_path_factory, tmp_path, monkeypatch, capsys, value):
    model_path = tmp_path / "model"
    flags = preprocessed(tmp_path_factory) + ["--model_path", str(model_path),
                                              "--save_every", "5", "--iteration", "20"]
    poison_batches(monkeypatch, bad_step=10, value=value)
    assert main.main(flags) == 2
    line = error_line(capsys.readouterr().err)
    assert re.search(r"(nan|inf) at step 10;", line), line
    assert "ckpt-5" in line and "--lr" in line

    latest = tf.train.latest_checkpoint(model_path / "checkpoints")
    assert latest.endswith("ckpt-5")
    reader = tf.train.load_checkpoint(latest)
    for name in reader.get_variable_to_shape_map():
        if "OBJECT_GRAPH" not in name:
            assert np.all(np.isfinite(reader.get_tensor(name))), name

    # Once the fault is gone, training resumes from the good checkpoint.
    monkeypatch.undo()
    assert main.main(flags + ["--restore", "True", "--iteration", "12"]) == 0
    assert tf.train.latest_checkpoint(model_path / "checkpoints").endswith("ckpt-12")
