"""The training store and its seeded N x M batches."""

import os
import shutil
from dataclasses import replace

import numpy as np
import pytest

import configuration
import dataset


def _flag(flags, name):
    return flags[flags.index(name) + 1]


@pytest.mark.parametrize("frames", [["--tisv_frame_min", "10", "--tisv_frame", "12"],
                                    ["--tisv_frame_min", "900", "--tisv_frame", "1000"]],
                         ids=["shorter than every utterance", "longer than every utterance"])
@pytest.mark.slow
def test_batches_are_speaker_major_and_seeded_by_step(tiny_tisv, frames):
    config = configuration.parse_config(tiny_tisv + ["--N", "3", "--M", "4"] + frames)
    store = dataset.open_store(config.train_path, config.features, "train")
    first = dataset.sample_batch(store, config.training, step=7)
    assert first.shape[0] == 12 and first.shape[2] == 40
    assert config.tisv_frame_min <= first.shape[1] <= config.tisv_frame
    np.testing.assert_array_equal(first, dataset.sample_batch(store, config.training, step=7))
    assert not np.array_equal(first, dataset.sample_batch(store, config.training, step=8))
    # Every crop is a run of frames of one stored utterance (repeated cyclically if shorter).
    stored = [store.utterance(s, u) for s in store.speakers for u in range(store.num_utterances(s))]

    def windows(u, length):
        if len(u) >= length:
            return [u[i:i + length] for i in range(len(u) - length + 1)]
        return [np.take(u, np.arange(length) + i, axis=0, mode="wrap") for i in range(len(u))]

    for crop in first:
        assert any(np.array_equal(w, crop) for u in stored for w in windows(u, len(crop)))
    shorter = sum(len(u) < first.shape[1] for u in stored)
    assert shorter == (len(stored) if frames[1] == "900" else 0)  # both reading paths run


def test_several_train_folders_are_pooled(tiny_tisv):
    config = configuration.parse_config(tiny_tisv)
    single = dataset.open_store(config.train_path, config.features, "train")
    pooled = dataset.open_store(f"{config.train_path},{config.train_path}", config.features, "train")
    assert pooled.num_speakers == 2 * single.num_speakers
    speaker = single.speakers[0]
    np.testing.assert_array_equal(pooled.utterance(f"1:{speaker}", 0), single.utterance(speaker, 0))


def test_mismatched_features_are_refused(tiny_tisv):
    config = configuration.parse_config(tiny_tisv + ["--n_mels", "64"])
    with pytest.raises(ValueError, match="n_mels=40 but --n_mels is 64"):
        dataset.open_store(config.train_path, config.features, "train")


def test_noise_from_clean_noisy_pairs_and_plain_recordings(tmp_path):
    import soundfile as sf

    import data_preprocess

    rng = np.random.default_rng(0)
    clean = 0.3 * np.sin(np.arange(16000) * 0.05)
    noise = 0.05 * rng.standard_normal(16000)
    sf.write(tmp_path / "a_clean.wav", clean, 16000, subtype="FLOAT")
    sf.write(tmp_path / "a_noisy.wav", clean + noise, 16000, subtype="FLOAT")
    plain = 0.2 * rng.standard_normal(8000)
    sf.write(tmp_path / "b.wav", plain, 16000, subtype="FLOAT")
    config = configuration.parse_config(["--noise_path", str(tmp_path)])
    stream, skipped = data_preprocess.build_noise(config.noise_path, config.noise_filenum, config.sr)
    assert skipped == []
    expected = np.concatenate([noise / np.sqrt(np.mean(noise ** 2)),
                               plain / np.sqrt(np.mean(plain ** 2))])
    np.testing.assert_allclose(stream, expected, atol=1e-4)


def test_training_reads_are_the_stored_rows_and_keep_no_file_open(tiny_tisv):
    """read_rows against plain slicing of the loaded array; sampling batches opens no memory
    map and leaves no file descriptor behind."""
    config = configuration.parse_config(tiny_tisv + ["--N", "4", "--M", "3"])
    store = dataset.open_store(config.train_path, config.features, "train")
    rng = np.random.default_rng(0)
    for speaker in store.speakers[:3]:
        stored = np.load(store._files[speaker], allow_pickle=False)
        starts = rng.integers(0, len(stored) - 20, 5)
        spans = [(int(a), int(a) + int(n)) for a, n in zip(starts, rng.integers(1, 20, 5))]
        for (start, stop), rows in zip(spans, store.read_rows(speaker, spans)):
            np.testing.assert_array_equal(rows, stored[start:stop])
        places = [np.full((stop - start, config.n_mels), np.nan, np.float32)
                  for start, stop in spans]
        filled = store.read_rows(speaker, spans, places)
        assert all(a is b for a, b in zip(filled, places))
        np.testing.assert_array_equal(places[0], stored[spans[0][0]:spans[0][1]])
    descriptors = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    for step in range(6):
        dataset.sample_batch(store, config.training, step)
    assert not store._arrays
    if descriptors is not None:
        assert len(os.listdir("/proc/self/fd")) == descriptors


def test_evaluation_keeps_few_memory_maps_open(tiny_tisv, monkeypatch):
    """With at most 2 memory maps open (LRU), every speaker's test utterances are those of a
    reader that keeps every array open; utterance names come from the sidecars on demand."""
    config = configuration.parse_config(tiny_tisv)
    everything = dataset.open_store(config.train_path, config.features, "train")
    expected = [everything.test_utterances(s) for s in everything.speakers]
    assert len(everything._arrays) > 2
    monkeypatch.setattr(dataset, "OPEN_ARRAYS", 2)
    bounded = dataset.open_store(config.train_path, config.features, "train")
    for speaker, utterances in zip(bounded.speakers, expected):
        for got, want in zip(bounded.test_utterances(speaker), utterances, strict=True):
            np.testing.assert_array_equal(got, want)
        assert len(bounded._arrays) <= 2
    speaker = bounded.speakers[0]
    names = bounded.utterance_names(speaker)
    assert len(names) == bounded.num_utterances(speaker) and names[0].startswith(speaker)


def test_a_feature_file_that_disagrees_with_its_sidecar_is_named(tiny_tisv, tmp_path):
    config = configuration.parse_config(tiny_tisv + ["--N", "2", "--M", "2"])
    copy = tmp_path / "train"
    shutil.copytree(config.train_path, copy)
    store = dataset.open_store(str(copy), config.features, "train")
    speaker = store.speakers[0]
    stored = np.load(copy / f"{speaker}.npy")
    np.save(copy / f"{speaker}.npy", stored[:-1])  # one frame fewer than the sidecar lists
    with pytest.raises(ValueError, match=rf"{speaker}.npy: unreadable \(holds float32 .*"
                                         rf"expected float32 C-ordered \({len(stored)}, "):
        store.read_rows(speaker, [(0, 1)])
    np.save(copy / f"{speaker}.npy", np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=rf"{speaker}.npy: unreadable .*re-run data_preprocess"):
        dataset.open_store(str(copy), config.features, "train").read_rows(speaker, [(0, 1)])
    np.save(copy / f"{speaker}.npy", stored)
    with open(copy / f"{speaker}.npy", "r+b") as handle:  # cut short after its header
        handle.truncate(200)
    with pytest.raises(ValueError, match=rf"{speaker}.npy: unreadable \(shorter than its header"):
        dataset.open_store(str(copy), config.features, "train").read_rows(speaker, [(0, 50)])


def test_source_weights_draw_each_batch_from_one_folder(tiny_tisv):
    config = configuration.parse_config(tiny_tisv + ["--N", "3"])
    paths = f"{config.train_path},{config.train_path}"
    store = dataset.open_store(paths, config.features, "train")
    half = store.num_speakers // 2
    assert [list(s) for s in store.sources] == [list(range(half)), list(range(half, 2 * half))]
    counts = {}
    for weights in ([1.0, 0.0], [0.0, 2.0], [1.0, 3.0]):
        training = configuration.Training(N=3, source_weights=tuple(weights))
        sources = []
        for step in range(400):
            speakers, source = dataset.batch_speakers(store, training,
                                                      np.random.default_rng(step))
            assert len(set(speakers)) == 3
            from_second = speakers >= half
            assert from_second.all() or not from_second.any(), speakers  # never mixed
            assert source == int(from_second[0])
            sources.append(int(from_second[0]))
        counts[tuple(weights)] = np.mean(sources)
    assert counts[(1.0, 0.0)] == 0 and counts[(0.0, 2.0)] == 1
    assert 0.68 < counts[(1.0, 3.0)] < 0.82  # 3 / 4 of the batches, 400 draws


def test_source_weights_are_checked_against_the_folders(tiny_tisv):
    config = configuration.parse_config(tiny_tisv + ["--source_weights", "1", "1", "1"])
    paths = f"{config.train_path},{config.train_path}"
    store = dataset.open_store(paths, config.features, "train")
    with pytest.raises(ValueError, match="3 weights for 2 --train_path folders"):
        dataset.training_batches(store, config.training, 0, paths)
    too_many = store.num_speakers // 2 + 1
    two = configuration.parse_config(tiny_tisv + ["--source_weights", "1", "1", "--N",
                                                  str(too_many)])
    with pytest.raises(ValueError, match=f"fewer than --N {too_many}"):
        dataset.training_batches(store, two.training, 0, paths)
    with pytest.raises(SystemExit):
        configuration.parse_config(tiny_tisv + ["--source_weights", "0", "0"])


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of each run of True in a 1-d boolean array."""
    edges = np.diff(np.concatenate([[0], flags.astype(int), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def test_spec_augment_masks_one_band_and_one_span_with_the_mean():
    rng = np.random.default_rng(0)
    features = rng.standard_normal((400, 50, 40)).astype(np.float32) - 3.0
    masked = dataset.spec_augment(features, 8, 10, np.random.default_rng(1))
    band_widths, span_widths = [], []
    for before, after in zip(features, masked):
        changed = before != after
        bands = changed.all(axis=0)  # a masked band is masked in every frame
        frames = changed.all(axis=1)
        np.testing.assert_array_equal(changed, bands[None, :] | frames[:, None])
        assert len(_runs(bands)) <= 1 and len(_runs(frames)) <= 1
        band_widths.append(bands.sum())
        span_widths.append(frames.sum())
        np.testing.assert_allclose(after[changed], before.mean(), rtol=1e-5)
    assert min(band_widths) == 0 and max(band_widths) == 8
    assert min(span_widths) == 0 and max(span_widths) == 10
    np.testing.assert_array_equal(dataset.spec_augment(features, 0, 0, rng), features)


def test_spec_augment_flag_masks_the_same_batch(tiny_tisv):
    plain = configuration.parse_config(tiny_tisv + ["--N", "3", "--M", "4"])
    masked = configuration.parse_config(tiny_tisv + ["--N", "3", "--M", "4",
                                                     "--spec_augment", "5", "20"])
    store = dataset.open_store(plain.train_path, plain.features, "train")
    before = dataset.sample_batch(store, plain.training, step=3)
    after = dataset.sample_batch(store, masked.training, step=3)
    changed = before != after
    assert changed.any()
    # The crops are those of the unmasked batch; only the masked cells differ.
    for utterance, augmented, mask in zip(before, after, changed):
        np.testing.assert_allclose(augmented[mask], utterance.mean(), rtol=1e-5)


def test_a_plus_joined_entry_is_one_multireader_source(tiny_tisv):
    config = configuration.parse_config(tiny_tisv)
    store = dataset.open_store(f"{config.train_path}+{config.train_path},{config.train_path}",
                               config.features, "train")
    third = store.num_speakers // 3
    assert [list(s) for s in store.sources] == [list(range(2 * third)),
                                                list(range(2 * third, 3 * third))]
    assert len(set(store.speakers)) == 3 * third  # the same folder twice: distinct speakers


def test_short_crops_cap_a_source_at_its_median_utterance_length(tiny_tisv):
    config = configuration.parse_config(tiny_tisv + ["--N", "3", "--M", "2",
                                                     "--tisv_frame_min", "5"])
    store = dataset.open_store(f"{config.train_path},{config.train_path}", config.features,
                               "train")
    lengths = [n for s in store.sources[0] for n in np.diff(store.offsets[store.speakers[s]])]
    median = int(np.median(lengths))
    assert store.median_frames == [median, median]
    assert config.tisv_frame_min < median < config.tisv_frame  # so the cap can bind
    capped = configuration.Training(N=3, M=2, tisv_frame_min=5, source_weights=(1.0, 1.0),
                                    short_crops=True)
    store.median_frames = [median, 10 ** 6]  # the second source: utterances longer than any crop
    seen = {0: set(), 1: set()}
    for step in range(60):
        source = dataset.batch_speakers(store, capped, np.random.default_rng([0, step]))[1]
        length = dataset.sample_batch(store, capped, step).shape[1]
        plain = dataset.sample_batch(store, replace(capped, short_crops=False), step).shape[1]
        assert length == (min(plain, median) if source == 0 else plain)
        seen[source].add(length)
    assert max(seen[0]) == median and max(seen[1]) > median  # both sources drawn, cap bound
