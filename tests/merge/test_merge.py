"""Streaming merge: the merged folder loads in transformers and behaves like base+adapter."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tiny_models import logits, make_adapter, probe

from qlora_lite.cli import main
from qlora_lite.errors import MergeError, MergeVerificationError
from qlora_lite.merge import plan as plan_module
from qlora_lite.merge.write import merge_adapter
from qlora_lite.model.bnb import dequantize_weight, quantize_linear
from qlora_lite.model.build import build_model
from qlora_lite.model.lora import lora_layers, merge_weight


@pytest.fixture(scope="module")
def sharded(tiny_model_factory):
    return tiny_model_factory("llama", shards=3)


@pytest.fixture(scope="module")
def adapter4(sharded, tmp_path_factory):
    return make_adapter(sharded, tmp_path_factory.mktemp("adapter4"))


@pytest.fixture(scope="module")
def merged_fp32(sharded, adapter4, tmp_path_factory):
    """Both policies merged in fp32, so weight differences are not hidden by bf16 rounding."""
    root = tmp_path_factory.mktemp("merged")
    return {policy: merge_adapter(sharded, adapter4, root / policy, merge_base=policy, dtype="fp32",
                                  max_shard_size="40KB", progress=False)
            for policy in ("dequantized", "original")}


def test_merged_folder_loads_and_matches_trained_model(sharded, adapter4, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report = merge_adapter(sharded, adapter4, tmp_path / "out", max_shard_size="60KB", progress=False)
    out = tmp_path / "out"
    assert report.output_dir == out and report.shards >= 3
    assert report.max_abs_logit_diff <= report.tolerance
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == report.shards
    assert (out / "generation_config.json").exists()
    assert not list(tmp_path.glob(".out*")), "temporary folder left behind"
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert "<|assistant|>" in tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                            add_generation_prompt=True)
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.bfloat16
    trained = build_model(str(sharded), bits=4, adapter=str(adapter4), trainable=False, compute_dtype="bf16")
    base = build_model(str(sharded), bits=4, trainable=False)
    ids = probe()
    expected, got, base_logits = logits(trained, ids), logits(merged, ids), logits(base, ids)
    diff = (got - expected).abs().max().item()
    assert diff < 0.03 * expected.abs().max().item()
    assert diff < 0.2 * (expected - base_logits).abs().max().item(), "the adapter's effect must be in the merge"


def test_dequantized_merge_is_bit_exact_merge_of_training_weights(sharded, adapter4, merged_fp32):
    """Each merged weight == merge_weight(dequant(quant(W)), A, B, scale), exactly, in fp32."""
    from safetensors.torch import load_file

    from qlora_lite.model.adapter import read_adapter

    _, modules, _ = read_adapter(adapter4)
    trained = build_model(str(sharded), bits=4, adapter=str(adapter4), trainable=False, compute_dtype="bf16")
    layers = lora_layers(trained)
    merged = {}
    for f in merged_fp32["dequantized"].output_dir.glob("*.safetensors"):
        merged.update(load_file(f))
    assert len(layers) == len(modules) == 14
    for name, layer in layers.items():
        expected = merge_weight(dequantize_weight(layer.base_layer), layer.lora_A.weight, layer.lora_B.weight,
                                layer.scaling)
        assert torch.equal(merged[f"{name}.weight"], expected), name


def test_merge_record_is_typed_like_the_adapter_record(adapter4, merged_fp32):
    record = json.loads((merged_fp32["dequantized"].output_dir / "qlora_lite_merge.json").read_text())
    trained = json.loads((Path(adapter4) / "qlora_lite.json").read_text())
    assert record["quantization"] == {k: trained[k] for k in ("bits", "quant_type", "double_quant", "compute_dtype")}
    assert record["quantization"]["bits"] == 4 and record["quantization"]["double_quant"] is True
    original = json.loads((merged_fp32["original"].output_dir / "qlora_lite_merge.json").read_text())
    assert original["quantization"] == {"bits": 16, "compute_dtype": None}


def test_original_differs_exactly_by_quantization_error(sharded, merged_fp32):
    from safetensors.torch import load_file

    def load(folder):
        tensors = {}
        for f in folder.glob("*.safetensors"):
            tensors.update(load_file(f))
        return tensors

    original, dequantized = load(merged_fp32["original"].output_dir), load(merged_fp32["dequantized"].output_dir)
    base = load(sharded)
    record = json.loads((merged_fp32["dequantized"].output_dir / "qlora_lite_merge.json").read_text())
    trained_dtype = getattr(torch, record["quantization"]["compute_dtype"])  # what training dequantized to
    checked = 0
    for key, w in base.items():
        if not re.search(r"(proj)\.weight$", key):
            assert torch.equal(original[key], w.float()), key  # embeddings and norms untouched
            continue
        quant_error = w.float() - dequantize_weight(quantize_linear(w, None, bits=4, compute_dtype=trained_dtype))
        assert quant_error.abs().max() > 0
        torch.testing.assert_close(original[key] - dequantized[key], quant_error, atol=2e-6, rtol=0)
        checked += 1
    assert checked == 14
    assert merged_fp32["original"].max_abs_logit_diff <= merged_fp32["original"].tolerance


@pytest.mark.parametrize("arch,bits", [("gpt2", 4), ("qwen2", 8)])
def test_merge_other_layouts_verifies(tiny_model_factory, tmp_path, arch, bits):
    """GPT-2's transposed Conv1D and 8-bit bases merge into models matching base+adapter."""
    from transformers import AutoModelForCausalLM

    base = tiny_model_factory(arch)
    adapter = make_adapter(base, tmp_path / "adapter", bits=bits, rslora=True)
    report = merge_adapter(base, adapter, tmp_path / "out", progress=False)
    assert report.max_abs_logit_diff <= report.tolerance
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    trained = build_model(str(base), bits=bits, adapter=str(adapter), trainable=False)
    ids = probe()
    expected = logits(trained, ids)
    assert (logits(merged, ids) - expected).abs().max() < 0.03 * expected.abs().max()


def test_cli_merge_reports_deviation(sharded, adapter4, tmp_path):
    result = CliRunner().invoke(main, ["merge", "--model", str(sharded), "--adapter", str(adapter4), "--output",
                                       str(tmp_path / "m"), "--dtype", "fp16", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "largest |logit difference|" in result.output
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "float16"


def test_cli_merge_fails_loudly_on_divergence(sharded, adapter4, tmp_path, monkeypatch):
    real = plan_module.merged_tensor

    def corrupt(plan, key, tensor):
        merged = real(plan, key, tensor)
        return merged * 3 if key.endswith("layers.1.mlp.down_proj.weight") else merged

    monkeypatch.setattr(plan_module, "merged_tensor", corrupt)
    out = tmp_path / "m"
    result = CliRunner().invoke(main, ["merge", "--model", str(sharded), "--adapter", str(adapter4),
                                       "--output", str(out), "--quiet"])
    assert result.exit_code == 1
    message = " ".join(result.output.split())
    assert "FAILED" in message and "tensor model.layers.1.mlp.down_proj.weight" in message
    assert re.search(r"differs from W \+ scale \* B @ A .* by [0-9.e+-]+ at index \[\d+, \d+\], [0-9.e+]+ times the "
                     "bound", message)
    assert "report it with this message" in message and "--no-verify" in message  # the next step
    assert not out.exists()
    assert (tmp_path / "m.failed" / "MERGE_FAILED.txt").exists()


def test_merge_refuses_base_folder_and_existing_output(sharded, adapter4, tmp_path):
    with pytest.raises(MergeError, match="inside it"):
        merge_adapter(sharded, adapter4, sharded / "merged", progress=False)
    with pytest.raises(MergeError, match="inside it"):
        merge_adapter(sharded, adapter4, sharded, progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(MergeError, match="--overwrite"):
        merge_adapter(sharded, adapter4, tmp_path / "busy", progress=False)
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    report = merge_adapter(sharded, adapter4, tmp_path / "busy", overwrite=True, verify=False, progress=False)
    assert report.max_abs_logit_diff is None and report.shards == 1
    assert not (tmp_path / "busy" / "keep.txt").exists() and (tmp_path / "busy" / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]
    assert MergeVerificationError.__mro__[1] is MergeError


def test_merge_overwrite_never_replaces_a_folder_holding_the_adapter_or_a_run(sharded, adapter4, tmp_path):
    """merge --overwrite --output RUN with --adapter RUN/checkpoint-N replaced the whole training run."""
    import shutil

    from qlora_lite.checkpoint.run_folder import mark_run

    run = tmp_path / "run"
    shutil.copytree(adapter4, run / "checkpoint-4")
    for output in (run, tmp_path):
        with pytest.raises(MergeError, match="contains the adapter folder"):
            merge_adapter(sharded, run / "checkpoint-4", output, overwrite=True, verify=False, progress=False)
    mark_run(run)
    with pytest.raises(MergeError, match="is a training run folder"):
        merge_adapter(sharded, adapter4, run, overwrite=True, verify=False, progress=False)
    assert sorted(p.name for p in (run / "checkpoint-4").iterdir()) == sorted(p.name for p in adapter4.iterdir())


# A base big enough for memory to tell: ~220 MB bf16 in 4+ shards, written without building a model.
_BIG = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
            num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False)

_CHILD = textwrap.dedent("""
    import json, re, sys
    def hwm():
        return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
    import torch
    from qlora_lite.merge.plan import plan_merge
    from qlora_lite.merge.write import merge_adapter
    from qlora_lite.model.bnb import quantize_linear
    # Fixed costs, the same for any model size: imports (bitsandbytes alone is ~90 MB), the first
    # 4-bit quantization's lazy initialisation, the planning step.
    quantize_linear(torch.ones(64, 64), None, bits=4)
    plan_merge(sys.argv[1], sys.argv[2])
    before = hwm()
    merge_adapter(sys.argv[1], sys.argv[2], sys.argv[3], verify=False, progress=False, max_shard_size="2GB")
    print(json.dumps({"before": before, "after": hwm()}))
""")


def _write_big_base(folder, shard_bytes):
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**_BIG)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    folder.mkdir()
    config.save_pretrained(folder)
    shards, size = [{}], 0
    for i, (name, p) in enumerate(skeleton.named_parameters()):
        if shards[-1] and size + p.numel() * 2 > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = torch.full(p.shape, 0.01 * (i % 7 + 1), dtype=torch.bfloat16)
        size += p.numel() * 2
    weight_map = {}
    for i, shard in enumerate(shards):
        file_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file_name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return max((folder / f).stat().st_size for f in set(weight_map.values())), len(shards)


def _write_big_adapter(folder):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(_BIG["num_hidden_layers"]):
        for proj, out in (("q_proj", 1024), ("v_proj", 256)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(8, 1024, generator=g).to(torch.bfloat16)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out, 8, generator=g).to(torch.bfloat16) * 0.01
    folder.mkdir()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                                                            "target_modules": ["q_proj", "v_proj"]}))
    (folder / "qlora_lite.json").write_text(json.dumps({"bits": 4, "quant_type": "nf4", "double_quant": True,
                                                        "model_type": "llama", "vocab_size": 32000}))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from /proc (Linux)")
def test_merge_peak_memory_stays_near_one_shard(tmp_path):
    """Peak RSS growth of a 4-bit-policy merge of a multi-shard base: well under 1.5 shards.

    Measured in a child process (VmHWM, the resident high-water mark) after its fixed costs (imports,
    bitsandbytes' lazy init, planning: about 190 MB above a bare `import torch, transformers`), so
    only the streaming part counts; the output is one 2 GB shard on purpose, so a
    merge that buffered its output shard would hold the whole model and fail.
    """
    shard_bytes, n_shards = _write_big_base(tmp_path / "base", 70_000_000)
    _write_big_adapter(tmp_path / "adapter")
    assert n_shards >= 4
    result = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "base"), str(tmp_path / "adapter"),
                             str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rss = json.loads(result.stdout.strip().splitlines()[-1])
    growth = rss["after"] - rss["before"]
    print(f"merge peak RSS growth {growth / 1e6:.0f} MB; largest shard {shard_bytes / 1e6:.0f} MB, "
          f"{n_shards} shards, total {sum(f.stat().st_size for f in (tmp_path / 'base').glob('*.safetensors')) / 1e6:.0f} MB")
    assert growth < 1.5 * shard_bytes + 32e6
    assert (tmp_path / "out" / "model.safetensors").stat().st_size > 200e6


def test_base_without_chat_template_gets_the_one_training_used(tiny_llama, tmp_path):
    """Training renders chats with data.DEFAULT_CHAT_TEMPLATE when the tokenizer has none: so do the exports."""
    import shutil

    import gguf
    from transformers import AutoTokenizer

    from qlora_lite.data.tokenize import DEFAULT_CHAT_TEMPLATE
    from qlora_lite.gguf.writer import export_gguf

    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    (base / "chat_template.jinja").unlink()
    assert AutoTokenizer.from_pretrained(base).chat_template is None
    adapter = make_adapter(base, tmp_path / "adapter")
    report = merge_adapter(base, adapter, tmp_path / "merged", verify=False, progress=False)
    assert any("chat template" in note for note in report.notes)
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").chat_template == DEFAULT_CHAT_TEMPLATE
    path = export_gguf(base, tmp_path / "m.gguf", adapter_dir=adapter, modelfile=True, progress=False)
    field = gguf.GGUFReader(path).fields["tokenizer.chat_template"]
    assert bytes(field.parts[field.data[0]]).decode() == DEFAULT_CHAT_TEMPLATE
    assert "TEMPLATE" in (tmp_path / "Modelfile").read_text()


def test_safetensors_stream_round_trip(tmp_path):
    """Our no-mmap reader/writer agree with the safetensors library, for every dtype and odd shapes."""
    from safetensors.torch import load_file, save_file

    from qlora_lite.storage.safetensors_io import iter_tensors, plan_shards, read_headers, write_sharded

    g = torch.Generator().manual_seed(0)
    tensors = {"a.bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16), "b.scalar": torch.tensor(2.5),
               "c.bool": torch.rand(7, generator=g) > 0.5, "d.i64": torch.arange(-3, 4),
               "e.f16": torch.randn(2, 1, 3, generator=g).half(), "f.empty": torch.zeros(0, 4), "g.u8": torch.arange(9, dtype=torch.uint8)}
    save_file(tensors, str(tmp_path / "in.safetensors"))
    entries = read_headers([tmp_path / "in.safetensors"])
    assert sorted(e.name for e in entries) == sorted(tensors)
    for entry, tensor in iter_tensors(entries):
        assert torch.equal(tensor, tensors[entry.name]) and tensor.dtype == tensors[entry.name].dtype
    (tmp_path / "out").mkdir()
    shards = plan_shards([(e.name, e.dtype, e.shape) for e in entries], max_bytes=40)
    names = write_sharded(tmp_path / "out", shards, ((e.name, t) for e, t in iter_tensors(entries)))
    assert len(names) == len(shards) > 1
    written = {}
    for name in names:
        written.update(load_file(str(tmp_path / "out" / name)))
    assert written.keys() == tensors.keys() and all(torch.equal(written[k], v) for k, v in tensors.items())
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)


@pytest.mark.parametrize("arch,shards,dtype", [("llama", 3, torch.bfloat16), ("gpt2", 1, torch.float32)])
def test_streamed_model_gives_from_pretrained_logits_exactly(tiny_model_factory, arch, shards, dtype):
    """verify_merge runs the merged side block by block; its logits must be from_pretrained's, bit for bit."""
    from transformers import AutoModelForCausalLM

    from qlora_lite.merge.stream_forward import streamed_logits, streamed_model
    from qlora_lite.model.loading import decoder_blocks

    folder = tiny_model_factory(arch, shards=shards)
    ids = probe()
    expected = logits(AutoModelForCausalLM.from_pretrained(folder, dtype=dtype), ids)
    with streamed_model(folder, dtype) as model:
        _, blocks = decoder_blocks(model)
        assert len(blocks) == 2 and all(p.is_meta for p in blocks.parameters()), "blocks load only while they run"
        got = logits(model, ids)
        assert all(p.is_meta for p in blocks.parameters()), "a block's weights stayed in memory after it ran"
        assert torch.equal(got, expected)
        assert torch.equal(logits(model, ids), expected)  # a second pass reloads the blocks
    # The merge check's form: llama's untied embedding and head are read only before/after the blocks.
    assert torch.equal(streamed_logits(folder, dtype, ids), expected)


def test_streamed_model_names_missing_block_weights(tiny_llama, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from qlora_lite.errors import ModelLoadError
    from qlora_lite.merge.stream_forward import streamed_model

    folder = tmp_path / "broken"
    shutil.copytree(tiny_llama, folder)
    (file,) = folder.glob("*.safetensors")
    state = load_file(file)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, file, metadata={"format": "pt"})
    with streamed_model(folder, torch.bfloat16) as model, pytest.raises(ModelLoadError, match="up_proj"):
        logits(model, probe())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_streamed_reference_is_the_trained_model_bit_for_bit(tiny_model_factory, tmp_path, arch):
    """The merge check's reference side (base streamed block by block, weights through the training
    quantization, adapter wrapped unmerged) computes exactly what the 4-bit training model computes."""
    import functools

    from qlora_lite.merge.plan import plan_merge
    from qlora_lite.merge.stream_forward import streamed_logits, streamed_model
    from qlora_lite.merge.verify import as_trained

    base = tiny_model_factory(arch, shards=2)
    adapter = make_adapter(base, tmp_path / "adapter")
    plan = plan_merge(base, adapter)
    ids = probe()
    expected = logits(build_model(str(base), bits=4, adapter=str(adapter), trainable=False, compute_dtype="bf16"), ids)
    with streamed_model(base, plan.quant["compute_dtype"], adapter_dir=adapter,
                        transform=functools.partial(as_trained, plan)) as reference:
        assert torch.equal(logits(reference, ids), expected)
        assert torch.equal(logits(reference, ids), expected), "the adapter must survive a block being dropped"
    assert torch.equal(streamed_logits(base, plan.quant["compute_dtype"], ids, adapter_dir=adapter,
                                       transform=functools.partial(as_trained, plan)), expected)


@pytest.mark.parametrize("stored, compute, rounded", [
    (torch.bfloat16, torch.float32, False),  # an AVX2 CPU trained a bf16 checkpoint in fp32: exact, no copy
    (torch.float16, torch.float32, False),
    (torch.bfloat16, torch.bfloat16, False),
    (torch.float32, torch.bfloat16, True),  # training saw these values rounded to bf16: so does the merge
    (torch.float16, torch.bfloat16, True),
])
def test_merge_base_rounds_unquantized_tensors_only_where_training_lost_bits(stored, compute, rounded):
    from types import SimpleNamespace

    plan = SimpleNamespace(quantized=set(), conv1d=set(), quant={"bits": 4, "compute_dtype": compute})
    tensor = (torch.randn(64, 32) * 3).to(stored)
    base = plan_module.merge_base_weight(plan, "model.embed_tokens.weight", tensor)
    if rounded:
        assert base.dtype == compute and torch.equal(base, tensor.to(compute))
    else:
        assert base is tensor  # as stored: no copy of the largest tensors in a wider dtype
