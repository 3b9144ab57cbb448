# Shared by the recipes (sourced, never run): stage dispatch, resumable training, dry runs,
# and the four-corpus TI-SV data and test sets that ready_model.sh and
# leave_one_corpus_out.sh share.
#
# Settings every recipe reads from the environment:
#   RUN=DIR      the recipe's own folder (default runs/<recipe>), relative to the repository
#   DATA=DIR     the corpora (default ../shared/data)
#   PYTHON=EXE   the interpreter (default python: activate the project's venv first)
#   WORKERS=K    preprocessing processes (default 2)
#   DRY_RUN=1    print the commands, one a line on stdout, instead of running them
# shellcheck shell=bash

# Every path a recipe names is relative to the repository root, so the recipes run from any
# folder and their printed commands can be pasted at the root.
cd "$(dirname "${BASH_SOURCE[0]}")/.."

RECIPE_FILE=${BASH_SOURCE[1]}
RECIPE=$(basename "$RECIPE_FILE" .sh)
RUN=${RUN:-runs/$RECIPE}
DATA=${DATA:-../shared/data}
PYTHON=${PYTHON:-python}
WORKERS=${WORKERS:-2}
DRY_RUN=${DRY_RUN:-0}

# Progress goes to stderr: in a dry run stdout carries the commands alone.
say() { printf '%s\n' "$*" >&2; }

# quote WORD: WORD as the shell reads it back, left bare when it needs no quoting (printf %q
# would also escape the commas of --train_path lists).
quote() {
  if [[ $1 =~ ^[][A-Za-z0-9_./,+=:@%{}-]+$ ]]; then
    printf '%s' "$1"
  else
    printf '%q' "$1"
  fi
}

# run CMD [ARG...]: run it, or in a dry run print it, shell-quoted, on one line.
run() {
  if [[ $DRY_RUN == 1 ]]; then
    local word line=()
    for word in "$@"; do
      line+=("$(quote "$word")")
    done
    printf '%s\n' "${line[*]}"
  else
    say "+ $*"
    "$@"
  fi
}

# run_into FILE CMD [ARG...]: run, keeping a copy of what it prints in FILE.
run_into() {
  local file=$1
  shift
  if [[ $DRY_RUN == 1 ]]; then
    run "$@"
  else
    mkdir -p "$(dirname "$file")"
    run "$@" | tee "$file"
  fi
}

preprocess() { run "$PYTHON" data_preprocess.py "$@"; }

# train MODEL FLAG...: train into MODEL. When MODEL already holds a checkpoint (an interrupted
# or finished run), add --restore True: without it main.py would move that model aside and
# start again from step 0; with it a finished model says so and does nothing.
train() {
  local model=$1
  shift
  local resume=()
  if [[ -f $model/checkpoints/checkpoint ]]; then
    say "$model holds checkpoints: resuming"
    resume=(--restore True)
  fi
  run "$PYTHON" main.py --train True --model_path "$model" "$@" "${resume[@]}"
}

# evaluate FLAG...: a test only reads the model and rewrites its results, so it simply re-runs.
evaluate() { run "$PYTHON" main.py --train False "$@"; }

# usage: the recipe's stages (set by stages()) and how to run them.
usage() {
  say "stages: $STAGES"
  say "usage: bash $RECIPE_FILE [STAGE ...]   (no stage: all of them, in this order)"
}

# stages "S1 S2 ..." "$@": run the stages named on the command line (all, in the recipe's
# order, when none is), each the recipe's function stage_<name>.
stages() {
  STAGES=$1
  shift
  local chosen=("$@") stage
  if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    # The recipe's header: its comment lines after the shebang.
    sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$RECIPE_FILE" >&2
    usage
    exit 0
  fi
  ((${#chosen[@]})) || read -r -a chosen <<<"$STAGES"
  for stage in "${chosen[@]}"; do
    if [[ " $STAGES " != *" $stage "* ]]; then
      say "$RECIPE: unknown stage '$stage'"
      usage
      exit 2
    fi
  done
  for stage in "${chosen[@]}"; do
    say "== $RECIPE: $stage (into $RUN)"
    "stage_$stage"
  done
}

# --- the seven-corpus data (ready_model.sh, leave_one_corpus_out.sh) ------------------------

# The corpora the ready model trains on: read speech (TI), then short fixed words (keywords,
# digits, phrases). fsdd's six speakers of 8 kHz digits are neither sped up nor cut at 40 frames.
TI_CORPORA=(speechocean762 commonvoice librispeech)
WORD_CORPORA=(speechcommands arabic dspspeech20)

# preprocess_corpora DIR [CORPUS...]: each corpus's seeded split (--test_ratio 0.2, --seed 0)
# into DIR/<corpus>/{train_aug,test} (default: all seven); the training speakers of all but
# fsdd also at 0.9x / 1.1x speed as new speakers, and every training utterance twice more in a
# simulated room with noise. Read speech keeps utterances of at least 40 voiced frames (0.4 s),
# words and digits 20.
preprocess_corpora() {
  local dir=$1 corpus speed
  shift
  (($#)) || set -- "${TI_CORPORA[@]}" "${WORD_CORPORA[@]}" fsdd
  for corpus in "$@"; do
    speed=(--speed_perturb 0.9 1.1)
    [[ $corpus == fsdd ]] && speed=()
    preprocess --audio_path "$DATA/$corpus" --train_path "$dir/$corpus/train_aug" \
      --test_path "$dir/$corpus/test" --workers "$WORKERS" "${speed[@]}" --augment 2 \
      --min_frames "$(min_frames_of "$corpus")"
  done
}

# min_frames_of CORPUS: the fewest voiced frames an utterance of CORPUS keeps (read speech 40).
min_frames_of() {
  if [[ " ${TI_CORPORA[*]} " == *" $1 "* ]]; then echo 40; else echo 20; fi
}

# The flags shared by the ready model and the leave-one-out runs (its 5,000-step version).
TISV_FLAGS=(--N 16 --M 10 --optim adam --lr 1e-3 --beta1 0.9 --beta2 0.999)

# test_on CORPUS DIR MODEL RESULTS COHORT [SPLIT]: the model card's test of CORPUS's speakers in
# DIR/CORPUS/SPLIT (default test): speechocean762 and LibriSpeech all pairs and the
# similarity-matrix test (which sets the model's operating threshold); Common Voice its
# same-language pairs; Speech Commands and the Arabic digits their same-word pairs; dspspeech20
# the same-word pairs listed in Results/pretrained. COHORT (training folders) is AS-norm's cohort.
test_on() {
  local corpus=$1 dir=$2 model=$3 results=$4 cohort=$5 split=${6:-test}
  local trials=()
  case $corpus in
    speechocean762 | librispeech) ;;
    commonvoice)
      trials=(--trials "$dir/commonvoice/$split/trials_same_language.txt"
        --audio_path "$DATA/commonvoice") ;;
    speechcommands | arabic)
      trials=(--trials "$dir/$corpus/$split/trials_same_text.txt" --audio_path "$DATA/$corpus") ;;
    dspspeech20)
      trials=(--trials Results/pretrained/dspspeech20_trials_same_word.txt
        --audio_path "$DATA/dspspeech20") ;;
    *)
      say "test_on: no test of corpus '$corpus'"
      return 2 ;;
  esac
  evaluate --model_path "$model" --train_path "$cohort" --test_path "$dir/$corpus/$split" \
    "${trials[@]}" --results_path "$results"
}
