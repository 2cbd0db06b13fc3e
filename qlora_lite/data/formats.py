"""Data formats: reading a JSONL file with FILE:LINE errors, detecting its format, validating records.

Formats of a record (a JSONL line, a Parquet or CSV row, ...), detected from the fields or forced with
``--format`` (``data.mapping`` first renames fields per --field-map and turns ShareGPT into chat):
  alpaca  {"instruction": str, "input": str (optional), "output": str}
  chat    {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}
          rendered with the tokenizer's chat template (DEFAULT_CHAT_TEMPLATE when it has none);
          the conversation must end with an assistant message.
  text    {"text": str}   raw text, every token learned.

This is the first step of the data stage (``data.dataset.load_dataset``): it only looks at the JSON, never
at a tokenizer, so every bad line is reported (all of them, not only the first) before anything is
tokenized. Turning records into tokens is ``data_tokenize``.
"""

from __future__ import annotations

import codecs
import difflib
import json
from collections import Counter

from qlora_lite.errors import DataError

FORMATS = ("alpaca", "chat", "text")
MAX_LISTED_PROBLEMS = 50


# Roles chat templates know; "tool" carries a tool's output back in tool-use conversations.
CHAT_ROLES = ("system", "user", "assistant", "tool")


def problem_message(path, problems: list[str], hint: str, unit: str = "line") -> str:
    """The DataError text for bad lines (or rows): a count and ``hint`` (what to do), then at most
    MAX_LISTED_PROBLEMS of the ``"FILE:LINE: reason"`` (``"FILE row N: reason"``) lines."""
    shown = problems[:MAX_LISTED_PROBLEMS]
    more = len(problems) - len(shown)
    lines = [f"{len(problems)} bad {unit}(s) in {path} ({hint}):", *shown]
    if more:
        lines.append(f"... and {more} more")
    return "\n".join(lines)


def type_name(value) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def iter_lines(path):
    """Yield ``(line number, object, None)`` per JSON object and ``(line number, None, "FILE:LINE: reason")``
    per bad line, reading the file line by line (a large file is never held whole); blank lines are skipped.

    Raises DataError when the file cannot be opened or read.
    """
    try:
        with open(path, "rb") as f:
            for number, line in enumerate(f, start=1):
                if number == 1 and line.startswith(codecs.BOM_UTF8):
                    line = line[len(codecs.BOM_UTF8):]
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as exc:
                    yield number, None, (f"{path}:{number}: invalid UTF-8 (byte 0x{line[exc.start]:02x} at column "
                                         f"{exc.start + 1}); save the file as UTF-8")
                    continue
                if not text.strip():
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as exc:
                    yield number, None, f"{path}:{number}: invalid JSON ({exc.msg} at column {exc.colno})"
                    continue
                if not isinstance(record, dict):
                    yield number, None, f"{path}:{number}: expected a JSON object per line, got {type_name(record)}"
                    continue
                yield number, record, None
    except FileNotFoundError:
        raise DataError(f"{path}: no such file (check the data path)") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror})") from None


def read_lines(path) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]]:
    """(line number, object) pairs and (line number, "FILE:LINE: reason") for every bad line (``iter_lines``).

    Raises DataError when the file cannot be read.
    """
    records, problems = [], []
    for number, record, problem in iter_lines(path):
        if problem is None:
            records.append((number, record))
        else:
            problems.append((number, problem))
    return records, problems


def read_jsonl(path, skip_bad_lines: bool = False) -> tuple[list[tuple[int, dict]], list[str]]:
    """Read a JSONL file line by line; blank lines are ignored.

    Args:
        path: the JSONL file.
        skip_bad_lines: report bad lines in the returned list instead of raising.

    Returns:
        ``(records, skipped)``: (1-based line number, object) pairs and one
        ``"FILE:LINE: reason"`` message per skipped line.

    Raises:
        DataError: the file cannot be read, or (without skip_bad_lines) some lines are not valid
            UTF-8 / JSON / a JSON object; every bad line is listed, not only the first.
    """
    records, problems = read_lines(path)
    messages = [message for _, message in problems]
    if messages and not skip_bad_lines:
        raise DataError(problem_message(path, messages, "fix them, or pass --skip-bad-lines to skip them"))
    return records, messages


def _guess_format(record: dict) -> str | None:
    if "chosen" in record and "rejected" in record:
        return "preference"
    if "messages" in record or "conversations" in record:
        return "chat"
    if "instruction" in record or "output" in record:
        return "alpaca"
    return "text" if "text" in record else None


def detect_format(records, path) -> str:
    """The format most records' fields point to ("preference" > "chat" > "alpaca" > "text" on ties);
    "preference" (chosen/rejected pairs) is read by ``data.preference``.

    Args:
        records: dicts or (position, dict) pairs, any iterable (read once).
        path: the source, for the error message.

    Raises:
        DataError: no record has 'messages'/'conversations', 'instruction'/'output' or 'text'.
    """
    votes: Counter = Counter()
    first = None
    for record in records:
        record = record[1] if isinstance(record, tuple) else record
        first = record if first is None else first
        votes[_guess_format(record)] += 1
    votes.pop(None, None)
    if not votes:
        fields = sorted(first) if first else []
        raise DataError(f"{path}: cannot detect the data format: no record has 'messages' or 'conversations' "
                        f"(chat, ShareGPT), 'instruction' and 'output' (alpaca), 'text' (raw text) or 'chosen' and "
                        f"'rejected' (preference pairs); first record's fields: {fields}. Name the columns with "
                        "--field-map (e.g. output=answer,instruction=question), rename the fields, or set --format.")
    return max(("preference", "chat", "alpaca", "text"), key=lambda f: votes[f])  # first maximum wins ties


def _field_problem(record: dict, name: str, optional: bool = False) -> str | None:
    if name not in record:
        return None if optional else f"missing field '{name}'"
    value = record[name]
    if optional and value is None:
        return None
    return None if isinstance(value, str) else f"field '{name}' must be a string, got {type_name(value)}"


def validate_record(record: dict, fmt: str) -> str | None:
    """None when ``record`` is a usable example of format ``fmt``, else the reason (one line)."""
    if fmt == "alpaca":
        return (_field_problem(record, "instruction") or _field_problem(record, "output")
                or _field_problem(record, "input", optional=True))
    if fmt == "text":
        return _field_problem(record, "text")
    if fmt != "chat":
        raise ValueError(f"unknown data format {fmt!r}; expected one of {FORMATS}")
    messages = record.get("messages")
    if messages is None:
        return "missing field 'messages'"
    if not isinstance(messages, list) or not messages:
        return "field 'messages' must be a non-empty list of {role, content} objects"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"messages[{i}] must be an object with 'role' and 'content', got {type_name(message)}"
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                what = "missing" if key not in message else f"must be a string, got {type_name(message[key])}"
                return f"messages[{i}].{key} {what}"
    for i, message in enumerate(messages):
        if message["role"] not in CHAT_ROLES:  # a typo ("asistant") would be trained on as prompt text
            close = difflib.get_close_matches(message["role"], CHAT_ROLES, 1)
            return (f"messages[{i}].role {message['role']!r} is not one of {', '.join(CHAT_ROLES)}"
                    + (f" (did you mean {close[0]!r}?)" if close else ""))
    if messages[-1]["role"] != "assistant":
        return f"the last message must be from the assistant (it is from '{messages[-1]['role']}')"
    return None


def is_empty(record: dict, fmt: str) -> bool:
    """True when there is nothing to learn (empty response / text / assistant messages)."""
    if fmt == "alpaca":
        return not record["output"].strip()
    if fmt == "text":
        return not record["text"].strip()
    return not any(m["content"].strip() for m in record["messages"] if m["role"] == "assistant")
