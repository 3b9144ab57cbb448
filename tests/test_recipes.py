"""The recipes in recipes/: every command they would run parses with the CLI's own parser, so a
recipe naming a wrong flag fails here rather than an hour into a run; stages dispatch, resume
and reject as documented. Dry runs only (DRY_RUN=1): nothing is preprocessed or trained."""

import os
import shlex
import subprocess
from pathlib import Path

import pytest

import configuration

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
SCRIPTS = sorted(p for p in RECIPES.glob("*.sh") if p.name != "common.sh")
ENTRY_POINTS = ("main.py", "data_preprocess.py")
# Every switch that changes what a recipe runs, so each variant's commands are checked too.
VARIANTS = {
    "tdsv_dspspeech20.sh": [{}, {"SYSTEM": "finetuned"}, {"SYSTEM": "X"}],
    "ready_model.sh": [{}, {"MODEL": "pretrained"}],
    "tisv_speechocean762.sh": [{}, {"PRECISION": "bf16"}],
    "leave_one_corpus_out.sh": [{}, {"HOLD_OUT": "commonvoice"}],
    "keyword_tdsv.sh": [{}, {"CORPUS": "arabic"}],
    "seven_corpus_validation.sh": [{}, {"PROBES": "no_keywords", "SEEDS": "1"}],
}


def recipe(script: Path, *args: str, env: dict | None = None, dry: bool = True,
           cwd: Path = REPO) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("RUN", "DATA", "PYTHON", "WORKERS", "ITERATIONS", "FOLDS", "SYSTEM",
                             "MODEL", "PRECISION", "HOLD_OUT", "PREPROCESSED", "CORPUS",
                             "TDSV_FRAME", "PROBES", "SEEDS")}
    full_env.update(env or {})
    if dry:
        full_env["DRY_RUN"] = "1"
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, check=False)


def stages_of(script: Path) -> list[str]:
    """The stages a recipe declares, from its --help."""
    result = recipe(script, "--help")
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stderr.splitlines() if line.startswith("stages: "))
    return line.removeprefix("stages: ").split()


def commands(script: Path, *args: str, env: dict | None = None) -> list[list[str]]:
    result = recipe(script, *args, env=env)
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines() if line.strip()]


def test_the_table_recipes_exist():
    names = {p.name for p in SCRIPTS}
    assert {"ready_model.sh", "tisv_speechocean762.sh", "tdsv_dspspeech20.sh",
            "leave_one_corpus_out.sh"} <= names
    assert names <= set(VARIANTS), "a new recipe needs its switches listed in VARIANTS"


@pytest.mark.parametrize("script", [*SCRIPTS, RECIPES / "common.sh"], ids=lambda p: p.name)
def test_bash_accepts_the_script(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_stage_prints_commands_the_cli_accepts(script):
    stages = stages_of(script)
    assert {"preprocess", "train", "evaluate"} <= set(stages)
    for env in VARIANTS[script.name]:
        for stage in stages:
            printed = commands(script, stage, env=env)
            assert printed, f"{script.name} {stage} {env}: no command"
            for argv in printed:
                # stdout carries commands alone in a dry run: anything else is a recipe bug.
                assert argv[0] == "python" and argv[1] in ENTRY_POINTS, argv
                try:
                    configuration.parse_config(argv[2:])
                except SystemExit:
                    pytest.fail(f"{script.name} {stage} {env}: the CLI refuses "
                                f"{shlex.join(argv)}")
                # Default settings name only paths relative to the repository.
                assert not any(word.startswith("/") for word in argv), argv
        # No stage named runs every stage, in the declared order.
        everything = commands(script, env=env)
        assert everything == [argv for stage in stages for argv in commands(script, stage, env=env)]


def test_training_resumes_only_a_model_with_checkpoints(tmp_path):
    script = RECIPES / "tisv_speechocean762.sh"
    (train,) = commands(script, "train", env={"RUN": str(tmp_path)})
    assert "--restore" not in train
    # What TensorFlow's CheckpointManager leaves after the first save of an interrupted run.
    (tmp_path / "model" / "checkpoints").mkdir(parents=True)
    (tmp_path / "model" / "checkpoints" / "checkpoint").write_text('model_checkpoint_path: "ckpt-500"\n')
    (train,) = commands(script, "train", env={"RUN": str(tmp_path)})
    assert train[train.index("--restore") + 1] == "True"
    assert configuration.parse_config(train[2:]).restore


def test_settings_reach_the_commands(tmp_path):
    script = RECIPES / "tdsv_dspspeech20.sh"
    env = {"RUN": str(tmp_path / "run"), "DATA": str(tmp_path / "corpora"), "FOLDS": "3",
           "ITERATIONS": "7", "PYTHON": "python"}
    trains = commands(script, "train", env=env | {"SYSTEM": "X"})
    configs = [configuration.parse_config(argv[2:]) for argv in trains]
    assert [Path(c.model_path).relative_to(tmp_path / "run").parts[0] for c in configs] == \
        ["W", "W_seed1", "B140", "C2L140"]
    assert {c.iteration for c in configs} == {7}
    assert all("fold3" in c.train_path for c in configs)
    (evaluate,) = commands(script, "evaluate", env=env | {"SYSTEM": "X"})
    assert len(configuration.parse_config(evaluate[2:]).ensemble.split(",")) == 3
    preprocessed = [configuration.parse_config(argv[2:])
                    for argv in commands(script, "preprocess", env=env)]
    assert all(Path(c.audio_path).parent == tmp_path / "corpora" for c in preprocessed)
    assert {c.fold for c in preprocessed if c.folds} == {3}
    (finetune,) = commands(script, "train", env=env | {"SYSTEM": "finetuned"})
    assert configuration.parse_config(finetune[2:]).init_from == "pretrained"


def test_a_recipe_runs_from_any_folder(tmp_path):
    script = RECIPES / "ready_model.sh"
    assert recipe(script, "evaluate", cwd=tmp_path).stdout == recipe(script, "evaluate").stdout


def test_validation_probes_differ_only_in_what_they_probe():
    script = RECIPES / "seven_corpus_validation.sh"
    trains = {argv[argv.index("--model_path") + 1].split("/")[-2]: argv
              for argv in commands(script, "train")}
    assert set(trains) == {f"{p}_s{s}" for p in ("tile", "short", "short_mean", "no_librispeech",
                                                  "no_keywords") for s in (0, 1)}
    configs = {name: configuration.parse_config(argv[2:]) for name, argv in trains.items()}
    tile, short, mean = configs["tile_s0"], configs["short_s0"], configs["short_mean_s0"]
    assert (tile.short_crops, short.short_crops, mean.short_crops) == (False, True, True)
    assert (tile.mean_norm, short.mean_norm, mean.mean_norm) == (False, False, True)
    assert configs["tile_s1"].seed == 1 and tile.seed == 0
    assert len(tile.train_path.split(",")) == 4 and tile.source_weights == [1.0] * 4
    assert "librispeech" not in configs["no_librispeech_s0"].train_path
    assert "speechcommands" not in configs["no_keywords_s0"].train_path
    assert configs["no_keywords_s0"].source_weights == [1.0] * 3
    assert not configs["no_keywords_s0"].short_crops and not configs["no_librispeech_s0"].mean_norm
    same = ("N", "M", "lr", "iteration", "test_path", "optim")
    assert all(getattr(c, k) == getattr(tile, k) for c in configs.values() for k in same)


@pytest.mark.parametrize("args, env", [(["fit"], {}), ([], {"SYSTEM": "Y"})])
def test_a_wrong_stage_or_switch_is_refused(args, env):
    result = recipe(RECIPES / "tdsv_dspspeech20.sh", *args, env=env)
    assert result.returncode == 2
    assert result.stdout == ""
