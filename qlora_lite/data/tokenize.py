"""Tokenization and loss masks: one validated record -> ``{"input_ids", "labels"}``.

Alpaca prompts use the fixed Stanford Alpaca template (ALPACA_PROMPT / ALPACA_PROMPT_NO_INPUT):
  "Below is an instruction ...\n\n### Instruction:\n{instruction}\n\n[### Input:\n{input}\n\n]### Response:\n"

Labels are aligned with input_ids (the model shifts them) and are -100 where no loss is taken:
the prompt (alpaca), system/user turns and role headers (chat), padding. Learned: the response,
every assistant message's content with its end-of-turn token, and an EOS appended at the end,
labelled with the EOS id even when the pad token shares that id (padding is found by position).

Tokenization: the text is cut into prompt/response segments; each segment is tokenized together
with everything before it and kept only when the earlier tokens come out unchanged, otherwise
alone. So the prompt tokens are always exactly what ``encode_prompt`` gives at generation time,
and no token straddles a prompt/response boundary. BOS is added only when the tokenizer adds
it by itself and the text does not already start with it; chat templates bring their own.

Generation and evaluation use ``render_example`` + ``encode_prompt`` from here, so a prompt is
tokenized the same way at training and at inference time.
"""

from __future__ import annotations

import warnings

from qlora_lite.data.formats import validate_record
from qlora_lite.errors import DataError
from qlora_lite.kernels.footprint import IGNORE_INDEX

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


def char_bound(tokenizer, max_tokens: int) -> int:
    """Characters of text that hold more than ``max_tokens`` tokens, whatever the text.

    No token spans more characters than the longest vocabulary entry (byte-level and byte-fallback
    entries are longer than the text they stand for), so cutting a text after this many characters
    changes only tokens past the first ``max_tokens``, which truncation drops anyway.
    """
    return (max_tokens + 16) * max(1, max(map(len, tokenizer.get_vocab()), default=1))


def tokenize_example(record: dict, tokenizer, fmt: str, train_on_inputs: bool = False,
                     max_chars: int | None = None) -> dict[str, list[int]]:
    """Tokenize one validated record (no truncation).

    Args:
        max_chars: tokenize only the first ``max_chars`` characters of the rendered record (see
            ``char_bound``), so the work per record stays bounded by the sequence length; None: all.

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
        if max_chars is not None:
            segment = segment[:max(0, max_chars - len(text))]
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
