"""Evaluation: the paper's similarity-matrix test, trial-list scoring with EER/minDCF, AS-norm."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from tqdm import tqdm

import dataset
import ge2e
import model
import utils
from configuration import Evaluation

P_TARGETS = (0.01, 0.05)
RECORD = "evaluation.json"  # a test's metrics and thresholds; this module alone reads and writes it
COHORT = "cohort.npz"  # the AS-norm cohort shipped with a model; this module owns it too


def save_record(folder: Path, summary: dict) -> None:
    """Write a test's evaluation.json into folder (the model's, or a --results_path)."""
    folder.mkdir(parents=True, exist_ok=True)
    utils.atomic_save_json(folder / RECORD, summary)


def read_record(folder: str | Path, flag: str) -> dict:
    """The evaluation.json in folder; a missing one is a one-line error naming `flag`."""
    path = Path(folder) / RECORD
    if not path.is_file():
        raise ValueError(f"{flag} {folder}: no {RECORD} there (expected the --results_path of "
                         f"a `main.py --train False` run)")
    return utils.read_json(path, "a test's evaluation record")


def operating_threshold(model_path: Path, fingerprint: str, ensemble: bool = False
                        ) -> tuple[float | None, str]:
    """The model's operating threshold (the EER threshold of its own test split) and its
    source; None, with the reason, when the model has not been tested."""
    path = model_path / RECORD
    if not path.is_file():
        return None, f"{path} does not exist: the model has not been tested (main.py --train False)"
    saved = utils.read_json(path, "a test's evaluation record")
    try:
        _check_weights(saved, path, fingerprint, ensemble)
    except ValueError as error:
        return None, str(error)  # enrolling or an explicit --threshold still work
    # Earlier versions let a --trials run overwrite the model's threshold with that list's; only
    # the similarity-matrix test of the test split records eer_mean.
    if "eer_mean" not in saved or not isinstance(saved.get("threshold"), (int, float)):
        return None, (f"{path} holds the threshold of a trial list "
                      f"({saved.get('threshold_source')}), not of the model's test split: run "
                      f"main.py --train False without --trials")
    source = saved.get("threshold_source", "")
    if "threshold_eer" not in saved:  # written before the source was spelled out
        source = (f"EER threshold of the model's test split (similarity-matrix test), EER "
                  f"{100 * saved['eer_mean']:.2f} %")
    return float(saved["threshold"]), f"operating threshold: {source}"


def threshold_from(folder: str, fingerprint: str) -> tuple[float, str]:
    """The EER threshold recorded by the evaluation in folder (--threshold_from) and its source."""
    saved = read_record(folder, "--threshold_from")
    _check_weights(saved, Path(folder) / RECORD, fingerprint, ensemble=False)
    if not isinstance(saved.get("threshold"), (int, float)):
        raise ValueError(f"{Path(folder) / RECORD}: no 'threshold'; expected the evaluation "
                         f"record of a --train False run")
    return float(saved["threshold"]), f"--threshold_from {folder}: {saved.get('threshold_source')}"


def _check_weights(saved: dict, path: Path, fingerprint: str, ensemble: bool) -> None:
    # Evaluations written before the fingerprint was recorded are of --model_path alone.
    if saved.get("model", None if ensemble else fingerprint) != fingerprint:
        raise ValueError(f"{path} holds the threshold of other weights "
                         f"({' + '.join(saved.get('models', ['?']))}), not of this model; run "
                         f"main.py --train False with it first or pass --threshold")


def embed_store(trained: ge2e.DVectorModel, store: dataset.SpeakerStore, desc: str
                ) -> dict[str, np.ndarray]:
    """Utterance d-vectors [U,P] of every speaker of a preprocessed split."""
    return {speaker: trained.embed_features(store.test_utterances(speaker))
            for speaker in tqdm(store.speakers, desc=desc, unit="speaker", dynamic_ncols=True)}


def embed_files(trained: ge2e.DVectorModel, root: Path, names: list[str]
                ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Utterance d-vectors of audio files under root, by relative name, and why each unusable
    file (missing, unreadable, silent, too short) was skipped."""
    name_of = {str(root / name): name for name in names}
    vectors, errors = trained.embed_files_or_errors(list(name_of))
    return ({name_of[p]: v for p, v in vectors.items()},
            {name_of[p]: reason for p, reason in errors.items()})


def skip_report(skipped: dict[str, str], trials: int, dropped: int) -> str:
    """One line: how many files and trials were skipped, by reason, with one example each."""
    reasons: dict[str, list[str]] = {}
    for name, reason in skipped.items():
        reasons.setdefault(reason.split(":")[0].split(" (")[0], []).append(name)
    kinds = "; ".join(f"{len(v)} {k} (e.g. {v[0]})" for k, v in sorted(reasons.items()))
    return f"skipped {len(skipped)} file(s) and the {dropped} of {trials} trials using them: {kinds}"


def verification_draw(d_vectors: dict[str, np.ndarray], enroll_ratio: float,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One random enrollment/verification split per speaker; returns scores [V,S] and labels [V]."""
    speakers = sorted(d_vectors)
    models, tests, labels = [], [], []
    for s, speaker in enumerate(speakers):
        vectors = d_vectors[speaker]
        order = rng.permutation(len(vectors))
        n_enroll = min(max(1, int(round(enroll_ratio * len(vectors)))), len(vectors) - 1)
        models.append(utils.speaker_model(vectors[order[:n_enroll]]))
        tests.append(vectors[order[n_enroll:]])
        labels.extend([s] * (len(vectors) - n_enroll))
    return np.concatenate(tests) @ np.stack(models).T, np.asarray(labels)


def split_scores(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Target and nontarget entries of a [V,S] score matrix whose row v belongs to labels[v]."""
    own = np.arange(scores.shape[1])[None, :] == labels[:, None]
    return scores[own], scores[~own]


def similarity_matrix_test(d_vectors: dict[str, np.ndarray], evaluation: Evaluation
                           ) -> dict:
    """The original's test over all test speakers, repeated over random enrollment draws."""
    rng = np.random.default_rng(evaluation.seed)
    eers, thresholds, first = [], [], None
    for _ in range(evaluation.draws):
        scores, labels = verification_draw(d_vectors, evaluation.enroll_ratio, rng)
        target, nontarget = split_scores(scores, labels)
        eer, threshold = utils.equal_error_rate(target, nontarget)
        eers.append(eer)
        thresholds.append(threshold)
        if first is None:
            first = {"scores": scores, "labels": labels, "eer": eer, "threshold": threshold,
                     "far": float(np.mean(nontarget >= threshold)),
                     "frr": float(np.mean(target < threshold))}
    return {"eer_mean": float(np.mean(eers)), "eer_std": float(np.std(eers)), "eers": eers,
            "threshold": float(np.mean(thresholds)), "first": first}


def all_pairs_trials(names: dict[str, list[str]]) -> list[tuple[int, str, str]]:
    """Every unordered pair of distinct utterances, labelled 1 when both have one speaker."""
    flat = [(speaker, name) for speaker in sorted(names) for name in names[speaker]]
    return [(int(flat[i][0] == flat[j][0]), flat[i][1], flat[j][1])
            for i in range(len(flat)) for j in range(i + 1, len(flat))]


def metrics(scores: np.ndarray, labels: np.ndarray) -> dict:
    """EER (with threshold) and normalised minDCF at each P_TARGETS."""
    target, nontarget = scores[labels == 1], scores[labels == 0]
    eer, threshold = utils.equal_error_rate(target, nontarget)
    result = {"eer": eer, "threshold": threshold, "targets": int(target.size),
              "nontargets": int(nontarget.size)}
    for p in P_TARGETS:
        result[f"min_dcf_{p}"] = utils.min_dcf(target, nontarget, p)[0]
    return result


def format_metrics(name: str, result: dict) -> str:
    dcf = "  ".join(f"minDCF(p={p}) {result[f'min_dcf_{p}']:.4f}" for p in P_TARGETS)
    return (f"{name:8s} EER {100 * result['eer']:.2f}% (threshold {result['threshold']:.4f})  "
            f"{dcf}")


def threshold_record(threshold: float, eer: float, scored: str) -> dict:
    """evaluation.json's threshold fields: the EER threshold and the evaluation it came from."""
    return {"threshold": float(threshold), "threshold_eer": float(eer),
            "threshold_source": f"EER threshold of {scored}, EER {100 * eer:.2f} %"}


def cohort_models(trained: ge2e.DVectorModel, train_path: str, typed: bool
                  ) -> np.ndarray | None:
    """The AS-norm cohort, one speaker model per training speaker: of train_path when the user
    typed it, else the one shipped with the model (cohort.npz), else of train_path; None when
    there is none."""
    shipped = trained.path / COHORT
    if not typed and shipped.is_file():
        return read_cohort(shipped, trained.fingerprint)
    try:
        store = dataset.open_store(train_path, trained.features, "train")
    except ValueError as error:
        print(f"AS-norm skipped: no training speakers for the cohort ({error})")
        return None
    vectors = embed_store(trained, store, "cohort")
    return np.stack([utils.speaker_model(v) for v in vectors.values()])


def read_cohort(path: Path, fingerprint: str) -> np.ndarray:
    """A shipped cohort's speaker models [C,P]; refused if made with other weights."""
    with np.load(path, allow_pickle=False) as saved:
        if str(saved["model"]) != fingerprint:
            raise ValueError(f"{path} was made with other weights ({saved['model']}, this model "
                             f"is {fingerprint}); write it again with --cohort")
        return saved["speaker_models"]


def write_cohort(config: argparse.Namespace) -> Path:
    """--cohort: embed every --train_path speaker and ship the speaker models with the model."""
    trained = ge2e.DVectorModel(config)
    store = dataset.open_store(config.train_path, trained.features, "train")
    vectors = embed_store(trained, store, "cohort")
    path = trained.path / COHORT
    utils.atomic_save_npz(path, speaker_models=np.stack([utils.speaker_model(v)
                                                          for v in vectors.values()]),
                          speakers=np.array(list(vectors), dtype=str),
                          model=np.array(trained.fingerprint))
    print(f"AS-norm cohort: {len(vectors)} speaker models of {config.train_path} -> {path}")
    return path


def write_scores(path: Path, trials, scores: np.ndarray) -> None:
    """Score file in the wespeaker/Kaldi convention: `enrol test score target|nontarget`."""
    lines = [f"{enrol} {test} {score:.6f} {'target' if label else 'nontarget'}"
             for (label, enrol, test), score in zip(trials, scores)]
    utils.atomic_write_text(path, "\n".join(lines) + "\n")


def test(config: argparse.Namespace) -> dict:
    """Evaluate a trained model: similarity-matrix draws, trial scoring, AS-norm, figures."""
    import plots  # matplotlib: only a test draws figures, not the model loads that read records

    trained = ge2e.DVectorModel(config)
    front = trained.features
    mode = "TD-SV" if front.tdsv else "TI-SV"
    model_path = Path(config.model_path)
    results = Path(config.results_path or model_path / "results")
    summary: dict = {"mode": mode, "models": model.model_paths(config.model_path, config.ensemble),
                     "model": trained.fingerprint}

    if config.trials:
        if results.resolve() == model_path.resolve():
            raise ValueError(f"--results_path {results} is --model_path: a --trials evaluation "
                             f"would replace the model's operating threshold; choose another "
                             f"--results_path")
        trials = utils.parse_trials(config.trials)
        if not config.audio_path:
            raise ValueError("--trials needs --audio_path, the folder its paths are relative to")
        names = sorted({name for _, a, b in trials for name in (a, b)})
        vectors, skipped = embed_files(trained, Path(config.audio_path), names)
        listed = len(trials)
        trials = [t for t in trials if t[1] in vectors and t[2] in vectors]
        if skipped:
            print(skip_report(skipped, listed, listed - len(trials)))
            summary["skipped_files"] = len(skipped)
            summary["skipped_trials"] = listed - len(trials)
        if not trials:
            raise ValueError(f"--trials {config.trials}: no trial has two usable files")
        origin = f"from {config.trials}"
    else:
        store = dataset.open_store(config.test_path, front, "test")
        by_speaker = embed_store(trained, store, "embed")
        draws = similarity_matrix_test(by_speaker, config.evaluation)
        first = draws["first"]
        print(f"{mode} similarity-matrix test: EER {100 * draws['eer_mean']:.2f}% +/- "
              f"{100 * draws['eer_std']:.2f} over {config.draws} enrollment draws of "
              f"{len(store.speakers)} test speakers (draw 1: EER {100 * first['eer']:.2f}% at "
              f"threshold {first['threshold']:.4f}, FAR {100 * first['far']:.2f}%, "
              f"FRR {100 * first['frr']:.2f}%)")
        # --verify compares a file with a profile (mean of enrollment d-vectors), as this test
        # does; its EER threshold, not the utterance-pair one, is the operating threshold.
        split = (f"the model's test split {utils.record_path(config.test_path)} (similarity-matrix "
                 f"test, mean of {config.draws} enrollment draws)")
        summary.update(eer_mean=draws["eer_mean"], eer_std=draws["eer_std"],
                       speakers=len(store.speakers),
                       **threshold_record(draws["threshold"], draws["eer_mean"], split))
        plots.similarity_matrix_figure(first["scores"], first["labels"], store.speakers,
                                       results, mode)
        plots.embedding_projection(by_speaker, results, mode)
        by_speaker_names = {s: store.utterance_names(s) for s in store.speakers}
        trials = all_pairs_trials(by_speaker_names)
        vectors = {name: vector for s in store.speakers
                   for name, vector in zip(by_speaker_names[s], by_speaker[s])}
        origin = f"all pairs of the {len(store.speakers)} test speakers' utterances"

    labels = np.array([label for label, _, _ in trials])
    if labels.min() == labels.max():
        raise ValueError("the trials need both target (1) and nontarget (0) lines")
    names = sorted(vectors)
    index = {name: i for i, name in enumerate(names)}
    matrix = np.stack([vectors[name] for name in names])
    enrol = np.array([index[a] for _, a, _ in trials])
    probe = np.array([index[b] for _, _, b in trials])
    raw = np.sum(matrix[enrol] * matrix[probe], axis=1)
    raw_metrics = metrics(raw, labels)
    print(f"trials: {len(trials)} ({raw_metrics['targets']} target, "
          f"{raw_metrics['nontargets']} nontarget), {origin}")
    print(format_metrics("raw", raw_metrics))
    results.mkdir(parents=True, exist_ok=True)
    write_scores(results / "scores.txt", trials, raw)
    summary["raw"] = raw_metrics

    cohort = cohort_models(trained, config.train_path, "train_path" in config.explicit)
    if cohort is not None:
        cohort_scores = matrix @ cohort.T
        normed = utils.as_norm(raw, cohort_scores[enrol], cohort_scores[probe],
                               config.asnorm_topk)
        summary["as_norm"] = metrics(normed, labels)
        print(format_metrics("AS-norm", summary["as_norm"]) +
              f"  (cohort {len(cohort)} training speakers, top {config.asnorm_topk})")
        summary["cohort"] = len(cohort)
        write_scores(results / "scores_asnorm.txt", trials, normed)

    if config.trials:
        # Another list's threshold is that evaluation's result, never the model's operating
        # threshold: it goes to --results_path only (--threshold_from can pick it).
        summary.update(threshold_record(raw_metrics["threshold"], raw_metrics["eer"],
                                        f"trial list {utils.record_path(config.trials)}"))
    else:
        save_record(model_path, summary)
    save_record(results, summary)  # beside its figures: --summarize
    figures = [plots.det_curve(raw[labels == 1], raw[labels == 0], results, mode),
               plots.score_histograms(raw[labels == 1], raw[labels == 0],
                                      raw_metrics["threshold"], results, mode)]
    loss_figure = plots.loss_curve(model_path / "logs", results, mode)
    if loss_figure is not None:
        figures.append(loss_figure)
    print(f"scores and figures in {results}")
    if config.trials:
        print(f"thresholds of this trial list in {results / RECORD} (the operating "
              f"threshold is unchanged; --threshold_from {results} uses this one)")
    return summary


def summary_of_tests(evaluations: list[dict]) -> dict:
    """Means over several tests' evaluation.json contents (e.g. cross-validation folds): the
    similarity-matrix EER plain and weighted by test speakers, and the all-pairs EERs."""
    summary = {"tests": len(evaluations)}
    if all("eer_mean" in e for e in evaluations):
        eers = np.array([e["eer_mean"] for e in evaluations])
        speakers = np.array([e["speakers"] for e in evaluations])
        summary.update(eer_mean=float(eers.mean()),
                       eer_speaker_weighted=float(np.sum(eers * speakers) / speakers.sum()))
    for kind in ("raw", "as_norm"):
        if all(kind in e for e in evaluations):
            summary[f"{kind}_eer_mean"] = float(np.mean([e[kind]["eer"] for e in evaluations]))
    return summary


def summarize(folders: list[str]) -> dict:
    """Print and return summary_of_tests of the evaluation.json in each --results_path folder."""
    evaluations = []
    for folder in folders:
        evaluations.append(read_record(folder, "--summarize"))
        if not isinstance(evaluations[-1].get("raw"), dict):
            raise ValueError(f"{Path(folder) / RECORD}: expected a test's evaluation record, "
                             f"with its 'raw' metrics")
    summary = summary_of_tests(evaluations)
    line = [f"{len(folders)} tests"]
    if "eer_mean" in summary:
        line.append(f"similarity-matrix EER mean {100 * summary['eer_mean']:.2f}% "
                    f"({100 * summary['eer_speaker_weighted']:.2f}% weighted by test speakers)")
    line.append(f"all pairs raw EER mean {100 * summary['raw_eer_mean']:.2f}%")
    if "as_norm_eer_mean" in summary:
        line.append(f"AS-norm {100 * summary['as_norm_eer_mean']:.2f}%")
    print(", ".join(line))
    return summary
