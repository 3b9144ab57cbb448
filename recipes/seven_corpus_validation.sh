#!/usr/bin/env bash
# The validation runs behind the ready model's seven-corpus recipe: how one-second keywords
# enter TI-SV training, per-utterance mean normalisation, and what each new corpus brings to
# the others (leave one out, at this shorter budget). Validation speakers are fold 1 of a
# 5-fold speaker split of each corpus; the test splits are fold 0, so no test speaker is
# scored here. Each probe trains on the other folds as four MultiReader sources, weights
# 1 1 1 1: speechocean762; Common Voice; LibriSpeech; Speech Commands + Arabic digits (one
# keyword source). N=16 M=10, Adam 1e-3, 2,000 steps, no augmentation; SEEDS="0 1" (default)
# trains each probe once per seed. PROBES picks them (default: all, in this order):
#
#   tile            every batch cropped to 140-180 frames, short clips repeated to fill
#   short           --short_crops True: a source's crops capped at its median length
#   short_mean      short, with --mean_norm True
#   no_librispeech  tile without LibriSpeech
#   no_keywords     tile without the keyword source
#
# Each probe is scored (raw and AS-norm, cohort: its training speakers) on five validation
# lists: speechocean762 and LibriSpeech all pairs, Common Voice same-language pairs, Speech
# Commands and Arabic same-word pairs. Mean raw EER over the five lists: tile 14.08 / 12.41 %
# (seeds 0 / 1), short 13.69 / 13.33 %, short_mean 16.51 % (seed 0); without LibriSpeech its
# own list goes 4.76 -> 7.48 %, without the keywords Common Voice 16.86-19.85 -> 22.19 %.
# About 21-26 min per probe with a second job beside it on 2 cores (Intel Xeon).
# Results/seven_corpus_validation/ holds the figures;
# Results/EXPERIMENTS.md ("How should one-second keywords enter TI-SV training?", "Per-utterance
# mean normalisation?", "What does each new corpus bring?") reads them.
#
# Folders: RUN/data/<corpus>/{train,val}, RUN/<probe>_s<seed>/{model,results/<list>}.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

PROBES=${PROBES:-tile short short_mean no_librispeech no_keywords}
SEEDS=${SEEDS:-0 1}
ITERATIONS=${ITERATIONS:-2000}
D=$RUN/data
CORPORA=(speechocean762 commonvoice librispeech speechcommands arabic)

# probe_flags PROBE: the training sources, weights and options of PROBE.
probe_flags() {
  local -A source=([speechocean762]=$D/speechocean762/train [commonvoice]=$D/commonvoice/train
    [librispeech]=$D/librispeech/train [keywords]=$D/speechcommands/train+$D/arabic/train)
  local names=(speechocean762 commonvoice librispeech keywords) options=() paths=() weights=()
  case $1 in
    tile | no_librispeech | no_keywords) ;;
    short) options=(--short_crops True) ;;
    short_mean) options=(--short_crops True --mean_norm True) ;;
    *) say "PROBES: '$1' is none of tile short short_mean no_librispeech no_keywords"; exit 2 ;;
  esac
  local name
  for name in "${names[@]}"; do
    [[ $1 == "no_$name" ]] && continue
    paths+=("${source[$name]}")
    weights+=(1)
  done
  echo "--train_path $(IFS=,; echo "${paths[*]}") --source_weights ${weights[*]} ${options[*]}"
}

stage_preprocess() {
  local corpus
  for corpus in "${CORPORA[@]}"; do
    preprocess --audio_path "$DATA/$corpus" --train_path "$D/$corpus/train" \
      --test_path "$D/$corpus/val" --folds 5 --fold 1 --workers "$WORKERS"
  done
}

stage_train() {
  local probe seed flags
  for probe in $PROBES; do
    read -r -a flags <<<"$(probe_flags "$probe")"
    for seed in $SEEDS; do
      train "$RUN/${probe}_s$seed/model" "${flags[@]}" --seed "$seed" "${TISV_FLAGS[@]}" \
        --test_path "$D/speechocean762/val" --iteration "$ITERATIONS" --lr_decay_every 10000 \
        --save_every 500
    done
  done
}

stage_evaluate() {
  local probe seed flags corpus
  for probe in $PROBES; do
    read -r -a flags <<<"$(probe_flags "$probe")"
    for seed in $SEEDS; do
      for corpus in "${CORPORA[@]}"; do
        # Cohort: the probe's --train_path, its training speakers.
        test_on "$corpus" "$D" "$RUN/${probe}_s$seed/model" \
          "$RUN/${probe}_s$seed/results/$corpus" "${flags[1]}" val
      done
    done
  done
}

stages "preprocess train evaluate" "$@"
