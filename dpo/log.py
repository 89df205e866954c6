"""Progress messages for the user: printed once, by the main process only."""

from __future__ import annotations

from accelerate import PartialState


def log(message: str) -> None:
    """Print once, from the main process only (under accelerate launch there are several)."""
    if PartialState().is_main_process:
        print(f"[dpo-recipes] {message}", flush=True)
