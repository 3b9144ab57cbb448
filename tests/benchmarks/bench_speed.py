"""Speed benchmark of the project's model and features, against a PyTorch nn.LSTM(proj_size) peer.

    python tests/benchmarks/bench_speed.py [--quick] [--threads K] [--files N]

Measures whatever model.py / data_preprocess.py implement, through their public API:
  1. GE2E training step (N=4,M=5 and N=64,M=10; T=160): median ms/step, utterances/s, vs the peer
  2. embedding d-vectors/s at batch 1 and batch 256 (T=160, no grad), vs the peer
  3. achieved GFLOP/s of our training step as a fraction of a numpy float32 2048^3 GEMM
  4. feature extraction seconds per hour of audio (project path vs the original librosa recipe)
  5. wav -> utterance d-vector, times real time (the path of main.py --embed)
and writes Results/benchmark_speed.json. The peer (pip install -r tests/benchmarks/requirements.txt)
is optional: without torch its rows say "skipped". Every ratio compares runs made in this process,
called in turn (ours, peer, ours, ...) so that a slow spell of the machine hits both alike. The
load average before and after is recorded because the machine may be shared (an oversubscribed
CPU hurts the peer's OpenMP threads much more than TensorFlow's).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# torch's OpenMP threads spin while waiting; on a shared (oversubscribed) CPU that makes the peer
# 10-100x slower than it really is. Passive waiting keeps the comparison fair.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import tensorflow as tf  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

import configuration  # noqa: E402
import data_preprocess  # noqa: E402
import model  # noqa: E402

T = 160
DATA = ROOT.parent / "shared" / "data" / "speechocean762"


def load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def interleaved_ms(fns: dict, steps: int, warmup: int, budget: float = 60.0,
                   block: int = 1) -> dict:
    """Median wall time (ms) of `steps` calls of each of fns, taken in turn `block` calls at a
    time, so that a slow spell of a shared machine hits all of them alike (a block of several
    short calls keeps each warm in the caches); stops early past budget seconds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict = {name: [] for name in fns}
    deadline = time.perf_counter() + budget
    for round_ in range(0, steps, block):
        if round_ and time.perf_counter() > deadline:
            break
        for name, fn in fns.items():
            for _ in range(block):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: 1000.0 * statistics.median(t) for name, t in times.items()}


def macs_per_frame(n_mels: int, hidden: int, proj: int, layers: int) -> int:
    total, inputs = 0, n_mels
    for _ in range(layers):
        total += 4 * hidden * (inputs + proj) + hidden * proj
        inputs = proj
    return total


def numpy_peak_gflops(reps: int) -> float:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2048, 2048), dtype=np.float32)
    b = rng.standard_normal((2048, 2048), dtype=np.float32)
    a @ b

    def seconds() -> float:
        start = time.perf_counter()
        a @ b
        return time.perf_counter() - start

    best = min(seconds() for _ in range(reps))
    return 2 * 2048 ** 3 / best / 1e9


# ----------------------------------------------------------------------------- PyTorch peer
def torch_module():
    try:
        import torch
    except ImportError:
        return None
    return torch


def peer_train_step(torch, config, n: int, m: int, x: np.ndarray):
    net = torch.nn.LSTM(config.n_mels, config.hidden, num_layers=config.num_layer,
                        proj_size=config.proj, batch_first=True)
    w = torch.nn.Parameter(torch.tensor(10.0))
    b = torch.nn.Parameter(torch.tensor(-5.0))
    params = list(net.parameters()) + [w, b]
    optimizer = torch.optim.SGD(params, lr=config.lr)
    features = torch.from_numpy(x)
    own = torch.eye(n, dtype=torch.bool)[:, None, :]
    normalize = torch.nn.functional.normalize

    def step():
        optimizer.zero_grad()
        out, _ = net(features)
        e = normalize(out[:, -1], dim=-1, eps=1e-12).view(n, m, -1)
        centroid = normalize(e.mean(1), dim=-1, eps=1e-12)
        exclusive = normalize((e.sum(1, keepdim=True) - e) / (m - 1), dim=-1, eps=1e-12)
        cos = torch.where(own, (e * exclusive).sum(-1)[:, :, None],
                          torch.einsum("jip,kp->jik", e, centroid))
        s = w.abs() * cos + b
        loss = (torch.logsumexp(s, -1) - (s * own).sum(-1)).sum()
        loss.backward()
        w.grad *= 0.01
        b.grad *= 0.01
        torch.nn.utils.clip_grad_norm_(params, config.clip_norm)
        optimizer.step()
        return loss.item()

    return step


def peer_embedder(torch, config):
    net = torch.nn.LSTM(config.n_mels, config.hidden, num_layers=config.num_layer,
                        proj_size=config.proj, batch_first=True).eval()

    def embed(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out, _ = net(torch.from_numpy(x))
            return torch.nn.functional.normalize(out[:, -1], dim=-1).numpy()

    return embed


# ----------------------------------------------------------------------------- sections
def bench_training(config_args, torch, quick: bool, peak: float, rows: list, result: dict):
    result["training"] = []
    for n, m, steps in ((4, 5, 5 if quick else 15), (64, 10, 2 if quick else 5)):
        config = configuration.parse_config(config_args + ["--N", str(n), "--M", str(m)])
        x = np.random.default_rng(0).standard_normal((n * m, T, config.n_mels)).astype(np.float32)
        encoder, scale = model.build_model(config)
        optimizer = model.build_optimizer(config)
        step = model.make_train_step(encoder, scale, optimizer, config)
        features = tf.constant(x)
        fns = {"ours": lambda s=step, f=features: float(s(f)[0])}
        if torch is not None:
            fns["peer"] = peer_train_step(torch, config, n, m, x)
        timed = interleaved_ms(fns, steps, warmup=1 if quick else 2,
                               budget=40 if quick else 240)
        ms = timed["ours"]
        flops = 3 * 2 * macs_per_frame(config.n_mels, config.hidden, config.proj,
                                       config.num_layer) * n * m * T
        entry = {"N": n, "M": m, "T": T, "ours_ms_per_step": round(ms, 1),
                 "ours_utterances_per_s": round(n * m / ms * 1000, 1),
                 "ours_gflops": round(flops / ms / 1e6, 1),
                 "fraction_of_numpy_peak": round(flops / ms / 1e6 / peak, 3)}
        if torch is not None:
            peer_ms = timed["peer"]
            entry.update(peer_ms_per_step=round(peer_ms, 1),
                         peer_utterances_per_s=round(n * m / peer_ms * 1000, 1),
                         speedup_vs_peer=round(peer_ms / ms, 2))
        result["training"].append(entry)
        rows.append((f"train step N={n} M={m} T={T} (utt/s)", entry["ours_utterances_per_s"],
                     entry.get("peer_utterances_per_s", "skipped"),
                     entry.get("speedup_vs_peer")))
        rows.append((f"  ms/step; our GFLOP/s {entry['ours_gflops']} "
                     f"= {entry['fraction_of_numpy_peak']:.0%} of numpy peak", round(ms, 1),
                     entry.get("peer_ms_per_step"), None))


def bench_embedding(config_args, torch, quick: bool, rows: list, result: dict):
    config = configuration.parse_config(config_args)
    encoder, _ = model.build_model(config)
    embed = model.make_embedder(encoder, config.n_mels, config.window_frames)
    peer = peer_embedder(torch, config) if torch is not None else None
    result["embedding"] = []
    for batch, steps in ((1, 20 if quick else 100), (256, 3 if quick else 10)):
        x = np.random.default_rng(1).standard_normal((batch, T, config.n_mels)).astype(np.float32)
        fns = {"ours": lambda x=x: np.asarray(embed(x))}
        if peer is not None:
            fns["peer"] = lambda x=x: peer(x)
        timed = interleaved_ms(fns, steps, warmup=3, block=10 if batch == 1 else 1)
        ms = timed["ours"]
        entry = {"batch": batch, "T": T, "ours_ms_per_call": round(ms, 2),
                 "ours_dvectors_per_s": round(batch / ms * 1000, 1)}
        if peer is not None:
            peer_ms = timed["peer"]
            entry.update(peer_ms_per_call=round(peer_ms, 2),
                         peer_dvectors_per_s=round(batch / peer_ms * 1000, 1),
                         speedup_vs_peer=round(peer_ms / ms, 2))
        result["embedding"].append(entry)
        rows.append((f"embed batch {batch} T={T} (d-vectors/s)", entry["ours_dvectors_per_s"],
                     entry.get("peer_dvectors_per_s", "skipped"),
                     entry.get("speedup_vs_peer")))
        if batch == 1:
            rows.append(("  batch-1 latency (ms)", entry["ours_ms_per_call"],
                         entry.get("peer_ms_per_call"), None))


def sample_files(root: Path, count: int) -> list[Path]:
    files = sorted(root.rglob("*.flac")) + sorted(root.rglob("*.wav"))
    if not files:
        return []
    step = max(1, len(files) // count)
    return files[::step][:count]


def bench_features(config_args, files: list[Path], rows: list, result: dict):
    import librosa
    config = configuration.parse_config(config_args)
    # As preprocessing's workers and files_inference_features run; the recipe gets it too.
    data_preprocess._keep_freed_memory()
    # warm up librosa/numba (first call compiles) on both paths before timing
    warm = data_preprocess.load_audio(files[0], config.sr)
    data_preprocess.voiced_features(warm, config)
    librosa.load(files[0], sr=16000)
    basis = librosa.filters.mel(sr=16000, n_fft=512, n_mels=40)

    def recipe(path):
        wav, _ = librosa.load(path, sr=16000)
        spec = np.abs(librosa.core.stft(wav, n_fft=512, win_length=400, hop_length=160)) ** 2
        return np.log10(basis @ spec + 1e-6)

    def one_blas_thread(function):
        # Both paths at their best: OpenBLAS threads slow the recipe's mel matmul down too.
        def run():
            with threadpool_limits(limits=1, user_api="blas"):
                function()
        return run

    def project(path):
        try:
            data_preprocess.voiced_features(data_preprocess.load_audio(path, config.sr), config)
        except data_preprocess.AudioError:  # too short / silent files still cost their time
            pass

    hours = sum(sf.info(str(f)).duration for f in files) / 3600.0
    timed = interleaved_ms({
        "recipe": one_blas_thread(lambda: [recipe(f) for f in files]),
        "ours": one_blas_thread(lambda: [project(f) for f in files]),
        "ours_threads": lambda: data_preprocess.files_inference_features(files, config)},
        steps=5, warmup=0, budget=240)
    timings = {name: ms / 1000.0 / hours for name, ms in timed.items()}
    result["features"] = {
        "files": len(files), "audio_seconds": round(hours * 3600, 1),
        "ours_s_per_audio_hour": round(timings["ours"], 2),
        "ours_threads_s_per_audio_hour": round(timings["ours_threads"], 2),
        "threads": os.cpu_count(), "blas_threads": 1,
        "recipe_s_per_audio_hour": round(timings["recipe"], 2),
        "speedup_vs_recipe": round(timings["recipe"] / timings["ours"], 2),
        "speedup_threads_vs_recipe": round(timings["recipe"] / timings["ours_threads"], 2)}
    rows.append(("features: s per audio hour, one thread (lower=better)",
                 result["features"]["ours_s_per_audio_hour"],
                 result["features"]["recipe_s_per_audio_hour"],
                 result["features"]["speedup_vs_recipe"]))
    rows.append((f"features: s per audio hour, {os.cpu_count()} threads",
                 result["features"]["ours_threads_s_per_audio_hour"],
                 result["features"]["recipe_s_per_audio_hour"],
                 result["features"]["speedup_threads_vs_recipe"]))


def bench_pipeline(config_args, files: list[Path], rows: list, result: dict):
    """The path of `main.py --embed`: threaded features, then windowed d-vectors."""
    config = configuration.parse_config(config_args)
    encoder, _ = model.build_model(config)
    embed = model.make_embedder(encoder, config.n_mels, config.window_frames)
    for size in model.EMBED_BUCKETS:  # compile every bucket and the padded path first
        embed(np.zeros((size, config.window_frames, config.n_mels), np.float32))
    embed(np.zeros((2, 10, config.n_mels), np.float32), np.array([10, 5]))
    seconds = sum(sf.info(str(f)).duration for f in files)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        features = [f for f in data_preprocess.files_inference_features(files, config)
                    if not isinstance(f, data_preprocess.AudioError)]
        vectors = model.utterance_d_vectors(embed, features, config.window_frames)
        times.append(time.perf_counter() - start)
    elapsed = statistics.median(times)
    result["pipeline"] = {"files": len(files), "utterances": int(len(vectors)),
                          "audio_seconds": round(seconds, 1), "seconds": round(elapsed, 2),
                          "times_real_time": round(seconds / elapsed, 1)}
    rows.append(("wav -> utterance d-vector, x real time (higher=better)",
                 result["pipeline"]["times_real_time"], None, None))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and files (~2 min)")
    parser.add_argument("--files", type=int, default=0, help="audio files (default 200, quick 40)")
    parser.add_argument("--threads", type=int, default=0,
                        help="threads for TF (intra-op) and torch; 0 = library defaults")
    parser.add_argument("--audio", default=str(DATA),
                        help="folder of .flac/.wav files for the feature and pipeline rows")
    parser.add_argument("--out", default=str(ROOT / "Results" / "benchmark_speed.json"))
    args = parser.parse_args(argv)
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    torch = torch_module()
    if torch is not None and args.threads:
        torch.set_num_threads(args.threads)
    tf.random.set_seed(0)
    config_args: list[str] = []
    started = time.perf_counter()
    result = {"machine": {"cores": os.cpu_count(), "platform": platform.platform(),
                          "processor": platform.processor(), "python": platform.python_version(),
                          "tensorflow": tf.__version__, "numpy": np.__version__,
                          "torch": getattr(torch, "__version__", None),
                          "threads": args.threads or "default",
                          "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                          "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default (on)"),
                          "load_before": load()},
              "quick": args.quick}
    if torch is None:
        print("PyTorch not installed: the peer was skipped "
              "(pip install -r tests/benchmarks/requirements.txt)")
    rows: list[tuple] = []
    peak = numpy_peak_gflops(3)
    result["numpy_peak_gflops"] = round(peak, 1)
    bench_training(config_args, torch, args.quick, peak, rows, result)
    bench_embedding(config_args, torch, args.quick, rows, result)
    files = sample_files(Path(args.audio), args.files or (40 if args.quick else 200))
    if files:
        bench_features(config_args, files, rows, result)
        bench_pipeline(config_args, files, rows, result)
    else:
        print(f"no audio under {args.audio}: feature and pipeline rows skipped")
    result["machine"]["load_after"] = load()
    result["seconds"] = round(time.perf_counter() - started, 1)

    def cell(value):
        return value if isinstance(value, str) else f"{value:g}"

    print(f"\nnumpy float32 2048^3 GEMM peak: {peak:.1f} GFLOP/s; cores {os.cpu_count()}; "
          f"load {result['machine']['load_before']} -> {result['machine']['load_after']}")
    if result["machine"]["load_before"] and max(result["machine"]["load_before"][0],
                                                 result["machine"]["load_after"][0]) > \
            (os.cpu_count() or 1):
        print("WARNING: the CPU was oversubscribed during the run; timings (the peer's "
              "especially) are unreliable")
    print(f"{'measure':58s} {'ours':>10s} {'peer':>10s} {'ratio':>7s}   (peer: PyTorch nn.LSTM; "
          "features: original librosa recipe)")
    for name, ours, peer, ratio in rows:
        peer_text = "" if peer is None else cell(peer)
        print(f"{name:58s} {cell(ours):>10s} {peer_text:>10s} "
              f"{('' if ratio is None else f'{ratio:.2f}x'):>7s}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
