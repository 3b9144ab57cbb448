"""tf.distribute workers for the scale tests and benchmark.

As a script, `python distributed_worker.py OUT CPUS FLAGS...` is one worker: it trains with
model.train (TF_CONFIG from the environment) and writes its losses and time to OUT.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKER = str(Path(__file__).resolve())
sys.path.insert(0, str(REPO))


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def run_workers(out_dir: Path, flags: list[str], workers: int, cpus: int = 1) -> list[dict]:
    """model.train in `workers` processes (MultiWorkerMirroredStrategy on loopback if > 1);
    each worker's {"losses", "steps", "seconds"}."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(workers)]}
    run = len(list(out_dir.glob("worker*")))
    processes, outs = [], []
    for index in range(workers):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
        if workers > 1:
            env["TF_CONFIG"] = json.dumps({"cluster": cluster,
                                           "task": {"type": "worker", "index": index}})
        outs.append(out_dir / f"worker{index}-{run}.json")
        processes.append(subprocess.Popen(
            [sys.executable, WORKER, str(outs[-1]), str(cpus), *flags], cwd=REPO, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for process in processes:
        output, _ = process.communicate(timeout=1800)
        if process.returncode != 0:
            raise RuntimeError(f"worker failed:\n{output[-3000:]}")
    return [json.loads(out.read_text()) for out in outs]


def run(out: str, cpus: int, flags: list[str]) -> None:
    import tensorflow as tf

    if cpus > 1:  # several logical CPU devices, for MirroredStrategy on one machine
        tf.config.set_logical_device_configuration(
            tf.config.list_physical_devices("CPU")[0],
            [tf.config.LogicalDeviceConfiguration() for _ in range(cpus)])
    import configuration
    import training

    summary = training.train(configuration.parse_config(flags))
    Path(out).write_text(json.dumps({"losses": summary.get("losses", []),
                                     "steps": summary["steps"], "seconds": summary["seconds"]}))


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
