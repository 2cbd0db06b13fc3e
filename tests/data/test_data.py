"""Data stage: what is learned token by token, bad input reported by FILE:LINE, packing without leaks."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qlora_lite.data import dataset as data
from qlora_lite.data import formats as data_formats
from qlora_lite.data import packing as data_packing
from qlora_lite.data import tokenize as data_tokenize
from qlora_lite.errors import DataError
from qlora_lite.model.folder import load_tokenizer

ALPACA = {"instruction": "add two numbers", "input": "2 and 3", "output": "5"}
CHAT = {"messages": [
    {"role": "system", "content": "be nice"},
    {"role": "user", "content": "hello, how are you?"},
    {"role": "assistant", "content": "I am fine, thank you."},
    {"role": "user", "content": "add 2 plus 3"},
    {"role": "assistant", "content": "5"},
]}


@pytest.fixture
def tokenizer(tokenizer_dir):
    """The fixture tokenizer as it is saved: chat template, eos "</s>", no pad token."""
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture
def pad_eos_tokenizer(tiny_llama):
    """The tokenizer the trainer uses: model.folder.load_tokenizer sets pad = eos when the model has none."""
    tokenizer = load_tokenizer(tiny_llama)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    return tokenizer


def write_jsonl(path, rows):
    path.write_bytes(b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows))
    return path


def learned_runs(tokenizer, example):
    """Decoded text of each contiguous run of labelled tokens; also checks labels agree with the ids."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        assert label in (token, -100)
        if label == -100 and current:
            runs.append(tokenizer.decode(current))
            current = []
        elif label != -100:
            current.append(token)
    return runs + ([tokenizer.decode(current)] if current else [])


@pytest.mark.parametrize("record", [ALPACA, {"instruction": "add two numbers", "output": "2 plus 3 equals 5"}])
def test_alpaca_learns_only_response_and_eos(tokenizer, record):
    example = data_tokenize.tokenize_example(record, tokenizer, "alpaca")
    prompt, response = data_tokenize.render_example(record, tokenizer, "alpaca")
    assert prompt.endswith("### Response:\n") and ("### Input:\n2 and 3" in prompt) == ("input" in record)
    assert learned_runs(tokenizer, example) == [response + "</s>"]
    prompt_ids = data_tokenize.encode_prompt(prompt, tokenizer, "alpaca")
    assert example["input_ids"][:len(prompt_ids)] == prompt_ids
    assert set(example["labels"][:len(prompt_ids)]) == {-100}
    assert tokenizer.decode(example["input_ids"]) == prompt + response + "</s>"


def test_chat_learns_every_assistant_turn_with_its_end_of_turn(tokenizer):
    example = data_tokenize.tokenize_example(CHAT, tokenizer, "chat")
    assert learned_runs(tokenizer, example) == ["I am fine, thank you.</s>", "5</s>"]
    prompt, response = data_tokenize.render_example(CHAT, tokenizer, "chat")
    assert prompt.endswith("add 2 plus 3<|assistant|>\n") and "I am fine, thank you.</s>" in prompt
    assert response == "5"
    prompt_ids = data_tokenize.encode_prompt(prompt, tokenizer, "chat")
    assert example["input_ids"][:len(prompt_ids)] == prompt_ids
    assert example["input_ids"][-1] == tokenizer.eos_token_id  # the template's EOS is not doubled
    alone = {"messages": [{"role": "assistant", "content": "hello"}]}  # no prompt at all: the header is not learned
    assert learned_runs(tokenizer, data_tokenize.tokenize_example(alone, tokenizer, "chat")) == ["hello</s>"]
    assert data_tokenize.render_example(alone, tokenizer, "chat") == ("<|assistant|>\n", "hello")


def test_text_learns_everything_and_train_on_inputs_learns_prompt(tokenizer):
    example = data_tokenize.tokenize_example({"text": "The quick brown fox"}, tokenizer, "text")
    assert learned_runs(tokenizer, example) == ["The quick brown fox</s>"]
    for fmt, record in (("alpaca", ALPACA), ("chat", CHAT)):
        full = data_tokenize.tokenize_example(record, tokenizer, fmt, train_on_inputs=True)
        assert full["labels"] == full["input_ids"]
        assert full["input_ids"] == data_tokenize.tokenize_example(record, tokenizer, fmt)["input_ids"]


def sentencepiece_style_tokenizer():
    """A Metaspace BPE (like Llama 2 / Mistral): a text tokenized alone gets a leading "▁" (space);
    trained so that "Response:\n5" is a single token."""
    from tiny_models import CORPUS
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=["\n"])
    tok.train_from_iterator(CORPUS + ["### Response:\n5"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece-style"])
def test_prompt_tokens_stay_exact_when_bpe_would_merge_across_the_boundary(tokenizer, kind):
    # Tokenized as one text, the last prompt token would swallow the start of the response
    # (" 5", "Response:\n5"). The prompt must still tokenize exactly as at generation time, and
    # the response must not gain a space (SentencePiece prefixes a text tokenized alone with one).
    tokenizer = tokenizer if kind == "byte-level" else sentencepiece_style_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}Input: {{ m['content'] }} "
                               "Response:{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
                               "{% if add_generation_prompt %} {% endif %}")
    chat = {"messages": [{"role": "user", "content": "2 and 3"}, {"role": "assistant", "content": "5"}]}
    cases = [("chat", chat)] + ([("alpaca", {"instruction": "add", "output": "5 plus 3"})] if kind != "byte-level" else [])
    for fmt, record in cases:
        prompt, response = data_tokenize.render_example(record, tokenizer, fmt)
        prompt_ids = data_tokenize.encode_prompt(prompt, tokenizer, fmt)
        whole = tokenizer(prompt + response, add_special_tokens=False)["input_ids"]
        assert whole[:len(prompt_ids)] != prompt_ids  # the merge really happens
        example = data_tokenize.tokenize_example(record, tokenizer, fmt)
        assert example["input_ids"][:len(prompt_ids)] == prompt_ids
        assert learned_runs(tokenizer, example) == [response + "</s>"]
        assert tokenizer.decode(example["input_ids"]) == prompt + response + "</s>"


def test_template_that_rewrites_earlier_turns_learns_the_last_turn(tokenizer):
    # Like Qwen3: the final assistant turn is rendered with an (empty) thinking block, earlier
    # ones without, so an earlier turn cannot be located in the whole conversation.
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{% if m['role'] == 'assistant' and loop.last %}<think></think>"
        "{% endif %}{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    with pytest.warns(UserWarning, match="renders earlier turns differently"):
        example = data_tokenize.tokenize_example(CHAT, tokenizer, "chat")
    assert learned_runs(tokenizer, example) == ["<think></think>5</s>"]
    with pytest.raises(DataError, match="missing field 'output'"):
        data_tokenize.render_example({"instruction": "a"}, tokenizer, "alpaca")


def test_default_chat_template_when_tokenizer_has_none(tokenizer):
    tokenizer.chat_template = None
    example = data_tokenize.tokenize_example(CHAT, tokenizer, "chat")
    assert learned_runs(tokenizer, example) == ["I am fine, thank you.</s>", "5</s>"]
    prompt, _ = data_tokenize.render_example(CHAT, tokenizer, "chat")
    assert prompt.startswith("<|im_start|>system\nbe nice</s>") and prompt.endswith("<|im_start|>assistant\n")


def test_bos_added_once(tokenizer):
    from tokenizers.processors import TemplateProcessing

    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    assert tokenizer("a")["input_ids"][0] == 1  # this tokenizer now adds BOS by itself
    alpaca = data_tokenize.tokenize_example(ALPACA, tokenizer, "alpaca")
    assert alpaca["input_ids"][0] == 1 and alpaca["input_ids"].count(1) == 1
    tokenizer.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    chat = data_tokenize.tokenize_example(CHAT, tokenizer, "chat")
    assert chat["input_ids"][0] == 1 and chat["input_ids"].count(1) == 1


def test_eos_stays_labelled_when_pad_is_eos(pad_eos_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [ALPACA, {"instruction": "hello", "output": "I am fine, thank you."}])
    examples, _ = data.load_dataset(path, pad_eos_tokenizer)
    batch = data_packing.collate(examples, pad_eos_tokenizer.pad_token_id)
    eos = pad_eos_tokenizer.eos_token_id
    lengths = [len(e["input_ids"]) for e in examples]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, max(lengths))
    for row, n in enumerate(lengths):
        assert batch["labels"][row, n - 1] == eos and batch["input_ids"][row, n - 1] == eos
        assert (batch["labels"][row, n:] == -100).all() and (batch["input_ids"][row, n:] == eos).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)


def test_truncate_or_drop_long_examples(tokenizer, tmp_path):
    long_output = "the quick brown fox jumps over the lazy dog " * 4
    rows = [ALPACA, {**ALPACA, "output": long_output}, {**ALPACA, "instruction": "x " * 80}, {**ALPACA, "output": " "}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    short = len(data_tokenize.tokenize_example(ALPACA, tokenizer, "alpaca")["input_ids"])
    full_long = data_tokenize.tokenize_example(rows[1], tokenizer, "alpaca")
    max_len = short + 5  # the long response gets cut; the long prompt leaves no response at all
    examples, stats = data.load_dataset(path, tokenizer, max_seq_len=max_len)
    assert (stats.total, stats.kept, stats.truncated, stats.dropped_too_long, stats.empty) == (4, 2, 1, 1, 1)
    assert examples[1]["input_ids"] == full_long["input_ids"][:max_len]
    assert examples[1]["labels"] == full_long["labels"][:max_len]
    assert stats.summary() == "kept 2 of 4 (alpaca): 1 truncated, 1 dropped (too long), 1 empty"
    examples, stats = data.load_dataset(path, tokenizer, max_seq_len=max_len, drop_long=True)
    assert (stats.kept, stats.truncated, stats.dropped_too_long) == (1, 0, 2)
    assert examples[0]["input_ids"] == data_tokenize.tokenize_example(ALPACA, tokenizer, "alpaca")["input_ids"]


BAD_ROWS = [ALPACA] * 4 + [b'{"instruction": "a", "output": }', ALPACA, {"instruction": "a"}, ALPACA,
                           b'{"instruction": "caf\xe9", "output": "b"}']


def test_bad_lines_are_all_reported_with_file_and_line(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", BAD_ROWS)
    with pytest.raises(DataError) as error:
        data.load_dataset(path, tokenizer)
    lines = str(error.value).splitlines()
    assert lines[1].startswith(f"{path}:5: invalid JSON")
    assert lines[2] == f"{path}:7: missing field 'output'"
    assert lines[3].startswith(f"{path}:9: invalid UTF-8")
    assert len(lines) == 4 and "--skip-bad-lines" in lines[0]
    with pytest.raises(DataError, match=":9: invalid UTF-8"):
        data_formats.read_jsonl(path)


def test_skip_bad_lines_loads_the_rest_and_reports(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", BAD_ROWS)
    examples, stats = data.load_dataset(path, tokenizer, skip_bad_lines=True)
    assert (stats.total, stats.kept, len(examples)) == (9, 6, 6)
    assert [s.split(": ")[0] for s in stats.skipped_lines] == [f"{path}:5", f"{path}:7", f"{path}:9"]
    assert stats.summary().endswith("3 skipped (bad lines)")


def test_windows_line_endings_bom_and_blank_lines_are_fine(tokenizer, tmp_path):
    path = tmp_path / "win.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(ALPACA).encode() + b"\r\n\r\n" + json.dumps(ALPACA).encode() + b"\r\n")
    examples, stats = data.load_dataset(path, tokenizer)
    assert (stats.total, stats.kept, stats.format) == (2, 2, "alpaca")
    assert examples[0] == data_tokenize.tokenize_example(ALPACA, tokenizer, "alpaca")


def test_empty_and_all_too_long_raise_with_counts(tokenizer, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match="empty"):
        data.load_dataset(empty, tokenizer)
    path = write_jsonl(tmp_path / "long.jsonl", [ALPACA, ALPACA, {"instruction": "a", "output": ""}])
    with pytest.raises(DataError) as error:
        data.load_dataset(path, tokenizer, max_seq_len=8, drop_long=True)
    message = str(error.value)
    assert "no usable example among 3" in message and "2 longer than max_seq_len=8" in message
    assert "1 empty" in message
    bad = write_jsonl(tmp_path / "bad.jsonl", [b"{", {"instruction": "a"}])
    with pytest.raises(DataError, match="no usable example among 2 .*2 skipped bad lines"):
        data.load_dataset(bad, tokenizer, skip_bad_lines=True)


def test_format_detection_and_clear_errors(tokenizer, tmp_path):
    assert data_formats.detect_format([(1, ALPACA), (2, {"instruction": "a"}), (3, {"text": "b"})], "f") == "alpaca"
    assert data_formats.detect_format([CHAT], "f") == "chat"
    with pytest.raises(DataError, match="cannot detect the data format.*'prompt'"):
        data_formats.detect_format([(1, {"prompt": "a", "completion": "b"})], "f.jsonl")
    assert data_formats.validate_record({"messages": [{"role": "user", "content": 3}]}, "chat") == \
        "messages[0].content must be a string, got a number"
    assert "last message must be from the assistant" in data_formats.validate_record(
        {"messages": [{"role": "user", "content": "hi"}]}, "chat")
    path = write_jsonl(tmp_path / "chat.jsonl", [CHAT])
    with pytest.raises(DataError, match=f"{path}:1: missing field 'instruction'"):
        data.load_dataset(path, tokenizer, format="alpaca")
    tokenizer.chat_template = "{{ raise_exception('roles must alternate user/assistant') }}"
    with pytest.raises(DataError, match=f"{path}:1: cannot render the example .*roles must alternate"):
        data.load_dataset(path, tokenizer)


def test_split_eval_is_deterministic_and_disjoint():
    examples = [{"input_ids": [i], "labels": [i]} for i in range(20)]
    train, held = data.split_eval(examples, 0.2, seed=3)
    assert len(held) == 4 and len(train) == 16
    assert sorted(e["input_ids"][0] for e in train + held) == list(range(20))
    assert data.split_eval(examples, 0.2, seed=3) == (train, held)
    assert data.split_eval(examples, 0.2, seed=4)[1] != held
    assert data.split_eval(examples, 0.0, seed=3) == (examples, [])


def test_packing_restarts_positions_and_masks_boundaries():
    examples = [{"input_ids": list(range(100 * k, 100 * k + n)), "labels": list(range(100 * k, 100 * k + n))}
                for k, n in enumerate([5, 3, 7, 2, 6, 4])]
    packs = data_packing.pack_examples(examples, max_seq_len=10)
    assert len(packs) == 3 and all(len(p["input_ids"]) <= 10 for p in packs)
    seen = []
    for pack in packs:
        assert len(pack["input_ids"]) == len(pack["labels"]) == len(pack["position_ids"])
        starts = [i for i, pos in enumerate(pack["position_ids"]) if pos == 0]
        for a, b in zip(starts, starts[1:] + [len(pack["input_ids"])]):
            assert pack["position_ids"][a:b] == list(range(b - a))
            assert pack["labels"][a] == -100 and pack["labels"][a + 1:b] == pack["input_ids"][a + 1:b]
            seen.append(pack["input_ids"][a:b])
    assert sorted(seen) == sorted(e["input_ids"] for e in examples)
    batch = data_packing.collate(packs, pad_token_id=0)
    assert "attention_mask" not in batch and batch["position_ids"].shape == batch["input_ids"].shape
    with pytest.raises(ValueError, match="more than max_seq_len"):
        data_packing.pack_examples(examples, max_seq_len=6)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_gives_same_logits_as_separate_examples(tiny_llama, pad_eos_tokenizer, tmp_path, attn):
    rows = [ALPACA, CHAT, {"text": "The quick brown fox jumps over the lazy dog."},
            {"instruction": "hello", "output": "I am fine, thank you."}, {"text": "0 1 2 3 4 5"}]
    paths = []
    for i, row in enumerate(rows):
        paths.append(write_jsonl(tmp_path / f"{i}.jsonl", [row]))
    examples = [data.load_dataset(p, pad_eos_tokenizer)[0][0] for p in paths]
    longest = max(len(e["input_ids"]) for e in examples)
    packs = data_packing.pack_examples(examples, max_seq_len=longest + 40)
    assert len(packs) < len(examples)  # several examples really share a sequence
    batch = data_packing.collate(packs, pad_eos_tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32, attn_implementation=attn)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        separate = {tuple(e["input_ids"]): model(input_ids=torch.tensor([e["input_ids"]])).logits[0]
                    for e in examples}
    compared = 0
    for row, pack in enumerate(packs):
        starts = [i for i, pos in enumerate(pack["position_ids"]) if pos == 0] + [len(pack["input_ids"])]
        for a, b in zip(starts, starts[1:]):
            expected = separate[tuple(pack["input_ids"][a:b])]
            torch.testing.assert_close(packed[row, a:b], expected, atol=1e-4, rtol=1e-4)
            compared += 1
    assert compared == len(examples)


@pytest.mark.parametrize("fmt", ["text", "alpaca", "chat"])
def test_huge_line_is_tokenized_only_as_far_as_max_seq_len(tokenizer, tmp_path, monkeypatch, fmt):
    """A 4 MB line costs what max_seq_len tokens cost, and gives exactly the tokens of the whole line."""
    words = ("the quick brown fox jumps over the lazy dog " * 100_000)[:4_000_000]
    record = {"text": words} if fmt == "text" else dict(ALPACA, output=words) if fmt == "alpaca" else {
        "messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": words}]}
    small = dict(record)
    key = {"text": "text", "alpaca": "output"}.get(fmt)
    if key:
        small[key] = words[:20_000]
    else:
        small["messages"] = [record["messages"][0], {"role": "assistant", "content": words[:20_000]}]
    exact = {k: v[:256] for k, v in data_tokenize.tokenize_example(small, tokenizer, fmt).items()}
    seen = []
    real = type(tokenizer).__call__

    def spy(self, text, *args, **kwargs):
        seen.append(len(text))
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", spy)
    examples, stats = data.load_dataset(write_jsonl(tmp_path / "d.jsonl", [record]), tokenizer, max_seq_len=256)
    assert max(seen) <= data_tokenize.char_bound(tokenizer, 256) + 1000  # + the template around the text
    assert examples == [exact] and stats.truncated == 1
