"""dpo/errors.py: an entry point's `error:` line stands alone. Warnings the libraries raise before weights
load (TRL's deprecation notices print while the arguments are parsed) are held, shown once weights start to
load or the call ends, and dropped only when a UserError ends the call before that."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from dpo.errors import UserError, exit_on_user_error, release_held_warnings

ROOT = Path(__file__).resolve().parents[1]


def library_warning(text: str) -> None:
    """warnings.warn as a library's code calls it (attributed to trl's config module)."""
    code = compile(f"warnings.warn({text!r}, UserWarning)", "<trl.trainer.dpo_config>", "exec")
    exec(code, {"__name__": "trl.trainer.dpo_config", "warnings": warnings})


def run_entry(*steps):
    """Run an entry point doing `steps` in order; returns (exit status or None, the warnings shown)."""

    @exit_on_user_error
    def main():
        for step in steps:
            step()

    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        try:
            main()
            status = None
        except SystemExit as stop:
            status = stop.code
    return status, [str(w.message) for w in shown]


def refuse():
    raise UserError("learning_rate must be > 0")


def test_a_user_error_before_weights_load_drops_the_held_warnings():
    status, shown = run_entry(lambda: library_warning("keep_end is deprecated"), refuse)
    assert status == 2 and shown == []


def test_once_weights_load_the_held_warnings_show_in_order_and_later_ones_at_once():
    seen_at_release = []

    def release():
        release_held_warnings()
        seen_at_release.append(True)

    status, shown = run_entry(
        lambda: library_warning("first"),
        lambda: library_warning("second"),
        release,
        lambda: library_warning("third"),
        refuse,  # an error after weights loaded: what was shown stays shown
    )
    assert status == 2 and shown == ["first", "second", "third"] and seen_at_release


def test_held_warnings_show_when_the_call_ends_without_loading_weights():
    status, shown = run_entry(lambda: library_warning("notice"))  # the doctor, python -m dpo.cache, ...
    assert status is None and shown == ["notice"]


def test_a_bug_still_shows_the_held_warnings_first():
    @exit_on_user_error
    def main():
        library_warning("notice before the bug")
        raise RuntimeError("a bug")

    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError):
            main()
    assert [str(w.message) for w in shown] == ["notice before the bug"]


def test_filters_still_apply_while_held():
    """An "error" filter (the suite's, for the repository's own deprecations) raises at once, held or not."""

    @exit_on_user_error
    def main():
        library_warning("raised, not held")

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="raised, not held"):
            main()
    assert warnings.showwarning.__module__ == "warnings"  # nothing left holding


NO_CHECKPOINTING_YAML = "<dpo_any.yaml without its activation_checkpointing lines>"


@pytest.mark.slow
@pytest.mark.parametrize(
    "mistake, expected",
    [
        (["--learning_rate", "-1"], "error: invalid setting(s): learning_rate must be > 0"),  # the gate
        (
            ["--dataset_name", "missing_pairs.jsonl"],
            "error: dataset file not found: missing_pairs.jsonl",
        ),  # data, gate passed
        # a YAML that leaves activation_checkpointing out: DPOConfig sets the deprecated gradient_checkpointing,
        # and transformers' FutureWarning printed ahead of the error
        (["--config", NO_CHECKPOINTING_YAML, "--learning_rate", "-1"], "error: invalid setting(s): learning_rate"),
    ],
)
def test_the_real_recipe_prints_the_error_line_alone(mistake, expected, tiny_model_dir, truthy_file, tmp_path):
    """As a user runs it (no warning filters): TRL 1.16 warns that truncation_mode keep_end is deprecated while
    the arguments are parsed, which printed two lines ahead of the one-line error."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    flags = ["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path / "out")]
    flags += ["--truncation_mode", "keep_end", *mistake]
    if "--dataset_name" not in mistake:
        flags += ["--dataset_name", str(truthy_file)]
    if NO_CHECKPOINTING_YAML in flags:
        lines = (ROOT / "recipes" / "dpo_any.yaml").read_text().splitlines()
        config = tmp_path / "settings.yaml"
        config.write_text("\n".join(line for line in lines if not line.startswith("activation_checkpointing")))
        flags = [str(config) if flag == NO_CHECKPOINTING_YAML else flag for flag in flags]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "dpo_any.py"), *flags],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(expected), proc.stderr[-2000:]


def test_a_library_that_swaps_showwarning_while_held_loses_nothing_and_breaks_nothing():
    """logging.captureWarnings(True) saves the holding function and puts its own in place; (False) puts the
    holding function back after the release: later warnings must still show, not fail."""
    import logging

    def body():
        logging.captureWarnings(True)
        library_warning("logged")
        release_held_warnings()
        logging.captureWarnings(False)  # the holding function is back in place, released
        library_warning("after")

    status, shown = run_entry(body)
    assert status is None and shown == ["after"]  # "logged" went to the py.warnings logger, as that library asked
