"""Scale-out benchmark: out-of-core batches, parallel preprocessing, multi-worker training.

    python tests/benchmarks/bench_scale.py [--quick] [--scratch DIR]

  1. A VoxCeleb2-shaped training split (6,000 speakers, 1,000,000 utterances of 300-1,300
     frames, ~130 GB of float32 features) written as sparse .npy files, so it costs no disk
     space: their data pages are holes that read as zeros. This row measures the index, the
     reads and the tf.data batch assembly of dataset.py, not the disk. It reports N=64, M=10
     batches/s with the split evicted from the page cache first (each crop's pages are new to
     the kernel, as on a corpus larger than RAM), the same batches again from the page cache,
     and the peak RSS of that process (its own process, so nothing else counts).
  2. data_preprocess.py on ../shared/data/speechocean762 with --workers 1 and --workers 2,
     alternated nine times (page cache warm; the machine's speed swings within minutes, and
     with five rounds the ratio of medians moved by 0.1 between runs); the medians and their
     ratio. Beside it, the ceiling: the per-file work alone (decode, VAD, log-mel) in one vs
     two forked processes.
  3. GE2E training steps/s with one process and with two MultiWorkerMirroredStrategy workers
     on loopback (on one 2-core machine the two workers share the cores: this row shows the
     recipe works and what it costs, not a speed-up).
Writes Results/benchmark_scale.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# As `python data_preprocess.py` does, before numpy loads OpenBLAS: the ceiling row forks this
# process, and idle OpenBLAS threads started in each fork would spin against the work.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

import configuration  # noqa: E402
import corpora  # noqa: E402
import data_preprocess  # noqa: E402
import features  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "speechocean762"
VOX2 = {"speakers": 6000, "utterances": 1_000_000, "min_frames": 300, "max_frames": 1300}


def write_vox2_shaped(folder: Path, seed: int = 0) -> dict:
    """The sparse VoxCeleb2-shaped split (reused if already complete)."""
    manifest = folder / "manifest.json"
    if manifest.exists():
        return json.loads(manifest.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    front = configuration.Features()
    settings = features.feature_settings(front)
    counts = rng.multinomial(VOX2["utterances"], np.full(VOX2["speakers"], 1 / VOX2["speakers"]))
    speakers = [f"id{s:05d}" for s in range(VOX2["speakers"])]
    frames = 0
    for speaker, count in zip(speakers, counts):
        lengths = rng.integers(VOX2["min_frames"], VOX2["max_frames"] + 1, count).tolist()
        total = int(sum(lengths))
        frames += total
        # open_memmap seeks to the end and writes one byte: a sparse file of the full size.
        array = np.lib.format.open_memmap(folder / f"{speaker}.npy", mode="w+",
                                          dtype=np.float32, shape=(total, front.n_mels))
        del array
        names = [f"{speaker}/utt{u:05d}.wav" for u in range(count)]
        (folder / f"{speaker}.json").write_text(json.dumps(
            {"settings": settings, "paths": names, "utterances": names, "skipped": [],
             "lengths": lengths}))
    data = {"settings": settings, "source": "synthetic VoxCeleb2-shaped", "split": "train",
            "speakers": speakers, "skipped": [], "frames": frames}
    manifest.write_text(json.dumps(data))
    return data


def drop_from_page_cache(folder: Path) -> None:
    """Evict the split's pages from the page cache, so that every run reads its crops cold."""
    for file in folder.glob("*.npy"):
        descriptor = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def sample_part(store_path: str, batches: int) -> dict:
    """Run in its own process: open the store, time N=64 M=10 batches twice (first with none of
    their pages in the page cache, then again), report peak RSS."""
    import dataset

    config = configuration.parse_config(["--N", "64", "--M", "10", "--train_path", store_path,
                                         "--iteration", str(batches + 10)])
    if hasattr(os, "posix_fadvise"):
        drop_from_page_cache(Path(store_path))
    started = time.perf_counter()
    store = dataset.open_store(store_path, config.features, "train")
    open_seconds = time.perf_counter() - started
    rss_index = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rates = []
    for _ in ("cold", "warm"):
        iterator = iter(dataset.training_batches(store, config.training, 0, store_path))
        for _ in range(10):  # tf.data's threads start, its autotuner settles
            next(iterator)
        started = time.perf_counter()
        shape = None
        for _ in range(batches):
            shape = next(iterator).shape
        rates.append(round(batches / (time.perf_counter() - started), 1))
    return {"speakers": store.num_speakers,
            "utterances": int(sum(store.num_utterances(s) for s in store.speakers)),
            "batch_shape": list(shape), "open_seconds": round(open_seconds, 1),
            "batches": batches, "batches_per_s": rates[0], "batches_per_s_page_cached": rates[1],
            "peak_rss_mb_after_index": round(rss_index), "peak_rss_mb": round(
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def bench_sampling(scratch: Path, batches: int) -> dict:
    started = time.perf_counter()
    manifest = write_vox2_shaped(scratch / "vox2_shaped")
    written = time.perf_counter() - started
    output = subprocess.run([sys.executable, __file__, "--part", "sample", "--store",
                             str(scratch / "vox2_shaped"), "--batches", str(batches)],
                            capture_output=True, text=True, check=True)
    result = json.loads(output.stdout.strip().splitlines()[-1])
    result.update(write_seconds=round(written, 1), frames=manifest["frames"],
                  apparent_gb=round(manifest["frames"] * 40 * 4 / 1e9, 1))
    return result


def bench_preprocessing(scratch: Path, audio: Path, speakers: int, repeats: int) -> dict:
    corpus = scratch / "corpus"
    shutil.rmtree(corpus, ignore_errors=True)
    corpus.mkdir(parents=True)
    chosen = sorted(p for p in audio.iterdir() if p.is_dir())[:speakers]
    for speaker in chosen:
        (corpus / speaker.name).symlink_to(speaker.resolve())
    files = [corpus / f for paths in corpora.find_utterances(corpus).values()
             for f in paths]
    for file in files:  # the page cache is warm for both runs
        file.read_bytes()
    result = {"speakers": len(chosen), "files": len(files), "repeats": repeats}
    seconds = {1: [], 2: []}
    for _ in range(repeats):  # alternated, so a slow spell of the machine hits both
        for workers in (1, 2):
            out = scratch / f"preprocessed_w{workers}"
            shutil.rmtree(out, ignore_errors=True)
            started = time.perf_counter()
            subprocess.run([sys.executable, str(ROOT / "data_preprocess.py"), "--audio_path",
                            str(corpus), "--train_path", str(out / "train"), "--test_path",
                            str(out / "test"), "--workers", str(workers)],
                           capture_output=True, check=True)
            seconds[workers].append(time.perf_counter() - started)
    for workers, times in seconds.items():
        result[f"workers_{workers}_seconds"] = round(float(np.median(times)), 2)
        result[f"workers_{workers}_all_seconds"] = [round(t, 2) for t in times]
    result["speedup"] = round(result["workers_1_seconds"] / result["workers_2_seconds"], 2)
    # each round's own ratio too: a slow spell that hits one round shows as one low pair
    result["paired_speedups"] = [round(one / two, 2) for one, two in zip(seconds[1], seconds[2])]
    return result


def _per_file_work(files: list[Path]) -> None:
    """Preprocessing's per-file work (decode, VAD, log-mel) without start-up or writes."""
    data_preprocess._worker_start()  # as each --workers process starts
    config = configuration.Features()
    for file in files:
        features.voiced_features(features.load_audio(file, config.sr), config)


def bench_two_process_ceiling(audio: Path, rounds: int) -> dict:
    """The speed-up two processes doing preprocessing's per-file work get over one on this
    machine: the ceiling any --workers 2 run can reach here, measured in the same run."""
    files = sorted(audio.rglob("*.flac"))[:400]
    context = multiprocessing.get_context("fork")
    seconds = {1: [], 2: []}
    for _ in range(rounds):  # alternated, as the preprocessing row
        for processes in (1, 2):
            workers = [context.Process(target=_per_file_work, args=(files,))
                       for _ in range(processes)]
            started = time.perf_counter()
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
            seconds[processes].append(time.perf_counter() - started)
    one, two = (float(np.median(seconds[p])) for p in (1, 2))
    return {"files_per_process": len(files), "rounds": rounds, "one_process_seconds": round(one, 2),
            "two_processes_seconds": round(two, 2), "ceiling": round(2 * one / two, 2)}


def bench_training(scratch: Path, steps: int) -> dict:
    from distributed_worker import run_workers

    train_path = scratch / "preprocessed_w2" / "train"
    flags = ["--train_path", str(train_path), "--N", "16", "--M", "10", "--optim", "adam",
             "--lr", "1e-3", "--save_every", "100000"]
    result = {"N": 16, "M": 10, "steps_timed": steps}
    for workers in (1, 2):
        runs = {}
        for iteration in (3, 3 + steps):  # the difference leaves out start-up and tracing
            model_path = scratch / f"model_w{workers}_{iteration}"
            shutil.rmtree(model_path, ignore_errors=True)
            extra = ["--distribute", "multi_worker"] if workers > 1 else []
            runs[iteration] = run_workers(scratch, flags + extra + [
                "--model_path", str(model_path), "--iteration", str(iteration)], workers)[0]
        seconds = runs[3 + steps]["seconds"] - runs[3]["seconds"]
        result[f"workers_{workers}_steps_per_s"] = round(steps / seconds, 2)
    result["ratio_2_vs_1"] = round(result["workers_2_steps_per_s"] /
                                   result["workers_1_steps_per_s"], 2)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer batches, speakers, steps")
    parser.add_argument("--scratch", default=str(Path(tempfile.gettempdir()) / "ge2e_scale"),
                        help="work folder (the sparse split is kept there for re-runs)")
    parser.add_argument("--audio", default=str(DATA), help="corpus for the preprocessing row")
    parser.add_argument("--out", default=str(ROOT / "Results" / "benchmark_scale.json"))
    parser.add_argument("--part", default="", help=argparse.SUPPRESS)
    parser.add_argument("--store", default="", help=argparse.SUPPRESS)
    parser.add_argument("--batches", type=int, default=200, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part == "sample":
        print(json.dumps(sample_part(args.store, args.batches)))
        return 0

    scratch = Path(args.scratch)
    started = time.perf_counter()
    result = {"machine": {"cores": os.cpu_count(), "load_before": list(os.getloadavg())},
              "quick": args.quick}
    result["sampling"] = bench_sampling(scratch, 50 if args.quick else 200)
    audio = Path(args.audio)
    if audio.is_dir():
        result["preprocessing"] = bench_preprocessing(scratch, audio, 40 if args.quick else 200,
                                                       1 if args.quick else 9)
        result["two_process_ceiling"] = bench_two_process_ceiling(audio, 1 if args.quick else 5)
        result["training"] = bench_training(scratch, 5 if args.quick else 40)
    else:
        print(f"no corpus at {audio}: the preprocessing and training rows were skipped")
    result["machine"]["load_after"] = list(os.getloadavg())
    result["seconds"] = round(time.perf_counter() - started, 1)

    sampling = result["sampling"]
    print(f"\n{'measure':62s} {'result':>14s}   target")
    print(f"{'VoxCeleb2-shaped split: speakers / utterances':62s} "
          f"{sampling['speakers']:>6d} / {sampling['utterances']}")
    print(f"{'  N=64, M=10 batches/s (tf.data), crops read cold':62s} "
          f"{sampling['batches_per_s']:>14g}   >= 20")
    print(f"{'  the same batches again, crops in the page cache':62s} "
          f"{sampling['batches_per_s_page_cached']:>14g}")
    print(f"{'  peak RSS (MB)':62s} {sampling['peak_rss_mb']:>14d}   < 2048")
    if "preprocessing" in result:
        prep = result["preprocessing"]
        print(f"{'preprocessing --workers 1 / 2 (s), ' + str(prep['files']) + ' files':62s} "
              f"{prep['workers_1_seconds']:>6g} / {prep['workers_2_seconds']:<6g}")
        print(f"{'  speed-up':62s} {prep['speedup']:>13g}x   >= 1.7x")
        pairs = prep["paired_speedups"]
        print(f"{'  speed-up of each alternated round, lowest / highest':62s} "
              f"{min(pairs):>6g} / {max(pairs):<6g}")
        ceiling = result["two_process_ceiling"]["ceiling"]
        print(f"{'  ceiling: 2 processes of the per-file work vs 1 (no start-up)':62s} "
              f"{ceiling:>13g}x")
        train = result["training"]
        print(f"{'training steps/s, 1 process / 2 workers on loopback':62s} "
              f"{train['workers_1_steps_per_s']:>6g} / {train['workers_2_steps_per_s']:<6g}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
