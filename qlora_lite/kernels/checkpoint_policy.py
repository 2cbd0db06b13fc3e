"""Selective activation checkpointing: what a checkpointed decoder block keeps instead of recomputing.

Policies: memory (keep nothing but the block input), balanced (also the attention and down-projection
outputs), speed (every projection output: no big matmul is recomputed).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts


def _attention_ops() -> set:

    names = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
    ops = {getattr(torch.ops.aten, n).default for n in names if hasattr(torch.ops.aten, n)}
    return ops | {torch.ops.qlora_lite.causal_attention.default}


def selective_checkpoint_context(policy: str = "balanced"):
    """A ``context_fn`` for non-reentrant checkpointing: keep what is cheap to store and costly to
    recompute, recompute the rest of the block.

    ``policy="speed"`` keeps every projection output too (all matmuls whose weight is at least 64
    wide, i.e. not the thin LoRA ones): the recomputed forward then does no big matmul, for more peak
    memory (BENCHMARKS.md, "Checkpoint policies").

    Kept: attention outputs (the fused attention kernel was a tenth of a CPU step; (B, T, H) per
    block) and the outputs of down-projections, matmuls whose input is at least twice as wide as
    their output (the MLP's down_proj: 5632 -> 2048 at 1.1B, a quarter of the block's FLOPs for one
    (B, T, H) tensor). Policy is by op and shape, so it holds for every architecture.
    """
    keep = _attention_ops()
    matmuls = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}

    def decide(ctx, op, *args, **kwargs):  # named apart from ``policy``, which it reads
        if op in keep:
            return CheckpointPolicy.MUST_SAVE
        if op in matmuls:
            weight = args[-1]  # (in, out) view of the weight
            wide = weight.dim() == 2 and min(weight.shape) >= 64
            if wide and (policy == "speed" or weight.shape[0] >= 2 * weight.shape[1]):
                return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(decide)
