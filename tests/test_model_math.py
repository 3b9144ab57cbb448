"""GE2E model maths (Wan et al., ICASSP 2018) checked against independent numpy references.

Every expected value here is computed in the test itself (plain numpy / explicit loops / hand
arithmetic); nothing is copied from running the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

import configuration
import model
import training

# ----------------------------------------------------------------------------------------------
# helpers: independent references
# ----------------------------------------------------------------------------------------------

def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _randomise_encoder(encoder, rng, scale=0.6):
    """Replace every weight of the encoder (kernel, bias, projection) with random values."""
    for rnn in encoder.rnns:
        rnn.set_weights([rng.normal(0.0, scale, w.shape).astype(np.float32)
                         for w in rnn.get_weights()])


def _cell_weights(rnn):
    """(kernel, bias, projection) of one keras RNN layer's LSTMP cell, as float64 numpy."""
    cell = rnn.cell
    return (np.asarray(cell.kernel.numpy(), np.float64),
            np.asarray(cell.bias.numpy(), np.float64),
            np.asarray(cell.projection.numpy(), np.float64))


def _numpy_lstmp_encoder(features, layers):
    """TF1 LSTMCell(num_proj) stack, last frame of last layer, L2-normalised. features [B,T,F]."""
    x = np.asarray(features, np.float64)
    batch, steps, _ = x.shape
    for kernel, bias, projection in layers:
        hidden = projection.shape[0]
        proj = projection.shape[1]
        assert kernel.shape == (x.shape[-1] + proj, 4 * hidden)
        h = np.zeros((batch, proj))
        c = np.zeros((batch, hidden))
        outputs = np.zeros((batch, steps, proj))
        for t in range(steps):
            z = np.concatenate([x[:, t, :], h], axis=1) @ kernel + bias
            i = z[:, 0 * hidden:1 * hidden]
            j = z[:, 1 * hidden:2 * hidden]
            f = z[:, 2 * hidden:3 * hidden]
            o = z[:, 3 * hidden:4 * hidden]
            c = _sigmoid(f + 1.0) * c + _sigmoid(i) * np.tanh(j)
            h = (_sigmoid(o) * np.tanh(c)) @ projection
            outputs[:, t, :] = h
        x = outputs
    last = x[:, -1, :]
    return last / np.linalg.norm(last, axis=1, keepdims=True)


def _cos(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def _loop_similarity(emb, w, b):
    """Eqs. 1, 8, 9, 5 by explicit loops. emb [N,M,P] -> S [N,M,N]."""
    n, m, _ = emb.shape
    s = np.zeros((n, m, n))
    for j in range(n):
        for i in range(m):
            for k in range(n):
                if k == j:
                    others = [emb[j, q] for q in range(m) if q != i]
                    centroid = sum(others) / (m - 1)
                else:
                    centroid = sum(emb[k, q] for q in range(m)) / m
                s[j, i, k] = w * _cos(emb[j, i], centroid) + b
    return s


def _loop_softmax_loss(s):
    n, m, _ = s.shape
    total = 0.0
    for j in range(n):
        for i in range(m):
            total += -s[j, i, j] + math.log(sum(math.exp(s[j, i, k]) for k in range(n)))
    return total


def _loop_contrast_loss(s):
    n, m, _ = s.shape
    sig = lambda v: 1.0 / (1.0 + math.exp(-v))  # noqa: E731
    total = 0.0
    for j in range(n):
        for i in range(m):
            hardest = max(sig(s[j, i, k]) for k in range(n) if k != j)
            total += 1.0 - sig(s[j, i, j]) + hardest
    return total


# ----------------------------------------------------------------------------------------------
# 1. LSTMP forward pass and gradient flow
# ----------------------------------------------------------------------------------------------

def test_encoder_matches_numpy_lstmp():
    rng = np.random.default_rng(0)
    encoder = model.SpeakerEncoder(hidden=8, proj=5, num_layer=3)
    features = rng.normal(0.0, 1.0, (3, 7, 4)).astype(np.float32)
    encoder(features)  # build
    _randomise_encoder(encoder, rng)

    layers = [_cell_weights(rnn) for rnn in encoder.rnns]
    # shapes as specified: kernel [(in+proj), 4*hidden], bias [4*hidden], projection [hidden, proj]
    assert [k.shape for k, _, _ in layers] == [(4 + 5, 32), (5 + 5, 32), (5 + 5, 32)]
    assert all(bias.shape == (32,) and proj.shape == (8, 5) for _, bias, proj in layers)
    assert all(np.any(bias != 0) for _, bias, _ in layers)  # random, not default zeros

    got = encoder(features).numpy()
    expected = _numpy_lstmp_encoder(features, layers)
    assert got.shape == (3, 5)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)

    # sensitivity of the comparison: the reference with the i and f gate blocks swapped, or
    # without the forget bias of 1, is far from the encoder output
    swapped = []
    for kernel, bias, projection in layers:
        h = projection.shape[0]
        order = np.r_[2 * h:3 * h, h:2 * h, 0:h, 3 * h:4 * h]
        swapped.append((kernel[:, order], bias[order], projection))
    assert np.max(np.abs(_numpy_lstmp_encoder(features, swapped) - got)) > 1e-3
    no_forget_bias = [(k, b - np.r_[np.zeros(16), np.ones(8), np.zeros(8)], p)
                      for k, b, p in layers]  # f + 1 - 1: forget bias cancelled
    assert np.max(np.abs(_numpy_lstmp_encoder(features, no_forget_bias) - got)) > 1e-3


def test_ensemble_cosine_is_the_mean_of_member_cosines():
    rng = np.random.default_rng(4)
    members = [model.SpeakerEncoder(hidden=8, proj=5, num_layer=2),
               model.SpeakerEncoder(hidden=6, proj=3, num_layer=3)]
    a, b = (rng.normal(0.0, 1.0, (4, 7, 4)).astype(np.float32) for _ in range(2))
    for member in members:
        member(a)
        _randomise_encoder(member, rng)
    ensemble = model.Ensemble(members)
    got_a, got_b = ensemble(a).numpy(), ensemble(b).numpy()
    assert got_a.shape == (4, 5 + 3)
    np.testing.assert_allclose(np.linalg.norm(got_a, axis=1), 1.0, atol=1e-6)
    member_cosines = [np.sum(m(a).numpy() * m(b).numpy(), axis=1) for m in members]
    np.testing.assert_allclose(np.sum(got_a * got_b, axis=1), np.mean(member_cosines, axis=0),
                               atol=1e-6)
    assert np.max(np.abs(member_cosines[0] - member_cosines[1])) > 1e-2  # members disagree


def test_gradients_reach_every_trainable_variable():
    rng = np.random.default_rng(2)
    n, m = 3, 2
    encoder = model.SpeakerEncoder(hidden=8, proj=5, num_layer=3)
    features = tf.constant(rng.normal(0.0, 1.0, (n * m, 5, 4)).astype(np.float32))
    encoder(features)
    _randomise_encoder(encoder, rng, scale=0.4)
    scale = model.GE2EScale()
    scale.build()
    variables = list(scale.trainable_variables) + list(encoder.trainable_variables)
    # 2 scale variables + 3 layers x (kernel, bias, projection)
    assert len(variables) == 2 + 3 * 3
    with tf.GradientTape(persistent=True) as tape:
        w, b = scale()
        emb = tf.reshape(encoder(features, training=True), (n, m, -1))
        losses = {kind: model.ge2e_loss(emb, w, b, kind) for kind in ("softmax", "contrast")}
    for kind, loss in losses.items():
        grads = tape.gradient(loss, variables)
        for var, grad in zip(variables, grads, strict=True):
            assert grad is not None, f"{kind}: no gradient for {var.path}"
            if kind == "softmax" and var is scale.b:
                # eq. 6 is invariant to a common shift of all S_ji,k, so dL/db = 0 exactly in
                # exact arithmetic (b only matters for the contrast loss, eq. 7).
                assert abs(float(grad)) < 1e-4
                continue
            assert np.max(np.abs(grad.numpy())) > 1e-6, f"{kind}: zero gradient for {var.path}"


# ----------------------------------------------------------------------------------------------
# 2. similarity matrix and losses vs explicit loops
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_similarity_matrix_matches_loops(seed):
    rng = np.random.default_rng(seed)
    emb = rng.normal(0.0, 1.0, (4, 3, 6))
    w, b = 3.7, -1.3
    got = model.similarity_matrix(tf.constant(emb, tf.float32), tf.constant(w), tf.constant(b))
    assert got.shape == (4, 3, 4)
    expected = _loop_similarity(emb, w, b)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5, rtol=0)


def test_similarity_uses_exclusive_centroid_only_on_own_speaker():
    """Sensitivity: the loop reference with inclusive centroids would differ on the diagonal."""
    rng = np.random.default_rng(5)
    emb = rng.normal(0.0, 1.0, (4, 3, 6))
    got = model.similarity_matrix(tf.constant(emb, tf.float32), 1.0, 0.0).numpy()
    for j in range(4):
        for i in range(3):
            inclusive = _cos(emb[j, i], emb[j].mean(axis=0))
            assert abs(got[j, i, j] - inclusive) > 1e-4


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_losses_match_loops(seed):
    rng = np.random.default_rng(10 + seed)
    emb = rng.normal(0.0, 1.0, (4, 3, 6))
    w, b = 5.0 + seed, -2.0 - seed
    s_ref = _loop_similarity(emb, w, b)
    s = tf.constant(s_ref, tf.float32)
    np.testing.assert_allclose(float(model.ge2e_softmax_loss(s)), _loop_softmax_loss(s_ref),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(model.ge2e_contrast_loss(s)), _loop_contrast_loss(s_ref),
                               rtol=1e-5, atol=1e-5)
    e = tf.constant(emb, tf.float32)
    np.testing.assert_allclose(float(model.ge2e_loss(e, w, b, "softmax")),
                               _loop_softmax_loss(s_ref), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(model.ge2e_loss(e, w, b, "contrast")),
                               _loop_contrast_loss(s_ref), rtol=1e-5, atol=1e-5)


def test_losses_on_arbitrary_similarity_tensor():
    """The losses are functions of S alone: check on an unstructured random S [N,M,N]."""
    rng = np.random.default_rng(3)
    s_ref = rng.normal(0.0, 4.0, (5, 4, 5))
    s = tf.constant(s_ref, tf.float32)
    np.testing.assert_allclose(float(model.ge2e_softmax_loss(s)), _loop_softmax_loss(s_ref),
                               rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(float(model.ge2e_contrast_loss(s)), _loop_contrast_loss(s_ref),
                               rtol=1e-5, atol=1e-5)


def test_ge2e_loss_rejects_unknown_kind():
    emb = tf.constant(np.random.default_rng(0).normal(size=(2, 2, 3)), tf.float32)
    with pytest.raises(ValueError):
        model.ge2e_loss(emb, 10.0, -5.0, "triplet")
    with pytest.raises(ValueError):
        model.ge2e_loss(emb, 10.0, -5.0, "Softmax")


# ----------------------------------------------------------------------------------------------
# 3. hand-computed 3 speakers x 2 utterances example
# ----------------------------------------------------------------------------------------------

def _unit(degrees):
    rad = math.radians(degrees)
    return [math.cos(rad), math.sin(rad)]


def _hand_similarity():
    """Expected S for the embeddings below, with w = 10, b = -5, worked out by hand.

    speaker 0: 0 deg, 90 deg  -> centroid direction 45 deg; each utterance's exclusive centroid
               is the other utterance, cos(90 deg) = 0
    speaker 1: 180 deg, 240 deg -> centroid 210 deg; own cos(60 deg) = 1/2
    speaker 2: 300 deg, 300 deg -> centroid 300 deg; own cos(0) = 1
    """
    r2, r3, r6 = math.sqrt(2), math.sqrt(3), math.sqrt(6)
    cos = [
        # vs c0 (45)            vs c1 (210)       vs c2 (300)
        [[0.0,                  -r3 / 2,           0.5],          # e00 at 0:   own, 210, 300
         [0.0,                  -0.5,              -r3 / 2]],     # e01 at 90:  own, 120, 210
        [[-r2 / 2,              0.5,               -0.5],         # e10 at 180: 135, own, 120
         [-(r6 + r2) / 4,       0.5,               0.5]],         # e11 at 240: 195, own, 60
        [[-(r6 - r2) / 4,       0.0,               1.0],          # e20 at 300: 255, 90, own
         [-(r6 - r2) / 4,       0.0,               1.0]],         # e21 at 300
    ]
    return [[[10.0 * c - 5.0 for c in row] for row in utt] for utt in cos]


def test_hand_computed_example():
    emb = tf.constant([[_unit(0), _unit(90)],
                       [_unit(180), _unit(240)],
                       [_unit(300), _unit(300)]], tf.float32)
    s = _hand_similarity()
    got = model.similarity_matrix(emb, tf.constant(10.0), tf.constant(-5.0)).numpy()
    np.testing.assert_allclose(got, np.array(s), atol=1e-5, rtol=0)

    # softmax loss, eq. 6 summed: sum over utterances of -S_own + log(sum_k exp S_k)
    e, log = math.exp, math.log
    r2, r3, r6 = math.sqrt(2), math.sqrt(3), math.sqrt(6)
    expected_softmax = (
        5.0 + log(e(-5.0) + e(-5.0 * r3 - 5.0) + e(0.0))                 # e00: own -5
        + 5.0 + log(e(-5.0) + e(-10.0) + e(-5.0 * r3 - 5.0))             # e01: own -5
        + 0.0 + log(e(-5.0 * r2 - 5.0) + e(0.0) + e(-10.0))              # e10: own 0
        + 0.0 + log(e(-2.5 * (r6 + r2) - 5.0) + e(0.0) + e(0.0))         # e11: own 0
        + 2 * (-5.0 + log(e(-2.5 * (r6 - r2) - 5.0) + e(-5.0) + e(5.0)))  # e20, e21: own 5
    )
    sig = lambda v: 1.0 / (1.0 + math.exp(-v))  # noqa: E731
    # contrast loss, eq. 7 summed: 1 - sigma(S_own) + max over other speakers of sigma(S_k)
    expected_contrast = (
        (1.0 - sig(-5.0) + sig(0.0))          # e00: others -5 sqrt3 - 5, 0   -> max 0
        + (1.0 - sig(-5.0) + sig(-10.0))      # e01: others -10, -5 sqrt3 - 5 -> max -10
        + (1.0 - sig(0.0) + sig(-10.0))       # e10: others -5 sqrt2 - 5, -10 -> max -10
        + (1.0 - sig(0.0) + sig(0.0))         # e11: others ~-14.7, 0         -> max 0
        + 2 * (1.0 - sig(5.0) + sig(-5.0))    # e20, e21: others ~-7.6, -5    -> max -5
    )
    got_softmax = float(model.ge2e_loss(emb, 10.0, -5.0, "softmax"))
    got_contrast = float(model.ge2e_loss(emb, 10.0, -5.0, "contrast"))
    assert got_softmax == pytest.approx(expected_softmax, abs=1e-4)
    assert got_contrast == pytest.approx(expected_contrast, abs=1e-5)


# ----------------------------------------------------------------------------------------------
# 4. the compiled training step: clipping, 0.01 scaling of w/b gradients, SGD update
# ----------------------------------------------------------------------------------------------

def _small_config(loss, clip_norm, lr=0.5):
    return configuration.parse_config(
        ["--hidden", "8", "--proj", "4", "--num_layer", "2", "--N", "3", "--M", "2",
         "--n_mels", "5", "--loss", loss, "--optim", "sgd", "--lr", str(lr),
         "--clip_norm", str(clip_norm), "--lr_decay_every", "1000"])


def test_train_step_update():
    # contrast loss so that dL/db != 0 (the softmax loss is shift-invariant in b); a raw w < 0 so
    # that the |w| of GE2EScale is exercised; clip_norm far below the gradient norm. One case
    # only: tracing the compiled step dominates the run time.
    loss, clip_norm, w0 = "contrast", 0.05, -4.0
    config = _small_config(loss, clip_norm)
    tf.keras.utils.set_random_seed(7)
    encoder, scale = model.build_model(config.network, config.n_mels)
    rng = np.random.default_rng(7)
    _randomise_encoder(encoder, rng, scale=0.5)
    scale.w.assign(w0)
    scale.b.assign(-3.0)
    optimizer = training.build_optimizer(config.training)
    step = training.make_train_step(encoder, scale, optimizer, config.training,
                                   config.n_mels)
    features = tf.constant(rng.normal(0.0, 1.0, (config.N * config.M, 6, config.n_mels)),
                           tf.float32)

    scale_vars = [scale.w, scale.b]
    encoder_vars = list(encoder.trainable_variables)
    assert {id(v) for v in scale.trainable_variables} == {id(v) for v in scale_vars}
    before = [v.numpy().copy() for v in scale_vars + encoder_vars]

    # reference: plain tape, explicit global-norm clipping, w/b scaling, SGD
    with tf.GradientTape() as tape:
        emb = tf.reshape(encoder(features, training=True), (config.N, config.M, -1))
        ref_loss = model.ge2e_loss(emb, tf.abs(scale.w), scale.b, loss)
    grads = [g.numpy().astype(np.float64) for g in tape.gradient(ref_loss, scale_vars
                                                                  + encoder_vars)]
    global_norm = math.sqrt(sum(float(np.sum(g * g)) for g in grads))
    factor = min(1.0, clip_norm / global_norm)
    clipped = [g * factor for g in grads]
    clipped[0] = clipped[0] * 0.01
    clipped[1] = clipped[1] * 0.01
    expected = [p - config.lr * g for p, g in zip(before, clipped, strict=True)]
    assert global_norm > 10 * clip_norm  # clipping really is active
    assert abs(grads[0]) > 1e-3 and abs(grads[1]) > 1e-3  # w and b gradients are not trivial

    got_loss, got_norm = step(features)
    assert float(got_loss) == pytest.approx(float(ref_loss), rel=1e-5)
    assert float(got_norm) == pytest.approx(global_norm, rel=1e-4)
    after = [v.numpy() for v in scale_vars + encoder_vars]
    for var, exp, got, old in zip(scale_vars + encoder_vars, expected, after, before,
                                  strict=True):
        np.testing.assert_allclose(got, exp, atol=1e-6, rtol=1e-5, err_msg=var.path)
        assert np.max(np.abs(got - old)) > 1e-7, f"{var.path} did not move"

    # effective w = |w| stays positive even though the raw variable may be negative
    w_eff, _ = scale()
    assert float(w_eff) > 0
    assert float(w_eff) == pytest.approx(abs(float(scale.w.numpy())))


def test_scale_returns_abs_w():
    scale = model.GE2EScale()
    scale.build()
    w, b = scale()
    assert float(w) == pytest.approx(10.0) and float(b) == pytest.approx(-5.0)
    scale.w.assign(-2.5)
    w, _ = scale()
    assert float(w) == pytest.approx(2.5)
    emb = tf.constant(np.random.default_rng(4).normal(size=(3, 2, 4)), tf.float32)
    s_ref = _loop_similarity(emb.numpy().astype(np.float64), 2.5, -5.0)
    w, b = scale()
    np.testing.assert_allclose(model.similarity_matrix(emb, w, b).numpy(), s_ref, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# 4. the hand-written backward pass, masking, and --precision bf16
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_layer, steps", [(3, 9), (1, 4), (2, 1), (4, 3)])
def test_training_gradients_match_autodiff_of_the_recurrence(num_layer, steps):
    # Training (no mask) runs the hand-written BPTT; with a mask the layers are differentiated by
    # TensorFlow's autodiff of the time loop: an all-True mask gives the reference. The shapes
    # cover the wavefront's ramps: one layer (none), and as few frames as a ramp has steps.
    rng = np.random.default_rng(5)
    encoder = model.SpeakerEncoder(hidden=8, proj=5, num_layer=num_layer)
    features = tf.constant(rng.normal(0.0, 1.0, (6, steps, 4)).astype(np.float32))
    encoder(features)
    _randomise_encoder(encoder, rng, scale=0.5)
    weights = tf.constant(rng.normal(size=(6, 5)).astype(np.float32))
    with tf.GradientTape(persistent=True) as tape:
        fused = encoder(features, training=True)
        autodiff = encoder(features, mask=tf.ones((6, steps), tf.bool), training=True)
        losses = [tf.reduce_sum(out * weights) for out in (fused, autodiff)]
    expected = _numpy_lstmp_encoder(features.numpy(), [_cell_weights(r) for r in encoder.rnns])
    np.testing.assert_allclose(fused.numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(fused.numpy(), autodiff.numpy(), atol=1e-6)
    for var in encoder.trainable_variables:
        got, want = (tape.gradient(loss, var).numpy() for loss in losses)
        assert np.max(np.abs(want)) > 1e-3, var.path
        np.testing.assert_allclose(got, want, atol=1e-5 * np.max(np.abs(want)), err_msg=var.path)


@pytest.mark.parametrize("dim", [None, 3])
def test_the_oneDNN_frame_equals_the_fused_xla_frame(dim):
    # Which of the two an fp32 run takes depends on the CPU (AVX-512 or not), and bf16 always
    # takes the oneDNN one, so the tests above reach only one of them on a given machine. Both
    # backward passes are checked against autodiff of the forward frame.
    rng = np.random.default_rng(8)
    units, proj, width, rows = 6, 4, 3, 5

    def draw(*shape):
        return tf.constant(rng.normal(0.0, 0.7, shape).astype(np.float32))

    x, h, c = draw(rows, width), draw(rows, proj), draw(rows, units)
    kernel, bias, projection = draw(width + proj, 4 * units), draw(4 * units), draw(units, proj)
    dh, dc_next = draw(rows, proj), draw(rows, units)
    with tf.GradientTape() as tape:
        tape.watch([x, h, c, kernel, bias, projection])
        h_new, c_new, sigma, tanh_c, m = model._frame(x, h, c, kernel, bias, projection)
        loss = tf.reduce_sum(h_new * dh) + tf.reduce_sum(c_new * dc_next)
    want = tape.gradient(loss, [x, h, c, kernel, bias, projection])
    for got, ref in zip(model._fused_frame(x, h, c, kernel, bias, projection),
                        (h_new, c_new, sigma, tanh_c, m)):
        np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=1e-6)
    zeros = {"kernel": tf.zeros(kernel.shape), "bias": tf.zeros(bias.shape),
             "projection": tf.zeros(projection.shape)}
    back_kernel = kernel if dim else kernel[width:]
    for grads_of in (model._frame_grads, model._fused_frame_grads):
        dx, dh_prev, dc_prev, grads = grads_of(dh, dc_next, x, h, c, sigma, tanh_c, m,
                                               back_kernel, projection, dim, zeros)
        assert (dx is None) == (dim is None)
        if dim:
            np.testing.assert_allclose(dx.numpy(), want[0].numpy(), atol=1e-5)
        for got, ref in zip((dh_prev, dc_prev, grads["kernel"], grads["bias"],
                             grads["projection"]), want[1:]):
            np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=1e-5)


def test_masked_rows_read_their_last_real_frame():
    rng = np.random.default_rng(6)
    encoder = model.SpeakerEncoder(hidden=8, proj=5, num_layer=2)
    features = rng.normal(0.0, 1.0, (3, 7, 4)).astype(np.float32)
    encoder(features)
    _randomise_encoder(encoder, rng)
    lengths = np.array([7, 4, 2])
    padded = features * (np.arange(7)[None, :, None] < lengths[:, None, None])
    got = encoder(padded, mask=np.arange(7)[None, :] < lengths[:, None]).numpy()
    layers = [_cell_weights(rnn) for rnn in encoder.rnns]
    for row, length in enumerate(lengths):
        expected = _numpy_lstmp_encoder(features[row:row + 1, :length], layers)[0]
        np.testing.assert_allclose(got[row], expected, atol=1e-5)


needs_bf16 = pytest.mark.skipif(not model.bf16_supported(),
                                reason="CPU without avx512_bf16 / amx_bf16")


def _sized_config(precision):
    return configuration.parse_config(["--hidden", "64", "--proj", "32", "--num_layer", "3",
                                       "--N", "4", "--M", "3", "--precision", precision,
                                       "--optim", "sgd", "--lr", "0.05"])


def _sized_build(precision: str):
    config = _sized_config(precision)
    return model.build_model(config.network, config.n_mels)


@needs_bf16
def test_bf16_forward_within_bfloat16_rounding_of_the_reference(tmp_path):
    # bfloat16 keeps 8 significant bits (relative rounding 2^-9 = 0.2 % per operand); through
    # three layers of 40 frames the d-vector components (unit vector, |e_k| ~ 0.18) move by
    # ~3e-3 here; 2e-2 bounds that with margin, while fp32 stays at 1e-5.
    rng = np.random.default_rng(8)
    fp32, _ = _sized_build("fp32")
    _randomise_encoder(fp32, rng, scale=0.15)
    features = rng.normal(0.0, 1.0, (8, 40, 40)).astype(np.float32)
    expected = _numpy_lstmp_encoder(features, [_cell_weights(rnn) for rnn in fp32.rnns])
    # The bf16 model reads the fp32 model's checkpoint: the variables are the same float32 ones.
    scale = model.GE2EScale()
    scale.build()
    path = model.checkpoint_of(fp32, scale).save(str(tmp_path / "ckpt"))
    bf16, bf16_scale = _sized_build("bf16")
    model.restore_checkpoint(model.checkpoint_of(bf16, bf16_scale), path)
    assert all(v.dtype == "float32" for v in bf16.variables)
    for a, b in zip(fp32.get_weights(), bf16.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)

    np.testing.assert_allclose(fp32(features).numpy(), expected, atol=1e-5)
    got = bf16(features).numpy()
    error = np.max(np.abs(got - expected))
    assert 1e-4 < error < 2e-2, error  # bf16 really ran, and within its rounding
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    assert np.min(np.sum(got * expected, axis=1)) > 0.999


@needs_bf16
def test_bf16_training_reduces_the_loss():
    config = _sized_config("bf16")
    keras_seed = 3
    tf.keras.utils.set_random_seed(keras_seed)
    encoder, scale = model.build_model(config.network, config.n_mels)
    optimizer = training.build_optimizer(config.training)
    step = training.make_train_step(encoder, scale, optimizer, config.training,
                                   config.n_mels)
    rng = np.random.default_rng(keras_seed)
    # Each speaker's utterances share a mean, so there is something to learn.
    speakers = rng.normal(0.0, 1.0, (config.N, 1, 1, config.n_mels))
    features = speakers + 0.5 * rng.normal(0.0, 1.0, (config.N, config.M, 30, config.n_mels))
    features = tf.constant(features.reshape(-1, 30, config.n_mels), tf.float32)
    losses = [float(step(features)[0]) for _ in range(15)]
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(v.dtype == "float32" for v in encoder.variables + scale.variables)


def test_bf16_is_refused_on_a_cpu_without_it(tmp_path, monkeypatch):
    with_bf16, without = tmp_path / "with", tmp_path / "without"
    with_bf16.write_text("flags\t\t: fpu avx512f avx512_bf16 avx512_vnni\n")
    without.write_text("flags\t\t: fpu avx2 avx512f avx512_vnni\n")
    assert model.bf16_supported(str(with_bf16)) and not model.bf16_supported(str(without))
    assert not model.bf16_supported(str(tmp_path / "missing"))
    monkeypatch.setattr(model, "bf16_supported", lambda: False)
    with pytest.raises(ValueError, match=r"^--precision bf16: this CPU has no bfloat16"):
        _sized_build("bf16")
    _sized_build("fp32")


def test_fp32_frames_fuse_their_matmuls_only_without_avx512(tmp_path):
    cpus = {"avx2": ("flags\t\t: fpu avx2 fma avx512fp16\n", True),
            "avx512": ("flags\t\t: fpu avx2 avx512f avx512bw\n", False)}
    for name, (flags, fused) in cpus.items():
        (tmp_path / name).write_text(flags)
        assert model._fuse_fp32_matmuls(str(tmp_path / name)) is fused, name


def test_mean_norm_feeds_the_numpy_lstmp_the_mean_removed_frames():
    rng = np.random.default_rng(7)
    features = rng.normal(0.0, 1.0, (3, 9, 4)).astype(np.float32)
    for lstmp in configuration.LSTMP_PATHS:
        encoder = model.SpeakerEncoder(hidden=8, proj=5, num_layer=2, lstmp=lstmp,
                                       mean_norm=True)
        encoder(features)
        _randomise_encoder(encoder, np.random.default_rng(8))
        layers = [_cell_weights(rnn) for rnn in encoder.rnns]
        centred = features - features.mean(axis=1, keepdims=True)
        np.testing.assert_allclose(encoder(features).numpy(),
                                   _numpy_lstmp_encoder(centred, layers), atol=1e-5, rtol=0)
        # A fixed colouring of every frame (a channel's gain per band) cancels ...
        channel = rng.normal(0.0, 3.0, (1, 1, 4)).astype(np.float32)
        np.testing.assert_allclose(encoder(features + channel).numpy(),
                                   encoder(features).numpy(), atol=1e-5, rtol=0)
        # ... and padding after a row's real frames changes neither its mean nor its d-vector.
        padded = np.concatenate([features, rng.normal(5.0, 1.0, (3, 4, 4))], 1).astype(np.float32)
        mask = np.arange(13)[None, :] < np.array([[9], [9], [9]])
        np.testing.assert_allclose(encoder(padded, mask=tf.constant(mask)).numpy(),
                                   encoder(features).numpy(), atol=1e-5, rtol=0)
    plain = model.SpeakerEncoder(hidden=8, proj=5, num_layer=2)
    plain(features)
    plain.set_weights(encoder.get_weights())
    assert np.max(np.abs(plain(features + channel).numpy() - plain(features).numpy())) > 1e-3
