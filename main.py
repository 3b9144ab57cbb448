"""Entry point: `python main.py --train True` trains, `python main.py --train False` tests;
--enroll/--verify/--identify/--pairs/--embed/--export use a trained model (the ready model unless
--model_path names another); --cohort writes a model's AS-norm cohort; --summarize averages tests."""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import types
from pathlib import Path

import configuration
import ge2e
import profiles
import utils

# TensorFlow's C++ start-up lines that bypass TF_CPP_MIN_LOG_LEVEL (absl logs them before its
# level is read): info and warning records, the absl preamble, the CPU-feature guard's tail.
STARTUP_NOISE = re.compile(r"^([IW]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] |WARNING: All log "
                           r"messages before absl::InitializeLog|To enable the following "
                           r"instructions:)")


def import_tensorflow() -> types.ModuleType:
    """TensorFlow, imported without its C++ start-up logging (unless the user set
    TF_CPP_MIN_LOG_LEVEL); any other line it prints on stderr while loading is kept."""
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ:
        import tensorflow as tf
        return tf
    # 3, not 2: oneDNN reports its Eigen fallback for boolean ops at ERROR level at run time;
    # TensorFlow's real errors reach the user as Python exceptions.
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            import tensorflow as tf
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            kept = [line for line in sink.read().decode(errors="replace").splitlines()
                    if line.strip() and not STARTUP_NOISE.match(line)]
            if kept:
                print("\n".join(kept), file=sys.stderr)
    return tf


def model_line(config: argparse.Namespace) -> str:
    """The first line of a run: the model it uses, by the rule parse_config applied (none for
    --summarize)."""
    used = configuration.use_commands(config)
    if configuration.uses_the_ready_model(config):
        return (f"model: the ready model {utils.record_path(config.model_path)} (--{used[0]} "
                f"without --model_path; see its MODEL_CARD.md)")
    if config.summarize:
        return ""
    action = "training into" if config.train and not used else "model:"
    return f"{action} {config.model_path} (--model_path)"


def _fail(message: str) -> None:
    raise ValueError(message)


def check_model(path: Path, flag: str = "--model_path") -> None:
    """A trained model folder: config.json and a checkpoint state file."""
    ready = f"or use the ready model: --model_path {utils.record_path(configuration.READY_MODEL)}"
    if not (path / "config.json").is_file():
        _fail(f"{flag} {path}: no trained model there (no config.json); train one with python "
              f"main.py --train True --model_path {path}, {ready}")
    if not (path / "checkpoints" / "checkpoint").is_file():
        _fail(f"{flag} {path}: no checkpoint in {path / 'checkpoints'}; train it (python main.py "
              f"--train True --model_path {path}), {ready}")


def _check_record(folder: str, flag: str) -> None:
    if not (Path(folder) / "evaluation.json").is_file():
        _fail(f"{flag} {folder}: no evaluation.json there (expected the --results_path of a "
              f"`main.py --train False` run)")


def _check_folders(paths: str, flag: str, why: str) -> None:
    """Each folder of a comma- or plus-separated list exists."""
    for folder in re.split(r"[,+]", paths):
        if not Path(folder).is_dir():
            _fail(f"{flag} {folder}: no such folder ({why})")


def _check_profiles(config: argparse.Namespace) -> list[str]:
    """The profile names the command reads or writes are safe and, when read, enrolled; returns
    the probes it scores."""
    probes, names = config.audio, [config.verify] if config.verify else []
    if config.pairs:
        if not Path(config.pairs).is_file():
            _fail(f"--pairs {config.pairs}: no such file")
        pairs = profiles.read_pairs(config.pairs)
        names, probes = sorted({n for n, _ in pairs}), [p for _, p in pairs]
    for name in names + ([config.enroll] if config.enroll else []):
        ge2e.check_profile_name(name)
    folder = Path(config.model_path) / "profiles"
    for name in names:
        if not (folder / f"{name}.json").is_file():
            _fail(f"no profile {name!r} in {folder}; enroll it first (--enroll {name} --audio "
                  f"FILE ...)")
    if config.identify and not any(folder.glob("*.json")):
        _fail(f"no profiles in {folder}; enroll speakers first (--enroll NAME --audio FILE ...)")
    return probes


def check_inputs(config: argparse.Namespace) -> None:
    """Every path the command reads, checked before TensorFlow loads (a one-line error)."""
    for folder in config.summarize:
        _check_record(folder, "--summarize")
    if config.summarize:
        return
    if config.train and not configuration.use_commands(config):
        _check_folders(config.train_path, "--train_path", "run python data_preprocess.py first")
        if config.init_from:
            check_model(Path(config.init_from), "--init_from")
        if config.restore:
            check_model(Path(config.model_path))
        return
    check_model(Path(config.model_path))
    for member in filter(None, config.ensemble.split(",")):
        check_model(Path(member), "--ensemble")
    if config.threshold_from:
        _check_record(config.threshold_from, "--threshold_from")
    probes = _check_profiles(config)
    missing = [p for p in probes if not Path(p).is_file()]
    # One missing file fails an enrollment; a batch scores what it can and lists the rest.
    if missing and (config.enroll or len(missing) == len(probes)):
        _fail(f"{missing[0]}: no such audio file")
    if config.cohort:
        _check_folders(config.train_path, "--train_path",
                       "the preprocessed training speakers whose models form the cohort")
    if config.embed:
        if not config.out:
            _fail("--embed needs --out FILE.npz")
        if not Path(config.audio_path).is_dir():
            _fail(f"--audio_path {config.audio_path or '(empty)'}: not a folder")
        if not profiles.audio_files(Path(config.audio_path)):
            _fail(f"--audio_path {config.audio_path}: no audio files ({utils.AUDIO_TYPES})")
    if not config.train and not configuration.use_commands(config):
        _check_test(config)


def _check_test(config: argparse.Namespace) -> None:
    """--train False: the test split, or a readable trial list and the folder of its files."""
    if not config.trials:
        if not Path(config.test_path).is_dir():
            _fail(f"--test_path {config.test_path}: no such folder (run python "
                  f"data_preprocess.py first)")
        return
    if not Path(config.trials).is_file():
        _fail(f"--trials {config.trials}: no such file")
    utils.parse_trials(config.trials)
    if not Path(config.audio_path).is_dir():
        _fail(f"--trials needs --audio_path, the folder its paths are relative to (got "
              f"{config.audio_path or 'none'})")
    model_path = Path(config.model_path)
    if Path(config.results_path or model_path / "results").resolve() == model_path.resolve():
        _fail(f"--results_path {config.results_path} is --model_path: a --trials evaluation "
              f"would replace the model's operating threshold; choose another --results_path")


def main(argv: list[str] | None = None) -> int:
    config = configuration.parse_config(argv)
    said = model_line(config)
    if said:
        print(said)
    try:
        check_inputs(config)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # TensorFlow loads only after the flags and paths are known to be valid.
    tf = import_tensorflow()

    import evaluation
    import export
    import training

    try:
        if config.export:
            export.export(config)
        elif config.cohort:
            evaluation.write_cohort(config)
        elif configuration.use_commands(config):
            profiles.run(config)
        elif config.summarize:
            evaluation.summarize(config.summarize)
        elif config.train:
            training.train(config)
        else:
            evaluation.test(config)
    except (ValueError, OSError, FloatingPointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except tf.errors.OpError as error:
        # A missing or damaged checkpoint file surfaces from TensorFlow's reader; its message
        # names the file on the first line and then carries a long C++ trace.
        print(f"error: {error.message.splitlines()[0]} (a missing or damaged checkpoint? "
              f"restore from another one or retrain)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
