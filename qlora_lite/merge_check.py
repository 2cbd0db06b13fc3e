"""The merge check: the merged folder's logits against base+adapter's, on a fixed probe input.

Both sides run streamed (``stream_forward.streamed_logits``): one decoder block's weights at a time,
the embedding matrix and head only before and after the blocks. The reference side reads the base
and passes each quantized weight through the quantization training used, then dequantizes it to the
compute dtype, which is what a 4-bit layer multiplies by; the adapter stays unmerged around it. So
the check is independent of the merge arithmetic (``lora.merge_weight``) and of the key mapping of
the merge plan, and costs about one block of memory, not a model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .export import MergePlan, _roundtrip
from .quant import DTYPES, release_freed_memory

# Largest acceptable |logit difference| relative to max |reference logit|, per output dtype. The
# reference itself runs in bf16 and bf16 keeps 8 mantissa bits, so rounding noise grows with depth:
# on tiny models correct merges deviate by about 1e-2 relative, but on the 22-layer 1.1B benchmark
# model a correct merge deviated by 3.1% (0.133 at max |logit| 4.28), which a 3% bound refused.
# Corrupted weights (a layer scaled by 3) deviate by far more than 6%.
TOLERANCE = {"bf16": 6e-2, "fp16": 6e-2, "fp32": 6e-2}


def probe_ids(vocab_size: int, length: int = 32) -> torch.Tensor:
    """A fixed pseudo-random token sequence, (1, length): exercises every layer, needs no tokenizer."""
    return torch.randint(0, vocab_size, (1, length), generator=torch.Generator().manual_seed(0))


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def as_trained(plan: MergePlan, key: str, tensor: torch.Tensor) -> torch.Tensor:
    """A base tensor as the 4-bit training model multiplied by it: quantized, dequantized to the compute dtype."""
    return _roundtrip(tensor, key in plan.conv1d, plan.quant, as_computed=True) if key in plan.quantized else tensor


def _quantized_reference_logits(plan: MergePlan, trust_remote_code: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Base+adapter loaded whole, as training loads it. Only for 8-bit: LLM.int8 multiplies int8
    activations, which no dequantized weight reproduces, so that reference cannot be streamed."""
    from .model import build_model

    names = {v: k for k, v in DTYPES.items()}
    reference = build_model(str(plan.base_dir), bits=plan.quant["bits"],
                            compute_dtype=names[plan.quant.get("compute_dtype") or torch.bfloat16],
                            adapter=str(plan.adapter_dir), trainable=False, gradient_checkpointing=False,
                            trust_remote_code=trust_remote_code)
    ids = probe_ids(reference.get_input_embeddings().weight.shape[0])
    expected = _logits(reference, ids)
    del reference
    return ids, expected


def verify_merge(plan: MergePlan, merged_dir: Path, dtype: str, tolerance: float | None = None,
                 trust_remote_code: bool = False) -> tuple[float, float]:
    """Largest |logit difference| between the merged folder and base+adapter, and the tolerance.

    The reference is the model the adapter belongs to: for the dequantized policy the base with every
    quantized weight as training held it (quantized, then dequantized to the compute dtype, which is
    what a 4-bit layer multiplies by), plus the adapter unmerged; for ``original`` the 16-bit base plus
    the adapter, in the output dtype. Both sides run streamed (``stream_forward.streamed_logits``), one
    side after the other, each holding one decoder block's weights at a time and the embedding matrix
    and head only before and after the blocks, so the check costs about one block.
    """
    import functools
    import gc

    from .stream_forward import streamed_logits

    vocab = plan.config.get("vocab_size") or plan.config.get("text_config", {}).get("vocab_size")
    ids = probe_ids(int(vocab)) if vocab else None
    if (plan.merge_base == "dequantized" and plan.quant["bits"] == 8) or ids is None:
        ids, expected = _quantized_reference_logits(plan, trust_remote_code)
    else:
        trained = plan.merge_base == "dequantized"  # its plan always records the compute dtype
        expected = streamed_logits(plan.base_dir, plan.quant["compute_dtype"] if trained else DTYPES[dtype], ids,
                                   trust_remote_code=trust_remote_code, adapter_dir=plan.adapter_dir,
                                   transform=functools.partial(as_trained, plan) if trained else None)
    gc.collect()
    release_freed_memory()
    got = streamed_logits(merged_dir, DTYPES[dtype], ids, trust_remote_code=trust_remote_code)
    gc.collect()
    diff = (got - expected).abs().max().item()
    if tolerance is None:
        tolerance = TOLERANCE[dtype] * max(1e-3, expected.abs().max().item())
    return (diff if diff == diff else float("inf")), tolerance  # NaN counts as failure
