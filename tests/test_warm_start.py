"""--init_from MODEL: a run starts from another model's encoder and GE2E scale weights, with a
fresh optimizer and step count; a model of another shape is refused."""

import json
import shutil
from pathlib import Path

import numpy as np
import tensorflow as tf
from robust_corpus import trained

import configuration
import main
import model
import training


def _flag(flags: list[str], name: str) -> str:
    return flags[len(flags) - 1 - flags[::-1].index(name) + 1]


def _reference_weights(flags: list[str], model_path: str) -> list[np.ndarray]:
    """The source model's latest checkpoint, built and restored independently of train()."""
    config = configuration.parse_config(flags)
    encoder, scale = model.build_model(config.network, config.n_mels)
    path = tf.train.latest_checkpoint(Path(model_path) / "checkpoints")
    tf.train.Checkpoint(encoder=list(encoder.variables), scale=list(scale.variables)).restore(
        path).expect_partial()
    return encoder.get_weights() + scale.get_weights()


def test_init_from_starts_at_the_source_weights_with_a_fresh_optimizer(
        tmp_path_factory, tmp_path, monkeypatch, capsys):
    flags = trained(tmp_path_factory)
    source = _flag(flags, "--model_path")
    seen = {}
    make_train_step = training.make_train_step

    def spy(encoder, scale, optimizer, settings, n_mels, strategy=None):
        # Called once the weights are in place and before the first step.
        seen["weights"] = encoder.get_weights() + scale.get_weights()
        seen["iterations"] = int(optimizer.iterations.numpy())
        return make_train_step(encoder, scale, optimizer, settings, n_mels, strategy)

    monkeypatch.setattr(training, "make_train_step", spy)
    target = tmp_path / "warm"
    summary = training.train(configuration.parse_config(
        flags + ["--model_path", str(target), "--init_from", source, "--iteration", "3"]))

    expected = _reference_weights(flags, source)
    assert len(seen["weights"]) == len(expected)
    for got, want in zip(seen["weights"], expected):
        np.testing.assert_array_equal(got, want)
    assert seen["iterations"] == 0
    assert summary["steps"] == 3 and len(summary["losses"]) == 3
    assert Path(tf.train.latest_checkpoint(target / "checkpoints")).name == "ckpt-3"
    source_ckpt = tf.train.latest_checkpoint(Path(source) / "checkpoints")
    assert f"initialised from {source_ckpt}" in capsys.readouterr().out
    saved = json.loads((target / "config.json").read_text())
    assert saved["model"]["init_from"] == str(Path(source).resolve())

    # --restore True resumes the run's own checkpoint: step 3 onwards, --init_from ignored.
    seen.clear()
    summary = training.train(configuration.parse_config(
        flags + ["--model_path", str(target), "--init_from", source, "--restore", "True",
                 "--iteration", "4"]))
    assert seen["iterations"] == 3 and summary["steps"] == 4
    assert any(np.any(got != want) for got, want in zip(seen["weights"], expected))
    resumed = json.loads((target / "config.json").read_text())
    assert resumed["model"]["init_from"] == saved["model"]["init_from"]


def test_init_from_a_model_of_another_shape_is_refused(tmp_path_factory, tmp_path, capsys):
    flags = trained(tmp_path_factory)
    source = _flag(flags, "--model_path")
    target = tmp_path / "other"
    assert main.main(flags + ["--model_path", str(target), "--init_from", source,
                              "--hidden", "12", "--iteration", "1"]) == 2
    error = capsys.readouterr().err.strip()
    assert error == (f"error: --init_from {source}: its hidden=16 differs from this run's "
                     f"--hidden 12")
    assert not target.exists()


def test_init_from_needs_a_trained_model_folder(tmp_path_factory, tmp_path, capsys):
    flags = trained(tmp_path_factory)
    assert main.main(flags + ["--model_path", str(tmp_path / "m"), "--init_from",
                              str(tmp_path / "nothing"), "--iteration", "1"]) == 2
    assert "no config.json" in capsys.readouterr().err
    source = _flag(flags, "--model_path")
    assert main.main(flags + ["--init_from", source, "--model_path", source,
                              "--iteration", "1"]) == 2
    assert "is --model_path itself" in capsys.readouterr().err


def test_a_text_independent_model_may_start_a_text_dependent_run(tmp_path_factory, tmp_path):
    flags = trained(tmp_path_factory)
    source = Path(_flag(flags, "--model_path"))
    td = configuration.parse_config(flags + ["--model_path", str(tmp_path / "td"), "--tdsv",
                                             "True", "--tdsv_frame", "120",
                                             "--init_from", str(source)])
    checkpoint, front, _ = training.warm_start(td.init_from, td.model_path, td.features,
                                               td.network, td.explicit)
    assert checkpoint == tf.train.latest_checkpoint(source / "checkpoints")
    assert front.tdsv and front.tdsv_frame == 120  # what it reads is this run's
    other_features = configuration.parse_config(flags + ["--model_path", str(tmp_path / "m"),
                                                         "--n_mels", "32",
                                                         "--init_from", str(source)])
    try:
        training.warm_start(other_features.init_from, other_features.model_path,
                            other_features.features, other_features.network,
                            other_features.explicit)
    except ValueError as error:
        assert "n_mels=40 differs" in str(error)
    else:
        raise AssertionError("a model of other features was accepted")


def test_init_from_takes_the_shape_of_the_model_it_starts_from(tmp_path_factory, tmp_path):
    flags = trained(tmp_path_factory)
    source = tmp_path / "source"
    shutil.copytree(_flag(flags, "--model_path"), source)
    saved = json.loads((source / "config.json").read_text())
    saved["network"]["mean_norm"] = True
    (source / "config.json").write_text(json.dumps(saved))
    shape = ("--hidden", "--proj", "--num_layer")
    untyped = [f for i, f in enumerate(flags) if f not in shape and flags[i - 1] not in shape]
    config = configuration.parse_config(untyped + ["--model_path", str(tmp_path / "m"),
                                                   "--init_from", str(source)])
    assert (config.hidden, config.proj, config.num_layer, config.mean_norm) == (128, 64, 3, False)
    _, front, network = training.warm_start(config.init_from, config.model_path,
                                            config.features, config.network, config.explicit)
    assert (network.hidden, network.proj, network.num_layer, network.mean_norm) == (16, 8, 1, True)
    assert front == config.features
