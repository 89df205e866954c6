"""The reward that ranks sampled answers: a Python function 'module:function' taking (prompt, completion)
-> float, or a sequence-classification reward model read through its own chat template.

A reward model is checked before its weights load (dpo.evaluation.judge.check_reward_model: a
*ForSequenceClassification architecture, one score, safetensors): a causal LM given instead would get a
random score head, and its rankings would be noise. The text it scores is shown once in the log, so a
template that does not fit (another model's special tokens, no assistant turn) is seen, not silent.
"""

from __future__ import annotations

import importlib
import math
import numbers
import sys
from pathlib import Path

import torch

from dpo.errors import UserError
from dpo.files import write_text_atomic
from dpo.log import log
from dpo.rounds.settings import FUNCTION


def _as_messages(prompt) -> list[dict]:
    return list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


def reward_model_text(tokenizer, prompt, answer: str) -> str:
    """What the reward model reads: the conversation and the answer through its own chat template, else
    the prompt's text followed by the answer."""
    if getattr(tokenizer, "chat_template", None):
        messages = [*_as_messages(prompt), {"role": "assistant", "content": answer}]
        return tokenizer.apply_chat_template(messages, tokenize=False)
    if isinstance(prompt, list):
        return "\n".join(f"{m['role']}: {m['content']}" for m in prompt) + "\nassistant: " + answer
    return prompt + answer


# A reward must keep every number made from it finite in float64: the mean and best-of-K over all of a
# round's answers, the chosen - rejected margins, and the held-out 95% interval, whose variance sums squared
# differences over n answers. With |r| <= 1e100 a squared difference is at most 4e200, and a sum of n of
# them stays below float64's largest number (1.8e308) for any n below 1e107, far more answers than any run
# draws. Rewards of 1.7e308 (finite) made the mean +-inf and the interval NaN, and 10**400 (a Python int)
# raised OverflowError. No ranking needs a larger scale: dividing the reward by a constant ranks the same.
REWARD_BOUND = 1e100


def reward_value(value) -> tuple[float | None, str | None]:
    """(the reward as a plain float, None), or (None, why `value` is no reward). Any real number is taken:
    int, float, numpy's scalars, and a 0-d numpy array or torch tensor (its .item()); not a boolean, text,
    a tensor of several numbers, NaN, an infinity, or a magnitude beyond REWARD_BOUND."""
    if hasattr(value, "ndim") and hasattr(value, "item") and not isinstance(value, numbers.Number):
        if value.ndim != 0:  # a numpy array or torch tensor of several numbers (numpy scalars have ndim 0)
            return None, f"a {type(value).__name__} of shape {tuple(value.shape)}, not one number"
        value = value.item()  # a plain Python number (or bool, refused below)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None, f"{'a boolean' if isinstance(value, bool) else type(value).__name__}, not a real number"
    try:
        number = float(value)
    except OverflowError:  # an int beyond float64 (10**400)
        return None, "too large for a float64"
    if not math.isfinite(number):
        return None, "not finite"
    if abs(number) > REWARD_BOUND:
        return None, f"beyond +-{REWARD_BOUND:g}"
    return number, None


BOUND_REASON = (
    f"a reward must be a real number within +-{REWARD_BOUND:g} (so the means, margins and intervals over all "
    "answers stay finite; scale it down if it is larger), returned as a float, an int, a numpy number or a 0-d "
    "tensor (.item())"
)


def _shown(value, width: int = 40) -> str:
    """repr(value), cut to `width` characters (10**400 has 401 digits), or a chat prompt's last message."""
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        value = value[-1].get("content", value)
    text = repr(value)
    return text if len(text) <= width else f"{text[:width]}... ({len(text)} characters)"


def answer_label(i: int) -> str:
    """How an answer is named when the caller gives no labels: its place in the call."""
    return f"answer {i + 1}"


TRACEBACK_FILE = "reward_traceback.txt"


def user_code_failure(what: str, err: BaseException, run_folder: str | Path) -> UserError:
    """One line for an exception raised by the user's reward code (`what`: where), its whole traceback
    saved to run_folder/TRACEBACK_FILE, which the line names. A sys.exit inside it is said as such."""
    import traceback

    if isinstance(err, SystemExit):
        happened = f"called sys.exit({err.code!r}), which would have ended the run"
    else:
        message = str(err).strip().splitlines()
        happened = f"raised {type(err).__name__}" + (f": {message[0][:200]}" if message else "")
    path = Path(run_folder) / TRACEBACK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, f"{what} {happened}\n\n" + "".join(traceback.format_exception(err)))  # whole
    return UserError(f"{what} {happened}; its traceback is in {path}")


def in_current_folder(module_name: str) -> Path | None:
    """The current folder when it holds `module_name`'s top package or module (my_reward.py, or my_pkg/)."""
    top = module_name.split(".")[0]
    here = Path.cwd()
    return here if (here / f"{top}.py").is_file() or (here / top / "__init__.py").is_file() else None


def _import_module(spec: str, module_name: str, run_folder):
    """`module_name` as Python imports it, else from the current folder: `python recipes/dpo_rounds.py` puts
    recipes/ on sys.path, not the folder the command was typed in, where a user's reward module usually is."""
    try:
        try:
            return importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            here = in_current_folder(module_name)
            if here is None or err.name != module_name.split(".")[0]:
                raise
            sys.path.append(str(here))  # last: a module of the same name elsewhere on the path still comes first
            module = importlib.import_module(module_name)
            log(f"reward {spec}: {module_name} imported from the current folder {here}")  # said once it is
            return module
    except ModuleNotFoundError as err:
        if err.name is None or not (module_name + ".").startswith(err.name + "."):
            raise user_code_failure(f"reward {spec}: importing {module_name}", err, run_folder) from None
        raise UserError(
            f"reward {spec}: cannot import {module_name} ({err}): neither on the Python path nor a file "
            f"{module_name.split('.')[0]}.py in the current folder {Path.cwd()}; run from the folder that holds it, "
            "or add that folder to PYTHONPATH (docs/rewards.md)"
        ) from None
    except KeyboardInterrupt:  # Ctrl-C while it imports: a stop, not the module's error
        raise
    except BaseException as err:  # a syntax error, an exception or sys.exit at import time
        raise user_code_failure(f"reward {spec}: importing {module_name}", err, run_folder) from None


def source_sha256(spec: str, module, function) -> str:
    """The identity of a reward function's code: sha256 of the spec and the bytes of its module's file and of the
    file its code is in (a decorated or re-exported function), else of inspect.getsource. Code in other modules
    that it calls is not covered."""
    import hashlib
    import inspect

    digest = hashlib.sha256(spec.encode())
    files = {getattr(module, "__file__", None), getattr(getattr(function, "__code__", None), "co_filename", None)}
    readable = sorted(f for f in files if f and Path(f).is_file())
    for file in readable:
        digest.update(Path(file).read_bytes())
    if not readable:
        digest.update(inspect.getsource(function).encode())
    return digest.hexdigest()


class FunctionReward:
    """A Python function (prompt, completion) -> float. Its exceptions, a sys.exit in it, and values that are
    no reward (reward_value) end the run with one line naming the answer; tracebacks go to the run folder."""

    def __init__(self, spec: str, run_folder: str | Path):
        module_name, name = spec.split(":")
        self.run_folder = Path(run_folder)
        module = _import_module(spec, module_name, self.run_folder)
        function = getattr(module, name, None)
        if not callable(function):
            raise UserError(f"reward {spec}: {module_name} has no function {name}")
        self.spec, self.function = spec, function
        self.source_sha256 = source_sha256(spec, module, function)  # read now: the source just imported

    def describe(self) -> str:
        return f"the function {self.spec}(prompt, completion)"

    def identity(self) -> str:
        """What scores: sha256 of the function's source (source_sha256), recorded with every scored sample."""
        return self.source_sha256

    def _call(self, prompt, answer, where: str):
        try:
            return self.function(prompt, answer)
        except KeyboardInterrupt:  # Ctrl-C while it runs: a stop, not the reward's error
            raise
        except BaseException as err:  # every exception, and SystemExit (sys.exit(0) ended the run with exit 0)
            raise user_code_failure(
                f"reward {self.spec}, called for {where} (answer {_shown(answer)}),", err, self.run_folder
            ) from None

    def __call__(self, prompts: list, answers: list[str], label=answer_label) -> list[float]:
        """Scores of answers[i] to prompts[i]; `label(i)` names answer i in a message (round 2's prompt 3, answer 1)."""
        scores = []
        for i, (prompt, answer) in enumerate(zip(prompts, answers)):
            value = self._call(prompt, answer, label(i))
            number, problem = reward_value(value)
            if problem:
                raise UserError(
                    f"reward {self.spec} returned {_shown(value)} for {label(i)} (prompt {_shown(prompt)}, answer "
                    f"{_shown(answer)}): {problem}; {BOUND_REASON}"
                )
            scores.append(number)
        return scores


class ModelReward:
    """A sequence-classification reward model and its tokenizer (loaded by `load`, after `check`)."""

    def __init__(self, name: str, batch_size: int = 8):
        from dpo.evaluation.judge import check_reward_model

        check_reward_model(name, "reward")  # before any weights load; also: safetensors only
        self.name, self.batch_size, self.model, self.tokenizer, self.shown = name, batch_size, None, None, False
        self.known_identity = None  # hashing a model's weights once is enough

    def describe(self) -> str:
        return f"the reward model {self.name}"

    def load(self, device) -> None:
        from dpo.evaluation.judge import load_reward_model

        if self.model is None:
            self.model, self.tokenizer = load_reward_model(self.name, device, "reward")

    def identity(self) -> str:
        """What scored: a local folder's weights and config (sha256 of each file), a hub model's resolved commit."""
        if self.known_identity is None:
            self.known_identity = self._identity()
        return self.known_identity

    def _identity(self) -> str:
        import hashlib

        from dpo.files import file_sha256

        folder = Path(self.name).expanduser()
        if not folder.is_dir():
            from huggingface_hub import hf_hub_download

            from dpo.errors import hub_error

            try:  # the snapshot folder config.json resolves to is named by its commit
                return Path(hf_hub_download(self.name, "config.json")).parent.name
            except Exception as err:
                raise hub_error("reward model", self.name, err, "pass a local copy's folder as reward") from None
        files = sorted([*folder.glob("*.safetensors"), folder / "config.json"])
        return hashlib.sha256("".join(f"{f.name} {file_sha256(f)}\n" for f in files).encode()).hexdigest()

    @torch.no_grad()
    def __call__(self, prompts: list, answers: list[str], label=answer_label) -> list[float]:
        self.load(torch.device("cpu"))
        texts = [reward_model_text(self.tokenizer, p, a) for p, a in zip(prompts, answers)]
        if texts and not self.shown:
            template = (
                "its own chat template" if getattr(self.tokenizer, "chat_template", None) else "no chat template"
            )
            log(f"reward model {self.name} ({template}) reads, e.g.: {texts[0]!r}")
            self.shown = True
        device = next(self.model.parameters()).device
        scores = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[i : i + self.batch_size], return_tensors="pt", padding=True, truncation=True)
            scores += self.model(**batch.to(device)).logits[:, 0].float().tolist()
        for i, score in enumerate(scores):
            if reward_value(score)[1]:  # NaN or infinite: broken weights, or an input the model overflows on
                raise UserError(
                    f"reward model {self.name} scored {label(i)} {score} (prompt {_shown(prompts[i])}, answer "
                    f"{_shown(answers[i])}): not a finite number, so answers cannot be ranked by it; check the "
                    "model's weights (a model that scores NaN is damaged or was trained into overflow)"
                )
        return scores


def make_reward(spec: str, run_folder: str | Path):
    """The reward named by the `reward` setting; a model is checked (not loaded) here, a function's module
    imported (a failure's traceback saved in `run_folder`)."""
    if FUNCTION.fullmatch(spec) and not Path(spec).expanduser().exists():
        return FunctionReward(spec, run_folder)
    return ModelReward(spec)


def check_finished_rounds_scored_by(output_dir: Path, reward) -> None:
    """Before any weights load: the folder's finished rounds (round-N/round.json) were scored by this reward, the
    same source or weights (their recorded `scored_by`). Another version: refused, since a further round would
    train on rewards the earlier ones did not (and the summary would mix both). A round written before the
    identity was recorded is said in the log, not checked."""
    from dpo.files import read_json_object
    from dpo.rounds.summary import ROUND_SHAPE, finished_rounds

    done = finished_rounds(output_dir)
    if not done:  # a new folder: nothing to compare (and a hub reward model's commit is not asked for)
        return
    identity, other, unknown = reward.identity(), [], []
    for n in done:
        path = Path(output_dir) / f"round-{n}" / "round.json"
        recorded = read_json_object(path, ROUND_SHAPE, f"delete {path} to finish round {n} again").get("scored_by")
        (unknown if recorded is None else other if recorded != identity else []).append(n)
    if unknown:
        log(
            f"rounds {unknown} in {output_dir} record no reward identity (written before it was recorded): not checked"
        )
    if other:
        raise UserError(
            f"--output_dir {output_dir}: round(s) {', '.join(map(str, other))} were scored by another version of "
            f"{reward.describe()} (its source or weights changed since; now {identity[:12]}): later rounds would "
            "train on other rewards than those; use another --output_dir, or restore the reward as it was"
        )
