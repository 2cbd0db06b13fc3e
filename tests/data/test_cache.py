"""The tokenized-data cache: a second load tokenizes nothing and gives the same examples; any change that
could change a token misses; the file is safetensors (no pickle); a damaged one is tokenized again."""

import json
import struct

import pandas as pd
import pytest
from transformers import AutoTokenizer

from qlora_lite.data import cache
from qlora_lite.data import dataset as data

ROWS = [{"instruction": f"add {a} and {b}", "output": f"{a} plus {b} is {a + b}"} for a in range(5) for b in range(4)]


@pytest.fixture
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture
def calls(tokenizer, monkeypatch):
    """The number of tokenizer calls so far (a list, so the test reads it as it grows)."""
    seen = []
    real = type(tokenizer).__call__

    def spy(self, *args, **kwargs):
        seen.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", spy)
    return seen


def test_second_load_tokenizes_nothing_and_gives_the_same_examples(tokenizer, tmp_path, calls):
    path = tmp_path / "d.parquet"
    pd.DataFrame(ROWS + [{"instruction": "x", "output": " "}]).to_parquet(path)
    first, stats = data.load_dataset(path, tokenizer, max_seq_len=256, cache_dir=tmp_path / "cache")
    tokenized = len(calls)
    assert tokenized > 0 and not stats.from_cache
    (file,) = (tmp_path / "cache").glob("*.safetensors")
    header_size = struct.unpack("<Q", file.read_bytes()[:8])[0]  # safetensors: a JSON header, then raw tensors
    header = json.loads(file.read_bytes()[8:8 + header_size])
    assert set(header) == {"__metadata__", "input_ids", "labels", "offsets"}
    again, cached_stats = data.load_dataset(path, tokenizer, max_seq_len=256, cache_dir=tmp_path / "cache")
    assert len(calls) == tokenized  # not one tokenizer call
    assert again == first and cached_stats.from_cache
    assert (cached_stats.kept, cached_stats.empty, cached_stats.summary()) == (20, 1, stats.summary())


def test_changed_data_template_or_settings_miss_the_cache(tokenizer, tmp_path, calls):
    path, folder = tmp_path / "d.jsonl", tmp_path / "cache"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))

    def load(**kwargs):
        before = len(calls)
        examples, stats = data.load_dataset(path, tokenizer, cache_dir=folder, **kwargs)
        return examples, stats.from_cache, len(calls) > before

    assert load()[1:] == (False, True)
    assert load()[1:] == (True, False)
    assert load(max_seq_len=256)[1:] == (False, True)
    assert load(train_on_inputs=True)[1:] == (False, True)
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:-1]))  # one record fewer
    examples, hit, _ = load()
    assert not hit and len(examples) == len(ROWS) - 1
    chat = tmp_path / "c.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    assert not data.load_dataset(chat, tokenizer, cache_dir=folder)[1].from_cache
    assert data.load_dataset(chat, tokenizer, cache_dir=folder)[1].from_cache
    tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
    examples, stats = data.load_dataset(chat, tokenizer, cache_dir=folder)
    assert not stats.from_cache and tokenizer.decode(examples[0]["input_ids"]).startswith("[user] hi")


def test_damaged_cache_file_is_tokenized_again_and_replaced(tokenizer, tmp_path, caplog):
    path, folder = tmp_path / "d.jsonl", tmp_path / "cache"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    expected, _ = data.load_dataset(path, tokenizer, cache_dir=folder)
    (file,) = folder.glob("*.safetensors")
    file.write_bytes(file.read_bytes()[:-7])
    examples, stats = data.load_dataset(path, tokenizer, cache_dir=folder)
    assert examples == expected and not stats.from_cache and "unreadable" in caplog.text
    assert data.load_dataset(path, tokenizer, cache_dir=folder)[1].from_cache


def test_cache_folder_setting(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "here"))
    assert cache.resolve_cache_dir("auto") == tmp_path / "here"
    assert cache.resolve_cache_dir("none") is None and cache.resolve_cache_dir(str(tmp_path)) == tmp_path
    monkeypatch.delenv(cache.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.resolve_cache_dir("auto") == tmp_path / "xdg" / "qlora-lite" / "tokenized"
