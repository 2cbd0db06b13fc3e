"""llama.cpp (through llama-cpp-python) as the reference reader of our GGUF files.

Every helper takes the GGUF path and loads it fresh, on the CPU, with one thread, so numbers do not
depend on what ran before. Token ids go in as they are: nothing (no BOS) is added.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def load(path: str | Path, n_ctx: int = 256):
    """``llama_cpp.Llama`` for ``path`` keeping the logits of every position."""
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=1, n_threads_batch=1,
                           logits_all=True, n_gpu_layers=0, verbose=False)


def logits(path: str | Path, ids: list[int], n_ctx: int = 256) -> np.ndarray:
    """Logits (len(ids), vocab) llama.cpp computes for ``ids`` in one batch, as float32."""
    llm = load(path, n_ctx)
    llm.eval(list(ids))
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def generate(path: str | Path, ids: list[int], n: int, n_ctx: int = 256) -> tuple[list[int], np.ndarray]:
    """Greedy decoding: ``ids`` in one batch, then ``n`` tokens by argmax, each evaluated on its own
    (through the KV cache, as llama.cpp generates).

    Returns:
        The ``n`` picked ids and the logits (len(ids) + n - 1, vocab) of every position that led to them.
    """
    llm = load(path, n_ctx)
    llm.eval(list(ids))
    picked = []
    for step in range(n):
        picked.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        if step < n - 1:
            llm.eval([picked[-1]])
    return picked, np.array(llm.scores[: llm.n_tokens], dtype=np.float32)


def greedy(path: str | Path, ids: list[int], n: int, n_ctx: int = 256) -> list[int]:
    """The ``n`` token ids llama.cpp picks after ``ids`` by argmax (``generate`` without the logits)."""
    return generate(path, ids, n, n_ctx)[0]


def tokenize(path: str | Path, text: str, add_bos: bool | None = False) -> list[int]:
    """llama.cpp's token ids for ``text`` (special tokens parsed), from the GGUF file's vocabulary;
    ``add_bos=None``: a BOS only where the file says to add one (``tokenizer.ggml.add_bos_token``),
    as llama.cpp's own tools tokenize a prompt."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    if add_bos is None:
        add_bos = bool(llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(llm.model)))
    return llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)
