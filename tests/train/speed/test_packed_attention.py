"""dpo/train/speed/packed_attention.py: `packing_attention: flex | varlen` give the padded path's results on the
tiny Phi model, within test_packing.py's bound (FLOOR_MULTIPLE x the padded step's own reordering floor), and a
packing_attention the device, torch or settings cannot serve is refused in one line before weights load.

On a CPU both kernels stand in for CUDA's: flex attention runs torch's eager (unfused) implementation, forward
only (torch has no flex backward on a CPU), so its steps are compared without gradients; on CUDA the same call
is torch.compile'd into fused kernels, checked there by install_packing's probe. varlen's kernel (torch's flash
varlen_attn) is CUDA only: here a causal SDPA per cumulative-length slice stands in for it, so these tests check
what this repository adds (lengths computed once per forward reaching every layer through TRL's and the model's
forwards, the [T, heads, d] layout, grouped-query heads). The tests marked gpu check torch's real kernels on a
CUDA GPU (DPO_GPU_TESTS=1 pytest -m gpu tests/train/speed/test_packed_attention.py; skipped elsewhere)."""

import math
from types import SimpleNamespace

import pytest
import torch
import transformers.masking_utils
from helpers import load_recipe, one_line_error, recipe_trainer
from test_packing import FLOOR_MULTIPLE, distances, floor, step

from dpo.errors import UserError
from dpo.gate.check import table_problems
from dpo.train.speed import packed_attention, packing
from dpo.train.speed.packing import check_packing


def no_grad_step(trainer, reverse=False):
    return step(trainer, reverse, backward=False)


def cpu_varlen(query, key, value, cumulative, longest, scale):
    """torch's varlen_attn (causal) on a CPU: SDPA over each [cumulative[i], cumulative[i+1]) slice of [T, heads, d]."""
    bounds = cumulative.tolist()
    assert max(b - a for a, b in zip(bounds[:-1], bounds[1:])) == longest
    pieces = [
        torch.nn.functional.scaled_dot_product_attention(
            *(x[a:b].transpose(0, 1) for x in (query, key, value)), is_causal=True, scale=scale
        ).transpose(0, 1)
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(pieces)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """Padded steps (with their reordering floors) and packed trainers with flex and varlen installed."""
    tmp = tmp_path_factory.mktemp("packed_attention")
    out = {}
    padded = recipe_trainer(tiny_model_dir, tmp / "padded")
    for name, run in (("with", step), ("without", no_grad_step)):
        padded.data_collator.pad_to_multiple_of = None
        out[name] = {"padded": run(padded), "reversed": run(padded, reverse=True)}
        padded.data_collator.pad_to_multiple_of = 64
        out[name]["pad64"] = run(padded)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(packed_attention, "attention_problem", lambda choice, cuda: None)  # the CPU stands in for CUDA
        patch.setattr(packed_attention, "varlen_kernel", cpu_varlen)
        patch.setattr(packed_attention, "HALF", (torch.float32,))  # the stand-in takes fp32, as the tiny model is
        for choice in ("flex", "varlen"):
            out[choice] = recipe_trainer(tiny_model_dir, tmp / choice, packing=True, packing_attention=choice)
    return out


def bound(steps) -> float:
    return FLOOR_MULTIPLE * floor(steps)


def test_flex_gives_the_padded_loss_and_metrics(runs, capsys):
    found = distances(no_grad_step(runs["flex"]), runs["without"]["padded"])
    assert max(found.values()) <= bound(runs["without"]), (found, bound(runs["without"]))


def test_flex_bound_catches_sequences_seeing_each_other(runs, monkeypatch):
    """Without the packed-sequence part of the block mask (causal over the whole row) the same step is far off."""
    monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    found = distances(no_grad_step(runs["flex"]), runs["without"]["padded"])
    # measured (AMD EPYC, fp32): the leak moves the step by 1.16 relative, about 1600x the bound (8 x a floor of
    # 8.8e-5); 100x leaves room for another CPU's floor while a leak stays far above it
    assert max(found.values()) > 100 * bound(runs["without"]), found


def test_varlen_gives_the_padded_loss_metrics_and_gradients(runs, monkeypatch):
    """Also with the per-forward lengths only: reading boundaries from position ids per layer would fail."""
    monkeypatch.setattr(packed_attention, "varlen_kernel", cpu_varlen)
    monkeypatch.setattr(packed_attention, "boundaries", lambda position_ids: pytest.fail("read per layer"))
    found = distances(step(runs["varlen"]), runs["with"]["padded"])
    assert max(found.values()) <= bound(runs["with"]), (found, bound(runs["with"]))


def test_varlen_boundaries_are_computed_and_cast_once_per_forward(runs, monkeypatch):
    """Counted on the tiny model (2 layers): one int32 cast of the cumulative lengths per packed forward, made
    with them (varlen_kwargs), none in the layers. Was: packed_varlen cast them again in every layer."""
    monkeypatch.setattr(packed_attention, "varlen_kernel", cpu_varlen)
    forwards, casts, whole, to = [], [], packing.varlen_kwargs, torch.Tensor.to
    monkeypatch.setattr(packing, "varlen_kwargs", lambda lengths: forwards.append(1) or whole(lengths))

    def counting_to(tensor, *args, **kwargs):
        casts.extend([1] if torch.int32 in args or kwargs.get("dtype") is torch.int32 else [])
        return to(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    step(runs["varlen"])
    assert runs["varlen"].model.config.num_hidden_layers >= 2
    assert forwards and len(casts) == len(forwards), (len(casts), len(forwards))


def test_varlen_boundaries_from_position_ids_are_packings_segment_starts(tiny_model_dir, tmp_path, monkeypatch):
    """A packed row given without its boundaries reads them with packing's own function (one reader, as the
    segments kernel reads them) into the keywords training passes; install's probe passes them as training does
    (once per forward), so it never reads them per layer."""
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    found, expected = packed_attention.boundaries(position_ids), packing.varlen_kwargs(torch.tensor([3, 2, 4]))
    assert found.keys() == expected.keys() and all(torch.equal(torch.as_tensor(found[k]), torch.as_tensor(v))
                                                   for k, v in expected.items())  # fmt: skip
    assert packing.segment_starts is packed_attention.segment_starts
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(packed_attention, "attention_problem", lambda choice, cuda: None)  # the CPU stands in for CUDA
        patch.setattr(packed_attention, "varlen_kernel", cpu_varlen)
        patch.setattr(packed_attention, "HALF", (torch.float32,))
        patch.setattr(packed_attention, "boundaries", lambda position_ids: pytest.fail("read per layer"))
        recipe_trainer(tiny_model_dir, tmp_path / "varlen", packing=True, packing_attention="varlen")


def test_varlen_bound_catches_sequences_seeing_each_other(runs, monkeypatch):
    """The kernel given the whole row as one sequence: the step's gradients are far off."""
    monkeypatch.setattr(packed_attention, "varlen_kernel", cpu_varlen)
    whole = packing.varlen_kwargs
    monkeypatch.setattr(packing, "varlen_kwargs", lambda lengths: whole(lengths.sum()[None]))
    found = distances(step(runs["varlen"]), runs["with"]["padded"])
    # as for flex above: a leak measured more than 100x the bound (AMD EPYC, fp32), correct packing within 1x
    assert max(found.values()) > 100 * bound(runs["with"]), found


def test_generation_with_a_cache_runs_as_with_sdpa(tiny_model_dir, monkeypatch):
    """The installed kernels stay on the model (the rounds recipe generates with it): a generation step's one
    query against cached keys is no packed row, and runs SDPA (varlen read boundaries from it and failed)."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(packed_attention, "varlen_kernel", cpu_varlen)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    ids = torch.randint(0, 100, (1, 9), generator=torch.Generator().manual_seed(0))
    expected = model.generate(ids, max_new_tokens=6, do_sample=False)
    for name in (packed_attention.FLEX, packed_attention.VARLEN):
        model.set_attn_implementation(name)
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), expected), name


def test_install_sets_the_chosen_kernel(runs):
    for choice, name in (("flex", "packed_flex"), ("varlen", "packed_varlen")):
        assert runs[choice].model.get_base_model().config._attn_implementation == name


def test_auto_picks_segments_on_a_cpu_and_a_fused_kernel_on_cuda():
    assert packed_attention.resolve("auto", False, torch.bfloat16, 0.0) == "segments"
    assert packed_attention.resolve("auto", True, torch.bfloat16, 0.1) == "segments"  # only segments has dropout
    expected = "varlen" if packed_attention.has_varlen() else "flex"
    assert packed_attention.resolve("auto", True, torch.bfloat16, 0.0) == expected
    assert packed_attention.resolve("auto", True, torch.float32, 0.0) == "flex"  # flash kernels are half only
    with pytest.raises(UserError, match="packing_attention: varlen runs flash kernels, bf16/fp16 only"):
        packed_attention.resolve("varlen", True, torch.float32, 0.0)
    with pytest.raises(UserError, match="packing_attention: flex has no attention dropout"):
        packed_attention.resolve("flex", True, torch.bfloat16, 0.1)


def test_refuses_a_packing_attention_this_device_or_torch_cannot_run(monkeypatch):
    """Before weights load (check_packing), one line naming the setting and the fix."""
    args = dict(packing=True, deepspeed=None, fsdp=None, padding_free=False, use_cpu=True)
    for choice, named in (("flex", "has no backward on a CPU"), ("varlen", "CUDA only")):
        with pytest.raises(UserError, match=f"packing_attention: {choice} needs a CUDA device .*{named}.*segments"):
            check_packing(SimpleNamespace(**args, packing_attention=choice))
    for choice in ("auto", "segments"):
        check_packing(SimpleNamespace(**args, packing_attention=choice))
    monkeypatch.setattr(packed_attention, "has_varlen", lambda: False)
    with pytest.raises(UserError, match=r"packing_attention: varlen needs torch >= 2.10"):
        check_packing(SimpleNamespace(**{**args, "use_cpu": False}, packing_attention="varlen"))


def test_the_gate_refuses_packing_attention_without_packing_or_with_another_attention():
    base = {"packing": True, "attn_implementation": None}
    assert table_problems({**base, "packing_attention": "flex"}) == []
    assert (
        "packing_attention must be one of auto, segments, flex, varlen"
        in table_problems({**base, "packing_attention": "flash"})[0]
    )
    assert (
        "packing_attention flex is set but packing is false"
        in table_problems({**base, "packing": False, "packing_attention": "flex"})[0]
    )
    assert (
        "attn_implementation is eager"
        in table_problems({**base, "attn_implementation": "eager", "packing_attention": "varlen"})[0]
    )
    assert table_problems({**base, "packing": False, "packing_attention": "auto"}) == []


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--packing", "true", "--packing_attention", "flex"], "packing_attention: flex needs a CUDA device"),
        (["--packing", "true", "--packing_attention", "varlen"], "packing_attention: varlen needs"),
        (["--packing_attention", "segments"], "packing_attention segments is set but packing is false"),
    ],
)
def test_a_recipe_refuses_it_in_one_line_before_weights_load(
    flags, named, tiny_model_dir, truthy_file, tmp_path, capsys, no_weights_load
):
    local = ["--model_name_or_path", tiny_model_dir, "--dataset_name", truthy_file, "--output_dir", tmp_path / "out"]
    line = one_line_error(load_recipe("dpo_phi2").main, [*local, "--use_cpu", "true", *flags], capsys)
    assert named in line, line


# ── on a CUDA GPU (DPO_GPU_TESTS=1 pytest -m gpu tests/train/speed/test_packed_attention.py) ──────────────────

TRUTHY_LENGTHS = (300, 181, 412, 77, 256, 129)  # chosen and rejected of 3 pairs, a few hundred tokens each


def kernel_outputs(choice, device, dtype, lengths=TRUTHY_LENGTHS, heads=32, head_dim=80, boundaries=True):
    """Output and q/k/v gradients of one packed row's attention (phi-2's 32 heads of 80) through the kernel
    `choice` as the model calls it: segments, flex (its BlockMask from transformers' packed-sequence mask
    function, as create_causal_mask builds it), varlen (cumulative lengths as packing.varlen_kwargs makes
    them). `boundaries=False`: the row as one sequence (what a leak looks like)."""
    from transformers.masking_utils import causal_mask_function, packed_sequence_compatibility_function

    generator = torch.Generator().manual_seed(0)
    total = sum(lengths)
    qkv = [
        torch.randn(1, heads, total, head_dim, generator=generator).to(device, dtype).requires_grad_() for _ in "qkv"
    ]
    grad_out = torch.randn(1, total, heads, head_dim, generator=generator).to(device, dtype)
    seen = torch.tensor(lengths if boundaries else [total])
    position_ids = torch.cat([torch.arange(n) for n in seen.tolist()])[None].to(device)
    if choice == "segments":
        out = packing.segmented_sdpa(None, *qkv, None, position_ids=position_ids)[0]
    elif choice == "flex":
        sequence = torch.repeat_interleave(torch.arange(len(seen)), seen)[None].to(device)
        function = packed_sequence_compatibility_function(causal_mask_function, position_ids, sequence)
        mask = packed_attention.flex_mask(
            batch_size=1, q_length=total, kv_length=total, mask_function=function, attention_mask=None, device=device
        )
        out = packed_attention.packed_flex(None, *qkv, mask)[0]
    else:
        out = packed_attention.packed_varlen(None, *qkv, None, **packing.varlen_kwargs(seen.to(device)))[0]
    out.backward(grad_out)
    return [out.detach().float(), *(x.grad.float() for x in qkv)]


def relative(found, reference) -> float:
    return max(float((f - r).norm() / r.norm()) for f, r in zip(found, reference))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("choice", ["flex", "varlen"])
def test_cuda_kernel_matches_segments_in_bf16_with_gradients(choice):
    """torch's real kernels at phi-2's head size and truthy-like lengths, in bf16: output and gradients as far from
    the fp32 per-sequence reference as segments' own bf16 SDPA is, within 4x (bf16 kernels sum in other
    orders); a leak across sequences is far beyond that."""
    if choice == "varlen" and not packed_attention.has_varlen():
        pytest.skip(f"torch {torch.__version__} has no varlen_attn")
    reference = kernel_outputs("segments", "cuda", torch.float32)
    floor = relative(kernel_outputs("segments", "cuda", torch.bfloat16), reference)
    found = relative(kernel_outputs(choice, "cuda", torch.bfloat16), reference)
    # 4x and 25x are not yet measured on a GPU: with the CPU stand-in for the kernel (bf16, AMD EPYC) the floor was
    # 4.5e-3, varlen 3.8e-3 (0.84x) and a leak 0.85 (190x); the first GPU run is to record its own ratios here
    assert found <= 4 * floor, (found, floor)
    assert relative(kernel_outputs(choice, "cuda", torch.bfloat16, boundaries=False), reference) > 25 * floor


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("choice", ["auto", "segments", "flex", "varlen"])
def test_cuda_install_passes_the_probe_in_bf16_and_trains(choice, tiny_model_dir, tmp_path, capsys):
    """Each packing_attention on the GPU in bf16: install_packing's probe accepts it (its bound is the padded
    path's own reordering floor on that device) and two packed steps train with finite losses."""
    if choice == "varlen" and not packed_attention.has_varlen():
        pytest.skip(f"torch {torch.__version__} has no varlen_attn")
    trainer = recipe_trainer(
        tiny_model_dir, tmp_path, dtype="bfloat16", use_cpu=False, bf16=True, max_steps=2, packing=True,
        packing_attention=choice,
    )  # fmt: skip
    expected = {"auto": "packed_", "segments": "sdpa_segments", "flex": "packed_flex", "varlen": "packed_varlen"}
    assert f"(attention {expected[choice]}" in capsys.readouterr().out
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), losses
