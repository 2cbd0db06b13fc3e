"""Write a randomly initialised LLaMA-shape model as bf16 safetensors shards, for benchmarks.

Tensors are generated one by one directly in bf16 and written shard by shard, so a 1.1B model
needs about one shard of memory (never the 4.4 GB an fp32 transformers model would take).

    python tools/make_bench_model.py bench-out/llama-1.1b            # the default 1.1B shape
    python tools/make_bench_model.py bench-out/llama-small --preset small
    python tools/make_bench_model.py bench-out/llama-1.1b-long --context 131072
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

PRESETS = {
    # TinyLlama-1.1B shape: hidden 2048, 22 layers, 32 heads with 4 KV heads, intermediate 5632.
    "1.1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                 intermediate_size=5632, vocab_size=32000),
    "small": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                  intermediate_size=1408, vocab_size=8000),
    "medium": dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
                   intermediate_size=2816, vocab_size=16000),
}


def llama_config(**sizes) -> dict:
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
              "attention_bias": False, "mlp_bias": False}
    config.update(sizes)
    return config


def tensor_shapes(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of a LlamaForCausalLM checkpoint with its shape, in checkpoint order."""
    h, inter, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = h // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * hd
    shapes = [("model.embed_tokens.weight", (v, h))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (h, h)),
                   (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                   (p + "self_attn.o_proj.weight", (h, h)), (p + "post_attention_layernorm.weight", (h,)),
                   (p + "mlp.gate_proj.weight", (inter, h)), (p + "mlp.up_proj.weight", (inter, h)),
                   (p + "mlp.down_proj.weight", (h, inter))]
    return shapes + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def write_model(folder: Path, config: dict, shards: int = 4, seed: int = 0) -> Path:
    """Save config.json, ``shards`` safetensors files and the index; returns the folder."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shapes = tensor_shapes(config)
    total = sum(torch.Size(s).numel() for _, s in shapes)
    per_shard, weight_map, shard, size, index = total / shards, {}, {}, 0, 0

    def flush():
        nonlocal shard, size, index
        name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        shard, size, index = {}, 0, index + 1

    for name, shape in shapes:
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = torch.randn(shape, generator=gen, dtype=torch.bfloat16).mul_(0.02)
        shard[name] = t
        size += t.numel()
        if size >= per_shard and index < shards - 1:
            flush()
    flush()
    if index != shards:
        raise RuntimeError(f"wrote {index} shards, expected {shards}; use fewer --shards")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    index_json = {"metadata": {"total_size": 2 * total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return folder


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer whose token i is the word ``w{i}`` (ids 0-2: <unk>, <s>, </s>).

    Benchmark data is random token ids written as such words, so every stack sees exactly the same
    ids through its own tokenizer path.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="1.1b")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--context", type=int, default=2048,
                        help="max_position_embeddings (rotary positions are computed for any length; long-context "
                             "benchmarks need it above the lengths they try)")
    args = parser.parse_args(argv)
    config = llama_config(**PRESETS[args.preset], max_position_embeddings=args.context)
    if (args.folder / "model.safetensors.index.json").exists():
        if not (args.folder / "tokenizer.json").exists():
            write_tokenizer(args.folder, config["vocab_size"])
        print(f"{args.folder} exists; keeping it")
        return
    write_model(args.folder, config, args.shards, args.seed)
    write_tokenizer(args.folder, config["vocab_size"])
    print(f"wrote {args.folder}")


if __name__ == "__main__":
    main()
