"""Configuration: the command line (argparse, every flag) and the typed, frozen settings of each
concern that the functions take (Features, Network, Training, Evaluation, Preprocessing), with
their defaults; a model's config.json holds them in sections."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Collection
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
SEED = 0  # one default seed for splits, batches, init and enrollment draws
READY_MODEL = Path(__file__).resolve().parent / "pretrained"
USE_COMMANDS = ("enroll", "verify", "identify", "pairs", "embed", "export", "cohort")
# The use commands that take the ready model when no --model_path is typed; --cohort writes into
# the model's folder, so it always names it.
READY_MODEL_COMMANDS = ("enroll", "verify", "identify", "pairs", "embed", "export")
LSTMP_PATHS = ("kernel", "reference")


def _setting(default, fixed: str = ""):
    """A dataclass field; `fixed` says what a trained model's saved value fixes: "weights" (its
    weights depend on it), "input" (what it reads, not its weights) or "resume" (the run)."""
    return field(default=default, metadata={"fixed": fixed})


@dataclass(frozen=True)
class Features:
    """The front end: how a recording becomes the log-mel frames the network reads."""

    tdsv: bool = _setting(False, "input")
    sr: int = _setting(16000, "weights")
    nfft: int = _setting(512, "weights")
    window: float = _setting(0.025, "weights")
    hop: float = _setting(0.01, "weights")
    n_mels: int = _setting(40, "weights")
    tdsv_frame: int = _setting(80, "input")
    top_db: float = _setting(30.0)
    min_frames: int = _setting(20)
    window_frames: int = _setting(160)

    @property
    def hop_samples(self) -> int:
        return int(round(self.hop * self.sr))

    @property
    def window_samples(self) -> int:
        return int(round(self.window * self.sr))

    @property
    def kind(self) -> str:
        return "tdsv" if self.tdsv else "tisv"


@dataclass(frozen=True)
class Network:
    """The encoder's shape, and how it executes (the same weights either way)."""

    hidden: int = _setting(128, "weights")
    proj: int = _setting(64, "weights")
    num_layer: int = _setting(3, "weights")
    mean_norm: bool = _setting(False, "weights")
    lstmp: str = _setting("kernel")
    precision: str = _setting("fp32")


@dataclass(frozen=True)
class Training:
    """The optimizer, its schedule and the batches; the "resume" fields continue a run."""

    N: int = _setting(4, "resume")
    M: int = _setting(5, "resume")
    loss: str = _setting("softmax", "resume")
    optim: str = _setting("sgd", "resume")
    lr: float = _setting(1e-2, "resume")
    lr_decay_every: int = _setting(10000, "resume")
    beta1: float = _setting(0.5, "resume")
    beta2: float = _setting(0.9, "resume")
    clip_norm: float = _setting(3.0, "resume")
    seed: int = _setting(SEED, "resume")
    tisv_frame: int = _setting(180, "resume")
    tisv_frame_min: int = _setting(140, "resume")
    snr_db: tuple[float, float] = _setting((5.0, 20.0), "resume")
    source_weights: tuple[float, ...] | None = _setting(None, "resume")
    spec_augment: tuple[int, int] = _setting((0, 0), "resume")
    short_crops: bool = _setting(False, "resume")
    iteration: int = _setting(1000)
    save_every: int = _setting(500)
    log_every: int = _setting(10)
    distribute: str = _setting("none")


@dataclass(frozen=True)
class Evaluation:
    """The similarity-matrix test and AS-norm."""

    enroll_ratio: float = 0.5
    draws: int = 10
    asnorm_topk: int = 100
    seed: int = SEED


@dataclass(frozen=True)
class Preprocessing:
    """Where the corpus and the preprocessed splits are, and how the splits are made."""

    audio_path: str = ""
    synthetic_path: str = "./data/synthetic"
    noise_path: str = ""
    train_path: str = "./data/train"
    test_path: str = "./data/test"
    test_ratio: float = 0.2
    seed: int = SEED
    folds: int = 0
    fold: int = 0
    tdsv_phrase: str = ""
    tdsv_pattern: str = ""
    workers: int = 1
    num_shards: int = 1
    shard: int = 0
    merge: bool = False
    min_utterances: int = 2
    speed_perturb: tuple[float, ...] = ()
    augment: int = 0
    augment_snr_db: tuple[float, float] = (5.0, 20.0)
    noise_filenum: int = 16


# The sections of a parsed command line and of a saved config.json, by name.
SECTIONS = {"features": Features, "network": Network, "training": Training,
            "evaluation": Evaluation, "data": Preprocessing}
MODEL_RECORD = ("model_path", "init_from", "comment")  # config.json's "model" section


def fixed_fields(section: type, *kinds: str) -> tuple[str, ...]:
    """Names of a section's fields whose saved value fixes the given kinds ("weights", ...)."""
    return tuple(f.name for f in fields(section) if f.metadata.get("fixed") in kinds)


def _section(section: type[T], config: argparse.Namespace) -> T:
    """The `section` part of a parsed command line (lists frozen into tuples)."""
    return section(**{f.name: _frozen(getattr(config, f.name)) for f in fields(section)})


def _frozen(value):
    return tuple(value) if isinstance(value, list) else value


def _plain(value):
    # JSON turns tuples (the defaults of --snr_db, --spec_augment) into lists.
    return list(value) if isinstance(value, tuple) else value


def str2bool(value: str) -> bool:
    """Parse True/False/yes/no/1/0 (any case); anything else is an argparse error."""
    lowered = str(value).strip().lower()
    if lowered in ("true", "yes", "1", "t", "y"):
        return True
    if lowered in ("false", "no", "0", "f", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected True/False/yes/no/1/0, got {value!r}")


def _number(value: str, kind: type, expected: str) -> int | float:
    try:
        number = kind(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}") from None
    # nan and inf parse as floats but are never a usable setting.
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}")
    return number


def _positive_int(value: str) -> int:
    number = _number(value, int, "a positive integer")
    if number <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def _non_negative_int(value: str) -> int:
    number = _number(value, int, "an integer >= 0")
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value!r}")
    return number


def _finite_float(value: str) -> float:
    return _number(value, float, "a finite number")


def _positive_float(value: str) -> float:
    number = _number(value, float, "a positive number")
    if not number > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}")
    return number


def _non_negative_float(value: str) -> float:
    number = _number(value, float, "a number >= 0")
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value!r}")
    return number


def _fraction(value: str) -> float:
    number = _number(value, float, "a number between 0 and 1")
    if not 0.0 < number < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {value!r}")
    return number


def _decay(value: str) -> float:
    number = _number(value, float, "a number in [0, 1)")
    if not 0.0 <= number < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {value!r}")
    return number


def _speed_factor(value: str) -> float:
    number = _number(value, float, "a speed factor between 0.5 and 2, not 1")
    if not (0.5 <= number <= 2.0 and number != 1.0):
        raise argparse.ArgumentTypeError(
            f"expected a speed factor between 0.5 and 2, not 1, got {value!r}")
    return number


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line naming the flag, without the usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """All flags of the toolkit, with the original script set's names and defaults."""
    parser = OneLineParser(
        description="GE2E speaker verification (Wan et al., ICASSP 2018) on TensorFlow 2.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)

    data = parser.add_argument_group("data")
    data.add_argument("--audio_path", type=str, default=Preprocessing.audio_path,
                      help="speaker tree <root>/<speaker>/**/<utt>.{wav,flac}; empty = build the "
                           "embedded synthetic corpus")
    data.add_argument("--synthetic_path", type=str, default=Preprocessing.synthetic_path,
                      help="where the embedded synthetic corpus is written")
    data.add_argument("--noise_path", type=str, default=Preprocessing.noise_path,
                      help="TD-SV noise: a folder of noise recordings, or of clean/noisy pairs "
                           "(<name>_clean.wav beside <name>_noisy.wav); empty = generated noise")
    data.add_argument("--train_path", type=str, default=Preprocessing.train_path,
                      help="preprocessed training features; several folders, comma-separated, "
                           "are pooled (more speakers)")
    data.add_argument("--test_path", type=str, default=Preprocessing.test_path,
                      help="preprocessed test features")
    data.add_argument("--test_ratio", type=_fraction, default=Preprocessing.test_ratio,
                      help="fraction of speakers held out for testing")
    data.add_argument("--seed", type=_non_negative_int, default=SEED,
                      help="seed for splits, batches and init")
    data.add_argument("--folds", type=_non_negative_int, default=Preprocessing.folds,
                      help="k-fold speaker cross-validation: split the seeded speaker order into "
                           "this many folds (0 = use --test_ratio)")
    data.add_argument("--fold", type=_non_negative_int, default=Preprocessing.fold,
                      help="with --folds: which fold (0-based) is the test split; fold 0 is the "
                           "--test_ratio 1/folds split")
    data.add_argument("--tdsv", type=str2bool, default=Features.tdsv,
                      help="text-dependent (True) or text-independent (False) verification")
    data.add_argument("--tdsv_phrase", type=str, default=Preprocessing.tdsv_phrase,
                      help="TD-SV: keep utterances whose manifest.csv transcript equals this text")
    data.add_argument("--tdsv_pattern", type=str, default=Preprocessing.tdsv_pattern,
                      help="TD-SV: keep utterances whose relative path matches this regex "
                           "(e.g. '_001\\.' for VCTK's 'Please call Stella')")
    data.add_argument("--workers", type=_positive_int, default=Preprocessing.workers,
                      help="preprocessing processes (one speaker each at a time)")
    data.add_argument("--num_shards", type=_positive_int, default=Preprocessing.num_shards,
                      help="preprocessing split over this many machines (deterministic shards of "
                           "the speakers)")
    data.add_argument("--shard", type=_non_negative_int, default=Preprocessing.shard,
                      help="which shard this machine preprocesses (0 .. --num_shards - 1)")
    data.add_argument("--merge", type=str2bool, default=Preprocessing.merge,
                      help="only merge the shard manifests in --train_path and --test_path "
                           "into manifest.json (after copying the shards' output together)")
    data.add_argument("--min_utterances", type=_positive_int, default=Preprocessing.min_utterances,
                      help="speakers with fewer usable utterances are skipped")
    data.add_argument("--speed_perturb", type=_speed_factor, nargs="*",
                      default=Preprocessing.speed_perturb,

                      metavar="F",
                      help="speaker augmentation: also write each training speaker sped up by "
                           "each factor F (tempo and pitch, as sox's speed) as a new speaker "
                           "<speaker>_spF, e.g. 0.9 1.1; the test split is never perturbed")
    data.add_argument("--augment", type=_non_negative_int, default=Preprocessing.augment,
                      metavar="K",
                      help="also write each training utterance K times more, each in a random "
                           "simulated room (pyroomacoustics) with additive noise at a random SNR "
                           "in --augment_snr_db, as the same speaker; the test split is never "
                           "augmented")
    data.add_argument("--augment_snr_db", type=_finite_float, nargs=2,
                      default=Preprocessing.augment_snr_db,

                      metavar=("LOW", "HIGH"), help="--augment: additive noise SNR range (dB)")

    features = parser.add_argument_group("features")
    features.add_argument("--sr", type=_positive_int, default=Features.sr, help="sample rate (Hz)")
    features.add_argument("--nfft", type=_positive_int, default=Features.nfft, help="FFT size")
    features.add_argument("--window", type=_positive_float, default=Features.window,
                          help="window length (s)")
    features.add_argument("--hop", type=_positive_float, default=Features.hop,
                          help="hop length (s)")
    features.add_argument("--n_mels", type=_positive_int, default=Features.n_mels,
                          help="log-mel bands")
    features.add_argument("--top_db", type=_positive_float, default=Features.top_db,
                          help="VAD: frames quieter than peak minus this are silence")
    features.add_argument("--tdsv_frame", type=_positive_int, default=Features.tdsv_frame,
                          help="TD-SV utterance length (frames)")
    features.add_argument("--tisv_frame", type=_positive_int, default=Training.tisv_frame,
                          help="TI-SV: longest training partial utterance (frames)")
    features.add_argument("--tisv_frame_min", type=_positive_int, default=Training.tisv_frame_min,
                          help="TI-SV: shortest training partial utterance (frames)")
    features.add_argument("--min_frames", type=_positive_int, default=Features.min_frames,
                          help="utterances with fewer voiced frames (0.2 s at the default hop) "
                               "are skipped; TD-SV: phrases shorter than a quarter of this")
    features.add_argument("--window_frames", type=_positive_int, default=Features.window_frames,
                          help="inference: sliding-window length (frames), 50%% overlap")

    model = parser.add_argument_group("model")
    model.add_argument("--hidden", type=_positive_int, default=Network.hidden,
                       help="LSTM cells per layer")
    model.add_argument("--proj", type=_positive_int, default=Network.proj,
                       help="projection size = d-vector size")
    model.add_argument("--num_layer", type=_positive_int, default=Network.num_layer,
                       help="LSTMP layers")
    model.add_argument("--mean_norm", type=str2bool, default=Network.mean_norm,
                       help="subtract each utterance's (or window's) mean log-mel over time "
                            "before the LSTMP: a fixed channel's colouring cancels")
    model.add_argument("--restore", type=str2bool, default=False,
                       help="resume training from the last checkpoint in --model_path")
    model.add_argument("--model_path", type=str, default="./tisv_model",
                       help="checkpoints, config.json and TensorBoard logs")
    model.add_argument("--model_num", type=_non_negative_int, default=0,
                       help="test: checkpoint step to load (0 = latest)")
    model.add_argument("--init_from", type=str, default="",
                       help="training: start from this trained model's weights (its latest "
                            "checkpoint; its network shape and log-mel settings are taken), "
                            "with a fresh optimizer and step count (fine-tuning)")
    model.add_argument("--precision", type=str, default=Network.precision, choices=("fp32", "bf16"),
                       help="matmul precision for training and embedding: fp32, or bf16 on "
                            "the CPU's matrix units (variables, cell state and loss stay fp32)")
    model.add_argument("--lstmp", type=str, default=Network.lstmp, choices=LSTMP_PATHS,
                       help="LSTMP implementation: the fast wavefront kernel (hand-written "
                            "backpropagation) or the readable reference (Keras layer, autodiff); "
                            "same weights and checkpoints")
    model.add_argument("--ensemble", type=str, default="",
                       help="comma-separated further trained models (e.g. other seeds): test, "
                            "enroll, verify, identify and embed average their cosine scores "
                            "with --model_path's (each at its latest checkpoint)")

    training = parser.add_argument_group("training")
    training.add_argument("--train", type=str2bool, default=True,
                          help="train (True) or test (False)")
    training.add_argument("--N", type=_positive_int, default=Training.N, help="speakers per batch")
    training.add_argument("--M", type=_positive_int, default=Training.M,
                          help="utterances per speaker")
    training.add_argument("--noise_filenum", type=_positive_int,
                          default=Preprocessing.noise_filenum,

                          help="TD-SV: noise clips kept for augmentation")
    training.add_argument("--snr_db", type=_finite_float, nargs=2, default=Training.snr_db,
                          metavar=("LOW", "HIGH"), help="TD-SV: noise SNR range (dB)")
    training.add_argument("--source_weights", type=_non_negative_float, nargs="+",
                          default=Training.source_weights,

                          metavar="W", help="with several --train_path folders: draw each batch "
                          "from one folder, folder i with probability W_i / sum(W) (the paper's "
                          "MultiReader loss weights); default: pool all their speakers")
    training.add_argument("--spec_augment", type=_non_negative_int, nargs=2,
                          default=Training.spec_augment,

                          metavar=("BANDS", "FRAMES"), help="mask one band of up to BANDS mel "
                          "channels and one span of up to FRAMES frames in each training "
                          "utterance (SpecAugment); 0 0 = off")
    training.add_argument("--short_crops", type=str2bool, default=Training.short_crops,
                          help="TI-SV with --source_weights: cap a batch's crop length at its "
                               "source's median utterance length, so that short clips "
                               "(keywords) train at their own length instead of repeated to "
                               "--tisv_frame_min..--tisv_frame")
    training.add_argument("--loss", type=str, default=Training.loss,
                          choices=("softmax", "contrast"),
                          help="GE2E loss (eq. 6 or eq. 7)")
    training.add_argument("--optim", type=str, default=Training.optim,
                          choices=("sgd", "adam", "rmsprop"),
                          help="optimizer")
    training.add_argument("--lr", type=_positive_float, default=Training.lr, help="learning rate")
    training.add_argument("--lr_decay_every", type=_positive_int, default=Training.lr_decay_every,
                          help="halve the learning rate every this many steps")
    training.add_argument("--beta1", type=_decay, default=Training.beta1, help="Adam beta1")
    training.add_argument("--beta2", type=_decay, default=Training.beta2,
                          help="Adam beta2 / RMSProp rho")
    training.add_argument("--clip_norm", type=_positive_float, default=Training.clip_norm,
                          help="global-norm gradient clipping")
    training.add_argument("--iteration", type=_positive_int, default=Training.iteration,
                          help="training steps")
    training.add_argument("--save_every", type=_positive_int, default=Training.save_every,
                          help="checkpoint interval (steps)")
    training.add_argument("--log_every", type=_positive_int, default=Training.log_every,
                          help="TensorBoard logging interval (steps)")
    training.add_argument("--distribute", type=str, default=Training.distribute,
                          choices=("none", "mirrored", "multi_worker"),
                          help="tf.distribute strategy: one device, MirroredStrategy over the "
                               "local devices, or MultiWorkerMirroredStrategy over the workers "
                               "in TF_CONFIG")
    training.add_argument("--comment", type=str, default="", help="free text saved with the model")

    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--enroll_ratio", type=_fraction, default=Evaluation.enroll_ratio,
                            help="test: fraction of each speaker's utterances used to enroll")
    evaluation.add_argument("--draws", type=_positive_int, default=Evaluation.draws,
                            help="test: random enrollment/verification draws")
    evaluation.add_argument("--trials", type=str, default="",
                            help="test: VoxCeleb-format trial list 'label enrol test' with paths "
                                 "relative to --audio_path; empty = all pairs of test speakers")
    evaluation.add_argument("--asnorm_topk", type=_positive_int, default=Evaluation.asnorm_topk,
                            help="AS-norm: top-k cohort scores (cohort = training speakers)")
    evaluation.add_argument("--results_path", type=str, default="",
                            help="where scores, figures and evaluation.json of a test are "
                                 "written; empty = <model_path>/results")

    use = parser.add_argument_group("use a trained model")
    use.add_argument("--enroll", type=str, default="", metavar="NAME",
                     help="enroll speaker NAME from the --audio files")
    use.add_argument("--extend", type=str2bool, default=False,
                     help="--enroll: add the files to an existing profile instead of replacing it")
    use.add_argument("--verify", type=str, default="", metavar="NAME",
                     help="score each --audio file against NAME's profile: ACCEPT or REJECT")
    use.add_argument("--identify", action="store_true",
                     help="rank every enrolled profile against each --audio file")
    use.add_argument("--pairs", type=str, default="", metavar="FILE",
                     help="verify many pairs in one run: FILE has one 'NAME audio_path' per "
                          "line (paths relative to FILE's folder unless absolute)")
    use.add_argument("--embed", action="store_true",
                     help="d-vectors of every audio file under --audio_path into --out (.npz)")
    use.add_argument("--export", type=str, default="", metavar="DIR",
                     help="write a waveform-to-d-vector TensorFlow SavedModel to DIR")
    use.add_argument("--format", type=str, default="savedmodel",
                     choices=("savedmodel", "tflite"),
                     help="--export: TensorFlow SavedModel or a TFLite flatbuffer")
    use.add_argument("--quantize", type=str, default="none", choices=("none", "int8"),
                     help="--export --format tflite: float32 (none) or an int8-quantized model")
    use.add_argument("--audio", type=str, nargs="+", default=[], metavar="FILE",
                     help="audio files for --enroll, --verify, --identify")
    use.add_argument("--out", type=str, default="", help="--embed: output .npz file")
    use.add_argument("--threshold", type=_finite_float, default=None,
                     help="--verify: decision threshold (default: the model's operating "
                          "threshold, the EER threshold of its own test split)")
    use.add_argument("--threshold_from", type=str, default="", metavar="RESULTS_DIR",
                     help="--verify: take the operating threshold from the evaluation.json of "
                          "this evaluation (a --results_path of a --train False run)")
    use.add_argument("--cohort", action="store_true",
                     help="write the AS-norm cohort shipped with a model: one speaker model per "
                          "speaker of --train_path, into <model_path>/cohort.npz; --train False "
                          "uses it when --train_path is not given")
    use.add_argument("--summarize", type=str, nargs="+", default=[], metavar="DIR",
                     help="mean EERs of several tests (e.g. the folds of a cross-validation) "
                          "from the evaluation.json in each test's --results_path DIR")
    return parser


def explicit_flags(argv: list[str] | None, parser: argparse.ArgumentParser) -> set[str]:
    """Names of the flags the user typed (as opposed to defaults)."""
    dest_of = {option: action.dest for action in parser._actions
               for option in action.option_strings}
    tokens = sys.argv[1:] if argv is None else argv
    return {dest_of[t.split("=")[0]] for t in tokens if t.split("=")[0] in dest_of}


def parse_config(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse argv into a config, validating flags that depend on each other; its sections are
    config.features, .network, .training, .evaluation and .data."""
    parser = build_parser()
    config = parser.parse_args(argv)
    config.explicit = sorted(explicit_flags(argv, parser))
    commands = [bool(config.enroll), bool(config.verify), config.identify, bool(config.pairs),
                config.embed, bool(config.export), config.cohort, bool(config.summarize)]
    if sum(commands) > 1:
        parser.error("use one of --enroll, --verify, --identify, --pairs, --embed, --export, "
                     "--cohort, --summarize at a time")
    if (config.enroll or config.verify or config.identify) and not config.audio:
        parser.error("--enroll, --verify and --identify need --audio FILE [FILE ...]")
    if config.tisv_frame_min > config.tisv_frame:
        parser.error("--tisv_frame_min must not exceed --tisv_frame")
    if config.source_weights and not sum(config.source_weights) > 0:
        parser.error("--source_weights: expected at least one weight above 0")
    if config.snr_db[0] > config.snr_db[1]:
        parser.error(f"--snr_db LOW HIGH: LOW {config.snr_db[0]} exceeds HIGH {config.snr_db[1]}")
    if config.shard >= config.num_shards:
        parser.error(f"--shard {config.shard}: expected 0 .. --num_shards - 1 "
                     f"({config.num_shards - 1})")
    if config.folds and not (2 <= config.folds and config.fold < config.folds):
        parser.error(f"--folds {config.folds} --fold {config.fold}: expected --folds >= 2 and "
                     f"--fold < --folds")
    if config.fold and not config.folds:
        parser.error("--fold needs --folds")
    if config.distribute == "multi_worker" and not os.environ.get("TF_CONFIG"):
        parser.error("--distribute multi_worker needs the TF_CONFIG environment variable "
                     "(cluster and task, see README 'Scaling out')")
    if config.augment_snr_db[0] > config.augment_snr_db[1]:
        parser.error(f"--augment_snr_db LOW HIGH: LOW {config.augment_snr_db[0]} exceeds HIGH "
                     f"{config.augment_snr_db[1]}")
    if config.threshold is not None and config.threshold_from:
        parser.error("use one of --threshold and --threshold_from")
    if config.cohort and "model_path" not in config.explicit:
        parser.error("--cohort writes <model_path>/cohort.npz: name the model with --model_path")
    if config.export and config.ensemble:
        parser.error("--export takes one model; drop --ensemble")
    if config.quantize != "none" and config.format != "tflite":
        parser.error("--quantize needs --format tflite")
    if config.M < 2:
        parser.error("--M must be at least 2 (GE2E needs exclusive centroids)")
    if config.N < 2:
        parser.error("--N must be at least 2 (GE2E contrasts speakers)")
    if round(config.window * config.sr) > config.nfft:
        parser.error(f"--window {config.window}s is {round(config.window * config.sr)} samples, "
                     f"longer than --nfft {config.nfft}")
    # The one rule for which model a command uses: the use commands take the ready model unless
    # --model_path names another; training and --train False take --model_path.
    if uses_the_ready_model(config):
        config.model_path = str(READY_MODEL)
    # Each concern's settings as one frozen value: config.features, config.training, ...
    for name, kind in SECTIONS.items():
        setattr(config, name, _section(kind, config))
    return config


def use_commands(config: argparse.Namespace) -> list[str]:
    """The commands given that use a trained model on recordings (not training or testing)."""
    return [name for name in USE_COMMANDS if getattr(config, name)]


def uses_the_ready_model(config: argparse.Namespace) -> bool:
    return ("model_path" not in config.explicit
            and any(getattr(config, name) for name in READY_MODEL_COMMANDS))


def save_config(path: str | os.PathLike, features: Features, network: Network,
                training: Training, evaluation: Evaluation, data: Preprocessing,
                model: dict[str, str]) -> None:
    """Write a model's config.json in sections, atomically; `model` is the record of
    MODEL_RECORD (its path, where its first weights came from, the comment)."""
    import utils

    record = {"features": asdict(features), "network": asdict(network),
              "training": asdict(training), "evaluation": asdict(evaluation),
              "data": asdict(data), "model": {key: model[key] for key in MODEL_RECORD}}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    utils.atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True))


def load_config(path: str | os.PathLike) -> dict[str, dict]:
    """A saved config.json by section; the flat files of earlier versions are sorted into
    the sections by field name."""
    import utils

    saved = utils.read_json(path, "the saved config")
    if all(isinstance(saved.get(name), dict) for name in (*SECTIONS, "model")):
        return saved
    sections = {name: {f.name: saved[f.name] for f in fields(kind) if f.name in saved}
                for name, kind in SECTIONS.items()}
    sections["model"] = {key: saved[key] for key in MODEL_RECORD if key in saved}
    return sections


def from_saved(current: T, saved: dict[str, dict], explicit: Collection[str],
               kinds: tuple[str, ...] = ("weights", "input")) -> T:
    """`current` with the fields of the given kinds taken from a saved config; a conflicting
    flag the user typed is an error."""
    name = next(name for name, kind in SECTIONS.items() if isinstance(current, kind))
    stored = saved.get(name, {})
    taken = {}
    for key in fixed_fields(type(current), *kinds):
        if key not in stored:
            continue
        value = _plain(getattr(current, key))
        if key in explicit and value != stored[key]:
            raise ValueError(f"--{key} {value} conflicts with the model's saved "
                             f"config ({key}={stored[key]}); drop the flag or use another "
                             f"--model_path")
        taken[key] = _frozen(stored[key])
    return replace(current, **taken)
