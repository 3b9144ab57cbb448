"""Export a trained model as a SavedModel: mono waveform in, d-vector out, features in-graph.

Deployment then needs TensorFlow only: the log-mel front end and librosa's VAD are re-written
with tf.signal, and the mel filterbank is baked in as a constant.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import features
import model


def _centred_window(config: argparse.Namespace) -> np.ndarray:
    """librosa's Hann window of --window samples, zero-padded to nfft around the frame centre."""
    length = features.window_samples(config)
    left = (config.nfft - length) // 2
    return np.pad(features.hann_window(length), (left, config.nfft - length - left))


def tf_frames(wav: tf.Tensor, config: argparse.Namespace) -> tf.Tensor:
    """Centred, zero-padded frames of nfft samples every hop (librosa's center=True framing)."""
    half = config.nfft // 2
    padded = tf.pad(wav, [[half, half]])
    return tf.signal.frame(padded, config.nfft, features.hop_samples(config))


def tf_log_mel(wav: tf.Tensor, config: argparse.Namespace) -> tf.Tensor:
    """log10 mel power spectrogram [frames, n_mels], matching features.log_mel."""
    frames = tf_frames(wav, config) * _centred_window(config)
    power = tf.abs(tf.signal.rfft(frames, [config.nfft])) ** 2
    basis = features.mel_basis(config.sr, config.nfft, config.n_mels)
    return tf.math.log(tf.matmul(power, basis.T) + features.LOG_FLOOR) / np.log(10.0)


def tf_voiced_mask(wav: tf.Tensor, config: argparse.Namespace) -> tf.Tensor:
    """librosa.effects.split's rule per frame: RMS within top_db of the loudest frame."""
    rms = tf.sqrt(tf.reduce_mean(tf_frames(wav, config) ** 2, axis=-1))
    power_db = 10.0 * tf.math.log(tf.maximum(rms ** 2, 1e-10)) / np.log(10.0)
    return power_db > tf.reduce_max(power_db) - config.top_db


def tf_windows(features: tf.Tensor, window: int) -> tf.Tensor:
    """The sliding windows of utils.window_starts, stacked [W, window, n_mels]."""
    n = tf.shape(features)[0]
    hop = max(1, window // 2)
    starts = tf.range(0, tf.maximum(n - window + 1, 1), hop)
    last = tf.maximum(n - window, 0)
    starts = tf.cond(starts[-1] < last, lambda: tf.concat([starts, [last]], 0), lambda: starts)
    length = tf.minimum(n, window)
    return tf.gather(features, starts[:, None] + tf.range(length)[None, :])


class DVectorModule(tf.Module):
    """Waveform (mono float32 at the model's rate) -> utterance d-vector."""

    def __init__(self, encoder: model.SpeakerEncoder, config: argparse.Namespace):
        super().__init__()
        self.encoder = encoder
        self.config = config
        self.sample_rate = tf.constant(config.sr)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="waveform")])
    def serve(self, waveform):
        features = tf.boolean_mask(tf_log_mel(waveform, self.config),
                                   tf_voiced_mask(waveform, self.config))
        tf.debugging.assert_greater_equal(tf.shape(features)[0], self.config.min_frames,
                                          message="too little voiced audio")
        d_vectors = self.encoder(tf_windows(features, self.config.window_frames), training=False)
        return {"d_vector": tf.math.l2_normalize(tf.reduce_mean(d_vectors, 0), epsilon=1e-12)}


def export(config: argparse.Namespace) -> Path:
    """Write the SavedModel to --export and check it against the in-process embedding."""
    if config.ensemble:
        raise ValueError("--export takes one model; drop --ensemble")
    config, encoder = model.load_trained(config)
    if config.tdsv:
        raise ValueError("--export supports TI-SV models (a TD-SV model needs the phrase "
                         "trimming of features.phrase_waveform, not ported to tf.signal)")
    module = DVectorModule(encoder, config)
    out = Path(config.export)
    # Keras 3 variables are restored correctly only when the archive tracks the Keras model.
    archive = keras.export.ExportArchive()
    archive.track(encoder)
    archive.add_endpoint("serving_default", module.serve)
    archive.write_out(str(out), verbose=False)
    print(f"SavedModel -> {out} (signature serving_default: waveform float32 [samples] at "
          f"{config.sr} Hz -> d_vector [{config.proj}])")
    return out
