"""Preference pairs for DPO and ORPO: ``{"prompt", "chosen", "rejected"}`` records -> token pairs.

Two shapes, one JSON object per line:
  text  ``{"prompt": str, "chosen": str, "rejected": str}``: prompt text followed by each response,
        as written (put any prompt template into ``prompt`` itself), as TRL does for plain text.
  chat  ``{"prompt": [messages], "chosen": ..., "rejected": ...}``: each response is a string (the
        assistant reply), a list of the reply's messages, or the whole conversation starting with the
        prompt's messages; rendered with the chat template (the prompt with the generation prompt).

Each side of a pair is the prompt tokens followed by the response tokens and EOS; the labels mask the
prompt, so only response tokens count in the log-probabilities. Truncation: the prompt is kept whole
and each response is cut to what ``max_seq_len`` leaves (or the pair is dropped with ``drop_long``); a
prompt of ``max_seq_len`` tokens or more leaves no response token and is a bad line.
"""

from __future__ import annotations

from jinja2 import TemplateError

from qlora_lite.data.dataset import DataStats
from qlora_lite.data.formats import detect_format, problem_message, validate_record
from qlora_lite.data.mapping import normalize_record
from qlora_lite.data.sources import open_source
from qlora_lite.data.tokenize import (
    _bos_prefix,
    _encode,
    _render_chat,
    _segment_ids,
    char_bound,
)
from qlora_lite.errors import DataError
from qlora_lite.kernels.footprint import IGNORE_INDEX

FIELDS = ("prompt", "chosen", "rejected")


def _kind(value) -> str:
    return "a string" if isinstance(value, str) else "a list of messages" if isinstance(value, list) else "other"


def _reply(prompt: list[dict], response) -> list[dict]:
    """The assistant messages of a chat response: a string, the reply's messages, or the whole
    conversation (which then starts with the prompt's messages)."""
    if isinstance(response, str):
        return [{"role": "assistant", "content": response}]
    if len(response) > len(prompt) and response[:len(prompt)] == prompt:
        return response[len(prompt):]
    return response


def validate_pair(record: dict) -> str | None:
    """None when ``record`` is a usable preference pair, else the reason (one line)."""
    missing = [name for name in FIELDS if name not in record]
    if missing:
        return f"missing field(s) {', '.join(repr(m) for m in missing)} (a pair has prompt, chosen and rejected)"
    prompt = record["prompt"]
    if isinstance(prompt, str):
        for name in ("chosen", "rejected"):
            if not isinstance(record[name], str):
                return f"field '{name}' must be a string like the prompt, got {_kind(record[name])}"
    elif isinstance(prompt, list) and prompt:
        for name in ("chosen", "rejected"):
            value = record[name]
            if not isinstance(value, (str, list)) or (isinstance(value, list) and not value):
                return f"field '{name}' must be a string or a non-empty list of messages"
            reason = validate_record({"messages": prompt + _reply(prompt, value)}, "chat")
            if reason is not None:
                return f"{name}: {reason}"
        if _reply(prompt, record["chosen"]) == _reply(prompt, record["rejected"]):
            return "chosen and rejected are the same response; a pair needs two different ones"
        return None
    else:
        return "field 'prompt' must be a string or a non-empty list of {role, content} messages"
    if record["chosen"] == record["rejected"]:
        return "chosen and rejected are the same response; a pair needs two different ones"
    return None


def _render(record: dict, tokenizer, name: str) -> tuple[str, str, str]:
    """``(prompt_text, response_text, fmt)`` of one side of a validated pair."""
    prompt = record["prompt"]
    if isinstance(prompt, str):
        return prompt, record[name], "text"
    prompt_text = _render_chat(tokenizer, prompt, True)
    full = _render_chat(tokenizer, prompt + _reply(prompt, record[name]), False)
    if not full.startswith(prompt_text):
        raise DataError("the chat template does not render the conversation as the prompt (with the generation "
                        "prompt) followed by the reply, so the reply cannot be located")
    return prompt_text, full[len(prompt_text):].rstrip(), "chat"


def tokenize_pair(record: dict, tokenizer, max_chars: int | None = None) -> dict:
    """Tokenize a validated pair (no truncation).

    Returns:
        ``{"prompt_len": P, "chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}``:
        each side is the same P prompt tokens, then the response and EOS; labels are -100 on the prompt.

    Raises:
        DataError: the chat template cannot be split into prompt and reply.
    """
    out: dict = {}
    for name in ("chosen", "rejected"):
        prompt_text, response_text, fmt = _render(record, tokenizer, name)
        if max_chars is not None:
            prompt_text = prompt_text[:max_chars]
            response_text = response_text[:max(0, max_chars - len(prompt_text))]
        ids = _encode(tokenizer, prompt_text)
        prompt_ids = _bos_prefix(tokenizer, fmt, ids) + ids
        response = _segment_ids(tokenizer, prompt_text, ids, response_text) if response_text else []
        eos = tokenizer.eos_token_id
        if eos is not None and (prompt_ids + response)[-1:] != [eos]:
            response = response + [eos]
        out["prompt_len"] = len(prompt_ids)
        out[f"{name}_input_ids"] = prompt_ids + response
        out[f"{name}_labels"] = [IGNORE_INDEX] * len(prompt_ids) + response
    return out


def fit_pair(pair: dict, max_seq_len: int) -> tuple[dict | None, bool]:
    """``(pair, truncated)`` with each response cut to ``max_seq_len`` tokens in all; ``(None, True)``
    when cutting leaves both sides the same (nothing left to prefer)."""
    if max(len(pair["chosen_input_ids"]), len(pair["rejected_input_ids"])) <= max_seq_len:
        return pair, False
    cut = {k: (v[:max_seq_len] if isinstance(v, list) else v) for k, v in pair.items()}
    if cut["chosen_input_ids"] == cut["rejected_input_ids"]:
        return None, True
    return cut, True


def load_preference_dataset(path, tokenizer, *, format: str = "auto", max_seq_len: int = 512,
                            drop_long: bool = False, skip_bad_lines: bool = False, split: str = "train",
                            config_name: str | None = None, field_map: dict[str, str] | None = None
                            ) -> tuple[list[dict], DataStats]:
    """Read, validate and tokenize preference pairs from any source ``--data`` takes (a JSONL file,
    Parquet, CSV, a datasets folder or hub id: ``sources.open_source``; see the module docstring).

    Returns:
        ``(pairs, stats)``: ``tokenize_pair`` dicts, each side at most ``max_seq_len`` tokens.

    Raises:
        DataError: bad lines (all listed as FILE:LINE: missing field, chosen == rejected, a prompt
            that leaves no room for a response, ...), a file of another format, or no usable pair.
    """
    if format not in ("auto", "preference"):
        raise DataError(f"preference tuning reads prompt/chosen/rejected pairs; --format {format} is not one")
    source = open_source(str(path), split, config_name)
    records, problems = [], []
    for position, record, problem in source.items():
        if problem is not None:
            problems.append((position, problem))
            continue
        mapped, reason = normalize_record(record, field_map or {})
        if reason is not None:
            problems.append((position, f"{source.locate(position)}: {reason}"))
        else:
            records.append((position, mapped))
    path = source.name
    if not records and not problems:
        raise DataError(f"{path}: the source has no examples (it is empty)")
    if format == "auto" and records and (found := detect_format(records, path)) != "preference":
        raise DataError(f"{path}: preference tuning needs {{\"prompt\", \"chosen\", \"rejected\"}} records, but the "
                        f"file holds {found} examples; train those with --method sft")
    stats = DataStats(total=len(records) + len(problems), format="preference")
    pairs = []
    max_chars = char_bound(tokenizer, max_seq_len)
    for number, record in records:
        reason = validate_pair(record)
        if reason is None:
            try:
                pair = tokenize_pair(record, tokenizer, max_chars)
            except (TemplateError, ValueError, TypeError, KeyError) as exc:
                reason = f"cannot render the pair ({exc})"
            else:
                if pair["prompt_len"] >= max_seq_len:
                    reason = (f"the prompt has {pair['prompt_len']} tokens, which leaves no room for a response "
                              f"within --max-seq-len {max_seq_len}; shorten it or raise --max-seq-len")
        if reason is not None:
            problems.append((number, f"{source.locate(number)}: {reason}"))
            continue
        pair, truncated = fit_pair(pair, max_seq_len)
        if pair is None or (truncated and drop_long):
            stats.dropped_too_long += 1
            continue
        stats.truncated += truncated
        pairs.append(pair)
    stats.skipped_lines = [message for _, message in sorted(problems)]
    if problems and not skip_bad_lines:
        raise DataError(problem_message(path, stats.skipped_lines, "preference pairs; fix them, or pass "
                                                                   "--skip-bad-lines", source.unit))
    stats.kept = len(pairs)
    if not pairs:
        raise DataError(f"{path}: no usable pair among {stats.total} line(s): {stats.dropped_too_long} longer than "
                        f"--max-seq-len {max_seq_len}" + (" (with --drop-long)" if drop_long else "")
                        + f", {len(stats.skipped_lines)} skipped bad lines")
    return pairs, stats
