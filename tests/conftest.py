"""Tiny models and a locally trained tokenizer, built once per test session (never downloaded)."""

from __future__ import annotations

import contextlib
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No tokenized-data cache in ~/.cache: tests that count tokenizer calls would see hits from other
# tests' identical data; the cache's own tests name their folder.
os.environ.setdefault("QLORA_LITE_CACHE", "none")
# Tiny matmuls gain nothing from a second thread, and on 2 shared cores spinning thread pools only
# cost; one thread also gives every process of a test (subprocesses too) the same numerics.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from tiny_models import ARCHS, make_tiny_model, train_tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory, tokenizer_dir):
    """``factory(arch, shards=1)`` -> folder with a random tiny model of that architecture + tokenizer."""
    made = {}

    def factory(arch: str = "llama", shards: int = 1):
        if (arch, shards) not in made:
            folder = tmp_path_factory.mktemp(f"{arch}-{shards}")
            made[arch, shards] = make_tiny_model(arch, folder, tokenizer_dir, shards=shards)
        return made[arch, shards]

    return factory


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_factory):
    return tiny_model_factory("llama")


@pytest.fixture(params=ARCHS)
def any_arch(request):
    return request.param


@pytest.fixture
def ctrl_c_after(monkeypatch):
    """``with ctrl_c_after(k): ...``: the training run inside gets Ctrl-C right after optimizer step ``k``
    (its checkpoint, if one is due, already written), as a user would press it."""
    from qlora_lite.train import loop

    @contextlib.contextmanager
    def pressed(step: int):
        real = loop._Loop._next_step

        def next_step(self, bar):
            real(self, bar)
            if self.step == step:
                raise KeyboardInterrupt

        with monkeypatch.context() as patched:
            patched.setattr(loop._Loop, "_next_step", next_step)
            yield

    return pressed
