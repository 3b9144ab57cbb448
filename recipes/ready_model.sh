#!/usr/bin/env bash
# The ready model in pretrained/ (TI-SV, 3 x LSTMP 128/64): speechocean762, Common Voice,
# dspspeech20 and fsdd, the first three's training speakers also at 0.9x / 1.1x speed,
# --augment 2, three MultiReader sources weighted 2 / 2 / 1 (dspspeech20 + fsdd share one),
# N=16 M=10, Adam 1e-3 halved every 4,000 steps, 10,000 steps; tested as its model card does.
#
# It gave (pretrained/MODEL_CARD.md, Results/pretrained/): speechocean762 similarity-matrix
# EER 4.87 % +/- 0.55, its 79,800 pairs 9.89 % raw / 9.88 % AS-norm (minDCF 0.799 / 0.595);
# Common Voice same-language pairs 17.73 % / 16.26 %; dspspeech20 same-word pairs
# 3.92 % / 3.47 %. Training: 30.9 min, 1.25 GB peak RSS on 2 Zen 5 cores; another CPU rounds
# differently and lands within a run's spread (about a point; two on dspspeech20).
#
# Folders: RUN/data/<corpus>/{train_aug,train_sp,test}, RUN/model, RUN/results/<corpus>.
# The cohort stage writes the model's AS-norm cohort (MODEL=pretrained: the shipped one).
# ITERATIONS=K trains K steps instead of 10,000. MODEL=DIR makes the evaluate stage test
# another model, e.g. MODEL=pretrained to check the shipped one without training (that test
# rewrites pretrained/evaluation.json, whose threshold source then names RUN's test split).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ITERATIONS=${ITERATIONS:-10000}
D=$RUN/data

stage_preprocess() { preprocess_corpora "$D"; }

stage_train() {
  train "$RUN/model" \
    --train_path "$D/speechocean762/train_aug,$D/commonvoice/train_aug,$D/dspspeech20/train_aug+$D/fsdd/train_aug" \
    --source_weights 2 2 1 --test_path "$D/speechocean762/test" "${TISV_FLAGS[@]}" \
    --lr_decay_every 4000 --iteration "$ITERATIONS" --save_every 500
}

stage_evaluate() {
  local model=${MODEL:-$RUN/model} corpus
  # speechocean762 first: its similarity-matrix test sets the model's operating threshold.
  for corpus in speechocean762 commonvoice dspspeech20; do
    test_on "$corpus" "$D" "$model" "$RUN/results/$corpus" "$D/$corpus/train_aug"
  done
}

# The AS-norm cohort shipped beside the model (cohort.npz): the same training speakers, sped up
# as in training but without the room copies; fsdd without --augment.
stage_cohort() {
  local model=${MODEL:-$RUN/model} corpus folders=()
  for corpus in speechocean762 commonvoice dspspeech20; do
    preprocess --audio_path "$DATA/$corpus" --train_path "$D/$corpus/train_sp" \
      --test_path "$D/cohort_test/$corpus" --workers "$WORKERS" --speed_perturb 0.9 1.1 \
      --min_frames 40
    folders+=("$D/$corpus/train_sp")
  done
  preprocess --audio_path "$DATA/fsdd" --train_path "$D/fsdd/train" \
    --test_path "$D/cohort_test/fsdd" --workers "$WORKERS" --min_frames 40
  folders+=("$D/fsdd/train")
  run "$PYTHON" main.py --cohort --model_path "$model" --train_path "$(IFS=,; echo "${folders[*]}")"
}

stages "preprocess train evaluate cohort" "$@"
