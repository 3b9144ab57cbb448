#!/usr/bin/env bash
# TI-SV on speechocean762 alone: its seeded split (160 training / 40 test speakers, 10
# utterances each), 3 x LSTMP 128/64, N=16 M=10, Adam 1e-3, 1,500 steps.
#
# It gave (Results/precision/speechocean762_fp32/, this build on 2 Zen 5 cores): similarity-
# matrix EER 5.49 % +/- 0.39, all 79,800 pairs 11.16 % raw / 10.81 % AS-norm, minDCF
# 0.965 / 0.711, 742 s of training. PRECISION=bf16 (Results/precision/speechocean762_bf16/)
# gave 7.17 % +/- 0.59 and 12.17 % / 12.08 %.
#
# Folders: RUN/data/{train,test}, RUN/model, RUN/results. ITERATIONS=K trains K steps
# instead of 1,500; PRECISION=bf16 trains and tests with bfloat16 matmuls.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ITERATIONS=${ITERATIONS:-1500}
PRECISION=${PRECISION:-fp32}
D=$RUN/data

stage_preprocess() {
  preprocess --min_frames 40 --audio_path "$DATA/speechocean762" --train_path "$D/train" --test_path "$D/test" \
    --workers "$WORKERS"
}

stage_train() {
  train "$RUN/model" --train_path "$D/train" --test_path "$D/test" "${TISV_FLAGS[@]}" \
    --iteration "$ITERATIONS" --save_every 500 --precision "$PRECISION"
}

stage_evaluate() {
  evaluate --model_path "$RUN/model" --train_path "$D/train" --test_path "$D/test" \
    --precision "$PRECISION" --results_path "$RUN/results"
}

stages "preprocess train evaluate" "$@"
