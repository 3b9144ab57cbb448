"""Verification metrics, sliding windows and score normalisation (utils.py) vs brute force.

Every expected value is computed in the test itself (explicit loops or hand arithmetic).
"""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

import utils

# ----------------------------------------------------------------------------------------------
# brute-force references
# ----------------------------------------------------------------------------------------------

def _brute_rates(target, nontarget):
    """Thresholds (every distinct score, then +inf) and FAR/FRR when accepting score >= thr."""
    target = [float(x) for x in np.ravel(target)]
    nontarget = [float(x) for x in np.ravel(nontarget)]
    thresholds = sorted(set(target) | set(nontarget)) + [math.inf]
    far, frr = [], []
    for thr in thresholds:
        false_accepts = 0
        for x in nontarget:
            if x >= thr:
                false_accepts += 1
        false_rejects = 0
        for x in target:
            if x < thr:
                false_rejects += 1
        far.append(false_accepts / len(nontarget))
        frr.append(false_rejects / len(target))
    return thresholds, far, frr


def _brute_eer(target, nontarget):
    """EER interpolated between the two consecutive thresholds where FRR - FAR changes sign.

    Returns (eer, lower threshold, upper threshold) of the crossing interval.
    """
    thresholds, far, frr = _brute_rates(target, nontarget)
    for i in range(1, len(thresholds)):
        d_prev = frr[i - 1] - far[i - 1]
        d_here = frr[i] - far[i]
        if d_prev < 0 <= d_here:
            # FAR(a) = FRR(a) with both linear in a in [0, 1] between points i-1 and i
            a = d_prev / (d_prev - d_here)
            eer = far[i - 1] + a * (far[i] - far[i - 1])
            assert abs(eer - (frr[i - 1] + a * (frr[i] - frr[i - 1]))) < 1e-12
            return eer, thresholds[i - 1], thresholds[i]
    raise AssertionError("FRR - FAR never changed sign")  # impossible: starts -1, ends +1


def _brute_min_dcf(target, nontarget, p):
    thresholds, far, frr = _brute_rates(target, nontarget)
    costs = [(p * r + (1.0 - p) * a) / min(p, 1.0 - p) for a, r in zip(far, frr, strict=True)]
    return min(costs)


def _normalised_cost_at(target, nontarget, p, threshold):
    far = sum(1 for x in np.ravel(nontarget) if x >= threshold) / np.size(nontarget)
    frr = sum(1 for x in np.ravel(target) if x < threshold) / np.size(target)
    return (p * frr + (1.0 - p) * far) / min(p, 1.0 - p)


def _check_eer(target, nontarget):
    eer, threshold = utils.equal_error_rate(np.asarray(target), np.asarray(nontarget))
    expected, lower, upper = _brute_eer(target, nontarget)
    assert eer == pytest.approx(expected, abs=1e-6)
    assert math.isfinite(threshold)
    assert lower - 1e-9 <= threshold <= upper + 1e-9
    return eer, threshold


def _check_min_dcf(target, nontarget, p):
    dcf, threshold = utils.min_dcf(np.asarray(target), np.asarray(nontarget), p)
    expected = _brute_min_dcf(target, nontarget, p)
    assert dcf == pytest.approx(expected, abs=1e-6)
    # the returned threshold really reaches that cost
    assert _normalised_cost_at(target, nontarget, p, threshold) == pytest.approx(expected, abs=1e-6)
    return dcf, threshold


# ----------------------------------------------------------------------------------------------
# 1. EER and minDCF
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed,n_target,n_nontarget,separation",
                         [(0, 50, 200, 1.0), (1, 7, 13, 0.5), (2, 200, 50, 2.0),
                          (3, 31, 31, 0.0), (4, 1, 40, 1.0), (5, 40, 1, 1.0), (6, 3, 500, 3.0)])
def test_eer_and_min_dcf_match_brute_force(seed, n_target, n_nontarget, separation):
    rng = np.random.default_rng(seed)
    target = rng.normal(separation, 1.0, n_target)
    nontarget = rng.normal(0.0, 1.0, n_nontarget)
    _check_eer(target, nontarget)
    for p in (0.01, 0.05, 0.5, 0.9):
        _check_min_dcf(target, nontarget, p)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_eer_and_min_dcf_with_ties(seed):
    rng = np.random.default_rng(seed)
    # scores on a coarse grid: many ties within and across the two classes
    target = np.round(rng.normal(0.5, 1.0, 60), 1)
    nontarget = np.round(rng.normal(0.0, 1.0, 90), 1)
    assert set(target) & set(nontarget)
    _check_eer(target, nontarget)
    for p in (0.01, 0.5):
        _check_min_dcf(target, nontarget, p)


def test_all_scores_tied():
    # threshold 0.5: FRR 0, FAR 1; threshold +inf: FRR 1, FAR 0 -> crossing halfway: EER 1/2
    eer, threshold = _check_eer([0.5, 0.5, 0.5], [0.5, 0.5])
    assert eer == pytest.approx(0.5)
    assert threshold == pytest.approx(0.5)


def test_perfect_separation():
    target = np.array([0.8, 0.9, 0.95, 0.7])
    nontarget = np.array([-0.3, 0.1, 0.2, 0.69])
    eer, threshold = _check_eer(target, nontarget)
    assert eer == pytest.approx(0.0, abs=1e-12)
    # at the EER threshold, with accept = score >= threshold, nothing is misclassified
    assert np.all(target >= threshold) and np.all(nontarget < threshold)
    dcf, _ = _check_min_dcf(target, nontarget, 0.01)
    assert dcf == pytest.approx(0.0, abs=1e-12)


def test_single_target_and_single_nontarget():
    _check_eer([0.3], [0.1, 0.2, 0.4, 0.5])
    _check_eer([0.1, 0.2, 0.4, 0.5], [0.3])
    eer, _ = _check_eer([1.0], [0.0])
    assert eer == pytest.approx(0.0, abs=1e-12)
    eer, _ = _check_eer([0.0], [1.0])
    assert eer == pytest.approx(1.0)
    _check_min_dcf([0.3], [0.1, 0.2, 0.4, 0.5], 0.05)
    _check_min_dcf([0.1, 0.2, 0.4, 0.5], [0.3], 0.05)


@pytest.mark.parametrize("shift,scale", [(1000.0, 1.0), (-1000.0, 1.0), (0.0, 1e-3),
                                         (0.0, 1e3), (7.0, 1e-3)])
def test_eer_invariant_to_score_range(shift, scale):
    rng = np.random.default_rng(11)
    target = rng.normal(1.0, 1.0, 80)
    nontarget = rng.normal(0.0, 1.0, 120)
    eer, threshold = _check_eer(target, nontarget)
    moved_eer, moved_threshold = _check_eer(target * scale + shift, nontarget * scale + shift)
    assert moved_eer == pytest.approx(eer, abs=1e-9)
    assert moved_threshold == pytest.approx(threshold * scale + shift, rel=1e-9, abs=1e-9 * scale)
    dcf, _ = _check_min_dcf(target, nontarget, 0.01)
    moved_dcf, _ = _check_min_dcf(target * scale + shift, nontarget * scale + shift, 0.01)
    assert moved_dcf == pytest.approx(dcf, abs=1e-12)


def test_hand_worked_eer_exact_crossing():
    # targets 0.6 0.7 0.8 0.9, nontargets 0.1 0.2 0.3 0.65 (one overlap)
    # thr 0.6 : FRR 0/4, FAR 1/4 (0.65 accepted)      FRR - FAR = -1/4
    # thr 0.65: FRR 1/4 (0.6 rejected), FAR 1/4       FRR - FAR =  0   -> EER = 1/4 at 0.65
    target = [0.6, 0.7, 0.8, 0.9]
    nontarget = [0.1, 0.2, 0.3, 0.65]
    eer, threshold = utils.equal_error_rate(np.array(target), np.array(nontarget))
    assert eer == pytest.approx(0.25, abs=1e-12)
    assert threshold == pytest.approx(0.65, abs=1e-12)
    # minDCF at p = 0.5: thr 0.6 -> (0.5 * 0 + 0.5 * 1/4) / 0.5 = 1/4; thr 0.65 -> 1/2;
    # thr 0.7 -> (0.5 * 1/4 + 0.5 * 0) / 0.5 = 1/4; lower thresholds: FAR >= 1/2 -> >= 1/2
    dcf, dcf_threshold = utils.min_dcf(np.array(target), np.array(nontarget), 0.5)
    assert dcf == pytest.approx(0.25, abs=1e-12)
    assert dcf_threshold in (pytest.approx(0.6), pytest.approx(0.7))


def test_hand_worked_eer_interpolated():
    # targets 0.6 0.7 0.8 0.9, nontargets 0.1 0.65
    # thr 0.65: FRR 1/4, FAR 1/2   (FRR - FAR = -1/4)
    # thr 0.7 : FRR 1/4, FAR 0     (FRR - FAR = +1/4)  -> halfway: FAR = 1/4 = FRR, thr 0.675
    target = [0.6, 0.7, 0.8, 0.9]
    nontarget = [0.1, 0.65]
    eer, threshold = utils.equal_error_rate(np.array(target), np.array(nontarget))
    assert eer == pytest.approx(0.25, abs=1e-12)
    assert threshold == pytest.approx(0.675, abs=1e-12)


@pytest.mark.parametrize("target,nontarget", [([], [0.1, 0.2]), ([0.1, 0.2], []), ([], [])])
def test_empty_input_raises(target, nontarget):
    with pytest.raises(ValueError):
        utils.equal_error_rate(np.array(target), np.array(nontarget))
    with pytest.raises(ValueError):
        utils.min_dcf(np.array(target), np.array(nontarget), 0.01)


# ----------------------------------------------------------------------------------------------
# 2. sliding windows and utterance d-vectors
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_frames,window,expected", [
    (10, 10, [0]),                 # exactly one window
    (4, 10, [0]),                  # shorter than a window
    (1, 10, [0]),
    (20, 10, [0, 5, 10]),          # hop 5 fits exactly
    (23, 10, [0, 5, 10, 13]),      # 10 + 10 = 20 < 23: one more window ending at the last frame
    (11, 10, [0, 1]),
    (17, 7, [0, 3, 6, 9, 10]),     # odd window: hop 3
    (320, 160, [0, 80, 160]),
])
def test_window_starts_hand_cases(n_frames, window, expected):
    assert list(utils.window_starts(n_frames, window)) == expected


@pytest.mark.parametrize("window", [2, 3, 4, 7, 10, 160])
def test_window_starts_cover_and_overlap(window):
    hop = window // 2
    for n_frames in list(range(1, 4 * window + 3)) + [10 * window + 1]:
        starts = list(utils.window_starts(n_frames, window))
        if n_frames <= window:
            assert starts == [0]
            continue
        # count: ceil((n - w) / hop) + 1
        assert len(starts) == -(-(n_frames - window) // hop) + 1
        assert starts[0] == 0 and starts[-1] == n_frames - window
        assert all(b > a for a, b in zip(starts, starts[1:], strict=False))
        # every hop but possibly the last equals window // 2: (at least) 50 % overlap
        assert all(b - a == hop for a, b in zip(starts[:-2], starts[1:-1], strict=True))
        assert 0 < starts[-1] - starts[-2] <= hop
        covered = np.zeros(n_frames, bool)
        for s in starts:
            assert 0 <= s and s + window <= n_frames
            covered[s:s + window] = True
        assert covered.all()


def test_window_starts_window_of_one_frame():
    """--window_frames accepts any positive integer; window 1 must still cover the utterance."""
    starts = list(utils.window_starts(5, 1))
    covered = np.zeros(5, bool)
    for s in starts:
        assert 0 <= s <= 4
        covered[s] = True
    assert covered.all()


@pytest.fixture(scope="module")
def tiny_embedder():
    import model  # TensorFlow only for the tests that need it

    rng = np.random.default_rng(0)
    encoder = model.SpeakerEncoder(hidden=6, proj=3, num_layer=2)
    encoder(np.zeros((1, 2, 4), np.float32))
    for rnn in encoder.rnns:
        rnn.set_weights([rng.normal(0.0, 0.7, w.shape).astype(np.float32)
                         for w in rnn.get_weights()])
    return model, encoder, model.make_embedder(encoder, 4)


def _reference_starts(n_frames, window):
    if n_frames <= window:
        return [0]
    hop = window // 2
    starts = [0]
    while starts[-1] + window < n_frames:
        starts.append(min(starts[-1] + hop, n_frames - window))
    return starts


@pytest.mark.parametrize("batch_size", [256, 2])
def test_utterance_d_vectors(tiny_embedder, batch_size):
    model, encoder, embed = tiny_embedder
    rng = np.random.default_rng(1)
    window = 6
    lengths = [6, 15, 4, 14, 6, 7, 2, 5, 3]  # several short ones share one padded batch
    utterances = [rng.normal(0.0, 1.0, (n, 4)).astype(np.float32) for n in lengths]
    got = model.utterance_d_vectors(embed, utterances, window, batch_size=batch_size)
    assert got.shape == (len(lengths), 3)
    for u, frames in enumerate(utterances):
        if len(frames) <= window:
            # one window: the plain d-vector of the encoder on the whole utterance
            expected = encoder(frames[None]).numpy()[0]
        else:
            vectors = [encoder(frames[None, s:s + window]).numpy()[0]
                       for s in _reference_starts(len(frames), window)]
            assert len(vectors) >= 2
            mean = np.mean(vectors, axis=0)
            expected = mean / np.linalg.norm(mean)
            # sensitivity: pooling is not simply the first window / whole utterance
            assert np.max(np.abs(expected - vectors[0])) > 1e-4
        np.testing.assert_allclose(got[u], expected, atol=1e-5, rtol=0, err_msg=f"utt {u}")
        assert np.linalg.norm(got[u]) == pytest.approx(1.0, abs=1e-5)


# ----------------------------------------------------------------------------------------------
# 3. adaptive s-norm
# ----------------------------------------------------------------------------------------------

def _reference_as_norm(scores, enroll_cohort, test_cohort, top_k):
    out = []
    for t, score in enumerate(scores):
        top_e = sorted(enroll_cohort[t], reverse=True)[:top_k]
        top_t = sorted(test_cohort[t], reverse=True)[:top_k]
        z_e = (score - statistics.fmean(top_e)) / statistics.pstdev(top_e)
        z_t = (score - statistics.fmean(top_t)) / statistics.pstdev(top_t)
        out.append(0.5 * (z_e + z_t))
    return out


def test_as_norm_toy_cohort_by_hand():
    # one trial, cohort of 4, top 2: enroll top {0.5, 0.3} -> mean 0.4, std 0.1;
    # test top {0.2, 0.0} -> mean 0.1, std 0.1; score 0.6 -> 0.5 * (2 + 5) = 3.5
    got = utils.as_norm(np.array([0.6]), np.array([[0.1, 0.5, -0.2, 0.3]]),
                        np.array([[0.0, -0.4, 0.2, -0.1]]), top_k=2)
    np.testing.assert_allclose(got, [3.5], atol=1e-9)


@pytest.mark.parametrize("top_k", [2, 3, 5])
def test_as_norm_matches_direct_formula(top_k):
    rng = np.random.default_rng(3)
    scores = rng.normal(0.0, 1.0, 4)
    enroll_cohort = rng.normal(0.2, 0.5, (4, 5))
    test_cohort = rng.normal(-0.1, 0.3, (4, 5))
    got = utils.as_norm(scores, enroll_cohort, test_cohort, top_k)
    expected = _reference_as_norm(scores, enroll_cohort, test_cohort, top_k)
    np.testing.assert_allclose(got, expected, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("batch", [1, 3, 20])
def test_xla_embedder_matches_plain_graph(tiny_embedder, batch):
    model, encoder, plain = tiny_embedder
    windows = np.random.default_rng(batch).normal(0.0, 1.0, (batch, 6, 4)).astype(np.float32)
    compiled = model.make_embedder(encoder, 4, window=6)
    np.testing.assert_allclose(compiled(windows), plain(windows), atol=1e-5)
    np.testing.assert_allclose(plain(windows), encoder(windows).numpy(), atol=1e-6)
