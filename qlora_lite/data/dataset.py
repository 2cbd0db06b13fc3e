"""Data stage: data source -> tokenized examples with loss masks -> (packed) padded batches.

One module per step, in the order the data flows:
  sources    read the records of a file, folder or hub dataset (each bad one named FILE:LINE or FILE row N).
  mapping    rename fields (--field-map), turn ShareGPT conversations into chat messages.
  formats    detect and validate the format of the records.
  tokenize   render a record as prompt/response text and tokenize it with loss masks (labels).
  dataset    (this module) ``load_dataset`` runs the steps above over a source, truncates or drops
             long examples and counts what happened (DataStats); ``split_eval`` holds some out.
  packing    pack examples into sequences and collate them into padded tensor batches.

``load_dataset`` needs only the tokenizer, so a bad data file fails before the model is loaded.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from jinja2 import TemplateError

from qlora_lite.data.cache import cache_key, read_cached, write_cached
from qlora_lite.data.formats import (
    FORMATS,
    MAX_LISTED_PROBLEMS,
    detect_format,
    is_empty,
    problem_message,
    validate_record,
)
from qlora_lite.data.mapping import explain_mapped, normalize_record
from qlora_lite.data.sources import Source, open_source, source_sha256
from qlora_lite.data.tokenize import char_bound, tokenize_example
from qlora_lite.errors import DataError
from qlora_lite.kernels.footprint import IGNORE_INDEX


@dataclass
class DataStats:
    """What happened to each record of a data source (total = kept + dropped + empty + skipped).

    ``skipped_lines`` holds one "WHERE: reason" message per skipped record; ``unit`` is what a record
    is called there ("line" in JSONL, "row" elsewhere).
    """

    total: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    empty: int = 0
    skipped_lines: list[str] = field(default_factory=list)
    format: str = ""
    unit: str = "line"
    from_cache: bool = False  # the examples came from the tokenized cache (data.cache)

    def summary(self) -> str:
        """One line for the user, e.g. ``kept 950 of 1000 (alpaca): 30 truncated, 20 dropped (too long)``."""
        parts = [(self.truncated, "truncated"), (self.dropped_too_long, "dropped (too long)"),
                 (self.empty, "empty"), (len(self.skipped_lines), f"skipped (bad {self.unit}s)")]
        details = ", ".join(f"{n} {what}" for n, what in parts if n)
        return f"kept {self.kept} of {self.total} ({self.format})" + (f": {details}" if details else "")


def _has_targets(labels: list[int]) -> bool:
    # labels[0] is never predicted (the model shifts labels by one), so it does not count.
    return any(label != IGNORE_INDEX for label in labels[1:])


def _checked(source: Source, fmt: str, field_map: dict[str, str]):
    """Yield ``(position, record, None)`` for each valid example of ``fmt`` (mapped by ``field_map``,
    ShareGPT turned into chat) and ``(position, None, "WHERE: reason")`` for every other record."""
    for position, record, problem in source.items():
        if problem is not None:
            yield position, None, problem
            continue
        normalized, reason = normalize_record(record, field_map)
        if reason is None and fmt in FORMATS:
            reason = validate_record(normalized, fmt)
            reason = reason and explain_mapped(reason, record, field_map)
        if reason is None:
            yield position, normalized, None
        else:
            yield position, None, f"{source.locate(position)}: {reason}"


def _open(path, format: str, split: str, config_name: str | None, field_map: dict[str, str]) -> tuple[Source, str]:
    """The source and its format: ``format``, or the one its records point to (a first pass over them)."""
    if format != "auto" and format not in FORMATS:
        raise DataError(f"unknown data format {format!r}; use auto, alpaca, chat or text")
    source = open_source(str(path), split, config_name)
    if format != "auto":
        return source, format
    read = 0

    def usable():
        nonlocal read
        for _, record, _ in source.items():
            read += 1
            mapped, reason = normalize_record(record, field_map) if record is not None else (None, "bad")
            if reason is None:
                yield mapped

    records = usable()
    first = next(records, None)
    if not read:
        raise DataError(_empty_message(source))
    # every record bad: "unknown", and each is reported as it is
    return source, detect_format(itertools.chain([first], records), source.name) if first is not None else "unknown"


def _empty_message(source: Source) -> str:
    what = "one JSON object per line" if source.unit == "line" else "records (rows)"
    return f"{source.name}: the data has no examples (it is empty); add {what}"


def source_format(path, format: str = "auto", split: str = "train", config_name: str | None = None,
                  field_map: dict[str, str] | None = None) -> str:
    """The format of a source's records: ``format``, or the one they point to (preference pairs too)."""
    return _open(path, format, split, config_name, field_map or {})[1]


def read_usable_records(path, *, format: str = "auto", split: str = "train", config_name: str | None = None,
                        field_map: dict[str, str] | None = None):
    """The records of a source, mapped (--field-map, ShareGPT) and validated; nothing tokenized yet.

    Args:
        path: file, folder or hub id (``data.sources``). format: "auto" or one of FORMATS.
        split, config_name: of a hub dataset or datasets folder. field_map: ``{field: column}``.

    Returns:
        ``(records, problems, fmt, source)``: (position, record) pairs that are valid examples of
        ``fmt``, (position, "WHERE: reason") for every other record, the format, and the
        ``sources.Source`` read (its ``name``, ``unit``, ``locate``).

    Raises:
        DataError: unknown format, an unreadable or empty source (the message says which).
    """
    field_map = field_map or {}
    source, fmt = _open(path, format, split, config_name, field_map)
    records, problems = [], []
    for position, record, problem in _checked(source, fmt, field_map):
        (records if problem is None else problems).append((position, record if problem is None else problem))
    if not records and not problems:
        raise DataError(_empty_message(source))
    return records, problems, fmt, source


def load_dataset(path, tokenizer, *, format: str = "auto", max_seq_len: int = 512, drop_long: bool = False,
                 train_on_inputs: bool = False, skip_bad_lines: bool = False, split: str = "train",
                 config_name: str | None = None, field_map: dict[str, str] | None = None,
                 cache_dir: str | Path | None = None) -> tuple[list[dict], DataStats]:
    """Read, validate and tokenize a data source; needs only the tokenizer (fails before model loading).

    Records are read one at a time (a Parquet or CSV batch at a time), so what is held is the tokenized
    examples and the messages of bad records, not the file.

    Args:
        path: a data file, folder or hub dataset id (``data.sources``). format: "auto" or one of FORMATS.
        max_seq_len: longest example in tokens.
        drop_long: drop longer examples instead of truncating them (keeping the start).
        train_on_inputs: learn the prompt tokens too. skip_bad_lines: skip and report bad records.
        split, config_name: of a hub dataset or datasets folder. field_map: ``{field: column}`` renames.
        cache_dir: the tokenized-data cache folder (``data.cache``); None: no cache.

    Returns:
        ``(examples, stats)``: dicts with input_ids and labels (lists of ints, len <= max_seq_len).

    Raises:
        DataError: bad records (all listed as FILE:LINE or FILE row N, unless skip_bad_lines), or no
            usable example left (the message gives the count per reason).
    """
    if max_seq_len < 2:
        raise DataError(f"max_seq_len must be at least 2 tokens, got {max_seq_len}")
    settings = dict(format=format, max_seq_len=max_seq_len, drop_long=drop_long, train_on_inputs=train_on_inputs,
                    skip_bad_lines=skip_bad_lines, split=split, config_name=config_name, field_map=field_map or {})
    key = None
    if cache_dir is not None:
        key = cache_key(source_sha256(str(path), split, config_name), tokenizer, settings)
        cached = read_cached(Path(cache_dir), key) if key else None
        if cached is not None:
            return cached[0], DataStats(**{**cached[1], "from_cache": True})
    examples, stats = _tokenize_source(path, tokenizer, **settings)
    if key:
        write_cached(Path(cache_dir), key, examples, asdict(stats))
    return examples, stats


def _tokenize_source(path, tokenizer, *, format: str, max_seq_len: int, drop_long: bool, train_on_inputs: bool,
                     skip_bad_lines: bool, split: str, config_name: str | None,
                     field_map: dict[str, str]) -> tuple[list[dict], DataStats]:
    """``load_dataset`` without the cache."""
    source, fmt = _open(path, format, split, config_name, field_map)
    if fmt == "preference":
        raise DataError(f"{source.name}: the records are preference pairs (prompt/chosen/rejected); train on them "
                        "with --method dpo or --method orpo")
    stats = DataStats(format=fmt, unit=source.unit)
    examples, problems = [], []
    max_chars = char_bound(tokenizer, max_seq_len)  # a 50 MB line costs what max_seq_len tokens cost
    for position, record, problem in _checked(source, fmt, field_map):
        stats.total += 1
        if problem is not None:
            problems.append((position, problem))
            continue
        if is_empty(record, fmt):
            stats.empty += 1
            continue
        try:
            example = tokenize_example(record, tokenizer, fmt, train_on_inputs, max_chars)
        except (TemplateError, ValueError, TypeError, KeyError) as exc:  # e.g. raise_exception() in templates
            problems.append((position, f"{source.locate(position)}: cannot render the example ({exc})"))
            continue
        if len(example["input_ids"]) > max_seq_len:
            example = {k: v[:max_seq_len] for k, v in example.items()}
            if drop_long or not _has_targets(example["labels"]):
                stats.dropped_too_long += 1
                continue
            stats.truncated += 1
        examples.append(example)
    if not stats.total:
        raise DataError(_empty_message(source))
    stats.skipped_lines = [message for _, message in problems]  # in source order already
    if problems and not skip_bad_lines:
        raise DataError(problem_message(source.name, stats.skipped_lines,
                                        f"format {fmt}; fix them, or pass --skip-bad-lines", source.unit))
    stats.kept = len(examples)
    if not examples:
        raise DataError(_no_examples_message(source.name, stats, max_seq_len, drop_long))
    return examples, stats


def _no_examples_message(path, stats: DataStats, max_seq_len: int, drop_long: bool) -> str:
    why = "with --drop-long" if drop_long else "even the prompt alone"
    reasons = [f"{stats.dropped_too_long} longer than max_seq_len={max_seq_len} ({why}; raise --max-seq-len)",
               f"{stats.empty} empty (nothing to learn)", f"{len(stats.skipped_lines)} skipped bad {stats.unit}s"]
    lines = [f"{path}: no usable example among {stats.total} {stats.unit}(s) ({stats.format}): " + ", ".join(reasons)]
    return "\n".join(lines + stats.skipped_lines[:MAX_LISTED_PROBLEMS])


def split_eval(examples: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministically hold out ``round(len * fraction)`` examples (at least one when fraction > 0).

    Returns:
        ``(train, eval)``, both in the original order. Raises DataError when nothing would be left to train on.
    """
    if fraction <= 0:
        return list(examples), []
    if fraction >= 1:
        raise DataError(f"eval fraction must be below 1, got {fraction}")
    n_eval = max(1, round(len(examples) * fraction))
    if n_eval >= len(examples):
        raise DataError(f"cannot hold out {n_eval} of {len(examples)} examples for evaluation and still train; "
                        "add data, lower --eval-fraction or pass --eval-data")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])
