"""The GPU step profile (benchmarks/gpu_profile.py, issue 38) rehearsed on the CPU at the tiny scale, so the one GPU
run cannot fail on a typo: interleaved runs, every phase and kernel class in profile.json and in the Markdown, a
configuration the installed recipe cannot run reported as skipped with the reason, the budget's cut named; the
kernel classes' declared table checked on CPU op names and on typical CUDA kernel names. Counted, not timed."""

import json
import re
import subprocess
import sys

import pytest
from helpers import ROOT, load_script

PROFILE = load_script(ROOT / "benchmarks" / "gpu_profile.py", "gpu_profile")
PROFILE_SECTION = load_script(ROOT / "benchmarks" / "profile_section.py", "profile_section")
from benchmarks import kernel_classes, profile_plan  # noqa: E402  (gpu_profile.py put the checkout on sys.path)
from benchmarks.phase_clock import PHASES  # noqa: E402

UNKNOWN = "recipe_unknown_setting"  # a configuration whose setting no recipe knows: skipped, with the reason
CELLS = f"1024:trl_precompute,recipe,{UNKNOWN};any:generation"


def test_every_typical_cuda_kernel_name_lands_in_its_class():
    for name, expected in kernel_classes.CUDA_EXAMPLES.items():
        assert kernel_classes.classify(name) == expected, name
    assert set(kernel_classes.CUDA_EXAMPLES.values()) == set(kernel_classes.CLASSES) - {"lm_head"}


def test_cpu_op_names_land_in_the_same_classes():
    ops = {
        "aten::mm": "gemm",
        "aten::addmm": "gemm",
        "aten::bmm": "gemm",
        "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
        "aten::gelu": "elementwise",
        "aten::add_": "elementwise",
        "aten::native_layer_norm": "elementwise",
        "aten::_foreach_norm": "elementwise",
        "aten::_fused_adamw_": "optimizer",
        "aten::embedding": "other",
        "aten::index_select": "other",
    }
    for name, expected in ops.items():
        assert kernel_classes.classify(name) == expected, name


def test_where_a_kernel_was_launched_from_decides_before_its_name():
    gemm = "nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT"
    assert kernel_classes.classify(gemm, ("aten::mm", "profile::lm_head")) == "lm_head"
    backward = "autograd::engine::evaluate_function: _ChunkedLogProbFunctionBackward"
    assert kernel_classes.classify(gemm, ("aten::mm", backward)) == "lm_head"
    foreach = "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<...LpNormFunctor...>"
    assert kernel_classes.classify(foreach, ("aten::_foreach_norm", "Optimizer.step#AdamW.step")) == "optimizer"
    assert kernel_classes.classify("aten::mul", ("bitsandbytes::dequantize_4bit",)) == "dequantize"


def test_runs_are_interleaved_round_by_round_within_a_tier():
    cells = profile_plan.cells_of("1024:recipe_auto,recipe,trl_precompute;truthy:recipe;any:generation")
    order = [(c, s, r) for c, s, r in profile_plan.plan(cells, 2)]
    assert order == [
        ("recipe", "1024", 0),
        ("trl_precompute", "1024", 0),
        ("recipe", "truthy", 0),
        ("recipe", "1024", 1),
        ("trl_precompute", "1024", 1),
        ("recipe", "truthy", 1),
        ("recipe_auto", "1024", 0),  # tier 2 after tier 1; generation once
        ("generation", "any", 0),
        ("recipe_auto", "1024", 1),
    ]


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory, one_torch_thread):
    results, work = tmp_path_factory.mktemp("profile"), tmp_path_factory.mktemp("work")
    profile_plan.CONFIGS[UNKNOWN] = dict(
        side="recipe", settings={"gradient_accumulation_steps": 1, "no_such_setting": 1}, tier=1, what="unknown"
    )
    try:
        argv = ["--scale", "tiny", "--in-process", "--results", str(results), "--workdir", str(work)]
        assert PROFILE.main(argv + ["--cells", CELLS, "--runs", "2", "--steps", "2"]) == 0
    finally:
        del profile_plan.CONFIGS[UNKNOWN]
    data = json.loads((results / "profile.json").read_text())
    return data, (results / "profile_section.md").read_text()


@pytest.mark.slow
def test_the_tiny_profile_runs_interleaved_and_skips_what_the_recipe_cannot_run(tiny_profile):
    data, _ = tiny_profile
    order = [(r["config"], r["run"]) for r in data["runs"]]
    first, second = [("trl_precompute", 0), ("recipe", 0), (UNKNOWN, 0)], [("trl_precompute", 1), ("recipe", 1)]
    assert order == first + second + [(UNKNOWN, 1), ("generation", 0)]
    for run in data["runs"]:
        if run["config"] == UNKNOWN:
            assert run["status"] == "skipped" and "no_such_setting" in run["reason"]
        else:
            assert run["status"] == "ok", run
    generation = data["runs"][-1]
    assert generation["sequences"] > 0 and {"batched_tokens_per_second", "speedup"} <= set(generation)


@pytest.mark.slow
def test_every_timed_step_has_every_phase_and_every_profile_every_class(tiny_profile):
    data, _ = tiny_profile
    steps = profile_plan.SCALES["tiny"]
    for run in (r for r in data["runs"] if r["status"] == "ok" and r["config"] != "generation"):
        assert run["timed_steps"] == len(run["steps"]) == len(run["step_tokens"]) == 2
        assert all(n > 0 for n in run["step_tokens"])  # counted on the device from the attention masks
        for step in run["steps"]:
            assert list(step["phases"]) == list(PHASES)
            # the phases add up to the step's own start-to-end time: every interval counted once (float sums:
            # the differences of one clock's readings telescope, up to rounding, far below 1e-9 relative)
            assert sum(step["phases"].values()) == pytest.approx(step["seconds"], rel=1e-9)
        profile = run["profile"]
        assert profile["steps"] == steps["profiled"] and list(profile["kernel_ms_per_step"]) == list(
            kernel_classes.CLASSES
        )
        assert profile["launches_per_step"] > 0 and profile["syncs_per_step"] >= 1  # the loss is read each step
        assert run["micro_batch"] == 2 and run["accumulation"] == 1
        assert run["model_tflops"] > 0 and run["mfu"] is None  # FLOPs counted; no datasheet peak for a CPU
    recipe = next(r for r in data["runs"] if r["config"] == "recipe")
    assert recipe["optim"] == "adamw_torch_fused"  # dpo/train/hardware.py's choice, read back from the trainer
    for cell in ("trl_precompute@1024", "recipe@1024"):
        assert data["cells"][cell]["runs"] == 2 and set(data["cells"][cell]["phases_s"]) == set(PHASES)


@pytest.mark.slow
def test_the_markdown_has_every_phase_class_and_skip_reason(tiny_profile):
    data, text = tiny_profile
    header = next(line for line in text.splitlines() if line.startswith("| configuration | data"))
    assert all(f" {p} |" in header for p in PHASES)
    header = next(line for line in text.splitlines() if line.startswith("| configuration | gemm"))
    assert all(f" {c} |" in header for c in kernel_classes.CLASSES)
    assert f"| `{UNKNOWN}` | unknown | skipped: " in text and "no_such_setting" in text
    for change in profile_plan.NOT_SEPARABLE:
        assert f"| - | {change} | not measured on its own: no setting" in text
    row = next(line for line in text.splitlines() if line.startswith("| GPU (CPU, the tiny phi, 1024 tokens"))
    ratio = row.split("[")[1].split("x (")[0]  # README's number is the section's own ratio of medians
    assert "| `recipe` | 2 | 2 x 1 | " in text and f"| {ratio}x |" in text and "batched" in text
    anchor = "#" + re.sub(r"[^\w\- ]", "", PROFILE_SECTION.SECTION.lstrip("# ").lower()).replace(" ", "-")
    assert f"](BENCHMARKS.md{anchor})" in row  # GitHub's id of the section's heading
    assert "| recipe / TRL + precompute, T4 setting | " in text and "| `auto` uncapped, bf16 MFU | - |" in text
    assert text == PROFILE_SECTION.markdown(data)  # the script's section is the one written from profile.json


@pytest.mark.slow
def test_a_run_past_the_budget_is_skipped_and_named(tmp_path):
    argv = ["--scale", "tiny", "--in-process", "--results", str(tmp_path / "r"), "--workdir", str(tmp_path / "w")]
    assert PROFILE.main(argv + ["--cells", "1024:recipe", "--runs", "2", "--budget", "0"]) == 0
    data = json.loads((tmp_path / "r" / "profile.json").read_text())
    assert [r["status"] for r in data["runs"]] == ["skipped", "skipped"]
    assert all(r["reason"].startswith("budget: ") for r in data["runs"])
    assert (
        "Not measured: `recipe` at 1024 run 1: skipped (budget: "
        in (tmp_path / "r" / "profile_section.md").read_text()
    )


@pytest.mark.slow
def test_make_gpu_runs_the_profile_in_processes_of_its_own_within_the_budget(tmp_path):
    """gpu_run.py's phase 4 on the CPU: the profile gets what is left of --budget, one run in a child process."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_run.py"), "--scale", "tiny", "--no-install"]
    cmd += ["--skip", "pytest", "--results", str(tmp_path / "r"), "--workdir", str(tmp_path / "w"), "--budget", "400"]
    cmd += ["--profile-cells", "1024:recipe", "--profile-runs", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "4/4 gpu_profile.py: exit 0" in proc.stdout
    data = json.loads((tmp_path / "r" / "profile.json").read_text())
    assert data["settings"]["budget_s"] < 400 - 15  # what was left after install and check, less the margin
    assert [(r["config"], r["status"]) for r in data["runs"]] == [("recipe", "ok")]
    assert data["runs"][0]["wall_s"] > 0  # a child process of its own, timed by the driver
    assert (tmp_path / "r" / "profile_section.md").is_file() and (tmp_path / "r" / "profile.log").is_file()
    assert "=== recipe 1024 0: exit 0" in (tmp_path / "r" / "profile-runs.log").read_text()
