"""The d-vector network (3-layer LSTMP: the readable reference and the fast kernel), the GE2E
loss (the paper's equations by number), checkpoints, loading a trained encoder and embedding."""

from __future__ import annotations

import functools
import hashlib
import math
import re
from collections.abc import Collection
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import configuration
import utils
from configuration import Features, Network


def centroids(embeddings: tf.Tensor) -> tf.Tensor:
    """Speaker centroids c_k, the mean of each speaker's M embeddings (eq. 1). [N,M,P] -> [N,P]."""
    return tf.reduce_mean(embeddings, axis=1)


def exclusive_centroids(embeddings: tf.Tensor) -> tf.Tensor:
    """c_j^(-i): centroid of speaker j without utterance i (eq. 8). [N,M,P] -> [N,M,P]."""
    m = tf.cast(tf.shape(embeddings)[1], embeddings.dtype)
    total = tf.reduce_sum(embeddings, axis=1, keepdims=True)
    return (total - embeddings) / (m - 1.0)


def _cosine(a: tf.Tensor, b: tf.Tensor, axis: int = -1) -> tf.Tensor:
    a = tf.math.l2_normalize(a, axis=axis, epsilon=1e-12)
    b = tf.math.l2_normalize(b, axis=axis, epsilon=1e-12)
    return tf.reduce_sum(a * b, axis=axis)


def similarity_matrix(embeddings: tf.Tensor, w: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """S_ji,k = w cos(e_ji, c_k) + b, with c_j^(-i) for k = j (eqs. 5, 9). [N,M,P] -> [N,M,N]."""
    n = tf.shape(embeddings)[0]
    centroid = tf.math.l2_normalize(centroids(embeddings), axis=-1, epsilon=1e-12)
    unit = tf.math.l2_normalize(embeddings, axis=-1, epsilon=1e-12)
    cos_all = tf.einsum("jip,kp->jik", unit, centroid)
    cos_own = _cosine(embeddings, exclusive_centroids(embeddings))
    own = tf.eye(n, dtype=tf.bool)[:, None, :]
    cos = tf.where(own, cos_own[:, :, None], cos_all)
    return w * cos + b


def ge2e_softmax_loss(similarity: tf.Tensor) -> tf.Tensor:
    """Sum over utterances of -S_ji,j + log sum_k exp(S_ji,k) (eqs. 6, 10)."""
    n = tf.shape(similarity)[0]
    own = tf.eye(n, dtype=similarity.dtype)[:, None, :]
    positive = tf.reduce_sum(similarity * own, axis=-1)
    return tf.reduce_sum(tf.reduce_logsumexp(similarity, axis=-1) - positive)


def ge2e_contrast_loss(similarity: tf.Tensor) -> tf.Tensor:
    """Sum over utterances of 1 - sigma(S_ji,j) + max_{k!=j} sigma(S_ji,k) (eqs. 7, 10)."""
    n = tf.shape(similarity)[0]
    own = tf.eye(n, dtype=tf.bool)[:, None, :]
    sigma = tf.sigmoid(similarity)
    positive = tf.reduce_sum(tf.where(own, sigma, tf.zeros_like(sigma)), axis=-1)
    hardest_negative = tf.reduce_max(tf.where(own, tf.zeros_like(sigma), sigma), axis=-1)
    return tf.reduce_sum(1.0 - positive + hardest_negative)


def ge2e_loss(embeddings: tf.Tensor, w: tf.Tensor, b: tf.Tensor, kind: str = "softmax"
              ) -> tf.Tensor:
    """GE2E loss of a batch of embeddings [N,M,P]; kind is 'softmax' or 'contrast'."""
    similarity = similarity_matrix(embeddings, w, b)
    if kind == "softmax":
        return ge2e_softmax_loss(similarity)
    if kind == "contrast":
        return ge2e_contrast_loss(similarity)
    raise ValueError(f"--loss: expected 'softmax' or 'contrast', got {kind!r}")



def _cpu_has(flags: str, cpuinfo_path: str = "/proc/cpuinfo") -> bool:
    """True when /proc/cpuinfo lists one of the |-separated CPU flags."""
    try:
        cpuinfo = Path(cpuinfo_path).read_text()
    except OSError:
        return False
    return re.search(rf"\b({flags})\b", cpuinfo) is not None


def bf16_supported(cpuinfo_path: str = "/proc/cpuinfo") -> bool:
    """True when the CPU has bfloat16 matrix instructions (AVX512_BF16 or AMX-BF16), which
    oneDNN's bfloat16 matmuls need."""
    return _cpu_has("avx512_bf16|amx_bf16", cpuinfo_path)


def matmul_dtype(precision: str) -> tf.DType:
    """The dtype of the encoder's matmul operands for --precision; bf16 needs CPU support."""
    if precision == "fp32":
        return tf.float32
    if precision != "bf16":
        raise ValueError(f"--precision: expected 'fp32' or 'bf16', got {precision!r}")
    if not bf16_supported():
        raise ValueError("--precision bf16: this CPU has no bfloat16 matrix instructions "
                         "(neither avx512_bf16 nor amx_bf16 in /proc/cpuinfo); use --precision "
                         "fp32")
    return tf.bfloat16


def _matmul(a: tf.Tensor, b: tf.Tensor, transpose_a: bool = False, transpose_b: bool = False
            ) -> tf.Tensor:
    """a @ b with b's dtype for the operands (bf16 or fp32) and a float32 result."""
    product = tf.matmul(tf.cast(a, b.dtype), b, transpose_a=transpose_a, transpose_b=transpose_b)
    return tf.cast(product, tf.float32)


class LSTMPCell(keras.layers.Layer):
    """TF1 LSTMCell(num_proj=...): gates i, j, f, o = [x_t, h_{t-1}] kernel + bias;
    c_t = sigma(f + forget_bias) c_{t-1} + sigma(i) tanh(j); h_t = (sigma(o) tanh c_t) projection."""

    def __init__(self, units: int, proj_units: int, forget_bias: float = 1.0,
                 activation: str = "tanh", **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.proj_units = proj_units
        self.forget_bias = forget_bias
        self.activation = keras.activations.get(activation)
        self.matmul_dtype = tf.float32
        # keras.layers.RNN's cell interface: the states are (h, c), the output is h.
        self.state_size = [proj_units, units]
        self.output_size = proj_units

    def build(self, input_shape) -> None:
        input_dim = input_shape[-1]
        self.kernel = self.add_weight(name="kernel", initializer="glorot_uniform",
                                      shape=(input_dim + self.proj_units, 4 * self.units))
        self.bias = self.add_weight(name="bias", initializer="zeros", shape=(4 * self.units,))
        self.projection = self.add_weight(name="projection", initializer="glorot_uniform",
                                          shape=(self.units, self.proj_units))

    def call(self, inputs: tf.Tensor, states: list[tf.Tensor]
             ) -> tuple[tf.Tensor, list[tf.Tensor]]:
        """One frame of the reference path, as TF1 LSTMCell(num_proj) computes it: h_t, [h_t, c_t]."""
        h_prev, c_prev = states
        # The recurrence reads the projected h_{t-1} (Sak et al. 2014's recurrent projection).
        z = _matmul(tf.concat([inputs, h_prev], axis=-1),
                    tf.cast(self.kernel, self.matmul_dtype)) + self.bias
        i, j, f, o = tf.split(z, 4, axis=-1)
        c = tf.sigmoid(f + self.forget_bias) * c_prev + tf.sigmoid(i) * self.activation(j)
        m = tf.sigmoid(o) * self.activation(c)
        h = _matmul(m, tf.cast(self.projection, self.matmul_dtype))
        return h, [h, c]

    def get_config(self) -> dict:
        return {**super().get_config(), "units": self.units, "proj_units": self.proj_units,
                "forget_bias": self.forget_bias,
                "activation": keras.activations.serialize(self.activation)}


# The cell options the kernel reads (any value) and those it hard-codes: tanh is
# 2 sigma(2x) - 1 in _one_sigmoid_form and tf.tanh in _gates / _gate_grads.
_KERNEL_READS = ("units", "proj_units", "forget_bias")
_KERNEL_HARD_CODES = {"activation": "tanh"}


def check_kernel_supports(cell: LSTMPCell) -> None:
    """Refuse, in one ValueError line, a cell option the wavefront kernel does not implement
    (one the reference was extended with): such a cell runs only with --lstmp reference."""
    options = {key: value for key, value in cell.get_config().items()
               if key not in keras.layers.Layer.get_config(cell)}
    unknown = sorted(set(options) - set(_KERNEL_READS) - set(_KERNEL_HARD_CODES))
    if unknown:
        raise ValueError(f"--lstmp kernel does not implement the LSTMP cell option(s) "
                         f"{', '.join(unknown)}; use --lstmp reference")
    for key, value in _KERNEL_HARD_CODES.items():
        if options[key] != value:
            raise ValueError(f"--lstmp kernel implements only {key}={value!r}, not "
                             f"{options[key]!r}; use --lstmp reference")


class LSTMP(keras.layers.Layer):
    """One LSTMP layer: its cell's weights, which the kernel runs for all layers together
    (_stack_forward), and the reference path over time (keras.layers.RNN of the cell)."""

    def __init__(self, units: int, proj_units: int, **kwargs):
        super().__init__(**kwargs)
        self.cell = LSTMPCell(units, proj_units)
        self.supports_masking = True
        # All outputs: the layer above reads them, the encoder the top layer's last one.
        self.rnn = keras.layers.RNN(self.cell, return_sequences=True)

    def build(self, input_shape) -> None:
        self.cell.build(input_shape)

    def call(self, sequences: tf.Tensor, mask: tf.Tensor | None = None) -> tf.Tensor:
        """The reference path: outputs h_t [B,T,P]. A masked frame keeps the previous frame's
        state and output (keras.layers.RNN), so h at T-1 is that of the row's last real frame."""
        return self.rnn(sequences, mask=mask)

    def stack_weights(self) -> list[tf.Tensor]:
        """kernel, bias, projection in _one_sigmoid_form, matmul operands in matmul_dtype."""
        cell = self.cell
        kernel, bias = _one_sigmoid_form(tf.convert_to_tensor(cell.kernel),
                                         tf.convert_to_tensor(cell.bias), cell.forget_bias)
        return [tf.cast(kernel, cell.matmul_dtype), bias,
                tf.cast(tf.convert_to_tensor(cell.projection), cell.matmul_dtype)]


def _one_sigmoid_form(kernel, bias, forget_bias):
    """kernel, bias with the j columns doubled and the forget bias folded in, so that one
    sigmoid gives all four gates: tanh(j) = 2 sigma(2j) - 1."""
    units = kernel.shape[-1] // 4
    scale = tf.concat([tf.ones([units]), tf.fill([units], 2.0), tf.ones([2 * units])], 0)
    shift = tf.concat([tf.zeros([2 * units]), tf.fill([units], forget_bias), tf.zeros([units])], 0)
    return kernel * scale, (bias + shift) * scale


# XLA fuses each frame's elementwise ops into one pass over memory (14-16 % off a training step
# with the matmuls on oneDNN).
@tf.function(jit_compile=True)
def _gates(z, bias, c):
    """One sigmoid for the four gates (_one_sigmoid_form): sigma, c_t, tanh c_t and m_t."""
    sigma = tf.sigmoid(z + bias)
    i, j, f, o = tf.split(sigma, 4, axis=-1)
    c_new = f * c + i * (2.0 * j - 1.0)
    tanh_c = tf.tanh(c_new)
    return sigma, c_new, tanh_c, o * tanh_c


@tf.function(jit_compile=True)
def _gate_grads(dm, dc_next, sigma, tanh_c, c_prev):
    """The gradient of the gates' pre-activations and the part of dc that reaches c_{t-1}."""
    i, j, f, o = tf.split(sigma, 4, axis=-1)
    dc = dc_next + dm * o * (1.0 - tanh_c * tanh_c)
    d_sigma = tf.concat([dc * (2.0 * j - 1.0), 2.0 * dc * i, dc * c_prev, dm * tanh_c], axis=-1)
    return d_sigma * sigma * (1.0 - sigma), dc * f


def _frame(x, h, c, kernel, bias, projection):
    """One frame of one layer, weights in _one_sigmoid_form: h, c, sigma, tanh c and m."""
    sigma, c_new, tanh_c, m = _gates(_matmul(tf.concat([x, h], axis=-1), kernel), bias, c)
    return _matmul(m, projection), c_new, sigma, tanh_c, m


def _frame_grads(dh, dc_next, x, h_prev, c_prev, sigma, tanh_c, m, kernel, projection, dim,
                 grads):
    """BPTT through _frame: the gradients of x (dim None: none), h_{t-1} and c_{t-1}, and the
    weight gradients summed so far."""
    dm = _matmul(dh, projection, transpose_b=True)
    dz, dc_prev = _gate_grads(dm, dc_next, sigma, tanh_c, c_prev)
    back = _matmul(dz, kernel, transpose_b=True)
    dx, dh_prev = (None, back) if dim is None else tf.split(back, [dim, -1], axis=-1)
    inputs = tf.concat([x, h_prev], axis=-1)
    grads = {"kernel": grads["kernel"] + _matmul(inputs, tf.cast(dz, kernel.dtype),
                                                  transpose_a=True),
             "bias": grads["bias"] + tf.reduce_sum(dz, axis=0),
             "projection": grads["projection"] + _matmul(m, tf.cast(dh, projection.dtype),
                                                          transpose_a=True)}
    return dx, dh_prev, dc_prev, grads


# Without AVX-512, XLA taking an fp32 frame's matmuls too (one kernel per frame of a layer, a
# dozen op dispatches saved) takes a third off a step at N=4 M=5 and a fifth at N=16 M=10, equal
# at N=64 (AMD Zen 2). With AVX-512, oneDNN's matmul kernels are faster than XLA's: the fused
# frame costs a quarter more at N=4 M=5, equal from N=16 (AMD Zen 5). bf16 matmuls stay on
# oneDNN, which has the AMX path.
_fused_frame = tf.function(_frame, jit_compile=True)
_fused_frame_grads = tf.function(_frame_grads, jit_compile=True)


@functools.cache
def _fuse_fp32_matmuls(cpuinfo_path: str = "/proc/cpuinfo") -> bool:
    """Whether fp32 frames run as one XLA kernel, matmuls included (see above)."""
    return not _cpu_has("avx512f", cpuinfo_path)


def _fused(kernel: tf.Tensor) -> bool:
    return kernel.dtype == tf.float32 and _fuse_fp32_matmuls()


def _cell_forward(x, h, c, kernel, bias, projection):
    """One frame of one layer: h, c, and what BPTT reads."""
    frame = _fused_frame if _fused(kernel) else _frame
    h_new, c_new, sigma, tanh_c, m = frame(x, h, c, kernel, bias, projection)
    return h_new, c_new, {"h": h_new, "c": c_new, "sigma": sigma, "tanh_c": tanh_c, "m": m}


def _wavefront(run, layers, steps, state, order):
    """Drive run(k, active_layers, state) over a wavefront of `layers` layers and `steps` frames:
    step k serves frame k - order(l) of layer l, so a step's layers are independent of each
    other and TensorFlow runs them side by side. The ramps (not every layer has a frame yet, or
    still one) are unrolled; the steady part is a while loop."""
    for k in range(layers - 1):
        state = run(k, [lay for lay in range(layers) if order(lay) <= k], state)
    state = tf.while_loop(lambda k, _: k < steps, lambda k, s: (k + 1, run(k, range(layers), s)),
                          (tf.constant(layers - 1), state))[1]
    for e in range(1, layers):
        state = run(steps + e - 1, [lay for lay in range(layers) if order(lay) >= e], state)
    return state


def _stack_forward(frames, weights, mask=None, save=False):
    """All layers over time-major frames [T,B,F], weights (kernel, bias, projection) per layer
    in _one_sigmoid_form: the top layer's last h [B,P] and, with save=True, per layer the
    tensor lists BPTT reads (index t of sigma, tanh c, m is frame t; index t + 1 of h, c is
    frame t, index 0 the zero state).

    mask [T,B,1] (padding at the end): a masked frame keeps the state, so each row ends with
    its state at its last real frame. TensorFlow differentiates the loops when given a mask.
    """
    layers = len(weights)
    steps, batch = tf.shape(frames)[0], tf.shape(frames)[1]
    tf.debugging.assert_greater_equal(
        steps, layers - 1, message=f"a {layers}-layer stack needs at least {layers - 1} frames")
    inputs = tf.TensorArray(tf.float32, size=steps).unstack(frames)
    # Every layer reads the mask of its frame.
    masks = None if mask is None else tf.TensorArray(
        tf.bool, size=steps, clear_after_read=False).unstack(mask)
    shifted = ("h", "c")

    def lists(size):
        # Kept after a read: the backward pass may run more than once (a persistent tape).
        return tf.TensorArray(tf.float32, size=size, clear_after_read=False)

    state = []
    for _, _, projection in weights:
        units, proj_units = projection.shape
        layer = {"h": tf.zeros([batch, proj_units]), "c": tf.zeros([batch, units])}
        if save:
            layer["saved"] = {"h": lists(steps + 1).write(0, layer["h"]),
                              "c": lists(steps + 1).write(0, layer["c"]),
                              "sigma": lists(steps), "tanh_c": lists(steps), "m": lists(steps)}
        state.append(layer)

    def run(k, active, state):
        new = list(state)
        for lay in active:
            t = k - lay
            # Layer l's input is layer l-1's h of the previous step: its frame t.
            x = inputs.read(t) if lay == 0 else state[lay - 1]["h"]
            h, c, values = _cell_forward(x, state[lay]["h"], state[lay]["c"], *weights[lay])
            if masks is not None:
                real = masks.read(t)
                h, c = tf.where(real, h, state[lay]["h"]), tf.where(real, c, state[lay]["c"])
            new[lay] = {"h": h, "c": c}
            if save:
                saved = state[lay]["saved"]
                new[lay]["saved"] = {name: saved[name].write(t + 1 if name in shifted else t,
                                                             value)
                                     for name, value in values.items()}
        return new

    state = _wavefront(run, layers, steps, state, order=lambda lay: lay)
    return state[-1]["h"], [layer.get("saved") for layer in state]


def _cell_backward(dh, dc_next, x, saved, t, kernel, projection, dim, grads):
    """BPTT through one frame of one layer: the gradients of its input x and previous h and c,
    and the weight gradients summed so far. dim None: kernel holds only the rows of h, and x
    gets no gradient."""
    frame_grads = _fused_frame_grads if _fused(kernel) else _frame_grads
    return frame_grads(dh, dc_next, x, saved["h"].read(t), saved["c"].read(t),
                       saved["sigma"].read(t), saved["tanh_c"].read(t), saved["m"].read(t),
                       kernel, projection, dim, grads)


def _stack_backward(saved, frames, d_top, weights):
    """BPTT through _stack_forward, as a wavefront from the last frame of the top layer: the
    gradients of each layer's kernel, bias, projection (the features need none)."""
    layers = len(weights)
    steps, batch = tf.shape(frames)[0], tf.shape(frames)[1]
    inputs = tf.TensorArray(tf.float32, size=steps).unstack(frames)
    state = []
    for kernel, bias, projection in weights:
        state.append({"up": tf.zeros_like(d_top), "dh": tf.zeros_like(d_top),
                      "dc": tf.zeros([batch, projection.shape[0]]),
                      "grads": {"kernel": tf.zeros(kernel.shape), "bias": tf.zeros(bias.shape),
                                "projection": tf.zeros(projection.shape)}})
    state[-1]["up"] = d_top
    # The features need no gradient: layer 0 multiplies by its kernel's rows of h alone.
    kernels = [kernel[-projection.shape[1]:] if lay == 0 else kernel
               for lay, (kernel, _, projection) in enumerate(weights)]

    def run(s, active, state):
        new = list(state)
        for lay in active:
            t = steps - 1 - s + (layers - 1 - lay)
            projection = weights[lay][2]
            x = inputs.read(t) if lay == 0 else saved[lay - 1]["h"].read(t + 1)
            dim = None if lay == 0 else kernels[lay].shape[0] - projection.shape[1]
            dx, dh_prev, dc_prev, grads = _cell_backward(
                state[lay]["up"] + state[lay]["dh"], state[lay]["dc"], x, saved[lay], t,
                kernels[lay], projection, dim, state[lay]["grads"])
            # The gradient from above reaches a layer one step later (when it serves frame t).
            up = tf.zeros_like(d_top) if lay == layers - 1 else new[lay]["up"]
            new[lay] = {"up": up, "dh": dh_prev, "dc": dc_prev, "grads": grads}
            if lay > 0:
                new[lay - 1] = {**new[lay - 1], "up": dx}
        return new

    # Processing layers bottom-up inside a step lets layer l+1 hand its dx to layer l.
    state = _wavefront(run, layers, steps, state, order=lambda lay: layers - 1 - lay)
    return [layer["grads"][name] for layer in state
            for name in ("kernel", "bias", "projection")]


def _train_stack(frames, weights):
    """The top layer's last h [B,P] in training, with the hand-written BPTT: fewer ops per
    frame than autodiff of the time loop."""

    @tf.custom_gradient
    def run(frames, *flat):
        layers = [flat[i:i + 3] for i in range(0, len(flat), 3)]
        top, saved = _stack_forward(frames, layers, save=True)

        def grad(d_top):
            return (None, *_stack_backward(saved, frames, d_top, layers))

        return top, grad

    # TensorFlow differentiates _one_sigmoid_form: the gradients reach the variables.
    return run(frames, *[w for layer in weights for w in layer])




class SpeakerEncoder(keras.Model):
    """Log-mel frames [B,T,n_mels] -> d-vectors [B,proj]: stacked LSTMP, last frame, L2-normalised.

    precision "bf16" runs the matmuls with bfloat16 operands (float32 results); variables, cell
    state, activations and everything downstream stay float32. lstmp "kernel" runs the
    wavefront kernel with hand-written BPTT, "reference" LSTMPCell.call under keras.layers.RNN
    and autodiff: the same variables, so checkpoints serve both.
    """

    def __init__(self, hidden: int, proj: int, num_layer: int, precision: str = "fp32",
                 lstmp: str = "kernel", mean_norm: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.mean_norm = mean_norm
        if lstmp not in configuration.LSTMP_PATHS:
            raise ValueError(f"--lstmp: expected 'kernel' or 'reference', got {lstmp!r}")
        self.lstmp = lstmp
        self.rnns = [LSTMP(hidden, proj) for _ in range(num_layer)]
        dtype = matmul_dtype(precision)
        for rnn in self.rnns:
            rnn.cell.matmul_dtype = dtype
            if lstmp == "kernel":
                check_kernel_supports(rnn.cell)
        self.supports_masking = True

    def build(self, input_shape) -> None:
        for layer, rnn in enumerate(self.rnns):
            rnn.build((None, input_shape[-1] if layer == 0 else rnn.cell.proj_units))

    def compute_mask(self, inputs, mask=None):
        return None  # a d-vector has no time axis left to mask

    def call(self, features, mask=None, training=False):
        """mask [B,T] (True = real frame, padding at the end): the d-vector of each row is taken
        at its last real frame, as if the row had not been padded."""
        if self.mean_norm:
            features = features - masked_time_mean(features, mask)
        if self.lstmp == "reference":
            outputs = features
            for rnn in self.rnns:
                outputs = rnn(outputs, mask=mask)
            # The network's output is the top layer's output at the last frame (GE2E sec. 2.1).
            top = outputs[:, -1]
        else:
            frames = tf.transpose(features, [1, 0, 2])
            weights = [rnn.stack_weights() for rnn in self.rnns]
            if mask is None and training:
                top = _train_stack(frames, weights)
            else:
                mask = None if mask is None else tf.transpose(mask)[:, :, None]
                top = _stack_forward(frames, weights, mask)[0]
        return tf.math.l2_normalize(top, axis=-1, epsilon=1e-12)


def masked_time_mean(features: tf.Tensor, mask: tf.Tensor | None) -> tf.Tensor:
    """[B,1,n_mels]: each row's mean log-mel over its real frames (all frames without a mask)."""
    if mask is None:
        return tf.reduce_mean(features, axis=1, keepdims=True)
    weights = tf.cast(mask, features.dtype)[:, :, None]
    return (tf.reduce_sum(features * weights, axis=1, keepdims=True)
            / tf.maximum(tf.reduce_sum(weights, axis=1, keepdims=True), 1.0))


class GE2EScale(keras.layers.Layer):
    """The learned scale w (kept positive, as the paper requires) and bias b of eq. 5."""

    def build(self, input_shape=None) -> None:
        self.w = self.add_weight(name="w", shape=(), initializer=keras.initializers.Constant(10.0))
        self.b = self.add_weight(name="b", shape=(), initializer=keras.initializers.Constant(-5.0))

    def call(self, inputs=None):
        return tf.abs(self.w), self.b


def build_model(network: Network, n_mels: int) -> tuple[SpeakerEncoder, GE2EScale]:
    """The encoder and the GE2E scale, built (weights created) for n_mels features."""
    encoder = SpeakerEncoder(network.hidden, network.proj, network.num_layer, network.precision,
                             network.lstmp, network.mean_norm)
    encoder(tf.zeros((1, 2, n_mels)))
    scale = GE2EScale()
    scale.build()
    return encoder, scale


def checkpoint_of(encoder, scale, optimizer=None) -> tf.train.Checkpoint:
    # Keras 3 models are not tracked by tf.train.Checkpoint: name their variables explicitly.
    objects = {"encoder": list(encoder.variables), "scale": list(scale.variables)}
    if optimizer is not None:
        objects["optimizer"] = optimizer
    return tf.train.Checkpoint(**objects)


def restore_checkpoint(checkpoint: tf.train.Checkpoint, path: str, partial: bool = False) -> None:
    """Restore, turning TensorFlow's errors on a damaged checkpoint into one line."""
    try:
        status = checkpoint.restore(path)
        (status.expect_partial() if partial else status).assert_existing_objects_matched()
    except (tf.errors.OpError, AssertionError, ValueError, IndexError) as error:
        raise ValueError(f"{path}: cannot restore checkpoint ({str(error).splitlines()[0]})"
                         ) from None


class Ensemble(keras.Model):
    """Several encoders as one: their d-vectors concatenated and scaled by 1/sqrt(K), so the
    cosine of two ensemble d-vectors is the mean of the members' cosines."""

    def __init__(self, members: list[SpeakerEncoder], **kwargs):
        super().__init__(**kwargs)
        self.members = members
        self.supports_masking = True

    def compute_mask(self, inputs, mask=None):
        return None

    def call(self, features, mask=None):
        scale = 1.0 / math.sqrt(len(self.members))
        return tf.concat([member(features, mask=mask) for member in self.members], -1) * scale


def saved_model(model_path: Path, front: Features, network: Network,
                explicit: Collection[str] = ()) -> tuple[Features, Network]:
    """The features and network a trained model was saved with (the run-time choices, such as
    --min_frames and --lstmp, from front and network); a conflicting typed flag is an error."""
    if not (model_path / "config.json").exists():
        raise ValueError(f"{model_path}: no config.json; train a model there first "
                         f"(python main.py --train True --model_path {model_path})")
    saved = configuration.load_config(model_path / "config.json")
    return (configuration.from_saved(front, saved, explicit),
            configuration.from_saved(network, saved, explicit))


def _load_encoder(model_path: Path, front: Features, network: Network, explicit: Collection[str],
                  model_num: int) -> tuple[Features, Network, SpeakerEncoder]:
    front, network = saved_model(model_path, front, network, explicit)
    encoder, scale = build_model(network, front.n_mels)
    checkpoint_dir = model_path / "checkpoints"
    if model_num:
        path = str(checkpoint_dir / f"ckpt-{model_num}")
        if not Path(path + ".index").exists():
            raise ValueError(f"--model_num {model_num}: no checkpoint {path}")
    else:
        path = tf.train.latest_checkpoint(checkpoint_dir)
        if path is None:
            raise ValueError(f"{checkpoint_dir}: no checkpoint found")
    restore_checkpoint(checkpoint_of(encoder, scale), path, partial=True)
    return front, network, encoder


def model_fingerprint(encoder: SpeakerEncoder | Ensemble) -> str:
    """sha256 of the encoder's weights: scores are only comparable under the same weights."""
    digest = hashlib.sha256()
    for weight in encoder.get_weights():
        digest.update(np.ascontiguousarray(weight, dtype=np.float32).tobytes())
    return digest.hexdigest()[:16]


def model_paths(model_path: str, ensemble: str = "") -> list[str]:
    """--model_path and the --ensemble members as records name them: what an evaluation used."""
    paths = [model_path] + (ensemble.split(",") if ensemble else [])
    return [utils.record_path(path) for path in paths]


def load_trained(model_path: str | Path, front: Features, network: Network,
                 explicit: Collection[str] = (), model_num: int = 0, ensemble: str = ""
                 ) -> tuple[Features, Network, SpeakerEncoder | Ensemble]:
    """The model's saved features and network (see saved_model) and its encoder restored from
    its checkpoint: an Ensemble with the comma-separated --ensemble models, which must share
    its features."""
    front, network, encoder = _load_encoder(Path(model_path), front, network, explicit,
                                            model_num)
    if not ensemble:
        return front, network, encoder
    members = [encoder]
    for path in ensemble.split(","):
        # Members may differ in shape (hidden, proj, layers), never in the features they read.
        member_front, _, member = _load_encoder(Path(path), front, network, (), 0)
        for key in configuration.fixed_fields(Features, "weights", "input"):
            if getattr(member_front, key) != getattr(front, key):
                raise ValueError(f"--ensemble {path}: its {key}={getattr(member_front, key)} "
                                 f"differs from --model_path's {key}={getattr(front, key)}")
        members.append(member)
    return front, network, Ensemble(members)


EMBED_BUCKETS = (1, 16, 256)  # batch sizes the XLA embedder is compiled for


def make_embedder(encoder: SpeakerEncoder | Ensemble, n_mels: int, window: int | None = None):
    """A function from windows [B,T,n_mels] (and optional row lengths [B], rows padded at the
    end) to d-vectors [B,P].

    Batches of exactly `window` frames run XLA-compiled (several times faster at small batch),
    padded up to a bucket size so that only len(EMBED_BUCKETS) shapes are ever compiled.
    """
    plain = tf.function(lambda x: encoder(x, training=False),
                        input_signature=[tf.TensorSpec([None, None, n_mels], tf.float32)])
    masked = tf.function(lambda x, mask: encoder(x, mask=mask, training=False),
                         input_signature=[tf.TensorSpec([None, None, n_mels], tf.float32),
                                          tf.TensorSpec([None, None], tf.bool)])
    compiled = tf.function(lambda x: encoder(x, training=False), jit_compile=True)

    def embed(batch: np.ndarray, lengths: np.ndarray | None = None) -> np.ndarray:
        batch = np.asarray(batch, dtype=np.float32)
        if lengths is not None:
            return masked(batch, np.arange(batch.shape[1]) < np.asarray(lengths)[:, None]).numpy()
        if window is None or batch.shape[1] != window or len(batch) > EMBED_BUCKETS[-1]:
            return plain(batch).numpy()
        size = next(b for b in EMBED_BUCKETS if b >= len(batch))
        padded = np.zeros((size, *batch.shape[1:]), np.float32)
        padded[:len(batch)] = batch
        return compiled(padded).numpy()[:len(batch)]

    return embed


def utterance_d_vectors(embed, utterances: list[np.ndarray], window: int,
                        batch_size: int = 256) -> np.ndarray:
    """Paper's inference: d-vectors of 50%-overlapping windows, averaged, L2-normalised. [U,P]."""
    windows, owner, short = [], [], []
    for u, frames in enumerate(utterances):
        if len(frames) < window:
            short.append(u)
            continue
        for start in utils.window_starts(len(frames), window):
            windows.append(frames[start:start + window])
            owner.append(u)
    pooled: list[np.ndarray | None] = [None] * len(utterances)
    sums: dict[int, np.ndarray] = {}
    for lo in range(0, len(windows), batch_size):
        out = embed(np.stack(windows[lo:lo + batch_size]))
        for u, vector in zip(owner[lo:lo + batch_size], out):
            sums[u] = sums.get(u, 0.0) + vector
    for u, total in sums.items():
        pooled[u] = total
    # Utterances shorter than a window: one padded batch, each read at its own last frame.
    short.sort(key=lambda u: len(utterances[u]))
    for lo in range(0, len(short), batch_size):
        chunk = short[lo:lo + batch_size]
        lengths = np.array([len(utterances[u]) for u in chunk])
        padded = np.zeros((len(chunk), lengths.max(), utterances[chunk[0]].shape[1]), np.float32)
        for row, u in enumerate(chunk):
            padded[row, :lengths[row]] = utterances[u]
        for u, vector in zip(chunk, embed(padded, lengths)):
            pooled[u] = vector
    stacked = np.stack(pooled).astype(np.float32)
    return stacked / np.maximum(np.linalg.norm(stacked, axis=1, keepdims=True), 1e-12)
