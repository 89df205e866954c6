"""Write the notebooks in this folder from the cell lists below.

    python notebooks/build_notebooks.py           # (re)write every .ipynb
    python notebooks/build_notebooks.py --check   # exit 1 if a committed .ipynb differs from this file

The .ipynb files are generated, never edited by hand: edit the cells here and rebuild.
tests/test_notebooks.py checks that the committed files equal what this script writes, that
they carry no outputs, that the install cell pins exactly requirements.txt, and runs each
notebook top to bottom in smoke mode (DPO_SMOKE=1: tiny offline model, a few CPU steps).
"""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
REPO_URL = "https://github.com/dpo-recipes/dpo-recipes"
COLAB_BADGE = "https://colab.research.google.com/assets/colab-badge.svg"


def colab_url(name: str) -> str:
    return f"https://colab.research.google.com/github/dpo-recipes/dpo-recipes/blob/main/notebooks/{name}.ipynb"


def requirement_pins(path: Path = ROOT / "requirements.txt") -> list[str]:
    """The `name==version` lines of requirements.txt, in file order (the `-e .` line is not a pin)."""
    pins = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[^\s;]+", line):
            pins.append(line)
    return pins


def md(text: str, **fill: str) -> tuple[str, str]:
    """A markdown cell; `@KEY@` in the text is replaced by fill["KEY"] after dedenting."""
    text = textwrap.dedent(text).strip("\n")
    for key, value in fill.items():
        text = text.replace(f"@{key}@", value)
    return ("markdown", text)


def code(text: str) -> tuple[str, str]:
    return ("code", textwrap.dedent(text).strip("\n"))


def badge(name: str) -> str:
    return f"[![Open In Colab]({COLAB_BADGE})]({colab_url(name)})"


def install_cell() -> tuple[str, str]:
    """Colab only: the pinned versions of requirements.txt, then this repo's `dpo` package."""
    pins = "\n".join(f'        "{pin}",' for pin in requirement_pins())
    return code(f'''
REPO_URL = "{REPO_URL}"  # the one place the repository's address is written

import os
import subprocess
import sys

if "google.colab" in sys.modules:  # on Colab only; elsewhere use the repo's environment (requirements.txt)
    PINS = [  # exactly requirements.txt
{pins}
    ]
    if not os.path.isdir("dpo-recipes"):
        subprocess.run(["git", "clone", "--depth", "1", REPO_URL, "dpo-recipes"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *PINS], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "-e", "dpo-recipes"], check=True)
    sys.path.insert(0, os.path.abspath("dpo-recipes"))  # importable now, without restarting the session
    for pin in PINS:  # a package the session had already imported keeps its old version until a restart
        name, version = pin.split("==")
        if name in sys.modules and getattr(sys.modules[name], "__version__", version).split("+")[0] != version:
            raise SystemExit(f"{{name}} was imported before this install: Runtime > Restart session, then Run all.")
''')


INSTALL_MD = md("""
## Install

On Colab this cell installs the exact versions this repository is tested with
(`requirements.txt`) and the repository itself, for its small `dpo` library. Anywhere else it
does nothing: run the notebook in the repository's environment (`pip install -r requirements.txt`).
""")

SMOKE_MD = """**Smoke mode.** With `DPO_SMOKE=1` in the environment, the notebook swaps in a tiny offline
model and synthetic rows and runs a few steps on CPU, in about a minute. The test suite runs
every notebook that way. Without it, it runs for real; nothing needs editing."""


# ── 1. phi-2 QLoRA, end to end ─────────────────────────────────────────────────────────────────
def phi2_qlora() -> list[tuple[str, str]]:
    name = "dpo_phi2_qlora"
    return [
        md(
            """
        # DPO on phi-2 with QLoRA, end to end

        @BADGE@

        **Direct Preference Optimization** (DPO) fine-tunes a language model on pairs of answers
        to the same prompt, one *chosen* and one *rejected*, with a plain classification loss: no
        reward model, no reinforcement learning. Here
        [microsoft/phi-2](https://huggingface.co/microsoft/phi-2) (2.7B parameters) learns from
        [jondurbin/truthy-dpo-v0.1](https://huggingface.co/datasets/jondurbin/truthy-dpo-v0.1),
        about 1,000 pairs that prefer honest answers (about being an AI, about common
        misconceptions), on one 16 GB GPU: a free Colab T4 is enough.

        The steps: install, check the hardware, load phi-2 in 4-bit, add LoRA adapters, look at
        the data, train, plot the reward curves, compare answers before and after, save the
        adapter and merge it for deployment. It is the code of `recipes/dpo_phi2.py` with the
        settings of `recipes/dpo_phi2.yaml`, one step per cell.

        In Colab: *Runtime > Change runtime type > T4 GPU* (or better), then *Run all*.

        @SMOKE@
        """,
            BADGE=badge(name),
            SMOKE=SMOKE_MD,
        ),
        INSTALL_MD,
        install_cell(),
        md("""
        ## What to train

        The model, the data and where the results go. `EPOCHS`: the recipe trains 3 epochs
        (about 45 optimizer steps of 64 pairs); one epoch, about 15 steps, shows the effect and
        takes roughly an hour on a T4, a few minutes on an A100.
        """),
        code("""
        from pathlib import Path

        MODEL = "microsoft/phi-2"
        DATASET = "jondurbin/truthy-dpo-v0.1"
        OUTPUT_DIR = Path("outputs/dpo_phi2_qlora")  # adapter, metrics, curves
        EPOCHS = 1

        SMOKE = os.environ.get("DPO_SMOKE") == "1"
        if SMOKE:  # a 2-layer Phi model and truthy-shaped rows, built locally: no download
            from dpo.tiny import save_tiny_model, truthy_like_rows, write_jsonl

            MODEL = str(save_tiny_model("outputs/smoke/tiny-phi"))
            DATASET = str(write_jsonl(truthy_like_rows(64), "outputs/smoke/truthy.jsonl"))
        print(f"model: {MODEL}\\ndata:  {DATASET}\\nsmoke mode: {SMOKE}")
        """),
        md("""
        ## Hardware

        Precision follows the GPU (`dpo/hardware.py`): **bf16** where the GPU has it (A100, L4,
        H100, RTX 30xx and newer); **fp32 compute** where it does not (T4, V100), because DPO's
        summed log-probabilities overflow in fp16 and give NaN losses. The 4-bit weights are the
        same either way.
        """),
        code("""
        import torch

        from dpo.hardware import describe, detect_precision

        precision = detect_precision()
        print(f"{precision.reason} -> {describe(precision.bf16, precision.fp16, precision.dtype)}")
        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            print(f"GPU memory: {total / 2**30:.1f} GiB ({free / 2**30:.1f} GiB free); bf16: {precision.bf16}")
        elif not SMOKE:
            raise RuntimeError("No GPU. In Colab: Runtime > Change runtime type > T4 GPU, then run again.")
        """),
        md("""
        ## The recipe's settings

        Read `recipes/dpo_phi2.yaml` with the recipe's own parser (TRL's `TrlParser`), as
        `accelerate launch recipes/dpo_phi2.py` would. The list below overrides a few fields,
        exactly like command-line flags.
        """),
        code("""
        import runpy
        import warnings
        from pathlib import Path

        import dpo
        from dpo.config import load_recipe_args

        warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5 renames options TRL uses; harmless
        RECIPE = Path(dpo.__file__).resolve().parents[1] / "recipes" / "dpo_phi2.py"  # in the repository checkout
        recipe = runpy.run_path(str(RECIPE))  # the recipe's definitions (ScriptArguments, main), not run

        flags = ["--model_name_or_path", MODEL, "--dataset_name", DATASET,
                 "--output_dir", str(OUTPUT_DIR), "--num_train_epochs", str(EPOCHS)]
        if SMOKE:  # a few steps of 4 pairs, and a learning rate a random tiny model notices
            flags += ["--max_steps", "6", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
                      "--learning_rate", "5e-3", "--eval_steps", "3", "--save_steps", "6", "--test_size", "0.2"]
        script_args, training_args, model_args = load_recipe_args(recipe["ScriptArguments"], RECIPE, flags)
        batch = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
        print(f"beta {training_args.beta}, learning rate {training_args.learning_rate}, {batch} pairs per step")
        """),
        md("""
        ## phi-2 in 4-bit

        QLoRA keeps the frozen base model in **4-bit NF4** (a 4-bit code spaced for normally
        distributed weights): phi-2 needs about 2 GB instead of 5.5 GB in fp16. Each layer
        is dequantized on the fly and computes in bf16 or fp32. *Double quantization* also
        compresses the per-block scale constants.
        """),
        code("""
        from dpo.compat import get_quantization_config

        bnb_config = get_quantization_config(model_args)
        print(f"4-bit: {bnb_config.load_in_4bit}, type: {bnb_config.bnb_4bit_quant_type}, "
              f"double quantization: {bnb_config.bnb_4bit_use_double_quant}, compute: {bnb_config.bnb_4bit_compute_dtype}")
        """),
        md("""
        ## LoRA adapters

        Only small matrices are trained: beside a frozen linear layer $W$, LoRA adds
        $\\frac{\\alpha}{r} B A$ with $A \\in \\mathbb{R}^{r \\times d_{in}}$, $B \\in \\mathbb{R}^{d_{out} \\times r}$,
        $B = 0$ at the start, so training starts from phi-2 exactly.

        phi-2's linear layers are `q_proj`, `k_proj`, `v_proj`, `dense`, `fc1`, `fc2`. Older
        tutorials target `Wqkv` and `out_proj`, names from phi-2's former remote code: they match
        nothing today, and PEFT would silently train nothing there. The check below refuses such
        names. It needs the model's config only, not its weights.
        """),
        code("""
        from dpo.compat import get_peft_config
        from dpo.model import check_lora_targets, load_model_config

        targets = check_lora_targets(load_model_config(MODEL), model_args.lora_target_modules)
        lora = get_peft_config(model_args)
        print(f"LoRA r={lora.r}, alpha={lora.lora_alpha}, dropout={lora.lora_dropout} on {len(targets)} layers:")
        print(", ".join(targets[:6]), "...")
        """),
        md("""
        ## The data

        Each row of truthy-dpo has a `system` text, a `prompt`, a `chosen` and a `rejected` answer.
        """),
        code("""
        from dpo.data import load_preference_data

        raw = load_preference_data(script_args.dataset_name, script_args.dataset_config, script_args.dataset_train_split)
        print(f"{len(raw)} rows, fields {raw.column_names}\\n")
        for field in ("system", "prompt", "chosen", "rejected"):
            print(f"{field:>8}: {raw[0][field][:300]}")
        """),
        md("""
        phi-2 has no chat template. Its documented QA format is `Instruct: ...` then `Output:`;
        the system text opens the instruction (`phi2_qa_format`). TRL appends the end-of-text
        token to each answer, so the model also learns where to stop.

        The data doctor (`dpo/doctor.py`), which the recipe runs too, converts every row, checks
        it, and drops and counts degenerate ones (empty answers, chosen identical to rejected,
        duplicates) before any weights load. It counts lengths in tokens exactly as TRL will, and
        how many pairs `max_length` would cut.
        """),
        code("""
        from dpo.doctor import check_data
        from dpo.formats import phi2_qa_format
        from dpo.model import load_tokenizer

        tokenizer = load_tokenizer(MODEL)
        report = check_data(raw, DATASET, tokenizer, prompt_format="text", text_format=phi2_qa_format,
                            max_length=training_args.max_length, truncation_mode=training_args.truncation_mode)
        print(report.summary())
        print("\\n--- the first pair as the model sees it:")
        print(report.example["prompt"] + report.example["chosen"])
        """),
        md("""
        A seeded tenth of the pairs is held out: the trainer evaluates on it, and the answers
        compared below come from prompts the model never trained on.
        """),
        code("""
        from dpo.data import split_heldout

        train_pairs, heldout_pairs = split_heldout(report.kept, script_args.test_size, training_args.seed)
        print(f"{len(train_pairs)} pairs to train on, {len(heldout_pairs)} held out")
        """),
        md("""
        ## Load phi-2 in 4-bit with LoRA, and the DPO trainer

        `build_dpo_trainer` (`dpo/training.py`, what the recipe calls) gives TRL's `DPOTrainer`
        the model id, the 4-bit settings and the LoRA settings; TRL loads the 4-bit base and
        wraps it with the adapters. No reference model is passed: DPO measures the policy
        against a frozen reference $\\pi_{ref}$, and with LoRA that is the same base with the
        adapters switched off. One copy of phi-2 in memory serves both.
        """),
        code("""
        import bitsandbytes as bnb

        from dpo.training import build_dpo_trainer

        trainer = build_dpo_trainer(model_args, training_args, train_pairs, heldout_pairs, tokenizer)
        model = trainer.model
        n_4bit = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
        print(f"{n_4bit} linear layers in 4-bit; weights in memory: {model.get_memory_footprint() / 2**20:,.1f} MiB")
        """),
        md("""
        ## Train

        For each pair, DPO compares how much more likely the policy makes each answer than the
        reference does. The *implicit reward* of an answer is
        $\\beta \\log \\frac{\\pi_\\theta(y|x)}{\\pi_{ref}(y|x)}$, and the loss pushes the chosen
        answer's reward above the rejected one's: $-\\log \\sigma(r_{chosen} - r_{rejected})$.
        TRL logs these every step (`rewards/chosen`, `rewards/rejected`, `rewards/margins`,
        `rewards/accuracies`). `train_and_save` trains, evaluates on the held-out pairs and writes
        the adapter, the metrics and the curves to `OUTPUT_DIR`.
        """),
        code("""
        from dpo.training import train_and_save

        metrics = train_and_save(trainer, (script_args, training_args, model_args))
        for key in ("train_loss", "eval_loss", "eval_rewards/margins", "eval_rewards/accuracies"):
            print(f"{key:>24}: {metrics[key]:.4f}")
        """),
        md("""
        ## Reward curves

        What healthy training looks like: the **margin** (chosen minus rejected reward) grows; the
        **accuracy** (share of pairs whose chosen answer has the higher reward) rises towards 1;
        the rejected answers' **log-probability** falls faster than the chosen ones'. If the chosen
        log-probability falls steeply too, the model is learning to avoid both answers: lower the
        learning rate or raise `beta`. Dashed lines are the held-out pairs.
        """),
        code("""
        from IPython.display import Image, display

        display(Image(filename=str(OUTPUT_DIR / "training_curves.png")))
        """),
        md("""
        ## Before and after, side by side

        Held-out prompts, greedy decoding. The *before* answer is the same model with its
        adapters disabled, which is exactly phi-2 in 4-bit: the reference DPO trained against.
        """),
        code("""
        import html

        from IPython.display import HTML

        def answer(prompt, max_new_tokens=10 if SMOKE else 160):
            inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                     pad_token_id=tokenizer.eos_token_id)
            text = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            return text.split("\\nInstruct:")[0].strip()  # phi-2 may go on with a new question

        model.eval()
        rows = []
        for pair in heldout_pairs.select(range(2 if SMOKE else 4)):
            with model.disable_adapter():
                before = answer(pair["prompt"])
            rows.append((pair["prompt"], before, answer(pair["prompt"]), pair["chosen"].strip()))
        """),
        code("""
        cells = "".join(
            "<tr>" + "".join(f"<td style='text-align:left;vertical-align:top;white-space:pre-wrap'>{html.escape(c)}</td>" for c in row) + "</tr>"
            for row in rows
        )
        header = "".join(f"<th>{h}</th>" for h in ("prompt", "before: phi-2", "after: phi-2 + DPO adapter", "dataset's chosen answer"))
        display(HTML(f"<table><tr>{header}</tr>{cells}</table>"))
        """),
        md("""
        ## The saved adapter

        `OUTPUT_DIR` holds the LoRA adapter (a few tens of MB for phi-2), the tokenizer, every
        setting of the run (`resolved_config.yaml`, a valid `--config` to repeat it), the final
        metrics and the curves. Anyone with phi-2 can load the adapter on top of it with PEFT.
        """),
        code("""
        for path in sorted(OUTPUT_DIR.iterdir()):
            size = path.stat().st_size / 2**20 if path.is_file() else 0
            print(f"{path.name:32} {size:8.2f} MB" if path.is_file() else f"{path.name}/")
        """),
        md("""
        ## Merge the adapter for deployment

        Serving stacks are simplest with one plain model folder. `merge_and_unload` adds
        $\\frac{\\alpha}{r} B A$ into each base weight and drops the adapters. Merge into a
        **non-quantized** load of the base (bf16, fp16 or fp32), not the 4-bit one: adding the
        update into 4-bit codes would round most of it away. First free the training model.

        The adapter was trained against the 4-bit base, so the merged 16-bit model answers very
        slightly differently from the 4-bit model with the adapter; that is normal for QLoRA.
        """),
        code("""
        import gc

        del trainer, model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        """),
        code("""
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if precision.bf16 else torch.float16 if device == "cuda" else torch.float32
        base = AutoModelForCausalLM.from_pretrained(MODEL, dtype=dtype, device_map={"": device}, use_safetensors=True)
        with_adapter = PeftModel.from_pretrained(base, str(OUTPUT_DIR))
        probe = tokenizer(heldout_pairs[0]["prompt"], return_tensors="pt").to(device)
        with torch.no_grad():
            before_merge = with_adapter(**probe).logits.float()
        merged = with_adapter.merge_and_unload()
        with torch.no_grad():
            after_merge = merged(**probe).logits.float()
        print(f"{type(merged).__name__}; largest logit change from merging: {(after_merge - before_merge).abs().max():.2e}")
        """),
        md("""
        Save it as an ordinary model folder. It loads with `AutoModelForCausalLM.from_pretrained`
        alone (no PEFT) and serves with vLLM, TGI or `transformers` as is.
        """),
        code("""
        MERGED_DIR = OUTPUT_DIR.with_name(OUTPUT_DIR.name + "-merged")
        merged.save_pretrained(MERGED_DIR)
        tokenizer.save_pretrained(MERGED_DIR)
        print(sorted(p.name for p in MERGED_DIR.iterdir()))
        """),
        md("""
        ## Next

        * The same run from a terminal, all 3 epochs: `accelerate launch recipes/dpo_phi2.py`;
          any setting as a flag, e.g. `--beta 0.2`.
        * How the loss works, from the Bradley-Terry model to a training loop that matches TRL:
          `dpo_from_scratch.ipynb`.
        * Your own preference data: `dpo_your_dataset.ipynb`.
        """),
    ]


# ── 2. DPO from scratch ────────────────────────────────────────────────────────────────────────
def from_scratch() -> list[tuple[str, str]]:
    name = "dpo_from_scratch"
    return [
        md(
            """
        # DPO from scratch

        @BADGE@

        From the Bradley-Terry model of preferences to the DPO loss in five short steps. Then the
        loss and a plain PyTorch training loop from this repository (`dpo/loss.py`,
        `dpo/loop.py`) train a tiny language model, and the same batches go through TRL's
        `DPOTrainer`: the numbers agree. It all runs on a CPU in a minute or two.

        **Smoke mode.** With `DPO_SMOKE=1` in the environment the training runs are shorter; the
        test suite runs every notebook that way.
        """,
            BADGE=badge(name),
        ),
        INSTALL_MD,
        install_cell(),
        md(r"""
        ## 1. Preferences from rewards: Bradley-Terry

        People compare two answers $y_w$ (preferred, *chosen*) and $y_l$ (*rejected*) to a prompt
        $x$. The Bradley-Terry model says a hidden reward $r(x, y)$ decides how often $y_w$ wins:

        $$p(y_w \succ y_l \mid x) = \sigma\big(r(x, y_w) - r(x, y_l)\big), \qquad \sigma(z) = \frac{1}{1 + e^{-z}}.$$

        RLHF fits a reward model $r_\phi$ to the comparisons by maximum likelihood, that is by
        minimising $-\log \sigma\big(r_\phi(x, y_w) - r_\phi(x, y_l)\big)$ over the data.
        """),
        md(r"""
        ## 2. RLHF's objective has an exact solution

        RLHF then tunes the policy $\pi$ for reward, with a penalty for drifting from the
        reference model $\pi_{ref}$ (the model before tuning), of strength $\beta$:

        $$\max_\pi \; \mathbb{E}_{x,\; y \sim \pi(\cdot \mid x)}\big[r(x, y)\big] \;-\; \beta\, \mathrm{KL}\big[\pi(\cdot \mid x) \,\|\, \pi_{ref}(\cdot \mid x)\big].$$

        Its optimum has a closed form:

        $$\pi^*(y \mid x) = \frac{1}{Z(x)}\, \pi_{ref}(y \mid x)\, \exp\!\big(r(x, y) / \beta\big), \qquad Z(x) = \sum_y \pi_{ref}(y \mid x)\, \exp\!\big(r(x, y)/\beta\big).$$

        $Z(x)$ sums over every possible text, so nobody can compute it; that is why RLHF
        samples and uses PPO instead.
        """),
        md(r"""
        ## 3. A reward is a policy in disguise

        Take the logarithm and solve for the reward:

        $$r(x, y) = \beta \log \frac{\pi^*(y \mid x)}{\pi_{ref}(y \mid x)} + \beta \log Z(x).$$

        Put that into Bradley-Terry. Both answers share the prompt, so $\beta \log Z(x)$ appears
        twice and cancels in the difference:

        $$p(y_w \succ y_l \mid x) = \sigma\!\left(\beta \log \frac{\pi^*(y_w \mid x)}{\pi_{ref}(y_w \mid x)} - \beta \log \frac{\pi^*(y_l \mid x)}{\pi_{ref}(y_l \mid x)}\right).$$

        The preferences are now a function of the policy alone.
        """),
        md(r"""
        ## 4. The DPO loss

        So fit the policy $\pi_\theta$ to the preferences directly, by maximum likelihood:

        $$\mathcal{L}_{DPO}(\pi_\theta; \pi_{ref}) = -\,\mathbb{E}_{(x, y_w, y_l)} \left[\log \sigma\!\left(\beta \log \frac{\pi_\theta(y_w \mid x)}{\pi_{ref}(y_w \mid x)} - \beta \log \frac{\pi_\theta(y_l \mid x)}{\pi_{ref}(y_l \mid x)}\right)\right].$$

        No reward model, no sampling: a classification loss on log-probabilities. The term
        $\hat r_\theta(x, y) = \beta \log \frac{\pi_\theta(y \mid x)}{\pi_{ref}(y \mid x)}$ is
        the **implicit reward**. TRL logs its batch means as `rewards/chosen` and
        `rewards/rejected`, their difference as `rewards/margins`, and the share of pairs with
        $\hat r(y_w) > \hat r(y_l)$ as `rewards/accuracies`.
        """),
        md(r"""
        ## 5. What the gradient does

        $$\nabla_\theta \mathcal{L}_{DPO} = -\beta\, \mathbb{E}\Big[\underbrace{\sigma\big(\hat r_\theta(x, y_l) - \hat r_\theta(x, y_w)\big)}_{\text{large when the pair is ranked wrong}} \big(\nabla_\theta \log \pi_\theta(y_w \mid x) - \nabla_\theta \log \pi_\theta(y_l \mid x)\big)\Big].$$

        Raise the chosen answer's likelihood, lower the rejected one's, and weigh each pair by how
        wrongly the implicit reward ranks it. Pairs already ranked right count little.
        """),
        md("""
        ## The loss on a few numbers

        `dpo_loss` (`dpo/loss.py`) takes the summed log-probabilities of each answer under the
        policy and under the reference. Two pairs: the first ranked right (chosen up, rejected
        down against the reference), the second ranked wrong.
        """),
        code("""
        import math

        import torch
        import torch.nn.functional as F

        from dpo.loss import dpo_loss

        beta = 0.1
        policy_chosen, policy_rejected = torch.tensor([-12.0, -30.0]), torch.tensor([-15.0, -26.0])
        reference_chosen, reference_rejected = torch.tensor([-13.0, -29.0]), torch.tensor([-14.0, -27.0])

        out = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=beta)
        by_hand = -F.logsigmoid(beta * ((policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)))
        print("dpo_loss:", out.losses, "\\nby hand: ", by_hand)
        print("implicit rewards: chosen", out.chosen_rewards, "rejected", out.rejected_rewards)
        """),
        md("""
        When the policy *is* the reference, every log-ratio and every implicit reward is 0, and
        the loss is $\\log 2 \\approx 0.693$ for every pair: that is where training starts.
        """),
        md(r"""
        ## $\log \pi(y \mid x)$ from a language model

        A causal language model gives every next token a probability, so the log-probability of
        a whole answer is the sum over its tokens,
        $\log \pi(y \mid x) = \sum_t \log \pi(y_t \mid x, y_{<t})$. Prompt and padding tokens are not
        scored. The model here is a randomly initialised 2-layer Phi (phi-2's architecture, 0.1M
        parameters, `dpo/tiny.py`); the pairs have truthy-dpo's shape, in phi-2's prompt format.
        """),
        code("""
        import copy

        from dpo.formats import phi2_qa_format
        from dpo.tiny import build_tiny_model, build_tokenizer, truthy_like_rows

        SMOKE = os.environ.get("DPO_SMOKE") == "1"
        STEPS = 12 if SMOKE else 60  # optimizer steps in each training run below

        tokenizer = build_tokenizer()
        policy = build_tiny_model(tokenizer, seed=0)
        pairs = [phi2_qa_format(row) for row in truthy_like_rows(32)]
        print(f"{sum(p.numel() for p in policy.parameters()):,} parameters, {len(pairs)} pairs, e.g.\\n")
        print(pairs[0]["prompt"] + pairs[0]["chosen"])
        """),
        md("""
        Tokenize as TRL does: prompt + answer + end-of-text token, where the answer's tokens are
        those after the prompt's. `collate` stacks a batch of $B$ pairs into $2B$ padded rows,
        the chosen rows first, with a mask marking the answer tokens.
        """),
        code("""
        from dpo.loop import collate

        def tokenize(pair):
            prompt_ids = tokenizer(pair["prompt"])["input_ids"]
            full = {k: tokenizer(pair["prompt"] + pair[k] + tokenizer.eos_token)["input_ids"] for k in ("chosen", "rejected")}
            assert all(ids[: len(prompt_ids)] == prompt_ids for ids in full.values())
            return {"prompt_ids": prompt_ids, **{f"{k}_ids": ids[len(prompt_ids):] for k, ids in full.items()}}

        BATCH = 4
        examples = [tokenize(pair) for pair in pairs]
        batches = [collate(examples[i : i + BATCH], tokenizer.eos_token_id) for i in range(0, len(examples), BATCH)]
        print({k: tuple(v.shape) for k, v in batches[0].items()})
        """),
        code("""
        from dpo.loss import sequence_logps

        batch = batches[0]
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)  # -100: not scored
        with torch.no_grad():
            seq = sequence_logps(policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, labels)

        answer = seq.mask[0]  # row 0: the first chosen answer
        for token_id, logp in zip(batch["input_ids"][0, 1:][answer], seq.token_logps[0][answer]):
            print(f"{tokenizer.decode([token_id])!r:>16} {logp:7.3f}")
        print(f"log π(y|x) = {seq.logps[0]:.2f}  (a random model: about log(1/{len(tokenizer)}) = {-math.log(len(tokenizer)):.2f} per token)")
        """),
        md("""
        ## Training with a plain PyTorch loop

        One step of `dpo.loop.train`: the policy scores the $2B$ rows (with gradients); the
        reference scores them too (without: a frozen copy of the starting model, or for a LoRA
        model the same model with its adapters disabled); `dpo_loss`; backward; clip the gradient
        norm at 1; AdamW with a linear warm-up and decay. These are DPOConfig's defaults, so the
        loop can be compared with TRL step by step. First, step 0:
        """),
        code("""
        from dpo.loop import dpo_batch_loss, make_reference, train

        initial = copy.deepcopy(policy)  # the starting point, for TRL below
        loss, metrics = dpo_batch_loss(policy, make_reference(policy), batches[0], beta=0.1)
        print(f"step 0: loss {loss:.4f} (log 2 = {math.log(2):.4f}), reward margin {metrics['rewards/margins']}")
        """),
        code("""
        HYPER = dict(beta=0.1, lr=1e-3, warmup_steps=2)
        ours = train(policy, batches, num_steps=STEPS, progress=False, **HYPER)

        print(" step    loss  chosen  rejected  margin  accuracy")
        for step, h in enumerate(ours, start=1):
            if step % max(1, STEPS // 6) == 0 or step == 1:
                print(f"{step:5d} {h['loss']:7.4f} {h['rewards/chosen']:7.3f} {h['rewards/rejected']:9.3f} "
                      f"{h['rewards/margins']:7.3f} {h['rewards/accuracies']:9.2f}")
        """),
        md("""
        ## The same batch through TRL's `DPOTrainer`

        Give TRL the trained policy, the starting model as its reference, and the same pairs as
        text. TRL tokenizes and collates them itself: its first batch is ours, token for token,
        and its loss on it is ours. (TRL computes log-probabilities with a fused, chunked kernel
        and we use the full logits, so they agree to float32 round-off, not bit for bit.)
        """),
        code("""
        from datasets import Dataset
        from transformers import PrinterCallback

        from dpo.compat import DPOConfig, DPOTrainer

        def trl_trainer(model, max_steps=1):
            args = DPOConfig(
                output_dir="outputs/dpo_from_scratch", beta=HYPER["beta"], learning_rate=HYPER["lr"],
                warmup_steps=HYPER["warmup_steps"], max_steps=max_steps, per_device_train_batch_size=BATCH,
                train_sampling_strategy="sequential", optim="adamw_torch", logging_steps=1, save_strategy="no",
                report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False, disable_tqdm=True,
            )
            trainer = DPOTrainer(model=copy.deepcopy(model), ref_model=copy.deepcopy(initial), args=args,
                                 train_dataset=Dataset.from_list(pairs), processing_class=tokenizer)
            trainer.remove_callback(PrinterCallback)  # we print our own comparison instead of every log line
            return trainer
        """),
        code("""
        trainer = trl_trainer(policy)
        trl_batch = next(iter(trainer.get_train_dataloader()))
        same_tokens = all(torch.equal(trl_batch[k], batches[0][k]) for k in ("input_ids", "attention_mask", "completion_mask"))
        trl_loss = trainer.compute_loss(trainer.model, trl_batch).item()
        our_loss = dpo_batch_loss(policy, initial, batches[0], beta=HYPER["beta"])[0].item()
        print(f"same tokens: {same_tokens}\\nTRL's loss:  {trl_loss:.7f}\\nour loss:    {our_loss:.7f}")
        assert same_tokens and abs(trl_loss - our_loss) <= 1e-5 * abs(trl_loss)
        """),
        md("""
        ## A whole run, twice

        Now TRL trains from the same starting weights, on the same batches in the same order,
        with the same optimizer and schedule. Its logged loss and rewards follow our loop step by
        step.
        """),
        code("""
        trainer = trl_trainer(initial, max_steps=STEPS)
        trainer.train()
        theirs = [log for log in trainer.state.log_history if "rewards/margins" in log]
        keys = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins")
        gap = max(abs(a[k] - b[k]) for a, b in zip(ours, theirs) for k in keys)
        print(f"{len(theirs)} steps each; largest difference in loss or rewards over the run: {gap:.1e}")
        assert len(theirs) == STEPS and gap < 1e-4
        """),
        md("""
        ## Implicit rewards over training

        The chosen answers' implicit reward rises, the rejected answers' falls, and the margin
        between them grows while the loss falls from $\\log 2$. Lines: our loop; dots: TRL. With
        real models both rewards often fall, the rejected faster: the margin is what DPO
        optimises, not either reward alone.
        """),
        code("""
        import matplotlib.pyplot as plt

        steps = range(1, STEPS + 1)
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
        for key, color in (("rewards/chosen", "tab:green"), ("rewards/rejected", "tab:red"), ("rewards/margins", "tab:blue")):
            left.plot(steps, [h[key] for h in ours], color=color, label=key.split("/")[1])
            left.plot(steps, [h[key] for h in theirs], "o", color=color, markersize=3)
        left.set(title="implicit rewards, β log π/π_ref (lines: ours, dots: TRL)", xlabel="step")
        left.legend()
        right.plot(steps, [h["loss"] for h in ours], label="ours")
        right.plot(steps, [h["loss"] for h in theirs], "o", markersize=3, label="TRL")
        right.axhline(math.log(2), color="gray", linestyle=":", label="log 2")
        right.set(title="DPO loss", xlabel="step")
        right.legend()
        plt.show()
        """),
        md("""
        ## Next

        * `dpo/loss.py` also has IPO, hinge (SLiC), robust and conservative DPO, f-divergences and
          more, each checked against TRL in `tests/test_loss_agreement.py`.
        * `dpo_phi2_qlora.ipynb`: the same loss on phi-2, in 4-bit with LoRA, where the reference
          is the model with its adapters disabled.
        """),
    ]


# ── 3. your own data ───────────────────────────────────────────────────────────────────────────
def your_dataset() -> list[tuple[str, str]]:
    name = "dpo_your_dataset"
    return [
        md(
            """
        # DPO on your own preference data

        @BADGE@

        Bring pairs of answers, one preferred (*chosen*) and one not (*rejected*), for each prompt.
        This notebook loads them, runs the **data doctor** (every row checked before any GPU time
        is spent), shows the rows as the model will see them, and launches the generic recipe
        `recipes/dpo_any.py`: QLoRA DPO of a causal language model, here microsoft/phi-2, on one GPU.

        In Colab: *Runtime > Change runtime type > T4 GPU* (or better), then *Run all*.

        @SMOKE@
        """,
            BADGE=badge(name),
            SMOKE=SMOKE_MD,
        ),
        INSTALL_MD,
        install_cell(),
        md("""
        ## Your data

        `DATASET` is a Hub dataset id or a file: `.jsonl`, `.json`, `.parquet` or `.csv` (on Colab,
        upload it in the *Files* pane and give its name). These shapes are recognised from the
        column names, and extra columns are ignored:

        | layout | columns | for example |
        |---|---|---|
        | text pairs | `prompt` (or `question`, `instruction`), `chosen`, `rejected`, optional `system` | jondurbin/truthy-dpo-v0.1, Intel/orca_dpo_pairs |
        | conversations | `chosen`, `rejected` as message lists `[{"role": ..., "content": ...}]`, optional `prompt` | trl-lib/ultrafeedback_binarized |
        | transcripts | `chosen`, `rejected` as `"\\n\\nHuman: ... \\n\\nAssistant: ..."` | Anthropic/hh-rlhf |

        Other column names: set them in `COLUMNS`, e.g. `Columns(prompt="query", chosen="good", rejected="bad")`.
        """),
        code("""
        from pathlib import Path

        from dpo.pairs import Columns

        MODEL = "microsoft/phi-2"
        DATASET = "Intel/orca_dpo_pairs"  # or your file: "my_pairs.jsonl"
        COLUMNS = Columns()  # None everywhere: detect the columns
        OUTPUT_DIR = Path("outputs/dpo_your_dataset")

        SMOKE = os.environ.get("DPO_SMOKE") == "1"
        print(f"model: {MODEL}\\ndata:  {DATASET}\\nsmoke mode: {SMOKE}")
        """),
        md("""
        In smoke mode a tiny offline model stands in for phi-2, and the data is a small file
        written here, shaped like many home-made ones: a `question` column instead of `prompt`,
        and a few bad rows that the doctor will catch.
        """),
        code("""
        if SMOKE:
            from dpo.tiny import save_tiny_model, truthy_like_rows, write_jsonl

            MODEL = str(save_tiny_model("outputs/smoke/tiny-phi"))
            rows = [{"system": r["system"], "question": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
                    for r in truthy_like_rows(20)]
            rows += [
                {**rows[0], "chosen": ""},                     # an empty answer
                {**rows[1], "rejected": rows[1]["chosen"]},    # both answers the same
                dict(rows[2]),                                 # a duplicate of an earlier row
            ]
            DATASET = str(write_jsonl(rows, "outputs/smoke/my_pairs.jsonl"))
            print(f"wrote {len(rows)} rows to {DATASET}")
        """),
        md("""
        ## Load it
        """),
        code("""
        from dpo.data import load_preference_data

        raw = load_preference_data(DATASET)
        print(raw)
        print({k: (v[:120] if isinstance(v, str) else v) for k, v in raw[0].items()})
        """),
        md("""
        ## The data doctor

        `check_data` (`dpo/doctor.py`, what every recipe runs first) detects the layout, converts
        every row to TRL's `prompt` / `chosen` / `rejected` format and checks it:

        * a **schema error** (a missing field, a number where text should be, a malformed JSON
          line) stops with the file, the row and the field;
        * **degenerate rows** are dropped and counted: an empty answer, both answers the same,
          a duplicate, a prompt that alone fills `max_length` (which TRL would drop silently);
        * **lengths** are counted in tokens exactly as TRL will tokenize, with the share of pairs
          that `max_length` truncates.

        phi-2 has no chat template, so the doctor gives its tokenizer a plain
        `Human: ... Assistant: ...` one, with a warning; a chat model's own template is used as is.
        """),
        code("""
        from dpo.doctor import check_data
        from dpo.model import load_tokenizer

        MAX_LENGTH = 1024  # prompt + answer tokens, as in recipes/dpo_any.yaml
        tokenizer = load_tokenizer(MODEL)
        report = check_data(raw, DATASET, tokenizer, columns=COLUMNS, max_length=MAX_LENGTH)
        print(report.summary())
        """),
        code("""
        from IPython.display import Image, display

        from dpo.plots import plot_lengths

        display(Image(filename=str(plot_lengths(report, OUTPUT_DIR / "data_lengths.png"))))
        """),
        md("""
        A schema error, for comparison: one row whose answer is a number. The doctor stops and
        says where.
        """),
        code("""
        from dpo.errors import UserError
        from dpo.tiny import write_jsonl

        broken = write_jsonl([{"prompt": "2 + 2?", "chosen": "Four.", "rejected": "Five."},
                              {"prompt": "3 + 3?", "chosen": 6, "rejected": "Seven."}], "outputs/broken.jsonl")
        try:
            check_data(load_preference_data(str(broken)), str(broken), tokenizer)
        except UserError as err:
            print("error:", err)
        """),
        md("""
        ## The converted rows

        What TRL will train on: the prompt as a list of messages, and each answer as the
        assistant's reply. The chat template turns them into the text below; the model learns
        from the answer tokens only, and the end-of-text token teaches it to stop.
        """),
        code("""
        for pair in report.kept.select(range(2)):
            print("prompt:  ", pair["prompt"])
            print("chosen:  ", pair["chosen"])
            print("rejected:", pair["rejected"], "\\n")
        print("--- the first pair as the model sees it:")
        print(report.example["prompt"] + report.example["chosen"])
        """),
        md("""
        ## Launch the generic recipe

        `recipes/dpo_any.py` with its settings in `recipes/dpo_any.yaml` (4-bit base, LoRA on
        every linear layer, beta 0.1); the list below overrides fields, as command-line flags
        would. It is a short first run, 20 steps of 16 pairs, enough to see the reward margin
        move (roughly half an hour on a T4). Leave out `max_steps` and `gradient_accumulation_steps`
        for the recipe's full epoch of 64-pair steps. The cell prints the same run as a command line.
        """),
        code("""
        import runpy
        from pathlib import Path

        import dpo

        RECIPE = Path(dpo.__file__).resolve().parents[1] / "recipes" / "dpo_any.py"  # in the repository checkout
        recipe = runpy.run_path(str(RECIPE))  # its definitions; main() runs in-process below

        settings = dict(model_name_or_path=MODEL, dataset_name=DATASET, output_dir=OUTPUT_DIR, max_length=MAX_LENGTH,
                        max_steps=20, gradient_accumulation_steps=8, learning_rate=5e-5, test_size=0.01, eval_steps=10)
        settings |= {f"{role}_column": column for role, column in vars(COLUMNS).items() if column}
        if SMOKE:  # a few steps of 4 pairs on the tiny model
            settings |= dict(max_steps=6, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                             learning_rate=5e-3, test_size=0.25, eval_steps=3)
        flags = [arg for key, value in settings.items() for arg in (f"--{key}", str(value))]
        print("python recipes/dpo_any.py", " ".join(flags))
        """),
        code("""
        trainer = recipe["main"](flags)
        """),
        md("""
        ## Results

        The recipe wrote the adapter, every setting of the run (`resolved_config.yaml`), the
        metrics and these curves to `OUTPUT_DIR`. A growing reward margin and a reward accuracy
        above 0.5 on the held-out pairs mean the model learned your preferences.
        """),
        code("""
        import json

        metrics = json.loads((OUTPUT_DIR / "final_metrics.json").read_text())
        print({k: round(v, 4) for k, v in metrics.items() if k.startswith("eval_rewards/")})
        display(Image(filename=str(OUTPUT_DIR / "training_curves.png")))
        """),
        md("""
        ## Next

        * Check a dataset alone, without a GPU: `python -m dpo.doctor <your data> --model_name_or_path microsoft/phi-2`.
        * The full run from a terminal: `accelerate launch recipes/dpo_any.py --dataset_name <your data>`;
          any YAML field as a flag.
        * Compare answers before and after training, and merge the adapter: `dpo_phi2_qlora.ipynb`.
        """),
    ]


NOTEBOOKS = {
    "dpo_phi2_qlora": (phi2_qlora, True),
    "dpo_from_scratch": (from_scratch, False),
    "dpo_your_dataset": (your_dataset, True),
}


def build(name: str) -> nbformat.NotebookNode:
    """The notebook `name`, with deterministic cell ids and no outputs."""
    make, gpu = NOTEBOOKS[name]
    cells = []
    for i, (kind, source) in enumerate(make()):
        cell_id = f"{name[:40]}-{i:02d}"
        if kind == "markdown":
            cells.append(nbformat.v4.new_markdown_cell(source, id=cell_id))
        else:
            cells.append(nbformat.v4.new_code_cell(source, id=cell_id))
    metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
        "colab": {"provenance": [], "toc_visible": True},
    }
    if gpu:  # Colab opens the notebook on a GPU runtime
        metadata["accelerator"] = "GPU"
        metadata["colab"]["gpuType"] = "T4"
    nb = nbformat.v4.new_notebook(cells=cells, metadata=metadata)
    nbformat.validate(nb)
    return nb


def render(name: str) -> str:
    """The exact text of notebooks/<name>.ipynb."""
    return nbformat.writes(build(name)) + "\n"


def main(argv: list[str]) -> int:
    stale = []
    for name in NOTEBOOKS:
        path = HERE / f"{name}.ipynb"
        text = render(name)
        if "--check" in argv:
            if not path.is_file() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run python notebooks/build_notebooks.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
