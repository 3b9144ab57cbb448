"""Entry point: `python main.py --train True` trains, `python main.py --train False` tests."""

from __future__ import annotations

import sys

import configuration


def main(argv: list[str] | None = None) -> int:
    config = configuration.parse_config(argv)
    # TensorFlow loads only after the flags are known to be valid.
    import evaluation
    import model

    try:
        if config.train:
            model.train(config)
        else:
            evaluation.test(config)
    except (ValueError, FileNotFoundError, FloatingPointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
