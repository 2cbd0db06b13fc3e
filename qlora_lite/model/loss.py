"""Token-level loss of a causal LM on tokenized examples, and evaluation (loss, perplexity)."""

from __future__ import annotations

import math

import torch
from torch import nn

from qlora_lite.data.packing import collate
from qlora_lite.kernels.chunked_loss import causal_lm_loss
from qlora_lite.kernels.footprint import IGNORE_INDEX


def batch_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy of a batch (fp32) and the number of predicted tokens.

    Args:
        batch: ``input_ids`` and ``labels`` (B, T), labels unshifted with -100 where no loss is taken,
            plus ``attention_mask`` (B, T) or ``position_ids`` (B, T) for packed rows.

    Returns:
        ``(loss_sum, n_tokens)``: a scalar tensor with grad, and an int.
    """
    # Chunked over the sequence where the architecture allows it: the full fp32 logits (4*B*T*V bytes,
    # more than all checkpointed activations together) are never built.
    extra = {k: v for k, v in batch.items() if k == "position_ids"}
    loss = causal_lm_loss(model, batch["input_ids"], batch["labels"], batch.get("attention_mask"),
                          reduction="sum", **extra)
    return loss, int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def label_tokens(example: dict) -> int:
    """Tokens of one example that count in the loss (labels after the shift that are not -100)."""
    return sum(1 for t in example["labels"][1:] if t != IGNORE_INDEX)


@torch.no_grad()
def eval_sums(model: nn.Module, examples: list[dict], batch_size: int, pad_token_id: int,
              device: torch.device | str = "cpu") -> tuple[float, int]:
    """Summed eval loss and token count over ``examples`` (model put in eval mode, then restored)."""
    # Similar lengths batched together waste less compute on padding (the result does not depend on it).
    examples = sorted(examples, key=lambda e: len(e["input_ids"]))
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start:start + batch_size], pad_token_id)
            loss, n = batch_loss_sum(model, {k: v.to(device) for k, v in batch.items()})
            total, count = total + float(loss), count + n
    finally:
        model.train(was_training)
    return total, count


def evaluate(model: nn.Module, examples: list[dict], batch_size: int, pad_token_id: int,
             device: torch.device | str | None = None) -> dict[str, float]:
    """Mean per-token loss and perplexity of ``model`` on tokenized examples.

    Args:
        examples: ``data.dataset.load_dataset`` output (dicts of ``input_ids``, ``labels``).
        device: where to run; default the device of the model's first parameter.

    Returns:
        ``{"eval_loss": float, "eval_ppl": float, "eval_tokens": int}``.

    Raises:
        ValueError: no example has a token that counts in the loss.
    """
    device = device or next(model.parameters()).device
    total, count = eval_sums(model, examples, batch_size, pad_token_id, device)
    if count == 0:
        raise ValueError("the eval examples have no response token to score")
    loss = total / count
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 80.0)), "eval_tokens": count}
