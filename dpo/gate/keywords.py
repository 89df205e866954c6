"""The keys a mapping setting may hold, read from the function that receives it as keyword arguments.

A mapping setting (activation_checkpointing_kwargs, lr_scheduler_kwargs, model_init_kwargs, ...) is handed to
a library function as `**kwargs`. A key the function does not take fails only when it is called, after the
weights load (`ValueError: Unexpected keyword arguments: garbage`), or is silently dropped. The keys are read
here from that function when checked: its keyword parameters (with their annotations), and the keys its body
takes out of `**kwargs` (`kwargs.pop("preserve_rng_state", True)`, typed by the default), so a key an upgrade
adds passes and a removed one is refused. Read at each check, not cached: a test that replaces
from_pretrained (tests/conftest.py no_weights_load) must not leave its stand-in's keys behind.

    accepted(fn)   {key: the Python types its value may have, or None for any}; None when fn passes **kwargs on
                   to something unread (anything goes)
"""

from __future__ import annotations

import ast
import collections.abc
import inspect
import textwrap
import types
import typing

ANY = None  # a key whose value may be anything (no annotation, a default of None)


def _types(annotation, default=inspect.Parameter.empty):
    """The runtime types an annotation allows; () for a callable (a YAML or command line cannot give one)."""
    if annotation is inspect.Parameter.empty or annotation is typing.Any or isinstance(annotation, str):
        if default is inspect.Parameter.empty or default is None:
            return ANY
        return () if callable(default) else (type(default),)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        parts = [_types(arg) for arg in typing.get_args(annotation)]
        return ANY if any(p is ANY for p in parts) else tuple(t for p in parts for t in p)
    if annotation is type(None):
        return (type(None),)
    if origin is collections.abc.Callable or annotation is collections.abc.Callable:
        return ()
    if isinstance(annotation, type):
        return (annotation,)
    return (origin,) if isinstance(origin, type) else ANY


def _taken_from_kwargs(fn, holder: str = "kwargs") -> dict:
    """Keys the code of `fn` (a function or class) reads out of the mapping named `holder`:
    kwargs.pop("key", default), args.dataset_kwargs.get("key", default)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return {}
    found = {}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("pop", "get")
            and holder in (getattr(node.func.value, "id", None), getattr(node.func.value, "attr", None))
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            try:
                default = ast.literal_eval(node.args[1]) if len(node.args) > 1 else None
            except ValueError:
                default = None
            found.setdefault(node.args[0].value, _types(inspect.Parameter.empty, default))
    return found


def accepted(fn, skip=()) -> dict | None:
    """{key: allowed types or ANY} for the keyword arguments `fn` takes, less `skip` (what its caller passes
    itself); None when `fn` hands unread **kwargs on to something else (nothing to check against)."""
    signature = inspect.signature(fn, eval_str=True)
    keys = {}
    for name, param in signature.parameters.items():
        if name in skip or name == "self" or param.kind in (param.POSITIONAL_ONLY, param.VAR_POSITIONAL):
            continue
        if param.kind is param.VAR_KEYWORD:
            continue
        keys[name] = _types(param.annotation, param.default)
    if any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        taken = _taken_from_kwargs(fn)
        if not taken and not keys:
            return None  # (optimizer, **kwargs): everything goes on to another callable
        keys.update({k: v for k, v in taken.items() if k not in skip})
    return keys


def kind_problem(value, allowed) -> str | None:
    """Why `value` is not of the `allowed` types (None: it is)."""
    if allowed is ANY:
        return None
    if allowed == ():
        return "takes a Python function, which a YAML or the command line cannot give"
    if isinstance(value, bool) and bool not in allowed:
        ok = False
    elif isinstance(value, int) and float in allowed:
        ok = True
    else:
        ok = isinstance(value, allowed)
    if ok:
        return None
    words = {bool: "true or false", int: "a whole number", float: "a number", str: "text", type(None): "null"}
    want = " or ".join(words.get(t, t.__name__) for t in allowed)
    return f"takes {want}; got {value!r:.60}"


# ── the functions this repository's settings reach ─────────────────────────────────────────────
def checkpoint_keys() -> dict:
    """activation_checkpointing_kwargs: transformers' Trainer takes every_n_layers and offload out for
    activation_checkpointing_enable and hands the rest to torch.utils.checkpoint.checkpoint."""
    from torch.utils.checkpoint import checkpoint
    from transformers import PreTrainedModel

    enable = accepted(PreTrainedModel.activation_checkpointing_enable, skip=("activation_checkpointing_kwargs",))
    return {**accepted(checkpoint, skip=("function",)), **enable}


def accelerator_config_keys() -> dict:
    """accelerator_config: the fields of transformers' AcceleratorConfig, which is built from it while parsing."""
    import dataclasses

    from transformers.trainer_pt_utils import AcceleratorConfig

    hints = typing.get_type_hints(AcceleratorConfig)
    return {
        f.name: _types(hints.get(f.name, inspect.Parameter.empty), f.default)
        for f in dataclasses.fields(AcceleratorConfig)
    }


# the Trainer passes these to every scheduler itself; last_epoch is the scheduler's resume state, set by it
SCHEDULER_OWN = ("optimizer", "num_warmup_steps", "num_training_steps", "last_epoch")


def scheduler_keys(kind: str) -> dict | None:
    """lr_scheduler_kwargs for lr_scheduler_type `kind`: its transformers scheduler function's parameters
    (constant and constant_with_warmup take none: get_scheduler drops the mapping for them)."""
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION
    from transformers.trainer_utils import SchedulerType

    try:
        fn = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(kind)]
    except (ValueError, KeyError):
        return None  # an unknown type is refused by its own check
    return accepted(fn, skip=SCHEDULER_OWN)


def sft_dataset_keys() -> dict:
    """dataset_kwargs (the SFT recipe): the keys TRL's SFTTrainer reads out of args.dataset_kwargs."""
    from dpo.compat import SFTTrainer

    return _taken_from_kwargs(SFTTrainer, "dataset_kwargs")


def from_pretrained_keys() -> frozenset:
    """model_init_kwargs: what AutoModelForCausalLM.from_pretrained and PreTrainedModel.from_pretrained take
    (the model's config attributes are the caller's to add: from_pretrained sets them on the config)."""
    from transformers import AutoModelForCausalLM, PreTrainedModel

    keys = set()
    for fn in (AutoModelForCausalLM.from_pretrained.__func__, PreTrainedModel.from_pretrained.__func__):
        keys |= set(accepted(fn, skip=("cls", "pretrained_model_name_or_path")) or {})
    return frozenset(k for k in keys if not k.startswith("_"))
