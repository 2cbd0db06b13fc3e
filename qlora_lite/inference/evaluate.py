"""Evaluation of a model (plus adapter) on a data file: exact-match of greedy answers, loss, perplexity."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from qlora_lite.data.dataset import load_dataset, read_usable_records
from qlora_lite.data.tokenize import render_example
from qlora_lite.inference.generate import greedy_answers, prompt_ids
from qlora_lite.model.loss import evaluate


def expected_answer(response_text: str, tokenizer) -> str:
    """The response as exact-match compares it: without end-of-turn tokens and surrounding space."""
    for token in {tokenizer.eos_token, tokenizer.pad_token} - {None}:
        response_text = response_text.replace(token, "")
    return response_text.strip()


def exact_match(model: nn.Module, tokenizer, pairs: list[tuple[str, str]], fmt: str = "chat", *,
                batch_size: int = 16, max_new_tokens: int | None = None) -> dict:
    """Greedy-generate a reply to each prompt and compare it, stripped, with the expected response.

    Args:
        pairs: ``(prompt_text, response_text)`` as ``data.render_example`` returns them.
        max_new_tokens: default: the longest expected answer in tokens, plus 8.

    Returns:
        ``{"exact_match": fraction, "correct": int, "total": int, "samples": [{prompt, expected, got}],
        "answers": [str]}`` (samples: the first five, for display; answers: every stripped reply).
    """
    expected = [expected_answer(r, tokenizer) for _, r in pairs]
    if max_new_tokens is None:
        longest = max((len(tokenizer(e, add_special_tokens=False)["input_ids"]) for e in expected), default=0)
        max_new_tokens = longest + 8
    prompts = [prompt_ids(tokenizer, p, fmt) for p, _ in pairs]
    got = [g.strip() for g in greedy_answers(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                             batch_size=batch_size)]
    correct = sum(g == e for g, e in zip(got, expected))
    samples = [{"prompt": p, "expected": e, "got": g} for (p, _), e, g in list(zip(pairs, expected, got))[:5]]
    return {"exact_match": correct / len(pairs) if pairs else 0.0, "correct": correct, "total": len(pairs),
            "samples": samples, "answers": got}


def evaluate_jsonl(model: nn.Module, tokenizer, path: str | Path, *, fmt: str = "auto", max_seq_len: int = 512,
                   limit: int | None = None, batch_size: int = 8, exact: bool = True,
                   skip_bad_lines: bool = False, keep_answers: bool = False, split: str = "train",
                   config_name: str | None = None, field_map: dict[str, str] | None = None) -> dict:
    """Loss, perplexity and (when the records carry answers) greedy exact-match on a data source.

    Args:
        path: a data file, folder or hub dataset id (``data.sources``); split, config_name, field_map
            as ``data.dataset.load_dataset`` takes them.
        fmt: data format (auto, alpaca, chat, text); ``text`` records have no answers to match.
        limit: use only the first ``limit`` usable records (all when None).
        exact: also run the generation-based exact-match (the slow part).
        keep_answers: keep every greedy reply under ``"answers"`` (otherwise only five samples).

    Returns:
        ``{"data", "format", "examples", "eval_loss", "eval_ppl", "eval_tokens"}`` plus
        ``"exact_match", "correct", "total", "samples"`` when answers exist.

    Raises:
        errors.DataError: unreadable source or records, with FILE:LINE or FILE row N.
    """
    source = dict(split=split, config_name=config_name, field_map=field_map)
    examples, _ = load_dataset(str(path), tokenizer, format=fmt, max_seq_len=max_seq_len, drop_long=False,
                               train_on_inputs=False, skip_bad_lines=skip_bad_lines, **source)
    examples = examples[:limit] if limit else examples
    result = {"data": str(path), "examples": len(examples)}
    result.update(evaluate(model, examples, batch_size, tokenizer.pad_token_id))
    records, _, fmt, _ = read_usable_records(str(path), format=fmt, **source)  # load_dataset raised on bad ones
    records = [r for _, r in records]
    result["format"] = fmt
    if exact and fmt != "text":
        pairs = [render_example(r, tokenizer, fmt) for r in records]
        pairs = [(p, r) for p, r in pairs if expected_answer(r, tokenizer)][: limit or None]
        result.update(exact_match(model, tokenizer, pairs, fmt, batch_size=max(batch_size, 16)))
        if not keep_answers:
            del result["answers"]
    return result
