"""Ship a run: merge its adapter into a full-precision base, convert it to GGUF, and/or upload it with a model card.

    python -m dpo.export outputs/dpo_phi2 --merged outputs/dpo_phi2_merged
    python -m dpo.export outputs/dpo_phi2 --push_to_hub you/phi2-truthy-dpo            # the adapter
    python -m dpo.export outputs/dpo_phi2 --merged outputs/merged --push_to_hub you/phi2-truthy-dpo-merged
    python -m dpo.export outputs/dpo_smollm2 --gguf smollm2-dpo.gguf                     # llama.cpp, Ollama
    python -m dpo.export outputs/dpo_smollm2 --gguf smollm2-dpo-q8.gguf --gguf_type q8_0

--merged: the base is loaded in 16/32-bit (`--dtype`, default: the run's dtype), never in the
4-bit form training used (merging into quantized weights would round the update away), the
adapter is merged, and the result saved as safetensors that plain AutoModelForCausalLM loads.
The merged model is then reloaded from disk and its logits compared with base + adapter on the
run's held-out prompts; the folder appears only if they agree within TOLERANCE.

--gguf: the merged model (--merged DIR, else a float32 merge in a temporary folder) converted by
llama.cpp's own converter (f16 or q8_0), read back by transformers and checked (weights within the
format's rounding, logits, tokenizer ids, chat template: dpo/evaluation/gguf.py), then written with an
Ollama Modelfile beside it (out.Modelfile). The file must be new; an architecture the converter does not
know, or that transformers cannot read back (phi-2's "phi2"), is refused before anything loads.

--push_to_hub: uploads the merged folder (or the adapter, tokenizer, configs, metrics and
evaluation) with a generated model card (dpo/evaluation/model_card.py), through huggingface_hub with the
token in HF_TOKEN. The card is tested offline; the upload itself is not exercised by CI.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from dpo.errors import UserError, exit_on_user_error, release_held_warnings
from dpo.files import file_in_the_way, json_text, write_text_atomic
from dpo.folders import write_marked_folder
from dpo.gate.check import parse_and_check_flags
from dpo.gate.flags import command_parser
from dpo.log import log

# Largest |logit difference| allowed between the reloaded merged model and base + adapter, relative
# to the largest |logit| (at least 1). fp32: summation order alone, ~1e-6; 1e-4 leaves room for a
# deep model. bf16 keeps 8 bits of mantissa (3e-3 relative per rounding): merging W + BA into
# one bf16 tensor rounds differently from computing them apart, so the bound is 5e-2.
TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
ADAPTER_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "tokenizer*",
    "special_tokens_map.json",
    "chat_template*",
    "README.md",
    "resolved_config.yaml",
    "final_metrics.json",
    "eval/*",
)


COMMAND = "python -m dpo.export"


def check_inputs(output_dir: Path, merged: str | None, push_to_hub: str | None, gguf: str | None = None):
    """Everything checkable before weights load; returns (the resolved config, the base's revision to load: a hub
    base at the commit the run was trained on, dpo/train/safety/identity.py)."""
    from dpo.evaluation.evaluate import DAMAGED, check_run_files, refuse_full_fine_tune
    from dpo.files import read_json_object, read_yaml_mapping
    from dpo.train.safety.runs import require_finished_run

    if not output_dir.is_dir():
        raise UserError(f"run folder not found: {output_dir}")
    require_finished_run(output_dir, COMMAND)
    refuse_full_fine_tune(output_dir, COMMAND)
    for name in ("adapter_config.json", "adapter_model.safetensors", "resolved_config.yaml"):
        if not (output_dir / name).is_file():
            raise UserError(f"{output_dir} has no {name}: not a finished run folder of these recipes")
    if not merged and not push_to_hub and not gguf:
        raise UserError("nothing to do: pass --merged DIR, --gguf FILE.gguf and/or --push_to_hub REPO")
    if merged and (blocker := file_in_the_way(merged)) is not None:  # merged itself, or a folder above it
        what = "is a file, not a folder" if blocker == Path(merged) else f"lies under {blocker}, a file"
        raise UserError(f"--merged {merged} {what}; pick a new folder (nothing is overwritten)")
    if merged and Path(merged).exists() and any(Path(merged).iterdir()):
        raise UserError(f"--merged {merged} exists and is not empty; pick a new folder (nothing is overwritten)")
    if push_to_hub and not os.environ.get("HF_TOKEN"):
        raise UserError("--push_to_hub needs a write token in the HF_TOKEN environment variable (never in a file)")
    resolved = read_yaml_mapping(output_dir / "resolved_config.yaml", DAMAGED)
    adapter = read_json_object(output_dir / "adapter_config.json", {"base_model_name_or_path": (str, None)}, DAMAGED)
    base, source = adapter["base_model_name_or_path"], "base_model_name_or_path in adapter_config.json"
    _, revision = check_run_files(output_dir, base, source, COMMAND, resolved.get("model_revision") or "main")
    return resolved, revision


def sample_texts(output_dir: Path, tokenizer, n: int = 4) -> list[str]:
    """A few held-out prompts with their chosen answers (or a fixed text) for the logits comparisons."""
    pairs_file = output_dir / "heldout_pairs.jsonl"
    texts = ["Instruct: What is the capital of France?\nOutput: The capital of France is Paris."]
    if pairs_file.is_file():
        from dpo.data.tools import TOOLS_COLUMN
        from dpo.evaluation.evaluate import read_heldout_pairs
        from dpo.evaluation.sampling import render_prompt

        rows = read_heldout_pairs(pairs_file)[:n]
        texts = [
            render_prompt(tokenizer, r["prompt"], r.get(TOOLS_COLUMN))
            + (r["chosen"] if isinstance(r["chosen"], str) else "")
            for r in rows
        ]
    return texts


def check_prompts(output_dir: Path, tokenizer, n: int = 4) -> dict:
    """A small batch of held-out prompts (or a fixed text) for the logits comparison."""
    texts = sample_texts(output_dir, tokenizer, n)
    tokenizer.padding_side = "right"
    return tokenizer(texts, return_tensors="pt", padding=True)


@torch.no_grad()
def merge(output_dir: Path, target: Path, dtype: str, trust_remote_code: bool = False, revision: str = "main") -> dict:
    """Merge the adapter into the base (at `revision`, from check_inputs) in `dtype`, save, reload, compare logits;
    returns the check. merge_check.json records what the merged folder is made of: the adapter's sha256 and the
    base's identity."""
    from transformers import AutoModelForCausalLM

    from dpo.files import file_sha256
    from dpo.train.adapters import adapter_weights, put_adapter
    from dpo.train.model_checks import check_weight_files, load_tokenizer
    from dpo.train.safety.identity import BASE_KEY
    from dpo.train.safety.runs import finished_run

    adapter_config = json.loads((output_dir / "adapter_config.json").read_text())
    base_name = adapter_config["base_model_name_or_path"]
    tokenizer = load_tokenizer(str(output_dir))
    adapter_file = adapter_weights(str(output_dir))  # whole, before the base loads
    if Path(base_name).is_dir():
        check_weight_files(Path(base_name))
    marker = finished_run(output_dir)  # verified by check_inputs, with the base's identity
    load = dict(dtype=getattr(torch, dtype), use_safetensors=True, trust_remote_code=trust_remote_code)
    release_held_warnings()  # weights load next (dpo/errors.py)
    base = AutoModelForCausalLM.from_pretrained(base_name, revision=revision, **load)
    model = put_adapter(base, str(output_dir))
    model.eval()
    batch = check_prompts(output_dir, tokenizer)
    mask = batch["attention_mask"].bool()
    expected = model(**batch).logits.float()[mask]
    merged = model.merge_and_unload()
    del model

    def write(folder: Path) -> None:
        merged.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        reloaded = AutoModelForCausalLM.from_pretrained(folder, **load).eval()
        got = reloaded(**batch).logits.float()[mask]
        scale = max(1.0, expected.abs().max().item())
        check.update(max_abs_diff=(got - expected).abs().max().item(), scale=scale, tolerance=TOLERANCE[dtype])
        if check["max_abs_diff"] > TOLERANCE[dtype] * scale:
            raise RuntimeError(
                f"merged model's logits differ from base + adapter by {check['max_abs_diff']:.3g} "
                f"(allowed {TOLERANCE[dtype]} x {scale:.3g}); nothing written"
            )
        # the merged weights' sha256, recorded beside them as run_complete.json records the adapter's
        check["sha256"] = {p.name: file_sha256(p) for p in sorted(folder.glob("*.safetensors"))}
        (folder / "merge_check.json").write_text(
            json_text(check, target / "merge_check.json", observations=True, indent=2) + "\n"
        )
        (folder / "README.md").write_text(model_card(output_dir, merged=True))

    from dpo.evaluation.model_card import model_card

    check = {
        "dtype": dtype,
        "base_model": base_name,
        BASE_KEY: marker["run"].get(BASE_KEY),
        "adapter": str(output_dir),
        "adapter_sha256": file_sha256(adapter_file),
        "tokens_compared": int(mask.sum()),
    }
    write_marked_folder(target, write, "merged model", made_by="python -m dpo.export --merged")
    return check


def upload_patterns(folder: Path) -> list[str]:
    """ADAPTER_FILES, less eval/ when it is not the evaluation of the run in `folder` (evaluation_of_run: trained
    again since, or changed): the Hub repo never holds another adapter's numbers (said by evaluation_left_out)."""
    from dpo.evaluation.report import evaluation_of_run

    _, stale = evaluation_of_run(folder)
    return [p for p in ADAPTER_FILES if not (stale and p.startswith("eval/"))]


def evaluation_left_out(folder: Path, upload: bool) -> str | None:
    """The one warning an export gives when eval/ is not the evaluation of the run in `folder`: the model card
    leaves it out (model_card), and so does an adapter upload (upload_patterns). None when eval/ is taken or absent."""
    from dpo.evaluation.report import evaluation_of_run

    _, stale = evaluation_of_run(folder)
    if not stale:
        return None
    return (
        f"warning: the model card leaves out the evaluation{' and eval/ is not uploaded' if upload else ''}: {stale}"
    )


def push(folder: Path, repo: str, adapter: bool) -> str:
    """Upload `folder` to the Hub repo `repo` (created if missing) with the token in HF_TOKEN."""
    from huggingface_hub import HfApi

    patterns = upload_patterns(folder) if adapter else None
    api = HfApi(token=os.environ["HF_TOKEN"])
    api.create_repo(repo, exist_ok=True, repo_type="model")
    info = api.upload_folder(
        repo_id=repo,
        folder_path=str(folder),
        allow_patterns=patterns,
        commit_message="Upload from dpo-recipes (python -m dpo.export)",
    )
    return str(getattr(info, "commit_url", repo))


def check_gguf(output_dir: Path, gguf: str, gguf_type: str) -> tuple[Path, Path]:
    """--gguf's checks before any weights load (dpo/evaluation/gguf.py): the paths, the architecture, the tokenizer."""
    from transformers import AutoConfig

    from dpo.evaluation.gguf import gguf_architecture, gguf_paths, refuse_remote_code
    from dpo.train.model_checks import load_tokenizer

    paths = gguf_paths(gguf)
    refuse_remote_code(output_dir)
    base = json.loads((output_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    config = AutoConfig.from_pretrained(base, trust_remote_code=False)
    if getattr(config, "auto_map", None):
        raise UserError(f"--gguf: the base {base} carries remote code (auto_map); this project never runs it")
    architectures = config.architectures or ["(none)"]
    sentencepiece = (output_dir / "tokenizer.model").is_file()
    gguf_architecture(architectures[0], load_tokenizer(str(output_dir)), sentencepiece)
    return paths


def to_gguf(output_dir: Path, merged: Path, paths: tuple[Path, Path], gguf_type: str) -> dict:
    from dpo.evaluation.gguf import describe, write_gguf
    from dpo.train.model_checks import load_tokenizer

    texts = sample_texts(output_dir, load_tokenizer(str(output_dir)))
    check = write_gguf(merged, *paths, gguf_type, texts)
    log(f"GGUF ({gguf_type}) written to {paths[0]}, read back and checked: {describe(check)}")
    log(f"Ollama: ollama create my-model -f {paths[1]}")
    return check


def export(output_dir, merged=None, push_to_hub=None, dtype=None, gguf=None, gguf_type="f16") -> dict:
    from dpo.evaluation.model_card import model_card

    output_dir = Path(output_dir)
    resolved, revision = check_inputs(output_dir, merged, push_to_hub, gguf)
    gguf_paths = check_gguf(output_dir, gguf, gguf_type) if gguf else None
    if left_out := evaluation_left_out(output_dir, upload=bool(push_to_hub) and not merged):
        log(left_out)  # once, for the card and the upload alike
    # a merge made only for the converter is float32: the converter then rounds once, to the GGUF type
    dtype = dtype or ("bfloat16" if resolved.get("dtype") == "bfloat16" and merged else "float32")
    if dtype not in TOLERANCE:
        raise UserError(f"--dtype {dtype}: one of {sorted(TOLERANCE)} (a 4-bit base cannot take a merge)")
    result = {}
    if gguf and not merged:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="dpo-export-") as tmp:
            merge(output_dir, Path(tmp) / "merged", dtype, bool(resolved.get("trust_remote_code", False)), revision)
            result["gguf_check"] = to_gguf(output_dir, Path(tmp) / "merged", gguf_paths, gguf_type)
    if merged:
        check = merge(output_dir, Path(merged), dtype, bool(resolved.get("trust_remote_code", False)), revision)
        log(
            f"merged into a {dtype} base: {merged}; logits match base + adapter within "
            f"{check['max_abs_diff']:.2g} (tolerance {check['tolerance']} x {check['scale']:.3g})"
        )
        result["merge_check"] = check
        if gguf:
            result["gguf_check"] = to_gguf(output_dir, Path(merged), gguf_paths, gguf_type)
    if not merged:
        write_text_atomic(output_dir / "README.md", model_card(output_dir))  # the adapter's card, uploaded with it
    if push_to_hub:
        url = push(Path(merged) if merged else output_dir, push_to_hub, adapter=not merged)
        log(f"uploaded to https://huggingface.co/{push_to_hub} ({url})")
        result["pushed"] = push_to_hub
    return result


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    parser = command_parser("python -m dpo.export", __doc__)
    parser.add_argument("output_dir", help="a run folder written by a recipe")
    parser.add_argument("--merged", metavar="DIR", help="write the merged model (safetensors) to this new folder")
    parser.add_argument("--push_to_hub", metavar="REPO", help="upload to this Hub repo (token: HF_TOKEN)")
    parser.add_argument("--dtype", choices=sorted(TOLERANCE), help="merge precision (default: the run's dtype)")
    parser.add_argument("--gguf", metavar="FILE.gguf", help="write a GGUF file (llama.cpp, Ollama) and its Modelfile")
    parser.add_argument("--gguf_type", default="f16", help="the GGUF's weights: f16 (default) or q8_0 (8-bit blocks)")
    args = parse_and_check_flags(parser, argv)  # the settings gate (dpo/gate/): --gguf_type
    return export(args.output_dir, args.merged, args.push_to_hub, args.dtype, args.gguf, args.gguf_type)


if __name__ == "__main__":
    main()
