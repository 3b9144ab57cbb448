"""Export a trained model for deployment: mono waveform in, d-vector out, features in-graph.

Two formats: a TensorFlow SavedModel (a whole recording per call) and a TFLite flatbuffer (one
fixed-length window per call, or a whole recording through its `utterance` signature; float32 or
int8), for TI-SV and TD-SV models. The log-mel front
end, librosa's VAD and the TD-SV phrase trim are re-written with tf.signal and TFLite builtins;
the mel filterbank is baked in as a constant. Metadata beside the files (and a `metadata`
signature in the SavedModel) carries the operating threshold and where it came from.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import features
import ge2e
import model
import utils
from configuration import Features, Network

LITERT_PIN = "ai-edge-litert==2.3.*"  # tf.lite.Interpreter warns it is deprecated in TF 2.21
TDSV_BUFFER_PHRASES = 4  # a TD-SV TFLite buffer holds up to this many phrase windows of audio


def _centred_window(front: Features) -> np.ndarray:
    """librosa's Hann window of --window samples, zero-padded to nfft around the frame centre."""
    length = front.window_samples
    left = (front.nfft - length) // 2
    return np.pad(features.hann_window(length), (left, front.nfft - length - left))


def tf_frames(wav: tf.Tensor, front: Features) -> tf.Tensor:
    """Centred, zero-padded frames of nfft samples every hop (librosa's center=True framing)."""
    half = front.nfft // 2
    padded = tf.pad(wav, [[half, half]])
    return tf.signal.frame(padded, front.nfft, front.hop_samples)


def tf_log_mel(wav: tf.Tensor, front: Features, quantizable: bool = True
               ) -> tf.Tensor:
    """log10 mel power spectrogram [frames, n_mels], matching features.log_mel.

    quantizable=False writes the mel filterbank as a broadcast product and sum instead of a
    matmul: TFLite's dynamic-range int8 quantizes a matmul's input per tensor, and the power
    spectrum spans far more than 8 bits (log-mel errors of up to 4.5 in log10 units)."""
    frames = tf_frames(wav, front) * _centred_window(front)
    power = tf.abs(tf.signal.rfft(frames, [front.nfft])) ** 2
    basis = features.mel_basis(front.sr, front.nfft, front.n_mels)
    if quantizable:
        mel = tf.matmul(power, basis.T)
    else:
        mel = tf.reduce_sum(power[:, :, None] * basis.T[None], axis=1)
    return tf.math.log(mel + features.LOG_FLOOR) / np.log(10.0)


def tf_voiced_mask(wav: tf.Tensor, front: Features,
                   n_samples: tf.Tensor | None = None) -> tf.Tensor:
    """features.voiced_frames in-graph: the frames whose RMS is within top_db of the loudest,
    over tf_frames(wav) of the first n_samples samples (all of wav by default; the rest must be
    zeros); frames past those of wav[:n_samples] are False."""
    hop = front.hop_samples
    n = tf.size(wav) if n_samples is None else tf.cast(n_samples, tf.int32)
    rms = tf.sqrt(tf.reduce_mean(tf_frames(wav, front) ** 2, axis=-1))
    power_db = 10.0 * tf.math.log(tf.maximum(rms ** 2, 1e-10)) / np.log(10.0)
    index = tf.range(tf.shape(power_db)[0])
    loudest = tf.reduce_max(tf.where(index <= n // hop, power_db, -1e9))
    # index * hop < n also drops the frame starting exactly at the end, as effects.split does.
    return (index * hop < n) & (power_db > loudest - front.top_db)


def tf_windows(features: tf.Tensor, window: int) -> tf.Tensor:
    """The sliding windows of utils.window_starts, stacked [W, window, n_mels]."""
    n = tf.shape(features)[0]
    hop = max(1, window // 2)
    starts = tf.range(0, tf.maximum(n - window + 1, 1), hop)
    last = tf.maximum(n - window, 0)
    starts = tf.cond(starts[-1] < last, lambda: tf.concat([starts, [last]], 0), lambda: starts)
    length = tf.minimum(n, window)
    return tf.gather(features, starts[:, None] + tf.range(length)[None, :])


def tf_phrase(wav: tf.Tensor, n_samples: tf.Tensor, front: Features
              ) -> tuple[tf.Tensor, tf.Tensor]:
    """features.phrase_span and centred_phrase in-graph: the --tdsv_frame-frame window centred on
    the VAD's phrase in wav[:n_samples] (zeros after it), and the phrase length in samples."""
    hop = front.hop_samples
    n_samples = tf.cast(n_samples, tf.int32)
    kept = tf_voiced_mask(wav, front, n_samples)
    index = tf.range(tf.size(kept))
    found = tf.reduce_any(kept)
    start = tf.where(found, tf.reduce_min(tf.where(kept, index, tf.size(kept))) * hop, 0)
    end = tf.where(found, tf.minimum(n_samples, (tf.reduce_max(tf.where(kept, index, -1)) + 1)
                                     * hop), 0)
    length = (front.tdsv_frame - 1) * hop
    lo = tf.maximum(0, tf.minimum((start + end) // 2 - length // 2, n_samples - length))
    return tf.gather(tf.pad(wav, [[0, length]]), lo + tf.range(length)), end - start


def _fixed_windows(frames: tf.Tensor, n_frames: int, window: int) -> tf.Tensor:
    """utils.window_starts' windows of a fixed-length utterance, gathered with constant indices."""
    starts = np.array(utils.window_starts(n_frames, window))
    return tf.gather(frames, starts[:, None] + np.arange(min(n_frames, window))[None, :])


def _pooled(d_vectors: tf.Tensor) -> tf.Tensor:
    return tf.math.l2_normalize(tf.reduce_mean(d_vectors, 0), epsilon=1e-12)


def tflite_input_samples(front: Features) -> int:
    """Samples of the TFLite input window: --window_frames frames (TI-SV), or a buffer of
    TDSV_BUFFER_PHRASES phrase windows (TD-SV)."""
    frames = TDSV_BUFFER_PHRASES * front.tdsv_frame if front.tdsv else front.window_frames
    return (frames - 1) * front.hop_samples


class DVectorModule(tf.Module):
    """Waveform (mono float32 at the model's rate) -> utterance d-vector; the operating
    threshold and its source as a `metadata` signature."""

    def __init__(self, encoder: model.SpeakerEncoder, front: Features,
                 metadata: dict):
        super().__init__()
        self.encoder = encoder
        self.front = front
        self.sample_rate = tf.constant(front.sr)
        threshold = metadata["operating_threshold"]
        self.threshold = tf.constant(np.nan if threshold is None else threshold, tf.float32)
        self.threshold_source = tf.constant(metadata["threshold_source"])

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="waveform")])
    def serve(self, waveform):
        front = self.front
        if front.tdsv:
            hop = front.hop_samples
            phrase, span = tf_phrase(waveform, tf.size(waveform), front)
            tf.debugging.assert_greater_equal(span, front.min_frames * hop // 4,
                                              message="too little voiced audio")
            windows = _fixed_windows(tf_log_mel(phrase, front), front.tdsv_frame,
                                     front.window_frames)
        else:
            voiced = tf.boolean_mask(tf_log_mel(waveform, front),
                                     tf_voiced_mask(waveform, front))
            tf.debugging.assert_greater_equal(tf.shape(voiced)[0], front.min_frames,
                                              message="too little voiced audio")
            windows = tf_windows(voiced, front.window_frames)
        return {"d_vector": _pooled(self.encoder(windows, training=False))}

    @tf.function(input_signature=[])
    def metadata(self):
        return {"operating_threshold": self.threshold, "threshold_source": self.threshold_source,
                "sample_rate": self.sample_rate}


def _audible(wav: tf.Tensor) -> tf.Tensor:
    return tf.reduce_max(tf.abs(wav)) >= 1e-5  # features.load_audio's silence rule


class WindowModule(tf.Module):
    """The TFLite signatures, each -> the d-vector and whether the in-process path would accept
    the audio: `serving_default` takes one fixed-length window (TI-SV) or buffer (TD-SV) of
    waveform, of which the first num_samples are audio; `utterance` a whole recording of any
    length, read as the in-process path reads it (VAD over the recording, then windows)."""

    def __init__(self, encoder: model.SpeakerEncoder, front: Features):
        super().__init__()
        self.encoder = encoder
        self.front = front
        self.length = tflite_input_samples(front)
        self.serve = tf.function(self._serve, input_signature=[
            tf.TensorSpec([self.length], tf.float32, name="waveform"),
            tf.TensorSpec([], tf.int32, name="num_samples")])
        self.utterance = tf.function(self._utterance, input_signature=[
            tf.TensorSpec([None], tf.float32, name="waveform")])

    def _tdsv(self, wav: tf.Tensor, n: tf.Tensor) -> dict:
        front = self.front
        phrase, span = tf_phrase(wav, n, front)
        windows = _fixed_windows(tf_log_mel(phrase, front, quantizable=False),
                                 front.tdsv_frame, front.window_frames)
        usable = _audible(wav) & (span >= front.min_frames * front.hop_samples // 4)
        return {"d_vector": _pooled(self.encoder(windows, training=False)),
                "usable": tf.cast(usable, tf.int32)}

    def _serve(self, waveform, num_samples):
        front = self.front
        n = tf.clip_by_value(num_samples, 0, self.length)
        wav = tf.where(tf.range(self.length) < n, waveform, 0.0)
        if front.tdsv:
            return self._tdsv(wav, n)
        kept = tf_voiced_mask(wav, front, n)
        voiced = tf.reduce_sum(tf.cast(kept, tf.int32))
        # A boolean_mask of static shape: row j takes the (j+1)-th kept frame, whose index is the
        # number of frames preceded (inclusively) by at most j kept frames.
        ranks = tf.cumsum(tf.cast(kept, tf.int32))
        rows = tf.range(front.window_frames)
        order = tf.reduce_sum(tf.cast(ranks[None, :] <= rows[:, None], tf.int32), axis=1)
        frames = tf.gather(tf_log_mel(wav, front, quantizable=False),
                           tf.minimum(order, front.window_frames - 1))
        d_vector = self.encoder(frames[None], mask=(rows < voiced)[None], training=False)[0]
        usable = _audible(wav) & (voiced >= front.min_frames)
        return {"d_vector": d_vector, "usable": tf.cast(usable, tf.int32)}

    def _utterance(self, waveform):
        front = self.front
        if front.tdsv:
            return self._tdsv(waveform, tf.size(waveform))
        voiced = tf.boolean_mask(tf_log_mel(waveform, front, quantizable=False),
                                 tf_voiced_mask(waveform, front))
        n, window = tf.shape(voiced)[0], front.window_frames
        # utils.window_starts' windows, all --window_frames long: the one window of a shorter
        # recording is zero-padded and masked, which the encoder reads as the short window.
        last, hop = tf.maximum(n - window, 0), max(1, window // 2)
        starts = tf.minimum(tf.range((last + hop - 1) // hop + 1) * hop, last)
        index = starts[:, None] + tf.range(window)[None, :]
        padded = tf.pad(voiced, [[0, tf.maximum(window - n, 0)], [0, 0]])
        d_vectors = self.encoder(tf.gather(padded, index), mask=index < n, training=False)
        usable = _audible(waveform) & (n >= front.min_frames)
        return {"d_vector": _pooled(d_vectors), "usable": tf.cast(usable, tf.int32)}


def export_metadata(front: Features, network: Network, model_path: str, fingerprint: str,
                    decided: tuple[float | None, str]) -> dict:
    """What a deployment needs beside the graph: the decision threshold and its source
    (DVectorModel.decide_threshold), the model's fingerprint and its feature settings."""
    threshold, source = decided
    return {"model": fingerprint, "model_path": str(Path(model_path).resolve()),
            "mode": "TD-SV" if front.tdsv else "TI-SV", "sample_rate": front.sr,
            "d_vector_size": network.proj, "operating_threshold": threshold,
            "threshold_source": source, "features": features.feature_settings(front),
            "window_frames": front.window_frames}


def _write_archive(module: tf.Module, endpoints: dict, encoder, out: Path) -> None:
    # Keras 3 variables are restored correctly only when the archive tracks the Keras model.
    archive = keras.export.ExportArchive()
    archive.track(encoder)
    for name, function in endpoints.items():
        archive.add_endpoint(name, function)
    archive.write_out(str(out), verbose=False)


def tflite_name(quantize: str) -> str:
    return "d_vector_int8.tflite" if quantize == "int8" else "d_vector.tflite"


def export_tflite(encoder, front: Features, quantize: str, out: Path) -> Path:
    """Convert the WindowModule's two signatures (one copy of the weights) to TFLite builtins
    only; --quantize int8 quantizes the weights to int8 (dynamic range: activations stay float,
    so no calibration set is needed)."""
    module = WindowModule(encoder, front)
    signatures = {"serving_default": module.serve, "utterance": module.utterance}
    with tempfile.TemporaryDirectory(prefix="ge2e-export-") as folder:
        _write_archive(module, signatures, encoder, Path(folder))
        converter = tf.lite.TFLiteConverter.from_saved_model(folder, list(signatures))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if quantize == "int8":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        flatbuffer = converter.convert()
    out.mkdir(parents=True, exist_ok=True)
    path = out / tflite_name(quantize)
    with utils.atomic_file(path) as handle:
        handle.write(flatbuffer)
    return path


def export(config: argparse.Namespace) -> Path:
    """Write the SavedModel or the TFLite model to --export, with its metadata."""
    trained = ge2e.DVectorModel(config)
    front, network, encoder = trained.features, trained.network, trained.encoder
    metadata = export_metadata(front, network, config.model_path, trained.fingerprint,
                               trained.decide_threshold(config.threshold, config.threshold_from,
                                                        required=False))
    out = Path(config.export)
    if config.format == "tflite":
        path = export_tflite(encoder, front, config.quantize, out)
        samples = tflite_input_samples(front)
        metadata.update(format="tflite", quantize=config.quantize, input={
            "waveform": f"float32 [{samples}] at {front.sr} Hz "
                        f"({samples / front.sr:.2f} s), zero-padded after num_samples",
            "num_samples": "int32 [], the audio samples at the start of waveform"},
            output={"d_vector": f"float32 [{network.proj}], L2-normalised",
                    "usable": "int32 [], 0 when the window is silent or has too little "
                              "voiced audio (--min_frames)"},
            signatures={"serving_default": "one window: the input and output above",
                        "utterance": f"waveform float32 [samples] at {front.sr} Hz, a whole "
                                     "recording -> the same output, as the in-process path "
                                     "reads the recording"})
        utils.atomic_save_json(path.with_suffix(".json"), metadata)
        print(f"TFLite ({'int8 weights' if config.quantize == 'int8' else 'float32'}, "
              f"{path.stat().st_size / 1e6:.2f} MB) -> {path} (serving_default: waveform float32 "
              f"[{samples}] + num_samples at {front.sr} Hz -> d_vector [{network.proj}], usable; "
              f"utterance: a whole recording's waveform -> the same); metadata -> "
              f"{path.with_suffix('.json')}")
    else:
        module = DVectorModule(encoder, front, metadata)
        _write_archive(module, {"serving_default": module.serve, "metadata": module.metadata},
                       encoder, out)
        metadata.update(format="savedmodel", input={"waveform": f"float32 [samples] at "
                                                                f"{front.sr} Hz"},
                        output={"d_vector": f"float32 [{network.proj}], L2-normalised"})
        utils.atomic_save_json(out / "metadata.json", metadata)
        print(f"SavedModel -> {out} (signature serving_default: waveform float32 [samples] at "
              f"{front.sr} Hz -> d_vector [{network.proj}]; metadata in {out / 'metadata.json'})")
    threshold = metadata["operating_threshold"]
    print(f"threshold {'none' if threshold is None else f'{threshold:.4f}'} "
          f"({metadata['threshold_source']}) in the metadata")
    return out


def tflite_runner(path: str | Path, threads: int = 1, signature: str = "serving_default"):
    """A signature of a .tflite file (serving_default: one window; utterance: a whole
    recording), run by the LiteRT interpreter."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise ImportError(f"running a .tflite model needs the LiteRT interpreter: pip install "
                          f"'{LITERT_PIN}'") from None
    return Interpreter(model_path=str(path), num_threads=threads).get_signature_runner(signature)


def tflite_utterance_d_vector(run, wav: np.ndarray, length: int) -> np.ndarray:
    """A whole recording in windows of `length` samples with 50 % overlap (the last one ending
    at the recording's end; a short recording is one zero-padded window), the usable windows'
    d-vectors averaged and L2-normalised: memory bounded by a window, but each window has its
    own VAD, so it is not the in-process d-vector (TI-SV; the `utterance` signature is)."""
    wav = np.asarray(wav, dtype=np.float32)
    d_vectors = []
    for start in utils.window_starts(len(wav), length):
        piece = wav[start:start + length]
        window = np.pad(piece, (0, length - len(piece)))
        out = run(waveform=window, num_samples=np.array(len(piece), np.int32))
        if out["usable"]:
            d_vectors.append(out["d_vector"])
    if not d_vectors:
        raise ValueError(f"too little voiced audio in every window of {length} samples")
    mean = np.mean(d_vectors, axis=0)
    return mean / max(float(np.linalg.norm(mean)), 1e-12)
