"""Causal self-attention for training on the CPU: blocked bf16 matmuls instead of the fused kernel.

Why: on a CPU, torch's fused (flash) attention runs far below the matmul peak: a fifth of a whole
QLoRA step for about 3% of its FLOPs (BENCHMARKS.md, "Measurements behind the code"). Here each block of queries is two batched bf16 matmuls around
an fp32 softmax, over only the keys the block can see (causal), and the key/value heads are shared
by their query heads without being copied (grouped-query attention as one matmul per key/value head).
The backward recomputes one block of probabilities at a time, as flash attention does, so no (T, T)
matrix is ever kept.

Numerics match transformers' ``eager`` attention: scores are rounded to the dtype of the matmul (bf16
or fp32), the softmax is fp32, probabilities are multiplied in the input dtype.

The kernel is a ``torch.library`` custom op, so selective checkpointing can keep its output like the
fused kernel's (``kernels.checkpoint_policy.selective_checkpoint_context``). It is used only where it applies: CPU,
bf16 or fp32, causal self-attention over the whole sequence (no KV cache), no dropout, no soft-capping, no
sliding window narrower than the sequence, and no mask or a boolean one (padding, packed examples);
anything else goes to transformers' SDPA path unchanged.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

NAME = "qlora_lite_cpu"  # the attention implementation name registered with transformers


# Queries per block. The block's fp32 scores, (heads, BLOCK, T), should stay in cache; 32 was the
# fastest of 16..128 at 512 and 2048 tokens (BENCHMARKS.md).
BLOCK = 32


# bf16 on CPUs with bf16 kernels, fp32 on the others (model.precision.choose_compute_dtype); fp16 has no fast
# CPU matmul on either class, so it stays with SDPA.
FAST_DTYPES = (torch.bfloat16, torch.float32)


def _causal_blocks(length: int):
    for start in range(0, length, BLOCK):
        yield start, min(start + BLOCK, length)


def _block_probs(q, k, mask, scale: float, start: int, end: int) -> torch.Tensor:
    """fp32 attention probabilities of queries [start, end) over keys [0, end).

    Shapes: q (B, Hkv, G, T, D); k (B, Hkv, T, D); mask None or bool (B | 1, 1, T, T), True = attend.
    Returns (B, Hkv, G, n, end) with n = end - start; a row that may see no key is all zeros.
    """
    b, hkv, g, _, d = q.shape
    n = end - start
    qb = q[:, :, :, start:end].reshape(b * hkv, g * n, d)
    kb = k[:, :, :end].reshape(b * hkv, end, d)
    scores = torch.bmm(qb, kb.transpose(1, 2)).view(b, hkv, g, n, end).float().mul_(scale)
    # Keys before the block are all in the past: only the diagonal (n, n) square needs the causal mask.
    future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu_(1)
    scores[..., start:].masked_fill_(future, float("-inf"))
    if mask is not None:
        blocked = ~mask[:, :, start:end, :end].unsqueeze(1)  # (B | 1, 1, 1, n, end)
        scores.masked_fill_(blocked, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if mask is not None:  # softmax of a row of -inf is NaN; such a query attends to nothing
        probs.masked_fill_(blocked.all(-1, keepdim=True), 0.0)
    return probs


@torch.library.custom_op("qlora_lite::causal_attention", mutates_args=())
def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """Causal attention of (B, Hq, T, D) queries over (B, Hkv, T, D) keys/values, Hq a multiple of Hkv.

    Returns:
        (B, Hq, T, D) in the input dtype; a query that may see no key gets a zero output.
    """
    b, hq, t, d = query.shape
    hkv = key.shape[1]
    q = query.view(b, hkv, hq // hkv, t, d)
    out = torch.empty_like(q)
    for start, end in _causal_blocks(t):
        probs = _block_probs(q, key, mask, scale, start, end).to(query.dtype)
        vb = value[:, :, :end].reshape(b * hkv, end, d)
        block_out = torch.bmm(probs.view(b * hkv, -1, end), vb)
        out[:, :, :, start:end] = block_out.view(b, hkv, -1, end - start, d)
    return out.view(b, hq, t, d)


@causal_attention.register_fake
def _(query, key, value, mask, scale):
    return torch.empty_like(query)


def _setup_context(ctx, inputs, output):
    query, key, value, mask, scale = inputs
    ctx.scale = scale
    ctx.save_for_backward(query, key, value, mask, output)


def _backward(ctx, grad_out):
    """Flash-attention backward, one block of queries at a time (its probabilities recomputed: the
    fused softmax costs less than keeping them); dK and dV accumulate in fp32."""
    query, key, value, mask, out = ctx.saved_tensors
    b, hq, t, d = query.shape
    hkv = key.shape[1]
    g = hq // hkv
    q = query.view(b, hkv, g, t, d)
    grad_out = grad_out.contiguous().view(b, hkv, g, t, d)
    delta = (grad_out.float() * out.view(b, hkv, g, t, d).float()).sum(-1)  # (B, Hkv, G, T): rowsum(dO * O)
    grad_q = torch.empty_like(q)
    grad_k = torch.zeros(b * hkv, t, d, dtype=torch.float32, device=query.device)
    grad_v = torch.zeros_like(grad_k)
    for start, end in _causal_blocks(t):
        n = end - start
        probs = _block_probs(q, key, mask, ctx.scale, start, end)
        go = grad_out[:, :, :, start:end].reshape(b * hkv, g * n, d)
        kb = key[:, :, :end].reshape(b * hkv, end, d)
        vb = value[:, :, :end].reshape(b * hkv, end, d)
        flat_probs = probs.to(query.dtype).view(b * hkv, g * n, end)
        grad_v[:, :end] += torch.bmm(flat_probs.transpose(1, 2), go).float()
        grad_probs = torch.bmm(go, vb.transpose(1, 2)).float().view(b, hkv, g, n, end)
        grad_scores = probs.mul_(grad_probs.sub_(delta[..., start:end].unsqueeze(-1))).mul_(ctx.scale)
        grad_scores = grad_scores.to(query.dtype).view(b * hkv, g * n, end)
        grad_q[:, :, :, start:end] = torch.bmm(grad_scores, kb).view(b, hkv, g, n, d)
        qb = q[:, :, :, start:end].reshape(b * hkv, g * n, d)
        grad_k[:, :end] += torch.bmm(grad_scores.transpose(1, 2), qb).float()
    shape = key.shape
    return (grad_q.view(b, hq, t, d), grad_k.to(key.dtype).view(shape), grad_v.to(value.dtype).view(shape),
            None, None)


causal_attention.register_autograd(_backward, setup_context=_setup_context)


def _applies(module, query, key, attention_mask, dropout, kwargs) -> bool:
    if query.device.type != "cpu" or query.dtype not in FAST_DTYPES or key.dtype != query.dtype:
        return False
    if query.shape[2] != key.shape[2] or query.shape[2] < 2 or query.shape[1] % key.shape[1]:
        return False  # a KV cache (generation) or one token: SDPA's single-row kernels are right there
    if dropout or not getattr(module, "is_causal", True) or kwargs.get("is_causal") is False:
        return False
    if any(kwargs.get(k) is not None for k in ("softcap", "s_aux", "position_bias")):
        return False
    window = kwargs.get("sliding_window")
    if window is not None and window < query.shape[2]:  # a window wider than the sequence changes nothing
        return False
    if kwargs.get("output_attentions"):
        return False
    return attention_mask is None or (attention_mask.dtype == torch.bool and attention_mask.dim() == 4
                                      and attention_mask.shape[1] == 1)


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """A transformers attention function (the ``AttentionInterface`` signature).

    Args:
        query: (B, Hq, T, D); key, value: (B, Hkv, T, D); attention_mask: None (plain causal) or a
            bool (B, 1, T, T) mask from transformers' SDPA mask builder.

    Returns:
        ``(attn_output (B, T, Hq, D), None)``.
    """
    if not _applies(module, query, key, attention_mask, dropout, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    mask = attention_mask[:, :, :, : key.shape[2]] if attention_mask is not None else None
    out = causal_attention(query.contiguous(), key.contiguous(), value.contiguous(), mask, float(scale))
    return out.transpose(1, 2).contiguous(), None


def use_cpu_attention(model) -> bool:
    """Switch a model that uses SDPA on the CPU to this attention; returns whether it switched.

    Registered under ``NAME`` with transformers' attention and mask registries (the masks are SDPA's,
    so padding and packed examples arrive as the boolean masks this kernel reads).
    """
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if any(p.device.type != "cpu" for p in model.parameters()):
        return False
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.set_attn_implementation(NAME)
    return True
