"""What each round started from (dpo/rounds/chain.py), checked without training: a round folder derived from a
round that was run again since is moved aside whole (finished or not, recorded in round_start.json or, in a
folder from before it, in its DPO run's record); a changed base model or SFT adapter is refused in one line."""

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from dpo.errors import UserError
from dpo.rounds.chain import START_RECORD, check_round_start, start_of, write_start


def adapter(folder, value: float):
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.full((4,), value)}, folder / "adapter_model.safetensors")


def rounds_context(out, base, sft=None):
    model_args = SimpleNamespace(model_name_or_path=str(base), model_revision="main")
    before = lambda n: str(out / f"round-{n - 1}") if n > 1 else sft  # noqa: E731  (RoundsContext.adapter_before)
    return SimpleNamespace(output_dir=out, sft_adapter=sft, model_args=model_args, adapter_before=before)


@pytest.fixture
def rounds(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    save_file({"w": torch.zeros(4)}, base / "model.safetensors")
    out = tmp_path / "run"
    adapter(out / "round-1", 1.0)
    return rounds_context(out, base), base, out


def test_a_partly_done_round_derived_from_a_round_run_again_is_moved_aside(rounds, capsys):
    """Was: round 2's samples.jsonl, drawn from the old round 1, were reused by the rerun of round 2."""
    ctx, _, out = rounds
    (out / "round-2").mkdir()
    write_start(ctx, 2, out / "round-2")
    (out / "round-2" / "samples.jsonl").write_text('{"prompt": "p", "answers": []}\n')
    check_round_start(ctx, 2)  # the same round 1: kept
    assert (out / "round-2" / "samples.jsonl").is_file()
    adapter(out / "round-1", 2.0)  # round 1 run again, another adapter
    check_round_start(ctx, 2)
    log = capsys.readouterr().out
    assert not (out / "round-2").exists() and (out / "round-2.stale-1" / "samples.jsonl").is_file()
    assert "round 2: it started from round 1's adapter with sha256" in log and "moved to" in log, log


def test_a_round_from_before_round_start_json_is_checked_against_its_runs_record(rounds):
    """A finished round folder written before round_start.json existed: its DPO run recorded the adapter it
    trained from (sft_adapter_sha256), which is what round 1 held then."""
    ctx, _, out = rounds
    was = start_of(ctx, 2)["adapter_sha256"]
    (out / "round-2").mkdir()
    (out / "round-2" / "round.json").write_text("{}")
    marker = {"run": {"sft_adapter_sha256": was}, "files": [], "global_step": 1}
    (out / "round-2" / "run_complete.json").write_text(json.dumps(marker))
    (out / "round-2.stale-1").mkdir()  # an earlier one: the next free name is taken
    check_round_start(ctx, 2)
    assert (out / "round-2").is_dir()
    adapter(out / "round-1", 3.0)
    check_round_start(ctx, 2)
    assert not (out / "round-2").exists() and (out / "round-2.stale-2" / "round.json").is_file()


def test_a_changed_base_or_sft_adapter_under_a_round_is_refused(rounds, tmp_path):
    """Not the rounds' own doing: nothing is moved, the record, both identities and the fix are named."""
    ctx, base, out = rounds
    (out / "round-2").mkdir()
    write_start(ctx, 2, out / "round-2")
    save_file({"w": torch.ones(4)}, base / "model.safetensors")  # the base replaced in place
    with pytest.raises(UserError, match=f"{out / 'round-2' / START_RECORD} was derived from the base model {base}"):
        check_round_start(ctx, 2)
    assert (out / "round-2").is_dir()

    sft = tmp_path / "sft"
    adapter(sft, 5.0)
    ctx = rounds_context(tmp_path / "other", base, str(sft))
    (tmp_path / "other" / "round-1").mkdir(parents=True)
    write_start(ctx, 1, tmp_path / "other" / "round-1")
    adapter(sft, 6.0)  # the SFT adapter retrained in place
    with pytest.raises(
        UserError, match="round 1 started from the SFT adapter with sha256 .* Put the original adapter"
    ):
        check_round_start(ctx, 1)


def test_round_records_of_the_weights_alone_pass_silently_and_a_changed_config_is_refused(rounds, capsys):
    """Round folders written before config.json was part of the base's identity: the same weights pass without a
    line per round (rounds_settings.json's check says it once); an edited config.json is refused, named."""
    from dpo.train.safety.identity import BASE_KEY, CONFIG_PART, weights_identity

    ctx, base, out = rounds
    (base / "config.json").write_text(json.dumps({"rope_theta": 10000.0}))
    for n in (2, 3):
        (out / f"round-{n}").mkdir(exist_ok=True)
        start = {**start_of(ctx, n), BASE_KEY: weights_identity(base)}  # the old record: weights only
        assert CONFIG_PART not in start[BASE_KEY]
        (out / f"round-{n}" / START_RECORD).write_text(json.dumps(start))
        adapter(out / f"round-{n}", float(n))
    for n in (2, 3):
        check_round_start(ctx, n)
    assert "records only the weights" not in capsys.readouterr().out
    (out / "round-2" / START_RECORD).write_text(json.dumps(start_of(ctx, 2)))  # a new record, then the edit
    (base / "config.json").write_text(json.dumps({"rope_theta": 20000.0}))
    with pytest.raises(UserError, match="its config.json was changed since"):
        check_round_start(ctx, 2)
