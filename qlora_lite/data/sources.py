"""Data sources: where the records of ``--data`` come from, each with the place an error message names.

  path                                 read with                                 a record is named
  FILE.jsonl (or any other suffix)     one JSON object per line                  FILE:LINE
  FILE.json                            one JSON array of objects (or JSON Lines) FILE row N
  FILE.parquet                         pyarrow, one row group at a time          FILE row N
  FILE.csv, FILE.tsv                   pyarrow, every column read as text        FILE row N
  FOLDER of Parquet shards             pyarrow, shard by shard in name order     SHARD row N
  FOLDER written by save_to_disk       datasets.load_from_disk (memory-mapped)   FOLDER row N
  hub dataset id (online or cached)    datasets.load_dataset(id, config, split)  ID[SPLIT] row N

Lines count from 1 (as editors do), rows from 0 (as pandas and datasets index them: ``ds[N]``).
Only this module knows about file kinds; the rest of the data stage sees ``(position, dict)`` pairs.
``datasets`` is an optional extra: only its folders and hub ids need it.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from qlora_lite.data.formats import iter_lines, type_name
from qlora_lite.errors import DataError
from qlora_lite.storage.durable import file_sha256

PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = {".csv": ",", ".tsv": "\t"}
KNOWN_SUFFIXES = (*PARQUET_SUFFIXES, *CSV_SUFFIXES, ".json", ".jsonl")  # a missing one is a path, not a hub id
DATASETS_MARKERS = ("dataset_dict.json", "state.json")  # what save_to_disk writes (DatasetDict, Dataset)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
BATCH_ROWS = 256  # rows converted to Python at a time (a Parquet row group is read whole)
INSTALL_DATASETS = "pip install 'qlora-lite[datasets]'"


Item = tuple[Any, "dict | None", "str | None"]  # (position, record, None) or (position, None, "WHERE: reason")


@dataclass
class Source:
    """A data source, read record by record: ``items()`` yields ``(position, record, None)`` per record
    and ``(position, None, "WHERE: reason")`` per record that cannot be read, in source order, and
    starts from the beginning at each call (the format is detected in a first pass; nothing but the
    current batch of rows is held). ``locate(position)`` gives "WHERE" ("FILE:LINE", "FILE row N");
    ``unit`` is "line" or "row", for counts in messages.
    """

    name: str
    items: Callable[[], Iterator[Item]]
    locate: Callable[[Any], str] = str
    unit: str = "row"


def open_source(path: str, split: str = "train", config_name: str | None = None) -> Source:
    """The source ``path`` names (a file, a folder or a hub dataset id; see the module docstring).

    Args:
        split: the split of a ``DatasetDict`` folder, a hub dataset or a folder of split-named
            Parquet shards (``train-00000-of-00002.parquet``, ``train/part-0.parquet``).
        config_name: the hub dataset's configuration (subset), if it has several.

    Raises:
        DataError: the source does not exist or cannot be read at all (a damaged Parquet file, a
            CSV that is not UTF-8, an invalid JSON array; some only once read); per-record problems
            are yielded instead.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        if any((p / marker).is_file() for marker in DATASETS_MARKERS):
            return _datasets_folder(p, split)
        return _parquet_folder(p, split)
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix in PARQUET_SUFFIXES:
            return _parquet_files(str(p), [p])
        if suffix in CSV_SUFFIXES:
            return _csv(p, CSV_SUFFIXES[suffix])
        if suffix == ".json" and _starts_array(p):
            return _json_array(p)
        return Source(str(p), lambda: iter_lines(p), lambda line: f"{p}:{line}", "line")
    if p.suffix.lower() in KNOWN_SUFFIXES or not HUB_ID.match(str(path)):
        raise DataError(f"{path}: no such file or folder (check the data path)")
    return _hub(str(path), split, config_name)


def source_sha256(path: str, split: str = "train", config_name: str | None = None) -> str:
    """A digest that changes whenever the data of ``path`` does (the run fingerprint's dataset hash).

    A file: its sha256 (as for JSONL files always). A folder: the sha256 over every file's relative
    path and sha256. A hub id: the digest of the split and datasets' fingerprint of the cached data
    (it changes with the dataset's revision).
    """
    p = Path(path).expanduser()
    if p.is_file():
        return _file_digest(p)
    digest = hashlib.sha256()
    if p.is_dir():
        for file in sorted(f for f in p.rglob("*") if f.is_file() and not _hidden(f, p)):
            digest.update(f"{file.relative_to(p).as_posix()}\0{_file_digest(file)}\n".encode())
        return digest.hexdigest()
    if p.suffix.lower() in KNOWN_SUFFIXES or not HUB_ID.match(str(path)):
        raise DataError(f"{path}: no such file or folder (check the data path)")
    dataset = _hub_dataset(str(path), split, config_name)
    digest.update(f"hub\0{path}\0{config_name}\0{split}\0{dataset._fingerprint}".encode())
    return digest.hexdigest()


def _file_digest(file: Path) -> str:
    """``file_sha256``, read once per process while the file keeps its inode, size and change times (the
    tokenized cache and the run fingerprint both ask for it)."""
    stat = file.stat()
    return _digest_of(str(file.resolve()), (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns))


@functools.lru_cache(maxsize=256)
def _digest_of(path: str, version: tuple) -> str:
    return file_sha256(path)


def _hidden(file: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in file.relative_to(root).parts)


def _starts_array(p: Path) -> bool:
    with open(p, "rb") as f:
        head = f.read(4096)
    return head.removeprefix(codecs.BOM_UTF8).lstrip()[:1] == b"["


def _json_array(p: Path) -> Source:
    """A ``.json`` file holding one array: parsed whole (JSON has no way to read an array element by element)."""
    try:
        items = json.loads(p.read_bytes().removeprefix(codecs.BOM_UTF8).decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{p}: invalid UTF-8 at byte {exc.start}; save the file as UTF-8") from None
    except json.JSONDecodeError as exc:  # nothing after a syntax error can be trusted: not skippable
        raise DataError(f"{p}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno}); a .json file must "
                        "be one valid array of objects (or one object per line)") from None
    if not isinstance(items, list):
        raise DataError(f"{p}: expected a JSON array of objects (or one object per line), got {type_name(items)}")

    def locate(row):
        return f"{p} row {row}"

    def read():
        for row, item in enumerate(items):
            if isinstance(item, dict):
                yield row, item, None
            else:
                yield row, None, f"{locate(row)}: expected a JSON object, got {type_name(item)}"

    return Source(str(p), read, locate)


def _rows(batches: Iterator[pa.RecordBatch | pa.Table], shard: int | None = None) -> Iterator[Item]:
    """The rows of Arrow batches as dicts, one batch converted at a time; positions are row numbers
    (or (shard, row))."""
    row = 0
    for batch in batches:
        for record in batch.to_pylist():
            yield (row if shard is None else (shard, row)), record, None
            row += 1


def _parquet_files(name: str, files: list[Path]) -> Source:
    def locate(pos):
        return f"{files[pos[0]]} row {pos[1]}" if isinstance(pos, tuple) else f"{files[0]} row {pos}"

    def read():
        for shard, file in enumerate(files):
            try:
                parquet = pq.ParquetFile(file)
                yield from _rows(parquet.iter_batches(batch_size=BATCH_ROWS), shard if len(files) > 1 else None)
            except (pa.ArrowException, OSError) as exc:
                raise DataError(f"{file}: not a readable Parquet file ({exc}); write it again (pandas "
                                "DataFrame.to_parquet, datasets Dataset.to_parquet)") from None

    return Source(name, read, locate)


def _parquet_folder(p: Path, split: str) -> Source:
    shards = sorted(f for f in p.rglob("*") if f.suffix.lower() in PARQUET_SUFFIXES and f.is_file()
                    and not _hidden(f, p))
    if not shards:
        raise DataError(f"{p}: a folder, but neither written by datasets' save_to_disk (no "
                        f"{' or '.join(DATASETS_MARKERS)}) nor holding .parquet files; pass a data file or such a folder")
    # Hub repositories keep splits side by side: data/train-00000-of-00001.parquet, data/test-....
    ours = [f for f in shards if re.match(rf"{re.escape(split)}[-_.]", f.name) or split in f.relative_to(p).parts[:-1]]
    return _parquet_files(str(p), ours or shards)


def _csv(p: Path, delimiter: str) -> Source:
    """Every column as text (a spreadsheet's "5" stays the answer "5"), empty cells as ""."""
    def locate(row):
        return f"{p} row {row}"

    def read():
        bad: list[str] = []

        def bad_row(row) -> str:  # a row with too few or too many cells: reported, skipped like a bad line
            bad.append(f"{p}: a row has {row.actual_columns} field(s), the header {row.expected_columns}: "
                       f"{row.text[:80]!r}")
            return "skip"

        try:
            names = pa_csv.open_csv(p, parse_options=pa_csv.ParseOptions(
                delimiter=delimiter, newlines_in_values=True, invalid_row_handler=lambda row: "skip")).schema.names
            reader = pa_csv.open_csv(
                p, parse_options=pa_csv.ParseOptions(delimiter=delimiter, newlines_in_values=True,
                                                     invalid_row_handler=bad_row),
                convert_options=pa_csv.ConvertOptions(column_types={n: pa.string() for n in names},
                                                      strings_can_be_null=False, quoted_strings_can_be_null=False))
            row = 0
            for position, record, _ in _rows(reader):
                while bad:  # the rows skipped in this batch, about where they were
                    yield row, None, bad.pop(0)
                yield position, record, None
                row = position + 1
            for message in bad:
                yield row, None, message
        except pa.ArrowException as exc:
            hint = "save the file as UTF-8" if "UTF8" in str(exc) else "check the file is comma-separated with a header row"
            raise DataError(f"{p}: cannot read the CSV file ({exc}); {hint}") from None

    return Source(str(p), read, locate)


def _datasets_module(what: str):
    """The ``datasets`` package; ``what`` says in the error why it was needed."""
    try:
        import datasets  # noqa: PLC0415 (optional extra; it takes seconds to import)
    except ImportError:
        raise DataError(f"{what} needs the datasets package: {INSTALL_DATASETS}") from None
    return datasets


def _from_dataset(name: str, dataset) -> Source:
    return Source(name, lambda: _rows(dataset.with_format("arrow").iter(batch_size=BATCH_ROWS)),
                  lambda row: f"{name} row {row}")


def _datasets_folder(p: Path, split: str) -> Source:
    datasets = _datasets_module(f"{p}: reading a folder written by datasets' save_to_disk")
    try:
        dataset = datasets.load_from_disk(str(p))
    except Exception as exc:  # noqa: BLE001 (datasets raises many kinds; each becomes one message)
        raise DataError(f"{p}: cannot read the datasets folder ({str(exc).splitlines()[0][:300]})") from None
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise DataError(f"{p}: no split {split!r}; it has {', '.join(dataset)} (choose one with --data-split)")
        return _from_dataset(f"{p}[{split}]", dataset[split])
    return _from_dataset(str(p), dataset)


def _hub_dataset(dataset_id: str, split: str, config_name: str | None):
    datasets = _datasets_module(f"{dataset_id}: no such file or folder; reading it as a hub dataset id")
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or \
        os.environ.get("HF_DATASETS_OFFLINE", "") not in ("", "0")
    try:
        return datasets.load_dataset(dataset_id, config_name, split=split)
    except Exception as exc:  # noqa: BLE001 (no network, unknown id, gated, bad split: one message each)
        why = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        where = " (offline: HF_HUB_OFFLINE is set, so only datasets in the local cache load)" if offline else ""
        raise DataError(f"{dataset_id}: no such file or folder, and loading it as a hub dataset failed{where}: "
                        f"{why}. Check the path, or the id, --data-config and --data-split") from None


def _hub(dataset_id: str, split: str, config_name: str | None) -> Source:
    name = f"{dataset_id}{'/' + config_name if config_name else ''}[{split}]"
    return _from_dataset(name, _hub_dataset(dataset_id, split, config_name))
