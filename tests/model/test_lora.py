"""Our LoRA layers on 4/8/16-bit bases: exact start, frozen base, parity, checkpointing, merge."""

import pytest
import torch

from qlora_lite.errors import LoRATargetError
from qlora_lite.model.bnb import dequantize_weight
from qlora_lite.model.build import build_model, prepare_for_training
from qlora_lite.model.loading import load_base_model
from qlora_lite.model.lora import (
    LoRALinear,
    find_target_modules,
    inject_lora,
    lora_layers,
    merge_and_unload,
    merge_weight,
    set_merged,
)


def _ids(batch=2, length=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (batch, length), generator=g)


def _loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def _randomize_lora(model, seed=1, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * scale)


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_step0_logits_equal_base(tiny_llama, bits):
    base = load_base_model(tiny_llama, bits=bits)
    ids = _ids()
    with torch.no_grad():
        expected = base(ids).logits
    inject_lora(base, "all-linear", rank=8, alpha=16)
    with torch.no_grad():
        got = base(ids).logits
    assert torch.equal(got, expected)


def _base_snapshot(model):
    """Every non-LoRA tensor, plus the 4-bit quant-state tensors, as byte copies."""
    snap = {n: t.detach().clone() for n, t in model.state_dict().items() if "lora_" not in n}
    for name, module in model.named_modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            for key, value in state.as_dict(packed=True).items():
                snap[f"{name}.quant.{key}"] = value.clone()
    return snap


@pytest.mark.parametrize("bits", [4, 8])
def test_training_changes_only_lora(tiny_llama, bits):
    model = build_model(str(tiny_llama), bits=bits, rank=4, alpha=8, dropout=0.1, seed=0)
    before = _base_snapshot(model)
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        _loss(model, _ids()).backward()
        optimizer.step()
        optimizer.zero_grad()
    after = _base_snapshot(model)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), f"base tensor {name} changed"
    changed = [n for n, p in model.named_parameters() if "lora_B" in n and not torch.equal(p, lora_before[n])]
    assert len(changed) == len(lora_layers(model))
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())


def test_qlora_parity_with_dequantized_16bit_copy(tiny_llama):
    """LoRA on the 4-bit base == LoRA on a bf16 model holding the dequantized weights, same A/B."""
    quantized = load_base_model(tiny_llama, bits=4)
    plain = load_base_model(tiny_llama, bits=16)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if hasattr(module, "quant_state") or type(module).__name__ == "Linear4bit":
                plain.get_submodule(name).weight.copy_(dequantize_weight(module).to(torch.bfloat16))
    torch.manual_seed(0)
    inject_lora(quantized, "all-linear", rank=4, alpha=8, dropout=0.0)
    torch.manual_seed(0)
    inject_lora(plain, "all-linear", rank=4, alpha=8, dropout=0.0)
    _randomize_lora(quantized)
    _randomize_lora(plain)
    ids = _ids()
    outputs, grads = [], []
    for model in (quantized, plain):
        prepare_for_training(model, gradient_checkpointing=False)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        outputs.append(out.logits.float())
        grads.append({n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None})
    assert (outputs[0] - outputs[1]).abs().max() < 0.05
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        a, b = grads[0][name], grads[1][name]
        assert (a - b).norm() <= 0.05 * b.norm() + 1e-6, name


@pytest.mark.parametrize("bits", [4, 16])
def test_gradient_checkpointing_same_gradients(tiny_llama, bits):
    grads = []
    for checkpointing in (False, True):
        model = build_model(str(tiny_llama), bits=bits, rank=4, alpha=8, seed=0,
                            gradient_checkpointing=checkpointing)
        _randomize_lora(model)
        _loss(model, _ids()).backward()
        grads.append({n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None})
        assert model.config.use_cache is False
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-2, atol=1e-5), name


def test_each_architecture_loads_in_4bit_and_learns(tiny_model_factory, any_arch):
    model = build_model(str(tiny_model_factory(any_arch)), bits=4, rank=8, alpha=16, seed=0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    ids = _ids(batch=2, length=24)
    losses = []
    for _ in range(8):
        loss = _loss(model, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_merge_unmerge(tiny_model_factory, bits):
    for arch in ("llama", "gpt2"):
        model = load_base_model(tiny_model_factory(arch), bits=bits)
        inject_lora(model, "all-linear", rank=4, alpha=8, dropout=0.0)
        _randomize_lora(model)
        layer = next(iter(lora_layers(model).values()))
        base_before = {k: v.clone() for k, v in layer.base_layer.state_dict().items()}
        ids = _ids()
        with torch.no_grad():
            expected = model(ids).logits.float()
            set_merged(model, True)
            merged = model(ids).logits.float()
            set_merged(model, False)
            restored = model(ids).logits.float()
        assert (merged - expected).abs().max() < 0.05
        assert torch.equal(restored, expected)
        for key, value in layer.base_layer.state_dict().items():
            assert torch.equal(value, base_before[key])
        merge_and_unload(model)
        assert not lora_layers(model)
        with torch.no_grad():
            assert (model(ids).logits.float() - expected).abs().max() < 0.05


def test_merge_weight_matches_layer_forward_for_conv1d():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(12, 8)  # weight (in=8, out=12)
    layer = LoRALinear(conv, rank=2, alpha=4, lora_dtype=torch.float32)
    torch.nn.init.normal_(layer.lora_B.weight)
    merged = merge_weight(conv.weight, layer.lora_A.weight, layer.lora_B.weight, layer.scaling, fan_in_fan_out=True)
    x = torch.randn(3, 8)
    assert torch.allclose(x @ merged + conv.bias, layer(x), atol=1e-5)


def test_targets_by_suffix_and_helpful_error(tiny_llama):
    model = load_base_model(tiny_llama, bits=16)
    names = find_target_modules(model, "q_proj, v_proj")
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert "lm_head" not in find_target_modules(model, "all-linear")
    with pytest.raises(LoRATargetError, match="down_proj.*gate_proj.*k_proj"):
        find_target_modules(model, "query_key_value")


def test_rslora_scaling(tiny_llama):
    model = load_base_model(tiny_llama, bits=16)
    inject_lora(model, "q_proj", rank=16, alpha=8, rslora=True)
    layer = next(iter(lora_layers(model).values()))
    assert layer.scaling == pytest.approx(8 / 4)
    assert layer.lora_A.weight.dtype == torch.bfloat16 and not torch.all(layer.lora_A.weight == 0)
    assert torch.all(layer.lora_B.weight == 0)


def test_training_on_from_an_adapter_uses_this_runs_dropout(tiny_llama, tmp_path):
    """--adapter with --dropout: the run trains with the dropout it was given, not the file's; inference
    keeps the file's (it applies no dropout anyway)."""
    from qlora_lite.model.adapter import save_adapter

    start = build_model(str(tiny_llama), bits=16, rank=4, alpha=8, dropout=0.0, seed=0)
    folder = save_adapter(start, tmp_path / "start")
    trained = build_model(str(tiny_llama), bits=16, adapter=str(folder), dropout=0.2, trainable=True)
    assert {layer.lora_dropout.p for layer in lora_layers(trained).values()} == {0.2}
    frozen = build_model(str(tiny_llama), bits=16, adapter=str(folder), dropout=0.2, trainable=False)
    assert all(isinstance(layer.lora_dropout, torch.nn.Identity) for layer in lora_layers(frozen).values())
