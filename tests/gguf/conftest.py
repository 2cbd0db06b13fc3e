"""Fixtures of the GGUF tests."""

import os

import pytest
import torch
from tiny_models import logits, lora_targets, make_adapter, probe

from qlora_lite.merge.write import merge_adapter


@pytest.fixture(scope="session")
def llama_cpp():
    """The ``llama_cpp`` module (llama-cpp-python): skipped where it is not installed, except in CI
    (env ``CI`` set), where a missing llama.cpp fails the test instead of hiding it."""
    if os.environ.get("CI"):
        import llama_cpp

        return llama_cpp
    return pytest.importorskip("llama_cpp")


@pytest.fixture(scope="session")
def merged(tiny_model_factory, tmp_path_factory):
    """Per architecture: base, adapter and the fp32 merged folder (the reference for the GGUF files)."""
    made = {}

    def get(arch):
        if arch not in made:
            root = tmp_path_factory.mktemp(f"gguf-{arch}")
            base = tiny_model_factory(arch)
            adapter = make_adapter(base, root / "adapter", targets=lora_targets(arch))
            merge_adapter(base, adapter, root / "merged", dtype="fp32", verify=False, progress=False)
            made[arch] = base, adapter, root / "merged"
        return made[arch]

    return get


@pytest.fixture(scope="session")
def reference_logits(merged):
    """Per architecture: probe logits of the fp32 merged model and of the base alone (computed once)."""
    from transformers import AutoModelForCausalLM

    cache = {}

    def get(arch):
        if arch not in cache:
            base, _, merged_dir = merged(arch)
            load = lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)  # noqa: E731
            cache[arch] = logits(load(merged_dir), probe()), logits(load(base), probe())
        return cache[arch]

    return get
