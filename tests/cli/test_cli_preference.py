"""``qlora-lite train --method dpo`` then ``qlora-lite eval`` on held-out pairs, through click."""

from __future__ import annotations

import json

from click.testing import CliRunner
from tiny_models import write_chat_jsonl, write_preference_jsonl

from qlora_lite.cli import main
from qlora_lite.train.metrics import read_metrics


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_train_dpo_then_eval_reports_the_held_out_preference_accuracy(tiny_llama, tmp_path, one_thread):
    train_file = write_preference_jsonl(tmp_path / "train.jsonl", 64, seed=0)
    eval_file = write_preference_jsonl(tmp_path / "eval.jsonl", 32, seed=1)
    out = tmp_path / "run"
    result = invoke("train", "--model", tiny_llama, "--data", train_file, "--eval-data", eval_file, "--output", out,
                    "--method", "dpo", "--beta", 0.1, "--rank", 8, "--alpha", 16, "--dropout", 0, "--max-seq-len", 64,
                    "--batch-size", 8, "--lr", 3e-3, "--max-steps", 60, "--optimizer", "adamw",
                    "--lr-scheduler", "constant", "--seed", 0)
    assert result.exit_code == 0, result.output
    assert "reward accuracy" in result.output
    trained = read_metrics(out)[-1]
    assert trained["eval_rewards/accuracies"] >= 0.9

    base = json.loads(invoke("eval", "--model", tiny_llama, "--data", eval_file, "--bits", 4, "--json").output)
    tuned = json.loads(invoke("eval", "--model", tiny_llama, "--adapter", out, "--data", eval_file, "--json").output)
    assert base["format"] == tuned["format"] == "preference" and tuned["examples"] == 32
    assert base["preference_accuracy"] <= 0.7 and base["eval_rewards/accuracies"] == 0.0  # no adapter: no reward
    assert tuned["preference_accuracy"] >= 0.9
    # eval scores as the training loop's evaluation did (same pairs, same reference: the adapter off)
    assert abs(tuned["eval_rewards/accuracies"] - trained["eval_rewards/accuracies"]) < 1e-6
    assert abs(tuned["eval_rewards/margins"] - trained["eval_rewards/margins"]) < 1e-3
    table = invoke("eval", "--model", tiny_llama, "--adapter", out, "--data", eval_file).output
    assert "preference accuracy" in table and "reward margin" in table and "base (adapter off)" in table
    # against itself as the reference (as a DPO run from an SFT adapter is scored): no reward at all
    itself = json.loads(invoke("eval", "--model", tiny_llama, "--adapter", out, "--reference-adapter", out,
                               "--data", eval_file, "--json").output)
    assert itself["eval_rewards/margins"] == 0.0 and itself["eval_rewards/accuracies"] == 0.0
    assert itself["preference_accuracy"] == tuned["preference_accuracy"] and itself["reference"] == f"adapter {out}"
    refused = CliRunner().invoke(main, ["eval", "--model", str(tiny_llama), "--reference-adapter", str(out),
                                        "--data", str(write_chat_jsonl(tmp_path / "chat.jsonl"))])
    assert refused.exit_code != 0 and "--reference-adapter is for files of preference pairs" in refused.output
