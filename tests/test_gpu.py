"""What only a CUDA GPU can show, on the tiny offline Phi model: `make gpu` runs these (pytest -m gpu with
DPO_GPU_TESTS=1, which keeps conftest.py from hiding the GPU). Everywhere else they are skipped: no CUDA.

Precision picked from the hardware, the model and adapters on the GPU, one QLoRA DPO step in each
precision (fp32 compute, fp16, bf16) with finite loss and gradients, fp16's gradient scaler really
failing on TRL's bf16 LoRA weights (the bug dpo/compat.py's fix is for), fp16 attention staying finite in
PyTorch's CUDA kernels, the reference cache equal to TRL's precompute on the GPU, and
`python -m dpo.evaluate` / `python -m dpo.export` on a run trained there.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT, load_recipe, overflowing_qkv, recipe_trainer

from dpo.compat import DPOConfig, fp16_loss_scale
from dpo.train.attention import eager_fp32_scores
from dpo.train.hardware import detect_precision
from dpo.train.speed.refcache import COLUMNS, TOLERANCE

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu sets DPO_GPU_TESTS=1)"),
]
ON_GPU = {"use_cpu": False}
PRECISIONS = {  # training settings, model dtype, the dtype the trainable LoRA weights must have
    "t4_fp32": (
        {"bf16": False, "fp16": False},
        "float32",
        torch.float32,
    ),  # fp32 compute (T4 default before the GPU run)
    "fp16": ({"bf16": False, "fp16": True}, "float16", torch.float32),
    "bf16": ({"bf16": True, "fp16": False}, "bfloat16", torch.bfloat16),
}


def gpu_trainer(tiny_model_dir, out, precision="bf16", **overrides):
    flags, dtype, _ = PRECISIONS[precision]
    return recipe_trainer(tiny_model_dir, out, dtype=dtype, **ON_GPU, **flags, **overrides)


def test_precision_is_picked_from_the_gpu(monkeypatch):
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    picked = detect_precision()
    assert picked.use_cpu is False and picked.fp16 is False
    assert (picked.bf16, picked.dtype) == ((True, "bfloat16") if native else (False, "float32"))
    assert native == (torch.cuda.get_device_capability(0) >= (8, 0))  # bf16 from sm80 (A100) on
    # a GPU without native bf16 (T4, V100) gets fp16 mixed precision, measured finite on an H200 at phi-2 size
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    t4 = detect_precision()
    assert (t4.bf16, t4.fp16, t4.dtype, t4.use_cpu) == (False, True, "float16", False)


def test_the_model_and_its_adapters_are_on_the_gpu(tiny_model_dir, tmp_path):
    import bitsandbytes as bnb

    trainer = gpu_trainer(tiny_model_dir, tmp_path / "run")
    params = dict(trainer.model.named_parameters())
    assert {p.device.type for p in params.values()} == {"cuda"}
    lora = [n for n, p in params.items() if p.requires_grad]
    assert lora and all("lora_" in n for n in lora)
    layers = [m for m in trainer.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.device.type == "cuda" and m.weight.quant_state is not None for m in layers)


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_one_qlora_dpo_step_per_precision_is_finite(precision, tiny_model_dir, tmp_path):
    trainer = gpu_trainer(tiny_model_dir, tmp_path / "run", precision, max_steps=2)
    want = PRECISIONS[precision][2]
    assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {want}
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"]) for h in logged), logged
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if n in before)
    if precision == "fp16":
        assert fp16_loss_scale(trainer) is not None  # the GradScaler ran, on fp32 gradients


def test_fp16_gradient_scaler_fails_on_trls_bf16_lora_weights(tiny_model_dir, tmp_path):
    """The bug the fp16 fix is for (TRL#4901): with TRL's bf16 cast left in place, the first fp16 step fails."""
    trainer = gpu_trainer(tiny_model_dir, tmp_path / "run", "fp16", max_steps=1)
    for param in trainer.model.parameters():
        if param.requires_grad:
            param.data = param.data.to(torch.bfloat16)  # what TRL 1.16's DPOTrainer.__init__ does
    with pytest.raises(RuntimeError, match="BFloat16"):
        trainer.train()


def test_fp16_attention_stays_finite_in_the_cuda_kernels():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, mask = (t.cuda() for t in overflowing_qkv())
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    bound = (want.abs().max() * 2**-10).item()  # one fp16 ulp of the output
    ran = 0
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
        with sdpa_kernel([backend]):
            try:
                got = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            except RuntimeError:  # this backend does not take these inputs on this GPU
                continue
        ran += 1
        assert torch.isfinite(got).all() and (got.float() - want).abs().max() <= bound, backend
    assert ran >= 2

    class Heads(torch.nn.Module):
        num_key_value_groups = 1

    ours, _ = eager_fp32_scores(Heads().eval(), q, k, v, mask.cuda().half(), scaling=80**-0.5)
    ours = ours.transpose(1, 2)  # eager returns (batch, seq, heads, dim), as transformers' attention layers take it
    assert torch.isfinite(ours).all() and (ours.float() - want).abs().max() <= bound


@pytest.mark.parametrize("precision", ["t4_fp32", "bf16"])
def test_reference_cache_equals_trls_precompute_on_the_gpu(precision, tiny_model_dir, tmp_path):
    # a whole epoch (6 steps of 2 of the 12 pairs): every pair filled before training (a shorter plan fills as it goes)
    ours = gpu_trainer(tiny_model_dir, tmp_path / "a", precision, cache_dir=tmp_path / "cache", max_steps=6)
    trl = gpu_trainer(tiny_model_dir, tmp_path / "trl", precision, config=DPOConfig, precompute_ref_log_probs=True)
    # the cache's own parity bar (dpo/train/speed/refcache.py TOLERANCE): what it accepts from a recomputation
    rtol, atol = TOLERANCE["fp32" if precision == "t4_fp32" else "half"]
    for column in COLUMNS:
        torch.testing.assert_close(
            torch.tensor(ours.train_dataset[column]), torch.tensor(trl.train_dataset[column]), rtol=rtol, atol=atol
        )


def test_evaluate_and_export_run_on_a_gpu_trained_run(tiny_model_dir, truthy_file, tmp_path):
    out = tmp_path / "run"
    argv = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(truthy_file), "--output_dir", str(out)]
    argv += ["--gradient_accumulation_steps", "1", "--max_steps", "2", "--test_size", "0.25", "--save_strategy", "no"]
    trainer = load_recipe("dpo_phi2").main(argv)
    assert trainer.args.device.type == "cuda"
    env = {
        **os.environ,
        "DPO_GPU_TESTS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }

    def cli(*args):
        proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]

    cli("-m", "dpo.evaluate", str(out), "--num_prompts", "2", "--max_new_tokens", "8")
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    trl = json.loads((out / "final_metrics.json").read_text())
    pairs = metrics["heldout_pairs"]
    assert pairs == 12
    # another batch composition may flip a pair whose margin is within rounding: at most one of `pairs`
    assert abs(metrics["reward_accuracy"] - trl["eval_rewards/accuracies"]) <= 1 / pairs + 1e-6
    cli("-m", "dpo.export", str(out), "--merged", str(tmp_path / "merged"))
    assert list((tmp_path / "merged").glob("*.safetensors"))
