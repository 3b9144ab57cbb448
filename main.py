"""Entry point: `python main.py --train True` trains, `python main.py --train False` tests;
--enroll/--verify/--identify/--embed/--export use a trained model; --summarize averages tests."""

from __future__ import annotations

import sys

import configuration


def main(argv: list[str] | None = None) -> int:
    config = configuration.parse_config(argv)
    # TensorFlow loads only after the flags are known to be valid.
    import tensorflow as tf

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
