"""A hub id the Hub cannot serve fails once, in seconds, saying how to work offline; a name that looks like a
path is a missing path, never tried on the Hub (dpo/hub.py).

The Hub "does not answer" here by pointing HF_ENDPOINT at 127.0.0.1 port 9 (discard: nothing listens, the
connection is refused at once), so these tests mean the same with or without a network."""

import os
import shutil
import socket
import subprocess
import sys

import datasets.config
import huggingface_hub.constants
import pytest
from helpers import ROOT, load_recipe

import dpo.hub
from dpo.hub import OFFLINE_MODEL_COMMAND, local_reason

NOWHERE = "http://127.0.0.1:9"
# Without the one probe, huggingface_hub retries each request 5 times, sleeping 1 + 2 + 4 + 8 + 8 = 23 s
# (utils/_http.py) before a hub id fails. The tests count the HTTP requests made, not the seconds: the probe's
# one HEAD and nothing after it means no retry ran, on any machine however loaded (a bound of 23 s failed at
# 32.1 s on a busy 2-core machine).
PROBE_ONLY = [("HEAD", NOWHERE)]


def counting_requests(monkeypatch) -> list:
    """Every HTTP request huggingface_hub's client sends from now on, as (method, url without its trailing /),
    and the timeouts they were sent with (request.extensions['timeout']) in a second list."""
    from huggingface_hub import get_session

    client = type(get_session())  # the class huggingface_hub sends with (httpx2.Client in 2.4)
    sent, timeouts = [], []
    original = client.send

    def send(self, request, *args, **kwargs):
        sent.append((request.method, str(request.url).rstrip("/")))
        timeouts.append(request.extensions.get("timeout"))
        return original(self, request, *args, **kwargs)

    monkeypatch.setattr(client, "send", send)
    return sent, timeouts


@pytest.fixture
def hub_unanswering(monkeypatch):
    """This process as a user without HF_HUB_OFFLINE whose Hub does not answer; everything restored after
    (offline_if_unreachable switches the process offline, as it should)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", NOWHERE)
    probe = dpo.hub.hub_unreachable  # a test may replace it
    probe.cache_clear()
    yield
    probe.cache_clear()


def run_recipe(argv, capsys) -> str:
    recipe = load_recipe("dpo_any")
    with pytest.raises(SystemExit) as exit_info:
        recipe.main([str(a) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err[err.index("error: ") :]


def test_a_hub_model_that_cannot_be_reached_fails_fast_naming_the_offline_ways(
    hub_unanswering, tmp_path, capsys, no_weights_load, monkeypatch
):
    data = ROOT / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
    argv = ["--model_name_or_path", "org-x/no-such-model", "--dataset_name", data, "--output_dir", tmp_path / "o"]
    sent, _ = counting_requests(monkeypatch)
    err = run_recipe(argv, capsys)
    assert sent == PROBE_ONLY, f"requests after the probe (the library's retries): {sent}"
    assert err.startswith(f"error: could not load model 'org-x/no-such-model': {NOWHERE} did not answer")
    assert "HF_HUB_OFFLINE=1" in err and OFFLINE_MODEL_COMMAND in err
    assert "hf download org-x/no-such-model --local-dir ./no-such-model" in err
    assert "--model_name_or_path ./no-such-model" in err


@pytest.mark.parametrize("setting", ["--reward_model", "reward"])  # python -m dpo.evaluate's flag, the rounds' key
def test_a_hub_reward_model_that_cannot_be_reached_names_its_own_setting(setting, hub_unanswering):
    """Was "... pass --model_name_or_path ./rm; or build SmolLM2 ... and pass --model_name_or_path ./models/smollm2":
    the policy's flag, and a causal LM the reward check then refuses."""
    from dpo.errors import UserError
    from dpo.evaluation.judge import check_reward_model

    with pytest.raises(UserError) as err:
        check_reward_model("org-x/rm", setting)
    message = str(err.value)
    assert message.startswith(f"could not load model 'org-x/rm': {NOWHERE} did not answer"), message
    assert f"{setting} ./rm" in message and "HF_HUB_OFFLINE=1" in message
    assert "--model_name_or_path" not in message and "smollm2" not in message.lower()


def test_a_hub_dataset_that_cannot_be_reached_fails_fast_naming_the_offline_ways(
    hub_unanswering, tiny_model_dir, tmp_path, capsys, no_weights_load, monkeypatch
):
    argv = ["--model_name_or_path", tiny_model_dir, "--dataset_name", "org-x/no-such-data"]
    sent, _ = counting_requests(monkeypatch)
    err = run_recipe([*argv, "--output_dir", tmp_path / "o"], capsys)
    assert sent == PROBE_ONLY, f"requests after the probe (the library's retries): {sent}"
    assert err.startswith(f"error: could not load dataset 'org-x/no-such-data': {NOWHERE} did not answer")
    assert "HF_HUB_OFFLINE=1" in err and "--dataset_name data.jsonl" in err and "data/hh-rlhf/" in err


def test_the_offline_model_command_is_one_that_runs():
    """The message names `python -m dpo.models NAME DIR`: NAME is a model it builds."""
    from dpo.offline.pip_models import MODELS

    words = OFFLINE_MODEL_COMMAND.split()
    assert words[:3] == ["python", "-m", "dpo.models"] and words[3] in MODELS


@pytest.mark.parametrize(
    "name, why",
    [
        ("data/my_pairs", "data/ is a folder here"),  # data/ is the repo's folder: a path, not org "data"
        ("./x", "it starts like a path"),
        ("/no/such/model", "it starts like a path"),
        ("models/foo", "no hub user or organization is named models"),
        ("pairs.jsonl", "it ends in .jsonl, a file name"),
        ("my-model.gguf", "it ends in .gguf, a file name"),
        ("a/b/c", "a hub id has one '/' at most"),
        ("my pairs", "it is not a valid hub id"),
    ],
)
def test_a_name_that_looks_like_a_path_is_a_path(name, why, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert local_reason(name) == why


@pytest.mark.parametrize("name", ["HuggingFaceTB/SmolLM2-135M-Instruct", "Qwen/Qwen2.5-0.5B", "gpt2", "org/x.y"])
def test_a_hub_id_is_a_hub_id(name, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert local_reason(name) is None


@pytest.mark.parametrize(
    "flag, name",
    [
        pytest.param("--model_name_or_path", "models/foo", id="model"),
        pytest.param("--dataset_name", "data/my_pairs", id="data"),
    ],
)
def test_a_missing_path_is_reported_missing_not_tried_on_the_hub(
    flag, name, hub_unanswering, tiny_model_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(ROOT)
    asked = []
    monkeypatch.setattr(dpo.hub, "hub_unreachable", lambda: asked.append(1))
    data = ROOT / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
    argv = {"--model_name_or_path": tiny_model_dir, "--dataset_name": data, flag: name}
    err = run_recipe([*(x for kv in argv.items() for x in kv), "--output_dir", tmp_path / "o"], capsys)
    assert f"not found: {name}: no such file or folder" in err and "hub" not in err.split("(")[0].lower()
    assert err.count("\n") == 1 and asked == []


def test_the_probe_waits_at_most_its_timeout_for_a_hub_that_never_answers(monkeypatch):
    """A firewall that drops packets: the connection is made (a listening socket's backlog) and no answer
    comes. One request, sent with PROBE_TIMEOUT_S (here shortened) as its every timeout, no retries: counted,
    not timed."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # never accepted, never answered
    endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(dpo.hub, "PROBE_TIMEOUT_S", 0.5)
    sent, timeouts = counting_requests(monkeypatch)
    try:
        reason = dpo.hub.hub_unreachable.__wrapped__()
    finally:
        silent.close()
    assert reason is not None and "did not answer" in reason
    assert sent == [("HEAD", endpoint)] and set(timeouts[0].values()) == {0.5}, (sent, timeouts)


def cached_hub_model(cache, repo_id, folder):
    """`folder` laid out as huggingface_hub caches `repo_id` at revision main (refs/main -> snapshots/<hash>)."""
    commit = "0" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)


# The real entry point in its own process, each HTTP request huggingface_hub's client sends written to a file
# (argv[1]) before it goes; the module to run (argv[2]) and its arguments follow.
COUNTING_LAUNCHER = """
import runpy, sys
from huggingface_hub import get_session

log, module = sys.argv.pop(1), sys.argv.pop(1)
client = type(get_session())
send = client.send

def counted(self, request, *args, **kwargs):
    with open(log, "a") as out:
        out.write(f"{request.method} {str(request.url).rstrip('/')}\\n")
    return send(self, request, *args, **kwargs)

client.send = counted
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
def test_the_real_entry_point_fails_in_seconds_and_a_cached_model_still_loads(tiny_model_dir, tmp_path):
    """As a user runs it, HF_HUB_OFFLINE unset and a Hub that does not answer: a hub id not in the cache fails
    with the offline ways; a hub id in the Hugging Face cache works, offline. Both after the one probe and no
    other request: no retry ran (counted, not timed: a bound in seconds failed on a loaded 2-core machine)."""
    cached_hub_model(tmp_path / "hub", "tiny-org/tiny-phi", tiny_model_dir)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_ENDPOINT=NOWHERE, HF_HUB_CACHE=str(tmp_path / "hub"))
    data = str(ROOT / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz")
    launcher = tmp_path / "counted.py"
    launcher.write_text(COUNTING_LAUNCHER)
    results = {}
    for model in ("tiny-org/not-cached", "tiny-org/tiny-phi"):
        log = tmp_path / f"requests-{model.split('/')[1]}.txt"
        log.touch()
        proc = subprocess.run(
            [sys.executable, str(launcher), str(log), "dpo.doctor", data, "--model_name_or_path", model],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=300,
        )
        results[model] = proc, log.read_text().splitlines()
    probe_only = [f"HEAD {NOWHERE}"]
    missing, sent = results["tiny-org/not-cached"]
    assert missing.returncode == 2 and "Traceback" not in missing.stderr, missing.stderr[-2000:]
    assert "could not load tokenizer 'tiny-org/not-cached'" in missing.stderr and "HF_HUB_OFFLINE=1" in missing.stderr
    assert sent == probe_only, f"requests after the probe (the library's retries): {sent}"
    cached, sent = results["tiny-org/tiny-phi"]
    assert cached.returncode == 0, cached.stderr[-2000:]
    assert "working offline, from the Hugging Face cache" in cached.stdout
    assert sent == probe_only, f"requests after the probe (the library's retries): {sent}"
