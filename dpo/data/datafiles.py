"""Local data files as bytes: which format a file name says, its decompressed stream, and whether a
compressed file is whole (dpo/data/loading.py loads and checks the rows).

    data_suffix(Path("train.jsonl.gz"))    # ('.jsonl', '.gz')
    folder_data_files(Path("data"))         # {'train': [...], 'test': [...]}: a folder's data files by split
    with open_data_file(path) as f: ...    # the decompressed bytes
    try: ... except decompression_errors() as err: raise decompression_error(name, path, err)
"""

from __future__ import annotations

import gzip
import io
import zlib
from pathlib import Path

from dpo.errors import UserError

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
# Compressed text files, as datasets are often distributed (Anthropic HH-RLHF: .jsonl.gz); the
# datasets library decompresses them itself. Parquet is compressed inside, so never outer-compressed.
COMPRESSIONS = (".gz", ".zst")


def data_suffix(path: Path) -> tuple[str, str]:
    """(format suffix, compression suffix): ('.jsonl', '.gz') for data.jsonl.gz, ('.csv', '') for data.csv."""
    path = Path(path)
    if path.suffix in COMPRESSIONS and Path(path.stem).suffix in (".json", ".jsonl", ".csv"):
        return Path(path.stem).suffix, path.suffix
    return path.suffix, ""


# A folder holding one of these is a training run's output_dir or checkpoint (or an export of one), not data:
# its .json / .jsonl files (trainer_state.json, heldout_pairs.jsonl, eval/generations.jsonl) are run artifacts,
# and its names (training_args.bin, eval/) would make the datasets library see "train" / "test" splits.
RUN_FILES = (
    "training_args.bin",
    "trainer_state.json",
    "run_complete.json",
    "resolved_config.yaml",
    "adapter_config.json",
)


def _in_run_folder(file: Path, folder: Path) -> bool:
    """True if `file` lies in a run folder (RUN_FILES, checkpoint-N) at or below `folder`, or in a hidden one."""
    for parent in [p for p in file.parents if p == folder or folder in p.parents]:
        if parent != folder and (parent.name.startswith(".") or parent.name.startswith("checkpoint-")):
            return True
        if any((parent / name).is_file() for name in RUN_FILES):
            return True
    return False


def folder_data_files(folder: Path) -> dict[str, list[str]]:
    """{split: sorted data files} of a folder, split by file and folder names as the datasets library does
    (train*, test*, eval/, ...), among the data files alone: files with a data suffix (LOCAL_FORMATS, maybe
    .gz/.zst), not hidden, not in a run folder. The library's own patterns would also match run artifacts
    (training_args.bin is a "train" file, eval/ a "test" folder) and then read no data file at all."""
    from datasets.data_files import _get_data_files_patterns, resolve_pattern  # the library's own split rules

    folder = folder.resolve()  # the datasets library lists files with absolute paths

    def resolve(pattern: str) -> list[str]:
        files = resolve_pattern(pattern, base_path=str(folder))
        return [
            f
            for f in files
            if data_suffix(Path(f))[0] in LOCAL_FORMATS
            and not Path(f).name.startswith(".")
            and not _in_run_folder(Path(f), folder)
        ]

    try:
        patterns = _get_data_files_patterns(resolve)
    except FileNotFoundError:  # no data file at all
        return {}
    splits = {
        str(split): sorted({f for p in pats for f in _resolve_or_none(resolve, p)}) for split, pats in patterns.items()
    }
    return {k: v for k, v in splits.items() if v}


def _resolve_or_none(resolve, pattern: str) -> list[str]:
    try:
        return resolve(pattern)
    except FileNotFoundError:
        return []


def open_data_file(path: Path):
    """A binary file object over the (decompressed) bytes of a local data file."""
    _, compression = data_suffix(path)
    if compression == ".gz":
        return gzip.open(path, "rb")
    if compression == ".zst":
        import zstandard

        return io.BufferedReader(
            zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True, closefd=True)
        )
    return open(path, "rb")


def decompression_error(name: str, path: Path, err: Exception) -> UserError:
    """A compressed file that cannot be read to its end, as one line naming it and what to do."""
    _, compression = data_suffix(path)
    if isinstance(err, EOFError):
        return UserError(
            f"{name}: the {compression} file is cut short ({err}); download or copy it again, "
            f"or check it with: {'gzip -t' if compression == '.gz' else 'zstd -t'} {path}"
        )
    plain = path.with_suffix("")  # data.jsonl.gz -> data.jsonl
    return UserError(
        f"{name}: not a valid {compression} file ({type(err).__name__}: {err}); if it is not compressed, "
        f"rename it to {plain.name}"
    )


def decompression_errors() -> tuple[type[Exception], ...]:
    """What reading a damaged .gz / .zst raises: cut short (EOFError), not gzip at all (gzip.BadGzipFile,
    an OSError), corrupt deflate data (zlib.error), corrupt zstd frames (zstandard.ZstdError)."""
    errors: tuple[type[Exception], ...] = (EOFError, gzip.BadGzipFile, zlib.error)
    try:
        import zstandard

        errors += (zstandard.ZstdError,)
    except ImportError:
        pass
    return errors


def check_zstd_complete(path: Path) -> None:
    """EOFError when a .zst file ends inside a frame: zstandard's stream reader (and the datasets
    library) would return the part before the cut as if it were the whole file."""
    import zstandard

    decoder, in_frame = zstandard.ZstdDecompressor().decompressobj(), False
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            while chunk:
                decoder.decompress(chunk)
                in_frame = not decoder.eof
                chunk = decoder.unused_data if decoder.eof else b""
                if decoder.eof:  # a frame ended; the next one starts in the rest of this chunk
                    decoder = zstandard.ZstdDecompressor().decompressobj()
    if in_frame:
        raise EOFError("the file ends inside a zstd frame")
