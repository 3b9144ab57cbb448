"""--lstmp reference (LSTMPCell.call under keras.layers.RNN, autodiff) against the wavefront kernel
(hand-written BPTT) and against a plain-numpy LSTMP with float64 finite differences."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import tensorflow as tf
from test_model_math import (
    _cell_weights,
    _loop_contrast_loss,
    _loop_similarity,
    _loop_softmax_loss,
    _numpy_lstmp_encoder,
    _randomise_encoder,
)

import configuration
import model
import training

N, M, T, MELS = 3, 3, 24, 6
LOSSES = {"softmax": _loop_softmax_loss, "contrast": _loop_contrast_loss}


def _config(lstmp: str):
    return configuration.parse_config(
        ["--hidden", "8", "--proj", "5", "--num_layer", "3", "--N", str(N), "--M", str(M),
         "--n_mels", str(MELS), "--lstmp", lstmp, "--optim", "sgd", "--lr", "0.5",
         "--lr_decay_every", "1000"])


def _build(lstmp: str):
    config = _config(lstmp)
    return model.build_model(config.network, config.n_mels)


def _twin_models(seed: int):
    """A kernel and a reference model holding the same random weights (bias included)."""
    rng = np.random.default_rng(seed)
    kernel, kernel_scale = _build("kernel")
    reference, reference_scale = _build("reference")
    _randomise_encoder(kernel, rng, scale=0.5)
    reference.set_weights(kernel.get_weights())
    for scale in (kernel_scale, reference_scale):
        scale.w.assign(-4.0)  # GE2EScale's |w| is exercised
        scale.b.assign(-2.0)
    return (kernel, kernel_scale), (reference, reference_scale), rng


def _numpy_dvectors(features, lengths, layers):
    """The numpy LSTMP's d-vectors; a row with a length is read at its last real frame."""
    if lengths is None:
        return _numpy_lstmp_encoder(features, layers)
    return np.concatenate([_numpy_lstmp_encoder(features[row:row + 1, :length], layers)
                           for row, length in enumerate(lengths)])


def _numpy_loss(params, features, lengths, kind):
    """GE2E loss (explicit loops) of the numpy LSTMP; params = [w, b, kernel, bias, proj, ...]."""
    w, b, *flat = params
    layers = [flat[i:i + 3] for i in range(0, len(flat), 3)]
    emb = _numpy_dvectors(features, lengths, layers).reshape(N, M, -1)
    return LOSSES[kind](_loop_similarity(emb, abs(float(w)), float(b)))


@pytest.mark.parametrize("masked", [False, True])
def test_reference_and_kernel_agree_on_d_vectors_losses_and_every_gradient(masked):
    (kernel, kernel_scale), (reference, reference_scale), rng = _twin_models(1)
    features = rng.normal(0.0, 1.0, (N * M, T, MELS)).astype(np.float32)
    lengths = mask = None
    if masked:
        lengths = np.array([T, 19, 2, T, 11, 7, 1, 16, 23])
        mask = np.arange(T)[None, :] < lengths[:, None]
        # Padding holds garbage: only the mask may keep it out.
        features = np.where(mask[:, :, None], features, 5.0 * features)
    x64 = features.astype(np.float64)
    layers = [_cell_weights(rnn) for rnn in kernel.rnns]
    expected = _numpy_dvectors(x64, lengths, layers)

    # Unmasked, the kernel trains with its hand-written BPTT; masked, with autodiff of its loops.
    got = {}
    for name, (encoder, scale) in (("kernel", (kernel, kernel_scale)),
                                   ("reference", (reference, reference_scale))):
        variables = list(scale.trainable_variables) + list(encoder.trainable_variables)
        with tf.GradientTape(persistent=True) as tape:
            w, b = scale()
            emb = encoder(features, mask=mask, training=True)
            losses = {kind: model.ge2e_loss(tf.reshape(emb, (N, M, -1)), w, b, kind)
                      for kind in LOSSES}
        got[name] = {"emb": emb.numpy(), "loss": {k: float(v) for k, v in losses.items()},
                     "grads": {k: [g.numpy() for g in tape.gradient(v, variables)]
                               for k, v in losses.items()}}
        # fp32 through 3 layers of 24 frames stays within ~1e-6 of float64.
        np.testing.assert_allclose(got[name]["emb"], expected, atol=1e-5, err_msg=name)
    assert np.max(np.abs(expected[:, None] - expected[None, :])) > 0.1  # rows differ
    np.testing.assert_allclose(got["reference"]["emb"], got["kernel"]["emb"], atol=1e-5)

    params = [np.float64(kernel_scale.w.numpy()), np.float64(kernel_scale.b.numpy())]
    params += [weight for layer in layers for weight in layer]
    for kind in LOSSES:
        loss = _numpy_loss(params, x64, lengths, kind)
        for name in got:
            assert got[name]["loss"][kind] == pytest.approx(loss, rel=1e-5), (name, kind)
        for index, (ref, ker) in enumerate(zip(got["reference"]["grads"][kind],
                                               got["kernel"]["grads"][kind], strict=True)):
            if kind == "softmax" and index == 1:
                # eq. 6 is invariant to a common shift b of all S_ji,k: dL/db = 0 exactly.
                assert abs(float(ref)) < 1e-4 and abs(float(ker)) < 1e-4
                continue
            assert np.max(np.abs(ref)) > 1e-3, (kind, index)
            # dL/dw and dL/db sum N*M terms of size ~1 that nearly cancel: their fp32 error is
            # absolute (~1e-6), not relative to the small sum.
            tolerance = 1e-5 if index < 2 else 1e-5 * np.max(np.abs(ref))
            np.testing.assert_allclose(ref, ker, atol=tolerance, err_msg=f"{kind} #{index}")
            # Independent: the float64 numpy loss's central difference along a random
            # direction d (truncation ~eps^2 ~1e-10). fp32 puts <grad, d> within ~5e-7 |grad||d|
            # of it; the bound is 1e-5 |grad||d|, or 1e-5 |d| for the scalars (as above).
            direction = rng.normal(0.0, 1.0, np.shape(params[index]))
            eps = 1e-5
            shifted = [[*params[:index], params[index] + sign * eps * direction,
                        *params[index + 1:]] for sign in (1, -1)]
            numeric = (_numpy_loss(shifted[0], x64, lengths, kind)
                       - _numpy_loss(shifted[1], x64, lengths, kind)) / (2 * eps)
            bound = (tolerance if index < 2 else 1e-5 * np.linalg.norm(ref)
                     ) * np.linalg.norm(direction)
            assert abs(numeric) > 10 * bound, (kind, index)  # the check can tell
            for name, grad in (("reference", ref), ("kernel", ker)):
                assert abs(np.sum(grad * direction) - numeric) < bound, (name, kind, index)


@pytest.mark.parametrize("source, target", [("kernel", "reference"), ("reference", "kernel")])
def test_checkpoints_are_interchangeable(tmp_path, source, target):
    rng = np.random.default_rng(2)
    saved, saved_scale = _build(source)
    _randomise_encoder(saved, rng, scale=0.5)
    saved_scale.w.assign(7.0)
    path = model.checkpoint_of(saved, saved_scale).save(str(tmp_path / "ckpt"))
    restored, restored_scale = _build(target)
    model.restore_checkpoint(model.checkpoint_of(restored, restored_scale), path)
    assert restored.lstmp == target and float(restored_scale.w.numpy()) == 7.0
    for a, b in zip(saved.get_weights(), restored.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    features = rng.normal(0.0, 1.0, (4, 20, MELS)).astype(np.float32)
    np.testing.assert_allclose(restored(features).numpy(), saved(features).numpy(), atol=1e-5)
    np.testing.assert_allclose(
        restored(features).numpy(),
        _numpy_lstmp_encoder(features, [_cell_weights(rnn) for rnn in saved.rnns]), atol=1e-5)


def test_training_step_through_the_reference_matches_the_kernel():
    (kernel, kernel_scale), (reference, reference_scale), rng = _twin_models(3)
    features = tf.constant(rng.normal(0.0, 1.0, (N * M, 20, MELS)), tf.float32)
    results = {}
    for name, (encoder, scale) in (("kernel", (kernel, kernel_scale)),
                                   ("reference", (reference, reference_scale))):
        config = _config(name)
        before = [v.numpy().copy() for v in encoder.trainable_variables]
        step = training.make_train_step(encoder, scale, training.build_optimizer(config.training),
                                       config.training, config.n_mels)
        loss, norm = step(features)
        after = [v.numpy() for v in scale.trainable_variables + encoder.trainable_variables]
        assert all(np.max(np.abs(a - b)) > 1e-6
                   for a, b in zip(after[2:], before, strict=True))  # every layer moved
        results[name] = (float(loss), float(norm), after)
    assert results["reference"][0] == pytest.approx(results["kernel"][0], rel=1e-5)
    assert results["reference"][1] == pytest.approx(results["kernel"][1], rel=1e-5)
    for ref, ker in zip(results["reference"][2], results["kernel"][2], strict=True):
        np.testing.assert_allclose(ref, ker, atol=1e-5)


def test_the_kernel_refuses_cell_options_it_does_not_implement(monkeypatch):
    model.check_kernel_supports(model.LSTMPCell(8, 4))
    model.check_kernel_supports(model.LSTMPCell(8, 4, forget_bias=0.5))  # folded into the bias
    with pytest.raises(ValueError, match=r"^--lstmp kernel implements only activation='tanh', "
                                         r"not 'relu'; use --lstmp reference$"):
        model.check_kernel_supports(model.LSTMPCell(8, 4, activation="relu"))

    class ClippedCell(model.LSTMPCell):  # a researcher's extension of the reference
        def get_config(self):
            return {**super().get_config(), "cell_clip": 3.0}

    with pytest.raises(ValueError, match=r"^--lstmp kernel does not implement the LSTMP cell "
                                         r"option\(s\) cell_clip; use --lstmp reference$"):
        model.check_kernel_supports(ClippedCell(8, 4))

    monkeypatch.setattr(model, "LSTMPCell", functools.partial(model.LSTMPCell, activation="relu"))
    with pytest.raises(ValueError, match="^--lstmp kernel implements only activation"):
        _build("kernel")
    encoder, _ = _build("reference")
    assert encoder.rnns[0].cell.get_config()["activation"] == "relu"
    with pytest.raises(ValueError, match="^--lstmp: expected 'kernel' or 'reference'"):
        model.SpeakerEncoder(8, 5, 3, lstmp="fused")


@pytest.mark.skipif(not model.bf16_supported(), reason="CPU without avx512_bf16 / amx_bf16")
def test_reference_bf16_is_within_bfloat16_rounding():
    # As test_model_math's bf16 test: ~3e-3 from float64 at these sizes, fp32 stays at 1e-5.
    config = configuration.parse_config(["--hidden", "64", "--proj", "32", "--num_layer", "3",
                                         "--lstmp", "reference", "--precision", "bf16"])
    encoder, _ = model.build_model(config.network, config.n_mels)
    rng = np.random.default_rng(8)
    _randomise_encoder(encoder, rng, scale=0.15)
    features = rng.normal(0.0, 1.0, (8, 40, 40)).astype(np.float32)
    expected = _numpy_lstmp_encoder(features, [_cell_weights(rnn) for rnn in encoder.rnns])
    error = np.max(np.abs(encoder(features).numpy() - expected))
    assert 1e-4 < error < 2e-2, error
