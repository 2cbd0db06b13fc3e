"""What a run trains on, and in which order: the tokenized data, its epochs of shuffled micro-batches,
and the number of optimizer steps they make."""

from __future__ import annotations

import logging
import math

import torch

from qlora_lite.config import Config
from qlora_lite.data.cache import resolve_cache_dir
from qlora_lite.data.dataset import load_dataset, split_eval
from qlora_lite.data.packing import pack_examples
from qlora_lite.data.preference import load_preference_dataset
from qlora_lite.flag_values import parse_field_map

log = logging.getLogger(__name__)


def epoch_batches(num_examples: int, batch_size: int, seed: int, epoch: int, num_processes: int = 1) -> list[list[int]]:
    """Global micro-batches of one epoch: example indices in a permutation seeded by ``seed + epoch``.

    Each global micro-batch holds ``batch_size * num_processes`` indices; process ``i`` takes
    ``chunk[i::num_processes]``, so no example is seen twice per epoch. A last chunk too small to
    give every process one example is dropped (only possible with several processes).
    """
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(num_examples, generator=generator).tolist()
    size = batch_size * num_processes
    chunks = [order[i:i + size] for i in range(0, num_examples, size)]
    return [c for c in chunks if len(c) >= num_processes]


def plan_steps(micro_batches_per_epoch: int, grad_accum: int, max_steps: int, epochs: float) -> tuple[int, int]:
    """``(optimizer steps per epoch, total steps)``; ``max_steps`` wins over ``epochs`` when > 0."""
    per_epoch = max(1, math.ceil(micro_batches_per_epoch / grad_accum))
    total = max_steps if max_steps > 0 else max(1, math.ceil(epochs * per_epoch))
    return per_epoch, total


def load_training_data(config: Config, tokenizer) -> tuple[list[dict], list[dict]]:
    """Tokenize and validate the train (and eval) data; runs before the model is loaded so bad data fails fast.

    Raises:
        errors.DataError: unreadable or unusable data, with FILE:LINE or FILE row N.
    """
    d = config.data
    kwargs = dict(format=d.format, max_seq_len=d.max_seq_len, drop_long=d.drop_long, skip_bad_lines=d.skip_bad_lines,
                  split=d.data_split, config_name=d.data_config, field_map=parse_field_map(d.field_map)[0])
    if config.train.method == "sft":
        load = load_dataset
        kwargs.update(train_on_inputs=d.train_on_inputs, cache_dir=resolve_cache_dir(d.data_cache))
    else:  # dpo, orpo: preference pairs
        load = load_preference_dataset
    train_examples, stats = load(d.data, tokenizer, **kwargs)
    log.info("train data %s: %s%s", d.data, stats.summary(), " (tokenized cache)" if stats.from_cache else "")
    eval_examples: list[dict] = []
    if d.eval_data:
        eval_examples, eval_stats = load(d.eval_data, tokenizer, **{**kwargs, "split": d.eval_split or d.data_split})
        log.info("eval data %s: %s%s", d.eval_data, eval_stats.summary(),
                 " (tokenized cache)" if eval_stats.from_cache else "")
    elif d.eval_fraction > 0:
        train_examples, eval_examples = split_eval(train_examples, d.eval_fraction, config.train.seed)
        log.info("held out %d of %d examples for evaluation", len(eval_examples),
                 len(eval_examples) + len(train_examples))
    if d.packing:
        before = len(train_examples)
        train_examples = pack_examples(train_examples, d.max_seq_len)
        log.info("packed %d examples into %d sequences of up to %d tokens", before, len(train_examples),
                 d.max_seq_len)
    return train_examples, eval_examples
