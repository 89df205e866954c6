"""dpo/evaluation/model_card.py: the card names the Hub id the base came from (never a local path, which
the Hub cannot link) and the base's own license (SmolLM2-135M-Instruct's is Apache-2.0, not "other")."""

import json

import pytest
import yaml

import dpo.evaluation.model_card as cards
from dpo.evaluation.model_card import model_card
from dpo.offline.pip_models import MARKER, MODELS, _marker


def front_matter(card: str) -> dict:
    return yaml.safe_load(card.split("---")[1])


def run_folder(tmp_path, base) -> str:
    out = tmp_path / "run"
    out.mkdir()
    resolved = {"model_name_or_path": str(base), "dataset_name": "pairs.jsonl", "beta": 0.1, "loss_type": ["sigmoid"]}
    (out / "resolved_config.yaml").write_text(yaml.safe_dump(resolved))
    return out


def model_folder(tmp_path, name="models/smollm2-135m-instruct", marker=None, config=None, readme=None):
    folder = tmp_path / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], **(config or {})}))
    if marker is not None:
        (folder / MARKER).write_text(json.dumps(marker))
    if readme is not None:
        (folder / "README.md").write_text(readme)
    return folder


SMOLLM2 = MODELS["smollm2-135m-instruct"]


def test_a_folder_made_by_dpo_models_is_carded_as_its_hub_model_and_license(tmp_path):
    base = model_folder(tmp_path, marker=_marker(SMOLLM2))
    card = model_card(run_folder(tmp_path, base))
    front = front_matter(card)
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" == SMOLLM2.hub_id
    assert front["license"] == "apache-2.0"
    assert "A LoRA adapter for `HuggingFaceTB/SmolLM2-135M-Instruct`" in card
    assert cards.BUILD_RECORD == MARKER  # the card reads the file dpo.offline.pip_models writes
    # the weights are the GGUF's dequantized Q4_1 ones, not the Hub's bf16 ones the front matter names
    assert f"dequantized from the GGUF file `{SMOLLM2.filename}` (pip package `{SMOLLM2.requirement}`" in card
    assert "Q4_1" in SMOLLM2.filename


def test_a_folder_not_built_from_a_gguf_says_nothing_of_one(tmp_path):
    card = model_card(run_folder(tmp_path, model_folder(tmp_path, readme="---\nlicense: mit\n---\n")))
    assert "GGUF" not in card and "dequantized" not in card


def test_a_folder_built_before_the_record_gets_it_from_the_next_materialize_without_a_rebuild(tmp_path, monkeypatch):
    import dpo.offline.pip_models as pip_models

    monkeypatch.setattr(pip_models, "_build", lambda source, folder: pytest.fail("rebuilt a complete folder"))
    old = {k: _marker(SMOLLM2)[k] for k in pip_models.BUILD_KEYS}
    base = model_folder(tmp_path, marker=old)
    assert "base_model" not in front_matter(model_card(run_folder(tmp_path, base)))  # nothing recorded yet
    assert pip_models.materialize("smollm2-135m-instruct", base) == base
    files = {"README.md": (base / "README.md").stat().st_size} if (base / "README.md").exists() else {}
    files["config.json"] = (base / "config.json").stat().st_size
    assert json.loads((base / MARKER).read_text()) == {**_marker(SMOLLM2), "files": dict(sorted(files.items()))}
    front = front_matter(model_card(tmp_path / "run"))
    assert front["base_model"] == SMOLLM2.hub_id and front["license"] == "apache-2.0"


def test_a_local_folder_takes_its_card_license_and_a_hub_name_or_path(tmp_path):
    readme = "---\nlicense: mit\nlanguage: en\n---\n# my model\n"
    base = model_folder(tmp_path, "mine", config={"_name_or_path": "someone/their-model"}, readme=readme)
    front = front_matter(model_card(run_folder(tmp_path, base)))
    assert front["base_model"] == "someone/their-model" and front["license"] == "mit"


def test_a_local_folder_without_a_hub_id_says_local_model_and_reads_the_config_license(tmp_path):
    base = model_folder(tmp_path, "mine", config={"_name_or_path": str(tmp_path / "mine"), "license": "llama3"})
    card = model_card(run_folder(tmp_path, base))
    front = front_matter(card)
    assert "base_model" not in front and front["license"] == "llama3"
    assert f"A LoRA adapter for a local model (`{base}`)" in card


def test_nothing_known_is_license_other_and_a_hub_id_is_kept(tmp_path):
    base = model_folder(tmp_path, "bare")
    assert front_matter(model_card(run_folder(tmp_path, base)))["license"] == "other"
    assert cards.base_hub_id("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert cards.base_hub_id(str(base)) is None and cards.base_hub_id("../up/and-out") is None


# ── eval/ belongs to one run (provenance: dpo/evaluation/report.py evaluation_of_run) ─────────────────────────────
EVALUATED = {
    "heldout_pairs": 4,
    "beta": 0.1,
    "reward_accuracy": 0.75,
    "reward_accuracy_ci95": [0.3, 0.95],
    "reward_margin": 0.5,
    "reward_margin_ci95": [0.1, 0.9],
    "kl": 0.2,
    "kl_ci95": [0.1, 0.3],
    "generation_prompts": 1,
    "max_new_tokens": 8,
    **{f"{m}_length_{k}": 3 for m in ("greedy", "sampled") for k in ("policy", "reference", "ratio")},
}


def finished(out, step: int) -> None:
    """A run_complete.json as dpo/train/safety/runs.py writes it; `step` makes each run's differ."""
    (out / "run_complete.json").write_text(json.dumps({"global_step": step, "files": [], "run": {}, "sha256": {}}))


def test_an_evaluation_of_an_earlier_run_in_the_folder_is_left_out_of_the_card_and_the_upload(tmp_path, capsys):
    """Train, evaluate, train again into the same folder: eval/ still holds the first adapter's numbers, so the
    card and the Hub upload leave it out (with a warning naming why) until it is rerun; before the retrain both
    take it. eval/ written before runs were recorded in it is left out too."""
    from dpo.evaluation.export import evaluation_left_out, upload_patterns
    from dpo.evaluation.report import evaluation_of_run, run_identity, write_eval_folder

    out = run_folder(tmp_path, model_folder(tmp_path))
    finished(out, 10)
    write_eval_folder(out, EVALUATED, [], run_identity(out))
    assert evaluation_of_run(out) == (out / "eval" / "metrics.json", None)
    assert "## Evaluation" in model_card(out) and "75.0%" in model_card(out)
    assert "eval/*" in upload_patterns(out)
    capsys.readouterr()

    finished(out, 20)  # trained again: a new run_complete.json
    path, why = evaluation_of_run(out)
    assert path is None and "earlier run in this folder" in why and "rerun python -m dpo.evaluate" in why
    card = model_card(out)
    assert "## Evaluation" not in card and "75.0%" not in card
    patterns = upload_patterns(out)
    assert "eval/*" not in patterns and "adapter_model.safetensors" in patterns
    # said once, by export (was: the card and the upload each said it, twice in one `--push_to_hub`)
    assert capsys.readouterr().out == ""
    line = evaluation_left_out(out, upload=True)
    assert "the model card leaves out the evaluation and eval/ is not uploaded" in line and why in line, line
    assert "is not uploaded" not in evaluation_left_out(out, upload=False)

    write_eval_folder(out, EVALUATED, [], run_identity(out))  # evaluated again: taken again
    assert evaluation_of_run(out)[0] is not None and "## Evaluation" in model_card(out)
    assert evaluation_left_out(out, upload=True) is None
    write_eval_folder(out, EVALUATED, [], None)  # no run recorded (as written before this record)
    assert "records no run it evaluated" in evaluation_of_run(out)[1]
    (out / "eval" / "metrics.json").write_text("{}")  # a file changed after it was written
    assert "rerun python -m dpo.evaluate" in evaluation_of_run(out)[1]
