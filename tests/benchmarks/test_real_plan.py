"""`make real`'s plan (benchmarks/real_alignment.py, real_plan.py, real_phases.py) at a tiny scale: a tiny random
model, a handful of real HH-RLHF pairs, 2 steps per phase. Work is counted (phases done, steps trained, pairs
scored), never timed.

- every phase runs and the results are written only at the end; a second run redoes nothing;
- a kill after phase N resumes without redoing N; a kill inside the main run resumes from its last checkpoint
  and ends exactly where an uninterrupted run ends;
- a changed input (a setting, the data) is refused in one line naming the phase folder, nothing overwritten.
"""

from __future__ import annotations

import gzip
import json
import sys

import pytest
from helpers import HH_FILE, ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import real_alignment  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Killed(Exception):
    """Stands for the process being killed at a chosen point."""


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory):
    """The tiny random model with a minimal chat template (tokenize_pair renders pairs with it)."""
    from dpo.offline.tiny import build_tiny_model, build_tokenizer

    folder = tmp_path_factory.mktemp("tiny-chat")
    tokenizer = build_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    build_tiny_model(tokenizer, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def data(tmp_path):
    """The 16 shortest of the first 200 real HH-RLHF harmless-base pairs, as a .jsonl file."""
    with gzip.open(HH_FILE, "rt") as f:
        rows = [json.loads(next(f)) for _ in range(200)]
    rows = sorted(rows, key=lambda r: len(r["chosen"]) + len(r["rejected"]))[:16]
    path = tmp_path / "hh.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def argv(tiny_chat_model, data, tmp_path, **changed) -> list[str]:
    settings = {
        "model_name_or_path": tiny_chat_model,
        "dataset_name": data,
        "heldout_pairs": 4,
        "val_pairs": 4,
        "train_pairs": 6,
        "max_length": 64,
        "batch_size": 2,
        "warmup_steps": 1,
        "sft_steps": 2,
        "sft_lr": 1e-3,
        "grid_lr": ["1e-3", "1e-2"],
        "grid_beta": ["0.1"],
        "select_steps": 2,
        "max_steps": 4,
        "eval_every": 2,
        "patience": 10,  # never stops early here: the kill-and-resume comparison needs every step
        "save_every": 1,
        "curve_pairs": 2,
        "kl_pairs": 2,
        "gen_prompts": 2,
        "max_new_tokens": 3,
        "reference_cache_dir": tmp_path / "refcache",
        "work": tmp_path / "work",
        "out": tmp_path / "out",
        **changed,
    }
    out = []
    for key, value in settings.items():
        out += [f"--{key}", *(map(str, value) if isinstance(value, list) else [str(value)])]
    return out


class Counter:
    """hooks for run_plan: counts phases done and steps trained; raises Killed at a chosen phase or step; with
    `watch` (work folder, (phase, step)), reads the units status.json counts as done at that step."""

    def __init__(self, kill_phase=None, kill_step=None, watch=None):
        self.phases, self.steps, self.kill_phase, self.kill_step = [], [], kill_phase, kill_step
        self.hooks = {"phase": self.phase, "step": self.step}
        self.watch, self.done_units = watch, None

    def phase(self, name):
        if name == self.kill_phase:
            raise Killed(name)
        self.phases.append(name)

    def step(self, name, step):
        self.steps.append((name, step))
        if self.watch and (name, step) == self.watch[1]:
            self.done_units = json.loads((self.watch[0] / "status.json").read_text())["done_units"]
        if (name, step) == self.kill_step:
            raise Killed(name)


def run(args_list, counter=None, progress=False):
    return real_alignment.run_plan(
        real_alignment.parse_args(args_list), hooks=(counter or Counter()).hooks, progress=progress
    )


SELECT = ["select-lr0.001-beta0.1", "select-lr0.01-beta0.1"]
EVERY_PHASE = ["split", "sft", "reference", *SELECT, "select", "main", "report"]


def test_every_phase_runs_results_only_at_the_end_and_a_second_run_redoes_nothing(
    tiny_chat_model, data, tmp_path, monkeypatch
):
    args = argv(tiny_chat_model, data, tmp_path)
    first, measured = Counter(), []
    measure = real_alignment.Plan.measure
    monkeypatch.setattr(
        real_alignment.Plan,
        "measure",
        lambda self, m, split, *a: measured.append(split) or measure(self, m, split, *a),
    )
    result = real_alignment.main(args, hooks=first.hooks, progress=False)
    assert first.phases == EVERY_PHASE
    # the validation slice measured once per grid cell (its end: a cell keeps nothing else) and at each main point
    assert measured.count("validation") == len(SELECT) + 3
    assert [s for s in first.steps if s[0] == "main"] == [("main", s) for s in (1, 2, 3, 4)]
    assert result["final"]["n"] == 4 and len(result["samples"]) == 2 and result["main"]["steps"] == 4
    assert {p["step"] for p in result["main"]["curve"]} == {0, 2, 4}
    grid = result["select"]["grid"]
    assert {c["lr"] for c in grid} == {1e-3, 1e-2}
    # every choice on the validation slice: the grid's best cell, the main run's best validation point
    best = max(grid, key=lambda c: (c["end"]["accuracy"], c["end"]["logratio_margin"]))
    assert (result["select"]["lr"], result["select"]["beta"]) == (best["lr"], best["beta"])
    curve = result["main"]["curve"]
    assert result["main"]["best"]["step"] == next(
        p["step"] for p in curve if p["accuracy"] == max(q["accuracy"] for q in curve)
    )
    assert result["split"]["rows_sha256"]["heldout"] != result["split"]["rows_sha256"]["validation"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "real_alignment.json",
        "real_alignment.md",
        "real_alignment.png",
    ]
    status = json.loads((tmp_path / "work" / "status.json").read_text())
    assert status["finished"] is True and status["done_units"] == status["total_units"]  # the plan's count was exact
    assert not list((tmp_path / "work").glob("*.checkpoint"))  # each removed once its phase was written

    again = Counter()
    assert real_alignment.main(args, hooks=again.hooks, progress=False)["final"] == result["final"]
    assert again.phases == [] and again.steps == []


def test_a_kill_after_a_phase_resumes_without_redoing_it(tiny_chat_model, data, tmp_path):
    args, killed_at = argv(tiny_chat_model, data, tmp_path), "main"
    killed = Counter(kill_phase=killed_at)
    with pytest.raises(Killed):
        run(args, killed)
    before = EVERY_PHASE[: EVERY_PHASE.index(killed_at)]
    assert killed.phases == before
    assert not (tmp_path / "out").exists()  # nothing reported before the plan finished
    status = json.loads((tmp_path / "work" / "status.json").read_text())
    assert status["finished"] is False and status["phase"] == killed_at

    resumed = Counter()
    run(args, resumed)
    assert resumed.phases == EVERY_PHASE[len(before) :]  # the finished phases are not done again
    assert [s for s in resumed.steps if s[0] != "main"] == []


def test_a_killed_main_run_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_one(
    tiny_chat_model, data, tmp_path
):
    uninterrupted = Counter(watch=(tmp_path / "whole" / "work", ("main", 4)))
    whole = run(argv(tiny_chat_model, data, tmp_path / "whole"), uninterrupted, progress=True)

    args = argv(tiny_chat_model, data, tmp_path / "killed")
    with pytest.raises(Killed):
        run(args, Counter(kill_step=("main", 3)))
    resumed = Counter(watch=(tmp_path / "killed" / "work", ("main", 4)))
    result = run(args, resumed, progress=True)
    assert [s for s in resumed.steps if s[0] == "main"] == [("main", 4)]  # steps 1-3 came from the checkpoint
    # ... and the progress (status.json, the bar, the ETA) counts them as done, as an uninterrupted run does
    assert resumed.done_units == uninterrupted.done_units > 0
    # the same batches, weights and optimizer state on the same CPU: the same numbers (tolerance: none needed)
    assert result["main"]["curve"] == whole["main"]["curve"]
    assert result["final"] == whole["final"]


def test_a_changed_input_is_refused_naming_the_phase_and_nothing_is_overwritten(
    tiny_chat_model, data, tmp_path, capsys
):
    run(argv(tiny_chat_model, data, tmp_path))
    marker = (tmp_path / "work" / "main" / ".dpo-folder.json").read_bytes()

    with pytest.raises(SystemExit) as exit_info:  # a setting of the main run changed
        real_alignment.main(argv(tiny_chat_model, data, tmp_path, max_steps=6), progress=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        exit_info.value.code == 2
        and err[-1].startswith("error: ")
        and "work/main was made from other inputs" in err[-1]
    )
    assert "run changed" in err[-1]
    assert (tmp_path / "work" / "main" / ".dpo-folder.json").read_bytes() == marker
    # the held-out points of the main run's curve (its result holds them)
    with pytest.raises(SystemExit) as exit_info:
        real_alignment.main(argv(tiny_chat_model, data, tmp_path, curve_pairs=3), progress=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and "work/main was made from other inputs" in err[-1], err[-1]
    assert "curve_pairs" in err[-1]
    assert (tmp_path / "work" / "main" / ".dpo-folder.json").read_bytes() == marker

    # the batch size SFT trained with (the DPO phases record theirs)
    with pytest.raises(SystemExit) as exit_info:
        real_alignment.main(argv(tiny_chat_model, data, tmp_path, batch_size=3), progress=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and "work/sft was made from other inputs" in err[-1], err[-1]

    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows[0]["chosen"] += " Indeed."  # the data changed: one pair's chosen reply (the data's identity is its content)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit) as exit_info:
        real_alignment.main(argv(tiny_chat_model, data, tmp_path), progress=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        exit_info.value.code == 2 and "work/split was made from other inputs" in err[-1] and "data_sha256" in err[-1]
    )


def test_the_stop_rule_fires_once_the_validation_curve_is_flat():
    from real_plan import stop_rule

    rising = [{"score": s} for s in (0.50, 0.55, 0.60, 0.62)]
    assert stop_rule(rising, patience=2, min_delta=0.005) is None
    assert stop_rule(rising[:2], patience=2, min_delta=0.005) is None  # too few points to judge
    flat = [*rising, {"score": 0.62}, {"score": 0.624}]  # two points, neither beats 0.62 by 0.005
    assert "2 evaluations without beating 0.620" in stop_rule(flat, patience=2, min_delta=0.005)
    assert stop_rule([*flat[:-1], {"score": 0.63}], patience=2, min_delta=0.005) is None


def test_a_moved_model_and_data_are_the_same_inputs_but_rewritten_weights_are_refused(
    tiny_chat_model, data, tmp_path, capsys
):
    """The base model and the data are identified by their content (weights + config, the usable pairs), not
    their paths: a moved copy reuses every phase, new weights at the same path are refused naming the SFT phase."""
    import shutil

    from dpo.offline.tiny import build_tiny_model, build_tokenizer

    model = tmp_path / "model"
    shutil.copytree(tiny_chat_model, model)
    run(argv(model, data, tmp_path))

    moved_model, moved_data = tmp_path / "moved-model", tmp_path / "moved.jsonl"
    shutil.copytree(model, moved_model)
    shutil.copy(data, moved_data)
    again = Counter()
    run(argv(moved_model, moved_data, tmp_path), again)
    assert again.phases == [] and again.steps == []

    build_tiny_model(build_tokenizer(), seed=1).save_pretrained(moved_model)  # other weights, same path and config
    marker = (tmp_path / "work" / "sft" / ".dpo-folder.json").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        real_alignment.main(argv(moved_model, moved_data, tmp_path), progress=False)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and "work/sft was made from other inputs" in err and "base changed" in err
    assert (tmp_path / "work" / "sft" / ".dpo-folder.json").read_bytes() == marker


def test_a_redone_grid_cell_with_other_numbers_is_a_change_of_the_choice(tiny_chat_model, data, tmp_path, capsys):
    """The choice of learning rate and beta came from every cell's finished folder: a cell redone elsewhere with
    other numbers (here: rewritten whole, correctly marked) makes the reused choice stale, so it is refused."""
    from real_phases import finished_result, read_marker, write_phase

    args = argv(tiny_chat_model, data, tmp_path)
    run(args)
    cell = tmp_path / "work" / SELECT[0]
    record = read_marker(cell, "real-alignment phase")
    result = finished_result(cell, record["inputs"])
    result["end"] = {**result["end"], "score": result["end"]["score"] + 0.25}
    write_phase(cell, record["inputs"], result)

    with pytest.raises(SystemExit) as exit_info:
        real_alignment.main(args, progress=False)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and "work/select was made from other inputs" in err
    assert f"{SELECT[0]}_folder" in err


def test_a_work_folder_make_real_did_not_make_is_refused_before_anything_is_written(
    tiny_chat_model, data, tmp_path, capsys
):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        real_alignment.main(argv(tiny_chat_model, data, tmp_path), progress=False)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and err.startswith("error: --work ") and "did not make" in err
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt"]  # no status.json, no phase folder, no marker


def test_the_stop_rules_new_best_is_one_validation_pair_by_default(tiny_chat_model, data, tmp_path):
    assert real_alignment.parse_args(argv(tiny_chat_model, data, tmp_path, val_pairs=4)).min_delta == 1 / 4
    assert real_alignment.parse_args(argv(tiny_chat_model, data, tmp_path, val_pairs=5)).min_delta == 1 / 5
    given = argv(tiny_chat_model, data, tmp_path, val_pairs=5) + ["--min_delta", "0.01"]
    assert real_alignment.parse_args(given).min_delta == 0.01


@pytest.mark.parametrize("jump", ["skip", "next phase"])
def test_work_reused_from_an_earlier_run_does_not_enter_the_eta_rate(tmp_path, jump):
    """Progress counts units done in an earlier run (skip) or left unused by a phase that ended early (the next
    phase's start) without timing them: the rate behind status.json's ETA stays that of the work done now. Units are
    advanced 10 at a time, 0.15 s apart (sleeps only overshoot), so the true rate is at most 10 / 0.15 = 67 units/s;
    counting the 5,000 jumped units in it made it thousands."""
    import time

    from real_phases import Progress

    progress = Progress(tmp_path, {"a": 5_000.0, "b": 10_000.0}, enabled=True)
    progress.start("a")
    time.sleep(0.15)
    progress.advance(10)
    if jump == "skip":
        progress.skip(5_000)
    else:
        progress.start("b")  # phase a ended after 10 of its 5,000 units
    for _ in range(3):
        time.sleep(0.15)
        progress.advance(10)
    assert progress.whole.n == (5_040 if jump == "skip" else 5_030)
    assert 0 < progress.whole.format_dict["rate"] <= 10 / 0.15


def test_a_training_step_feeds_its_rows_grouped_by_length_with_the_padded_batchs_values(tiny_chat_model, data):
    """make real's steps feed a batch's rows in TRAIN_GROUPS forwards of rows of similar length (real_measure.
    training_logps): each row's summed log-prob, and the gradient of a loss of them, are those of the one
    right-padded batch (forward_logps on collate) within float32 summation order, for fewer tokens fed. Bound: 2^-16
    relative, as tests/evaluation/test_scoring.py (the same rows in batches of other shapes); feeding one reply token
    too many or too few moves a row by a whole token's log-probability, far past it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from real_measure import tokenize_pair, training_logps
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo.data.doctor import check_data
    from dpo.data.loading import load_preference_data
    from dpo.scratch.logps import sft_nll
    from dpo.scratch.loop import collate, forward_logps, split_pairs

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model)
    pairs = check_data(load_preference_data(str(data)), str(data), tokenizer, max_length=None).kept
    examples = [tokenize_pair(tokenizer, pairs[i], 64) for i in range(8)]
    base = AutoModelForCausalLM.from_pretrained(tiny_chat_model, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora = [p for p in model.parameters() if p.requires_grad]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def run(feed):
        tokens = []
        handle = model.get_base_model().register_forward_pre_hook(
            lambda m, a, kw: tokens.append(kw["input_ids"].numel()), with_kwargs=True
        )
        try:
            chosen, rejected, counts = feed()
        finally:
            handle.remove()
        grads = torch.autograd.grad((chosen - 0.5 * rejected).sum(), lora)
        return torch.cat([chosen, rejected]).detach(), counts, torch.cat([g.flatten() for g in grads]), sum(tokens)

    def padded():
        c, r = split_pairs(forward_logps(model, collate(examples, pad)))
        return c.logps, r.logps, torch.cat([c.lengths, r.lengths])

    def grouped():
        logps, counts = training_logps(model, examples, pad)
        return logps["chosen_ids"], logps["rejected_ids"], torch.cat([counts["chosen_ids"], counts["rejected_ids"]])

    want, want_counts, want_grad, want_tokens = run(padded)
    got, got_counts, got_grad, got_tokens = run(grouped)
    assert torch.equal(got_counts, want_counts) and (want < -1.0).all()
    assert ((got - want).abs() / want.abs()).max().item() <= 2.0**-16
    assert ((got_grad - want_grad).norm() / want_grad.norm()).item() <= 2.0**-16
    assert got_tokens < want_tokens, (got_tokens, want_tokens)  # less padding fed

    # SFT: the chosen rows alone, the mean log-loss a reply token (sft_nll over the padded chosen rows)
    batch = {k: v[: len(examples)] for k, v in collate(examples, pad).items()}
    c = forward_logps(model, batch)
    logps, tokens = training_logps(model, examples, pad, keys=("chosen_ids",))
    grouped_nll = (-logps["chosen_ids"].sum() / tokens["chosen_ids"].sum()).item()
    assert abs(grouped_nll - sft_nll(c.token_logps, c.mask).item()) <= 2.0**-16 * abs(grouped_nll)


@pytest.mark.parametrize("name", ["curve_pairs", "kl_pairs", "gen_prompts", "max_new_tokens", "select_steps"])
def test_a_count_below_one_is_refused_in_one_line_before_anything_is_written(
    tiny_chat_model, data, tmp_path, capsys, name
):
    """A plan of hours must not find out at its last phase that it scores 0 pairs (a mean over nothing)."""
    with pytest.raises(SystemExit) as exit_info:
        real_alignment.main(argv(tiny_chat_model, data, tmp_path, **{name: 0}), progress=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err[-1] == f"error: --{name} 0: must be at least 1"
    assert not (tmp_path / "work").exists()


def test_a_refused_phase_says_which_inputs_changed_and_which_an_older_version_did_not_record():
    """Was: an input added to a phase since its folder was made (main's curve_pairs) was reported as "changed"."""
    from real_phases import input_changes

    now = {"phase": "main", "beta": 0.1, "curve_pairs": 100, "lr": 5e-5}
    assert input_changes({"phase": "main", "beta": 0.1, "lr": 5e-5}, now) == (
        "curve_pairs not recorded (made by an older version)"
    )
    assert input_changes({"phase": "main", "beta": 0.3, "lr": 5e-5, "curve_pairs": 100, "old": 1}, now) == (
        "beta changed; old no longer an input"
    )
    assert input_changes(None, now) == "beta, curve_pairs, lr, phase not recorded (made by an older version)"
