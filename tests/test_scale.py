"""Issue #6, scaling out: sharded preprocessing + merge, and GE2E on tf.distribute (two
MultiWorkerMirroredStrategy workers on loopback, MirroredStrategy over two logical CPUs) giving
the loss and weights of one process holding the whole batch."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from distributed_worker import WORKER, run_workers
from robust_corpus import preprocessed, write_speakers
from test_interruption import checkpoint_values

import configuration
import data_preprocess
import dataset
import workers

# 8 utterances per batch, so each of two replicas embeds 4. SGD: over several steps Adam's
# division by sqrt(v) amplifies float rounding in near-zero gradients beyond 1e-5.
DISTRIBUTED = ["--N", "4", "--M", "2", "--optim", "sgd", "--save_every", "2"]


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if not p.name.startswith("manifest.shard-")}


# --- sharded preprocessing ----------------------------------------------------------------------

def test_two_shards_then_merge_equal_one_run(tmp_path, capsys):
    audio = tmp_path / "audio"
    write_speakers(audio, speakers=7, utterances=3)
    common = ["--audio_path", str(audio), "--test_ratio", "0.3"]

    def flags(out):
        return common + ["--train_path", str(out / "train"), "--test_path", str(out / "test")]

    assert data_preprocess.main(flags(tmp_path / "one")) == 0
    # Two machines writing into one shared folder: the last shard to finish merges.
    shared = tmp_path / "shared"
    # Two spawned workers (this process has TensorFlow loaded, so no fork).
    assert data_preprocess.main(flags(shared) + ["--shard", "1", "--num_shards", "2",
                                                 "--workers", "2"]) == 0
    assert not (shared / "train" / "manifest.json").exists()
    with pytest.raises(ValueError, match="--merge True"):
        dataset.open_store(str(shared / "train"), configuration.Features(), "train")
    assert data_preprocess.main(flags(shared) + ["--shard", "0", "--num_shards", "2"]) == 0
    assert "merged into" in capsys.readouterr().out
    # Two machines with their own disks: copy the output together, then --merge True.
    apart = tmp_path / "apart"
    for shard in (0, 1):
        assert data_preprocess.main(flags(tmp_path / f"m{shard}") +
                                    ["--shard", str(shard), "--num_shards", "2"]) == 0
    for split in ("train", "test"):
        shutil.copytree(tmp_path / "m0" / split, apart / split)
        shutil.copytree(tmp_path / "m1" / split, apart / split, dirs_exist_ok=True)
        (apart / split / "manifest.json").unlink(missing_ok=True)
    assert data_preprocess.main(flags(apart) + ["--merge", "True"]) == 0

    for split in ("train", "test"):
        reference = files(tmp_path / "one" / split)
        assert any(name.endswith(".npy") for name in reference)
        assert files(shared / split) == reference, split
        assert files(apart / split) == reference, split
        shards = [json.loads((shared / split / f"manifest.shard-{i}-of-2.json").read_text())
                  for i in (0, 1)]
        assert not set(shards[0]["speakers"]) & set(shards[1]["speakers"])
        assert all(shard["speakers"] for shard in shards), "a shard got no speaker"


def test_workers_fork_only_without_tensorflow(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setitem(sys.modules, "tensorflow", sys.modules.get("tensorflow", object()))
    assert workers.worker_context().get_start_method() == "spawn"
    monkeypatch.delitem(sys.modules, "tensorflow")
    assert workers.worker_context().get_start_method() == "fork"


PAGE_FAULTS_OF_FEATURES = """
import resource, sys
import numpy as np
import configuration, features
config = configuration.Features()
rng = np.random.default_rng(0)
wavs = [0.1 * rng.standard_normal(int(16000 * s)).astype(np.float32) for s in rng.uniform(2, 8, 12)]
if sys.argv[1] == "keep":
    features.keep_freed_memory()
features.voiced_features(wavs[0], config)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for wav in wavs * 3:
    features.voiced_features(wav, config)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_workers_keep_freed_memory_for_the_next_file():
    faults = {mode: int(subprocess.run([sys.executable, "-c", PAGE_FAULTS_OF_FEATURES, mode],
                                       cwd=REPO, capture_output=True, text=True, check=True
                                       ).stdout) for mode in ("default", "keep")}
    # The kernel's own count: by default each file's buffers are faulted in anew.
    assert faults["keep"] < faults["default"] / 5, faults


BLAS_THREADS = """
import json, runpy, sys
from threadpoolctl import threadpool_info
if sys.argv[1] == "cli":
    sys.argv = ["data_preprocess.py", "--help"]
    try:
        runpy.run_path("data_preprocess.py", run_name="__main__")
    except SystemExit:
        pass
else:
    import data_preprocess
print(json.dumps([lib["num_threads"] for lib in threadpool_info()
                  if lib["internal_api"] == "openblas"]))
"""


def _openblas_threads(mode: str, **env: str) -> list[int]:
    environ = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"} | env
    output = subprocess.run([sys.executable, "-c", BLAS_THREADS, mode], cwd=REPO, env=environ,
                            capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="OpenBLAS starts one thread per core")
def test_the_cli_starts_openblas_with_one_thread():
    """`python data_preprocess.py` loads OpenBLAS with one thread (no idle threads spinning
    against the workers); importing the module leaves the importer's BLAS alone, and a
    user's OPENBLAS_NUM_THREADS wins."""
    imported = _openblas_threads("import")
    if not imported:
        pytest.skip("numpy and scipy use no OpenBLAS here")
    assert max(imported) > 1
    assert set(_openblas_threads("cli")) == {1}
    assert set(_openblas_threads("cli", OPENBLAS_NUM_THREADS="2")) == {2}


ORPHAN = """
import os, sys, time
import workers
child = os.fork()
if child == 0:
    workers.die_with_parent()
    os.write(1, b"armed\\n")  # one write each: the two processes share the pipe
    time.sleep(120)
    os._exit(0)
os.write(1, f"{child}\\n".encode())
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited, only nobody has reaped it


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG)")
def test_a_worker_dies_with_its_killed_parent():
    """A worker that would sleep for minutes dies with its parent's kill -9, so a re-run never
    races a worker of the killed run."""
    parent = subprocess.Popen([sys.executable, "-c", ORPHAN], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    lines = {parent.stdout.readline().strip() for _ in range(2)}
    (child,) = [int(line) for line in lines if line != "armed"]
    assert "armed" in lines and _alive(child)
    parent.kill()
    parent.wait()
    deadline = time.time() + 10
    while _alive(child) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def test_merge_names_the_missing_shard(tmp_path, capsys):
    audio = tmp_path / "audio"
    write_speakers(audio, speakers=6, utterances=2)
    flags = ["--audio_path", str(audio), "--train_path", str(tmp_path / "train"),
             "--test_path", str(tmp_path / "test"), "--num_shards", "3"]
    assert data_preprocess.main(flags + ["--shard", "2"]) == 0
    capsys.readouterr()
    assert data_preprocess.main(flags + ["--merge", "True"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "lacks shard(s) [0, 1] of 3" in error


@pytest.mark.parametrize("argv, expected", [
    (["--shard", "2", "--num_shards", "2"], "--shard 2"),
    (["--folds", "1"], "--folds 1"),
    (["--folds", "5", "--fold", "5"], "--fold 5"),
    (["--fold", "1"], "--fold needs --folds"),
    (["--distribute", "multi_worker"], "TF_CONFIG"),
])
def test_bad_scale_flags(argv, expected, capsys, monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        configuration.parse_config(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and expected in error


def test_folds_partition_the_speakers():
    speakers = [f"s{i:02d}" for i in range(27)]
    tests = [data_preprocess.split_speakers(speakers, 0.2, 3, 5, k)[1] for k in range(5)]
    assert sorted(sum(tests, [])) == speakers
    assert [len(t) for t in tests] == [5, 6, 5, 6, 5]
    assert tests[0] == data_preprocess.split_speakers(speakers, 0.2, 3)[1]
    train, test = data_preprocess.split_speakers(speakers, 0.2, 3, 5, 2)
    assert sorted(train + test) == speakers and not set(train) & set(test)


# --- tf.distribute training ---------------------------------------------------------------------

def assert_same_training(a: dict, b: dict, ckpt_a: Path, ckpt_b: Path) -> None:
    np.testing.assert_allclose(a["losses"], b["losses"], rtol=1e-5)
    weights_a, weights_b = checkpoint_values(str(ckpt_a)), checkpoint_values(str(ckpt_b))
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        np.testing.assert_allclose(weights_a[name], weights_b[name], rtol=1e-5, atol=1e-6,
                                   err_msg=name)


@pytest.mark.slow
def test_two_workers_on_loopback_train_like_one_process(tmp_path_factory, tmp_path):
    flags = preprocessed(tmp_path_factory) + DISTRIBUTED
    single = run_workers(tmp_path, flags + ["--model_path", str(tmp_path / "single"),
                                            "--iteration", "6"], workers=1)[0]
    two = tmp_path / "two"
    first = run_workers(tmp_path, flags + ["--model_path", str(two), "--iteration", "4",
                                           "--distribute", "multi_worker"], workers=2)
    assert first[0]["losses"] == first[1]["losses"]
    # Only the chief wrote the model; a restarted pair of workers resumes from its checkpoint.
    assert sorted(p.name for p in (two / "checkpoints").glob("*.index")) == \
        ["ckpt-2.index", "ckpt-4.index"]
    resumed = run_workers(tmp_path, flags + ["--model_path", str(two), "--iteration", "6",
                                             "--distribute", "multi_worker", "--restore", "True"],
                          workers=2)
    assert resumed[0]["steps"] == 6 and len(resumed[0]["losses"]) == 2
    both = {"losses": first[0]["losses"] + resumed[0]["losses"]}
    assert_same_training(single, both, tmp_path / "single" / "checkpoints" / "ckpt-6",
                         two / "checkpoints" / "ckpt-6")


@pytest.mark.slow
def test_mirrored_over_two_devices_trains_like_one(tmp_path_factory, tmp_path):
    flags = preprocessed(tmp_path_factory) + DISTRIBUTED + ["--iteration", "3",
                                                            "--save_every", "3"]
    single = run_workers(tmp_path, flags + ["--model_path", str(tmp_path / "single")], 1)[0]
    mirrored = run_workers(tmp_path, flags + ["--model_path", str(tmp_path / "mirrored"),
                                              "--distribute", "mirrored"], 1, cpus=2)[0]
    assert_same_training(single, mirrored, tmp_path / "single" / "checkpoints" / "ckpt-3",
                         tmp_path / "mirrored" / "checkpoints" / "ckpt-3")


def test_batch_that_does_not_divide_among_replicas_is_refused(tmp_path_factory, tmp_path):
    flags = preprocessed(tmp_path_factory) + ["--N", "3", "--M", "3", "--distribute", "mirrored",
                                              "--model_path", str(tmp_path / "m")]
    output = subprocess.run([sys.executable, WORKER, str(tmp_path / "o.json"), "2", *flags],
                            cwd=REPO, capture_output=True, text=True)
    assert output.returncode != 0 and "do not divide among the 2 replicas" in output.stderr


def test_scale_benchmark_sampling_row_on_a_small_sparse_split(tmp_path, monkeypatch):
    """bench_scale.py's VoxCeleb2-shaped split, shrunk: sparse files (holes, no disk blocks) that
    the training reader indexes and samples N=64 x M=10 batches from."""
    monkeypatch.syspath_prepend(str(REPO / "tests" / "benchmarks"))
    import bench_scale

    monkeypatch.setattr(bench_scale, "VOX2", {"speakers": 70, "utterances": 2000,
                                              "min_frames": 300, "max_frames": 1300})
    folder = tmp_path / "vox2_shaped"
    manifest = bench_scale.write_vox2_shaped(folder)
    arrays = sorted(folder.glob("*.npy"))
    assert len(arrays) == 70 and manifest["frames"] > 2000 * 300
    apparent = sum(a.stat().st_size for a in arrays)
    assert sum(a.stat().st_blocks * 512 for a in arrays) < apparent / 20
    result = bench_scale.sample_part(str(folder), batches=3)
    assert result["speakers"] == 70 and result["utterances"] == 2000
    assert result["batch_shape"][0] == 640 and result["batch_shape"][2] == 40
    assert result["batches_per_s"] > 0 and result["batches_per_s_page_cached"] > 0
