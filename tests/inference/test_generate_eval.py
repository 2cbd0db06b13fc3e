"""`qlora-lite generate` and `qlora-lite eval`: prompts, streaming, chat loop, exact-match, --json."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from qlora_lite.cli import main
from qlora_lite.config import DEMO_MODEL
from qlora_lite.inference.evaluate import evaluate_jsonl, exact_match
from qlora_lite.inference.generate import greedy_answers, load_for_inference, prompt_ids
from qlora_lite.model.folder import resolve_model_dir


def chat_record(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def demo_fp32():
    """The bundled demo model in 16-bit layers with fp32 compute: greedy answers free of bf16 ties."""
    return load_for_inference(str(DEMO_MODEL), bits=16, compute_dtype="fp32")


def test_demo_shortcut_names_the_bundled_model():
    assert resolve_model_dir("demo") == DEMO_MODEL


def test_generate_prompt_streams_a_deterministic_greedy_reply(tiny_llama):
    runner = CliRunner()
    args = ["generate", "--model", str(tiny_llama), "--prompt", "hello", "--max-new-tokens", "6"]
    first = runner.invoke(main, args)
    second = runner.invoke(main, args)
    assert first.exit_code == 0, first.output
    assert first.output.strip() and first.output == second.output


def test_generate_sampling_is_reproducible_with_a_seed(tiny_llama):
    runner = CliRunner()
    args = ["generate", "--model", str(tiny_llama), "--prompt", "hello", "--max-new-tokens", "8",
            "--temperature", "1.5", "--top-k", "0", "--seed"]
    a, b = runner.invoke(main, args + ["1"]), runner.invoke(main, args + ["1"])
    assert a.exit_code == 0, a.output
    assert a.output == b.output


def test_generate_chat_reads_stdin_until_exit():
    runner = CliRunner()
    stdin = "Repeat the words: red cat big\nexit\nRepeat the words: blue dog\n"
    result = runner.invoke(main, ["generate", "--model", "demo", "--max-new-tokens", "8"], input=stdin)
    assert result.exit_code == 0, result.output
    assert "red cat big" in result.output
    assert "blue dog" not in result.output  # nothing after `exit` is answered


def test_generate_reports_a_missing_model_folder(tmp_path):
    result = CliRunner().invoke(main, ["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"])
    assert result.exit_code != 0
    assert "does not exist" in result.output


def test_batched_greedy_answers_equal_one_by_one(demo_fp32):
    model, tokenizer = demo_fp32
    questions = ["Repeat the words: red cat", "What is two plus five?", "Name the last word: cup hat dog egg",
                 "What number comes after seven?"]
    prompts = [prompt_ids(tokenizer, tokenizer.apply_chat_template(
        [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)) for q in questions]
    batched = greedy_answers(model, tokenizer, prompts, max_new_tokens=8, batch_size=4)
    single = [greedy_answers(model, tokenizer, [p], max_new_tokens=8)[0] for p in prompts]
    assert batched == single


def test_exact_match_counts_stripped_answers(demo_fp32):
    model, tokenizer = demo_fp32

    def pair(question, answer):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                               add_generation_prompt=True)
        return prompt, answer

    # The base model was pretrained to repeat words, so these must all match ...
    known = [pair(f"Repeat the words: {w}", w) for w in ("red cat big", "blue dog", "tiny green frog hat")]
    result = exact_match(model, tokenizer, known)
    assert (result["correct"], result["total"], result["exact_match"]) == (3, 3, 1.0)
    # ... and a wrong expected answer must not.
    result = exact_match(model, tokenizer, [pair("Repeat the words: red cat big", "big cat red")])
    assert result["correct"] == 0 and result["samples"][0]["got"] == "red cat big"


def test_evaluate_jsonl_on_alpaca_and_text(tiny_llama, tmp_path):
    model, tokenizer = load_for_inference(str(tiny_llama), bits=4)
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "add", "input": "2 and 3", "output": "5"}] * 3)
    result = evaluate_jsonl(model, tokenizer, alpaca)
    assert result["format"] == "alpaca" and result["total"] == 3 and math.isfinite(result["eval_loss"])
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "The quick brown fox jumps over the lazy dog."}] * 2)
    result = evaluate_jsonl(model, tokenizer, text)
    assert result["format"] == "text" and "exact_match" not in result
    assert result["eval_ppl"] == pytest.approx(math.exp(result["eval_loss"]))


def test_eval_json_output_parses_and_adapter_changes_the_loss(tiny_llama, tmp_path):
    from qlora_lite.model.adapter import save_adapter
    from qlora_lite.model.loading import load_base_model
    from qlora_lite.model.lora import inject_lora, lora_layers

    data = write_jsonl(tmp_path / "d.jsonl", [chat_record("Add 2 and 3", "5"), chat_record("hello", "hi there")])
    runner = CliRunner()
    base = runner.invoke(main, ["eval", "--model", str(tiny_llama), "--data", str(data), "--json"])
    assert base.exit_code == 0, base.output
    report = json.loads(base.output.strip().splitlines()[-1])
    assert report["examples"] == 2 and report["total"] == 2 and 0.0 <= report["exact_match"] <= 1.0
    assert report["eval_ppl"] == pytest.approx(math.exp(report["eval_loss"]))

    model = load_base_model(tiny_llama, bits=4)
    torch.manual_seed(0)
    inject_lora(model, "all-linear", rank=4, alpha=8.0, dropout=0.0, rslora=False, lora_dtype=torch.bfloat16)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.5)  # a non-zero update, as after training
    save_adapter(model, tmp_path / "adapter")
    tuned = runner.invoke(main, ["eval", "--model", str(tiny_llama), "--adapter", str(tmp_path / "adapter"),
                                 "--data", str(data), "--json", "--no-exact-match"])
    assert tuned.exit_code == 0, tuned.output
    tuned_report = json.loads(tuned.output.strip().splitlines()[-1])
    assert "exact_match" not in tuned_report
    assert tuned_report["eval_loss"] != pytest.approx(report["eval_loss"], rel=1e-3)


def test_eval_reports_bad_data_with_file_and_line(tiny_llama, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(chat_record("a", "b")) + "\n{not json\n")
    result = CliRunner().invoke(main, ["eval", "--model", str(tiny_llama), "--data", str(bad)])
    assert result.exit_code != 0
    assert f"{bad}:2" in result.output


def test_chat_history_is_trimmed_oldest_first_to_fit_the_context():
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from qlora_lite.cli.generate import _fit

    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
    system = {"role": "system", "content": "Be brief."}
    turns = []
    for i in range(6):
        turns += [{"role": "user", "content": f"Repeat the words: red cat {i}"},
                  {"role": "assistant", "content": f"red cat {i}"}]
    messages = [system] + turns + [{"role": "user", "content": "Repeat the words: last one"}]
    roomy = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=4096))
    assert _fit(tokenizer, messages, roomy, 16) == messages
    tight = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=80))
    kept = _fit(tokenizer, messages, tight, 16)
    assert kept[0] == system and kept[-1] == messages[-1] and len(kept) < len(messages)
    assert kept[1:] == messages[len(messages) - len(kept) + 1:]  # a suffix: the newest turns survive
    prompt = tokenizer.apply_chat_template(kept, tokenize=False, add_generation_prompt=True)
    assert len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) + 16 <= 80


def test_demo_shortcut_names_the_bundled_model_in_every_command(tmp_path):
    """`--model demo` works for train, estimate and friends, not only generate."""
    from qlora_lite.model.folder import resolve_model_dir
    from qlora_lite.train.estimate import read_config

    bundled = Path(__file__).resolve().parents[2] / "qlora_lite" / "demo" / "model"
    assert resolve_model_dir("demo") == bundled.resolve()
    assert read_config("demo")[0]["model_type"] == "llama"


def test_eval_command_reads_a_sharegpt_parquet_file_like_its_chat_jsonl(tiny_llama, tmp_path):
    import pandas as pd

    turns = [("add 2 and 3", "5"), ("add 4 and 1", "5"), ("say hi", "hi")]
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": q},
                                                            {"role": "assistant", "content": a}]} for q, a in turns])
    pd.DataFrame([{"dialog": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in turns]) \
        .to_parquet(tmp_path / "s.parquet")
    results = []
    for args in (["--data", chat], ["--data", tmp_path / "s.parquet", "--field-map", "conversations=dialog"]):
        out = CliRunner().invoke(main, ["eval", "--model", str(tiny_llama), "--bits", "16", "--json",
                                        *map(str, args)])
        assert out.exit_code == 0, out.output
        results.append(json.loads(out.output.strip().splitlines()[-1]))
    assert results[0]["format"] == results[1]["format"] == "chat" and results[1]["total"] == 3
    for key in ("eval_loss", "eval_tokens", "exact_match"):
        assert results[0][key] == results[1][key], key
    bad = CliRunner().invoke(main, ["eval", "--model", str(tiny_llama), "--data", str(chat), "--field-map", "reply"])
    assert bad.exit_code != 0 and "'reply' is not FIELD=COLUMN" in bad.output
