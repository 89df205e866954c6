"""`make gpu` rehearsed on CPU: benchmarks/gpu_run.py + bench_gpu.py at --scale tiny run every phase and
write the results folder that comes back from a CUDA machine without network, so the one GPU run cannot fail
on a typo; the wheels carried in `.whl/` and the tree fit what that machine takes; FLOPs are counted from the
real architecture; BENCHMARKS.md's GPU section is written from the results, also from a run cut short, and
the committed H200 run's section says what it measured (benchmarks/results/gpu/)."""

import json
import math
import re
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, load_script

WHEELS = load_script(ROOT / "benchmarks" / "gpu_wheels.py", "gpu_wheels")
FLOPS = load_script(ROOT / "benchmarks" / "gpu_flops.py", "gpu_flops")
SECTION = load_script(ROOT / "benchmarks" / "gpu_section.py", "gpu_section")
BENCH = load_script(ROOT / "benchmarks" / "bench_gpu.py", "bench_gpu")
PHI2 = load_script(ROOT / "benchmarks" / "phi2_random.py", "phi2_random")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    results, work = tmp_path_factory.mktemp("results"), tmp_path_factory.mktemp("work")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_run.py"), "--scale", "tiny", "--no-install"]
    cmd += ["--skip", "pytest,profile", "--bench", "--results", str(results), "--workdir", str(work)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return results, proc.stdout


@pytest.mark.slow
def test_the_tiny_rehearsal_runs_every_phase_and_every_run_is_finite(tiny_run):
    results, stdout = tiny_run
    data = json.loads((results / "results.json").read_text())
    lengths = BENCH.SCALES["tiny"]["lengths"]
    cells = {f"{p}_{n}" for p in BENCH.PRECISIONS for n in lengths}
    speed = {"trl_defaults", "trl_precompute", "recipe_plain"}
    assert cells | speed | {"curve_fp16", "curve_fp32"} <= set(data["runs"])
    for name, run in data["runs"].items():
        assert run["status"] == "ok", (name, run.get("error"))
        assert run["steps"] >= 1 and run["tokens_per_s"] > 0, name
        assert run["losses"] and all(math.isfinite(x) for x in run["losses"]), name
        assert isinstance(run["fused_lm_head"], bool), name  # whether TRL's fused LM head replaced the forward
        assert run["learning_rate"] > 0, name  # TRL's runs and the recipe's train at different rates
    assert data["runs"]["curve_fp16"]["steps"] == BENCH.SCALES["tiny"]["curve_steps"]
    assert data["fp16_curve"]["compared_steps"] == BENCH.SCALES["tiny"]["curve_fp32_steps"]
    assert data["t4_budget"]["attempts"] == [f"t4_fp32_{max(lengths)}"]  # the capped run is that cell
    for step in ("1/4 install", "2/4 check", "3/4 pytest", "4/4 profile: skipped", "bench_gpu.py: exit 0"):
        assert step in stdout
    assert "[bench_gpu +" in stdout  # bench_gpu.py's own progress lines come through as they are printed


@pytest.mark.slow
def test_the_results_folder_holds_a_few_plainly_named_files(tiny_run):
    results, _ = tiny_run
    files = sorted(p.name for p in results.rglob("*") if p.is_file())
    assert files == sorted(["progress.log", "env.txt", "bench.log", "results.json", "gpu_section.md"])
    # at most 8 flat files with plain names: what a copy back from a machine without network keeps safely
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)


@pytest.mark.slow
def test_the_gpu_section_is_written_from_the_results_and_names_what_a_cut_run_lacks(tiny_run, tmp_path):
    results, _ = tiny_run
    data = json.loads((results / "results.json").read_text())
    text = (results / "gpu_section.md").read_text()
    assert text.startswith(SECTION.SECTION) and "random weights" in text and "no real T4" in text
    assert "TRL's fused LM head" in text and "GiB, and their log-softmax copy" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "mixed precision" in line]
    assert len(rows) == 2 * len(BENCH.SCALES["tiny"]["lengths"]) and "not run" not in text
    del data["fp16_curve"]
    cut = SECTION.markdown(data, "make gpu")
    assert "Phases with no result (cut short?): fp16_curve" in cut
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\n## Other\n\nkept\n")
    (tmp_path / "results.json").write_text(json.dumps(data))
    SECTION.main([str(tmp_path / "results.json"), "--out", str(out)])
    assert "## Other\n\nkept" in out.read_text() and SECTION.SECTION in out.read_text()


GPU_RUN = ROOT / "benchmarks" / "results" / "gpu"  # the H200 run of 2026-12-04, as it came back


def committed_section() -> tuple[str, str]:
    """BENCHMARKS.md's GPU section as committed, and the command its first line names."""
    text = (ROOT / "BENCHMARKS.md").read_text()
    start = text.index(SECTION.SECTION)
    end = text.find("\n## ", start + 1)
    section = text[start : end + 1 if end >= 0 else None]
    return section, re.search(r"^The run: `(.+?)` \(", section, re.M).group(1)


def test_benchmarks_md_has_the_section_the_script_writes_from_the_committed_gpu_run():
    section, command = committed_section()
    data = json.loads((GPU_RUN / "results.json").read_text())
    # regenerated after every script change (the blank line before a following section is the file's, not the section's)
    assert section.rstrip() == SECTION.markdown(data, command, GPU_RUN, ROOT).rstrip()
    for target in re.findall(r"\]\(([^)]+)\)", section):
        assert (ROOT / target).is_file(), target  # every raw file it links is committed


def test_the_gpu_section_names_both_pytest_runs_the_finding_and_the_learning_rates():
    import dataclasses

    import yaml
    from trl import DPOConfig

    data = json.loads((GPU_RUN / "results.json").read_text())
    text = SECTION.markdown(data, "the command", GPU_RUN, ROOT)
    assert "(benchmarks/results/gpu/pytest.log): 1 failed, 9 passed (test_fp16_attention_stays_finite" in text
    assert "(benchmarks/results/gpu/pytest-rerun.log): 10 passed" in text and "The run: `the command`" in text
    runs = data["runs"]
    recipe, informed, plain = runs["bf16_1024"], runs["trl_precompute"], runs["trl_defaults"]
    finding = next(line for line in text.splitlines() if line.startswith("**Finding**"))
    for a, b in ((recipe, informed), (recipe, plain)):
        assert f"({a['tokens_per_s'] / b['tokens_per_s']:.2f}x)" in finding
    assert f"{recipe['peak_allocated_gib']:.2f} vs {informed['peak_allocated_gib']:.2f} GiB" in finding
    slower = recipe["tokens_per_s"] < informed["tokens_per_s"]
    assert ("is **not** faster per step" in finding) == slower and "not measured yet" in finding
    assert "mean loss" not in text  # losses at different learning rates are not set side by side
    trl_lr = next(f.default for f in dataclasses.fields(DPOConfig) if f.name == "learning_rate")
    yaml_lr = yaml.safe_load((ROOT / "recipes" / "dpo_phi2.yaml").read_text())["learning_rate"]
    assert trl_lr != yaml_lr and f"learning rate ({trl_lr:g})" in text and f"dpo_phi2.yaml's ({yaml_lr:g})" in text
    for line in text.splitlines():  # the fp32 setting is named as the T4 default only for the past
        assert not ("T4" in line and "fp32" in line) or "before this run" in line, line
    assert "fp16 mixed precision (the T4 default since this run" in text
    assert "liger-kernel ?" not in text and f"liger-kernel {data['env']['liger-kernel']}" in text


def test_the_carried_wheels_are_our_pins_and_fit_the_gpu_machine_with_the_tree():
    want = WHEELS.wanted()
    pins = dict(re.findall(r"^([a-z]+)==(\S+)", (ROOT / "requirements.txt").read_text(), re.M))
    for name in WHEELS.PINNED:
        assert want[name] == pins[name]
    if WHEELS.FOLDER.is_dir():  # downloaded here (make gpu-wheels): check the real folder
        assert WHEELS.problems() == []
    else:  # a fresh clone: the tree plus the wheels' recorded size
        assert WHEELS.travelling_bytes() + WHEELS.WHEELS_MIB * 2**20 < WHEELS.LIMIT


def test_the_wheel_check_names_missing_duplicate_and_oversized_wheels(tmp_path):
    want = WHEELS.wanted()
    for name, version in want.items():
        (tmp_path / f"{name.replace('-', '_')}-{version}-py3-none-any.whl").touch()
    assert WHEELS.problems(tmp_path) == []
    (tmp_path / "trl-1.15.0-py3-none-any.whl").touch()  # two versions stop the whole install there
    (tmp_path / f"dill-{want['dill']}-py3-none-any.whl").unlink()
    with open(tmp_path / "extra-1.0-py3-none-any.whl", "wb") as f:
        f.truncate(WHEELS.LIMIT)  # sparse: 64 MiB long, no disk used
    found = "\n".join(WHEELS.problems(tmp_path))
    assert "trl: want 1.16.0" in found and "dill: want" in found and "extra: not one of ours" in found
    assert "over the 64 MiB" in found


def test_flops_count_the_real_architectures_matmuls_and_lora():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from dpo.offline.tiny import build_tokenizer

    modules = ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]
    for scale in ("phi2", "tiny"):
        config = PHI2.phi2_config(scale, build_tokenizer())
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        model = get_peft_model(model, LoraConfig(r=16, target_modules=modules))
        lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        shape = FLOPS.model_shape(config, 16, modules)
        assert (shape["n"], shape["n_lora"]) == (linear, lora), scale
    assert FLOPS.model_shape(PHI2.phi2_config("phi2", build_tokenizer()), 16, modules)["n"] == 2_647_654_400
    n, attention = 2_647_654_400, 4 * 32 * 2560 * 1024
    cached = FLOPS.flops_per_token(shape | {"n": n, "n_lora": 0, "layers": 32, "hidden": 2560}, 1024, False)
    assert cached == 4 * n + 3 * attention  # policy forward + input-gradient backward, no reference
    assert FLOPS.peak_flops("NVIDIA H200", "bf16") == 989e12 and FLOPS.peak_flops("Tesla T4", "bf16") is None


def test_the_random_model_is_reused_only_whole_and_of_its_scale(tmp_path):
    """bench_gpu.py and gpu_profile.py reused a model folder as soon as a config.json (or weights file) was there:
    a build killed half way (5.4 GB at phi-2 size, at the budget's timeout) or another scale's was loaded. The
    build is renamed into place whole with its record; another scale's is replaced; a folder it did not build
    is refused."""
    folder = tmp_path / "model"
    assert not PHI2.built_model("tiny", folder)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")  # what a killed save_pretrained leaves first
    assert not PHI2.built_model("tiny", tmp_path / "half")
    with pytest.raises(SystemExit, match="holds no random_model.json"):
        PHI2.make_model("tiny", tmp_path / "half")
    made = PHI2.make_model("tiny", folder)
    assert made["parameters"] > 0 and PHI2.built_model("tiny", folder) and not PHI2.built_model("phi2", folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["half", "model"]  # no staging left
    PHI2.make_model("tiny", folder)  # ours: replaced whole
    assert PHI2.built_model("tiny", folder) and (folder / "config.json").is_file()
