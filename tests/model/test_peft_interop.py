"""Adapters cross between qlora-lite and PEFT unchanged, and refuse a base they were not trained on."""

import json
import shutil

import pytest
import torch
from tiny_models import logits, make_adapter, probe

from qlora_lite.errors import AdapterError
from qlora_lite.merge.write import merge_adapter
from qlora_lite.model.adapter import load_adapter, save_adapter
from qlora_lite.model.build import build_model
from qlora_lite.model.loading import load_base_model
from qlora_lite.model.lora import lora_layers


def peft_adapter(base, folder, targets, rslora=True, seed=5):
    """Write an adapter with PEFT itself: get_peft_model, random lora_B, save_pretrained.

    ``autocast_adapter_dtype=False`` keeps PEFT's A/B in bf16 like ours, so both sides do the same
    arithmetic and logits must match exactly (PEFT's default fp32 adapters differ by rounding only,
    checked separately).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_rslora=rslora, lora_dropout=0.0,
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config, autocast_adapter_dtype=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(folder)
    return model.eval()


@pytest.fixture(scope="module")
def from_peft(tiny_model_factory, tmp_path_factory):
    base = tiny_model_factory("llama")
    folder = tmp_path_factory.mktemp("peft-adapter")
    model = peft_adapter(base, folder, ["q_proj", "v_proj", "down_proj"])
    return base, folder, model


def test_peft_adapter_loads_with_identical_logits_and_generates(from_peft):
    base, folder, peft_model = from_peft
    assert not (folder / "qlora_lite.json").exists()
    ours = build_model(str(base), bits=16, adapter=str(folder), trainable=False, compute_dtype="bf16")  # as the bf16 reference
    layers = lora_layers(ours)
    assert len(layers) == 6 and all(layer.rslora for layer in layers.values())
    ids = probe()
    assert torch.equal(logits(ours, ids), logits(peft_model, ids))
    prompt = probe(length=6)[:1]
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=2)
    with torch.no_grad():
        assert torch.equal(ours.generate(prompt, **kwargs), peft_model.generate(input_ids=prompt, **kwargs))


def test_peft_adapter_trains_further_and_merges(from_peft, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, folder, _ = from_peft
    model = build_model(str(base), bits=4, adapter=str(folder), trainable=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    ids = probe()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    save_adapter(model, tmp_path / "continued")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16),
                                         tmp_path / "continued")
    assert reloaded.peft_config["default"].use_rslora

    report = merge_adapter(base, folder, tmp_path / "merged", progress=False)
    assert any("no qlora_lite.json" in note for note in report.notes)
    assert report.max_abs_logit_diff <= report.tolerance


def test_our_adapter_loads_in_peft_with_identical_logits(tiny_model_factory, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = tiny_model_factory("qwen2")
    folder = make_adapter(base, tmp_path / "ours", bits=16, rslora=True)
    ours = build_model(str(base), bits=16, adapter=str(folder), trainable=False, compute_dtype="bf16")  # as the bf16 reference
    ids = probe()
    expected = logits(ours, ids)
    exact = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16), folder,
                                      autocast_adapter_dtype=False)
    assert torch.equal(logits(exact, ids), expected)
    # PEFT's default upcasts A/B to fp32: the same model up to bf16 rounding (a few ulps over 2 layers).
    default = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16), folder)
    effect = (expected - logits(AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16), ids)).abs().max()
    diff = (logits(default, ids) - expected).abs().max()
    assert diff <= 0.02 * expected.abs().max() and diff < 0.1 * effect
    assert json.loads((folder / "qlora_lite.json").read_text())["bits"] == 16


def test_adapter_on_a_different_base_is_refused(tiny_model_factory, tmp_path):
    llama, qwen = tiny_model_factory("llama"), tiny_model_factory("qwen2")
    folder = make_adapter(llama, tmp_path / "a", bits=16)
    with pytest.raises(AdapterError, match="model type llama .adapter. vs qwen2"):
        load_adapter(load_base_model(qwen, bits=16), folder)
    with pytest.raises(AdapterError, match="model type"):
        merge_adapter(qwen, folder, tmp_path / "m", progress=False)
    assert not (tmp_path / "m").exists()
    other = tmp_path / "b"
    shutil.copytree(folder, other)
    record = json.loads((other / "qlora_lite.json").read_text())
    (other / "qlora_lite.json").write_text(json.dumps({**record, "vocab_size": 32000}))
    with pytest.raises(AdapterError, match="vocab size 32000 .adapter. vs 320 .base."):
        load_adapter(load_base_model(llama, bits=16), other)


def test_peft_adapter_through_the_commands(from_peft, tmp_path):
    """generate, eval, train --adapter and merge all accept the adapter PEFT wrote."""
    from click.testing import CliRunner

    from qlora_lite.cli import main

    base, folder, _ = from_peft
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Add {i} and 2.", "output": str(i + 2)}) + "\n"
                            for i in range(4)))
    runs = {
        "generate": ["generate", "--model", str(base), "--adapter", str(folder), "--prompt", "hello",
                     "--max-new-tokens", "4"],
        "eval": ["eval", "--model", str(base), "--adapter", str(folder), "--data", str(data), "--json",
                 "--no-exact-match"],
        "train": ["train", "--model", str(base), "--adapter", str(folder), "--data", str(data), "--output",
                  str(tmp_path / "run"), "--max-steps", "1", "--max-seq-len", "200", "--optimizer", "adamw"],
        "merge": ["merge", "--model", str(base), "--adapter", str(folder), "--output", str(tmp_path / "m"),
                  "--quiet"],
    }
    outputs = {}
    for name, args in runs.items():
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, f"{name}: {result.output}\n{result.exception!r}"
        outputs[name] = result.output
    assert json.loads(outputs["eval"].strip().splitlines()[-1])["eval_loss"] > 0
    assert (tmp_path / "m" / "config.json").exists()
