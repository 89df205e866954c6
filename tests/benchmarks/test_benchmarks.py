"""benchmarks/: both scripts start, the frontier redraws from its CSV, and the numbers README.md
quotes from `make demo` are the ones BENCHMARKS.md (bench_demo.py's output) recorded.

The scripts' real work (3 demo runs; a 20-run sweep of ~8 minutes) is not run here.
"""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, cli, load_script

BENCH = ROOT / "benchmarks"


def load_benchmark(name: str):
    return load_script(BENCH / f"{name}.py", f"bench_{name}")


def section(markdown: str, heading: str) -> str:
    """The text under `heading` up to the next heading of the same or a higher level."""
    level = heading.split(" ")[0]
    start = markdown.index(heading + "\n")
    end = re.search(rf"^#{{1,{len(level)}}} ", markdown[start + len(heading) :], re.M)
    return markdown[start : start + len(heading) + end.start()] if end else markdown[start:]


def table_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("|---")]


SCRIPTS = [
    "bench_allocator.py",
    "bench_demo.py",
    "bench_sweep.py",
    "frontier_sentiment.py",
    "real_alignment.py",
    "rounds_offpolicy.py",
    "rounds_sentiment.py",
    "rounds_sweep.py",
]


@pytest.fixture(scope="module")
def helps(tmp_path_factory) -> dict[str, tuple[int, str, str]]:
    """Each script's `--help` as `python benchmarks/<script> --help` gives it: (exit status, stdout, stderr). Each
    runs in a process of its own, forked from one that imported torch, transformers, ... once (benchmarks/fork_runner.py):
    8 processes importing them cost 6-18 s each. The rounds benchmarks turn off datasets' progress bars before
    parsing their flags: in a process of their own, that never reaches another script or this one."""
    out = tmp_path_factory.mktemp("helps")
    command = [sys.executable, str(ROOT / "benchmarks" / "fork_runner.py"), str(out)]
    for i, script in enumerate(SCRIPTS):
        command += ["---"] * (i > 0) + [str(BENCH / script), "--help"]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {
        script: (
            int((out / f"{i}.status").read_text()),
            (out / f"{i}.out").read_text(),
            (out / f"{i}.err").read_text(),
        )
        for i, script in enumerate(SCRIPTS)
    }


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_help_exits_0(script, helps):
    status, stdout, stderr = helps[script]
    assert status == 0, stderr[-2000:]
    assert "usage:" in stdout and "--out" in stdout


# ── bench_demo.py ────────────────────────────────────────────────────────────────────────────
README_DEMO = "## What `make demo` shows"  # benchmarks/README.md
PAGE = ROOT / "benchmarks" / "README.md"


def test_demo_numbers_are_the_benchmarked_ones():
    """Every number in benchmarks/README.md's "What `make demo` shows" table is in BENCHMARKS.md's demo table."""
    assert missing_from_benchmarks(PAGE.read_text(), (ROOT / "BENCHMARKS.md").read_text()) == []


def missing_from_benchmarks(readme: str, benchmarks: str) -> list[str]:
    """Numbers of README's demo table that BENCHMARKS.md's "What the demo measured" table lacks."""
    rows = table_rows(section(readme, README_DEMO))
    numbers = [n for row in rows for n in re.findall(r"[+-]?\d+(?:\.\d+)?%?", row)]
    assert len(numbers) >= 8, rows  # the table was found: rewards, KL, accuracy, well-formed, lengths
    measured = "\n".join(table_rows(benchmarks[benchmarks.index("What the demo measured") :]))
    return [n for n in numbers if not re.search(rf"(?<![\d.+-]){re.escape(n)}(?![\d])", measured)]


def test_a_drifted_readme_number_is_caught():
    readme, benchmarks = PAGE.read_text(), (ROOT / "BENCHMARKS.md").read_text()
    row = next(r for r in table_rows(section(readme, README_DEMO)) if "%" in r)
    number = re.findall(r"\d+\.\d%", row)[0]
    drifted = readme.replace(row, row.replace(number, f"{float(number[:-1]) - 0.1:.1f}%"))
    assert missing_from_benchmarks(drifted, benchmarks) == [f"{float(number[:-1]) - 0.1:.1f}%"]


def test_bench_demo_writes_the_table_readme_quotes():
    """bench_demo.markdown formats metrics.json into the very rows README.md's table copies."""
    bench = load_benchmark("bench_demo")
    metrics = {
        "reference_reward": 0.0204,
        "policy_reward": 0.1431,
        "kl": 0.1681,
        "kl_stderr": 0.0242,
        "heldout_reward_accuracy": 0.8692,
        "heldout_pairs": 214,
        "reference_well_formed": 0.9824,
        "policy_well_formed": 0.9746,
        "reference_length": 4.871,
        "policy_length": 4.9668,
        "train_pairs": 833,
        "dpo_steps": 54,
        "loss_type": ["sigmoid"],
        "beta": 0.1,
        "seconds": {"sft": 13.0, "pairs": 5.0, "dpo": 5.5, "evaluate": 2.2},
    }
    text = bench.markdown([35.0, 36.4], [metrics, dict(metrics)], (1.0, 1.0, 1.0), (1.5, 1.5, 1.5))
    assert "identical in all 2 runs" in text
    assert "| median | 35.7 | 10.0 | 13.0 | 5.0 | 5.5 | 2.2 |" in text
    for row in (
        "| mean ground-truth reward (held-out prompts) | +0.020 | +0.143 |",
        "| KL(pi_theta \\|\\| pi_ref), nats per completion | 0 | 0.168 ± 0.024 |",
        "| implicit-reward accuracy, 214 held-out pairs | - | 86.9% |",
        "| well-formed completions | 98.2% | 97.5% |",
        "| mean completion length, words | 4.87 | 4.97 |",
    ):
        assert row in text


# ── frontier_sentiment.py ────────────────────────────────────────────────────────────────────
def _numbers(row: str) -> list[str]:
    return re.findall(r"[+-]?\d+(?:\.\d+)?", row)


@pytest.mark.slow
def test_frontier_redraws_from_csv_into_a_new_folder(tmp_path, monkeypatch):
    frontier = load_benchmark("frontier_sentiment")
    out = tmp_path / "new" / "folder"
    monkeypatch.setattr(
        sys,
        "argv",
        ["frontier_sentiment.py", "--from_csv", str(BENCH / "results" / "frontier.csv"), "--out", str(out)],
    )
    frontier.main()
    png = out / "frontier.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    redrawn = table_rows((out / "frontier.md").read_text())
    committed = table_rows((BENCH / "results" / "frontier.md").read_text())
    assert len(redrawn) == len(committed) == 21  # header + 4 losses x 5 betas
    for new, old in zip(redrawn, committed):
        # same runs and the same numbers to their printed precision (the CSV keeps 4 decimals)
        assert new.split("|")[1:4] == old.split("|")[1:4]
        for a, b in zip(_numbers(new), _numbers(old), strict=True):
            last_digit = 10 ** -len(b.split(".")[1]) if "." in b else 1
            assert abs(float(a) - float(b)) <= last_digit + 1e-9, (new, old)


def test_frontier_refuses_a_hub_token(tmp_path, monkeypatch, capfd):
    frontier = load_benchmark("frontier_sentiment")
    tiny = cli(
        betas="0.1",
        loss_types="sigmoid",
        eval_prompts="8",
        out=tmp_path,  # were it not refused
        sft_examples="64",
        sft_steps="2",
        pair_prompts="16",
        heldout_pair_prompts="16",
        max_steps="1",
    )
    monkeypatch.setattr(
        sys, "argv", ["frontier_sentiment.py", *tiny, "--hub_token", "hf_x_secret", "--workdir", str(tmp_path)]
    )
    with pytest.raises(SystemExit) as exit_info:
        frontier.main()
    out, err = capfd.readouterr()
    assert exit_info.value.code == 2 and "HF_TOKEN" in err and "hf_x_secret" not in out + err
    assert not any(tmp_path.iterdir())  # refused before pi_ref was trained


# ── real_alignment.py ────────────────────────────────────────────────────────────────────────


def test_real_alignment_interval_and_ties():
    """The 95% interval the README's claim rests on (Wilson score), and a tie (policy = reference) counting half."""
    import torch

    sys.path.insert(0, str(BENCH))
    from real_measure import heldout_metrics, wilson

    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    assert wilson(120, 200)[0] > 0.5 > wilson(110, 200)[0]  # 60% of 200 excludes chance, 55% does not
    zero = torch.zeros(4)
    m = heldout_metrics(torch.tensor([1.0, 0.0, 0.0, 0.0]), zero, zero, zero, beta=0.1)
    assert m["accuracy"] == pytest.approx((1 + 0.5 * 3) / 4) and m["n"] == 4


# ── bench_sweep.py ───────────────────────────────────────────────────────────────────────────
def test_bench_sweep_reports_the_median_ratio_and_the_largest_difference():
    bench = load_benchmark("bench_sweep")

    class Args:
        rounds, loss_types, betas = 2, ["sigmoid"], [0.1, 1.0]

    def row(step, reward, kl):
        return {"loss_type": "sigmoid", "beta": "0.1", "step": step, "policy_reward": reward, "kl": kl}

    diff = bench.largest_difference([row(0, 0.1, 0.0), row(9, 0.3, 1.0)], [row(0, 0.1, 0.0), row(9, 0.3, 1.25)])
    assert diff == 0.25
    with pytest.raises(AssertionError):  # different scored points are not compared
        bench.largest_difference([row(0, 0.1, 0.0)], [row(9, 0.1, 0.0)])
    text = bench.markdown({"cache": [100.0, 110.0], "inline": [150.0, 160.0]}, diff, Args, (1.0, 2.0))
    assert "| 150, 160 | 155 |" in text and "| 100, 110 | 105 |" in text
    assert "**The cached sweep is 1.48x as fast end to end.**" in text and "2.5e-01" in text


# ── bench_training.py ────────────────────────────────────────────────────────────────────────
BENCH_TRAINING = load_benchmark("bench_training")


def test_training_numbers_are_the_benchmarked_ones():
    """Every decimal in benchmarks/README.md's "Faster and leaner" section (ratios, GB, padding, loss difference) is
    in bench_training.py's or bench_sweep.py's section of BENCHMARKS.md; 0.25x and 1.3x are the
    targets, not measurements."""
    readme = section(PAGE.read_text(), "## Faster and leaner than TRL, measured")
    text = (ROOT / "BENCHMARKS.md").read_text()
    measured = "".join(
        section(text, heading) for heading in (BENCH_TRAINING.SECTION, load_benchmark("bench_sweep").SECTION)
    )
    numbers = set(re.findall(r"\d+\.\d+(?:e-\d+)?", readme)) - {"0.25", "1.3"}
    assert len(numbers) >= 8, numbers
    assert sorted(n for n in numbers if n not in measured) == []


# ── README.md's results table ────────────────────────────────────────────────────────────────
RESULT_LINK = re.compile(r"\[([^\]]*(?:\[[^\]]*\][^\]]*)?)\]\(([^)#]+)#([^)]+)\)")


def github_anchor(heading: str) -> str:
    """The id GitHub gives a markdown heading: lower case, punctuation but - and _ dropped, spaces to -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def unlinked_results(readme: str) -> list[str]:
    """Each number of README's results table whose link does not lead to a heading of a file holding that number."""
    rows = table_rows(section(readme, "## Results"))
    links = [m for row in rows for m in RESULT_LINK.findall(row)]
    assert len(links) >= 7, rows
    problems = []
    for text, path, anchor in links:
        target = (ROOT / path).read_text()
        headings = [github_anchor(h) for h in re.findall(r"^#+ (.+)$", target, re.M)]
        if anchor not in headings:
            problems.append(f"{path}#{anchor}: no such heading")
        for number in re.findall(r"[+-]?\d+(?:\.\d+)?%?", text):
            if not re.search(rf"(?<![\d.]){re.escape(number)}(?![\d])", target):
                problems.append(f"{number} is not in {path}")
    return problems


def test_every_readme_result_links_to_the_output_that_holds_it():
    assert unlinked_results((ROOT / "README.md").read_text()) == []


def test_a_drifted_readme_result_is_caught():
    readme = (ROOT / "README.md").read_text()
    drifted = readme.replace("[86.9%]", "[87.9%]", 1)
    assert drifted != readme and unlinked_results(drifted) == ["87.9% is not in BENCHMARKS.md"]


DOCS = ["README.md", "BENCHMARKS.md", "recipes/README.md", "benchmarks/README.md", "notebooks/README.md", "docs/*.md"]


def broken_links(text: str, folder: Path) -> list[str]:
    """Each relative link of markdown `text` (code blocks left out) whose file, relative to `folder`, does not
    exist, or whose anchor is no heading of that file (an anchor alone: of the text's own file)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    broken = []
    for path, anchor in re.findall(r"\]\((?!https?://|mailto:)([^)#\s]*)(?:#([^)\s]+))?\)", text):
        target = folder / path if path else None
        if target is not None and not target.exists():
            broken.append(f"{path}: no such file")
        elif anchor and (target is None or target.is_file()):
            heads = re.findall(r"^#+ (.+)$", text if target is None else target.read_text(), re.M)
            if anchor not in [github_anchor(h) for h in heads]:
                broken.append(f"{path}#{anchor}: no such heading")
    return broken


@pytest.mark.parametrize("pattern", DOCS)
def test_every_relative_link_of_the_docs_resolves(pattern):
    """Moved sections stay reachable: each relative link of each page names a file that exists and, with an
    anchor, a heading of that file."""
    pages = sorted(ROOT.glob(pattern))
    assert pages, pattern
    for page in pages:
        assert broken_links(page.read_text(), page.parent) == [], page
    if pattern == "README.md":
        assert len(re.findall(r"\]\((?!https?://)", pages[0].read_text())) >= 10  # the check reads its links


def test_a_broken_link_is_caught(tmp_path):
    (tmp_path / "other.md").write_text("# A heading\n")
    text = "# Here\n[a](other.md#a-heading) [b](other.md#gone) [c](missing.md) [d](#here) [e](#nowhere)\n"
    text += "```\n[f](in-a-code-block.md)\n```\n"
    assert broken_links(text, tmp_path) == [
        "other.md#gone: no such heading",
        "missing.md: no such file",
        "#nowhere: no such heading",
    ]


def test_the_evaluate_benchmark_section_is_the_scripts_own_output():
    """benchmarks/bench_evaluate.py: its section starts with its heading (write_section replaces it there), the
    ratio is the median of each round's before-over-now time, and BENCHMARKS.md holds exactly what it writes for
    the committed numbers (from its description on: the machine line is the machine's)."""
    bench = load_benchmark("bench_evaluate")
    names = list(bench.CONFIGS)
    assert names[0] == bench.BEFORE and names[-1] == bench.NOW
    seconds = dict(zip(names, ([88.2, 95.1], [70.3, 76.6], [40.0, 50.0])))
    same = {"reward_accuracy": 0.25, "reward_margin": -0.0016, "kl": -0.1388}
    text = bench.markdown(seconds, {name: same for name in names}, 3, 64, 2)
    assert text.startswith(bench.SECTION + "\n")
    assert f"| {bench.BEFORE} | 30.55 |" in text and f"| {bench.NOW} | 15.00 |" in text  # medians 91.65/3, 45/3
    assert "**2.1x** faster (rounds: 2.2x, 1.9x)" in text  # 88.2/40 = 2.205, 95.1/50 = 1.902: median 2.054
    committed = (ROOT / "BENCHMARKS.md").read_text()
    start = committed.index(bench.SECTION)
    section = committed[start:].split("\n## ")[0].rstrip("\n") + "\n"
    rows = {r.split(" | ")[0].strip("| "): r.split(" | ") for r in section.splitlines() if r.startswith("| ")}
    rows = {name: r for name, r in rows.items() if name in bench.CONFIGS}
    assert set(rows) == set(names)
    # the same answers, so the same accuracy (the script checks it, and the margin and KL within their bound)
    assert len({r[3] for r in rows.values()}) == 1
    seconds = {name: [float(x) for x in r[2].split(", ")] for name, r in rows.items()}
    metrics = {
        name: {"reward_accuracy": float(r[3]), "reward_margin": float(r[4]), "kl": float(r[5].strip(" |"))}
        for name, r in rows.items()
    }
    again = bench.markdown(seconds, metrics, 3, 64, len(seconds[bench.NOW]))
    description = next(
        i for i, line in enumerate(again.splitlines()) if line.startswith("SmolLM2-135M-Instruct after")
    )
    assert section.splitlines()[description : description + 4] == again.splitlines()[description : description + 4]
    # the committed seconds are rounded to 0.1 s: the per-prompt median (over 3 prompts) is within 0.05 / 3 s
    # (+ its own rounding to 0.01) of the one recomputed from them, and the stated ratio within 0.1x
    for name, r in rows.items():
        assert abs(float(r[1]) - statistics.median(seconds[name]) / 3) <= 0.05 / 3 + 0.005
    ratio = statistics.median([a / b for a, b in zip(seconds[bench.BEFORE], seconds[bench.NOW])])
    assert abs(float(section.split(") against before (")[1].split("**")[1].split("x")[0]) - ratio) <= 0.1


def test_the_evaluate_benchmark_holds_the_paths_to_the_same_answers_and_metrics():
    """bench_evaluate's `agree`: the paths' accuracy and lengths are equal (the same answers); a different accuracy
    or length is refused. The margin and KL are left to tests/evaluation/test_scoring.py's per-row bound."""
    bench = load_benchmark("bench_evaluate")
    now = {"reward_accuracy": 0.25, "reward_margin": -0.00155630, "kl": -0.1388295, "beta": 0.1}
    now.update(greedy_length_policy=40.0, greedy_length_reference=41.0, sampled_length_ratio=1.1)
    measured = dict(now, reward_margin=-0.00155864, kl=-0.1388143)  # the whole-row path's values on one run
    assert bench.agree(measured, now)
    assert not bench.agree(dict(measured, reward_accuracy=0.5), now)
    assert not bench.agree(dict(measured, greedy_length_policy=39.0), now)
    assert not bench.agree(dict(measured, sampled_length_ratio=1.0), now)


def test_rounds_sweep_only_keeps_a_result_run_with_the_overrides_it_has_now(tmp_path, capsys):
    """`rounds_sweep.py --only X` keeps the other configurations' results from the last sweep: was by name alone,
    so a configuration whose overrides were edited since kept numbers it never ran with."""
    import json

    sweep = load_benchmark("rounds_sweep")
    (first, first_overrides, _), (second, second_overrides, _) = sweep.CONFIGS[:2]
    path = tmp_path / "rounds_sweep.json"
    configs = [{"name": first, "overrides": first_overrides}, {"name": second, "overrides": second_overrides}]
    path.write_text(json.dumps({"configs": [*configs, {"name": "retired", "overrides": []}]}))
    assert sweep.kept_results(path, [first]) == {second: configs[1]}  # run again: not kept; retired: dropped
    assert sweep.kept_results(tmp_path / "none.json", [first]) == {}
    configs[1]["overrides"] = [*second_overrides, "--beta", "0.5"]  # edited in CONFIGS since it ran
    path.write_text(json.dumps({"configs": configs}))
    with pytest.raises(SystemExit) as refused:
        sweep.kept_results(path, [first])
    assert f"holds ['{second}'] run with other overrides" in str(refused.value) and "add them to --only" in str(
        refused.value
    )
    assert sweep.kept_results(path, [first, second]) == {}  # both run again: nothing kept, nothing refused
