"""Deployment benchmark: each --export format's size, single-window latency on one CPU thread and
the float32-vs-int8 TFLite EER on all utterance pairs of a test split.

    python tests/benchmarks/bench_deploy.py --model_path M --test_path T [--audio_path A]
        [--out Results/deploy/bench_deploy.json] [--rounds 200]

Exports the model of --model_path as a SavedModel, a float32 TFLite and an int8 TFLite model
(into a temporary folder), then measures
  1. file size of each format (the SavedModel folder's files summed),
  2. median latency of one window (the TFLite input: --window_frames frames of waveform; TD-SV:
     its buffer) on one thread, the formats called in turn so that a slow spell of a shared
     machine hits all alike: in-process (features.py front end + model.make_embedder, the path
     of --verify), the in-process embedder alone (log-mel given), the SavedModel, TFLite float32
     and TFLite int8,
  3. the EER of all utterance pairs of the test split (its recordings, read from the manifest's
     source folder or --audio_path) with the in-process d-vectors and with the TFLite models'
     whole-recording recipe (export.tflite_utterance_d_vector; TD-SV: one buffer per recording),
and writes the JSON with the CPU model (lscpu) and the library versions.
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

from bench_speed import interleaved_ms  # noqa: E402

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
        paths[name] = out / export.tflite_name(config) if kind == "tflite" else out
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_path", required=True)
    parser.add_argument("--test_path", required=True, help="preprocessed test split")
    parser.add_argument("--audio_path", default="",
                        help="the split's recordings (default: its manifest's source folder)")
    parser.add_argument("--out", default=str(ROOT / "Results" / "deploy" / "bench_deploy.json"))
    parser.add_argument("--rounds", type=int, default=200, help="latency calls per format")
    args = parser.parse_args()
    argv = ["--model_path", args.model_path, "--test_path", args.test_path]
    config, encoder = model.load_trained(configuration.parse_config(argv))
    length = export.tflite_input_samples(config)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as folder, \
            threadpool_limits(limits=1):
        paths = export_all(argv, Path(folder))
        sizes = {name: size_bytes(path) for name, path in paths.items()}
        runners = {name: export.tflite_runner(paths[name], threads=1)
                   for name in ("tflite_float32", "tflite_int8")}
        serve = tf.saved_model.load(str(paths["savedmodel"])).signatures["serving_default"]
        embed = model.make_embedder(encoder, config.n_mels, config.window_frames)

        recordings = split_recordings(args.test_path, args.audio_path)
        first = next(iter(recordings.values()))[0]
        wav = features.load_audio(first, config.sr)
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
            "tflite_float32": lambda: runners["tflite_float32"](waveform=window, num_samples=n),
            "tflite_int8": lambda: runners["tflite_int8"](waveform=window, num_samples=n)}
        latency = interleaved_ms(calls, args.rounds, warmup=5, budget=240.0, block=5)

        names = {s: [str(p) for p in files] for s, files in recordings.items()}
        paths_all = [Path(p) for files in names.values() for p in files]
        utterances = features.files_inference_features(paths_all, config)
        for path, result in zip(paths_all, utterances):
            if isinstance(result, features.AudioError):
                raise SystemExit(f"{path}: {result}")
        in_process = dict(zip(map(str, paths_all), model.utterance_d_vectors(
            embed, utterances, config.window_frames)))
        tflite = {name: {} for name in runners}
        for path in paths_all:
            wav = features.load_audio(path, config.sr)
            for name, run in runners.items():
                if config.tdsv:
                    out = run(waveform=np.pad(wav[:length], (0, max(0, length - len(wav)))),
                              num_samples=np.array(min(len(wav), length), np.int32))
                    tflite[name][str(path)] = out["d_vector"]
                else:
                    tflite[name][str(path)] = export.tflite_utterance_d_vector(run, wav, length)
        eers = {"in_process": pairs_eer(in_process, names),
                **{name: pairs_eer(vectors, names) for name, vectors in tflite.items()}}
        cosine = {name: float(np.mean([vectors[p] @ in_process[p] for p in in_process]))
                  for name, vectors in tflite.items()}

    result = {
        "cpu": cpu_model(), "threads": 1, "model_path": utils.record_path(args.model_path),
        "test_path": utils.record_path(args.test_path), "mode": "TD-SV" if config.tdsv
        else "TI-SV", "network": {"hidden": config.hidden, "proj": config.proj,
                                  "num_layer": config.num_layer},
        "window": {"samples": length, "seconds": length / config.sr,
                   "frames": 1 + length // features.hop_samples(config)},
        "size_bytes": sizes, "latency_ms_median": latency, "latency_rounds": args.rounds,
        "eer_all_pairs": eers, "mean_cosine_to_in_process": cosine,
        "utterances": len(paths_all), "speakers": len(names),
        "versions": {pkg: importlib.metadata.version(pkg)
                     for pkg in ("tensorflow-cpu", "keras", "ai-edge-litert", "numpy")},
        "seconds": round(time.time() - started, 1)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    utils.atomic_save_json(out, result)
    print(json.dumps({k: result[k] for k in ("cpu", "size_bytes", "latency_ms_median",
                                             "eer_all_pairs")}, indent=1))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
