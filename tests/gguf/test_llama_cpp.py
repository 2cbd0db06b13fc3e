"""llama.cpp itself (llama-cpp-python) runs the GGUF files: its logits and greedy picks against
transformers on the merged folder, for every architecture export-gguf writes."""

import llama_cpp_ref as ref
import numpy as np
import pytest
import torch
from tiny_models import GGUF_ARCHS, logits, make_tiny_model, probe

from qlora_lite.errors import GGUFExportError, GGUFVerifyError
from qlora_lite.gguf.writer import export_gguf

# max|llama.cpp - transformers (fp32 merge)| / max|transformers|, per GGUF type.
TOLERANCE = {"f16": 1e-2, "bf16": 3e-2, "q8_0": 8e-2}  # q8_0: llama.cpp also rounds activations to 8 bits
SAMPLE_TEXTS = ["The quick brown fox jumps over 12 lazy dogs.</s> hello\n  world!",
                "digits 0 7 42 1234567 3.14159 -8e10", "naïve café, Ünïcödé: 東京 Δ→∞ 🚀🙂",
                "tabs\tand   runs    of\n\n\nwhitespace  \t ", "  leading and trailing  "]
PROMPT = probe()[0].tolist()  # 24 ids: longer than the Gemma windows (8), so layers really slide


def _transformers(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def _relative(got: np.ndarray, expected: torch.Tensor) -> float:
    return float(np.abs(got - expected.numpy()).max() / expected.abs().max().item())


@pytest.mark.parametrize("arch", GGUF_ARCHS)
@pytest.mark.parametrize("out_type", ["f16", "bf16", "q8_0"])
def test_llama_cpp_logits_match_transformers(llama_cpp, merged, reference_logits, tmp_path, arch, out_type):
    _, _, merged_dir = merged(arch)
    path = export_gguf(merged_dir, tmp_path / "m.gguf", out_type=out_type, progress=False)
    expected = reference_logits(arch)[0][0]  # the fp32 merged folder on PROMPT
    assert _relative(ref.logits(path, PROMPT), expected) <= TOLERANCE[out_type]


@pytest.mark.parametrize("arch", GGUF_ARCHS)
def test_llama_cpp_greedy_generation_matches_transformers(llama_cpp, merged, tmp_path, arch):
    """30 tokens generated through llama.cpp's KV cache are transformers' greedy picks.

    Tiny random models have near-ties, so the rule is: transformers is run once on llama.cpp's
    sequence; every step's logits must agree within the f16 tolerance, and at the first step where
    transformers' argmax differs from llama.cpp's pick (if any), the two candidates must be tied
    within twice the largest logit difference measured. With no such step the sequences are equal.
    """
    _, _, merged_dir = merged(arch)
    path = export_gguf(merged_dir, tmp_path / "m.gguf", out_type="f16", progress=False)
    prompt = PROMPT[:8]
    picked, theirs = ref.generate(path, prompt, 30)
    ours = logits(_transformers(merged_dir), torch.tensor([prompt + picked[:-1]]))[0]
    assert _relative(theirs, ours) <= TOLERANCE["f16"]
    steps = ours[len(prompt) - 1:]  # row i predicts picked[i]
    differ = [i for i, token in enumerate(picked) if steps[i].argmax().item() != token]
    if differ:
        i, diff = differ[0], float(np.abs(theirs - ours.numpy()).max())
        margin = (steps[i].max() - steps[i, picked[i]]).item()
        assert margin <= 2 * diff, f"step {i}: llama.cpp picked {picked[i]}, transformers {steps[i].argmax()} " \
                                   f"by a margin {margin:.2e} > 2 x {diff:.2e}"


def test_gemma3_layer_pattern_other_than_llama_cpp_default(llama_cpp, tokenizer_dir, tmp_path):
    """A sliding then a full layer (llama.cpp's default for 2 layers: both slide) is written per layer."""
    import gguf

    folder = make_tiny_model("gemma3_text", tmp_path / "g3", tokenizer_dir,
                             layer_types=["sliding_attention", "full_attention"])
    path = export_gguf(folder, tmp_path / "g3.gguf", out_type="f16", progress=False)
    pattern = gguf.GGUFReader(path).fields["gemma3.attention.sliding_window_pattern"].contents()
    assert pattern == [True, False]
    expected = logits(_transformers(folder), torch.tensor([PROMPT]))[0]
    assert _relative(ref.logits(path, PROMPT), expected) <= TOLERANCE["f16"]


def test_gemma2_softcapping(llama_cpp, tokenizer_dir, tmp_path):
    """Caps small enough to bend this tiny model's scores and logits (the defaults, 50 and 30, do not):
    llama.cpp applies both as transformers does."""
    folder = make_tiny_model("gemma2", tmp_path / "g2", tokenizer_dir, attn_logit_softcapping=0.05,
                             final_logit_softcapping=0.2)
    path = export_gguf(folder, tmp_path / "g2.gguf", out_type="f16", progress=False)
    expected = logits(_transformers(folder), torch.tensor([PROMPT]))[0]
    assert expected.abs().max() < 0.2  # capped: tanh saturates
    assert _relative(ref.logits(path, PROMPT), expected) <= TOLERANCE["f16"] / 2


def test_phi3_longrope_short_and_long_factors(llama_cpp, tokenizer_dir, tmp_path):
    """LongRoPE: llama.cpp uses the short factors for a context up to original_max_position_embeddings
    (256; llama.cpp rounds n_ctx up to a multiple of 256) and the long ones past it, as transformers
    does by sequence length; both scale attention by the same factor. Each case is also run with the
    other context size, whose factors must then visibly disagree with transformers'."""
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "long_factor": [12.0 - 1.5 * i for i in range(8)],
            "short_factor": [3.0 - 0.25 * i for i in range(8)]}  # large on the fast dimensions too
    folder = make_tiny_model("phi3", tmp_path / "tiny", tokenizer_dir, original_max_position_embeddings=256,
                             max_position_embeddings=1024, rope_parameters=rope)
    path = export_gguf(folder, tmp_path / "p.gguf", out_type="f16", progress=False)
    model = _transformers(folder)
    for length, n_ctx, other in ((24, 256, 512), (300, 512, 256)):  # short factors, then long ones
        ids = probe(length=length)[0].tolist()
        expected = logits(model, torch.tensor([ids]))[0]
        right = _relative(ref.logits(path, ids, n_ctx=n_ctx), expected)
        assert right <= TOLERANCE["f16"] / 5, (length, right)
        if length <= other:  # the other context only holds the short sequence
            assert _relative(ref.logits(path, ids, n_ctx=other), expected) > 3 * right


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text"])
def test_gemma_attention_scale_llama_cpp_cannot_represent_is_refused(tokenizer_dir, tmp_path, arch):
    folder = make_tiny_model(arch, tmp_path / "g", tokenizer_dir, query_pre_attn_scalar=64)
    with pytest.raises(GGUFExportError, match=r"query_pre_attn_scalar is 64, but llama.cpp scales .* 1/sqrt\(256\)"):
        export_gguf(folder, tmp_path / "g.gguf", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]


def test_phi3_named_file_needs_the_tokens_llama_cpp_looks_up(tiny_model_factory, tmp_path):
    """llama.cpp sets Phi-3 token attributes when general.name contains "phi3" and fails to load the
    file if <|endoftext|> (among others) is not in the vocabulary: caught at export, with what to do."""
    with pytest.raises(GGUFVerifyError, match=r"general.name 'phi3-.*' makes llama.cpp look up <\|endoftext\|>"):
        export_gguf(tiny_model_factory("phi3"), tmp_path / "p.gguf", progress=False)


@pytest.mark.parametrize("arch", GGUF_ARCHS)
def test_llama_cpp_tokenizes_like_transformers(llama_cpp, merged, tmp_path, arch):
    """The vocabulary written (byte-level BPE here, whatever the architecture) splits text in llama.cpp
    as the folder's tokenizer.json does, special tokens included. (Compared with the tokenizers library
    on the file: transformers 5 loads a qwen2 folder as Qwen2Tokenizer, which applies Qwen2's own
    pre-tokenizer whatever the file says, and our GPT-2-style test tokenizer splits digits otherwise.)"""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    _, _, merged_dir = merged(arch)
    path = export_gguf(merged_dir, tmp_path / "t.gguf", out_type="q8_0", progress=False)
    tokenizer = Tokenizer.from_file(str(merged_dir / "tokenizer.json"))
    chat = AutoTokenizer.from_pretrained(merged_dir).apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}], tokenize=False)
    for text in SAMPLE_TEXTS + [chat]:
        expected = tokenizer.encode(text, add_special_tokens=False).ids
        assert ref.tokenize(path, text) == expected, text
    assert 2 in tokenizer.encode(chat, add_special_tokens=False).ids  # the template's EOS, parsed as one token
    # BOS: llama.cpp adds one exactly when transformers' tokenizer does (tokenizer.ggml.add_bos_token)
    hf = AutoTokenizer.from_pretrained(merged_dir)("hello").input_ids
    assert ref.tokenize(path, "hello", add_bos=None)[:1] == hf[:1]


def test_llama_cpp_tokenizes_a_gemma_style_vocabulary_like_its_file(llama_cpp, tmp_path):
    """Gemma's tokenizer.json kind: BPE with byte fallback, spaces as "\u2581", no prefix space, written as
    tokenizer model "llama"; llama.cpp splits text (bytes outside the vocabulary too) as the file does."""
    from tiny_models import CORPUS
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
                            ).save_pretrained(tmp_path / "tok")
    folder = make_tiny_model("gemma2", tmp_path / "m", tmp_path / "tok")
    path = export_gguf(folder, tmp_path / "m.gguf", out_type="q8_0", progress=False)
    for text in ("The quick brown fox jumps over 12 lazy dogs.</s> hello\n  world!", "\u00fcn\u00efc\u00f6d\u00e9 \u2713"):
        expected = tok.encode(text, add_special_tokens=False).ids
        assert ref.tokenize(path, text) == expected
    assert any(3 <= i < 259 for i in expected), "byte-fallback pieces must be exercised"
