"""The launcher's environment variables (dpo/gate/launch.py): a stray or inconsistent one is named in one
`error:` line, exit 2, before accelerate reads it; a user error is printed once, and never by nobody."""

import os
import subprocess
import sys

import pytest
from helpers import ROOT, message_lines

from dpo.errors import UserError, exit_on_user_error
from dpo.gate.launch import LAUNCHER_MARKS, VARIABLES, check_launch_environment

RENDEZVOUS = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
TORCHRUN_RANK1 = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", **RENDEZVOUS}

CASES = {  # environment -> the variable the error line names
    "local_rank_beyond_world_size": (
        {"WORLD_SIZE": "2", "LOCAL_RANK": "5", "RANK": "0", **RENDEZVOUS},
        "LOCAL_RANK=5",
    ),
    "rank_beyond_world_size": ({"WORLD_SIZE": "2", "RANK": "2", **RENDEZVOUS}, "RANK=2"),
    "rank_without_world_size": ({"RANK": "3"}, "RANK=3"),
    "local_rank_beyond_local_world_size": ({**TORCHRUN_RANK1, "LOCAL_WORLD_SIZE": "1"}, "LOCAL_RANK=1"),
    "local_world_size_above_world_size": (
        {**TORCHRUN_RANK1, "LOCAL_WORLD_SIZE": "4", "LOCAL_RANK": "3"},
        "LOCAL_RANK=3",
    ),
    "world_size_alone": ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2"),
    "without_master_addr": ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_PORT": "1"}, "MASTER_ADDR"),
    "local_rank_alone": ({"LOCAL_RANK": "0"}, "LOCAL_RANK=0"),
    "not_a_number": ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two'"),
    "empty": ({"WORLD_SIZE": ""}, "WORLD_SIZE=''"),
    "negative": ({"LOCAL_RANK": "-1"}, "LOCAL_RANK='-1'"),
    "port_out_of_range": ({**TORCHRUN_RANK1, "MASTER_PORT": "70000"}, "MASTER_PORT='70000'"),
}


@pytest.mark.parametrize("env, named", CASES.values(), ids=CASES.keys())
def test_each_inconsistent_launch_is_named(env, named):
    with pytest.raises(UserError, match=f"environment variable .*{named}"):
        check_launch_environment(env)


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"RANK": "0"},
        {"WORLD_SIZE": "1"},
        TORCHRUN_RANK1,
        {**TORCHRUN_RANK1, "LOCAL_WORLD_SIZE": "1", "LOCAL_RANK": "0"},
    ],
    ids=["none", "rank_0", "one_process", "torchrun_rank_1", "two_machines"],
)
def test_consistent_launches_pass(env):
    check_launch_environment(env)  # raises on a problem


def test_the_table_covers_what_accelerate_reads():
    assert set(VARIABLES) >= {"WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"}


def entry_point_error(monkeypatch, capsys, env) -> tuple[int, list[str]]:
    for name in (*VARIABLES, "MASTER_ADDR", *LAUNCHER_MARKS):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    @exit_on_user_error
    def main():
        raise UserError("a setting the gate refuses")

    with pytest.raises(SystemExit) as stopped:
        main()
    return stopped.value.code, message_lines(capsys.readouterr().err)


def test_a_process_started_by_hand_prints_its_error_whatever_its_local_rank(monkeypatch, capsys):
    """LOCAL_RANK=1 and a consistent job, but no launcher started the others: nobody else would print it."""
    assert entry_point_error(monkeypatch, capsys, TORCHRUN_RANK1) == (2, ["error: a setting the gate refuses"])


def test_under_a_launcher_only_local_rank_0_prints(monkeypatch, capsys):
    assert entry_point_error(monkeypatch, capsys, {**TORCHRUN_RANK1, "TORCHELASTIC_RUN_ID": "x"}) == (2, [])
    zero = {**TORCHRUN_RANK1, "TORCHELASTIC_RUN_ID": "x", "RANK": "0", "LOCAL_RANK": "0"}
    assert entry_point_error(monkeypatch, capsys, zero) == (2, ["error: a setting the gate refuses"])


def test_a_launch_error_is_printed_even_under_a_launcher_mark(monkeypatch, capsys):
    """A leftover TORCHELASTIC_RUN_ID beside a stray LOCAL_RANK=5: the variables cannot be trusted, so it says so."""
    status, lines = entry_point_error(
        monkeypatch, capsys, {"WORLD_SIZE": "2", "LOCAL_RANK": "5", "TORCHELASTIC_RUN_ID": "x"}
    )
    assert status == 2 and len(lines) == 1 and "LOCAL_RANK=5" in lines[0], lines


@pytest.mark.parametrize(
    "command, env, named",
    [
        (
            ["recipes/dpo_any.py", "--model_name_or_path", "m", "--dataset_name", "d"],
            {"WORLD_SIZE": "2", "LOCAL_RANK": "5"},
            "LOCAL_RANK=5",
        ),
        (["recipes/dpo_rounds.py", "--model_name_or_path", "m"], {"WORLD_SIZE": "2"}, "WORLD_SIZE=2"),
        (["-m", "dpo.export", "nowhere"], {"WORLD_SIZE": "x", "RANK": "0"}, "WORLD_SIZE='x'"),
    ],
    ids=["dpo_any_stray_local_rank", "dpo_rounds_world_size_alone", "export_not_a_number"],
)
def test_the_real_entry_points_name_the_variable_in_one_line(command, env, named):
    """The found cases: `WORLD_SIZE=2 LOCAL_RANK=5 recipes/dpo_any.py` exited 2 with nothing printed; `WORLD_SIZE=2`
    alone got accelerate's "MASTER_ADDR env was not set"."""
    clean = {k: v for k, v in os.environ.items() if k not in (*VARIABLES, "MASTER_ADDR", *LAUNCHER_MARKS)}
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, *command], env={**clean, "PYTHONPATH": path, **env}, cwd=ROOT, capture_output=True, text=True
    )
    lines = message_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: environment variable") and named in lines[0], lines
