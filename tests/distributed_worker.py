"""One tf.distribute worker for test_scale.py: `python distributed_worker.py OUT CPUS FLAGS...`
trains with model.train (TF_CONFIG from the environment) and writes the losses to OUT."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(out: str, cpus: int, flags: list[str]) -> None:
    import tensorflow as tf

    if cpus > 1:  # several logical CPU devices, for MirroredStrategy on one machine
        tf.config.set_logical_device_configuration(
            tf.config.list_physical_devices("CPU")[0],
            [tf.config.LogicalDeviceConfiguration() for _ in range(cpus)])
    import configuration
    import model

    summary = model.train(configuration.parse_config(flags))
    Path(out).write_text(json.dumps({"losses": summary.get("losses", []),
                                     "steps": summary["steps"]}))


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
