"""The models of a round: the policy that samples (the base with the previous round's saved adapter, or
the starting model in round 1), and the reference each round's DPO trains against.

Round N > 1 starts its policy from round N-1's adapter through the SFT-adapter mechanism
(dpo/train/adapters.py): TRL then keeps a frozen copy of that adapter as the reference ("ref"), which is
`reference: previous` as it is. For `reference: initial` the copy is replaced by the starting model: the
"ref" adapter is deleted (TRL then computes the reference with adapters disabled: the base), or, when
the run started from an SFT adapter, that adapter is loaded as "ref" in its place.
"""

from __future__ import annotations

from dpo.compat import REFERENCE_ADAPTER, create_model_from_path, quantization_config
from dpo.errors import release_held_warnings
from dpo.train.adapters import load_with_adapter, put_adapter
from dpo.train.model_checks import model_init_kwargs
from dpo.train.speed.kernels import portable_4bit_layers, use_portable_4bit_kernels


def load_kwargs(model_args, training_args) -> dict:
    """What DPOTrainer passes to from_pretrained, the 4-bit quantization included."""
    kwargs = {**model_init_kwargs(model_args, training_args), **(training_args.model_init_kwargs or {})}
    quantization = quantization_config(model_args)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    return kwargs


def load_policy(model_args, training_args, adapter: str | None):
    """The base (as the trainer loads it) with `adapter` on it, frozen; the bare base without one."""
    release_held_warnings()  # weights load next (dpo/errors.py)
    kwargs = load_kwargs(model_args, training_args)
    if adapter:
        model = load_with_adapter(model_args.model_name_or_path, kwargs, adapter, trainable=False)
    else:
        with portable_4bit_layers():  # one 4-bit kernel on every CPU (dpo/train/speed/kernels.py)
            model = create_model_from_path(model_args.model_name_or_path, **kwargs)
        use_portable_4bit_kernels(model)
    return model.eval()


class Handoff:
    """A loaded model passed to the next user without the giver keeping it alive: `take()` returns it once
    and drops the holder's reference. The sampler's copy of the policy must be freed before the trainer
    loads its own (two copies of the base in memory otherwise); a caller that held the model in a local
    variable while the round trains would keep it."""

    def __init__(self, model=None):
        self._model = model

    def take(self):
        model, self._model = self._model, None
        return model


def describe_reference(reference: str, round_number: int, sft_adapter: str | None) -> str:
    """Round `round_number`'s reference in words."""
    start = f"base + SFT adapter {sft_adapter}" if sft_adapter else "base, adapters disabled"
    if round_number > 1 and reference == "previous":
        return f"round {round_number - 1}'s policy, frozen"
    return f"the starting model ({start})"


def set_reference(trainer, reference: str, round_number: int, sft_adapter: str | None) -> str:
    """Make the trainer's reference the one `reference` names for this round; returns it in words."""
    if round_number > 1 and reference == "initial":
        model = trainer.model
        model.delete_adapter(REFERENCE_ADAPTER)  # TRL's copy of round N-1's adapter
        if sft_adapter:
            put_adapter(model, sft_adapter, REFERENCE_ADAPTER)  # frozen (is_trainable False)
            model.set_adapter("default")
    return describe_reference(reference, round_number, sft_adapter)
