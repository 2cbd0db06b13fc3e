"""Builders for tiny random models and a byte-level BPE tokenizer trained on local text."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from qlora_lite.model.adapter import save_adapter
from qlora_lite.model.build import build_model
from qlora_lite.model.lora import lora_layers

ARCHS = ("llama", "mistral", "qwen2", "gemma", "phi3", "gpt2")
# Every model_type export-gguf writes (Mistral: the llama graph; gemma3: the text model of a multimodal folder).
GGUF_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gemma3", "phi3")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% if m['role'] != 'user' and "
    "m['role'] != 'system' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Instruction: add two numbers. Input: 2 and 3. Response: 5",
    "Below is an instruction that describes a task. Write a response that completes the request.",
    "user assistant system: hello, how are you? I am fine, thank you.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 plus minus equals",
] * 20


class ProjectionMatmuls:
    """Counts the projection-sized matmuls (weight at least 64 x 64, so not the thin LoRA ones) run
    inside ``with`` -- how the checkpoint policies are told apart by the work they do."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter, matmuls = self, {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}
        self.count = 0

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter.count += func in matmuls and min(args[-1].shape) >= 64
                return func(*args, **(kwargs or {}))

        self._mode = _Mode()

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def train_tiny_tokenizer(folder: Path, vocab_size: int = 320, pad_token: bool = False) -> Path:
    """Train a byte-level BPE on CORPUS and save it as a transformers tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"] + (["<pad>"] if pad_token else [])
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>" if pad_token else None)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return Path(folder)


def tiny_config(arch: str, vocab_size: int, **overrides):
    """A 2-layer, 64-wide config of ``arch`` (a transformers model_type); ``overrides`` set any field."""
    from transformers import AutoConfig

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=None)
    if arch == "gpt2":
        return AutoConfig.for_model("gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=vocab_size,
                                    n_positions=256, bos_token_id=1, eos_token_id=2)
    if arch == "gpt_neox":  # its own names; transformers 5 saves the head as embed_out
        return AutoConfig.for_model("gpt_neox", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, vocab_size=vocab_size, max_position_embeddings=256,
                                    bos_token_id=1, eos_token_id=2)
    if arch == "gemma":
        common["head_dim"] = 16
    if arch == "qwen3":  # its default head_dim: transformers' GGUF reader does not take another from the file
        common["head_dim"] = 128
    if arch == "gemma3":  # Gemma3ForConditionalGeneration: the gemma3_text model below plus a tiny vision tower
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                      patch_size=14)
        return AutoConfig.for_model("gemma3", text_config=tiny_config("gemma3_text", vocab_size).to_dict(),
                                    vision_config=vision, mm_tokens_per_image=4, image_token_index=0,
                                    boi_token_index=1, eoi_token_index=2, **overrides)
    if arch in ("gemma2", "gemma3_text"):
        # query_pre_attn_scalar must equal head_dim for llama.cpp, and transformers' GGUF reader leaves it
        # at its default (256), so head_dim is 256 too; a window shorter than probe() makes layers slide.
        common.update(head_dim=256, query_pre_attn_scalar=256, sliding_window=8)
    if arch == "phi3":
        common["pad_token_id"] = 0
    return AutoConfig.for_model(arch, **{**common, **overrides})


def make_tiny_model(arch: str, folder: Path, tokenizer_dir: Path, shards: int = 1, seed: int = 0,
                    **overrides) -> Path:
    """Save a randomly initialised tiny ``arch`` model (bf16 safetensors) plus the tokenizer.

    ``overrides``: config fields, as for ``tiny_config``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer), **overrides), dtype=torch.bfloat16)
    # Give norms and biases non-trivial values so layouts and transposes are really exercised.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.05 * torch.randn_like(p))
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    max_shard = f"{max(1, total // shards // 1000 + 1)}KB" if shards > 1 else "1GB"
    model.save_pretrained(folder, max_shard_size=max_shard)
    tokenizer.save_pretrained(folder)
    if shards > 1:
        index = json.loads((Path(folder) / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) >= 2, "expected a multi-shard checkpoint"
    return Path(folder)


def write_chat_jsonl(path, n=32, seed=0):
    """Short chat examples ("add 3 and 4" -> "3 plus 4 equals 7"), about 20 tokens each."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            messages = [{"role": "user", "content": f"add {a} and {b}"},
                        {"role": "assistant", "content": f"{a} plus {b} equals {a + b}"}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def make_adapter(base, folder, bits=4, targets="all-linear", seed=1, scale=0.05, rslora=False, dtype="bf16"):
    """Save an adapter with random lora_B (a fresh one is the identity and would prove nothing), trained
    against a ``dtype`` base (bf16 by default, whatever this CPU runs fast: the references compare in bf16)."""
    model = build_model(str(base), bits=bits, rank=4, alpha=8, target_modules=targets, rslora=rslora, seed=0,
                        trainable=True, gradient_checkpointing=False, compute_dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * scale)
    save_adapter(model, folder)
    return folder


def lora_targets(arch: str) -> str:
    """Attention and MLP projections to put LoRA on (Phi-3 fuses q/k/v and gate/up into one each)."""
    return "qkv_proj,o_proj,gate_up_proj" if arch == "phi3" else "q_proj,k_proj,v_proj,o_proj,gate_proj"


def probe(vocab=320, length=24, seed=3):
    return torch.randint(3, vocab, (2, length), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.float()


def write_preference_jsonl(path, n=64, seed=0, chat=True):
    """Preference pairs a base gets right about half the time: "is 7 even" -> chosen "no", rejected
    "yes" (the answer is the parity of the number), after a few random filler words so held-out
    prompts are new text; ``chat``: the prompt as messages, else as a string."""
    rng = random.Random(seed)
    words = ["the", "quick", "brown", "fox", "lazy", "dog", "hello", "how", "are", "you", "fine"]
    with open(path, "w") as f:
        for _ in range(n):
            a = rng.randint(0, 9)
            question = " ".join(rng.sample(words, 3)) + f": is {a} even"
            right, wrong = ("yes", "no") if a % 2 == 0 else ("no", "yes")
            prompt = [{"role": "user", "content": question}] if chat else question + "\nanswer: "
            f.write(json.dumps({"prompt": prompt, "chosen": right, "rejected": wrong}) + "\n")
    return path
