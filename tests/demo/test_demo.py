"""The newcomer path: bundled demo model and data, a shortened `qlora-lite demo`, and generated docs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from qlora_lite.cli import main
from qlora_lite.config import DEMO_DATA, DEMO_MODEL

ROOT = Path(__file__).resolve().parents[2]


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_bundled_model_is_small_safetensors_with_chat_template():
    files = {p.name: p.stat().st_size for p in DEMO_MODEL.iterdir()}
    assert "model.safetensors" in files and "generation_config.json" in files
    assert not [name for name in files if name.endswith((".bin", ".pt", ".pth", ".pkl"))]
    assert sum(files.values()) < 10_000_000
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.startswith(tokenizer.bos_token) and text.endswith("<|assistant|>:")


def test_bundled_model_loads_in_4bit_and_has_its_pretrained_skills():
    from qlora_lite.inference.generate import chat_prompt, generate_reply, load_for_inference, prompt_ids

    model, tokenizer = load_for_inference("demo", bits=4)
    ids = prompt_ids(tokenizer, chat_prompt(tokenizer, [{"role": "user", "content": "Repeat the words: red cat big"}]))
    assert generate_reply(model, tokenizer, ids, max_new_tokens=8).strip() == "red cat big"


def test_demo_data_is_the_seeded_generator_output_with_disjoint_splits():
    train, held = load_tool("build_demo_model").demo_dataset()
    assert read_jsonl(DEMO_DATA / "train.jsonl") == train
    assert read_jsonl(DEMO_DATA / "eval.jsonl") == held
    for name in ("train", "eval"):  # the copies next to the example configs
        assert (ROOT / "examples" / "data" / f"demo_{name}.jsonl").read_text() == (DEMO_DATA / f"{name}.jsonl").read_text()
    questions = {r["messages"][0]["content"] for r in train}
    assert not questions & {r["messages"][0]["content"] for r in held}
    for record in held:
        words = record["messages"][0]["content"].removeprefix("Reverse the words: ").split()
        assert record["messages"][1]["content"] == " ".join(reversed(words))


def test_examples_yaml_load_and_validate():
    from qlora_lite.config import load_config

    files = sorted((ROOT / "examples").glob("*.yaml"))
    assert len(files) >= 5
    for path in files:
        config = load_config(path).validate(required=("model.model", "data.data", "train.output"))
        assert config.model.bits in (4, 8, 16), path
        # every key line is preceded by its help comment
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.startswith("  ") and not line.lstrip().startswith("#"):
                assert lines[i - 1].lstrip().startswith("#"), f"{path.name}:{i + 1} has no comment"


@pytest.mark.parametrize("name, data", [("demo", "demo_train.jsonl"), ("demo-csv", "demo_train.csv")])
def test_demo_yaml_trains_from_any_folder(tmp_path, monkeypatch, one_thread, caplog, name, data):
    """examples/demo*.yaml name the bundled model as `demo` and its data beside them: no hub download.
    The CSV one reads the question/answer columns through its field_map: every row is kept."""
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("INFO", logger="qlora_lite"):
        result = CliRunner().invoke(main, ["train", "--config", str(ROOT / "examples" / f"{name}.yaml"),
                                           "--max-steps", "1", "--output", "out"])
    assert result.exit_code == 0, result.output
    saved = (tmp_path / "out" / "config.yaml").read_text()
    assert "model: demo" in saved and str(ROOT / "examples" / "data" / data) in saved
    expected = "kept 2000 of 2000 (chat)" if name == "demo" else "kept 2000 of 2000 (alpaca)"
    assert f"train data {ROOT / 'examples' / 'data' / data}: {expected}" in caplog.text


def test_demo_pairs_are_the_generator_output_and_dpo_yaml_continues_the_demo_sft(tmp_path, monkeypatch, one_thread):
    """examples/dpo.yaml: DPO from the adapter examples/demo.yaml trains (runs/demo in the current
    folder), on pairs tools/make_demo_pairs.py derives from the demo data (right answer vs near miss)."""
    make = load_tool("make_demo_pairs")
    data = ROOT / "examples" / "data"
    for name, source, n, seed in (("train", "demo_train.jsonl", 400, 0), ("eval", "demo_eval.jsonl", 100, 1)):
        pairs = make.pairs(data / source, n, seed)
        assert read_jsonl(data / f"demo_pairs_{name}.jsonl") == pairs and len(pairs) > 0.9 * n
        assert all(p["chosen"] != p["rejected"] for p in pairs)
    monkeypatch.chdir(tmp_path)
    sft = CliRunner().invoke(main, ["train", "--config", str(ROOT / "examples" / "demo.yaml"), "--max-steps", "1"])
    assert sft.exit_code == 0, sft.output
    dpo = CliRunner().invoke(main, ["train", "--config", str(ROOT / "examples" / "dpo.yaml"), "--max-steps", "1",
                                    "--eval-steps", "0"])
    assert dpo.exit_code == 0, dpo.output
    saved = (tmp_path / "runs" / "demo-dpo" / "config.yaml").read_text()
    assert "method: dpo" in saved and "adapter: runs/demo" in saved
    assert (tmp_path / "runs" / "demo-dpo" / "reference_logps.safetensors").is_file()


def test_readme_reference_and_examples_are_up_to_date():
    gen = load_tool("gen_docs")
    stale = [str(p.relative_to(ROOT)) for p, text in gen.expected_files().items() if p.read_text() != text]
    assert not stale, f"{stale} out of date: run python3 tools/gen_docs.py"
    from qlora_lite.config import reference_markdown

    assert reference_markdown() in (ROOT / "README.md").read_text()


def test_short_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--output", str(out), "--max-steps", "4", "--eval-limit", "4"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["before"]["total"] == summary["after"]["total"] == 4
    assert summary["train_steps"] == 4
    # training on the reversal task lowers the held-out loss even in a few steps
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
    assert (out / "train" / "adapter_model.safetensors").exists()
    assert (out / "train" / "metrics.jsonl").exists() and (out / "train" / "loss.png").exists()
    assert (out / "demo.gguf").read_bytes()[:4] == b"GGUF"
    assert summary["merged"]["total"] == 4
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "merged")  # plain transformers loads the merged model
    for name in ("exact match", "adapter", "merged model", "loss plot"):
        assert name in result.output

    # A second run replaces the first demo run; a folder with other files is refused untouched.
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    refused = CliRunner().invoke(main, ["demo", "--output", str(foreign), "--max-steps", "1"])
    assert refused.exit_code != 0 and "not written by" in refused.output
    assert (foreign / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("bad", [["--max-steps", "0"], ["--eval-limit", "0"]])
def test_demo_rejects_bad_options(tmp_path, bad):
    result = CliRunner().invoke(main, ["demo", "--output", str(tmp_path / "d"), *bad])
    assert result.exit_code != 0
