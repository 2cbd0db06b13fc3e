"""K-quants and Q4_0/Q5_0 written by export-gguf: the bytes llama-quantize makes from our f16 file."""

import ctypes

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tiny_models import make_adapter, tiny_config

from qlora_lite.cli import main
from qlora_lite.errors import GGUFExportError
from qlora_lite.gguf.mix import file_type, tensor_type, use_more_bits
from qlora_lite.gguf.quantize import BLOCKS, quantize
from qlora_lite.gguf.writer import OUT_TYPES, export_gguf

NEW_TYPES = ["q4_k_m", "q5_k_m", "q6_k", "q4_0", "q5_0"]
# Largest |dequantized - input| relative to a row's largest |value|, Gaussian rows (measured well below).
ERROR_BOUND = {"q4_0": 0.10, "q5_0": 0.05, "q5_1": 0.04, "q8_0": 0.006, "q4_k": 0.12, "q5_k": 0.06, "q6_k": 0.03}


@pytest.fixture(scope="module")
def kq_model(tokenizer_dir, tmp_path_factory):
    """Llama, 8 layers: rows of 256 (K-quant blocks), 320 (32s only: fallbacks) and 48 (neither: F16).

    Tied embeddings: token_embd.weight is then llama.cpp's output tensor (Q6_K). Some rows are made
    hard on purpose: all zero, constant, one outlier, values fp16 flushes to zero, negative zeros.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("kq-model")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = tiny_config("llama", len(tokenizer))
    config.update(dict(hidden_size=256, intermediate_size=320, num_hidden_layers=8, head_dim=12,
                       tie_word_embeddings=True))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        up = model.model.layers[1].mlp.up_proj.weight
        up[0], up[1], up[2, 7], up[3] = 0.0, 0.03, 40.0, 1e-9
        model.model.layers[2].self_attn.v_proj.weight[4, :64] = -0.0
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _llama_quantize(llama_cpp, source, target, out_type):
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{out_type.upper()}")
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) == 0


def _differences(ours, reference):
    """Lines naming each tensor whose name, type, shape or bytes differ, and a differing file_type."""
    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(reference)
    mine, theirs = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    problems = [f"only in one file: {sorted(set(mine) ^ set(theirs))}"] if set(mine) != set(theirs) else []
    for name in sorted(set(mine) & set(theirs)):
        x, y = mine[name], theirs[name]
        if x.tensor_type != y.tensor_type or list(x.shape) != list(y.shape):
            problems.append(f"{name}: ours {x.tensor_type.name} {list(x.shape)}, llama.cpp {y.tensor_type.name} "
                            f"{list(y.shape)}")
        elif not np.array_equal(np.asarray(x.data), np.asarray(y.data)):
            block = gguf.GGML_QUANT_SIZES[x.tensor_type][1]
            rows = np.asarray(x.data).reshape(-1, block) != np.asarray(y.data).reshape(-1, block)
            problems.append(f"{name}: {rows.any(axis=1).sum()} of {len(rows)} blocks differ")
    kinds = [int(r.fields["general.file_type"].parts[-1][0]) for r in (a, b)]
    return problems + ([f"general.file_type: ours {kinds[0]}, llama.cpp {kinds[1]}"] if kinds[0] != kinds[1] else [])


@pytest.mark.parametrize("out_type", NEW_TYPES)
def test_our_file_equals_llama_quantize_of_our_f16_file(llama_cpp, kq_model, tmp_path, out_type):
    f16 = export_gguf(kq_model, tmp_path / "f16.gguf", out_type="f16", progress=False)
    _llama_quantize(llama_cpp, f16, tmp_path / "ref.gguf", out_type)
    ours = export_gguf(kq_model, tmp_path / "ours.gguf", out_type=out_type, progress=False)
    assert _differences(ours, tmp_path / "ref.gguf") == []
    kinds = {t.tensor_type.name for t in gguf.GGUFReader(ours).tensors}
    assert {"F16", "F32"} < kinds and len(kinds) >= 4  # fallbacks and (for _M) the mix really ran


def test_merged_adapter_equals_llama_quantize_of_the_f16_merge(llama_cpp, tiny_model_factory, tmp_path):
    """With --adapter the merge is in fp16, the dtype of the f16 file llama-quantize would start from.

    The tiny qwen2 has its own output.weight, rows of 64: Q8_0 (Q4_K's blocks do not fit), token_embd Q5_0.
    """
    base = tiny_model_factory("qwen2")
    adapter = make_adapter(base, tmp_path / "adapter", targets="q_proj,v_proj,down_proj")
    f16 = export_gguf(base, tmp_path / "f16.gguf", adapter_dir=adapter, out_type="f16", progress=False)
    _llama_quantize(llama_cpp, f16, tmp_path / "ref.gguf", "q4_k_m")
    ours = export_gguf(base, tmp_path / "ours.gguf", adapter_dir=adapter, out_type="q4_k_m", progress=False)
    assert _differences(ours, tmp_path / "ref.gguf") == []


@pytest.mark.parametrize("arch", ["qwen3", "gemma2", "gemma3_text", "phi3"])
def test_other_architectures_equal_llama_quantize(llama_cpp, merged, tmp_path, arch):
    """The mix goes by tensor name: Gemma's tied embeddings, Phi-3's fused attn_qkv and gate/up included."""
    merged_dir = merged(arch)[2]
    f16 = export_gguf(merged_dir, tmp_path / "f16.gguf", out_type="f16", progress=False)
    _llama_quantize(llama_cpp, f16, tmp_path / "ref.gguf", "q4_k_m")
    ours = export_gguf(merged_dir, tmp_path / "ours.gguf", out_type="q4_k_m", progress=False)
    assert _differences(ours, tmp_path / "ref.gguf") == []


@pytest.mark.parametrize("kind", sorted(BLOCKS))
def test_blocks_dequantize_close_to_the_input(kind):
    block, nbytes = BLOCKS[kind]
    x = torch.randn(24, 512, generator=torch.Generator().manual_seed(0)).numpy().astype(np.float16).astype(np.float32)
    x[0] = 0.0
    q = quantize(x, kind)
    assert q.dtype == np.uint8 and q.shape == (24, 512 // block * nbytes)
    back = gguf.quants.dequantize(q, gguf.GGMLQuantizationType[kind.upper()])
    assert np.all(back[0] == 0)
    error = np.abs(back - x).max(axis=1)[1:] / np.abs(x[1:]).max(axis=1)
    assert error.max() < ERROR_BOUND[kind]
    if kind != "q8_0":  # fewer bits, larger error: the bounds are not all the same number
        assert error.max() > ERROR_BOUND["q8_0"]


def test_q8_0_blocks_equal_gguf_py():
    x = torch.randn(16, 96, generator=torch.Generator().manual_seed(1)).numpy()
    assert np.array_equal(quantize(x, "q8_0"), gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0))


def test_rows_that_do_not_split_into_blocks_are_an_error_naming_the_tensor():
    with pytest.raises(GGUFExportError, match=r"blk.0.ffn_down.weight: rows of 320 values do not split into Q4_K"):
        quantize(np.zeros((2, 320), np.float32), "q4_k", name="blk.0.ffn_down.weight")
    overflow = np.zeros((2, 256), np.float32)
    overflow[1, 40] = np.inf
    with pytest.raises(GGUFExportError, match=r"blk.1.attn_q.weight: 1 blocks of 256 values hold inf or NaN \(the "
                                              r"first at value 256 "):
        quantize(overflow, "q6_k", name="blk.1.attn_q.weight")
    with pytest.raises(GGUFExportError, match="no quantizer for type 'q3_k'"):
        quantize(np.zeros((2, 256), np.float32), "q3_k")


def test_m_mix_gives_more_bits_where_llama_cpp_does():
    """8 layers: use_more_bits picks layers 0 and 7 (first and last eighth) and 3, 6 (every third between)."""
    assert [i for i in range(8) if use_more_bits(i, 8)] == [0, 3, 6, 7]
    kind = lambda out, name, cols=256, tied=False, **kw: tensor_type(out, name, (64, cols), n_layers=8, tied=tied,  # noqa: E731
                                                                     **kw)
    assert [kind("q4_k_m", f"blk.{i}.attn_v.weight") for i in range(8)] == [
        "q6_k", "q4_k", "q4_k", "q6_k", "q4_k", "q4_k", "q6_k", "q6_k"]
    assert [kind("q5_k_m", f"blk.{i}.ffn_down.weight") for i in range(4)] == ["q6_k", "q5_k", "q5_k", "q6_k"]
    assert kind("q4_k_m", "blk.0.attn_qkv.weight") == "q6_k"  # fused (Phi-3) counts as attn_v
    assert kind("q4_k_m", "blk.1.attn_q.weight") == kind("q4_k_m", "token_embd.weight") == "q4_k"
    assert kind("q4_0", "output.weight") == kind("q4_k_m", "token_embd.weight", tied=True) == "q6_k"
    assert kind("q6_k", "blk.0.ffn_down.weight") == "q6_k" and kind("q5_0", "blk.0.ffn_down.weight") == "q5_0"
    # rows not a multiple of 256: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0; not of 32 either: F16
    assert [kind(t, "blk.1.ffn_up.weight", cols=320) for t in ("q4_k_m", "q5_k_m", "q6_k")] == ["q5_0", "q5_1", "q8_0"]
    assert kind("q4_k_m", "blk.0.ffn_down.weight", cols=320) == "q8_0"  # Q6_K by the mix, then its fallback
    assert kind("q4_k_m", "output.weight", cols=320) == "q8_0"  # output: Q8_0 when Q4_K's blocks do not fit
    assert kind("q4_k_m", "blk.1.ffn_up.weight", cols=48) == kind("q4_0", "output.weight", cols=48) == "f16"
    assert kind("q8_0", "blk.1.ffn_up.weight", cols=48) == "f16" and kind("bf16", "output.weight") == "bf16"
    assert tensor_type("q4_k_m", "blk.0.attn_norm.weight", (256,), n_layers=8, tied=False) == "f32"
    # the 70B rule: 80 layers with grouped-query attention, attn_v Q4_K -> Q5_K
    v = lambda arch, kv: tensor_type("q4_k_m", "blk.11.attn_v.weight", (1024, 8192), n_layers=80, tied=False,  # noqa: E731
                                     arch=arch, n_head=64, n_head_kv=kv)
    assert (v("llama", 8), v("llama", 64), v("qwen2", 64), v("qwen3", 8)) == ("q5_k", "q4_k", "q5_k", "q4_k")
    with pytest.raises(GGUFExportError, match="blk.9.attn_v.weight"):
        kind("q4_k_m", "blk.9.attn_v.weight")


def test_file_types_are_llama_cpp_numbers():
    """llama.h's llama_ftype values: Q4_0 2, Q5_0 8, Q4_K_M 15, Q5_K_M 17, Q6_K 18."""
    assert [int(file_type(t)) for t in NEW_TYPES] == [15, 17, 18, 2, 8]


def test_cli_offers_every_type_the_writer_writes():
    from qlora_lite.cli.export_gguf import command

    choices = next(p.type.choices for p in command.params if p.name == "out_type")
    assert sorted(choices) == sorted(OUT_TYPES)
    result = CliRunner().invoke(main, ["export-gguf", "--model", ".", "--output", "x.gguf", "--type", "q3_k"])
    assert result.exit_code != 0 and "q4_k_m" in result.output


def test_weight_too_large_for_fp16_is_an_error_naming_the_tensor(tokenizer_dir, tmp_path):
    """llama-quantize would read inf from the f16 file and write garbage; we refuse, writing nothing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tokenizer)), dtype=torch.bfloat16)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = 1e5
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    with pytest.raises(GGUFExportError, match=r"blk.1.ffn_up.weight: 1 blocks of 32 values hold inf or NaN .*fp16"):
        export_gguf(tmp_path / "m", tmp_path / "m.gguf", out_type="q4_k_m", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


# max|llama.cpp - transformers| / max|transformers| on kq_model's probe, per type, about 1.5 times what
# was measured (2026-12-02; BENCHMARKS.md "llama.cpp agreement"). Against the 16-bit folder the
# quantization itself dominates (kq_model has hard rows on purpose); against transformers running the
# same file (gguf-py dequantizes it) only llama.cpp's arithmetic differs, so that bound is tight.
AGAINST_16_BIT = {"q6_k": 0.08, "q5_k_m": 0.13, "q5_0": 0.18, "q4_k_m": 0.22, "q4_0": 0.55}
AGAINST_SAME_FILE = {t: 0.045 for t in NEW_TYPES}  # measured 0.019-0.027: its 8-bit activations


@pytest.mark.parametrize("out_type", NEW_TYPES)
def test_llama_cpp_runs_each_type_close_to_transformers(llama_cpp, kq_model, tmp_path, out_type):
    """llama.cpp's logits of our quantized file against transformers on the 16-bit folder, and on the
    file itself."""
    import llama_cpp_ref as ref
    from tiny_models import logits, probe
    from transformers import AutoModelForCausalLM

    def relative(got, expected):
        return float(np.abs(got - expected.numpy()).max() / expected.abs().max().item())

    ids = probe(vocab=300)[0].tolist()
    path = export_gguf(kq_model, tmp_path / "m.gguf", out_type=out_type, progress=False)
    got = ref.logits(path, ids)
    folder = AutoModelForCausalLM.from_pretrained(kq_model, dtype=torch.float32)
    same_file = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    against_16_bit = relative(got, logits(folder, torch.tensor([ids]))[0])
    against_file = relative(got, logits(same_file, torch.tensor([ids]))[0])
    assert against_16_bit <= AGAINST_16_BIT[out_type] and against_file <= AGAINST_SAME_FILE[out_type]


def test_cli_names_the_matrices_a_k_quant_wrote_in_other_types(kq_model, tmp_path):
    """Rows of 320 and 48 values do not split into Q4_K's 256: the export says which matrices fell back."""
    result = CliRunner().invoke(main, ["export-gguf", "--model", str(kq_model), "--output", str(tmp_path / "m.gguf"),
                                       "--type", "q4_k_m", "--quiet"])
    assert result.exit_code == 0, result.output
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    line = next(line for line in result.output.splitlines() if line.startswith("note: q4_k_m wrote"))
    assert "rows not a multiple of Q4_K's 256-value blocks" in line
    assert f"blk.0.ffn_down.weight (320 per row: {kinds['blk.0.ffn_down.weight']})" in line
    assert "blk.0.attn_q.weight" not in line  # 256 per row: a Q4_K block row, no fallback
    assert kinds["blk.0.attn_q.weight"] == "Q4_K"


def test_no_fallback_line_when_every_row_splits():
    from qlora_lite.gguf.writer import row_fallbacks

    assert row_fallbacks({"a.weight": ("q4_k", (64, 512)), "norm.weight": ("f32", (64,))}, "q4_k_m") == ""
    assert row_fallbacks({"a.weight": ("f16", (64, 48))}, "f16") == ""
    assert "(48 per row: F16)" in row_fallbacks({"a.weight": ("f16", (64, 48))}, "q4_0")
