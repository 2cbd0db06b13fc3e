"""Checkpoints saved by the installed transformers load through our streaming readers, whatever key
names transformers writes for the architecture (GPT-NeoX saves its head as ``embed_out``)."""

import pytest
import torch
from tiny_models import ARCHS, make_adapter, probe, tiny_config

from qlora_lite.errors import ModelLoadError
from qlora_lite.merge.plan import plan_merge
from qlora_lite.merge.write import merge_adapter
from qlora_lite.model.loading import load_base_model

# Every family the docs name (ARCHS) plus GPT-NeoX, whose saved keys differ from its module names.
FAMILIES = (*ARCHS, "gpt_neox")


@pytest.mark.parametrize("arch", FAMILIES)
def test_saved_checkpoint_loads_like_from_pretrained(tiny_model_factory, arch):
    from transformers import AutoModelForCausalLM

    folder = tiny_model_factory(arch)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    ids = probe()
    with torch.no_grad():
        theirs = reference(input_ids=ids).logits.float()
        exact = load_base_model(folder, bits=16, compute_dtype=torch.bfloat16)(input_ids=ids).logits.float()
        quantized = load_base_model(folder, bits=4)(input_ids=ids).logits.float()
    assert torch.equal(exact, theirs), "every tensor must land where from_pretrained puts it"
    assert (quantized - theirs).abs().max().item() <= 0.25  # test_quant's 4-bit tolerance


@pytest.mark.parametrize("arch", ["gpt_neox", "gpt2"])
def test_merge_reads_renamed_keys_and_writes_a_folder_transformers_loads(tiny_model_factory, tmp_path, arch):
    """The merge plan and both sides of its check read the base by transformers' key names; the head
    keeps the file's name (embed_out), which from_pretrained maps back."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    base = tiny_model_factory(arch)
    adapter = make_adapter(base, tmp_path / "adapter")
    plan = plan_merge(base, adapter)
    assert len(plan.lora) == len(plan.quantized) > 0
    report = merge_adapter(base, adapter, tmp_path / "out", progress=False)
    assert report.tensors_checked == len(plan.entries) and report.max_abs_logit_diff <= report.tolerance
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    with safe_open(base / "model.safetensors", "pt") as f:
        assert keys == set(f.keys())
    merged, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_a_layout_that_must_be_fused_is_refused_by_name(tmp_path, tokenizer_dir):
    """Mixtral files hold one tensor per expert, which transformers 5 fuses on load; the streaming
    loader cannot, and says so instead of 'the checkpoint lacks ...'."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    pytest.importorskip("transformers.conversion_mapping")
    config = AutoConfig.for_model("mixtral", hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, num_local_experts=2,
                                  vocab_size=len(AutoTokenizer.from_pretrained(tokenizer_dir)))
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"checkpoint tensor .*experts.* must be combined"):
        load_base_model(tmp_path, bits=4)


def test_transformers_4_class_mapping_is_applied_when_there_is_no_conversion_module(monkeypatch):
    """transformers 4.x keeps renames in the class attribute ``_checkpoint_conversion_mapping``."""
    import sys

    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from qlora_lite.model.loading import checkpoint_key_map

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(tiny_config("llama", 320))
    monkeypatch.setitem(sys.modules, "transformers.conversion_mapping", None)  # import fails, as on 4.x
    monkeypatch.setattr(model, "_checkpoint_conversion_mapping", {r"^decoder\.": "model.", r"^head\.": "lm_head."},
                        raising=False)
    resolve = checkpoint_key_map(model)
    assert resolve("decoder.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    assert resolve("head.weight") == "lm_head.weight"
    assert resolve("layers.1.input_layernorm.weight") == "model.layers.1.input_layernorm.weight"  # bare model file
    assert resolve("model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    assert resolve("decoder.layers.0.mlp.no_such.weight") is None
