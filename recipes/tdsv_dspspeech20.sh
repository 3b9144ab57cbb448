#!/usr/bin/env bash
# TD-SV on dspspeech20's phrase "speaker", 5-fold speaker cross-validation (every one of the
# 27 speakers tested once). Each fold's model trains on two MultiReader sources (weights 1 1):
# the fold's training speakers, all six words, also at 0.9x / 1.1x speed, and the 160
# speechocean762 training speakers (every utterance a "phrase"); 140-frame window, N=16 M=6,
# Adam 1e-3, no added noise (--snr_db 40 50). SYSTEM picks the row of the README's table:
#
#   SYSTEM=W (default)  recipe W from scratch, 1,500 steps: similarity-matrix EER 5.95 % on
#                       the mean of the folds (6.00, 4.67, 2.60, 9.27, 7.20), pairs 10.0 % raw /
#                       10.3 % AS-norm; 21 min per fold (Results/dspspeech20_cv_window140/,
#                       seed 0)
#   SYSTEM=finetuned    W started from the ready model (--init_from pretrained), 500 steps; with
#                       the earlier four-corpus ready model:
#                       3.72 % (4.30, 3.40, 3.10, 7.60, 0.20), pairs 7.24 % / 7.18 %; 5.4 min
#                       per fold, two folds at once (Results/warm_start/)
#   SYSTEM=X            four models as one (--ensemble): W, W with --seed 1, B140 (W without
#                       speed perturbation), C2L140 (W with two layers): 4.34 % (5.30, 2.80,
#                       3.10, 6.80, 3.70), pairs 7.9 % / 8.4 %, minDCF 0.537 / 0.381
#                       (Results/dspspeech20_cv_window140_ensembleX/); trains the members
#                       that are missing, W's own models included
#
# Folders: RUN/data/so762_td140/ and RUN/data/fold<k>/ (shared by every SYSTEM),
# RUN/<member>/fold<k>/model, RUN/<SYSTEM>/fold<k>/results, RUN/<SYSTEM>/summary.txt.
# FOLDS="0 1 2 3 4" picks folds; ITERATIONS=K trains every model K steps.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SYSTEM=${SYSTEM:-W}
FOLDS=${FOLDS:-0 1 2 3 4}
case $SYSTEM in
  W) MEMBERS=(W) ;;
  finetuned) MEMBERS=(finetuned) ;;
  X) MEMBERS=(W W_seed1 B140 C2L140) ;;
  *) say "SYSTEM=$SYSTEM: expected W, finetuned or X"; exit 2 ;;
esac
D=$RUN/data
SO762=$D/so762_td140

stage_preprocess() {
  local k f
  # Every speechocean762 file is one "phrase" of its speaker (--tdsv_pattern .): the
  # out-of-domain source.
  preprocess --min_frames 40 --tdsv True --tdsv_frame 140 --tdsv_pattern . --audio_path "$DATA/speechocean762" \
    --train_path "$SO762/train" --test_path "$SO762/test" --workers "$WORKERS"
  for k in $FOLDS; do
    f=$D/fold$k
    # The test phrase; its training split is the AS-norm cohort.
    preprocess --min_frames 40 --tdsv True --tdsv_frame 140 --tdsv_phrase speaker \
      --audio_path "$DATA/dspspeech20" --folds 5 --fold "$k" \
      --train_path "$f/phrase_train" --test_path "$f/test" --workers "$WORKERS"
    # The training speakers' six words; the test speakers' copy is not used.
    preprocess --min_frames 40 --tdsv True --tdsv_frame 140 --tdsv_pattern . --audio_path "$DATA/dspspeech20" \
      --folds 5 --fold "$k" --train_path "$f/train_sp" --test_path "$f/all_words_test" \
      --speed_perturb 0.9 1.1 --workers "$WORKERS"
    if [[ $SYSTEM == X ]]; then
      preprocess --min_frames 40 --tdsv True --tdsv_frame 140 --tdsv_pattern . \
        --audio_path "$DATA/dspspeech20" --folds 5 --fold "$k" --train_path "$f/train" \
        --test_path "$f/all_words_test" --workers "$WORKERS"
    fi
  done
}

# train_member NAME FOLD: one model of the recipe, its differences from W as flags.
train_member() {
  local name=$1 k=$2 f=$D/fold$2
  local in_domain=$f/train_sp iterations=${ITERATIONS:-1500} extra=()
  case $name in
    W) ;;
    W_seed1) extra=(--seed 1) ;;
    B140) in_domain=$f/train ;;
    C2L140) extra=(--num_layer 2) ;;
    finetuned) extra=(--init_from pretrained) iterations=${ITERATIONS:-500} ;;
  esac
  train "$RUN/$name/fold$k/model" --tdsv True --tdsv_frame 140 \
    --train_path "$in_domain,$SO762/train" --source_weights 1 1 --test_path "$f/test" \
    --N 16 --M 6 --optim adam --lr 1e-3 --beta1 0.9 --beta2 0.999 --snr_db 40 50 \
    --iteration "$iterations" --save_every 500 "${extra[@]}"
}

stage_train() {
  local k name
  for k in $FOLDS; do
    for name in "${MEMBERS[@]}"; do
      train_member "$name" "$k"
    done
  done
}

stage_evaluate() {
  local k others name
  for k in $FOLDS; do
    others=()
    for name in "${MEMBERS[@]:1}"; do
      others+=("$RUN/$name/fold$k/model")
    done
    local ensemble=()
    ((${#others[@]} == 0)) || ensemble=(--ensemble "$(IFS=,; echo "${others[*]}")")
    evaluate --tdsv True --model_path "$RUN/${MEMBERS[0]}/fold$k/model" "${ensemble[@]}" \
      --train_path "$D/fold$k/phrase_train" --test_path "$D/fold$k/test" \
      --results_path "$RUN/$SYSTEM/fold$k/results"
  done
}

stage_summarize() {
  local k results=()
  for k in $FOLDS; do
    results+=("$RUN/$SYSTEM/fold$k/results")
  done
  run_into "$RUN/$SYSTEM/summary.txt" "$PYTHON" main.py --summarize "${results[@]}"
}

stages "preprocess train evaluate summarize" "$@"
