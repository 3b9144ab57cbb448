"""Deployment benchmark: each --export format's size, one-thread latency per window and per
whole file, and the EER of all utterance pairs of a test split in each format.

    python tests/benchmarks/bench_deploy.py --model_path M --test_path T [--audio_path A]
        [--out Results/deploy/bench_deploy.json] [--rounds 200]

Exports the model of --model_path as a SavedModel, a float32 TFLite and an int8 TFLite model
(into a temporary folder), then measures
  1. file size of each format (the SavedModel folder's files summed),
  2. median latency of one window (the TFLite `serving_default` input: --window_frames frames of
     waveform; TD-SV: its buffer) on one thread, the formats called in turn so that a slow spell
     of a shared machine hits all alike: in-process (features.py front end +
     model.make_embedder, the path of --verify), the in-process embedder alone (log-mel given),
     the SavedModel, TFLite float32 and TFLite int8,
  3. per whole file of the test split (its recordings, read from the manifest's source folder or
     --audio_path; decoding not timed), the latency of waveform -> d-vector in each format, the
     formats called in turn on each file: in-process, the SavedModel, and the TFLite
     `utterance` signature (float32 and int8),
  4. the EER of all utterance pairs with each format's whole-file d-vectors, and their distance
     to the in-process ones,
and writes the JSON with the CPU (lscpu, /proc/cpuinfo), the load average and library versions.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

# One thread for every TensorFlow kernel: set before the first op runs.
tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)

from bench_speed import cpu_description, interleaved_ms, load  # noqa: E402

import configuration  # noqa: E402
import evaluation  # noqa: E402
import export  # noqa: E402
import features  # noqa: E402
import model  # noqa: E402
import utils  # noqa: E402

FORMATS = {"tflite_float32": ("tflite", "none"), "tflite_int8": ("tflite", "int8"),
           "savedmodel": ("savedmodel", "none")}


def cpu_model() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no lscpu)"
    fields = dict(line.split(":", 1) for line in lines.splitlines() if ":" in line)
    return f"{fields.get('Model name', '?').strip()} ({fields.get('CPU(s)', '?').strip()} CPUs)"


def size_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() \
        else path.stat().st_size


def export_all(argv: list[str], folder: Path) -> dict[str, Path]:
    """Each format exported with main.py's own code path; returns its file (or folder)."""
    paths = {}
    for name, (kind, quantize) in FORMATS.items():
        config = configuration.parse_config(argv + ["--export", str(folder / name), "--format",
                                                    kind, "--quantize", quantize])
        out = export.export(config)
        paths[name] = out / export.tflite_name(quantize) if kind == "tflite" else out
    return paths


def split_recordings(test_path: str, audio_path: str) -> dict[str, list[Path]]:
    """The recordings of each speaker of a preprocessed split."""
    manifest = json.loads((Path(test_path) / "manifest.json").read_text())
    root = Path(audio_path or manifest["source"])
    return {speaker: [root / p for p in json.loads(
        (Path(test_path) / f"{speaker}.json").read_text())["utterances"]]
        for speaker in manifest["speakers"]}


def pairs_eer(d_vectors: dict[str, np.ndarray], names: dict[str, list[str]]) -> dict:
    trials = evaluation.all_pairs_trials(names)
    labels = np.array([label for label, _, _ in trials])
    scores = np.array([float(d_vectors[a] @ d_vectors[b]) for _, a, b in trials])
    result = evaluation.metrics(scores, labels)
    return {"eer": result["eer"], "threshold": result["threshold"], "trials": len(trials),
            "targets": result["targets"]}


def relative(path: str | os.PathLike) -> str:
    """A path relative to the working directory even outside it ("../x"), so that the record
    does not name the machine it ran on."""
    return os.path.relpath(Path(path).resolve(), Path.cwd().resolve())


def window_latency(config, embed, serve, runners: dict, wav: np.ndarray, length: int,
                   rounds: int) -> dict:
    """Median ms of one window (the start of wav) in each format, called in turn."""
    window = np.pad(wav[:length], (0, max(0, length - len(wav))))
    n = np.array(min(len(wav), length), np.int32)
    # The encoder's own input: a full TI-SV window, or the TD-SV phrase.
    frames = (features.inference_features(window[:n], config) if config.tdsv
              else features.log_mel(window, config))
    batch = frames[None, :config.window_frames]
    calls = {
        "in_process": lambda: model.utterance_d_vectors(
            embed, [features.inference_features(window[:n], config)], config.window_frames),
        "in_process_embedder_only": lambda: embed(batch),
        "savedmodel": lambda: serve(waveform=tf.constant(window[:n]))["d_vector"].numpy(),
        **{name: (lambda run=run: run(waveform=window, num_samples=n))
           for name, run in runners.items()}}
    return interleaved_ms(calls, rounds, warmup=5, budget=240.0, block=5)


def whole_file_calls(config, embed, serve, runners: dict) -> dict:
    """Each format's waveform -> (d-vector, usable) of a whole recording."""
    def in_process(wav):
        try:
            frames = features.inference_features(wav, config)
        except features.AudioError:  # too little voiced audio
            return None, False
        return model.utterance_d_vectors(embed, [frames], config.window_frames)[0], True

    def savedmodel(wav):
        try:
            return serve(waveform=tf.constant(wav))["d_vector"].numpy(), True
        except tf.errors.InvalidArgumentError:  # its "too little voiced audio" assertion
            return None, False

    def tflite(run):
        def call(wav):
            out = run(waveform=wav)
            return out["d_vector"], bool(out["usable"])
        return call

    return {"in_process": in_process, "savedmodel": savedmodel,
            **{name: tflite(run) for name, run in runners.items()}}


def whole_files(calls: dict, waves: dict[str, np.ndarray], sr: int) -> tuple[dict, dict, dict]:
    """Every file through every format, the formats in turn on each file: the d-vectors, the
    per-file latency (ms: median, mean) and the files a format found unusable."""
    ordered = sorted(waves, key=lambda p: len(waves[p]))
    # Warm-up on short, median and long files: XLA buckets, TFLite tensor resizes, tracing.
    for path in ordered[:3] + ordered[len(ordered) // 2:len(ordered) // 2 + 3] + ordered[-3:]:
        for call in calls.values():
            call(waves[path])
    vectors = {name: {} for name in calls}
    seconds = {name: [] for name in calls}
    unusable = {name: [] for name in calls}
    for path, wav in waves.items():
        for name, call in calls.items():
            start = time.perf_counter()
            d_vector, usable = call(wav)
            seconds[name].append(time.perf_counter() - start)
            if usable:
                vectors[name][path] = np.asarray(d_vector, np.float32)
            else:
                unusable[name].append(relative(path))
    lengths = np.array([len(w) / sr for w in waves.values()])
    latency = {name: {"median": 1000.0 * float(np.median(t)), "mean": 1000.0 * float(np.mean(t)),
                      "ms_per_audio_second": 1000.0 * float(np.sum(t) / lengths.sum())}
               for name, t in seconds.items()}
    latency["files"] = {"count": len(waves), "mean_seconds": float(lengths.mean()),
                        "median_seconds": float(np.median(lengths)),
                        "min_seconds": float(lengths.min()), "max_seconds": float(lengths.max())}
    return vectors, latency, unusable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_path", required=True)
    parser.add_argument("--test_path", required=True, help="preprocessed test split")
    parser.add_argument("--audio_path", default="",
                        help="the split's recordings (default: its manifest's source folder)")
    parser.add_argument("--out", default=str(ROOT / "Results" / "deploy" / "bench_deploy.json"))
    parser.add_argument("--rounds", type=int, default=200, help="window latency calls per format")
    args = parser.parse_args()
    argv = ["--model_path", args.model_path, "--test_path", args.test_path]
    parsed = configuration.parse_config(argv)
    config, network, encoder = model.load_trained(parsed.model_path, parsed.features,
                                                  parsed.network)
    length = export.tflite_input_samples(config)
    started, load_before = time.time(), load()
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as folder, \
            threadpool_limits(limits=1):
        paths = export_all(argv, Path(folder))
        sizes = {name: size_bytes(path) for name, path in paths.items()}
        tflite = ("tflite_float32", "tflite_int8")
        window_runners = {name: export.tflite_runner(paths[name], 1, "serving_default")
                          for name in tflite}
        utterance_runners = {name: export.tflite_runner(paths[name], 1, "utterance")
                             for name in tflite}
        serve = tf.saved_model.load(str(paths["savedmodel"])).signatures["serving_default"]
        embed = model.make_embedder(encoder, config.n_mels, config.window_frames)

        recordings = split_recordings(args.test_path, args.audio_path)
        names = {s: [str(p) for p in files] for s, files in recordings.items()}
        waves = {}
        for path in (p for files in names.values() for p in files):
            try:
                waves[path] = features.load_audio(path, config.sr)
            except features.AudioError as error:
                raise SystemExit(f"{path}: {error}") from None
        per_window = window_latency(config, embed, serve, window_runners,
                                    next(iter(waves.values())), length, args.rounds)
        vectors, per_file, unusable = whole_files(
            whole_file_calls(config, embed, serve, utterance_runners), waves, config.sr)

    reference = vectors["in_process"]
    eers, distance = {}, {}
    for name, found in vectors.items():
        if len(found) < len(waves):
            eers[name] = f"{len(waves) - len(found)} files unusable, no EER"
            continue
        eers[name] = pairs_eer(found, names)
        if name != "in_process":
            gaps = [float(np.max(np.abs(found[p] - reference[p]))) for p in reference]
            distance[name] = {"max_abs_difference": max(gaps), "mean_cosine": float(np.mean(
                [found[p] @ reference[p] for p in reference]))}
    cpu = cpu_description()
    result = {
        "cpu": cpu_model(), "cpu_family": cpu["family"], "cpu_model_number": cpu["model_number"],
        "cpu_flags": cpu["flags"], "threads": 1, "load_average": {"before": load_before,
                                                                  "after": load()},
        "model_path": relative(args.model_path), "test_path": relative(args.test_path),
        "mode": "TD-SV" if config.tdsv else "TI-SV",
        "network": {"hidden": network.hidden, "proj": network.proj,
                    "num_layer": network.num_layer},
        "window": {"samples": length, "seconds": length / config.sr,
                   "frames": 1 + length // config.hop_samples},
        "size_bytes": sizes, "latency_window_ms_median": per_window,
        "latency_window_rounds": args.rounds, "latency_file_ms": per_file,
        "eer_all_pairs": eers, "to_in_process": distance, "unusable": unusable,
        "tflite_signatures": {"window": "serving_default", "file": "utterance"},
        "utterances": len(waves), "speakers": len(names),
        "versions": {pkg: importlib.metadata.version(pkg)
                     for pkg in ("tensorflow-cpu", "keras", "ai-edge-litert", "numpy")},
        "seconds": round(time.time() - started, 1)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    utils.atomic_save_json(out, result)
    print(json.dumps({k: result[k] for k in ("cpu", "size_bytes", "latency_window_ms_median",
                                             "latency_file_ms", "eer_all_pairs",
                                             "to_in_process")}, indent=1))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
