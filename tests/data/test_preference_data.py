"""Preference pairs: detection, FILE:LINE validation, the prompt mask and the truncation rules."""

from __future__ import annotations

import json

import pytest

from qlora_lite.data.dataset import load_dataset
from qlora_lite.data.formats import detect_format
from qlora_lite.data.preference import load_preference_dataset
from qlora_lite.errors import DataError
from qlora_lite.model.folder import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return load_tokenizer(tiny_llama)


def write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


CHAT = {"prompt": [{"role": "user", "content": "is 4 even"}], "chosen": "yes", "rejected": "no"}
TEXT = {"prompt": "is 4 even? ", "chosen": "yes", "rejected": "no"}


def test_pairs_are_detected_and_sft_points_to_the_method(tmp_path, tokenizer):
    path = write(tmp_path / "p.jsonl", [CHAT, TEXT])
    assert detect_format([CHAT, TEXT], path) == "preference"
    with pytest.raises(DataError, match="--method dpo or --method orpo"):
        load_dataset(path, tokenizer)
    sft = write(tmp_path / "sft.jsonl", [{"text": "hello"}])
    with pytest.raises(DataError, match="holds text examples; train those with --method sft"):
        load_preference_dataset(sft, tokenizer)


@pytest.mark.parametrize("record", [CHAT, TEXT], ids=["chat", "text"])
def test_both_sides_share_the_prompt_and_only_responses_are_labelled(tmp_path, tokenizer, record):
    (pair,), stats = load_preference_dataset(write(tmp_path / "p.jsonl", [record]), tokenizer)
    n = pair["prompt_len"]
    assert stats.kept == 1 and n > 3
    assert pair["chosen_input_ids"][:n] == pair["rejected_input_ids"][:n]
    for side, text in (("chosen", "yes"), ("rejected", "no")):
        ids, labels = pair[f"{side}_input_ids"], pair[f"{side}_labels"]
        assert labels[:n] == [-100] * n and labels[n:] == ids[n:]
        assert ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids[n:-1]).strip() == text
    if record is CHAT:  # the prompt is the template's, with the generation prompt
        prompt = tokenizer.apply_chat_template(CHAT["prompt"], tokenize=False, add_generation_prompt=True)
        assert tokenizer.decode(pair["chosen_input_ids"][:n]) == prompt


def test_a_response_given_as_the_whole_conversation_equals_the_reply_alone(tmp_path, tokenizer):
    full = {**CHAT, "chosen": CHAT["prompt"] + [{"role": "assistant", "content": "yes"}],
            "rejected": [{"role": "assistant", "content": "no"}]}
    (a,), _ = load_preference_dataset(write(tmp_path / "a.jsonl", [CHAT]), tokenizer)
    (b,), _ = load_preference_dataset(write(tmp_path / "b.jsonl", [full]), tokenizer)
    assert a == b


def test_every_bad_line_is_reported_with_file_and_line(tmp_path, tokenizer):
    long_prompt = {"prompt": "word " * 200, "chosen": "a", "rejected": "b"}
    path = write(tmp_path / "bad.jsonl", [
        CHAT,
        {"prompt": "x", "chosen": "a"},
        {"prompt": "x", "chosen": "same", "rejected": "same"},
        {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "asistant", "content": "a"}],
         "rejected": "b"},
        long_prompt,
        "not json",
    ])
    with pytest.raises(DataError) as e:
        load_preference_dataset(path, tokenizer, max_seq_len=64)
    message = str(e.value)
    assert "5 bad line(s)" in message
    assert f"{path}:2: missing field(s) 'rejected'" in message
    assert f"{path}:3: chosen and rejected are the same response" in message
    assert f"{path}:4: chosen: messages[1].role 'asistant'" in message and "did you mean 'assistant'" in message
    assert f"{path}:5: the prompt has" in message and "--max-seq-len 64" in message
    assert f"{path}:6: invalid JSON" in message
    pairs, stats = load_preference_dataset(path, tokenizer, max_seq_len=64, skip_bad_lines=True)
    assert len(pairs) == 1 and len(stats.skipped_lines) == 5


def test_long_responses_are_cut_keeping_the_prompt_or_dropped_with_drop_long(tmp_path, tokenizer):
    long = {**TEXT, "chosen": "yes " * 100, "rejected": "no"}
    path = write(tmp_path / "long.jsonl", [long, TEXT])
    pairs, stats = load_preference_dataset(path, tokenizer, max_seq_len=32)
    assert stats.truncated == 1 and len(pairs) == 2
    cut = pairs[0]
    assert len(cut["chosen_input_ids"]) == 32 and cut["chosen_labels"][-1] != -100
    assert cut["rejected_input_ids"][-1] == tokenizer.eos_token_id  # the short side is untouched
    pairs, stats = load_preference_dataset(path, tokenizer, max_seq_len=32, drop_long=True)
    assert stats.dropped_too_long == 1 and len(pairs) == 1
    # cut to the same tokens, a pair has nothing left to prefer: dropped, not trained as a tie
    same_start = {**TEXT, "chosen": "yes " * 100 + "a", "rejected": "yes " * 100 + "b"}
    pairs, stats = load_preference_dataset(write(tmp_path / "tie.jsonl", [same_start, TEXT]), tokenizer,
                                           max_seq_len=32)
    assert stats.dropped_too_long == 1 and len(pairs) == 1
