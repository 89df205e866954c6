"""dpo/train/speed/memory.py: a loaded CPU model lets go of its checkpoint file's memory map.

transformers maps the .safetensors file and leaves unconverted weights (with a 4-bit base: the
embedding, the norms) as views into it, which keeps every page loading read resident. These tests
check that this still happens with the pinned transformers (else the module is moot and should go),
that owning the weights unmaps the file without changing a value or untying a tied weight, and that
the DPO trainer builder does it.
"""

import shutil

import pytest
import torch
from helpers import recipe_trainer
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from dpo.train.speed.memory import mapped_checkpoint_ranges, own_file_mapped_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def maps_of(folder) -> int:
    """How many of this process's memory maps are files inside `folder`."""
    with open("/proc/self/maps") as f:
        return sum(f" {folder}/" in line for line in f)


def load_4bit(folder):
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, quantization_config=quant)


def in_a_map(model) -> list[str]:
    ranges = mapped_checkpoint_ranges()
    return [n for n, p in model.named_parameters() if any(a <= p.untyped_storage().data_ptr() < b for a, b in ranges)]


def test_owning_unmaps_the_file_with_the_same_values_and_ties(smollm2_dir, tmp_path):
    folder = shutil.copytree(smollm2_dir, tmp_path / "smollm2")  # a path no other test has mapped
    model = load_4bit(folder)
    mapped = in_a_map(model)
    assert "model.embed_tokens.weight" in mapped and maps_of(folder) > 0, "transformers no longer maps the file"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copied, size = own_file_mapped_weights(model)
    assert copied == len(mapped) and size >= 49152 * 576 * 4  # the fp32 embedding at least
    assert maps_of(folder) == 0 and in_a_map(model) == []
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # SmolLM2 ties them; still one tensor
    assert own_file_mapped_weights(model) == (0, 0)  # nothing left to copy


def test_the_dpo_trainer_holds_no_map_of_the_model(smollm2_dir, tmp_path):
    """A 4-bit base's leftover views are a fifth of SmolLM2's file (the embedding): the builder drops the map."""
    folder = shutil.copytree(smollm2_dir, tmp_path / "smollm2")
    trainer = recipe_trainer(folder, tmp_path / "out")
    assert trainer.model is not None and maps_of(folder) == 0


def test_a_base_that_is_the_file_stays_mapped(tiny_model_dir, tmp_path):
    """Not converted, every weight views the file: a copy would free nothing and hold the model twice."""
    folder = shutil.copytree(tiny_model_dir, tmp_path / "tiny")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert len(in_a_map(model)) == len(list(model.parameters())) and maps_of(folder) > 0
    assert own_file_mapped_weights(model) == (0, 0) and maps_of(folder) > 0
