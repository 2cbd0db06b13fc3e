"""Data stage: JSONL file -> tokenized examples with loss masks -> (packed) padded batches.

Formats, one JSON object per line, detected from the fields or forced with ``--format``:
  alpaca  {"instruction": str, "input": str (optional), "output": str}
  chat    {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}
          rendered with the tokenizer's chat template (DEFAULT_CHAT_TEMPLATE when it has none);
          the conversation must end with an assistant message.
  text    {"text": str}   raw text, every token learned.

Alpaca prompts use the fixed Stanford Alpaca template (ALPACA_PROMPT / ALPACA_PROMPT_NO_INPUT):
  "Below is an instruction ...\\n\\n### Instruction:\\n{instruction}\\n\\n[### Input:\\n{input}\\n\\n]### Response:\\n"

Labels are aligned with input_ids (the model shifts them) and are -100 where no loss is taken:
the prompt (alpaca), system/user turns and role headers (chat), padding. Learned: the response,
every assistant message's content with its end-of-turn token, and an EOS appended at the end,
labelled with the EOS id even when the pad token shares that id (padding is found by position).

Tokenization: the text is cut into prompt/response segments; each segment is tokenized together
with everything before it and kept only when the earlier tokens come out unchanged, otherwise
alone. So the prompt tokens are always exactly what ``encode_prompt`` gives at generation time,
and no token straddles a prompt/response boundary. BOS is added only when the tokenizer adds
it by itself and the text does not already start with it; chat templates bring their own.

Packing: examples are packed best-fit into sequences of at most max_seq_len tokens with
position_ids restarting at 0 per example; ``collate`` then leaves out attention_mask so that
transformers derives a block-diagonal causal mask from the position_ids. The model must be
called with ``use_cache=False`` on packed batches: with a KV cache transformers skips that
detection and attention leaks across examples.
"""

from __future__ import annotations

import bisect
import codecs
import json
import random
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jinja2 import TemplateError

IGNORE_INDEX = -100
FORMATS = ("alpaca", "chat", "text")
MAX_LISTED_PROBLEMS = 50

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

# ChatML-like; every turn ends with the tokenizer's EOS, so the model learns to stop after its turn.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class DataError(ValueError):
    """The data cannot be used; one line per problem, ``FILE:LINE: what is wrong``."""


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


def _problem_message(path, problems: list[str], hint: str) -> str:
    shown = problems[:MAX_LISTED_PROBLEMS]
    more = len(problems) - len(shown)
    lines = [f"{len(problems)} bad line(s) in {path} ({hint}):", *shown]
    if more:
        lines.append(f"... and {more} more")
    return "\n".join(lines)


def _type_name(value) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _read_lines(path) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]]:
    """(line number, object) pairs and (line number, "FILE:LINE: reason") for every bad line."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file (check the data path)") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror})") from None
    records, problems = [], []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if number == 1 and line.startswith(codecs.BOM_UTF8):
            line = line[len(codecs.BOM_UTF8):]
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.append((number, f"{path}:{number}: invalid UTF-8 (byte 0x{line[exc.start]:02x} at column "
                                     f"{exc.start + 1}); save the file as UTF-8"))
            continue
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            problems.append((number, f"{path}:{number}: invalid JSON ({exc.msg} at column {exc.colno})"))
            continue
        if not isinstance(record, dict):
            problems.append((number, f"{path}:{number}: expected a JSON object per line, got {_type_name(record)}"))
            continue
        records.append((number, record))
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
    records, problems = _read_lines(path)
    messages = [message for _, message in problems]
    if messages and not skip_bad_lines:
        raise DataError(_problem_message(path, messages, "fix them, or pass --skip-bad-lines to skip them"))
    return records, messages


def _guess_format(record: dict) -> str | None:
    if "messages" in record:
        return "chat"
    if "instruction" in record or "output" in record:
        return "alpaca"
    return "text" if "text" in record else None


def detect_format(records, path) -> str:
    """The format most records' fields point to ("chat" > "alpaca" > "text" on ties).

    Args:
        records: dicts or (line number, dict) pairs as ``read_jsonl`` returns them.
        path: the file, for the error message.

    Raises:
        DataError: no record has 'messages', 'instruction'/'output' or 'text'.
    """
    dicts = [r[1] if isinstance(r, tuple) else r for r in records]
    votes = Counter(f for f in map(_guess_format, dicts) if f is not None)
    if not votes:
        fields = sorted(dicts[0]) if dicts else []
        raise DataError(f"{path}: cannot detect the data format: no line has 'messages' (chat), "
                        f"'instruction' and 'output' (alpaca) or 'text' (raw text); first line's fields: "
                        f"{fields}. Rename the fields or set --format.")
    return max(("chat", "alpaca", "text"), key=lambda f: votes[f])  # first maximum wins ties


def _field_problem(record: dict, name: str, optional: bool = False) -> str | None:
    if name not in record:
        return None if optional else f"missing field '{name}'"
    value = record[name]
    if optional and value is None:
        return None
    return None if isinstance(value, str) else f"field '{name}' must be a string, got {_type_name(value)}"


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
            return f"messages[{i}] must be an object with 'role' and 'content', got {_type_name(message)}"
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                what = "missing" if key not in message else f"must be a string, got {_type_name(message[key])}"
                return f"messages[{i}].{key} {what}"
    if messages[-1]["role"] != "assistant":
        return f"the last message must be from the assistant (it is from '{messages[-1]['role']}')"
    return None


def _is_empty(record: dict, fmt: str) -> bool:
    """True when there is nothing to learn (empty response / text / assistant messages)."""
    if fmt == "alpaca":
        return not record["output"].strip()
    if fmt == "text":
        return not record["text"].strip()
    return not any(m["content"].strip() for m in record["messages"] if m["role"] == "assistant")


def _alpaca_prompt(record: dict) -> str:
    if record.get("input"):
        return ALPACA_PROMPT.format(instruction=record["instruction"], input=record["input"])
    return ALPACA_PROMPT_NO_INPUT.format(instruction=record["instruction"])


def _render_chat(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    template = None if tokenizer.chat_template else DEFAULT_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                         chat_template=template)


def _prompt_before(tokenizer, messages: list[dict], i: int) -> str:
    """The template's prompt for assistant turn ``i``: the messages before it with the generation
    prompt, or (transformers refuses an empty conversation) the turn's own header when i == 0."""
    if i:
        return _render_chat(tokenizer, messages[:i], True)
    through, content = _render_chat(tokenizer, messages[:1], False), messages[0]["content"]
    return through[:through.find(content)] if content and content in through else ""


def _chat_segments(messages: list[dict], tokenizer) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, learned) pieces: each assistant turn is learned
    from its first character through its end-of-turn marker (trailing whitespace is not).

    A turn counts only where rendering the conversation up to it gives a prefix of the whole
    (templates such as Qwen3's render earlier turns differently): such earlier turns stay
    unlearned context; the last turn must be locatable.
    """
    full = _render_chat(tokenizer, messages, False)
    segments, cursor = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _prompt_before(tokenizer, messages, i)
        through = _render_chat(tokenizer, messages[:i + 1], False)
        if not (full.startswith(through) and through.startswith(before)):
            if i == len(messages) - 1:
                raise DataError("the chat template does not render the last assistant turn after the prompt "
                                "that add_generation_prompt=True gives, so the answer cannot be located")
            warnings.warn("the chat template renders earlier turns differently once later turns follow; "
                          "only the assistant turns it renders consistently are learned", stacklevel=2)
            continue
        learned = through[len(before):].rstrip()
        segments += [(full[cursor:len(before)], False), (learned, True)]
        cursor = len(before) + len(learned)
    return segments


def _segments(record: dict, tokenizer, fmt: str) -> list[tuple[str, bool]]:
    if fmt == "alpaca":
        return [(_alpaca_prompt(record), False), (record["output"], True)]
    if fmt == "text":
        return [(record["text"], True)]
    return _chat_segments(record["messages"], tokenizer)


def render_example(record: dict, tokenizer, fmt: str) -> tuple[str, str]:
    """``(prompt_text, response_text)``: the prompt exactly as the model sees it before the answer
    and the expected answer (alpaca: output; chat: last assistant content; text: "" and the text).

    Chat prompts are the template over all messages before the last (assistant) one, with
    add_generation_prompt=True. Encode the prompt with ``encode_prompt`` to match training.

    Raises:
        DataError: the record is not valid for ``fmt`` (the reason, as ``validate_record`` gives it).
    """
    reason = validate_record(record, fmt)
    if reason is not None:
        raise DataError(reason)
    if fmt == "alpaca":
        return _alpaca_prompt(record), record["output"]
    if fmt == "text":
        return "", record["text"]
    messages = record["messages"]
    return _prompt_before(tokenizer, messages, len(messages) - 1), messages[-1]["content"]


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _segment_ids(tokenizer, text: str, ids: list[int], segment: str) -> list[int]:
    """Tokens of ``segment`` following ``text`` (already tokenized as ``ids``), never changing ``ids``.

    Tokenized together with the text when that leaves the earlier tokens intact (the tokens a
    model sees in a real sequence); otherwise a token would straddle the boundary, so the
    segment is tokenized on its own, behind a special token that is then removed (specials never
    merge): SentencePiece-style tokenizers put a space in front of a text that starts the input.
    """
    joint = _encode(tokenizer, text + segment)
    if joint[:len(ids)] == ids:
        return joint[len(ids):]
    special = tokenizer.eos_token or tokenizer.bos_token or tokenizer.unk_token
    if special:
        anchor = _encode(tokenizer, special)
        anchored = _encode(tokenizer, special + segment)
        if len(anchor) == 1 and anchored[:1] == anchor:
            return anchored[1:]
    return _encode(tokenizer, segment)


def _bos_prefix(tokenizer, fmt: str, first_ids: list[int]) -> list[int]:
    """[BOS] when the tokenizer adds one by itself and the text lacks it (never for chat)."""
    bos = tokenizer.bos_token_id
    if bos is None or fmt == "chat" or first_ids[:1] == [bos]:
        return []
    return [bos] if list(tokenizer("a")["input_ids"])[:1] == [bos] else []


def encode_prompt(prompt_text: str, tokenizer, fmt: str) -> list[int]:
    """Token ids of a ``render_example`` prompt, exactly as ``tokenize_example`` starts them."""
    ids = _encode(tokenizer, prompt_text)
    return _bos_prefix(tokenizer, fmt, ids) + ids


def tokenize_example(record: dict, tokenizer, fmt: str, train_on_inputs: bool = False) -> dict[str, list[int]]:
    """Tokenize one validated record (no truncation).

    Returns:
        ``{"input_ids": [...], "labels": [...]}`` of equal length; labels are -100 on prompt tokens
        (unless train_on_inputs) and end with the EOS id, which is appended when the text does
        not already end with it.

    Raises:
        DataError: the chat template cannot be split into turns.
    """
    ids: list[int] = []
    learned: list[bool] = []
    text = ""
    for segment, is_learned in _segments(record, tokenizer, fmt):
        if not segment:
            continue
        new = _segment_ids(tokenizer, text, ids, segment)
        ids += new
        learned += [is_learned] * len(new)
        text += segment
    bos = _bos_prefix(tokenizer, fmt, ids)
    ids, learned = bos + ids, [False] * len(bos) + learned
    eos = tokenizer.eos_token_id
    if eos is not None and ids[-1:] != [eos]:
        ids.append(eos)
        learned.append(True)
    labels = [t if (keep or train_on_inputs) else IGNORE_INDEX for t, keep in zip(ids, learned)]
    return {"input_ids": ids, "labels": labels}


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
    records, problems = _read_lines(path)
    if not records and not problems:
        raise DataError(f"{path}: the file has no examples (it is empty); add one JSON object per line")
    fmt = format if format != "auto" else (detect_format(records, path) if records else "unknown")
    stats = DataStats(total=len(records) + len(problems), format=fmt)
    examples = []
    for number, record in records:
        reason = validate_record(record, fmt)
        if reason is None:
            if _is_empty(record, fmt):
                stats.empty += 1
                continue
            try:
                example = tokenize_example(record, tokenizer, fmt, train_on_inputs)
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
        raise DataError(_problem_message(path, stats.skipped_lines, f"format {fmt}; fix them, or pass --skip-bad-lines"))
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


def pack_examples(examples: list[dict], max_seq_len: int) -> list[dict]:
    """Pack examples best-fit (longest first) into sequences of at most max_seq_len tokens.

    Returns:
        dicts with input_ids, labels and position_ids (restarting at 0 for each example); the first
        label of each example is -100 so nothing is learned across a boundary. Inside a pack the
        examples keep their original order; packs come longest-example first (shuffle them).

    Raises:
        ValueError: an example is longer than max_seq_len (load_dataset never returns one).
    """
    lengths = [len(e["input_ids"]) for e in examples]
    if lengths and max(lengths) > max_seq_len:
        raise ValueError(f"an example has {max(lengths)} tokens, more than max_seq_len={max_seq_len}")
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens left, bin index), sorted: best fit = first that is large enough
    for i in sorted(range(len(examples)), key=lambda i: -lengths[i]):
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k < len(free):
            left, b = free.pop(k)
        else:
            left, b = max_seq_len, len(bins)
            bins.append([])
        bins[b].append(i)
        if left - lengths[i] > 0:
            bisect.insort(free, (left - lengths[i], b))
    packs = []
    for members in bins:
        pack = {"input_ids": [], "labels": [], "position_ids": []}
        for i in sorted(members):
            pack["input_ids"] += examples[i]["input_ids"]
            pack["labels"] += [IGNORE_INDEX] + examples[i]["labels"][1:]
            pack["position_ids"] += list(range(lengths[i]))
        packs.append(pack)
    return packs


def collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest example.

    Returns:
        input_ids (B, T) and labels (B, T) with -100 on padding (found by position, so a real EOS
        equal to the pad id keeps its label); unpacked batches get attention_mask (B, T), batches
        with packed examples get position_ids (B, T) and no attention_mask, from which transformers
        builds a block-diagonal causal mask (call the model with ``use_cache=False``). Padding gets
        its own positions 0.. so it forms a separate block.
    """
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; load the tokenizer with quant.load_tokenizer (pad = EOS)")
    batch, longest = len(examples), max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((batch, longest), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
    packed = any("position_ids" in e for e in examples)
    extra = torch.zeros((batch, longest), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.tensor(example["labels"], dtype=torch.long)
        if packed:
            extra[row, :n] = torch.tensor(example.get("position_ids", list(range(n))), dtype=torch.long)
            extra[row, n:] = torch.arange(longest - n)
        else:
            extra[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, ("position_ids" if packed else "attention_mask"): extra}
