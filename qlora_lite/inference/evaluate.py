"""Evaluation of a model (plus adapter) on a data file: exact-match of greedy answers, loss, perplexity."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from qlora_lite.data.dataset import load_dataset, read_usable_records, source_format
from qlora_lite.data.preference import load_preference_dataset
from qlora_lite.data.tokenize import render_example
from qlora_lite.inference.generate import greedy_answers, model_device, prompt_ids
from qlora_lite.model.loss import evaluate
from qlora_lite.model.preference import (
    PreferenceLoss,
    collate_pairs,
    metrics_from_sums,
    pair_reference,
    pair_statistics,
    sequence_logps,
)


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


def is_preference_file(path: str | Path, fmt: str = "auto", **source) -> bool:
    """Whether ``eval`` scores ``path`` as preference pairs (``--format preference``, or detected);
    ``source``: split, config_name, field_map of the source."""
    if fmt != "auto":
        return fmt == "preference"
    return source_format(str(path), fmt, **source) == "preference"


@torch.no_grad()
def pair_logps(model: nn.Module, pairs: list[dict], pad_token_id: int, batch_size: int = 8) -> list[list[float]]:
    """[chosen, rejected] summed response log-probabilities of each pair under ``model`` as it is."""
    device, out = model_device(model), []
    for start in range(0, len(pairs), batch_size):
        part = pairs[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate_pairs(part, pad_token_id).items()}
        chosen, rejected = sequence_logps(model, batch)[0].chunk(2)
        out += [[float(c), float(r)] for c, r in zip(chosen, rejected)]
    return out


@torch.no_grad()
def evaluate_pairs(model: nn.Module, tokenizer, pairs: list[dict], *, batch_size: int = 8, beta: float = 0.1,
                   reference: list[list[float]] | None = None) -> dict:
    """Preference accuracy of ``model`` on tokenized pairs (``data.preference``).

    Two kinds of number: ``preference_accuracy``, how often the model gives the chosen response the
    higher log-probability; and DPO's implicit-reward metrics (``eval_rewards/accuracies``: chosen
    reward above rejected; ``eval_rewards/margins``: beta times the log-prob ratios; ``eval_loss``:
    the DPO loss) against a reference: ``reference`` ([chosen, rejected] log-probs per pair, e.g.
    ``pair_logps`` of the SFT adapter a DPO run started from), else the base with the adapters off.
    With no adapter and no reference every reward is 0: only ``preference_accuracy`` says anything.
    """
    if reference is not None:
        pairs = [{**pair, "ref_logps": ref} for pair, ref in zip(pairs, reference)]
    objective, device = PreferenceLoss("dpo", beta=beta), model_device(model)
    sums, wins = torch.zeros(5, dtype=torch.float64), 0
    for start in range(0, len(pairs), batch_size):
        part = pairs[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate_pairs(part, tokenizer.pad_token_id).items()}
        logps, n_tokens = sequence_logps(model, batch)
        chosen, rejected = logps.chunk(2)
        wins += int((chosen > rejected).sum())
        ref = pair_reference(model, batch, part, objective)
        sums += pair_statistics(objective.pair_terms(logps, n_tokens, ref)).double().cpu()
    return {"format": "preference", "examples": len(pairs), "preference_accuracy": wins / len(pairs), "beta": beta,
            "reference": "given" if reference is not None else "base (adapter off)",
            **metrics_from_sums(sums, prefix="eval_")}


def load_pairs(path: str | Path, tokenizer, *, max_seq_len: int = 512, limit: int | None = None,
               skip_bad_lines: bool = False, **source) -> list[dict]:
    """The first ``limit`` (all when None) usable pairs of a preference file, tokenized.

    Raises:
        data.DataError: unreadable file or pairs, with FILE:LINE.
    """
    pairs, _ = load_preference_dataset(str(path), tokenizer, max_seq_len=max_seq_len, skip_bad_lines=skip_bad_lines,
                                       **source)
    return pairs[:limit] if limit else pairs
