"""dpo/train/speed/packed_attention.py: `packing_attention: flex | varlen` give the padded path's results on the
tiny Phi model, within test_packing.py's bound (FLOOR_MULTIPLE x the padded step's own reordering floor), and a
packing_attention the device, torch or settings cannot serve is refused in one line before weights load.

On a CPU both kernels stand in for CUDA's: flex attention runs torch's eager (unfused) implementation, forward
only (torch has no flex backward on a CPU), so its steps are compared without gradients; on CUDA the same call
is torch.compile'd into fused kernels, checked there by install_packing's probe. varlen's kernel (torch's flash
varlen_attn) is CUDA only: here a causal SDPA per cumulative-length slice stands in for it, so these tests check
what this repository adds (lengths computed once per forward reaching every layer through TRL's and the model's
forwards, the [T, heads, d] layout, grouped-query heads), and the GPU run's probe checks torch's kernel."""

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
    assert max(found.values()) > 100 * bound(runs["without"]), found


def test_varlen_gives_the_padded_loss_metrics_and_gradients(runs, monkeypatch):
    """Also with the per-forward lengths only: reading boundaries from position ids per layer would fail."""
    monkeypatch.setattr(packed_attention, "varlen_kernel", cpu_varlen)
    monkeypatch.setattr(packed_attention, "boundaries", lambda position_ids: pytest.fail("read per layer"))
    found = distances(step(runs["varlen"]), runs["with"]["padded"])
    assert max(found.values()) <= bound(runs["with"]), (found, bound(runs["with"]))


def test_varlen_bound_catches_sequences_seeing_each_other(runs, monkeypatch):
    """The kernel given the whole row as one sequence: the step's gradients are far off."""
    monkeypatch.setattr(packed_attention, "varlen_kernel", cpu_varlen)
    whole = packing.varlen_kwargs
    monkeypatch.setattr(packing, "varlen_kwargs", lambda lengths: whole(lengths.sum()[None]))
    found = distances(step(runs["varlen"]), runs["with"]["padded"])
    assert max(found.values()) > 100 * bound(runs["with"]), found


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
