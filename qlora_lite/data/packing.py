"""Packing and collation: tokenized examples -> sequences -> padded (B, T) tensor batches.

Packing: examples are packed best-fit into sequences of at most max_seq_len tokens with
position_ids restarting at 0 per example; ``collate`` then leaves out attention_mask so that
transformers derives a block-diagonal causal mask from the position_ids. The model must be
called with ``use_cache=False`` on packed batches: with a KV cache transformers skips that
detection and attention leaks across examples.

Both take the examples ``data.dataset.load_dataset`` returns (lists of ints); nothing here reads a file or
a tokenizer, only the pad id.
"""

from __future__ import annotations

import bisect

import torch

from qlora_lite.kernels.footprint import IGNORE_INDEX


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
        raise ValueError("pad_token_id is None; load the tokenizer with model.folder.load_tokenizer (pad = EOS)")
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
