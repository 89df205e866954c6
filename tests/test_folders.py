"""Folders recognised by what they hold (dpo/folders.py): a model folder written for reuse is whole or absent,
a tool replaces or deletes only a folder it marked, an empty path is refused in one line (never the current
folder), and one kind of run is never written into a folder holding another kind."""

import json
from pathlib import Path

import pytest
from helpers import ROOT, load_recipe, one_line_error

from dpo.errors import UserError
from dpo.folders import (
    MARKER,
    MODEL_KIND,
    marker_problem,
    output_kind_problem,
    remove_marked,
    write_marked_folder,
)
from dpo.gate.table import PATHS
from dpo.train.config import RecipeDPOConfig


def _write_two_files(folder: Path) -> None:
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\0" * 64)


def test_a_marked_folder_is_whole_or_absent_and_its_files_are_checked(tmp_path):
    target = tmp_path / "model"

    def killed(folder: Path) -> None:  # a kill (Ctrl-C) in the middle of the save
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"\0" * 8)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_marked_folder(target, killed, MODEL_KIND)
    assert not target.exists() and list(tmp_path.iterdir()) == []  # nothing half-written, no staging left
    write_marked_folder(target, _write_two_files, MODEL_KIND)
    assert marker_problem(target, MODEL_KIND) is None
    assert set(json.loads((target / MARKER).read_text())["sha256"]) == {"config.json", "model.safetensors"}
    with open(target / "model.safetensors", "r+b") as f:  # cut short, as a copy or a disk error would
        f.truncate(10)
    assert "model.safetensors" in marker_problem(target, MODEL_KIND)
    assert "holds no" in marker_problem(tmp_path, MODEL_KIND)
    write_marked_folder(target, _write_two_files, MODEL_KIND)  # a folder of its own kind is replaced
    assert marker_problem(target, MODEL_KIND) is None


def test_a_folder_not_marked_is_never_replaced_nor_removed(tmp_path):
    users = tmp_path / "mine"
    users.mkdir()
    (users / "notes.txt").write_text("keep")
    with pytest.raises(UserError) as err:
        write_marked_folder(users, _write_two_files, MODEL_KIND)
    assert "nothing was overwritten" in str(err.value) and (users / "notes.txt").read_text() == "keep"
    assert not remove_marked(tmp_path, users, MODEL_KIND) and users.is_dir()
    ours = write_marked_folder(tmp_path / "ours", _write_two_files, MODEL_KIND)
    assert not remove_marked(users, ours, MODEL_KIND) and ours.is_dir()  # not inside the root it was given
    assert not remove_marked(tmp_path, ours, "reference cache") and ours.is_dir()  # another kind's marker
    assert remove_marked(tmp_path, ours, MODEL_KIND) and not ours.exists()


# ── a half-written pi_ref (sft_reference) is never reused ──────────────────────────────────────────────────
def test_a_killed_pi_ref_save_leaves_nothing_a_rerun_would_reuse(tmp_path, monkeypatch):
    """Was: the save wrote straight into output_dir/sft_reference, and reuse checked only that the files exist."""
    import dpo.offline.sentiment as sentiment
    from dpo.rounds.sentiment import initial_model

    def killed(folder, *args):
        _write_two_files(folder)
        raise KeyboardInterrupt  # SIGINT during the save

    monkeypatch.setattr(sentiment, "_train_reference_into", killed)
    args = load_recipe("dpo_rounds").ScriptArguments()
    with pytest.raises(KeyboardInterrupt):
        initial_model(args, RecipeDPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False), tmp_path)
    assert not (tmp_path / "sft_reference").exists()


def test_the_demo_keeps_the_pi_ref_its_run_was_trained_on(tmp_path, monkeypatch, capsys):
    """Was: `make demo` into a finished folder with other SFT settings trained pi_ref again and swapped it in, and
    only then did the run check refuse the settings: the finished run had lost its base. Now other settings are
    refused before anything is trained, the same ones reuse pi_ref, and --overwrite_output_dir trains it again."""
    import dpo.offline.sentiment as sentiment

    trained = []
    monkeypatch.setattr(
        sentiment,
        "_train_reference_into",
        lambda folder, *a: trained.append(folder) or _write_two_files(folder) or [2.0, 1.0],
    )
    demo = load_recipe("dpo_sentiment_tiny").main
    argv = ["--output_dir", tmp_path, "--sft_steps", 5]
    # phase 1 trains (here: two stand-in files), then the stand-in is refused as a model: exit 2, nothing else ran
    assert "no tokenizer files" in one_line_error(demo, argv, capsys) and len(trained) == 1
    marker = (tmp_path / "sft_reference" / MARKER).read_bytes()

    line = one_line_error(demo, ["--output_dir", tmp_path, "--sft_steps", 6], capsys)
    assert "trained with other settings: sft_steps 5 there, 6 here" in line
    assert f"the run in {tmp_path} was trained on it" in line and "--overwrite_output_dir true" in line
    assert len(trained) == 1 and (tmp_path / "sft_reference" / MARKER).read_bytes() == marker  # untouched

    one_line_error(demo, argv, capsys)  # the same settings: reused, not trained again
    assert len(trained) == 1
    one_line_error(demo, [*argv[:2], "--sft_steps", 6, "--overwrite_output_dir", "true"], capsys)
    assert len(trained) == 2 and (tmp_path / "sft_reference" / MARKER).read_bytes() != marker


def test_a_pi_ref_of_other_settings_is_refused_not_reused(tmp_path, monkeypatch):
    """Was: a rerun of the rounds into the same folder with other SFT settings reused the pi_ref trained with the
    old ones (the marker proved the files whole, not what they were trained with)."""
    import dpo.offline.sentiment as sentiment
    from dpo.errors import UserError
    from dpo.rounds.sentiment import initial_model

    monkeypatch.setattr(sentiment, "_train_reference_into", lambda folder, *args: _write_two_files(folder) or [])
    args, config = (
        load_recipe("dpo_rounds").ScriptArguments(),
        RecipeDPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False),
    )
    trained = initial_model(args, config, tmp_path)
    assert initial_model(args, config, tmp_path) == trained  # the same settings: reused
    steps, args.sft_steps = args.sft_steps, args.sft_steps + 10
    with pytest.raises(UserError, match=f"trained with other settings: sft_steps {steps} there, {steps + 10} here"):
        initial_model(args, config, tmp_path)


def test_a_half_written_pi_ref_is_refused_in_one_line_before_weights_load(tmp_path, capsys, no_weights_load):
    """Was: a kill during the old save left config.json and a cut model.safetensors; the rerun read them:
    SafetensorError traceback."""
    folder = tmp_path / "run" / "sft_reference"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\x08\0\0\0\0\0\0\0{")  # a header cut short
    argv = ["--config", ROOT / "recipes" / "dpo_rounds_sentiment.yaml", "--output_dir", tmp_path / "run"]
    line = one_line_error(load_recipe("dpo_rounds").main, argv, capsys)
    assert f"{folder} is not a whole pi_ref" in line and f"delete {folder}" in line, line


# ── empty paths ────────────────────────────────────────────────────────────────────────────────────────────
def _recipe_path_settings() -> list[str]:
    import dataclasses

    from dpo.compat import ModelConfig

    fields = {
        f.name
        for c in (load_recipe("dpo_any").ScriptArguments, RecipeDPOConfig, ModelConfig)
        for f in dataclasses.fields(c)
    }
    return sorted(set(PATHS) & fields)


@pytest.mark.parametrize("name", _recipe_path_settings())
def test_an_empty_path_setting_is_refused_in_one_line_before_weights_load(
    name, tiny_model_dir, truthy_file, tmp_path, capsys, no_weights_load, monkeypatch
):
    """Was: --reference_cache_dir '' (and DPO_REFERENCE_CACHE='') made the current folder the cache."""
    monkeypatch.chdir(tmp_path)
    given = {"output_dir": tmp_path / "out", "model_name_or_path": tiny_model_dir, "dataset_name": truthy_file}
    argv = [f"--{k}={v}" for k, v in {**given, name: " "}.items()] + ["--reference_cache", "true"]
    line = one_line_error(load_recipe("dpo_any").main, argv, capsys)
    assert f"{name} is ' ', an empty path" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written where the command started


@pytest.mark.parametrize("variable", ["DPO_REFERENCE_CACHE", "DPO_MODELS_CACHE"])
def test_an_empty_folder_variable_is_refused_in_one_line_before_weights_load(
    variable, tiny_model_dir, truthy_file, tmp_path, capsys, no_weights_load, monkeypatch
):
    monkeypatch.setenv(variable, "")
    argv = ["--output_dir", tmp_path / "out", "--model_name_or_path", tiny_model_dir, "--dataset_name", truthy_file]
    line = one_line_error(load_recipe("dpo_any").main, [*argv, "--reference_cache", "true"], capsys)
    assert f"the environment variable {variable} is '', an empty path" in line, line


# ── runs mixed into one folder ─────────────────────────────────────────────────────────────────────────────
def _rounds_folder(root: Path) -> Path:
    """What recipes/dpo_rounds.py leaves: its records, and each round a finished run folder."""
    (root / "round-1").mkdir(parents=True)
    (root / "rounds_settings.json").write_text("{}")
    (root / "rounds.json").write_text("{}")
    (root / "round-1" / "run_complete.json").write_text("{}")
    return root


def test_a_dpo_run_into_a_rounds_folder_is_refused_before_weights_load(
    tiny_model_dir, truthy_file, tmp_path, capsys, no_weights_load
):
    """Was: dpo_any.py --output_dir <a finished rounds folder> wrote a DPO run beside the rounds."""
    rounds = _rounds_folder(tmp_path / "rounds")
    data = ["--model_name_or_path", tiny_model_dir, "--dataset_name", truthy_file]
    line = one_line_error(load_recipe("dpo_any").main, ["--output_dir", rounds, *data], capsys)
    assert f"--output_dir {rounds} holds an on-policy rounds run" in line, line
    line = one_line_error(load_recipe("dpo_any").main, ["--output_dir", rounds / "round-1" / "more", *data], capsys)
    assert f"lies inside {rounds / 'round-1'}, which holds a finished training run" in line, line
    assert sorted(p.name for p in rounds.iterdir()) == ["round-1", "rounds.json", "rounds_settings.json"]


def test_a_rounds_run_into_a_round_folder_is_refused_before_weights_load(tmp_path, capsys, no_weights_load):
    """Was: dpo_rounds.py --output_dir <rounds>/round-1 wrote a rounds run inside a finished round."""
    rounds = _rounds_folder(tmp_path / "rounds")
    argv = ["--config", ROOT / "recipes" / "dpo_rounds_sentiment.yaml", "--output_dir", rounds / "round-1"]
    line = one_line_error(load_recipe("dpo_rounds").main, argv, capsys)
    assert f"--output_dir {rounds / 'round-1'} holds a finished training run, not an on-policy rounds run" in line


def test_each_kind_takes_its_own_folder_and_a_new_one():
    for kind in ("run", "rounds"):
        assert output_kind_problem("/nonexistent/new-folder", kind) is None


@pytest.mark.parametrize(
    "module, argv",
    [
        ("dpo.evaluation.evaluate", [""]),
        ("dpo.evaluation.export", ["", "--merged", "x"]),
        ("dpo.evaluation.export", ["{run}", "--merged", " "]),
        ("dpo.offline.tiny", [" "]),
        ("dpo.offline.tiny", ["{run}/tiny", "--truthy_rows", ""]),
        ("dpo.offline.pip_models", ["smollm2-135m-instruct", ""]),
        ("dpo.train.speed.refcache_admin", ["--cache_dir", "", "remove", "--all"]),
        ("dpo.data.doctor", ["{run}", "--histogram", ""]),
    ],
)
def test_every_command_refuses_an_empty_path_in_one_line(module, argv, tmp_path, capsys, monkeypatch):
    """The same gate rule at every command: a blank path flag names itself, nothing is written where it started."""
    import importlib

    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    main = importlib.import_module(module).main
    line = one_line_error(main, [a.replace("{run}", str(tmp_path / "run")) for a in argv], capsys)
    assert "an empty path" in line, line
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_a_model_folder_these_tools_made_takes_no_run(tmp_path):
    built = tmp_path / "smollm2"
    built.mkdir()
    (built / "materialized.json").write_text("{}")  # python -m dpo.models
    tiny = write_marked_folder(tmp_path / "tiny", _write_two_files, MODEL_KIND)  # python -m dpo.tiny
    for folder in (built, tiny):
        assert "holds a model folder made by these tools" in output_kind_problem(folder, "run")
        assert "lies inside" in output_kind_problem(folder / "out", "rounds")
