"""Speed benchmark of the project's model and features, against a PyTorch nn.LSTM(proj_size) peer.

    python tests/benchmarks/bench_speed.py [--quick] [--threads K] [--files N]

Measures whatever model.py / features.py implement, through their public API:
  1. the CPU (model, flags) and its GEMM peaks: float32 (numpy and tf.matmul) and bfloat16
     (tf.matmul, on CPUs with avx512_bf16 / amx_bf16), 2048^3 and one LSTMP time step's shape
  2. GE2E training step (N=4,M=5 and N=64,M=10; T=160) in --precision fp32 and bf16: median
     ms/step, utterances/s, GFLOP/s as a fraction of the matching GEMM peak, vs the peer
  3. embedding d-vectors/s at batch 1 and batch 256 (T=160, no grad), both precisions, vs the peer
  2-3 also time --lstmp reference (fp32; keras.layers.RNN, autodiff) beside the kernel, as a ratio
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
import features  # noqa: E402
import model  # noqa: E402
import training  # noqa: E402

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


def cpu_description() -> dict:
    """The CPU model and the flags that decide the matmul paths (from /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"model": platform.processor(), "flags": []}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
    flags = fields.get("flags", "").split()
    return {"model": fields.get("model name", platform.processor()),
            "family": fields.get("cpu family"), "model_number": fields.get("model"),
            "flags": [f for f in wanted if f in flags]}


def _best_seconds(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def numpy_peak_gflops(reps: int) -> float:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2048, 2048), dtype=np.float32)
    b = rng.standard_normal((2048, 2048), dtype=np.float32)
    return 2 * 2048 ** 3 / _best_seconds(lambda: a @ b, reps) / 1e9


def tf_gemm_gflops(dtype: tf.DType, rows: int, inner: int, cols: int, calls: int, reps: int
                   ) -> float:
    """GFLOP/s of `calls` chained rows x inner by inner x cols tf.matmuls in one tf.function
    (a time-step loop's GEMMs without its Python overhead)."""
    a = tf.cast(tf.random.normal((rows, inner)), dtype)
    w = tf.cast(tf.random.normal((inner, cols)), dtype)

    @tf.function
    def run():
        out = tf.zeros((rows, cols), dtype)
        for _ in tf.range(calls):
            # The dependence on the previous product keeps the calls in sequence, as in an RNN.
            out = tf.matmul(a + out[:, :1] * 0, w)
        return out[0, 0]

    return 2 * rows * inner * cols * calls / _best_seconds(lambda: run().numpy(), reps) / 1e9


def gemm_peaks(bf16: bool, reps: int) -> dict:
    """Float32 and bfloat16 GEMM rates of this CPU, 2048^3 and one N=64 M=10 LSTMP time step."""
    peaks = {"numpy_fp32_2048": numpy_peak_gflops(reps)}
    for name, dtype in (("fp32", tf.float32),) + ((("bf16", tf.bfloat16),) if bf16 else ()):
        peaks[f"tf_{name}_2048"] = tf_gemm_gflops(dtype, 2048, 2048, 2048, 1, reps)
        peaks[f"tf_{name}_640x192x512"] = tf_gemm_gflops(dtype, 640, 192, 512, 160, reps)
    return {k: round(v, 1) for k, v in peaks.items()}


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
def bench_training(config_args, torch, quick: bool, peaks: dict, precisions: list, rows: list,
                   result: dict):
    result["training"] = []
    for n, m, steps in ((4, 5, 5 if quick else 15), (64, 10, 2 if quick else 5)):
        x = np.random.default_rng(0).standard_normal((n * m, T, 40)).astype(np.float32)
        batch = tf.constant(x)
        fns = {}
        for precision in precisions:
            config = configuration.parse_config(config_args + ["--N", str(n), "--M", str(m),
                                                               "--precision", precision])
            encoder, scale = model.build_model(config.network, config.n_mels)
            optimizer = training.build_optimizer(config.training)
            step = training.make_train_step(encoder, scale, optimizer, config.training,
                                            config.n_mels)
            fns[precision] = lambda s=step, b=batch: float(s(b)[0])
        reference_config = configuration.parse_config(
            config_args + ["--N", str(n), "--M", str(m), "--lstmp", "reference"])
        encoder, scale = model.build_model(reference_config.network, reference_config.n_mels)
        step = training.make_train_step(
            encoder, scale, training.build_optimizer(reference_config.training),
            reference_config.training, reference_config.n_mels)
        fns["reference"] = lambda s=step, b=batch: float(s(b)[0])
        if torch is not None:
            fns["peer"] = peer_train_step(torch, config, n, m, x)
        # Training runs steps back to back: a block of short steps keeps each path warm in
        # the caches instead of timing it cold after the other's step.
        timed = interleaved_ms(fns, steps, warmup=1 if quick else 2,
                               budget=40 if quick else 300, block=5 if n * m <= 20 else 1)
        flops = 3 * 2 * macs_per_frame(config.n_mels, config.hidden, config.proj,
                                       config.num_layer) * n * m * T
        entry = {"N": n, "M": m, "T": T}
        for precision in precisions:
            ms = timed[precision]
            # The higher of the GEMM peaks measured in this run: numpy's may beat TensorFlow's.
            peak = max(v for k, v in peaks.items() if k.endswith(f"{precision}_2048"))
            entry[precision] = {"ms_per_step": round(ms, 1),
                                "utterances_per_s": round(n * m / ms * 1000, 1),
                                "gflops": round(flops / ms / 1e6, 1),
                                "fraction_of_peak": round(flops / ms / 1e6 / peak, 3)}
            rows.append((f"train N={n} M={m} {precision}: ms/step; {entry[precision]['gflops']} "
                         f"GFLOP/s = {entry[precision]['fraction_of_peak']:.0%} of {precision} "
                         f"peak", round(ms, 1), timed.get("peer"),
                         timed["peer"] / ms if "peer" in timed else None))
        entry["reference"] = {"ms_per_step": round(timed["reference"], 1),
                              "utterances_per_s": round(n * m / timed["reference"] * 1000, 1)}
        entry["reference_time_vs_kernel"] = round(timed["reference"] / timed["fp32"], 2)
        rows.append((f"train N={n} M={m} --lstmp reference fp32: ms/step",
                     round(timed["reference"], 1), None, None))
        rows.append((f"  reference / kernel step time, N={n} M={m}",
                     entry["reference_time_vs_kernel"], None, None))
        if "bf16" in entry:
            entry["bf16_speedup_vs_fp32"] = round(timed["fp32"] / timed["bf16"], 2)
            rows.append((f"  bf16 / fp32 speed, N={n} M={m}", entry["bf16_speedup_vs_fp32"],
                         None, None))
        if torch is not None:
            entry["peer"] = {"ms_per_step": round(timed["peer"], 1),
                             "utterances_per_s": round(n * m / timed["peer"] * 1000, 1)}
            entry["fp32_speedup_vs_peer"] = round(timed["peer"] / timed["fp32"], 2)
        result["training"].append(entry)


def bench_embedding(config_args, torch, quick: bool, precisions: list, rows: list,
                    result: dict):
    fns_of = {}
    for precision in precisions:
        config = configuration.parse_config(config_args + ["--precision", precision])
        encoder, _ = model.build_model(config.network, config.n_mels)
        fns_of[precision] = model.make_embedder(encoder, config.n_mels, config.window_frames)
    reference_config = configuration.parse_config(config_args + ["--lstmp", "reference"])
    encoder, _ = model.build_model(reference_config.network, reference_config.n_mels)
    fns_of["reference"] = model.make_embedder(encoder, config.n_mels, config.window_frames)
    peer = peer_embedder(torch, config) if torch is not None else None
    result["embedding"] = []
    for batch, steps in ((1, 20 if quick else 100), (256, 3 if quick else 10)):
        x = np.random.default_rng(1).standard_normal((batch, T, config.n_mels)).astype(np.float32)
        fns = {p: (lambda x=x, e=e: np.asarray(e(x))) for p, e in fns_of.items()}
        if peer is not None:
            fns["peer"] = lambda x=x: peer(x)
        timed = interleaved_ms(fns, steps, warmup=3, block=10 if batch == 1 else 1)
        entry = {"batch": batch, "T": T}
        for name, ms in timed.items():
            entry[name] = {"ms_per_call": round(ms, 2),
                           "dvectors_per_s": round(batch / ms * 1000, 1)}
        for name in fns_of:
            rows.append((f"embed batch {batch} T={T} {name}: d-vectors/s",
                         entry[name]["dvectors_per_s"],
                         entry["peer"]["dvectors_per_s"] if "peer" in entry else None,
                         timed["peer"] / timed[name] if "peer" in timed else None))
        entry["kernel_speedup_vs_reference"] = round(timed["reference"] / timed["fp32"], 2)
        rows.append((f"  kernel / reference d-vectors/s, batch {batch}",
                     entry["kernel_speedup_vs_reference"], None, None))
        result["embedding"].append(entry)


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
    features.keep_freed_memory()
    # warm up librosa/numba (first call compiles) on both paths before timing
    warm = features.load_audio(files[0], config.sr)
    features.voiced_features(warm, config.features)
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
            features.voiced_features(features.load_audio(path, config.sr), config.features)
        except features.AudioError:  # too short / silent files still cost their time
            pass

    hours = sum(sf.info(str(f)).duration for f in files) / 3600.0
    timed = interleaved_ms({
        "recipe": one_blas_thread(lambda: [recipe(f) for f in files]),
        "ours": one_blas_thread(lambda: [project(f) for f in files]),
        "ours_threads": lambda: features.files_inference_features(files, config.features)},
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
    encoder, _ = model.build_model(config.network, config.n_mels)
    embed = model.make_embedder(encoder, config.n_mels, config.window_frames)
    for size in model.EMBED_BUCKETS:  # compile every bucket and the padded path first
        embed(np.zeros((size, config.window_frames, config.n_mels), np.float32))
    embed(np.zeros((2, 10, config.n_mels), np.float32), np.array([10, 5]))
    seconds = sum(sf.info(str(f)).duration for f in files)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        frames = [f for f in features.files_inference_features(files, config.features)
                  if not isinstance(f, features.AudioError)]
        vectors = model.utterance_d_vectors(embed, frames, config.window_frames)
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
    bf16 = model.bf16_supported()
    precisions = ["fp32", "bf16"] if bf16 else ["fp32"]
    if not bf16:
        print("this CPU has no avx512_bf16 / amx_bf16: the bf16 rows were skipped")
    result["machine"]["cpu"] = cpu_description()
    peaks = gemm_peaks(bf16, 3)
    result["gemm_gflops"] = peaks
    bench_training(config_args, torch, args.quick, peaks, precisions, rows, result)
    bench_embedding(config_args, torch, args.quick, precisions, rows, result)
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

    cpu = result["machine"]["cpu"]
    print(f"\nCPU {cpu['model']} (family {cpu.get('family')} model {cpu.get('model_number')}; "
          f"{' '.join(cpu['flags'])}); cores {os.cpu_count()}; load "
          f"{result['machine']['load_before']} -> {result['machine']['load_after']}")
    print("GEMM GFLOP/s: " + ", ".join(f"{k} {v:g}" for k, v in peaks.items()))
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
