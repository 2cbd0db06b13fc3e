"""Loading the frozen base: quantized layers where expected, same function as the 16-bit model."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from qlora_lite.errors import ModelLoadError
from qlora_lite.model.bnb import dequantize_weight, quantize_linear
from qlora_lite.model.loading import load_base_model


def _bnb():
    import bitsandbytes

    return bitsandbytes


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_base_loads_close_to_reference(tiny_model_factory, any_arch, bits):
    folder = tiny_model_factory(any_arch)
    model = load_base_model(folder, bits=bits)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    ids = torch.randint(3, 300, (2, 12))
    with torch.no_grad():
        ours, theirs = model(ids).logits.float(), reference(ids).logits.float()
    tolerance = {4: 0.25, 8: 0.05, 16: 0.0}[bits]
    assert (ours - theirs).abs().max().item() <= tolerance
    assert all(not p.requires_grad for p in model.parameters())


def test_linear_layers_quantized_embeddings_and_head_not(tiny_llama):
    bnb = _bnb()
    model = load_base_model(tiny_llama, bits=4)
    linears = {n: type(m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    head = [n for n in linears if n == "lm_head"]
    assert head and linears["lm_head"] is torch.nn.Linear
    assert all(t is bnb.nn.Linear4bit for n, t in linears.items() if n != "lm_head")
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.model.norm.weight.dtype == torch.bfloat16


def test_gpt2_conv1d_quantized_with_transposed_weight(tiny_model_factory):
    folder = tiny_model_factory("gpt2")
    plain = load_base_model(folder, bits=16)
    quantized = load_base_model(folder, bits=8)
    conv = plain.transformer.h[0].mlp.c_fc  # Conv1D: weight (in=64, out=256)
    layer = quantized.transformer.h[0].mlp.c_fc
    assert tuple(conv.weight.shape) == (64, 256) and (layer.in_features, layer.out_features) == (64, 256)
    error = (dequantize_weight(layer) - dequantize_weight(conv)).abs().max()
    assert error < 0.02


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_4bit_within_quantization_error(quant_type, double_quant):
    weight = torch.randn(128, 64) * 0.02
    layer = quantize_linear(weight, None, bits=4, quant_type=quant_type, double_quant=double_quant)
    error = (dequantize_weight(layer) - weight).abs()
    # NF4/FP4 steps are at most ~1/3 of the block's absmax apart; errors are well under that.
    assert error.max() < 0.35 * weight.abs().max()
    assert error.mean() < 0.1 * weight.abs().mean() * 4


def test_pickle_weights_refused_unless_allowed(tmp_path, tiny_llama):
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path / "bin-only"
    shutil.copytree(tiny_llama, folder)
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
        f.unlink()
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickle"):
        load_base_model(folder, bits=16)
    model = load_base_model(folder, bits=16, allow_bin_weights=True)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_missing_folder_and_missing_tensor_errors(tmp_path, tiny_llama):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_base_model(tmp_path / "nowhere")
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "damaged"
    shutil.copytree(tiny_llama, folder)
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
        f.unlink()
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ModelLoadError, match="model.layers.1.mlp.up_proj"):
        load_base_model(folder, bits=4)


def test_encoder_model_is_refused_naming_its_architecture(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64)
    BertForMaskedLM(config).save_pretrained(tmp_path / "bert")
    with pytest.raises(ModelLoadError, match=r"config.json: BertForMaskedLM is not a causal language model"):
        load_base_model(tmp_path / "bert", bits=16)


def test_a_nan_in_the_checkpoint_is_a_message_naming_the_tensor(tiny_llama, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from qlora_lite.errors import ModelLoadError
    from qlora_lite.model.loading import load_base_model

    folder = shutil.copytree(tiny_llama, tmp_path / "model")
    weights = load_file(folder / "model.safetensors")
    key = next(k for k in weights if k.endswith("layers.0.mlp.up_proj.weight"))
    weights[key][3, 7] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=rf"{key}: non-finite values .*damaged"):
        load_base_model(str(folder), bits=4)
