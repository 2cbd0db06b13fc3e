"""How closely llama.cpp runs our GGUF files: a markdown table, per architecture and type, of
max|llama.cpp - transformers| / max|transformers| on the tests' tiny models (adapter merged in fp32),
and how many of 30 greedy tokens llama.cpp generates equal transformers' own greedy tokens.

    PYTHONPATH=$PWD python tools/gguf_agreement.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import llama_cpp_ref as ref
import numpy as np
import torch
from tiny_models import (
    GGUF_ARCHS,
    logits,
    lora_targets,
    make_adapter,
    make_tiny_model,
    probe,
    train_tiny_tokenizer,
)

from qlora_lite.gguf.writer import OUT_TYPES, export_gguf
from qlora_lite.merge.write import merge_adapter


def _same_greedy(model, path: Path, prompt: list[int], n: int = 30) -> int:
    picked = ref.greedy(path, prompt, n)
    ours = logits(model, torch.tensor([prompt + picked[:-1]]))[0, len(prompt) - 1:].argmax(-1).tolist()
    return next((i for i, (a, b) in enumerate(zip(ours, picked)) if a != b), n)  # equal prefix length


def main() -> None:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="gguf-agreement-"))
    tokenizer = train_tiny_tokenizer(root / "tokenizer")
    prompt = probe()[0].tolist()
    print("| architecture | " + " | ".join(OUT_TYPES) + " | greedy, 30 tokens (f16) |")
    print("|---" * (len(OUT_TYPES) + 2) + "|")
    for arch in sys.argv[1:] or GGUF_ARCHS:
        base = make_tiny_model(arch, root / arch, tokenizer)
        adapter = make_adapter(base, root / f"{arch}-adapter", targets=lora_targets(arch))
        merged = root / f"{arch}-merged" / "merged"
        merge_adapter(base, adapter, merged, dtype="fp32", verify=False, progress=False)
        model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
        expected = logits(model, torch.tensor([prompt]))[0].numpy()
        cells, greedy = [], ""
        for out_type in OUT_TYPES:
            path = export_gguf(merged, root / f"{arch}-{out_type}.gguf", out_type=out_type, progress=False)
            got = ref.logits(path, prompt)
            cells.append(f"{np.abs(got - expected).max() / np.abs(expected).max():.1e}")
            if out_type == "f16":
                greedy = f"{_same_greedy(model, path, prompt[:8])}/30"
        print(f"| {arch} | " + " | ".join(cells) + f" | {greedy} |")


if __name__ == "__main__":
    main()
