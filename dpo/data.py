"""Preference data: load a hub dataset or a local file, check every row, format prompts.

Rows end up in TRL's explicit-prompt format: {"prompt": str, "chosen": str, "rejected": str}.
Every problem with the user's data is reported with the file, the row number (1-based, as
an editor shows it) and the field.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset

from dpo.errors import UserError

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).suffix in LOCAL_FORMATS or Path(name).exists()


def load_preference_data(name: str, config_name: str | None = None, split: str = "train") -> Dataset:
    """Load split `split` of a hub dataset id, a local data file, or a local dataset folder."""
    if _looks_local(name):
        path = Path(name).expanduser()
        if not path.exists():
            raise UserError(f"dataset file not found: {name}")
        if path.is_file():
            if path.suffix not in LOCAL_FORMATS:
                raise UserError(f"{name}: unsupported file type '{path.suffix}'; use one of {sorted(LOCAL_FORMATS)}")
            if path.stat().st_size == 0:
                raise UserError(f"{name}: the file is empty")
            try:
                return load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train")
            except Exception as err:  # pyarrow/json parse errors: the user's file is malformed
                raise UserError(f"{name}: could not be read as {path.suffix[1:]}: {str(err).splitlines()[0]}") from None
    try:
        data = load_dataset(str(name), config_name)
    except (OSError, ValueError) as err:  # ConnectionError, DatasetNotFoundError, offline mode
        reason = str(err).strip().splitlines()[0]
        raise UserError(
            f"could not load dataset '{name}': {reason}\n"
            f"  If the Hub is unreachable, save the data as a .jsonl/.parquet/.csv file where you have access "
            f"(`datasets.load_dataset('{name}', split='{split}').to_json('data.jsonl')`) "
            f"and pass it: --dataset_name data.jsonl"
        ) from None
    if isinstance(data, DatasetDict):
        if split not in data:
            raise UserError(f"dataset '{name}' has no split '{split}'; it has {sorted(data)}")
        data = data[split]
    return data


def check_fields(data: Dataset, fields: list[str], source: str, optional: tuple[str, ...] = ()) -> None:
    """Every row must have every field in `fields` as a string (`optional` ones may be missing/None)."""
    missing = [f for f in fields if f not in data.column_names]
    if missing:
        raise UserError(f"{source}: missing field(s) {missing}; the data has {data.column_names}")
    for row_number, row in enumerate(data, start=1):
        for field in (*fields, *[f for f in optional if f in data.column_names]):
            value = row[field]
            if value is None and field in optional:
                continue
            if not isinstance(value, str):
                raise UserError(
                    f"{source}, row {row_number}, field '{field}': expected text, got {type(value).__name__} ({value!r:.60})"
                )


def phi2_qa_format(row: dict) -> dict:
    """phi-2's documented QA format; the system text, when present, opens the instruction.

    Instruct: <system>\\n\\n<prompt>\\nOutput: <answer>

    phi-2 has no chat template. The answer starts with a space after "Output:", and TRL
    appends the EOS token to each completion.
    """
    system = (row.get("system") or "").strip()
    instruction = f"{system}\n\n{row['prompt'].strip()}" if system else row["prompt"].strip()
    return {
        "prompt": f"Instruct: {instruction}\nOutput:",
        "chosen": " " + row["chosen"].strip(),
        "rejected": " " + row["rejected"].strip(),
    }


def split_heldout(data: Dataset, test_size: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """A seeded train/test split; the same seed always holds out the same rows."""
    if not test_size:
        return data, None
    parts = data.train_test_split(test_size=test_size, seed=seed)
    return parts["train"], parts["test"]
