"""dpo/train/speed/kernels.py: training, evaluation and generation use one 4-bit kernel on every CPU.

bitsandbytes decides per layer, through the attribute `support_avx512bf16_for_cpu` that
`Linear4bit.__init__` sets from `has_avx512bf16()`. The fixture `avx512bf16_cpu` makes that
function answer True, so any machine builds its 4-bit layers as a CPU with AVX512-BF16 would,
and the tests check what happens then with and without `use_portable_4bit_kernels`.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap
import warnings

import bitsandbytes as bnb
import pytest
import torch
from helpers import ROOT, load_qlora, load_recipe
from transformers import BitsAndBytesConfig

from dpo.train.speed.kernels import IMPORT_NOTE, SWITCH, use_portable_4bit_kernels

IDS = torch.arange(24).reshape(2, 12) % 200  # two sequences of 12 token ids


@pytest.fixture
def avx512bf16_cpu(monkeypatch):
    """4-bit layers built while this is active behave as on a CPU with AVX512-BF16."""
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)


def eval_logits(model):
    model.eval()
    with torch.no_grad():
        return model(IDS).logits


def is_packed(model) -> bool:
    return any(
        getattr(m.weight.quant_state, "packing_format_for_cpu", False)
        for m in model.modules()
        if isinstance(m, bnb.nn.Linear4bit)
    )


def test_installed_bitsandbytes_has_the_switch():
    layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32)
    assert hasattr(layer, SWITCH)


def test_the_simulated_cpu_repacks_weights_on_eval(tiny_model_dir, avx512bf16_cpu):
    """The hazard itself: without the fix, one no-grad eval forward repacks every weight."""
    model = load_qlora(tiny_model_dir)
    assert all(getattr(m, SWITCH) for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    eval_logits(model)
    assert is_packed(model)


def test_portable_kernels_make_eval_equal_the_training_forward(tiny_model_dir, avx512bf16_cpu):
    model = load_qlora(tiny_model_dir)
    n_layers = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert use_portable_4bit_kernels(model) == n_layers > 0
    model.train()
    with torch.no_grad():
        train_mode = model(IDS).logits
    assert torch.equal(eval_logits(model), train_mode)
    assert not is_packed(model)
    model.train()  # a training step after the evaluation works and reaches the adapters
    model(IDS).logits.logsumexp(-1).mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


# bf16 keeps 8 significant bits: rounding to nearest moves a value by at most 2^-8 of itself.
BF16_ROUNDING = 2**-8
# float32 arithmetic in dequantization (a few multiplies and adds) adds ~2^-24 relative each; 2^-20 is a margin.
FP32_ROUNDING = 2**-20


def block_absmax(state):
    """Each block's absmax as float32 (dequantizing bitsandbytes' double quantization if used)."""
    from bitsandbytes.functional import dequantize_blockwise

    if state.nested:
        return dequantize_blockwise(state.absmax, state.state2).float() + state.offset
    return state.absmax.float()


def absmax_requantization_error(state):
    """Largest error of double quantization's 8-bit blockwise step, per absmax: rounding to the nearest
    of `state2.code`'s levels (scaled by its block's absmax2) is off by at most half the widest gap."""
    if not state.nested:
        return torch.zeros_like(state.absmax, dtype=torch.float32)
    half_gap = state.state2.code.float().sort().values.diff().max() / 2
    per_block = state.state2.absmax.float().repeat_interleave(state.state2.blocksize)[: state.absmax.numel()]
    return half_gap * per_block


def absmax_rounding_excess(model, reference) -> float:
    """How far the dequantized 4-bit weights of `model` stray from `reference`'s beyond what the
    unpacking can explain, as the largest ratio |W' - W| / bound over all layers and blocks (<= 1: within it).

    bitsandbytes 0.50.2 keeps every 4-bit code through the repacking and its inverse; only each
    block's absmax changes: `_convert_weight_packed_for_cpu` dequantizes the double-quantized absmax
    and rounds it to bf16 (<= 2^-8 of itself), and `_convert_weight_packed_for_cpu_inverse` quantizes
    it again to 8 bits (<= half the widest gap of its code map x its block's absmax2). A weight is
    code x absmax with |code| <= 1, so |W' - W| <= 2^-8 x absmax + that requantization error.
    """
    from bitsandbytes.functional import dequantize_4bit

    pairs = [
        (a, b)
        for a, b in zip(model.modules(), reference.modules())
        if isinstance(a, bnb.nn.Linear4bit) and isinstance(b, bnb.nn.Linear4bit)
    ]
    assert pairs
    worst = 0.0
    for a, b in pairs:
        state = b.weight.quant_state
        w_new = dequantize_4bit(a.weight.data, a.weight.quant_state).float().reshape(-1, state.blocksize)
        w_ref = dequantize_4bit(b.weight.data, state).float().reshape(-1, state.blocksize)
        absmax = block_absmax(state).reshape(-1, 1)
        requantized = absmax_requantization_error(a.weight.quant_state).reshape(-1, 1)
        bound = (BF16_ROUNDING * absmax + requantized) * (1 + FP32_ROUNDING)
        worst = max(worst, ((w_new - w_ref).abs() / bound).max().item())
    return worst


def test_weights_packed_before_the_fix_are_unpacked(tiny_model_dir, avx512bf16_cpu, monkeypatch):
    """A layer already repacked by an earlier evaluation is put back, so training no longer
    crashes. bitsandbytes' inverse is best-effort: the repacking rounded each block's absmax to
    bf16 and the inverse quantizes it again, so the weights come back within that rounding (derived in
    `absmax_rounding_excess`), not bit-exact. That is why build_dpo_trainer switches the kernel before anything runs.
    The bound is on the weights, where it is exact: through a whole network it has no closed form."""
    model = load_qlora(tiny_model_dir)
    eval_logits(model)  # packs
    assert is_packed(model)
    with pytest.warns(UserWarning, match="repacked"):
        use_portable_4bit_kernels(model)
    assert not is_packed(model)
    monkeypatch.undo()  # an ordinary load of the same folder, never packed
    reference = load_qlora(tiny_model_dir)
    assert absmax_rounding_excess(model, reference) <= 1
    # the bound can fail: one 4-bit code changed in one layer (the smallest real corruption) exceeds it
    layer = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    original = layer.weight.data.clone()
    layer.weight.data.view(-1)[0] ^= 0x10  # flip the lowest bit of the first weight's code
    assert absmax_rounding_excess(model, reference) > 1
    layer.weight.data.copy_(original)
    model.train()  # and the unpacked model trains
    model(IDS).logits.logsumexp(-1).mean().backward()


def run_phi2(model_dir, data, out, *extra):
    """The phi-2 recipe with an evaluation before the first save and before training
    (what crashed on AVX512-BF16 CPUs), plus `extra` flags; returns the logged history."""
    trainer = load_recipe("dpo_phi2").main(
        [
            "--model_name_or_path",
            str(model_dir),
            "--dataset_name",
            str(data),
            "--output_dir",
            str(out),
            "--max_steps",
            "4",
            "--gradient_accumulation_steps",
            "1",
            "--per_device_train_batch_size",
            "4",
            "--learning_rate",
            "1e-2",
            "--eval_on_start",
            "true",
            "--eval_steps",
            "2",
            "--save_steps",
            "4",
            "--test_size",
            "0.25",
            *extra,
        ]
    )
    assert not is_packed(trainer.model)
    return [
        {k: v for k, v in entry.items() if k != "eval_runtime" and "per_second" not in k}
        for entry in trainer.state.log_history
    ]


@pytest.mark.slow
def test_recipe_on_a_simulated_avx512bf16_cpu_matches_any_cpu(tiny_model_dir, truthy_file, tmp_path, monkeypatch):
    """Same seeded run, 4-bit layers built as on an AVX512-BF16 CPU and as on any other:
    it trains through the evaluations, and every logged number is identical."""
    plain = run_phi2(tiny_model_dir, truthy_file, tmp_path / "plain")
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)
    simulated = run_phi2(tiny_model_dir, truthy_file, tmp_path / "avx512bf16")
    assert any("eval_loss" in entry for entry in plain) and any("loss" in entry for entry in plain)
    timing = ("train_runtime", "train_samples_per_second", "train_steps_per_second")
    strip = lambda h: [{k: v for k, v in e.items() if k not in timing} for e in h]  # noqa: E731
    assert strip(simulated) == strip(plain)


@pytest.mark.slow
def test_precomputed_reference_on_a_simulated_avx512bf16_cpu_matches_any_cpu(
    tiny_model_dir, truthy_file, tmp_path, monkeypatch
):
    """TRL's `precompute_ref_log_probs` scores the reference inside DPOTrainer.__init__, before
    build_dpo_trainer sees the model: the 4-bit layers must already be built portable there."""
    plain = run_phi2(
        tiny_model_dir,
        truthy_file,
        tmp_path / "plain",
        "--precompute_ref_log_probs",
        "true",
        "--reference_cache",
        "false",
    )
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*repacked.*")  # nothing was packed, so nothing to unpack
        simulated = run_phi2(
            tiny_model_dir,
            truthy_file,
            tmp_path / "avx512bf16",
            "--precompute_ref_log_probs",
            "true",
            "--reference_cache",
            "false",
        )
    timing = ("train_runtime", "train_samples_per_second", "train_steps_per_second")
    strip = lambda h: [{k: v for k, v in e.items() if k not in timing} for e in h]  # noqa: E731
    assert any("eval_loss" in entry for entry in plain)
    assert strip(simulated) == strip(plain)


def test_portable_layers_context_restores_the_cpu_check(avx512bf16_cpu):
    from dpo.train.speed.kernels import portable_4bit_layers

    with portable_4bit_layers():
        inside = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32)
    outside = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32)
    assert getattr(inside, SWITCH) is False and getattr(outside, SWITCH) is True


def test_the_from_scratch_loop_trains_after_an_evaluation(tiny_model_dir, avx512bf16_cpu):
    """dpo.scratch.loop.train on a 4-bit PeftModel that was evaluated first (a sample before training, as
    the notebooks do): on an AVX512-BF16 CPU that repacked every weight and the first training
    step died in bitsandbytes' in-place bias add. The loop is plain PyTorch: the caller switches the
    kernel back first, as the notebooks do."""
    from dpo.scratch.loop import collate, train

    model = load_qlora(tiny_model_dir)
    eval_logits(model)  # packs on this (simulated) CPU
    assert is_packed(model)
    pairs = [{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9, 2], "rejected_ids": [10, 11, 12, 2]}] * 2
    with pytest.warns(UserWarning, match="repacked"):
        use_portable_4bit_kernels(model)
    history = train(model, [collate(pairs, 0)], num_steps=2, lr=1e-2, progress=False)
    assert not is_packed(model)
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert history[1]["loss"] != history[0]["loss"]  # the adapters moved


def test_evaluation_and_export_load_on_the_portable_kernel(tiny_model_dir, avx512bf16_cpu, tmp_path):
    """dpo.evaluation.evaluate and dpo.evaluation.export load base + adapter through dpo.train.adapters.load_with_adapter:
    on an AVX512-BF16 CPU, generating with it must neither repack the weights nor change the kernel."""
    from dpo.train.adapters import load_with_adapter

    adapter = tmp_path / "adapter"
    load_qlora(tiny_model_dir).save_pretrained(adapter)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = load_with_adapter(
        str(tiny_model_dir), {"quantization_config": quant, "dtype": torch.float32}, str(adapter), trainable=False
    )
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(getattr(m, SWITCH) for m in layers)
    model.eval()
    with torch.no_grad():
        model.generate(IDS[:1], max_new_tokens=4, do_sample=False)
    assert not is_packed(model)


def test_a_bitsandbytes_without_the_switch_is_refused():
    layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32)
    delattr(layer, SWITCH)  # as a bitsandbytes that renamed or dropped it would build the layer
    with pytest.raises(RuntimeError, match="dpo/train/speed/kernels.py"):
        use_portable_4bit_kernels(torch.nn.Sequential(layer))


IMPORT_PROBE = """
import importlib.abc, importlib.util, sys

class AnAvx512Bf16Cpu(importlib.abc.MetaPathFinder):
    # bitsandbytes/backends/cpu/ops.py asks bitsandbytes.functional.has_avx512bf16() once, at import:
    # answer True there, so the import takes the path it takes on such a CPU, whatever this CPU is.
    def find_spec(self, name, path=None, target=None):
        if name != "bitsandbytes.functional":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            module.has_avx512bf16 = lambda: True
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, AnAvx512Bf16Cpu())
FIRST
import bitsandbytes.backends.cpu.ops as ops
assert hasattr(ops, "gemm_4bit_forward_kernel"), "the AVX512-BF16 branch did not run"
print("imported", "looked up" if getattr(sys.modules.get("kernels"), "asked", False) else "no lookup")
"""

# What the `kernels` package that transformers 5.25 installs does there offline (kernels 0.19.1,
# _internals/hf_hub.py, then the cache miss), reworded: the quiet must not depend on the words.
FAKE_KERNELS = """
import logging

asked = False

def get_kernel(repo_id, version=None):
    global asked
    asked = True
    logging.getLogger("kernels._internals.hf_hub").warning("Trust of %s not checked (offline), reworded", repo_id)
    raise RuntimeError(f"{repo_id} is not in the local cache")
"""


@pytest.mark.slow
@pytest.mark.parametrize("first", ["", "import dpo", "from dpo.train.trainer import build_dpo_trainer"])
@pytest.mark.parametrize("kernels_installed", [False, True])
def test_bitsandbytes_kernel_lookup_is_quiet_before_any_entry_point_imports_it(first, kernels_installed, tmp_path):
    """bitsandbytes 0.50.2, at import on an AVX512-BF16 CPU, looks up an optional kernel through the
    `kernels` package and logs why it could not (plus, with `kernels` installed, that package's own
    lines): lines in front of every run and every one-line error. Fresh processes, with the CPU check
    answering True: plain bitsandbytes logs them (the probe reproduces the real import path); after any
    dpo import no line mentions kernels-community and `kernels` is never asked (no Hub lookup)."""
    paths = [str(ROOT), os.environ.get("PYTHONPATH")]
    real_kernels = importlib.util.find_spec("kernels") is not None  # transformers >= 5.25 installs it
    if kernels_installed and not real_kernels:
        (tmp_path / "kernels").mkdir()
        (tmp_path / "kernels" / "__init__.py").write_text(FAKE_KERNELS)
        paths.insert(0, str(tmp_path))
    elif not kernels_installed and real_kernels:
        pytest.skip("the installed `kernels` package cannot be hidden from this import path")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}  # HF_HUB_OFFLINE=1 (conftest.py)
    probe = textwrap.dedent(IMPORT_PROBE).replace("FIRST", first)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.startswith("imported"), done.stderr
    if first:
        assert "kernels-community" not in done.stderr, done.stderr
        assert done.stdout.strip() == "imported no lookup"
    else:
        assert IMPORT_NOTE in done.stderr, done.stderr
        # the kernels package's own line (the fake's, or the real "Skipping publisher trust check for ...")
        own = [line for line in done.stderr.splitlines() if "kernels-community/" in line and IMPORT_NOTE not in line]
        assert bool(own) == kernels_installed, done.stderr


def test_the_quiet_is_by_logger_and_only_while_bitsandbytes_cpu_ops_import(caplog):
    import logging

    from dpo.train.speed.kernels import CPU_OPS_MODULE, quiet_bitsandbytes_cpu_ops_import, quiet_kernel_lookup

    assert not quiet_bitsandbytes_cpu_ops_import()  # already imported here: too late, says so
    before = sys.modules.get("kernels", "absent")
    with caplog.at_level(logging.WARNING), quiet_kernel_lookup():
        logging.getLogger(CPU_OPS_MODULE).warning("any wording from bitsandbytes' CPU ops")
        logging.getLogger("kernels._internals.resolver").warning("any wording from the kernels package")
        logging.getLogger("bitsandbytes.nn.modules").warning("another bitsandbytes module")
        logging.getLogger("another_library").warning("someone else")
        with pytest.raises(ImportError):
            import kernels  # noqa: F401
    with caplog.at_level(logging.WARNING):
        logging.getLogger(CPU_OPS_MODULE).warning("later, from the same module")
    assert [r.getMessage() for r in caplog.records] == [
        "another bitsandbytes module",
        "someone else",
        "later, from the same module",
    ]
    assert sys.modules.get("kernels", "absent") is before
