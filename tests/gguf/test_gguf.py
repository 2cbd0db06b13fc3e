"""GGUF export: files transformers reads back with the merged model's logits, and llama.cpp metadata."""

import json

import pytest
import torch
from click.testing import CliRunner
from tiny_models import GGUF_ARCHS, logits, probe

from qlora_lite.cli import main
from qlora_lite.errors import GGUFExportError
from qlora_lite.gguf.architectures import permute_qk
from qlora_lite.gguf.writer import export_gguf

# Largest |logit difference| relative to the largest logit, per GGUF type, against the fp32 merge.
TOLERANCE = {"f16": 2e-3, "bf16": 2e-2, "q8_0": 4e-2}


def load_gguf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)


@pytest.mark.parametrize("arch", GGUF_ARCHS)
@pytest.mark.parametrize("out_type", ["f16", "bf16", "q8_0"])
def test_gguf_reads_back_with_merged_logits(merged, reference_logits, tmp_path, arch, out_type):
    """Written with --adapter (streamed merge) and read back by transformers' GGUF loader."""
    base, adapter, _ = merged(arch)
    path = export_gguf(base, tmp_path / "model.gguf", adapter_dir=adapter, out_type=out_type, progress=False)
    expected, base_logits = reference_logits(arch)
    diff = (logits(load_gguf(path), probe()) - expected).abs().max().item()
    assert diff <= TOLERANCE[out_type] * expected.abs().max().item(), diff
    assert diff < 0.2 * (expected - base_logits).abs().max().item(), "the adapter must be in the GGUF file"


def test_gguf_from_merged_folder_equals_direct_export(merged, tmp_path):
    _, _, merged_dir = merged("llama")
    path = export_gguf(merged_dir, tmp_path / "m.gguf", out_type="f16", progress=False)
    direct = export_gguf(*merged("llama")[:1], tmp_path / "d.gguf", adapter_dir=merged("llama")[1], out_type="f16",
                         progress=False)
    ids = probe()
    torch.testing.assert_close(logits(load_gguf(path), ids), logits(load_gguf(direct), ids), atol=1e-5, rtol=0)


def test_gguf_tokenizer_metadata(merged, tmp_path):
    import gguf
    from transformers import AutoTokenizer

    _, _, merged_dir = merged("llama")
    path = export_gguf(merged_dir, tmp_path / "m.gguf", progress=False)
    reader = gguf.GGUFReader(path)

    def field(name):
        f = reader.fields[name]
        values = [f.parts[i] for i in f.data]
        if f.types[-1] == gguf.GGUFValueType.STRING:
            values = [bytes(v).decode() for v in values]
        else:
            values = [v.tolist()[0] for v in values]
        return values if f.types[0] == gguf.GGUFValueType.ARRAY else values[0]

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    spec = json.loads((merged_dir / "tokenizer.json").read_text())
    assert field("general.architecture") == "llama"
    assert field("tokenizer.ggml.model") == "gpt2"
    assert field("tokenizer.ggml.pre") == "gpt-2"
    assert field("tokenizer.ggml.tokens") == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    assert field("tokenizer.ggml.merges") == merges and merges
    types = field("tokenizer.ggml.token_type")
    assert types[tokenizer.eos_token_id] == gguf.TokenType.CONTROL and types[100] == gguf.TokenType.NORMAL
    assert field("tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id == 2
    assert field("tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id == 1
    assert field("tokenizer.chat_template") == tokenizer.chat_template
    assert field("llama.attention.head_count_kv") == 2
    assert field("llama.rope.dimension_count") == 16


def test_llama_qk_permutation_inverts_transformers_reader():
    """Our permutation is exactly undone by the reverse permutation transformers applies on reading."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    weight = torch.randn(4 * 2 * 8, 32)
    processor = LlamaTensorProcessor(config={"num_attention_heads": 8, "num_key_value_heads": 4})
    for name, n_head_kv in (("blk.0.attn_q.weight", 8), ("blk.0.attn_k.weight", 4)):
        rows = weight[: n_head_kv * 8] if n_head_kv == 4 else weight
        permuted = permute_qk(rows, 8, n_head_kv).numpy()
        assert not (permuted == rows.numpy()).all()
        restored = processor.process(permuted, name).weights
        assert (restored == rows.numpy()).all()


def test_unsupported_architecture_is_a_clear_error(tiny_model_factory, tmp_path):
    with pytest.raises(GGUFExportError, match="supported: gemma2, gemma3, gemma3_text, llama, mistral, phi3, qwen2, qwen3"):
        export_gguf(tiny_model_factory("gpt2"), tmp_path / "x.gguf", progress=False)
    result = CliRunner().invoke(main, ["export-gguf", "--model", str(tiny_model_factory("gemma")), "--output",
                                       str(tmp_path / "y.gguf"), "--quiet"])
    assert result.exit_code == 1 and "'gemma' cannot be exported" in result.output
    assert not list(tmp_path.iterdir())


def test_cli_export_gguf_with_adapter(merged, tmp_path):
    base, adapter, _ = merged("mistral")
    result = CliRunner().invoke(main, ["export-gguf", "--model", str(base), "--adapter", str(adapter), "--output",
                                       str(tmp_path / "out" / "m.gguf"), "--type", "bf16", "--modelfile", "--quiet"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "m.gguf").stat().st_size > 0 and (tmp_path / "out" / "Modelfile").exists()
    assert "verified: 21 tensors" in result.output and "tokenizer 320 tokens" in result.output


def test_sentencepiece_style_tokenizer_metadata(tmp_path):
    """A Llama-2-style tokenizer (BPE with byte fallback, Metaspace) is written as tokenizer model "llama"."""
    import gguf
    from tiny_models import CORPUS
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    from qlora_lite.gguf.vocab import add_tokenizer

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials))
    tok.save(str(tmp_path / "tokenizer.json"))
    writer = gguf.GGUFWriter(tmp_path / "t.gguf", "llama")
    add_tokenizer(writer, tmp_path, 400)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    reader = gguf.GGUFReader(tmp_path / "t.gguf")
    model = reader.fields["tokenizer.ggml.model"]
    assert bytes(model.parts[model.data[0]]).decode() == "llama"
    types = reader.fields["tokenizer.ggml.token_type"]
    type_of = [int(types.parts[i][0]) for i in types.data]
    assert type_of[3 + 0x41] == gguf.TokenType.BYTE and type_of[1] == gguf.TokenType.CONTROL
    assert type_of[0] == gguf.TokenType.UNKNOWN
    assert "tokenizer.ggml.scores" in reader.fields


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tokenizer_reads_back_from_gguf(merged, tmp_path, arch):
    """transformers rebuilds the tokenizer from the GGUF metadata alone: same ids, specials, template.

    (For qwen2 transformers' converter always applies Qwen2's own pre-tokenizer regex, whatever
    tokenizer.ggml.pre says, so our GPT-2-style test tokenizer splits differently there: ids are
    compared for llama only.)
    """
    from transformers import AutoTokenizer

    _, _, merged_dir = merged(arch)
    path = export_gguf(merged_dir, tmp_path / "t.gguf", out_type="q8_0", progress=False)
    original = AutoTokenizer.from_pretrained(merged_dir)
    restored = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = "The quick brown fox jumps over 12 lazy dogs.</s> hello"
    if arch == "llama":
        assert restored(text).input_ids == original(text).input_ids
    assert restored.convert_ids_to_tokens(list(range(len(original)))) == original.convert_ids_to_tokens(
        list(range(len(original))))
    assert (restored.bos_token, restored.eos_token) == ("<s>", "</s>")
    assert restored.chat_template == original.chat_template


def test_llama3_rope_scaling_written_as_rope_freqs(tokenizer_dir, tmp_path):
    """Llama 3.1-style rope scaling: llama.cpp's frequency divisors reproduce transformers' inv_freq."""
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, vocab_size=320,
                                  max_position_embeddings=131072, rope_scaling=rope, rope_theta=500000.0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp_path)
    path = export_gguf(tmp_path, tmp_path / "l3.gguf", progress=False)
    factors = {t.name: torch.from_numpy(t.data.copy()) for t in gguf.GGUFReader(path).tensors}["rope_freqs.weight"]
    unscaled = 1.0 / (500000.0 ** (torch.arange(0, 32, 2, dtype=torch.float32) / 32))
    assert factors.min() == 1.0 and factors.max() == 8.0
    torch.testing.assert_close(unscaled / factors, model.model.rotary_emb.inv_freq.float(), rtol=1e-6, atol=0)


def test_byte_level_pre_tokenizer_names():
    """llama.cpp picks its pre-tokenizer by name: Llama 3 and Qwen2 regexes are recognised."""
    from qlora_lite.gguf.vocab import _pre_tokenizer_name

    tail = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    head = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"

    def spec(pattern):
        return {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}}

    assert _pre_tokenizer_name(spec(head + r"\p{N}{1,3}" + tail)) == "llama-bpe"
    assert _pre_tokenizer_name(spec(head + r"\p{N}" + tail)) == "qwen2"
    assert _pre_tokenizer_name({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"
    assert _pre_tokenizer_name(spec(r"\w+")) == "default"


def _corrupt(path, how):
    """Damage a written GGUF file the way a failing disk or a writer bug would."""
    import gguf

    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    data = bytearray(path.read_bytes())
    if how == "flip":  # one byte in the middle of a weight matrix
        t = tensors["blk.1.ffn_down.weight"]
        data[t.data_offset + t.n_bytes // 2] ^= 0x40
    elif how == "swap":  # a tensor's bytes written into another tensor's slot (same size)
        src, dst = tensors["blk.0.attn_q.weight"], tensors["blk.0.attn_output.weight"]
        data[dst.data_offset:dst.data_offset + dst.n_bytes] = data[src.data_offset:src.data_offset + src.n_bytes]
    elif how == "truncate":
        del data[len(data) // 2:]
    elif how == "drop_key":  # the key's name damaged: the file parses but llama.block_count is gone
        at = data.index(b"llama.block_count")
        data[at:at + 17] = b"llama.block_coun_"
    elif how == "eos_id":
        field = gguf.GGUFReader(path).fields["tokenizer.ggml.eos_token_id"]
        at = field.offset + 8 + len(field.name) + 4  # key length, key, value type, then the uint32 value
        data[at:at + 4] = (9999).to_bytes(4, "little")
    path.write_bytes(bytes(data))


FOUND = {
    "flip": "tensor blk.1.ffn_down.weight: data CRC-32",
    "swap": "tensor blk.0.attn_output.weight: data CRC-32",
    "truncate": "cannot be read back as GGUF",
    "drop_key": "metadata llama.block_count: missing",
    "eos_id": "metadata tokenizer.ggml.eos_token_id: 9999, expected 2",
}


@pytest.mark.parametrize("out_type", ["f16", "bf16", "q8_0"])
def test_export_reports_what_it_verified(merged, tmp_path, out_type):
    import gguf

    _, _, merged_dir = merged("llama")
    lines = []
    path = export_gguf(merged_dir, tmp_path / "m.gguf", out_type=out_type, progress=False, echo=lines.append)
    reader = gguf.GGUFReader(path)
    assert lines == [f"verified: {len(reader.tensors)} tensors (types, shapes, CRC-32 of the data), "
                     f"{len(reader.fields) - 3} metadata keys, tokenizer 320 tokens"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no temporary or .failed file left


@pytest.mark.parametrize("how", list(FOUND))
def test_damaged_file_is_caught_and_kept_aside(merged, tmp_path, monkeypatch, how):
    """The check runs on the temporary file; a damaged one never replaces the file already at the target."""
    from qlora_lite.gguf import verify as gguf_check
    from qlora_lite.gguf import writer

    real = gguf_check.verify_gguf

    def damage_then_verify(path, expected):
        _corrupt(path, how)
        return real(path, expected)

    monkeypatch.setattr(writer, "verify_gguf", damage_then_verify)
    _, _, merged_dir = merged("llama")
    target = tmp_path / "m.gguf"
    target.write_bytes(b"the previous export")
    with pytest.raises(gguf_check.GGUFVerifyError, match="failed its read-back check") as error:
        export_gguf(merged_dir, target, out_type="q8_0" if how == "flip" else "f16", overwrite=True, progress=False)
    assert FOUND[how] in str(error.value) and "kept as" in str(error.value)
    assert target.read_bytes() == b"the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "m.gguf.failed"]


def test_key_llama_cpp_needs_is_required_even_if_never_written(merged, tmp_path, monkeypatch):
    import gguf

    monkeypatch.setattr(gguf.GGUFWriter, "add_block_count", lambda self, n: None)
    _, _, merged_dir = merged("llama")
    result = CliRunner().invoke(main, ["export-gguf", "--model", str(merged_dir), "--output",
                                       str(tmp_path / "m.gguf"), "--quiet"])
    assert result.exit_code == 1
    assert "metadata llama.block_count: missing; llama.cpp needs it" in result.output
    assert not (tmp_path / "m.gguf").exists() and (tmp_path / "m.gguf.failed").exists()


def test_tokenizer_larger_than_embedding_is_refused(tokenizer_dir, tmp_path):
    """llama.cpp rejects a file whose token list is longer than token_embd.weight: say so at export time."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from qlora_lite.errors import GGUFVerifyError

    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                  num_attention_heads=2, vocab_size=300, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(tmp_path / "m")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp_path / "m")
    with pytest.raises(GGUFVerifyError, match="token_embd.weight: 300 rows but the tokenizer has 320 tokens"):
        export_gguf(tmp_path / "m", tmp_path / "m.gguf", progress=False)


def test_q8_0_names_the_matrices_it_keeps_in_f16(tokenizer_dir, tmp_path):
    """Rows of 48 values (down_proj's input width) do not split into Q8_0's 32-value blocks: F16, said so."""
    import gguf
    from tiny_models import tiny_config
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = tiny_config("llama", len(tokenizer))
    config.intermediate_size = 48
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    result = CliRunner().invoke(main, ["export-gguf", "--model", str(tmp_path / "m"), "--output",
                                       str(tmp_path / "m.gguf"), "--type", "q8_0", "--quiet"])
    assert result.exit_code == 0, result.output
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    kept = sorted(name for name, kind in kinds.items() if kind == "F16")
    assert kept == ["blk.0.ffn_down.weight", "blk.1.ffn_down.weight"]
    matrices = sum(kind != "F32" for kind in kinds.values())
    assert (f"note: q8_0 kept 2 of {matrices} weight matrices in F16, their rows not a multiple of Q8_0's 32-value "
            "blocks (llama.cpp does the same): blk.0.ffn_down.weight (48 per row), blk.1.ffn_down.weight (48 per row)"
            ) in result.output


def test_q8_0_fallback_line_is_empty_without_fallbacks_and_shortened_with_many():
    from qlora_lite.gguf.writer import row_fallbacks

    assert row_fallbacks({"a.weight": ("q8_0", (64, 64)), "norm.weight": ("f32", (64,))}, "q8_0") == ""
    many = {f"blk.{i}.ffn_down.weight": ("f16", (64, 48)) for i in range(8)}
    assert row_fallbacks(many, "q8_0").endswith("blk.4.ffn_down.weight (48 per row) and 3 more")


def test_second_modelfile_is_refused_unless_overwrite(merged, tmp_path):
    _, _, merged_dir = merged("llama")
    args = ["export-gguf", "--model", str(merged_dir), "--output", str(tmp_path / "a.gguf"), "--modelfile", "--quiet"]
    assert CliRunner().invoke(main, args).exit_code == 0
    first = (tmp_path / "Modelfile").read_text()
    args[4] = str(tmp_path / "b.gguf")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "Modelfile already exists" in result.output and "--overwrite" in result.output
    assert (tmp_path / "Modelfile").read_text() == first and not (tmp_path / "b.gguf").exists()
    result = CliRunner().invoke(main, [*args, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "Modelfile").read_text().startswith("FROM ./b.gguf")


def test_existing_output_needs_overwrite_and_model_files_are_never_replaced(merged, tmp_path):
    """A user's file at --output survives without --overwrite; the model's own files survive even with it."""
    base, adapter, merged_dir = merged("llama")
    mine = tmp_path / "notes.gguf"
    mine.write_bytes(b"my notes")
    result = CliRunner().invoke(main, ["export-gguf", "--model", str(merged_dir), "--output", str(mine), "--quiet"])
    assert result.exit_code == 1 and "exists; pass --overwrite" in result.output
    assert mine.read_bytes() == b"my notes"
    weights = merged_dir / "model.safetensors"
    before = weights.read_bytes()
    for model, extra in [(merged_dir, []), (base, ["--adapter", str(adapter)])]:
        own = model / "model.safetensors" if model == merged_dir else adapter / "adapter_model.safetensors"
        saved = own.read_bytes()
        result = CliRunner().invoke(main, ["export-gguf", "--model", str(model), *extra, "--output", str(own),
                                           "--overwrite", "--quiet"])
        assert result.exit_code == 1 and "is a file of the input folder" in result.output, result.output
        assert own.read_bytes() == saved
    assert weights.read_bytes() == before
    result = CliRunner().invoke(main, ["export-gguf", "--model", str(merged_dir), "--output", str(mine),
                                       "--overwrite", "--quiet"])
    assert result.exit_code == 0, result.output
    assert mine.read_bytes()[:4] == b"GGUF"


def test_export_with_adapter_runs_the_merge_check_and_writes_nothing_when_it_fails(merged, tmp_path, monkeypatch):
    """``--adapter`` merges through ``merge``'s own verified path first: a wrong merge is refused before any
    GGUF byte is written; only the failed merge is kept, for inspection, where the message says."""
    from qlora_lite.errors import MergeVerificationError
    from qlora_lite.merge import plan as plan_module

    base, adapter, _ = merged("llama")
    real = plan_module.merged_tensor

    def corrupt(plan, key, tensor):
        out = real(plan, key, tensor)
        return out * 1.5 if key.endswith("layers.0.self_attn.v_proj.weight") else out

    monkeypatch.setattr(plan_module, "merged_tensor", corrupt)
    with pytest.raises(MergeVerificationError, match="v_proj") as error:
        export_gguf(base, tmp_path / "model.gguf", adapter_dir=adapter, progress=False)
    assert not (tmp_path / "model.gguf").exists() and not list(tmp_path.glob("*.partial"))
    kept = [p for p in tmp_path.glob(".model.gguf.merge-*/merged.failed")]
    assert len(kept) == 1 and str(kept[0]) in str(error.value)
    monkeypatch.setattr(plan_module, "merged_tensor", real)  # a correct merge leaves no temporary folder
    export_gguf(base, tmp_path / "ok.gguf", adapter_dir=adapter, progress=False)
    assert not list(tmp_path.glob(".ok.gguf.merge-*"))


@pytest.mark.parametrize("arch, change, message", [
    ("gemma2", {"tie_word_embeddings": False}, "llama.cpp's gemma2 always uses token_embd.weight"),
    ("gemma3_text", {"attn_logit_softcapping": 50.0}, "llama.cpp's gemma3 has no attention softcapping"),
    ("phi3", {"head_dim": 32}, "head_dim 32 is not hidden_size/num_attention_heads"),
    ("phi3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "long_factor": [1.0] * 4,
                                  "short_factor": [1.0] * 8}}, "rope long_factor has 4 values; llama.cpp needs 8"),
    ("phi3", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "llama.cpp's phi3 reads only LongRoPE"),
])
def test_settings_llama_cpp_computes_differently_are_refused_before_any_work(arch, change, message):
    from tiny_models import tiny_config

    from qlora_lite.gguf.writer import architecture

    config = {**tiny_config(arch, 320).to_dict(), **change}
    with pytest.raises(GGUFExportError, match=message):
        architecture("m", config)
    architecture("m", tiny_config(arch, 320).to_dict())  # unchanged, it is accepted
