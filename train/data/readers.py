"""Reading local data files: JSON Lines and JSON with Python's json (exact), parquet and Arrow through
Hugging Face `datasets`' builders (streamed, no cache kept, nothing from a hub)."""

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile

from .records import DataError, Record, _without_nulls, record_kind

# File suffix -> what reads it: Python's json, or the `datasets` builder of that name.
FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}


def looks_like_hub_id(name):
    """'org/name' with no path of that name: someone expected a download from a hub."""
    return re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None


def _builder(path):
    """What reads a local file (a FORMATS value), or a DataError saying what to give instead."""
    if not os.path.exists(path):
        hint = ""
        if looks_like_hub_id(path) and os.path.splitext(path)[1].lower() not in FORMATS:
            hint = " (a hub name? datasets must be local files here: download it and pass its files)"
        raise DataError(f"{path}: dataset file not found{hint}")
    if os.path.isdir(path):
        # a save_to_disk directory: its .arrow shards, not its metadata
        inside = sorted(n for n in os.listdir(path) if os.path.splitext(n)[1].lower() in FORMATS
                        and n not in ("dataset_info.json", "state.json", "dataset_dict.json"))
        found = f", e.g. {os.path.join(path, inside[0])} (1 of {len(inside)})" if inside else ""
        raise DataError(f"{path}: is a directory; pass the data files in it ({', '.join(FORMATS)}){found}")
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in FORMATS:
        raise DataError(f"{path}: unknown data format {suffix or '(no suffix)'!r}; "
                        f"give {', '.join(FORMATS)} files")
    return FORMATS[suffix]


def _json_rows(path):
    """(position, object) per row of a JSON Lines file (position: the line; blank lines skipped) or
    of a JSON file holding a list of rows (position: the row), the unit, and the sha256 of the bytes.

    Python's json, not datasets' JSON builder: that one types columns with pyarrow, and a column
    holding text in some rows and messages in others comes back with strings that parse as JSON
    replaced by their value (" 12" -> 12, '"a"' -> 'a'), ints turned floats beside floats, and no
    line numbers for errors."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(4096)
        f.seek(0)
        if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):  # one JSON list
            raw = f.read()
            digest.update(raw)
            try:
                rows = json.loads(raw.decode("utf-8-sig"))
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
            return list(enumerate(rows, start=1)), "row", digest.hexdigest()
        rows = []
        for lineno, line in enumerate(f, start=1):  # line by line: a large file is never whole in memory
            digest.update(line)
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8-sig" if lineno == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 ({e.reason} at byte {e.start})") from None
            try:
                rows.append((lineno, json.loads(text)))
            except json.JSONDecodeError as e:
                if lineno == 1 and _one_json_object(path):
                    raise DataError(f"{path}: holds one JSON object, not rows: give JSON Lines (one object per "
                                    "line) or a JSON list of objects") from None
                raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    return rows, "line", digest.hexdigest()


def _one_json_object(path):
    try:
        with open(path, encoding="utf-8-sig") as f:
            return isinstance(json.load(f), dict)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both are
        return False


@contextlib.contextmanager
def _quiet_datasets():
    """No progress bars or error lines from `datasets`: this module reports problems itself."""
    import datasets
    from datasets.utils.tqdm import are_progress_bars_disabled

    bars_were_on = not are_progress_bars_disabled()
    datasets.disable_progress_bars()
    ds_logger = logging.getLogger("datasets")
    level = ds_logger.level
    ds_logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        ds_logger.setLevel(level)
        if bars_were_on:
            datasets.enable_progress_bars()


def _columnar_rows(path, builder):
    """(row, object) per row of a parquet or Arrow file, streamed in batches by the `datasets`
    builder for its format (load_dataset would also ask a hub to count the load), and the sha256
    of the bytes. Streaming writes no Arrow cache (only a lock file, in a temporary directory
    removed after the read), so nothing lands in ~/.cache or /tmp on the nodes, and it read 200k
    chats of parquet in 1.3 s where preparing the cache took 1.9 s."""
    try:
        from datasets.packaged_modules.arrow.arrow import Arrow
        from datasets.packaged_modules.parquet.parquet import Parquet
    except ImportError as e:  # JSON data needs no `datasets`; an environment made without it can still train
        raise DataError(f"{path}: reading {builder} files needs Hugging Face `datasets` in the training "
                        f"environment ({e}); install the version requirements.txt pins, or convert the file "
                        "to JSON Lines") from None

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    rows = []
    try:
        with _quiet_datasets(), tempfile.TemporaryDirectory(prefix="dsmesh-datasets-") as cache:
            reader = {"parquet": Parquet, "arrow": Arrow}[builder](cache_dir=cache,
                                                                    data_files={"train": [os.path.abspath(path)]})
            for batch in reader.as_streaming_dataset(split="train").iter(batch_size=10_000):
                names = list(batch)
                rows += [dict(zip(names, values)) for values in zip(*batch.values())]
    except Exception as e:  # pyarrow's and datasets' own errors: whatever they say is the reason
        raise DataError(f"{path}: cannot be read as {builder} data: {type(e).__name__}: {e}") from None
    return [(i, _without_nulls(row)) for i, row in enumerate(rows, start=1)], digest.hexdigest()


def read_dataset(path, text_field="text"):
    """All records of one local data file and the sha256 of its bytes.

    Errors name the file and the line (JSON Lines) or row (JSON lists, parquet, Arrow)."""
    builder = _builder(path)
    if builder == "json":
        rows, unit, digest = _json_rows(path)
    else:
        (rows, digest), unit = _columnar_rows(path, builder), "row"
    if not rows:
        raise DataError(f"{path}: no records")
    records = []
    for position, row in rows:
        if isinstance(row, dict):  # a null column is an absent one (pandas writes nulls for them)
            row = {k: v for k, v in row.items() if v is not None}
        record = Record(path, position, "", row, unit, text_field)
        record.kind = record_kind(row, record.where, text_field)
        records.append(record)
    return records, digest
