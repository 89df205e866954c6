"""Progress messages for the user: printed once, by the main process only."""

from __future__ import annotations

from accelerate import PartialState


def log(message: str) -> None:
    """Print once, from the main process only (under accelerate launch there are several)."""
    if PartialState().is_main_process:
        print(f"[dpo-recipes] {message}", flush=True)


PREVIEW_CHARS = 1200  # about 15 lines of an 80-column terminal: a usual pair shows whole, a 2 MB row does not


def preview(text: str, tokenizer=None, max_length: int | None = None, keep_end: bool = False) -> str:
    """`text` (a pair as the model sees it) for a log: cut to `max_length` tokens as training cuts it
    (the first ones, or the last with `keep_end`), then to PREVIEW_CHARS characters, with an ellipsis
    and a note of what each cut left out."""
    notes = []
    if tokenizer is not None and max_length:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > max_length:
            kept = ids[-max_length:] if keep_end else ids[:max_length]
            text = tokenizer.decode(kept)
            side = "last" if keep_end else "first"
            notes.append(f"the model sees the {side} max_length={max_length} of {len(ids):,} tokens")
    if len(text) > PREVIEW_CHARS:
        notes.append(f"{len(text) - PREVIEW_CHARS:,} more characters not shown")
        text = "…" + text[-PREVIEW_CHARS:] if keep_end else text[:PREVIEW_CHARS] + "…"
    return text + (f"\n[{'; '.join(notes)}]" if notes else "")


def pairs_line(train, heldout, example: dict, tokenizer, training_args) -> str:
    """What a recipe logs before training: how many pairs train and are held out, and the data doctor's
    first kept pair (`report.example`: prompt + chosen text) cut to what the model sees."""
    text = example.get("prompt", "") + example.get("chosen", "")
    shown = preview(text, tokenizer, training_args.max_length, training_args.truncation_mode == "keep_end")
    return f"{len(train)} training pairs, {len(heldout or [])} held out; the first as the model sees it:\n{shown}"
