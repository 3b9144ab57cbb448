"""GE2E training: the optimizer and its schedule, the distributed training step, checkpoints,
warm start, resume and the training loop with its TensorBoard logs."""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path

import keras
import tensorflow as tf
from tqdm import tqdm

import configuration
import dataset
import model
from configuration import Features, Network, Training
from model import GE2EScale, SpeakerEncoder


def build_optimizer(training: Training) -> keras.optimizers.Optimizer:
    """SGD/Adam/RMSProp with the learning rate halved every --lr_decay_every steps."""
    schedule = keras.optimizers.schedules.ExponentialDecay(
        training.lr, decay_steps=training.lr_decay_every, decay_rate=0.5, staircase=True)
    if training.optim == "sgd":
        return keras.optimizers.SGD(schedule)
    if training.optim == "adam":
        return keras.optimizers.Adam(schedule, beta_1=training.beta1, beta_2=training.beta2)
    return keras.optimizers.RMSprop(schedule, rho=training.beta2)


def make_strategy(kind: str) -> tf.distribute.Strategy:
    """The tf.distribute strategy for --distribute (the default strategy is one device)."""
    if kind == "mirrored":
        # Without GPUs, mirror over the logical CPU devices (one unless configured otherwise).
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([device.name for device in devices])
    if kind == "multi_worker":
        # Workers and this task's role come from TF_CONFIG, as TensorFlow documents.
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True for the one task that writes checkpoints, the config and TensorBoard logs."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
        return True
    if resolver.task_type in (None, "chief"):
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


def make_train_step(encoder: SpeakerEncoder, scale: GE2EScale,
                    optimizer: keras.optimizers.Optimizer, training: Training, n_mels: int,
                    strategy: tf.distribute.Strategy | None = None):
    """A compiled GE2E step: loss, global-norm clipping, w/b gradients scaled by 0.01.

    Under a tf.distribute strategy each replica embeds its share of the N*M utterances and
    all-gathers the rest, so the loss and update are those of one device holding the whole batch.
    """
    default = tf.distribute.get_strategy()
    strategy = strategy or default
    n, m = training.N, training.M
    replicas = strategy.num_replicas_in_sync
    if (n * m) % replicas:
        raise ValueError(f"--N x --M = {n * m} utterances do not divide among the {replicas} "
                         f"replicas of --distribute {training.distribute}")
    share = n * m // replicas
    variables = list(scale.trainable_variables) + list(encoder.trainable_variables)
    n_scale = len(scale.trainable_variables)

    def batch_loss(d_vectors):
        w, b = scale()
        return model.ge2e_loss(tf.reshape(d_vectors, (n, m, -1)), w, b, training.loss)

    def shared_loss_gradients(features):
        """Loss of the whole batch and this replica's gradient share, summed over replicas."""
        context = tf.distribute.get_replica_context()
        lo = context.replica_id_in_sync_group * share
        with tf.GradientTape() as tape:
            own = encoder(features[lo:lo + share], training=True)
            # The other replicas' d-vectors enter as constants: each replica differentiates
            # only through its own share.
            gathered = tf.stop_gradient(context.all_gather(own, axis=0))
            loss = batch_loss(tf.concat([gathered[:lo], own, gathered[lo + share:]], axis=0))
        grads = tape.gradient(loss, variables)
        # Every replica holds the whole gradient of w and b, but only its share of the
        # encoder's: after this division the sum over replicas is the one-device gradient.
        grads = [g / replicas for g in grads[:n_scale]] + list(grads[n_scale:])
        return loss, context.all_reduce(tf.distribute.ReduceOp.SUM, grads)

    def loss_gradients(features):
        with tf.GradientTape() as tape:
            loss = batch_loss(encoder(features, training=True))
        return loss, tape.gradient(loss, variables)

    def replica_step(features):
        # One device skips the gather and reduce ops: they cost ~10 % of a small step.
        loss, grads = (loss_gradients if strategy is default else shared_loss_gradients)(features)
        grads, norm = tf.clip_by_global_norm(grads, training.clip_norm)
        grads = [0.01 * g for g in grads[:n_scale]] + list(grads[n_scale:])
        # Keras sums the gradients over the replicas once more before applying them.
        optimizer.apply_gradients(zip([g / replicas for g in grads] if replicas > 1 else grads,
                                      variables))
        return loss, norm

    @tf.function(input_signature=[tf.TensorSpec([None, None, n_mels], tf.float32)])
    def train_step(features):
        if strategy is default:
            return replica_step(features)
        loss, norm = strategy.run(replica_step, args=(features,))
        local = strategy.experimental_local_results
        return local(loss)[0], local(norm)[0]

    return train_step


def warm_start(init_from: str, model_path: str, front: Features, network: Network,
               explicit: Collection[str] = ()) -> tuple[str, Features, Network]:
    """The latest checkpoint of --init_from's model, and this run's features and network with
    the shape of that model's weights (log-mel settings, layers, --mean_norm); a flag typed
    otherwise is an error. TI-SV weights may start a TD-SV run."""
    source = Path(init_from)
    if source.resolve() == Path(model_path).resolve():
        raise ValueError(f"--init_from {source} is --model_path itself; use --restore True to "
                         f"resume it, or train into another --model_path")
    if not (source / "config.json").exists():
        raise ValueError(f"--init_from {source}: no config.json; expected a trained model folder "
                         f"(like --model_path)")
    saved = configuration.load_config(source / "config.json")
    shaped = []
    for name, section in (("features", front), ("network", network)):
        taken = {}
        for key in configuration.fixed_fields(type(section), "weights"):
            value = saved[name].get(key, getattr(section, key))
            if key in explicit and value != getattr(section, key):
                raise ValueError(f"--init_from {source}: its {key}={value} differs from this "
                                 f"run's --{key} {getattr(section, key)}")
            taken[key] = value
        shaped.append(replace(section, **taken))
    path = tf.train.latest_checkpoint(source / "checkpoints")
    if path is None:
        raise ValueError(f"--init_from {source}: no checkpoint in {source / 'checkpoints'}")
    return path, *shaped


def train(config: argparse.Namespace) -> dict:
    """Train with GE2E; resumable with --restore True. Returns a summary of the run."""
    # MultiWorkerMirroredStrategy must exist before any other TensorFlow op runs.
    strategy = make_strategy(config.distribute)
    chief = is_chief(strategy)
    model_path = Path(config.model_path)
    front, network, training = config.features, config.network, config.training
    init_from, init_checkpoint = config.init_from, None
    if config.restore:
        saved = configuration.load_config(model_path / "config.json")
        if config.init_from:
            print(f"--restore True resumes {model_path}'s own checkpoint; --init_from "
                  f"{config.init_from} is ignored")
        front = configuration.from_saved(front, saved, config.explicit)
        network = configuration.from_saved(network, saved, config.explicit)
        training = configuration.from_saved(training, saved, config.explicit, ("resume",))
        # The record keeps the model's lineage: where its first weights came from.
        init_from = saved["model"].get("init_from", "")
    elif config.init_from:
        # Checked before an earlier model is moved away, so a refused run changes nothing.
        init_checkpoint, front, network = warm_start(config.init_from, config.model_path,
                                                     front, network, config.explicit)
        init_from = str(Path(config.init_from).resolve())
    store = dataset.open_store(config.train_path, front, "train")
    if training.N > store.num_speakers:
        raise ValueError(f"--N {training.N} exceeds the {store.num_speakers} training speakers in "
                         f"{config.train_path}")
    if not config.restore and chief and (model_path / "checkpoints").exists():
        backup = model_path.with_name(f"{model_path.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(str(model_path), str(backup))
        print(f"{model_path} held an earlier model; moved it to {backup} (use --restore True "
              f"to resume instead)")

    keras.utils.set_random_seed(training.seed)
    with strategy.scope():
        encoder, scale = model.build_model(network, front.n_mels)
        optimizer = build_optimizer(training)
        optimizer.build(list(scale.trainable_variables) + list(encoder.trainable_variables))
    checkpoint = model.checkpoint_of(encoder, scale, optimizer)
    if config.restore:
        # The state file, not tf.train.latest_checkpoint: that one hides a damaged checkpoint.
        state = tf.train.get_checkpoint_state(model_path / "checkpoints")
        if state is None or not state.model_checkpoint_path:
            raise ValueError(f"--restore True but {model_path / 'checkpoints'} holds no checkpoint")
        model.restore_checkpoint(checkpoint, state.model_checkpoint_path)
    elif init_checkpoint is not None:
        model.restore_checkpoint(model.checkpoint_of(encoder, scale), init_checkpoint, partial=True)
        print(f"initialised from {init_checkpoint} (encoder and GE2E scale); fresh optimizer, "
              f"step 0")
    # Every worker takes part in saving (it may run collective ops); only the chief's is kept.
    save_dir = model_path / "checkpoints" if chief else Path(tempfile.mkdtemp(prefix="ge2e-"))
    manager = tf.train.CheckpointManager(checkpoint, save_dir, max_to_keep=3)
    if chief:
        configuration.save_config(model_path / "config.json", front, network, training,
                                  config.evaluation, config.data,
                                  {"model_path": config.model_path, "init_from": init_from,
                                   "comment": config.comment})
    try:
        return _train_loop(training, front.n_mels, store, config.train_path, model_path,
                           strategy, chief, encoder, scale, optimizer, manager)
    finally:
        if not chief:
            shutil.rmtree(save_dir, ignore_errors=True)


def _train_loop(training: Training, n_mels: int, store: dataset.SpeakerStore, train_path: str,
                model_path: Path, strategy, chief, encoder, scale, optimizer, manager) -> dict:
    step = int(optimizer.iterations.numpy())
    if step >= training.iteration:
        print(f"already trained {step} steps (--iteration {training.iteration}); nothing to do")
        return {"steps": step, "final_loss": float("nan"), "seconds": 0.0}

    train_step = make_train_step(encoder, scale, optimizer, training, n_mels, strategy)
    batches = dataset.training_batches(store, training, step, train_path)
    writer = (tf.summary.create_file_writer(str(model_path / "logs")) if chief
              else tf.summary.create_noop_writer())
    started = time.time()
    running = None
    losses = []
    with writer.as_default(), tqdm(total=training.iteration, initial=step, unit="step",
                                   desc="train", dynamic_ncols=True, disable=not chief) as bar:
        for features in batches:
            loss, norm = train_step(features)
            step += 1
            loss, norm = float(loss), float(norm)
            # A finite loss can still come with NaN gradients (e.g. Inf features): check both
            # before anything is saved.
            if not (math.isfinite(loss) and math.isfinite(norm)):
                raise FloatingPointError(
                    f"loss {loss} / gradient norm {norm} at step {step}; the last good "
                    f"checkpoint is {manager.latest_checkpoint or 'none'} (try a lower --lr, "
                    f"or check the features)")
            losses.append(loss)
            running = loss if running is None else 0.95 * running + 0.05 * loss
            bar.update(1)
            bar.set_postfix(loss=f"{running:.3f}")
            if step % training.log_every == 0 or step == training.iteration:
                w, b = scale()
                tf.summary.scalar("loss", loss, step=step)
                tf.summary.scalar("w", w, step=step)
                tf.summary.scalar("b", b, step=step)
                tf.summary.scalar("lr", optimizer.learning_rate, step=step)
            if step % training.save_every == 0 or step == training.iteration:
                manager.save(checkpoint_number=step)
            if step >= training.iteration:
                break
    seconds = time.time() - started
    if chief:
        print(f"trained to step {step} in {seconds:.0f} s; loss {running:.4f}; "
              f"checkpoint {manager.latest_checkpoint}")
    return {"steps": step, "final_loss": running, "seconds": seconds, "losses": losses}


