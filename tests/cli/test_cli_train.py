"""``qlora-lite train`` and ``qlora-lite plot`` end to end through click, on the tiny llama."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from click.testing import CliRunner
from tiny_models import write_chat_jsonl

from qlora_lite.cli import main
from qlora_lite.cli.train import TRAIN_FIELDS
from qlora_lite.config import option_name
from qlora_lite.train.metrics import read_metrics
from qlora_lite.train.optim import lr_factor


def invoke(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)


def test_train_end_to_end_adapter_loads_in_peft_with_identical_logits(tiny_llama, tmp_path, one_thread):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlora_lite.model.build import build_model

    data, out = write_chat_jsonl(tmp_path / "train.jsonl"), tmp_path / "run"
    result = invoke("train", "--model", tiny_llama, "--data", data, "--output", out, "--bits", 16, "--rank", 8,
                    "--alpha", 16, "--max-seq-len", 64, "--batch-size", 4, "--lr", 1e-2, "--max-steps", 16,
                    "--eval-fraction", 0.25, "--eval-steps", 4, "--save-steps", 4, "--save-total-limit", 2,
                    "--seed", 0)
    assert result.exit_code == 0, result.output
    assert "trained 16 steps" in result.output
    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "loss.png", "config.yaml"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-16"]  # newest 2
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 16 and saved["lora"]["rank"] == 8

    metrics = read_metrics(out)
    assert [r["step"] for r in metrics] == list(range(1, 17))
    for record in metrics:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_bytes"} <= record.keys()
        assert record["peak_mem_bytes"] > 0 and record["tokens_per_s"] > 0
    # the logged lr is the one each step used: cosine from 1e-2 over the 16 planned steps
    assert [r["lr"] for r in metrics] == pytest.approx([1e-2 * lr_factor(s, 0, 16, "cosine") for s in range(16)])
    evals = [r["eval_loss"] for r in metrics if "eval_loss" in r]
    assert len(evals) == 4 and evals[-1] < evals[0] - 0.1  # the adapter learned something

    ids = torch.tensor([[1, 40, 50, 60, 70, 80, 90, 100, 2]])
    ours = build_model(str(tiny_llama), bits=16, adapter=str(out), trainable=False)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16)
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits.float()
        peft_model = PeftModel.from_pretrained(base, out).eval()
        theirs = peft_model(input_ids=ids).logits.float()
        mine = ours(input_ids=ids).logits.float()
    assert (mine - base_logits).abs().max() > 0.05  # the adapter changes the output ...
    torch.testing.assert_close(mine, theirs, atol=2e-2, rtol=2e-2)  # ... exactly as PEFT applies it

    replot = tmp_path / "again.png"
    result = invoke("plot", out, "--output", replot)
    assert result.exit_code == 0, result.output
    assert replot.read_bytes()[:4] == b"\x89PNG"


def test_train_help_lists_every_option_with_its_default():
    result = invoke("train", "--help")
    assert result.exit_code == 0
    text = result.output
    for name in TRAIN_FIELDS:
        assert option_name(name) in text, name
    for flag in ("--config", "--double-quant / --no-double-quant", "--gradient-checkpointing / --no-gradient-checkpointing"):
        assert flag in text
    # Every option with a default shows it; required ones (model, data, output, ...) show none.
    import dataclasses

    from qlora_lite.config import SECTIONS

    defaults = {f.name: f.default for cls in SECTIONS.values() for f in dataclasses.fields(cls)}
    assert text.count("[default:") >= sum(defaults.get(name) is not None for name in TRAIN_FIELDS)
    assert "[default: None]" not in text
    assert "paged_adamw_8bit" in text and "cosine" in text


def test_yaml_config_with_flag_override(tiny_llama, tmp_path, one_thread):
    data, out = write_chat_jsonl(tmp_path / "train.jsonl", n=8), tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"model": str(tiny_llama), "bits": 16},
        "lora": {"rank": 4, "target_modules": ["q_proj", "v_proj"]},
        "data": {"data": str(data), "max_seq_len": 64},
        "train": {"output": str(out), "max_steps": 5, "lr": 0.01, "batch_size": 4, "optimizer": "adamw"},
    }))
    result = invoke("train", "--config", config, "--max-steps", 2, "--rank", 2)
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["train"]["max_steps"], saved["lora"]["rank"]) == (2, 2)  # flags win
    assert (saved["train"]["lr"], saved["lora"]["target_modules"], saved["train"]["optimizer"]) == (
        0.01, "q_proj,v_proj", "adamw")  # the file fills the rest
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["target_modules"]) == (2, ["q_proj", "v_proj"])


def test_ctrl_c_then_resume_through_the_command_line(tiny_llama, tmp_path, one_thread, ctrl_c_after, caplog):
    data, out = write_chat_jsonl(tmp_path / "train.jsonl", n=8), tmp_path / "run"
    args = ("train", "--model", tiny_llama, "--data", data, "--output", out, "--bits", 16, "--rank", 4,
            "--max-seq-len", 64, "--batch-size", 2, "--max-steps", 4, "--save-steps", 2, "--optimizer", "adamw")
    with ctrl_c_after(3):
        result = invoke(*args)
    assert result.exit_code == 1 and "Aborted" in result.output, result.output
    assert "last complete checkpoint" in caplog.text and "checkpoint-2" in caplog.text and "--resume" in caplog.text
    again = invoke(*args)  # without --resume the finished-or-not run is protected
    assert again.exit_code != 0 and "--resume" in again.output
    result = invoke(*args, "--resume")
    assert result.exit_code == 0, result.output
    assert "trained 4 steps" in result.output
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]


def test_resume_with_a_new_lr_trains_with_it(tiny_llama, tmp_path, one_thread, ctrl_c_after):
    """Resume allows --lr and --weight-decay to change; the new values must be the ones used."""
    data, out = write_chat_jsonl(tmp_path / "train.jsonl", n=8), tmp_path / "run"
    args = ("train", "--model", tiny_llama, "--data", data, "--output", out, "--bits", 16, "--rank", 4,
            "--max-seq-len", 64, "--batch-size", 2, "--max-steps", 4, "--save-steps", 2, "--optimizer", "adamw",
            "--lr-scheduler", "linear", "--warmup-steps", 1)
    with ctrl_c_after(2):
        assert invoke(*args, "--lr", "1e-3").exit_code == 1
    result = invoke(*args, "--lr", "4e-4", "--weight-decay", "0.1", "--resume")
    assert result.exit_code == 0, result.output
    lrs = {r["step"]: r["lr"] for r in read_metrics(out)}
    for step in (1, 2):
        assert lrs[step] == pytest.approx(1e-3 * lr_factor(step - 1, 1, 4, "linear"))
    for step in (3, 4):
        assert lrs[step] == pytest.approx(4e-4 * lr_factor(step - 1, 1, 4, "linear"))


def test_bad_data_is_a_clear_error_with_file_and_line(tiny_llama, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n{"text": 3}\n')
    result = invoke("train", "--model", tiny_llama, "--data", data, "--output", tmp_path / "run")
    assert result.exit_code != 0
    assert "bad.jsonl:2" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()  # nothing written for a run that never started


def test_missing_required_options_are_listed_at_once():
    result = invoke("train")
    assert result.exit_code != 0
    for name in ("--model", "--data", "--output"):
        assert name in result.output


def test_plot_of_a_folder_without_metrics_is_a_clear_error(tmp_path):
    result = invoke("plot", tmp_path)
    assert result.exit_code != 0
    assert "metrics.jsonl does not exist" in result.output and "Traceback" not in result.output


def test_a_run_that_fails_to_start_leaves_nothing_to_resume(tiny_llama, tmp_path, one_thread):
    data, out = write_chat_jsonl(tmp_path / "train.jsonl", n=8), tmp_path / "run"
    args = ("train", "--model", tiny_llama, "--data", data, "--output", out, "--bits", 16, "--rank", 2,
            "--max-seq-len", 64, "--batch-size", 4, "--max-steps", 1, "--optimizer", "adamw")
    result = invoke(*args, "--target-modules", "foo_proj")
    assert result.exit_code != 0 and "q_proj" in result.output  # the error lists the real layer names
    assert not out.exists()
    result = invoke(*args, "--target-modules", "q_proj")  # the corrected command just works
    assert result.exit_code == 0, result.output


def test_help_names_folders_alike_and_says_what_each_command_does():
    runner = CliRunner()
    for command in ("train", "eval", "generate", "merge", "export-gguf", "estimate"):
        text = runner.invoke(main, [command, "--help"]).output
        assert "--model DIR" in text and "--model TEXT" not in text, command
    assert "--no-trust-remote-code" in runner.invoke(main, ["merge", "--help"]).output
    estimate = runner.invoke(main, ["estimate", "--help"]).output
    assert "--max-seq-len" not in estimate
    from qlora_lite.cli import COMMANDS

    assert COMMANDS["demo"][1].endswith("merge, GGUF.")


def test_training_on_parquet_resumes_and_refuses_a_changed_parquet_file(tiny_llama, tmp_path, one_thread, caplog,
                                                                         ctrl_c_after):
    import pandas as pd

    rows = [json.loads(line) for line in write_chat_jsonl(tmp_path / "t.jsonl", n=8).read_text().splitlines()]
    data, out = tmp_path / "train.parquet", tmp_path / "run"
    pd.DataFrame(rows).to_parquet(data)
    original = data.read_bytes()
    args = ("train", "--model", tiny_llama, "--data", data, "--output", out, "--bits", 16, "--rank", 4,
            "--max-seq-len", 64, "--batch-size", 2, "--max-steps", 4, "--save-steps", 2, "--optimizer", "adamw",
            "--data-cache", tmp_path / "cache")
    caplog.set_level("INFO", logger="qlora_lite")
    with ctrl_c_after(2):
        assert invoke(*args).exit_code == 1
    assert "kept 8 of 8 (chat)" in caplog.text and "(tokenized cache)" not in caplog.text
    rows[3]["messages"][1]["content"] = "a changed answer"
    pd.DataFrame(rows).to_parquet(data)
    refused = CliRunner().invoke(main, [str(a) for a in (*args, "--resume")])
    assert refused.exit_code != 0 and "dataset changed (sha256" in refused.output, refused.output
    data.write_bytes(original)
    caplog.clear()
    result = invoke(*args, "--resume")
    assert result.exit_code == 0, result.output
    assert "kept 8 of 8 (chat) (tokenized cache)" in caplog.text  # the first run's tokens
    assert "trained 4 steps" in result.output and [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]
