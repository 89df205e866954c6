"""recipes/dpo_phi2.py end to end on the tiny offline Phi model: the real bitsandbytes 4-bit
+ LoRA path on CPU, on truthy-format rows written by the fixture.

One recipe run (module fixture) backs the checks on what training did and did not touch.
"""

import gc
import json
import os
import signal
import subprocess
import sys
import weakref

import pytest
import torch
import transformers
from helpers import ROOT, cli, eval_batch_metrics, load_recipe, qlora_quantization_config
from transformers import AutoModelForCausalLM, TrainerCallback

from dpo.compat import REWARD_METRICS, precomputed_reference_logps
from dpo.train.speed.kernels import use_portable_4bit_kernels

pytestmark = pytest.mark.slow  # every test here trains the recipe or starts a Python subprocess

RUN_FLAGS = cli(
    max_steps="4",
    gradient_accumulation_steps="1",
    per_device_train_batch_size="4",
    learning_rate="1e-2",  # large on purpose: every LoRA weight must move within 4 steps
    eval_steps="2",
    save_steps="2",
    test_size="0.25",
)


def short_run(model_dir, data, out, **settings) -> list[str]:
    """The recipe on the tiny model and truthy rows, every pair trained, one pair-batch per step."""
    return cli(
        model_name_or_path=model_dir, dataset_name=data, output_dir=out, gradient_accumulation_steps="1", test_size="0",
        **settings,
    )  # fmt: skip


class SnapshotLoRA(TrainerCallback):
    """Keeps a copy of every trainable (LoRA) tensor as it is when training starts."""

    def __init__(self):
        self.initial = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def run(tiny_model_dir, truthy_file, tmp_path_factory, monkeypatch_module):
    """Run the recipe once, counting the Phi models it builds with real (non-meta) weights."""
    built = []
    original_init = transformers.PhiForCausalLM.__init__

    def counting_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        built.append(weakref.ref(self))

    monkeypatch_module.setattr(transformers.PhiForCausalLM, "__init__", counting_init)
    output_dir = tmp_path_factory.mktemp("dpo_phi2")
    snapshot = SnapshotLoRA()
    recipe = load_recipe("dpo_phi2")
    trainer = recipe.main(
        [
            *cli(
                model_name_or_path=tiny_model_dir,
                dataset_name=truthy_file,
                output_dir=output_dir,
            ),
            *RUN_FLAGS,
        ],
        callbacks=[snapshot],
    )
    monkeypatch_module.undo()
    gc.collect()
    alive = [ref() for ref in built if ref() is not None]
    materialised = [m for m in alive if not any(p.is_meta for p in m.parameters())]
    return {"trainer": trainer, "snapshot": snapshot, "output_dir": output_dir, "models": materialised}


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_base_is_4bit_nf4_with_double_quant_and_lora_on_all_phi2_modules(run):
    import bitsandbytes as bnb

    model = run["trainer"].model
    linear4 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linear4, "no 4-bit layers: the base was not quantized"
    assert all(m.weight.quant_state.quant_type == "nf4" for m in linear4)
    assert all(m.weight.compress_statistics for m in linear4), "double quantization is off"
    lora_a = [n for n, _ in model.named_parameters() if "lora_A" in n]
    # 2 layers x (q_proj, k_proj, v_proj, dense, fc1, fc2) = 12 LoRA-wrapped layers
    assert len(lora_a) == 12
    for name in ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"):
        assert any(f".{name}." in n for n in lora_a), name


def test_every_lora_weight_changed_and_only_lora_trains(run):
    model, initial = run["trainer"].model, run["snapshot"].initial
    assert initial and all("lora_" in n for n in initial), "something other than LoRA was trainable"
    params = dict(model.named_parameters())
    unchanged = [n for n, before in initial.items() if torch.equal(params[n].detach(), before)]
    assert not unchanged, f"LoRA weights that did not move: {unchanged}"


def test_every_base_weight_unchanged(run, tiny_model_dir):
    """Compare with a fresh 4-bit load of the same folder: same quantization, same bytes."""
    trained = run["trainer"].model.get_base_model()
    fresh = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, quantization_config=qlora_quantization_config(), dtype=torch.float32
    )
    use_portable_4bit_kernels(fresh)
    fresh_params = dict(fresh.named_parameters())
    compared = 0
    for name, param in trained.named_parameters():
        if "lora_" in name:
            continue
        base_name = name.replace(".base_layer", "")
        assert torch.equal(param.detach().cpu(), fresh_params[base_name].detach().cpu()), name
        compared += 1
    assert compared == len(fresh_params)


def test_no_reference_model_is_allocated(run):
    trainer = run["trainer"]
    assert trainer.ref_model is None
    assert list(trainer.model.peft_config) == ["default"], "a 'ref' adapter copy was created"
    assert len(run["models"]) == 1, f"{len(run['models'])} Phi models with weights were built; expected one"


def base_logps(model_dir, batch):
    """Summed completion log-probs under a fresh 4-bit load of the base: (chosen, rejected)."""
    base = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=qlora_quantization_config(), dtype=torch.float32
    )
    use_portable_4bit_kernels(base)  # the same kernel as the trainer's, on any CPU
    with torch.no_grad():
        logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # token t is predicted from position t-1; only completion tokens count
    token_logps = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return (token_logps * batch["completion_mask"][:, 1:]).sum(-1).chunk(2)


def test_reference_in_the_training_loss_is_the_base_with_adapters_disabled(run, tiny_model_dir):
    """The path training uses: DPOTrainer computes the reference inline in its loss and logs
    rewards = beta * (policy - reference). With the base model's log-probs as the reference,
    the logged rewards must come out exactly; with anything else (e.g. adapters left on) not."""
    trainer = run["trainer"]
    batch, logged = eval_batch_metrics(trainer)
    base_chosen, base_rejected = base_logps(tiny_model_dir, batch)
    policy_chosen = torch.tensor(logged["logps/chosen"])  # batch means
    policy_rejected = torch.tensor(logged["logps/rejected"])
    beta = trainer.args.beta
    torch.testing.assert_close(
        torch.tensor(logged["rewards/chosen"]), beta * (policy_chosen - base_chosen.mean()), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        torch.tensor(logged["rewards/rejected"]), beta * (policy_rejected - base_rejected.mean()), rtol=1e-5, atol=1e-5
    )
    # the trained policy is measurably different from the base, so the check above can fail
    assert abs(logged["rewards/chosen"]) > 1e-3


def test_precomputed_reference_path_is_the_base_too(run, tiny_model_dir):
    """TRL's other reference path (precompute_ref_log_probs) also disables the adapters."""
    trainer = run["trainer"]
    batch = next(iter(trainer.get_eval_dataloader()))
    ref_chosen, ref_rejected = precomputed_reference_logps(trainer, batch)
    base_chosen, base_rejected = base_logps(tiny_model_dir, batch)
    torch.testing.assert_close(ref_chosen, base_chosen, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ref_rejected, base_rejected, rtol=1e-5, atol=1e-4)


def test_outputs_written(run):
    out = run["output_dir"]
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "resolved_config.yaml",
        "final_metrics.json",
        "trainer_state.json",
        "training_curves.png",
    ):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.bin")) or [p.name for p in out.glob("*.bin")] == ["training_args.bin"]
    metrics = json.loads((out / "final_metrics.json").read_text())
    assert "train_loss" in metrics and "eval_rewards/accuracies" in metrics
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"])


def test_reward_metrics_logged_every_step(run):
    history = run["trainer"].state.log_history
    train_logs = [h for h in history if "loss" in h]
    assert len(train_logs) == 4
    for entry in train_logs:
        for key in REWARD_METRICS:
            assert key in entry, key
    assert any(k.startswith("eval_rewards/") for h in history for k in h)


def test_resolved_config_reruns_the_same_settings(run):
    from dpo.compat import ModelConfig
    from dpo.train.config import RecipeDPOConfig, parse_recipe_args

    recipe = load_recipe("dpo_phi2")
    script, training, model, _ = parse_recipe_args(
        (recipe.ScriptArguments, RecipeDPOConfig, ModelConfig),
        ROOT / "recipes" / "dpo_phi2.yaml",
        ["--config", str(run["output_dir"] / "resolved_config.yaml")],
    )
    used = run["trainer"].args
    assert training.learning_rate == used.learning_rate == 1e-2
    assert training.max_steps == 4 and script.test_size == 0.25
    assert model.lora_target_modules == ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]


class CountSteps(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


class InterruptAt(TrainerCallback):
    """Sends this process a real SIGINT (what Ctrl-C sends) during optimizer step `step`."""

    def __init__(self, step, signum=signal.SIGINT):
        self.step, self.signum = step, signum

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            os.kill(os.getpid(), self.signum)


def test_resume_from_checkpoint(tiny_model_dir, truthy_file, tmp_path):
    """Resuming from checkpoint-2 runs only steps 3 and 4: a fresh start would run four.
    (A longer max_steps is a different setting: allowed with --resume_with_different_settings.)"""
    recipe = load_recipe("dpo_phi2")
    common = short_run(tiny_model_dir, truthy_file, tmp_path, save_steps="2")
    recipe.main([*common, "--max_steps", "2"])
    assert (tmp_path / "checkpoint-2").is_dir()
    counter = CountSteps()
    resumed = recipe.main(
        [*common, "--max_steps", "4", "--resume_from_checkpoint", "last", "--resume_with_different_settings", "true"],
        callbacks=[counter],
    )
    assert counter.steps == [3, 4]
    assert resumed.state.global_step == 4


def test_ctrl_c_saves_a_resumable_checkpoint(tiny_model_dir, truthy_file, tmp_path):
    recipe = load_recipe("dpo_phi2")
    common = short_run(tiny_model_dir, truthy_file, tmp_path, save_steps="100", max_steps="4")
    with pytest.raises(SystemExit) as stopped:
        recipe.main(common, callbacks=[InterruptAt(3)])
    assert stopped.value.code == 130
    assert (tmp_path / "checkpoint-3" / "optimizer.pt").is_file()
    counter = CountSteps()
    recipe.main([*common, "--resume_from_checkpoint", "last"], callbacks=[counter])
    assert counter.steps == [4]


def test_a_single_lora_target_trains(tiny_model_dir, truthy_file, tmp_path):
    """TRL turns a one-item target list into a string, which PEFT would read as a regex."""
    trainer = load_recipe("dpo_phi2").main(
        short_run(tiny_model_dir, truthy_file, tmp_path, max_steps="1", lora_target_modules="q_proj")
    )
    wrapped = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in trainer.model.named_parameters() if "lora_A" in n}
    assert wrapped == {"q_proj"}


def test_hub_unreachable_exits_cleanly_without_traceback(tmp_path):
    """As a user sees it with no internet: exit status 2, one message naming what could not be
    fetched and how to point the recipe at a local copy; no traceback."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "dpo_phi2.py")],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    # the model is checked first: phi-2 cannot be fetched offline, and the message says what to do
    assert "could not load model 'microsoft/phi-2'" in proc.stderr
    assert "--model_name_or_path" in proc.stderr
