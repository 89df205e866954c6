"""benchmarks/bench_training.py --quick runs end to end (on the tiny offline model and a few real
HH-RLHF pairs, for correctness only: no timing is asserted) and writes its table and JSON."""

import argparse
import gzip
import json
import math
import subprocess
import sys

import pytest
from helpers import HH_FILE, ROOT, cli, load_script

BENCH = load_script(ROOT / "benchmarks" / "bench_training.py", "bench_training")


def hh_rows(path, n: int):
    """`n` real HH-RLHF rows, unchanged, as .jsonl.gz (the benchmark's default dataset's format): the file's first
    n/2 and its n/2 shortest, so that 16 of them at max_length 64 mix pairs cut to 64 tokens (keep_end) with
    shorter ones, which the recipe without packing pads (the whole file's seeded pick had both)."""
    with gzip.open(HH_FILE, "rt") as f:
        lines = f.readlines()
    half = n // 2
    shortest = sorted(range(half, len(lines)), key=lambda i: len(lines[i]))[:half]
    with gzip.open(path, "wt") as f:
        f.writelines(lines[:half] + [lines[i] for i in sorted(shortest)])
    return path


@pytest.mark.slow
def test_quick_run_writes_the_table_and_json(tiny_model_dir, tmp_path):
    out, data = tmp_path / "BENCHMARKS.md", tmp_path / "bench.json"
    # The parent converts and checks every row of its dataset before it picks --pairs of them: 64 real rows
    # leave a pick of 16 (the whole 2,312-row file cost the test ~10 s of tokenizing, checked nowhere here)
    hh = hh_rows(tmp_path / "hh.jsonl.gz", 64)
    out.write_text("# Benchmarks\n\n## Another section\n\nkept as it is\n")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_training.py"), "--quick", "--pairs", "16"]
    cmd += ["--max_length", "64", "--threads", "1", "--model_name_or_path", str(tiny_model_dir)]
    # its 10 worker processes forked from one that imported the libraries once: 6-18 s of imports each, saved
    # (the fresh-process path: test_a_worker_is_a_fresh_process_whose_result_line_is_read below)
    cmd += ["--fork_workers"]
    cmd += cli(
        dataset_name=hh,
        workdir=tmp_path / "work",
        out=out,
        json=data,
    )
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    result = json.loads(data.read_text())
    assert result["settings"]["command"].endswith("--quick --fork_workers")  # a table made so says it
    summary = result["summary"]
    assert list(summary) == list(BENCH.CONFIGS)
    assert result["settings"]["pairs"] == 16 and result["cache_build"]["pairs"] == 16
    assert 16 <= result["dataset_padding"]["pairs"] <= 64  # the rows the doctor kept of the 64 it read
    for config, numbers in summary.items():
        assert numbers["tokens_per_s"] > 0 and 0 <= numbers["padding"] < 1, config
        assert len(numbers["losses"]) == 2 and all(math.isfinite(x) for x in numbers["losses"]), config
        assert numbers["peak_rss_mb"] > 100, config
    # the same pairs: every configuration saw the same real tokens
    tokens = {r["config"]: r["tokens"] for r in result["runs"]}
    assert len(set(tokens.values())) == 1, tokens
    # packing and the warm cache change summation order only: the same losses, step by step
    assert summary["recipe"]["losses"] == pytest.approx(summary["recipe_padded"]["losses"], abs=BENCH.SAME_LOSS)
    assert summary["recipe_warm"]["losses"] == pytest.approx(summary["recipe"]["losses"], abs=BENCH.SAME_LOSS)
    # 7 takes the same step in fewer, wider micro-batches than the YAML (16 pairs: 16 of 1 against 8 of 2)
    micro = {r["config"]: r["micro_batches"] for r in result["runs"]}
    assert micro["recipe"] == 16 // BENCH.MICRO and micro["recipe_wider"] == 16 // BENCH.WIDER != micro["recipe"]
    assert summary["recipe"]["padding"] == 0 < summary["recipe_padded"]["padding"]
    # whole runs include the reference pass: timed for TRL's precompute and the cold cache, absent elsewhere
    assert summary["trl_precompute"]["reference_s"] > 0 and summary["recipe"]["reference_s"] > 0
    assert summary["trl_defaults"]["reference_s"] == 0  # no pass: TRL scores the reference inside each step
    assert summary["recipe_warm"]["reference_s"] < 0.01 * summary["recipe"]["reference_s"]  # a lookup, no forward
    # TRL's warm configuration reads the pairs with load_dataset, and TRL finds the results its cache build wrote
    # beside them: TRL scores no reference batch (its cold run scores every batch: 16 pairs, 2 of 8)
    assert result["trl_cache_build"]["seconds"] > 0
    batches = {r["config"]: r["reference_batches"] for r in result["runs"]}
    assert batches["trl_precompute"] == 16 // BENCH.BATCH and batches["trl_precompute_warm"] == 0
    # each configuration's first-step margin is measured and reported, every round
    for config, numbers in summary.items():
        assert len(numbers["first_margins"]) == 1 and math.isfinite(numbers["first_margins"][0]), config
    assert summary["seed_loop"]["first_margins"] == [0.0]  # policy and its fp32 copy: the same forward, exactly
    assert all(r["whole_s"] > r["seconds"] for r in result["runs"])
    assert 0 <= result["dataset_padding"]["floor"] <= result["dataset_padding"]["grouped"] <= 1

    text = out.read_text()
    assert text.count(BENCH.SECTION) == 1 and "## Another section\n\nkept as it is" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "configuration" not in line]
    assert [r.split(" | ")[0].lstrip("| ") for r in rows] == list(BENCH.CONFIGS.values())
    # the headline compares cold with cold and warm with warm, and the margins stand side by side
    assert "cold against cold" in text and "warm against warm" in text
    warm_trl = f"TRL warm (3w) {summary['trl_precompute_warm']['first_margins'][0]:+.4f}"
    assert warm_trl in text and f"recipe warm (6) {summary['recipe_warm']['first_margins'][0]:+.4f}" in text


def test_section_is_replaced_in_place(tmp_path):
    path = tmp_path / "B.md"
    path.write_text(f"# Benchmarks\n\n## First\n\na\n\n{BENCH.SECTION}\n\nold\n\n## Last\n\nz\n")
    BENCH.write_section(path, f"{BENCH.SECTION}\n\nnew\n", BENCH.SECTION)
    assert path.read_text() == f"# Benchmarks\n\n## First\n\na\n\n{BENCH.SECTION}\n\nnew\n\n## Last\n\nz\n"


def test_profile_section_states_our_share_of_the_step(tmp_path):
    """--profile's section: our per-step code as a share of the unprofiled steps (2 + 1 of 150 s = 2.00%),
    written as its own section beside the training table."""
    record = {
        "step_s": [50.0, 50.0, 50.0, 60.0],
        "own_code_s": {"collator": 2.0, "callbacks": 0.5, "log": 0.5},
        "unprofiled_s": 150.0,
        "rss_after_load_mb": 1000.0,
        "rss_after_step_mb": [2000.0, 2100.0, 2100.0, 2200.0],
        "peak_rss_mb": 2300.0,
        "load": "1.00 / 2.00",
        "top_time": "op table",
        "top_memory": "memory table",
    }

    class Args:
        threads, max_length = 2, 512

    text = BENCH.profile_markdown(record, Args)
    assert "= **2.00%** of 150.0 s" in text and "peak 2300 MB" in text
    path = tmp_path / "B.md"
    path.write_text(f"# Benchmarks\n\n{BENCH.SECTION}\n\ntable\n")
    BENCH.write_section(path, text, BENCH.PROFILE_SECTION)
    BENCH.write_section(path, text, BENCH.PROFILE_SECTION)  # rewritten in place, not appended twice
    assert path.read_text().count(BENCH.PROFILE_SECTION) == 1 and "\ntable\n" in path.read_text()


def test_a_worker_is_a_fresh_process_whose_result_line_is_read(tmp_path, monkeypatch):
    """Without --fork_workers (every committed table) each configuration is `python training_workers.py CONFIG
    ...` started fresh: nothing imported ahead, its last RESULT line read, a failure named with its stderr."""
    script = tmp_path / "worker.py"
    script.write_text(
        "import json, sys\n"
        "print('RESULT {\"stale\": 1}')\n"
        "print('RESULT ' + json.dumps({'argv': sys.argv[1:], 'torch': 'torch' in sys.modules}))\n"
        "sys.exit('padded batches ran out of memory' if sys.argv[1] == 'recipe_padded' else 0)\n"
    )
    monkeypatch.setattr(BENCH, "WORKERS", script)
    args = argparse.Namespace(model="m", workdir="w", max_length=8, threads=1)
    result = BENCH.run_worker("recipe", args)
    assert result["argv"] == ["recipe", "--model", "m", "--workdir", "w", "--max_length", "8", "--threads", "1"]
    assert result["torch"] is False and result["whole_s"] > 0 and "stale" not in result
    with pytest.raises(SystemExit, match="recipe_padded  failed \\(exit 1\\):\npadded batches ran out of memory"):
        BENCH.run_worker("recipe_padded", args)


@pytest.mark.slow
def test_a_real_worker_runs_as_a_fresh_process(tiny_model_dir, tmp_path):
    """What the committed tables run and the quick run above (forked workers) does not: the real
    benchmarks/training_workers.py started fresh, nothing imported ahead; its cheapest configuration, the
    reference cache build, on pairs the parent prepared as a full run prepares them."""
    from dpo.train.model_checks import load_tokenizer

    work = tmp_path / "work"
    work.mkdir()
    hh = hh_rows(tmp_path / "hh.jsonl.gz", 16)
    pairs, _ = BENCH.prepare_pairs(str(hh), load_tokenizer(str(tiny_model_dir)), 8, 64, 0, work / "pairs.jsonl")
    args = argparse.Namespace(model=str(tiny_model_dir), workdir=str(work), max_length=64, threads=1)
    result = BENCH.run_worker("cache_build", args)
    assert result["config"] == "cache_build" and result["pairs"] == pairs == 8 and result["seconds"] > 0, result


@pytest.mark.parametrize("flags", [["--quick", "--fork_workers"], ["--profile", "--fork_workers", "--out", "x.md"]])
def test_forked_workers_are_for_rehearsals_only(flags, monkeypatch, capsys):
    """Forked workers leave the imports out of whole-run times and start at the forking process's memory: never
    into the committed BENCHMARKS.md by default, never the profile (one worker), never with an environment of
    its own (read at process start: bench_allocator's settings)."""
    monkeypatch.setattr(sys, "argv", ["bench_training.py", *flags])
    with pytest.raises(SystemExit) as stop:
        BENCH.main()
    assert stop.value.code == 2 and "--fork_workers is for rehearsals" in capsys.readouterr().err
    args = argparse.Namespace(model="m", workdir="w", max_length=8, threads=1)
    with pytest.raises(ValueError, match="MALLOC_ARENA_MAX"):
        BENCH.run_worker("recipe", args, {"MALLOC_ARENA_MAX": "1"}, forks=object())
