"""The fused 4-bit + LoRA function and the chunked loss give the plain path's numbers."""

from __future__ import annotations

import contextlib

import pytest
import torch
from tiny_models import ProjectionMatmuls

from qlora_lite.kernels import lora_4bit as fastpath
from qlora_lite.kernels.chunked_loss import causal_lm_loss, chunked_causal_lm_loss
from qlora_lite.model import lora
from qlora_lite.model.bnb import dequantize_weight, quantize_linear
from qlora_lite.model.build import build_model
from qlora_lite.model.loading import DTYPES
from qlora_lite.model.lora import LoRALinear


def _layer(dropout=0.0, bias=False, dtype=torch.bfloat16):
    torch.manual_seed(0)
    weight = torch.randn(96, 64) * 0.1
    base = quantize_linear(weight, torch.randn(96) if bias else None, bits=4, compute_dtype=dtype)
    layer = LoRALinear(base, rank=8, alpha=16, dropout=dropout, lora_dtype=dtype).train()
    torch.nn.init.normal_(layer.lora_B.weight, std=0.1)  # non-zero B so the adapter path counts
    return layer


@contextlib.contextmanager
def plain_path(enabled: bool = False):
    """Every LoRA layer through the plain (unfused) path, unless ``enabled``: the reference the fused
    path is compared with."""
    if enabled:
        yield
        return
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(lora, "fast_lora_applies", lambda layer, x: False)
        yield


def _run(layer, x, enabled, seed=1):
    with plain_path(enabled):
        torch.manual_seed(seed)
        x = x.clone().requires_grad_(True)
        y = layer(x)
        (y.float() ** 2).sum().backward()
        grads = [x.grad, layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone()]
        layer.zero_grad(set_to_none=True)
        return y.detach(), grads


def _fp32_reference(layer, x, seed=1):
    """Output and grads in fp32 on the dequantized weight, with the same dropout mask."""
    torch.manual_seed(seed)
    x = x.float().requires_grad_(True)
    a = layer.lora_A.weight.detach().float().requires_grad_(True)
    b = layer.lora_B.weight.detach().float().requires_grad_(True)
    mask = layer.lora_dropout(torch.ones_like(x))
    y = x @ dequantize_weight(layer.base_layer).t() + layer.scaling * ((x * mask) @ a.t()) @ b.t()
    if layer.base_layer.bias is not None:
        y = y + layer.base_layer.bias.float()
    (y**2).sum().backward()
    return y.detach(), [x.grad, a.grad, b.grad]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dropout,bias", [(0.0, False), (0.0, True), (0.3, False)])
def test_fused_4bit_lora_matches_plain_path(dropout, bias, dtype):
    """bf16 (CPUs with bf16 kernels, GPUs) and fp32 (CPUs without): the 4-bit weight is dequantized
    straight to the compute dtype and the fused layer gives the plain layer's output and gradients."""
    layer = _layer(dropout, bias, dtype)
    x = torch.randn(2, 5, 64, dtype=dtype)
    assert fastpath.fast_lora_applies(layer, x)
    y_fast, g_fast = _run(layer, x, True)
    y_slow, g_slow = _run(layer, x, False)
    y_ref, g_ref = _fp32_reference(layer, x)
    assert y_fast.shape == (2, 5, 96) and y_fast.dtype == dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(y_fast.float(), y_slow.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(y_fast.float(), y_ref, rtol=tol, atol=tol)
    for fast, slow, ref in zip(g_fast, g_slow, g_ref):
        assert fast.dtype == slow.dtype == dtype
        # bf16: both round along the way; the fused one must be as close to fp32 as the plain one
        err_fast, err_slow = (fast.float() - ref).abs().max(), (slow.float() - ref).abs().max()
        if dtype == torch.bfloat16:
            assert err_fast <= 1e-2 * ref.abs().max() and err_fast <= 1.5 * err_slow + 1e-3
        else:
            assert err_fast <= 1e-5 * ref.abs().max() and err_slow <= 1e-5 * ref.abs().max()


def test_fast_path_only_in_training():
    layer = _layer()
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert not fastpath.fast_lora_applies(layer.eval(), x)
    with torch.no_grad():
        assert not fastpath.fast_lora_applies(layer.train(), x)
    assert not fastpath.fast_lora_applies(layer.train(), x.float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_chunked_loss_matches_full_logits(dtype):
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 32, dtype=dtype, requires_grad=True)
    head = torch.randn(50, 32, dtype=dtype)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :4] = -100
    loss = chunked_causal_lm_loss(hidden, head, labels, chunk=5)
    loss.backward()
    grad_chunked = hidden.grad.clone()
    hidden.grad = None
    logits = (hidden @ head.t()).float()
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1))
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=1e-3)
    grad_tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(grad_chunked.float(), hidden.grad.float(), rtol=grad_tol, atol=grad_tol)
    total = chunked_causal_lm_loss(hidden.detach(), head, labels, chunk=3, reduction="sum")
    torch.testing.assert_close(total, ref.detach() * (labels[:, 1:] != -100).sum(), rtol=1e-3, atol=1e-2)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("policy", ["memory", "balanced", "speed"])
def test_checkpointed_model_step_same_loss_and_grads(tiny_llama, policy, dtype):
    """Every policy, in both CPU compute dtypes: the fast path (fused 4-bit LoRA, blocked attention,
    chunked loss) gives the plain transformers path's loss and LoRA gradients."""
    model = build_model(str(tiny_llama), bits=4, rank=8, dropout=0.0, seed=0, gradient_checkpointing=True,
                        checkpoint_policy=policy, compute_dtype=dtype)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    results = []
    for enabled in (True, False):
        with plain_path(enabled):
            loss = causal_lm_loss(model, ids, ids, chunk=16) if enabled else model(input_ids=ids, labels=ids).loss
            loss.backward()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        results.append((loss.item(), grads))
    (loss_fast, g_fast), (loss_slow, g_slow) = results
    assert g_fast.keys() == g_slow.keys() and len(g_fast) == 2 * 7 * 2
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {DTYPES[dtype]}
    loss_tol, rtol, atol = (1e-2, 5e-2, 5e-3) if dtype == "bf16" else (1e-5, 1e-4, 1e-6)
    assert abs(loss_fast - loss_slow) < loss_tol
    for name in g_fast:
        torch.testing.assert_close(g_fast[name], g_slow[name], rtol=rtol, atol=atol, msg=name)


def test_checkpoint_policies_trade_recompute_as_documented(tiny_llama):
    """memory recomputes every projection, balanced keeps some outputs, speed keeps them all: its step
    runs exactly the matmuls of a step without checkpointing (a policy that silently fell back to
    recomputing would still give the right gradients, so count the work)."""
    ids = torch.randint(3, 300, (1, 24), generator=torch.Generator().manual_seed(0))
    counts = {}
    for policy in ("memory", "balanced", "speed", None):
        model = build_model(str(tiny_llama), bits=4, rank=8, dropout=0.0, seed=0,
                            gradient_checkpointing=policy is not None, checkpoint_policy=policy or "balanced")
        with ProjectionMatmuls() as matmuls:
            causal_lm_loss(model, ids, ids, chunk=16).backward()
        counts[policy] = matmuls.count
    assert counts["memory"] > counts["balanced"] > counts["speed"] == counts[None]


def test_auto_policy_is_decided_from_free_memory(tiny_llama, monkeypatch):
    """The default ``auto`` trains a tiny model without checkpointing (it would save nothing that
    matters), with speed when checkpointing is worth it and memory is plentiful, and falls back to
    recomputing everything when memory is short."""
    from qlora_lite.config import load_config
    from qlora_lite.train import fit, model_setup
    from qlora_lite.train.model_setup import build_model_from_config

    config = load_config(None, {"model": str(tiny_llama)})
    assert config.train.checkpoint_policy == "auto"
    monkeypatch.setattr(model_setup, "available_memory", lambda device: 64 * 2**30)
    model = build_model_from_config(config)
    assert model.qlora_checkpoint_policy is None and not model.is_gradient_checkpointing
    monkeypatch.setattr(fit, "CHECKPOINTING_WORTH", 0.0)
    model = build_model_from_config(config)
    assert model.qlora_checkpoint_policy == "speed" and model.is_gradient_checkpointing
    monkeypatch.setattr(model_setup, "available_memory", lambda device: 1)
    assert build_model_from_config(config).qlora_checkpoint_policy == "memory"
