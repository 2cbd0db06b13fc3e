"""Data stage: JSONL file -> tokenized examples with loss masks -> (packed) padded batches.

One module per step, in the order the data flows:
  data_formats   read the JSONL file (every bad line as FILE:LINE), detect and validate the format.
  data_tokenize  render a record as prompt/response text and tokenize it with loss masks (labels).
  data.py        (this module) ``load_dataset`` runs the two above over a file, truncates or drops
                 long examples and counts what happened (DataStats); ``split_eval`` holds some out.
  data_packing   pack examples into sequences and collate them into padded tensor batches.

``load_dataset`` needs only the tokenizer, so a bad data file fails before the model is loaded.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from jinja2 import TemplateError

from qlora_lite.data.formats import (
    FORMATS,
    MAX_LISTED_PROBLEMS,
    detect_format,
    is_empty,
    problem_message,
    read_lines,
    validate_record,
)
from qlora_lite.data.tokenize import char_bound, tokenize_example
from qlora_lite.errors import DataError
from qlora_lite.kernels.footprint import IGNORE_INDEX


@dataclass
class DataStats:
    """What happened to each line of a data file (total = kept + dropped + empty + skipped)."""

    total: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    empty: int = 0
    skipped_lines: list[str] = field(default_factory=list)
    format: str = ""

    def summary(self) -> str:
        """One line for the user, e.g. ``kept 950 of 1000 (alpaca): 30 truncated, 20 dropped (too long)``."""
        parts = [(self.truncated, "truncated"), (self.dropped_too_long, "dropped (too long)"),
                 (self.empty, "empty"), (len(self.skipped_lines), "skipped (bad lines)")]
        details = ", ".join(f"{n} {what}" for n, what in parts if n)
        return f"kept {self.kept} of {self.total} ({self.format})" + (f": {details}" if details else "")


def _has_targets(labels: list[int]) -> bool:
    # labels[0] is never predicted (the model shifts labels by one), so it does not count.
    return any(label != IGNORE_INDEX for label in labels[1:])


def load_dataset(path, tokenizer, *, format: str = "auto", max_seq_len: int = 512, drop_long: bool = False,
                 train_on_inputs: bool = False, skip_bad_lines: bool = False) -> tuple[list[dict], DataStats]:
    """Read, validate and tokenize a JSONL file; needs only the tokenizer (fails before model loading).

    Args:
        path: JSONL file. format: "auto" or one of FORMATS. max_seq_len: longest example in tokens.
        drop_long: drop longer examples instead of truncating them (keeping the start).
        train_on_inputs: learn the prompt tokens too. skip_bad_lines: skip and report bad lines.

    Returns:
        ``(examples, stats)``: dicts with input_ids and labels (lists of ints, len <= max_seq_len).

    Raises:
        DataError: bad lines (all listed as FILE:LINE, unless skip_bad_lines), or no usable example
            left (the message gives the count per reason).
    """
    if format != "auto" and format not in FORMATS:
        raise DataError(f"unknown data format {format!r}; use auto, alpaca, chat or text")
    if max_seq_len < 2:
        raise DataError(f"max_seq_len must be at least 2 tokens, got {max_seq_len}")
    records, problems = read_lines(path)
    if not records and not problems:
        raise DataError(f"{path}: the file has no examples (it is empty); add one JSON object per line")
    fmt = format if format != "auto" else (detect_format(records, path) if records else "unknown")
    if fmt == "preference":
        raise DataError(f"{path}: the records are preference pairs (prompt/chosen/rejected); train on them with "
                        "--method dpo or --method orpo")
    stats = DataStats(total=len(records) + len(problems), format=fmt)
    examples = []
    max_chars = char_bound(tokenizer, max_seq_len)  # a 50 MB line costs what max_seq_len tokens cost
    for number, record in records:
        reason = validate_record(record, fmt)
        if reason is None:
            if is_empty(record, fmt):
                stats.empty += 1
                continue
            try:
                example = tokenize_example(record, tokenizer, fmt, train_on_inputs, max_chars)
            except (TemplateError, ValueError, TypeError, KeyError) as exc:  # e.g. raise_exception() in templates
                reason = f"cannot render the example ({exc})"
        if reason is not None:
            problems.append((number, f"{path}:{number}: {reason}"))
            continue
        if len(example["input_ids"]) > max_seq_len:
            example = {k: v[:max_seq_len] for k, v in example.items()}
            if drop_long or not _has_targets(example["labels"]):
                stats.dropped_too_long += 1
                continue
            stats.truncated += 1
        examples.append(example)
    stats.skipped_lines = [message for _, message in sorted(problems)]
    if problems and not skip_bad_lines:
        raise DataError(problem_message(path, stats.skipped_lines, f"format {fmt}; fix them, or pass --skip-bad-lines"))
    stats.kept = len(examples)
    if not examples:
        raise DataError(_no_examples_message(path, stats, max_seq_len, drop_long))
    return examples, stats


def _no_examples_message(path, stats: DataStats, max_seq_len: int, drop_long: bool) -> str:
    why = "with --drop-long" if drop_long else "even the prompt alone"
    reasons = [f"{stats.dropped_too_long} longer than max_seq_len={max_seq_len} ({why}; raise --max-seq-len)",
               f"{stats.empty} empty (nothing to learn)", f"{len(stats.skipped_lines)} skipped bad lines"]
    lines = [f"{path}: no usable example among {stats.total} line(s) ({stats.format}): " + ", ".join(reasons)]
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
