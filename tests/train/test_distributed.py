"""Several processes, executed for real on CPU (gloo): data parallel, FSDP and two "machines" on
the loopback address, each compared with one process on the same data order.

2 processes x b pairs see the same pairs per optimizer step as 1 process x 2b: accelerate's
sampler draws one seeded permutation whatever the world size and deals consecutive per-process
batches to ranks 0, 1, 0, 1, ...; DDP averages the two halves' gradients, which equals the
gradient of the mean over all 2b pairs. What differs is only float summation order (two partial
sums of b, then an average, instead of one sum of 2b), and Adam at a large learning rate carries
those last bits into the weights; how far depends on the CPU's math kernels.

Tolerance, measured instead of guessed: the one-process run is repeated with the pairs of every
batch in reverse order (same pairs, same steps: only the summation order changes). Its distance
from the plain one-process run is the noise floor of this very machine, and the 2-process runs
must stay within FLOOR_MULTIPLE of it, as relative norms (||a - b|| / ||b|| per tensor, or per
logged metric over the steps). A real difference (a step off, one pair changed) moves these
numbers by orders of magnitude more; `test_the_floor_separates_a_real_difference` checks that.

The launches start together (module fixture) so their imports share the two cores.
"""

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, load_recipe, with_overrides
from safetensors.torch import load_file

from dpo.compat import REWARD_METRICS, DataCollatorForPreference

# How many times the reordering floor a 2-process run may differ. Two half-batch sums + gloo's
# average reorder the same sums that reversing the batch does; measured on an Intel Xeon with
# AVX512-BF16 the 2-process distance was 0.56x the floor (1.35e-6). 8 leaves room for another CPU's
# kernels while staying far below a real difference (see test_the_floor_separates_a_real_difference).
FLOOR_MULTIPLE = 8

STEPS = 3
PER_DEVICE = 2  # pairs per process per step; the one-process reference takes 2 x this
EVAL_PER_DEVICE = 5  # 12 held-out pairs, 10 per global eval batch: the last batch is padded under 2 processes
COMMON = [
    "--max_steps",
    str(STEPS),
    "--gradient_accumulation_steps",
    "1",
    "--learning_rate",
    "1e-2",  # large: every LoRA weight moves, so differences would show
    "--test_size",
    "0.25",  # 12 of the 48 rows held out
    "--eval_strategy",
    "no",  # one evaluation, after training (train_and_save)
    "--save_strategy",
    "no",
    # Inline reference: at step 1 policy = reference, so every reward is 0 and rewards/accuracies 0.
    # Cached values differ from a batch's own forward by round-off (other padding), which turns those
    # ties into random signs that differ between 1 and 2 processes. The cache under several processes
    # is tested in tests/train/speed/test_refcache.py.
    "--reference_cache",
    "false",
    # The comparison as it was designed: random batches (length grouping under several processes is
    # checked in tests/train/speed/test_sampler.py).
    "--train_sampling_strategy",
    "random",
    "--logging_steps",
    "1",
]
COMPARED = ("loss", "grad_norm", *REWARD_METRICS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: str, out, facts, *launch_flags, recipe_flags=(), env=None):
    """Start `accelerate launch` on tests/_launch_recipe.py (not waited for), in its own process
    group, as a terminal would run it."""
    out.mkdir(parents=True, exist_ok=True)
    facts.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "accelerate_configs" / config),
        *launch_flags,
        str(ROOT / "tests" / "_launch_recipe.py"),
        "dpo_phi2",
        *recipe_flags,
        "--output_dir",
        str(out),
    ]
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # this checkout's dpo/ first
    env = {**os.environ, "PYTHONPATH": path, "DPO_TEST_FACTS": str(facts), **(env or {})}
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT, start_new_session=True
    )


def finish(proc, timeout=300, ok=True) -> str:
    output, _ = proc.communicate(timeout=timeout)
    assert (proc.returncode == 0) == ok, output[-4000:]
    return output


def run_flags(tiny_model_dir, truthy_file) -> tuple[list[str], list[str]]:
    """(flags every compared run shares, those plus the 2-process batch sizes)."""
    data = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(truthy_file), *COMMON]
    return data, [
        *data,
        "--per_device_train_batch_size",
        str(PER_DEVICE),
        "--per_device_eval_batch_size",
        str(EVAL_PER_DEVICE),
    ]


# Every test here starts `accelerate launch` processes (~60 s for the module on 2 cores).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tiny_model_dir, truthy_file, tmp_path_factory):
    data, two = run_flags(tiny_model_dir, truthy_file)
    base = tmp_path_factory.mktemp("distributed")
    nodes_port = free_port()
    started = {
        "dp": [launch("multi_cpu.yaml", base / "dp", base / "dp_facts", "--main_process_port", "0", recipe_flags=two)],
        # two "machines" on one host: each runs 1 of the 2 processes; machine 0 hosts the rendezvous
        "nodes": [
            launch(
                "multi_cpu.yaml",
                base / "nodes",
                base / "nodes_facts",
                *("--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank)),
                *("--main_process_ip", "127.0.0.1", "--main_process_port", str(nodes_port)),
                recipe_flags=two,
            )
            for rank in (0, 1)
        ],
    }
    # FSDP on CPU processes: refused before any weights load (accelerate would silently not shard)
    fsdp = launch("fsdp.yaml", base / "fsdp", base / "fsdp_facts", "--main_process_port", "0", recipe_flags=two)
    # the one-process reference runs here meanwhile: same data, 2x the batch, same seed
    one = [
        *data,
        "--per_device_train_batch_size",
        str(2 * PER_DEVICE),
        "--per_device_eval_batch_size",
        str(2 * EVAL_PER_DEVICE),
    ]
    load_recipe("dpo_phi2").main([*one, "--output_dir", str(base / "one")])
    with pytest.MonkeyPatch.context() as patch:  # the noise floor: same run, each batch's pairs reversed
        collate = DataCollatorForPreference.__call__
        patch.setattr(
            DataCollatorForPreference, "__call__", lambda self, rows, *a, **k: collate(self, rows[::-1], *a, **k)
        )
        load_recipe("dpo_phi2").main([*one, "--output_dir", str(base / "one_reversed")])
    # a real difference of the smallest kind: one step fewer
    load_recipe("dpo_phi2").main(
        with_overrides(one, "--max_steps", str(STEPS - 1), "--output_dir", str(base / "one_step_less"))
    )
    logs = {name: "".join(finish(p) for p in procs) for name, procs in started.items()}
    logs["fsdp"] = finish(fsdp, ok=False)
    return {"base": base, "logs": logs}


def train_logs(out) -> list[dict]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [h for h in history if "loss" in h]


def facts(folder) -> list[dict]:
    return [json.loads((folder / f"facts-rank{r}.json").read_text()) for r in (0, 1)]


def relative_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||: how far `a` is from `b` as a share of `b`'s size (0 when equal)."""
    scale = b.norm().item()
    return (a - b).norm().item() / scale if scale else float((a != b).any())


def distances(run_dir, one_dir) -> dict[str, float]:
    """Relative distance of every compared number of `run_dir` from the one-process run: each logged
    training metric over the steps, each held-out reward metric, each final LoRA tensor."""
    many, one = train_logs(run_dir), train_logs(one_dir)
    assert [h["step"] for h in many] == [h["step"] for h in one] == list(range(1, STEPS + 1))
    out = {
        k: relative_distance(torch.tensor([h[k] for h in many]), torch.tensor([h[k] for h in one])) for k in COMPARED
    }
    m_many = json.loads((run_dir / "final_metrics.json").read_text())
    m_one = json.loads((one_dir / "final_metrics.json").read_text())
    # eval_loss is left out: the Trainer averages each process's batch-mean loss, and in a padded
    # last batch that mean includes the padding pairs. The per-pair metrics below count each once.
    keys = [f"eval_{k}" for k in REWARD_METRICS]
    out["eval metrics"] = relative_distance(
        torch.tensor([m_many[k] for k in keys]), torch.tensor([m_one[k] for k in keys])
    )
    w_many = load_file(run_dir / "adapter_model.safetensors")
    w_one = load_file(one_dir / "adapter_model.safetensors")
    assert sorted(w_many) == sorted(w_one) and len(w_one) == 24
    out.update({name: relative_distance(w_many[name], w_one[name]) for name in w_one})
    return out


def noise_floor(base) -> float:
    """The largest relative distance that reversing each batch (summation order only) makes, over
    every compared number; float32's own resolution (2^-23) where reordering changed nothing."""
    return max(2**-23, *distances(base / "one_reversed", base / "one").values())


def assert_same_training(run_dir, base):
    """Per-step loss and gathered reward metrics, held-out metrics and final adapter weights, within
    FLOOR_MULTIPLE x this machine's measured reordering floor of the one-process run."""
    one = train_logs(base / "one")
    assert abs(one[-1]["rewards/margins"]) > 1e-2, "training hardly moved: the comparison could not fail"
    floor, found = noise_floor(base), distances(run_dir, base / "one")
    worst = max(found, key=found.get)
    print(f"{run_dir.name}: worst {worst} at {found[worst]:.3g} = {found[worst] / floor:.2f} x the floor {floor:.3g}")
    assert found[worst] <= FLOOR_MULTIPLE * floor, (
        f"{worst}: {found[worst]:.3g} > {FLOOR_MULTIPLE} x floor {floor:.3g}"
    )


def test_the_floor_separates_a_real_difference(runs):
    """The bound can fail: one step fewer (the smallest real difference in training) is far outside it."""
    base = runs["base"]
    floor = noise_floor(base)
    w_less = load_file(base / "one_step_less" / "adapter_model.safetensors")
    w_one = load_file(base / "one" / "adapter_model.safetensors")
    worst = max(relative_distance(w_less[n], w_one[n]) for n in w_one)
    assert worst > 100 * FLOOR_MULTIPLE * floor, (worst, floor)


def test_two_processes_train_as_one_process_with_twice_the_batch(runs):
    base, log = runs["base"], runs["logs"]["dp"]
    assert_same_training(base / "dp", base)
    rank0, rank1 = facts(base / "dp_facts")
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["distributed_type"] == "MULTI_CPU"
    assert "topology: world size 2 processes (data parallel: a full copy per process, gloo)" in log
    assert "effective batch 4 pairs = 2 per device x 1 accumulation x 2 processes" in log


def test_data_doctor_runs_once_on_the_main_process(runs):
    rank0, rank1 = facts(runs["base"] / "dp_facts")
    assert (rank0["doctor_runs"], rank1["doctor_runs"]) == (1, 0)
    assert runs["logs"]["dp"].count("data doctor:") == 1  # its table is printed once


def test_only_the_main_process_writes_outputs(runs):
    base, log = runs["base"], runs["logs"]["dp"]
    assert sorted(p.name for p in (base / "dp").iterdir()) == sorted(p.name for p in (base / "one").iterdir())
    assert log.count("[dpo-recipes] done:") == 1


def test_resolved_config_records_world_size_and_effective_batch(runs):
    text = (runs["base"] / "dp" / "resolved_config.yaml").read_text()
    assert re.search(r"^# world_size: 2$", text, re.M)
    assert re.search(r"^# effective_train_batch_size: 4 ", text, re.M)
    one = (runs["base"] / "one" / "resolved_config.yaml").read_text()
    assert re.search(r"^# world_size: 1$", one, re.M) and re.search(r"^# effective_train_batch_size: 4 ", one, re.M)


def test_fsdp_on_cpu_processes_is_refused_not_silently_unsharded(runs):
    """accelerate 1.15 enables FSDP only on GPU-type devices: on CPU processes fsdp.yaml would run
    plain data parallel. The recipe says so, once, and exits 2 before loading weights."""
    log = runs["logs"]["fsdp"]
    assert log.count("error: FSDP was requested on CPU processes") == 1
    assert "Loading weights" not in log


def test_two_machines_on_loopback_train_as_one_process(runs):
    base, log = runs["base"], runs["logs"]["nodes"]
    assert "topology: world size 2 processes on 2 machines" in log
    assert_same_training(base / "nodes", base)


# ── slow: failure paths (each a launch or two of its own) ──────────────────────────────────


def small_run(tiny_model_dir, truthy_file, *extra):
    return [
        "--model_name_or_path",
        str(tiny_model_dir),
        "--dataset_name",
        str(truthy_file),
        "--gradient_accumulation_steps",
        "1",
        "--per_device_train_batch_size",
        "2",
        "--test_size",
        "0",
        *extra,
    ]


def launch_two_cpu(tmp_path, flags, env=None):
    """2 CPU processes (multi_cpu.yaml) writing to tmp_path/out, any free port."""
    return launch(
        "multi_cpu.yaml", tmp_path / "out", tmp_path / "facts", "--main_process_port", "0", recipe_flags=flags, env=env
    )


def test_a_crash_in_one_process_stops_all_and_resume_continues(tiny_model_dir, truthy_file, tmp_path):
    """Rank 1 fails at step 3 (a checkpoint exists at step 2): the whole job stops, the failure is
    reported once, and a resumed 2-process launch runs only steps 3 and 4."""
    flags = small_run(tiny_model_dir, truthy_file, "--max_steps", "4", "--save_steps", "2")
    crashed = launch_two_cpu(tmp_path, flags, env={"DPO_TEST_CRASH": "1:3"})
    log = finish(crashed, ok=False)
    assert log.count("RuntimeError: test crash in rank 1 at step 3") == 1
    assert "[dpo-recipes] done:" not in log  # rank 0 did not go on alone
    assert (tmp_path / "out" / "checkpoint-2" / "optimizer.pt").is_file()
    resumed = launch_two_cpu(tmp_path, [*flags, "--resume_from_checkpoint", "last"])
    finish(resumed)
    assert [h["step"] for h in train_logs(tmp_path / "out")] == [1, 2, 3, 4]
    assert json.loads((tmp_path / "out" / "trainer_state.json").read_text())["global_step"] == 4


def test_ctrl_c_under_two_processes_saves_a_resumable_checkpoint(tiny_model_dir, truthy_file, tmp_path):
    flags = small_run(tiny_model_dir, truthy_file, "--max_steps", "4", "--save_steps", "100")
    interrupted = launch_two_cpu(tmp_path, flags, env={"DPO_TEST_CTRL_C": "3"})
    log = finish(interrupted, ok=False)
    assert (tmp_path / "out" / "checkpoint-3" / "optimizer.pt").is_file(), log[-3000:]
    assert log.count("SIGINT at step 3: checkpoint saved") == 1, log[-4000:]  # one message, from rank 0
    resumed = launch_two_cpu(tmp_path, [*flags, "--resume_from_checkpoint", "last"])
    finish(resumed)
    assert json.loads((tmp_path / "out" / "trainer_state.json").read_text())["global_step"] == 4


def test_a_user_error_under_two_processes_is_printed_once(tiny_model_dir, truthy_file, tmp_path):
    """Both processes meet the same refused setting: the error line is printed once (by local rank 0), and the
    launcher's variables (torchrun's, with a port it chose) pass the launch check (dpo/gate/launch.py)."""
    flags = small_run(tiny_model_dir, truthy_file, "--max_steps", "1", "--learning_rate", "0")
    log = finish(launch_two_cpu(tmp_path, flags), ok=False)
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "learning_rate" in errors[0], log[-3000:]
    assert "environment variable" not in log


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed (not pinned)")
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_on_cpu_trains_as_one_process(runs, stage, tmp_path, tiny_model_dir, truthy_file):
    """DeepSpeed's CPU accelerator (gloo): ZeRO-2/3 with the 4-bit base, compared like data parallel."""
    _, two = run_flags(tiny_model_dir, truthy_file)
    proc = launch(
        f"deepspeed_zero{stage}.yaml",
        tmp_path / "out",
        tmp_path / "facts",
        "--main_process_port",
        str(free_port()),
        recipe_flags=[*two, "--reference_cache", "false"],  # the cache does not serve DeepSpeed yet
    )
    log = finish(proc, timeout=600)
    rank0, _ = facts(tmp_path / "facts")
    assert rank0["distributed_type"] == "DEEPSPEED"
    if stage == 3:
        assert rank0["lora_numel_local"] < rank0["lora_numel_global"], "ZeRO-3 did not partition the LoRA weights"
        assert "storing 4-bit weights as float32" in log
    assert_same_training(tmp_path / "out", runs["base"])
