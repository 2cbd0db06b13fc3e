"""What the kernels hold, as numbers the memory estimate reads: which models get the chunked loss, the
tokens per loss chunk, and the policy name for "no checkpointing".

Torch-free, so ``qlora-lite estimate`` answers without importing torch.
"""

from __future__ import annotations

# What ``checkpoint_policy: auto`` resolves to when checkpointing is not worth its recompute: a policy
# name meaning "no checkpointing", accepted wherever a policy is.
NO_CHECKPOINTING = "off"

# The label of a token outside the loss (prompt, padding, pack boundaries), as torch's cross-entropy and
# Hugging Face models take it.
IGNORE_INDEX = -100


# Architectures whose logits are a plain ``hidden @ head^T``: training computes their loss chunk by
# chunk (``chunked_loss``), so the peak holds one chunk of logits, not the whole sequence's.
CHUNKED_LOSS_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2", "mixtral"})


# fp32 logits per loss chunk (32 MiB): chunk sizes around it took the least time (BENCHMARKS.md).
LOGITS_PER_CHUNK = 1 << 23


def loss_chunk_for(vocab_size: int) -> int:
    """Tokens per loss chunk for a vocabulary: about ``LOGITS_PER_CHUNK`` logits, a power of two in
    64..1024 (256 for a 32k vocabulary, 64 for Llama 3's 128k)."""
    tokens = max(1, LOGITS_PER_CHUNK // max(1, vocab_size))
    return max(64, min(1024, 1 << (tokens.bit_length() - 1)))
