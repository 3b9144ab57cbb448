"""Entry point: `python main.py --train True` trains, `python main.py --train False` tests;
--enroll/--verify/--identify/--embed/--export use a trained model; --summarize averages tests."""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import types
from pathlib import Path

import configuration

READY_MODEL = Path(__file__).resolve().parent / "pretrained"
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


def uses_a_model(config: argparse.Namespace) -> bool:
    """Whether the command reads a trained model (everything but training and --summarize)."""
    return bool(config.enroll or config.verify or config.identify or config.embed
                or config.export or (not config.train and not config.summarize))


def choose_model(config: argparse.Namespace) -> None:
    """Without --model_path and without a model at its default path, use the ready model in
    pretrained/ (and say so)."""
    if ("model_path" in config.explicit or not uses_a_model(config)
            or (Path(config.model_path) / "config.json").exists()
            or not (READY_MODEL / "config.json").exists()):
        return
    config.model_path = str(READY_MODEL)
    print(f"using the ready model {READY_MODEL} (see its MODEL_CARD.md); no model trained at "
          f"--model_path {configuration.build_parser().get_default('model_path')}")


def main(argv: list[str] | None = None) -> int:
    config = configuration.parse_config(argv)
    choose_model(config)
    # TensorFlow loads only after the flags are known to be valid.
    tf = import_tensorflow()

    import evaluation
    import export
    import model
    import profiles

    try:
        if config.enroll:
            profiles.enroll(config)
        elif config.verify:
            profiles.verify(config)
        elif config.identify:
            profiles.identify(config)
        elif config.embed:
            profiles.embed_folder(config)
        elif config.export:
            export.export(config)
        elif config.summarize:
            evaluation.summarize(config.summarize)
        elif config.train:
            model.train(config)
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
