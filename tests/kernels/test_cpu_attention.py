"""The blocked CPU attention computes what SDPA computes, and training uses it where it applies."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from qlora_lite.kernels import cpu_attention
from qlora_lite.kernels.chunked_loss import causal_lm_loss
from qlora_lite.kernels.cpu_attention import NAME, causal_attention
from qlora_lite.model.build import build_model


def _qkv(batch=2, q_heads=8, kv_heads=2, length=300, dim=16, seed=0, dtype=torch.bfloat16):
    """Random q, k, v; length not a multiple of the block, so the last block is partial."""
    g = torch.Generator().manual_seed(seed)
    make = lambda heads: torch.randn(batch, heads, length, dim, generator=g).to(dtype).requires_grad_()  # noqa: E731
    return make(q_heads), make(kv_heads), make(kv_heads)


def _grads(fn, q, k, v, grad_out):
    for t in (q, k, v):
        t.grad = None
    out = fn(q, k, v)
    out.backward(grad_out.to(out.dtype))
    return [out.float(), q.grad.float(), k.grad.float(), v.grad.float()]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_fp32_attention_forward_and_backward(masked, dtype):
    """In bf16 (CPUs with bf16 kernels) and fp32 (the others) alike."""
    q, k, v = _qkv(dtype=dtype)
    b, _, t, d = q.shape
    mask = None
    if masked:  # packed examples (block-diagonal causal), and left padding: query rows that see nothing
        segment = (torch.arange(t) >= 120).long()
        mask = (segment[:, None] == segment[None, :]).tril().expand(b, 1, t, t).clone()
        mask[1, :, :7] = False
        mask[1, :, :, :7] = False
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))

    def reference(q, k, v):  # fp32 SDPA on expanded heads, rows that see nothing set to 0
        rep = q.shape[1] // k.shape[1]
        kk, vv = (x.float().repeat_interleave(rep, dim=1) for x in (k, v))
        if mask is None:
            return F.scaled_dot_product_attention(q.float(), kk, vv, is_causal=True)
        out = F.scaled_dot_product_attention(q.float(), kk, vv, attn_mask=mask)
        return out.masked_fill(~mask.any(-1, keepdim=True), 0.0)

    got = _grads(lambda q, k, v: causal_attention(q, k, v, mask, d ** -0.5), q, k, v, grad_out)
    expected = _grads(reference, q, k, v, grad_out)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, expected):
        assert torch.isfinite(a).all(), name
        scale = e.abs().max()
        bound = 0.02 if dtype == torch.bfloat16 else 1e-5
        assert (a - e).abs().max() <= bound * scale, f"{name}: {(a - e).abs().max():.4f} vs max {scale:.3f}"
    if masked:
        assert got[0][1, :, :7].abs().max() == 0, "a query that sees no key must give zeros, not NaN"


class _CountCalls(TorchDispatchMode):
    """Counts calls of the blocked attention op."""

    count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.qlora_lite.causal_attention.default
        return func(*args, **(kwargs or {}))


def test_training_model_uses_it_and_gets_sdpa_gradients(tiny_llama):
    """A training model on the CPU switches to the blocked attention; its loss and LoRA gradients are
    SDPA's (to bf16 rounding), with and without a padding mask; generation stays on SDPA."""
    ids = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :5] = 0  # left padding
    results = {}
    for implementation in (NAME, "sdpa"):
        model = build_model(str(tiny_llama), bits=4, rank=8, dropout=0.0, seed=0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(name)))
        assert model.config._attn_implementation == NAME
        model.set_attn_implementation(implementation)
        with _CountCalls() as calls:
            for mask in (None, attention_mask):
                loss = causal_lm_loss(model, ids, ids, attention_mask=mask, chunk=16)
                loss.backward()
                results[implementation, mask is None] = (loss.item(), {
                    n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None})
                model.zero_grad(set_to_none=True)
        assert bool(calls.count) == (implementation == NAME)
    for plain in (True, False):
        (loss_ours, grads_ours), (loss_sdpa, grads_sdpa) = results[NAME, plain], results["sdpa", plain]
        assert abs(loss_ours - loss_sdpa) < 2e-2
        for name in grads_sdpa:
            torch.testing.assert_close(grads_ours[name], grads_sdpa[name], rtol=5e-2, atol=5e-3, msg=name)


def test_other_cases_fall_back_to_sdpa(tiny_llama):
    """Generation with a KV cache and fp16 models take transformers' SDPA path unchanged; bf16 and fp32
    (the compute dtypes CPUs run fast) take the blocked kernel."""
    model = build_model(str(tiny_llama), bits=4, rank=8, seed=0)
    q, k, v = _qkv(batch=1, length=8)
    module = model.model.layers[0].self_attn
    assert cpu_attention._applies(module, q, k, None, 0.0, {})
    assert not cpu_attention._applies(module, q[:, :, -1:], k, None, 0.0, {})  # one new token over a cache
    assert cpu_attention._applies(module, q.float(), k.float(), None, 0.0, {})
    assert not cpu_attention._applies(module, q.half(), k.half(), None, 0.0, {})
    assert not cpu_attention._applies(module, q, k, None, 0.1, {})  # attention dropout
    assert not cpu_attention._applies(module, q, k, None, 0.0, {"sliding_window": 4})
    assert cpu_attention._applies(module, q, k, None, 0.0, {"sliding_window": 4096})  # Mistral at 8 tokens


def test_packed_examples_do_not_see_each_other(tiny_llama):
    """Packed rows (restarting position_ids, no attention mask: transformers builds the block mask)
    give each example the logits it gets alone."""
    from transformers import AutoModelForCausalLM

    from qlora_lite.kernels.cpu_attention import use_cpu_attention

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16)
    assert use_cpu_attention(model)
    g = torch.Generator().manual_seed(0)
    examples = [torch.randint(3, 300, (n,), generator=g) for n in (150, 90, 60)]  # spans the 128-query blocks
    ids = torch.cat(examples).unsqueeze(0)
    positions = torch.cat([torch.arange(len(e)) for e in examples]).unsqueeze(0)
    with _CountCalls() as calls, torch.no_grad():
        packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0].float()
        start = 0
        for example in examples:
            alone = model(input_ids=example.unsqueeze(0), use_cache=False).logits[0].float()
            got = packed[start:start + len(example)]
            assert (got - alone).abs().max() <= 0.02 * alone.abs().max()
            start += len(example)
    assert calls.count == 2 * 4  # 2 layers x (the packed row and 3 examples): none fell back to SDPA
