"""A base model replaced in place is another model under the same name: every run records its base's content
identity (dpo/train/safety/identity.py) and a resume, evaluate and export refuse a base whose weights changed
since, in one line naming the artifact, both identities and the fix, before any weights load. A hub id is
identified by the commit its revision resolves to."""

import json
import shutil

import pytest
from helpers import load_recipe, one_line_error
from safetensors.torch import load_file, save_file

from dpo.errors import UserError
from dpo.files import file_sha256
from dpo.train.safety.identity import (
    BASE_KEY,
    CONFIG_PART,
    base_identity,
    check_adapter_base,
    check_base,
    check_same_base,
    hub_identity,
    predating_base,
    weights_identity,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FAST = ["--gradient_accumulation_steps", "1", "--per_device_train_batch_size", "4", "--max_length", "64"]


def replace_weights_in_place(model_dir):
    """The base retrained or re-downloaded in place: same file name and shapes, other values."""
    path = model_dir / "model.safetensors"
    weights = load_file(path)
    name = sorted(weights)[0]
    save_file({**weights, name: weights[name] + 0.01}, path, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def run_on_private_base(tiny_model_dir, truthy_file, tmp_path_factory):
    """A finished DPO run (checkpoint-2 kept) on a private copy of the tiny model, whose weights then change."""
    folder = tmp_path_factory.mktemp("base-identity")
    base, out = folder / "base", folder / "run"
    shutil.copytree(tiny_model_dir, base)
    argv = ["--model_name_or_path", str(base), "--dataset_name", str(truthy_file), "--output_dir", str(out), *FAST]
    argv += ["--max_steps", "2", "--save_steps", "2", "--test_size", "0.25", "--eval_strategy", "no"]
    load_recipe("dpo_phi2").main(argv)
    recorded = json.loads((out / "run_complete.json").read_text())["run"][BASE_KEY]
    assert recorded == base_identity(str(base)) and recorded.startswith("sha256:")
    from dpo.evaluation.export import main as export

    export([str(out), "--merged", str(folder / "merged")])  # on the base the run was trained on: works
    replace_weights_in_place(base)
    assert base_identity(str(base)) != recorded  # the same path, other weights
    return {"base": base, "out": out, "argv": argv, "recorded": recorded, "merged": folder / "merged"}


def test_resuming_on_a_base_replaced_in_place_is_refused(run_on_private_base, capsys, no_weights_load):
    """Was: the resume trained the old adapter on the new base (only the path and revision name were recorded).
    Refused even with --resume_with_different_settings: another base is never the same run."""
    run = run_on_private_base
    for extra in ([], ["--resume_with_different_settings", "true"]):
        argv = [*run["argv"], "--resume_from_checkpoint", "last", *extra]
        line = one_line_error(load_recipe("dpo_phi2").main, argv, capsys)
        assert "checkpoint-2 was derived from the base model" in line and str(run["base"]) in line, line
        assert run["recorded"].removeprefix("sha256:")[:12] in line and "Put the original model back" in line, line


def test_evaluate_and_export_refuse_a_base_replaced_in_place(run_on_private_base, tmp_path, capsys, no_weights_load):
    """Was: export --merged merged into the new base and reported "logits match" against it; evaluate scored
    the adapter on weights it was never trained on."""
    from dpo.evaluation.evaluate import main as evaluate
    from dpo.evaluation.export import main as export

    run = run_on_private_base
    for main, extra in ((evaluate, []), (export, ["--merged", tmp_path / "merged"])):
        line = one_line_error(main, [run["out"], *extra], capsys)
        assert f"{run['out'] / 'run_complete.json'} was derived from the base model {run['base']}" in line, line
        assert run["recorded"].removeprefix("sha256:")[:12] in line and "train again" in line, line
    assert not (tmp_path / "merged").exists()


def test_a_run_from_before_the_identity_was_recorded_is_used_with_a_warning(capsys):
    """Old run folders have no base identity: they cannot be checked, which is said, and they stay usable."""
    run = {"model_name_or_path": "x"}
    assert check_base("old/run_complete.json", run, "x", "main", "python -m dpo.evaluate", "fix") == "main"
    out = capsys.readouterr().out
    assert "old/run_complete.json records no identity of its base model x" in out, out


def fake_hub_cache(root, repo, commits, main):
    """A Hugging Face cache holding `commits` of `repo` (config.json each), refs/main at `main`."""
    folder = root / f"models--{repo.replace('/', '--')}"
    for commit in commits:
        (folder / "snapshots" / commit).mkdir(parents=True)
        (folder / "snapshots" / commit / "config.json").write_text("{}")
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(main)


def test_a_hub_base_is_identified_by_its_resolved_commit_and_loaded_at_the_recorded_one(tmp_path, monkeypatch, capsys):
    """Was: a hub id whose `main` moved between runs was not noticed. Offline, from the cache, as from_pretrained
    resolves it: the identity is the commit; evaluate and export load the commit the run was trained on."""
    from huggingface_hub import constants

    old, new = "a" * 40, "b" * 40
    fake_hub_cache(tmp_path, "org/model", [old, new], old)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_identity("org/model", "main") == f"commit:{old}"
    run = {BASE_KEY: base_identity("org/model", "main")}
    (tmp_path / "models--org--model" / "refs" / "main").write_text(new)  # `main` moved
    assert base_identity("org/model", "main") == f"commit:{new}"
    assert check_base("run/run_complete.json", run, "org/model", "main", "python -m dpo.export", "fix") == old
    assert f"loads the commit the run was trained on, {old[:12]}" in capsys.readouterr().out


def test_an_adapter_trained_on_a_base_that_changed_since_is_refused_as_a_starting_point(
    run_on_private_base, truthy_file, tmp_path, capsys, no_weights_load
):
    """DPO from an SFT adapter (here a finished run folder of these recipes) puts it on the base named now: one
    whose weights changed since the adapter was trained is refused, naming the adapter's record."""
    run = run_on_private_base
    argv = ["--model_name_or_path", str(run["base"]), "--sft_adapter_path", str(run["out"])]
    argv += ["--dataset_name", str(truthy_file), "--output_dir", str(tmp_path / "dpo"), *FAST, "--max_steps", "1"]
    line = one_line_error(load_recipe("dpo_phi2").main, argv, capsys)
    assert f"{run['out'] / 'run_complete.json'} was derived from the base model {run['base']}" in line, line
    assert "train the adapter again on this base" in line, line


def test_a_merged_model_records_its_adapters_sha256_and_its_base(run_on_private_base):
    run = run_on_private_base
    check = json.loads((run["merged"] / "merge_check.json").read_text())
    assert check["adapter_sha256"] == file_sha256(run["out"] / "adapter_model.safetensors")
    assert check[BASE_KEY] == run["recorded"]


def edit_config_in_place(model_dir):
    """The same weights under another config: a rope or vocabulary setting edited by hand."""
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "rope_theta": 2 * config.get("rope_theta", 10000.0)}))


def test_a_base_whose_config_changed_in_place_is_refused(tiny_model_dir, tmp_path, capsys):
    """Was: only *.safetensors were hashed, so a config.json edited under the same weights (another rope_theta:
    another model) passed every check. Evaluate/export, a resume and a DPO start from the run all refuse it,
    naming config.json."""
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    run = {BASE_KEY: base_identity(str(base)), "model_name_or_path": str(base)}
    edit_config_in_place(base)
    now = base_identity(str(base))
    assert now != run[BASE_KEY] and now.partition(CONFIG_PART)[0] == run[BASE_KEY].partition(CONFIG_PART)[0]
    checks = [
        lambda: check_base("run/run_complete.json", run, str(base), "main", "python -m dpo.evaluate", "fix"),
        lambda: check_same_base("run/checkpoint-2", run, {**run, BASE_KEY: now}, str(base), "fix"),
    ]
    for check in checks:
        with pytest.raises(UserError) as error:
            check()
        assert "its config.json was changed since" in str(error.value), error.value
        assert "config.json sha256" in str(error.value), error.value
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "run_complete.json").write_text(json.dumps({"run": run}))
    with pytest.raises(UserError, match="its config.json was changed since"):
        check_adapter_base(str(adapter), str(base), "main")


def test_a_record_of_the_weights_alone_is_checked_on_them_and_said(tiny_model_dir, tmp_path, capsys):
    """A record written before config.json was part of the identity ("sha256:<hex>" alone) stays usable when
    the weights are the same, with a warning that the config cannot be checked; other weights are refused."""
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    old = {BASE_KEY: weights_identity(base), "seed": 1}
    new = {BASE_KEY: base_identity(str(base)), "seed": 1}
    assert CONFIG_PART not in old[BASE_KEY] and CONFIG_PART in new[BASE_KEY]
    assert check_base("old/run_complete.json", old, str(base), "main", "python -m dpo.evaluate", "fix") == "main"
    assert "records only the weights of its base model" in capsys.readouterr().out
    assert check_same_base("old/checkpoint-2", old, new, str(base), "fix") == new  # resumable: the same run
    assert predating_base(old, new) == new
    replace_weights_in_place(base)
    with pytest.raises(UserError, match="the folder's weights were replaced or changed since"):
        check_base("old/run_complete.json", old, str(base), "main", "python -m dpo.evaluate", "fix")
    assert predating_base(old, {**new, BASE_KEY: base_identity(str(base))}) == old  # a difference, still seen


def test_a_record_without_an_identity_is_refused_in_one_line_and_a_settings_diff_says_what_changed(
    tiny_model_dir, tmp_path
):
    """Was: a record of no identity (a rounds run begun without --model_name_or_path, or a hub id that could not be
    resolved then) met with one now crashed with AttributeError. And the settings listing of an output folder's
    other run showed two hashes without saying the config changed."""
    from dpo.train.safety.runs import differences

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    now = base_identity(str(base))
    for recorded in (None, "commit:" + "a" * 40):
        with pytest.raises(UserError, match="was derived from the base model"):
            check_same_base("out/rounds_settings.json", {BASE_KEY: recorded}, {BASE_KEY: now}, str(base), "fix")
    edit_config_in_place(base)
    (line,) = differences({BASE_KEY: now, "seed": 1}, {BASE_KEY: base_identity(str(base)), "seed": 1})
    assert line.startswith(f"{BASE_KEY}: {now} -> ") and line.endswith("(its config.json was changed since)"), line
