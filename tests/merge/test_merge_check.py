"""The merge check decides on exact values: correct merges pass, wrong ones fail naming the tensor."""

import json

import pytest
import torch
from click.testing import CliRunner
from tiny_models import make_adapter, probe, tiny_config

from qlora_lite.cli import main
from qlora_lite.errors import MergeVerificationError
from qlora_lite.merge import plan as plan_module
from qlora_lite.merge import verify as verify_module
from qlora_lite.merge import write as export
from qlora_lite.merge.verify import PROBE_TOLERANCE
from qlora_lite.merge.write import merge_adapter
from qlora_lite.model.build import build_model
from qlora_lite.storage.safetensors_io import read_headers


def _sensitive_base(folder, tokenizer_dir):
    """A tiny llama whose sharp attention (q and k scaled up) amplifies small weight changes, as some
    small pretrained models do: rounding its weights to bf16 moves its logits by several percent."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = tiny_config("llama", len(tokenizer))
    config.num_hidden_layers, config.num_key_value_heads = 4, 4  # q and k of equal shape, for the swap test
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.mul_(20 if ("q_proj" in name or "k_proj" in name) else 3)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sensitive(tmp_path_factory, tokenizer_dir):
    base = _sensitive_base(tmp_path_factory.mktemp("sensitive"), tokenizer_dir)
    return base, make_adapter(base, tmp_path_factory.mktemp("sensitive-adapter"), scale=0.2)


def test_correct_merge_of_a_rounding_sensitive_model_passes(sensitive, tmp_path):
    """The old check compared two bf16 forwards and refused this correct merge."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    base, adapter = sensitive
    report = merge_adapter(base, adapter, tmp_path / "out", progress=False)
    with safe_open(base / "model.safetensors", "pt") as f:
        assert report.tensors_checked == len(list(f.keys())) and report.worst_ratio <= 1.0
    assert report.max_abs_logit_diff <= report.tolerance
    # The premise: in bf16 the merged model and base+adapter differ by far more than a 6% bound.
    trained = build_model(str(base), bits=4, adapter=str(adapter), trainable=False, compute_dtype="bf16")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    ids = probe()
    with torch.no_grad():
        expected = trained(input_ids=ids).logits.float()
        got = merged(input_ids=ids).logits.float()
    assert (got - expected).abs().max() > 0.06 * expected.abs().max()


def _patch_merged(monkeypatch, key_suffix, change):
    real = plan_module.merged_tensor

    def patched(plan, key, tensor):
        merged = real(plan, key, tensor)
        return change(plan, merged) if key.endswith(key_suffix) else merged

    monkeypatch.setattr(plan_module, "merged_tensor", patched)


def test_a_weight_off_by_just_over_the_rounding_bound_fails_naming_it(sensitive, tmp_path, monkeypatch):
    base, adapter = sensitive

    def nudge(plan, merged):
        merged = merged.clone()
        x = merged[3, 5].to(torch.bfloat16)
        up = torch.nextafter(x, torch.tensor(float("inf"), dtype=torch.bfloat16))
        merged[3, 5] = merged[3, 5] + 1.5 * (up.float() - x.float())  # lands a whole bf16 step off
        return merged

    _patch_merged(monkeypatch, "layers.2.self_attn.v_proj.weight", nudge)
    with pytest.raises(MergeVerificationError) as error:
        merge_adapter(base, adapter, tmp_path / "out", progress=False)
    message = str(error.value)
    assert "tensor model.layers.2.self_attn.v_proj.weight in model.safetensors" in message
    assert "at index [3, 5]" in message and "times the bound" in message
    assert not (tmp_path / "out").exists() and (tmp_path / "out.failed" / "MERGE_FAILED.txt").exists()


def test_swapped_q_and_k_fail_naming_the_tensor(sensitive, tmp_path, monkeypatch):
    """Equal shapes, plausible values: only the comparison with the base's own tensor tells."""
    from safetensors.torch import load_file

    base, adapter = sensitive
    (shard,) = base.glob("*.safetensors")
    k_key = "model.layers.0.self_attn.k_proj.weight"
    k_base = load_file(shard)[k_key]
    real = plan_module.merged_tensor
    _patch_merged(monkeypatch, "layers.0.self_attn.q_proj.weight", lambda plan, _: real(plan, k_key, k_base))
    with pytest.raises(MergeVerificationError, match=r"tensor model\.layers\.0\.self_attn\.q_proj\.weight"):
        merge_adapter(base, adapter, tmp_path / "out", progress=False)


def test_a_tensor_without_adapter_must_be_the_bases_bit_for_bit(sensitive, tmp_path, monkeypatch):
    base, adapter = sensitive

    def one_step(plan, merged):
        merged = merged.clone()
        merged[0] = torch.nextafter(merged[0].bfloat16(), torch.tensor(float("inf"), dtype=torch.bfloat16))
        return merged

    _patch_merged(monkeypatch, "layers.1.input_layernorm.weight", one_step)
    with pytest.raises(MergeVerificationError, match=r"input_layernorm\.weight .*bit for bit"):
        merge_adapter(base, adapter, tmp_path / "out", progress=False)


@pytest.fixture
def wrong_rope_theta(monkeypatch):
    """Every tensor right, config.json wrong (rope_theta 3): the merged folder runs as another model."""
    real = export._copy_metadata

    def wrong_config(plan, tmp, dtype):
        real(plan, tmp, dtype)
        config = json.loads((tmp / "config.json").read_text())
        config["rope_parameters"] = {**(config.get("rope_parameters") or {}), "rope_theta": 3.0,
                                     "rope_type": "default"}
        config["rope_theta"] = 3.0
        (tmp / "config.json").write_text(json.dumps(config))

    monkeypatch.setattr(export, "_copy_metadata", wrong_config)


def test_a_config_that_differs_from_the_bases_fails_naming_the_key(tiny_llama, tmp_path, wrong_rope_theta):
    adapter = make_adapter(tiny_llama, tmp_path / "adapter")
    with pytest.raises(MergeVerificationError, match=r"every tensor matches, but the merged config\.json differs "
                                                     r"from .*config\.json in rope_parameters, rope_theta"):
        merge_adapter(tiny_llama, adapter, tmp_path / "out", progress=False)


def test_the_probe_sees_a_folder_that_runs_as_another_model(tiny_llama, tmp_path, wrong_rope_theta, monkeypatch):
    """What the config comparison might miss, the probe forward in the base's definition still catches."""
    monkeypatch.setattr(verify_module, "config_changes", lambda base, merged: [])
    adapter = make_adapter(tiny_llama, tmp_path / "adapter")
    with pytest.raises(MergeVerificationError, match=r"probe logits deviate from the base model"):
        merge_adapter(tiny_llama, adapter, tmp_path / "out", progress=False)


def test_merge_help_describes_the_exact_check():
    result = CliRunner().invoke(main, ["merge", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split()).replace("- ", "-")  # click wraps after hyphens
    assert "computed anew from the base" in text and "bit-identical" in text and "read the files back" in text
    assert f"{PROBE_TOLERANCE:g} times" in text
    assert "3%" not in text


def test_bytes_changed_on_disk_after_the_check_fail_naming_the_tensor(sensitive, tmp_path, monkeypatch):
    """Step 1 checks each tensor as it is written; what then lands on disk must be those bytes."""
    base, adapter = sensitive
    real = export.write_sharded

    def write_then_flip(folder, shards, tensors, on_shard=None):
        names = real(folder, shards, tensors, on_shard)
        entry = next(e for e in read_headers([folder / names[0]]) if e.name.endswith("layers.1.mlp.up_proj.weight"))
        with open(entry.file, "r+b") as f:
            f.seek(entry.offset + entry.nbytes // 2)
            byte = f.read(1)
            f.seek(entry.offset + entry.nbytes // 2)
            f.write(bytes([byte[0] ^ 0x01]))
        return names

    monkeypatch.setattr(export, "write_sharded", write_then_flip)
    with pytest.raises(MergeVerificationError, match=r"tensor model\.layers\.1\.mlp\.up_proj\.weight in "
                                                     r"model\.safetensors reads back with other bytes"):
        merge_adapter(base, adapter, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_half_ulp_from_the_exponent_bits_is_half_the_gap_to_the_next_value(dtype):
    from qlora_lite.merge.verify import half_ulp_of

    g = torch.Generator().manual_seed(0)
    values = torch.cat([torch.randn(4000, generator=g) * 10.0 ** torch.randint(-6, 4, (4000,), generator=g),
                        torch.tensor([0.0, -0.0, 1.0, -2.0, 0.5, 60000.0])]).to(dtype)
    gap = (torch.nextafter(values.abs(), torch.tensor(float("inf"), dtype=dtype)) - values.abs()).float()
    normal = torch.finfo(torch.float32).smallest_normal
    # exact where that half gap is an fp32 normal, never tighter where it is not
    assert torch.equal(half_ulp_of(values)[gap / 2 >= normal], (gap / 2)[gap / 2 >= normal])
    assert (half_ulp_of(values) >= gap / 2).all()
