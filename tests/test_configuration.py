"""Configuration as data: the sections of the command line, config.json in sections, and the flat
config.json files of earlier versions (the ready model's among them) still loading."""

import json
from dataclasses import asdict, fields

import pytest
from conftest import REPO

import configuration
from configuration import Evaluation, Features, Network, Preprocessing, Training


def test_sections_hold_the_command_line_and_the_defaults():
    parsed = configuration.parse_config([])
    assert (parsed.features, parsed.network, parsed.training, parsed.evaluation, parsed.data) == (
        Features(), Network(), Training(), Evaluation(), Preprocessing())
    typed = configuration.parse_config(["--hop", "0.02", "--lstmp", "reference", "--lr", "0.1",
                                        "--snr_db", "1", "2", "--draws", "3", "--seed", "7",
                                        "--speed_perturb", "0.9"])
    assert typed.features.hop == 0.02 and typed.features.hop_samples == 320
    assert typed.network.lstmp == "reference"
    assert typed.training.lr == 0.1 and typed.training.snr_db == (1.0, 2.0)
    assert typed.evaluation.draws == 3 and typed.data.speed_perturb == (0.9,)
    assert typed.training.seed == typed.evaluation.seed == typed.data.seed == 7
    flags = {action.dest for action in configuration.build_parser()._actions}
    for section in configuration.SECTIONS.values():
        assert {f.name for f in fields(section)} <= flags


def test_what_a_saved_config_fixes_is_what_earlier_versions_fixed():
    # The hand-written key lists of earlier versions, now derived from the sections, plus the
    # fields added since (mean_norm, short_crops).
    assert set(configuration.fixed_fields(Features, "weights", "input")) == {
        "tdsv", "sr", "nfft", "window", "hop", "n_mels", "tdsv_frame"}
    assert set(configuration.fixed_fields(Network, "weights")) == {"hidden", "proj", "num_layer",
                                                                "mean_norm"}
    assert set(configuration.fixed_fields(Features, "weights")) == {
        "sr", "nfft", "window", "hop", "n_mels"}
    assert set(configuration.fixed_fields(Training, "resume")) == {
        "optim", "lr", "lr_decay_every", "beta1", "beta2", "clip_norm", "loss", "N", "M",
        "seed", "tisv_frame", "tisv_frame_min", "snr_db", "source_weights", "spec_augment",
        "short_crops"}


def test_a_flat_config_of_an_earlier_version_loads():
    # tests/flat_config.json: an earlier ready model's config.json, written as one flat object.
    saved = configuration.load_config(REPO / "tests" / "flat_config.json")
    flat = json.loads((REPO / "tests" / "flat_config.json").read_text())
    assert "features" not in flat  # written by an earlier version: one flat object
    assert saved["features"]["min_frames"] == 40 and saved["training"]["optim"] == "adam"
    assert saved["training"]["source_weights"] == [2.0, 2.0, 1.0]
    assert saved["model"]["model_path"] == "pretrained"
    front = configuration.from_saved(Features(), saved, ())
    # The shape comes from the model; --min_frames and the other run-time choices do not.
    assert front == Features(min_frames=Features.min_frames)
    resumed = configuration.from_saved(Training(), saved, (), ("resume",))
    assert (resumed.lr, resumed.N, resumed.M, resumed.source_weights) == (1e-3, 16, 10,
                                                                          (2.0, 2.0, 1.0))
    assert resumed.iteration == Training.iteration


def test_a_flat_config_written_by_hand_loads(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"hidden": 32, "proj": 16, "n_mels": 20, "lr": 0.5,
                                "spec_augment": [2, 3], "model_path": "m", "verify": "x"}))
    saved = configuration.load_config(path)
    assert saved["network"] == {"hidden": 32, "proj": 16}
    assert saved["model"] == {"model_path": "m"}
    network = configuration.from_saved(Network(lstmp="reference"), saved, ())
    assert network == Network(hidden=32, proj=16, lstmp="reference")
    assert configuration.from_saved(Features(), saved, ()) == Features(n_mels=20)
    # A typed flag that agrees with the saved value is no conflict.
    resumed = configuration.from_saved(Training(lr=0.5), saved, ("lr",), ("resume",))
    assert (resumed.lr, resumed.spec_augment) == (0.5, (2, 3))
    with pytest.raises(ValueError) as error:
        configuration.from_saved(Network(hidden=64), saved, ("hidden",))
    assert str(error.value) == ("--hidden 64 conflicts with the model's saved config "
                                "(hidden=32); drop the flag or use another --model_path")
    with pytest.raises(ValueError, match=r"--spec_augment \[1, 1\] conflicts"):
        configuration.from_saved(Training(spec_augment=(1, 1)), saved, ("spec_augment",),
                                 ("resume",))


def test_config_json_is_written_in_sections(tmp_path):
    parsed = configuration.parse_config(["--train_path", "a,b"])
    path = tmp_path / "config.json"
    configuration.save_config(path, Features(n_mels=20), Network(hidden=8), Training(lr=0.5),
                              parsed.evaluation, parsed.data,
                              {"model_path": "runs/m", "init_from": "/src", "comment": "c"})
    written = json.loads(path.read_text())
    assert set(written) == {"features", "network", "training", "evaluation", "data", "model"}
    assert written["features"] == asdict(Features(n_mels=20))
    assert written["data"]["train_path"] == "a,b"
    assert written["model"] == {"model_path": "runs/m", "init_from": "/src", "comment": "c"}
    saved = configuration.load_config(path)
    assert configuration.from_saved(Network(), saved, ()) == Network(hidden=8)
    assert configuration.from_saved(Training(), saved, (), ("resume",)).lr == 0.5
