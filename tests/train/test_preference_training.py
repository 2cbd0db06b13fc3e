"""--method dpo|orpo through the training loop: it learns, resumes exactly, uses the start adapter as
the reference, logs the preference metrics, and refuses settings that would do nothing."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import make_adapter, write_preference_jsonl

from qlora_lite.config import load_config
from qlora_lite.data.preference import load_preference_dataset
from qlora_lite.errors import ConfigError
from qlora_lite.model.build import build_model
from qlora_lite.model.folder import load_tokenizer
from qlora_lite.model.lora import adapters_disabled
from qlora_lite.model.preference import collate_pairs, sequence_logps
from qlora_lite.storage.durable import load_tensors
from qlora_lite.train.loop import train
from qlora_lite.train.metrics import read_metrics
from qlora_lite.train.preference import REFERENCE_NAME


def start_adapter(base, folder, bits=4):
    """An SFT-like adapter (random lora_B) saved without dropout: a run from it uses the adapter's own
    dropout, and without any the policy of step 1 is exactly the start adapter."""
    make_adapter(base, folder, bits=bits, scale=0.2, dtype="fp32")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "lora_dropout": 0.0}))
    return folder


def dpo_config(model, data, output, **overrides):
    values = dict(model=str(model), data=str(data), output=str(output), method="dpo", bits=4, rank=8, alpha=16,
                  dropout=0.0, max_seq_len=64, batch_size=8, lr=3e-3, max_steps=60, eval_steps=30, seed=0,
                  optimizer="adamw", lr_scheduler="constant")
    values.update(overrides)
    return load_config(None, values)


@pytest.fixture(scope="module")
def pairs_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pairs")
    return write_preference_jsonl(tmp / "train.jsonl", 64, seed=0), write_preference_jsonl(tmp / "eval.jsonl", 32, seed=1)


def base_accuracy(model_dir, eval_file) -> float:
    """How often the base alone gives the chosen response the higher log-probability."""
    tokenizer = load_tokenizer(model_dir)
    pairs, _ = load_preference_dataset(eval_file, tokenizer, max_seq_len=64)
    model = build_model(str(model_dir), bits=4, rank=8, trainable=False)
    with torch.no_grad(), adapters_disabled(model):
        logps, _ = sequence_logps(model, collate_pairs(pairs, tokenizer.pad_token_id))
    chosen, rejected = logps.chunk(2)
    return float((chosen > rejected).float().mean())


def test_dpo_learns_held_out_preferences_the_base_gets_half_right(tiny_llama, pairs_files, tmp_path, one_thread):
    train_file, eval_file = pairs_files
    assert 0.3 <= base_accuracy(tiny_llama, eval_file) <= 0.7
    result = train(dpo_config(tiny_llama, train_file, tmp_path / "run", eval_data=str(eval_file)))
    assert result.eval_metrics["eval_rewards/accuracies"] >= 0.9
    assert result.eval_metrics["eval_rewards/margins"] > 0
    records = read_metrics(result.metrics_path)
    first = records[0]  # policy == reference at the first step: every reward is exactly 0
    assert first["rewards/chosen"] == first["rewards/rejected"] == first["rewards/accuracies"] == 0.0
    assert abs(first["loss"] - 0.6931) < 1e-3  # log 2
    assert {"rewards/margins", "lr", "grad_norm"} <= set(records[-1])
    evals = [r for r in records if "eval_rewards/accuracies" in r]
    assert [r["step"] for r in evals] == [30, 60]
    assert result.plot_path is not None and result.plot_path.stat().st_size > 0


def test_dpo_resume_continues_the_same_run(tiny_llama, pairs_files, tmp_path, one_thread, ctrl_c_after):
    train_file, _ = pairs_files
    settings = dict(max_steps=6, save_steps=2, grad_accum=2, batch_size=4, dropout=0.1, eval_fraction=0.25,
                    eval_steps=3)
    full = train(dpo_config(tiny_llama, train_file, tmp_path / "full", **settings))
    with ctrl_c_after(3), pytest.raises(KeyboardInterrupt):  # after checkpoint-2, mid-way to the next
        train(dpo_config(tiny_llama, train_file, tmp_path / "part", **settings))
    resumed = train(dpo_config(tiny_llama, train_file, tmp_path / "part", resume=True, **settings))
    assert resumed.resumed_from is not None and resumed.steps == 6
    a, b = read_metrics(full.metrics_path), read_metrics(resumed.metrics_path)
    keys = ("loss", "rewards/chosen", "rewards/margins", "rewards/accuracies", "eval_loss")
    assert [[r.get(k) for k in keys] for r in a] == [[r.get(k) for k in keys] for r in b]
    assert resumed.eval_metrics == full.eval_metrics


def test_a_start_adapter_is_the_reference_and_its_log_probs_survive_resume(tiny_llama, pairs_files, tmp_path,
                                                                           monkeypatch, one_thread, ctrl_c_after):
    train_file, _ = pairs_files
    start = start_adapter(tiny_llama, tmp_path / "sft", bits=16)
    settings = dict(bits=16, compute_dtype="fp32", lora_dtype="fp32", adapter=str(start), rank=4, alpha=8,
                    max_steps=4, save_steps=2, batch_size=8)
    full = train(dpo_config(tiny_llama, train_file, tmp_path / "full", **settings))
    first = read_metrics(full.metrics_path)[0]
    # the policy starts as the reference: no reward at step 1 (against the base it would have some)
    assert abs(first["rewards/chosen"]) < 1e-5 and abs(first["rewards/rejected"]) < 1e-5
    stored = load_tensors(full.output_dir / REFERENCE_NAME)
    assert stored["train"].shape == (64, 2) and bool((stored["train"] < 0).all())

    with ctrl_c_after(3), pytest.raises(KeyboardInterrupt):
        train(dpo_config(tiny_llama, train_file, tmp_path / "part", **settings))
    # the resumed run reads the stored values; make sure it does not score the pairs again
    monkeypatch.setattr("qlora_lite.train.preference.reference_logps", _not_called)
    resumed = train(dpo_config(tiny_llama, train_file, tmp_path / "part", resume=True, **settings))
    a, b = read_metrics(full.metrics_path), read_metrics(resumed.metrics_path)
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert torch.equal(load_tensors(tmp_path / "part" / REFERENCE_NAME)["train"], stored["train"])


def _not_called(*args, **kwargs):
    raise AssertionError("the reference log-probs were computed again on resume")


def test_orpo_trains_without_a_reference_and_logs_the_sft_plus_odds_ratio_loss(tiny_llama, pairs_files, tmp_path,
                                                                             monkeypatch, one_thread):
    train_file, eval_file = pairs_files
    monkeypatch.setattr("qlora_lite.model.preference.reference_logps", _not_called)
    result = train(dpo_config(tiny_llama, train_file, tmp_path / "orpo", method="orpo", max_steps=20, lr=1e-2,
                              eval_data=str(eval_file), eval_steps=0))
    records = read_metrics(result.metrics_path)
    # the SFT part dominates: the loss starts near the NLL of a random model and falls
    assert records[0]["loss"] > 2.0 and records[-1]["loss"] < records[0]["loss"] - 1.0
    assert records[0]["rewards/chosen"] < 0  # lambda * mean log-prob of the chosen response
    assert {"eval_loss", "eval_rewards/accuracies"} <= set(result.eval_metrics)


@pytest.mark.parametrize("overrides, message", [
    (dict(method="dpo", packing=True), "--packing packs SFT examples"),
    (dict(method="orpo", train_on_inputs=True), "--train-on-inputs is for SFT"),
    (dict(method="dpo", dpo_loss="ipo", label_smoothing=0.1), "--label-smoothing applies to --dpo-loss sigmoid"),
    (dict(method="dpo", beta=0.0), "--beta must be positive"),
    (dict(method="dpo", format="chat"), "use --format preference"),
    (dict(format="preference"), "add --method dpo or --method orpo"),
    (dict(method="ppo"), "--method='ppo' is not one of sft, dpo, orpo"),
])
def test_settings_that_would_do_nothing_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, dict(model="m", data="d", output="o", **overrides)).validate()


def test_the_memory_estimate_counts_both_sequences_of_a_pair(tiny_llama):
    from qlora_lite.train.estimate import estimate_memory
    from qlora_lite.train.fit import estimate_settings

    def estimate(method, batch_size):
        config = load_config(None, dict(model=str(tiny_llama), method=method, batch_size=batch_size,
                                        checkpoint_policy="balanced"))
        return estimate_memory(tiny_llama, **estimate_settings(config, "cpu")).breakdown

    pairs, sequences = estimate("dpo", 2), estimate("sft", 4)
    assert pairs["activations"] == sequences["activations"] > estimate("sft", 2)["activations"]
    assert pairs["logits"] == sequences["logits"]


@pytest.mark.parametrize("start", ["fresh", "adapter"])
def test_two_processes_train_the_same_dpo_run_as_one(tiny_llama, tmp_path, monkeypatch, capfd, start):
    """DDP on the CPU (gloo): per-step loss and rewards, the eval pairs (5: split 3 and 2, one process
    padded) and the adapter equal one process's with the same global batch; with --adapter each
    process scores its share of the reference log-probs and all get every value."""
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from qlora_lite.cli.train import command as train_command

    data = write_preference_jsonl(tmp_path / "pairs.jsonl", 24, seed=2)
    settings = dict(model=str(tiny_llama), data=str(data), method="dpo", bits=4, compute_dtype="fp32",
                    lora_dtype="fp32", dropout=0.0, rank=4, alpha=8.0, max_seq_len=48, grad_accum=2, lr=1e-2,
                    max_steps=3, eval_fraction=0.2, eval_steps=3, seed=3, optimizer="adamw")
    if start == "adapter":
        settings["adapter"] = str(start_adapter(tiny_llama, tmp_path / "sft"))
    one = train(load_config(None, {**settings, "output": str(tmp_path / "one"), "batch_size": 4}))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = [f"--{k.replace('_', '-')}={v}" for k, v in {**settings, "batch_size": 2, "num_processes": 2}.items()]
    result = CliRunner().invoke(train_command, args + ["--output", str(tmp_path / "two")])
    assert result.exit_code == 0, result.output + capfd.readouterr().err[-3000:]
    a, b = read_metrics(one.output_dir), read_metrics(tmp_path / "two")
    assert [r["step"] for r in b] == [1, 2, 3]
    for key in ("loss", "rewards/chosen", "rewards/margins"):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], abs=1e-5), key
    # From an adapter, step 1's rewards are rounding noise around 0 (policy = reference): their signs,
    # and so the accuracy, depend on how the pairs were batched; later steps have real margins.
    assert [r["rewards/accuracies"] for r in b[1:]] == [r["rewards/accuracies"] for r in a[1:]]
    for key in ("eval_loss", "eval_rewards/margins", "eval_rewards/accuracies"):
        assert b[-1][key] == pytest.approx(a[-1][key], abs=1e-5), key
    wa, wb = (load_file(p / "adapter_model.safetensors") for p in (one.output_dir, tmp_path / "two"))
    # Adam turns last-bit differences of a near-zero gradient (summed in another order over processes)
    # into steps of up to lr: single elements may differ, the adapters as a whole may not.
    for key in wa:
        assert float((wb[key] - wa[key]).norm()) <= 1e-2 * float(wa[key].norm()), key
    if start == "adapter":
        ra, rb = (load_tensors(p / REFERENCE_NAME) for p in (one.output_dir, tmp_path / "two"))
        torch.testing.assert_close(rb["train"], ra["train"], atol=1e-5, rtol=0)
