"""perf profile of the GE2E training step: what the time goes to besides GEMM arithmetic.

    python tests/benchmarks/profile_training.py [--steps_small 40] [--steps_large 4]

Builds bench_speed.py's training step (3x LSTMP 128/64, GE2E softmax, T=160) at N=4 M=5 and
N=64 M=10, warms it up, then samples only the timed steps with Linux `perf record -p` and groups
the samples by what they are. Writes Results/profile_training.txt. Needs `perf` on the PATH.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import configuration  # noqa: E402
import model  # noqa: E402
import training  # noqa: E402

T = 160
# TF's MatMul is an Eigen contraction whose inner kernel is oneDNN's JIT-compiled sgemm (every
# oneDNN call in a step is gemm_api, by ONEDNN_VERBOSE); Eigen packs the operand blocks for it.
# XLA's fused gate ops are JIT code too: perf cannot tell the two apart.
GROUPS = (
    ("JIT code: oneDNN sgemm + XLA-fused gates", lambda dso, sym: dso.startswith("[JIT]")
     or "dnnl::" in sym),
    ("GEMM operand packing (Eigen gemm_pack)", lambda dso, sym: "gemm_pack" in sym),
    ("elementwise ops and reductions (Eigen TensorExecutor)",
     lambda dso, sym: dso.startswith("libtensorflow_cc") and "Eigen::" in sym),
    ("TF executor, op dispatch, thread pool", lambda dso, sym: dso.startswith("libtensorflow")),
    ("malloc / free / memcpy (libc)", lambda dso, sym: dso.startswith("libc")),
    ("Linux kernel (scheduling, page faults)", lambda dso, sym: dso.startswith("[kernel")),
    ("Python interpreter", lambda dso, sym: dso.startswith("libpython")),
)


def group_samples(report: str) -> Counter:
    """Percent of samples per group, from `perf report --sort dso,sym --stdio`."""
    shares = Counter()
    for line in report.splitlines():
        match = re.match(r"\s+([\d.]+)%\s+(\[JIT\] tid \d+|\S+)\s+\[.\]\s+(.*)", line)
        if not match:
            continue
        percent, dso, sym = float(match[1]), match[2], match[3]
        name = next((name for name, test in GROUPS if test(dso, sym)), "other")
        shares[name] += percent
    return shares


def profile_step(n: int, m: int, steps: int, scratch: Path) -> tuple[float, Counter]:
    """ms per step and grouped perf shares of `steps` warmed-up GE2E training steps."""
    config = configuration.parse_config(["--N", str(n), "--M", str(m)])
    x = np.random.default_rng(0).standard_normal((n * m, T, config.n_mels)).astype(np.float32)
    features = tf.constant(x)
    encoder, scale = model.build_model(config.network, config.n_mels)
    step = training.make_train_step(encoder, scale, training.build_optimizer(config.training),
                                    config.training, config.n_mels)
    for _ in range(2):
        float(step(features)[0])
    data = scratch / f"n{n}.data"
    perf = subprocess.Popen(["perf", "record", "-F", "499", "-p", str(os.getpid()), "-o",
                             str(data)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # perf attaches asynchronously
    started = time.perf_counter()
    for _ in range(steps):
        float(step(features)[0])
    ms = (time.perf_counter() - started) / steps * 1000
    perf.send_signal(signal.SIGINT)
    perf.wait()
    if not data.exists():
        raise SystemExit(f"profile_training.py: perf record wrote nothing (exit {perf.returncode});"
                         " is sampling allowed? see /proc/sys/kernel/perf_event_paranoid")
    report = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--sort",
                             "dso,sym", "--stdio", "--percent-limit", "0"],
                            capture_output=True, text=True, check=True).stdout
    return ms, group_samples(report)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps_small", type=int, default=40, help="timed steps at N=4 M=5")
    parser.add_argument("--steps_large", type=int, default=4, help="timed steps at N=64 M=10")
    parser.add_argument("--out", default=str(ROOT / "Results" / "profile_training.txt"))
    args = parser.parse_args(argv)
    if shutil.which("perf") is None:
        print("profile_training.py: needs Linux perf on the PATH (e.g. apt install linux-perf)")
        return 2
    load = os.getloadavg()
    columns = []
    with tempfile.TemporaryDirectory() as scratch:
        for n, m, steps in ((4, 5, args.steps_small), (64, 10, args.steps_large)):
            ms, shares = profile_step(n, m, steps, Path(scratch))
            columns.append((f"N={n} M={m}", ms, shares))
    names = [name for name, _ in GROUPS] + ["other"]
    lines = [f"# perf profile of the GE2E training step (3x LSTMP 128/64, T={T}, forward + backward"
             " + update), samples of the timed steps only",
             f"# python tests/benchmarks/profile_training.py; TF {tf.__version__}, "
             f"{os.cpu_count()} cores, load average before {load[0]:.2f}",
             "",
             f"{'share of CPU samples':56s}" + "".join(f"{label:>14s}" for label, _, _ in columns),
             f"{'ms per step (while sampled)':56s}" + "".join(f"{ms:14.0f}" for _, ms, _ in columns)]
    lines += [f"{name:56s}" + "".join(f"{shares[name]:13.1f}%" for _, _, shares in columns)
              for name in names]
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
