"""The training loop: exact resume, divergence and out-of-memory handling, data order, schedule."""

from __future__ import annotations

import logging
import math
import warnings

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import write_chat_jsonl

from qlora_lite.config import load_config
from qlora_lite.errors import CheckpointError, DataError, TrainingError
from qlora_lite.model.loss import batch_loss_sum, evaluate, label_tokens
from qlora_lite.train import loop as train_module
from qlora_lite.train.batches import epoch_batches, load_training_data, plan_steps
from qlora_lite.train.loop import train
from qlora_lite.train.metrics import read_metrics
from qlora_lite.train.optim import build_optimizer, lr_factor


def tiny_config(model, data, output, **overrides):
    values = dict(model=str(model), data=str(data), output=str(output), bits=16, rank=4, alpha=8, dropout=0.1,
                  max_seq_len=64, batch_size=4, grad_accum=2, lr=1e-2, max_steps=8, save_steps=2,
                  eval_fraction=0.25, eval_steps=4, seed=3)
    values.update(overrides)
    return load_config(None, values)


# rank 64: lora_A of the 64-wide projections has 4096 elements, the size from which bitsandbytes keeps
# 8-bit optimizer states, so their quantized state is what the resume must restore.
FULL_4BIT = dict(bits=4, rank=64, alpha=64, lr=2e-3)


@pytest.fixture(scope="module")
def full_4bit_run(tiny_llama, tmp_path_factory):
    """An uninterrupted 4-bit run: dropout, shuffling, grad_accum 2, several epochs (24 train examples
    = 3 steps per epoch) and the default 8-bit optimizer: everything whose state a resume must restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("full4")
    data = write_chat_jsonl(tmp / "train.jsonl")
    result = train(tiny_config(tiny_llama, data, tmp / "full", **FULL_4BIT))
    torch.set_num_threads(before)
    return data, result


def test_resume_after_interruption_reproduces_the_uninterrupted_run(tiny_llama, full_4bit_run, tmp_path,
                                                                    monkeypatch, one_thread, ctrl_c_after):
    data, full = full_4bit_run
    assert full.steps == 8

    with ctrl_c_after(5), pytest.raises(KeyboardInterrupt):
        train(tiny_config(tiny_llama, data, tmp_path / "resumed", **FULL_4BIT))
    assert not (tmp_path / "resumed" / "adapter_model.safetensors").exists()  # only checkpoints so far
    with monkeypatch.context() as patched:  # a refused resume fails before the model is loaded
        patched.setattr("qlora_lite.train.loop.build_model_from_config", _no_model)
        with pytest.raises(CheckpointError, match="batch size changed 4 -> 2"):
            train(tiny_config(tiny_llama, data, tmp_path / "resumed", **FULL_4BIT, resume=True, batch_size=2))
    resumed = train(tiny_config(tiny_llama, data, tmp_path / "resumed", **FULL_4BIT, resume=True))
    assert resumed.resumed_from.name == "checkpoint-4"  # mid-epoch: epoch 1, 2 of 6 batches consumed

    a, b = read_metrics(full.metrics_path), read_metrics(resumed.metrics_path)
    assert [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-6), ra["step"]
        assert rb["lr"] == pytest.approx(ra["lr"], abs=1e-12)
    assert b[-1]["eval_loss"] == pytest.approx(a[-1]["eval_loss"], abs=1e-6)
    wa = load_file(full.adapter_dir / "adapter_model.safetensors")
    wb = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.allclose(wa[key].float(), wb[key].float(), atol=1e-6), key
    assert any(w.abs().max() > 0 for k, w in wa.items() if "lora_B" in k)  # the adapter did train


def test_4bit_adapter_gives_peft_on_transformers_bnb_the_same_logits(tiny_llama, full_4bit_run, one_thread):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qlora_lite.model.build import build_model
    from qlora_lite.model.folder import load_tokenizer

    _, full = full_4bit_run
    ours = build_model(str(tiny_llama), bits=4, adapter=str(full.adapter_dir), trainable=False)
    # evaluate() (the eval command's API) agrees with the eval loss the loop logged at the end.
    config = load_config(full.output_dir / "config.yaml")
    _, eval_examples = load_training_data(config, load_tokenizer(tiny_llama))
    metrics = evaluate(ours, eval_examples, batch_size=4, pad_token_id=load_tokenizer(tiny_llama).pad_token_id)
    assert metrics["eval_loss"] == pytest.approx(full.eval_metrics["eval_loss"], rel=2e-3)
    assert metrics["eval_ppl"] == pytest.approx(math.exp(metrics["eval_loss"]))

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=quant, dtype=torch.bfloat16,
                                                device_map="cpu")
    ids = torch.tensor([[1, 40, 50, 60, 70, 80, 90, 100, 2]])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits.float()
        theirs = PeftModel.from_pretrained(base, full.adapter_dir).eval()(input_ids=ids).logits.float()
        mine = ours(input_ids=ids).logits.float()
    assert (mine - base_logits).abs().max() > 0.05
    torch.testing.assert_close(mine, theirs, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_evaluating_during_training_does_not_change_what_is_trained(tiny_llama, tmp_path, one_thread, dora):
    """``--eval-steps`` only looks: the eval passes (eval mode, the plain 4-bit path, no grad) leave the
    trained adapter bit for bit what a run without them trains, dropout and DoRA included."""
    data = write_chat_jsonl(tmp_path / "train.jsonl")
    adapters = []
    for eval_steps in (0, 2):
        config = tiny_config(tiny_llama, data, tmp_path / f"eval-{eval_steps}", dora=dora, eval_steps=eval_steps,
                             max_steps=6, save_steps=0, **FULL_4BIT)
        result = train(config)
        adapters.append(load_file(str(result.adapter_dir / "adapter_model.safetensors")))
    evaluated = [r for r in read_metrics(tmp_path / "eval-2" / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evaluated] == [2, 4, 6]
    assert adapters[0].keys() == adapters[1].keys()
    assert any("magnitude" in name for name in adapters[0]) == dora
    for name, tensor in adapters[0].items():
        assert torch.equal(tensor, adapters[1][name]), name


def test_packed_batch_loss_equals_the_examples_one_by_one(tiny_llama, tmp_path, one_thread):
    # Packing must not let attention cross examples: the loss of a pack is the sum of its parts.
    # (Attending across them changes the sum by ~1e-5 relative on this model, hence fp32.)
    from qlora_lite.data.dataset import load_dataset
    from qlora_lite.data.packing import collate, pack_examples
    from qlora_lite.model.build import build_model
    from qlora_lite.model.folder import load_tokenizer

    tokenizer = load_tokenizer(tiny_llama)
    examples, _ = load_dataset(write_chat_jsonl(tmp_path / "d.jsonl", n=3), tokenizer, max_seq_len=64)
    model = build_model(str(tiny_llama), bits=16, compute_dtype="fp32", trainable=False)
    (pack,) = pack_examples(examples, 3 * 64)
    with torch.no_grad():
        parts = [batch_loss_sum(model, collate([e], tokenizer.pad_token_id)) for e in examples]
        packed_loss, packed_n = batch_loss_sum(model, collate([pack], tokenizer.pad_token_id))
    assert packed_n == sum(n for _, n in parts) == sum(label_tokens(e) for e in examples)
    assert float(packed_loss) == pytest.approx(sum(float(loss) for loss, _ in parts), rel=2e-7)


def _no_model(*args, **kwargs):
    raise AssertionError("the model was loaded before the inputs were checked")


def _failing_loss(monkeypatch, on_call, error=None):
    """Make the training loss NaN (or raise ``error``) from the ``on_call``-th micro-batch on."""
    real, calls = train_module.batch_loss_sum, {"n": 0}

    def loss_sum(model, batch):
        calls["n"] += 1
        if calls["n"] >= on_call:
            if error is not None:
                raise error
            loss, n = real(model, batch)
            return loss * float("nan"), n
        return real(model, batch)

    monkeypatch.setattr(train_module, "batch_loss_sum", loss_sum)


def test_nan_loss_stops_at_that_step_and_names_the_last_good_checkpoint(tiny_llama, tmp_path, monkeypatch,
                                                                         one_thread):
    data = write_chat_jsonl(tmp_path / "train.jsonl")
    _failing_loss(monkeypatch, on_call=5)  # grad_accum 2: call 5 is the first micro-batch of step 3
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"diverged at step 3.*checkpoint-2.*--resume"):
        train(tiny_config(tiny_llama, data, out))
    assert (out / "checkpoint-2" / "COMPLETE").exists()
    assert not list(out.glob("checkpoint-3*"))
    assert not (out / "adapter_model.safetensors").exists()  # no adapter from a diverged run
    assert [r["step"] for r in read_metrics(out)] == [1, 2]


def test_out_of_memory_explains_what_to_lower(tiny_llama, tmp_path, monkeypatch, one_thread):
    data = write_chat_jsonl(tmp_path / "train.jsonl")
    _failing_loss(monkeypatch, on_call=1, error=torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    with pytest.raises(TrainingError) as info:
        train(tiny_config(tiny_llama, data, tmp_path / "run"))
    message = str(info.value)
    for advice in ("--batch-size", "--max-seq-len", "--rank", "--gradient-checkpointing"):
        assert advice in message


def test_bad_data_fails_before_the_model_is_loaded(tiny_llama, tmp_path, monkeypatch):
    data = tmp_path / "train.jsonl"
    write_chat_jsonl(data, n=3)
    with open(data, "a") as f:
        f.write('{"messages": [ broken\n')

    monkeypatch.setattr("qlora_lite.train.loop.build_model_from_config", _no_model)
    with pytest.raises(DataError, match=r"train\.jsonl:4"):
        train(tiny_config(tiny_llama, data, tmp_path / "run"))


def test_epoch_order_is_seeded_and_shards_never_repeat_an_example():
    assert epoch_batches(10, 2, seed=1, epoch=0) == epoch_batches(10, 2, seed=1, epoch=0)
    assert epoch_batches(10, 2, seed=1, epoch=0) != epoch_batches(10, 2, seed=1, epoch=1)
    for n in (9, 10):
        chunks = epoch_batches(n, batch_size=2, seed=0, epoch=0, num_processes=2)
        seen = [i for chunk in chunks for rank in range(2) for i in chunk[rank::2]]
        assert len(seen) == len(set(seen)) >= n - 1
        assert all(chunk[rank::2] for chunk in chunks for rank in range(2))  # no process ever idles
    assert plan_steps(6, grad_accum=2, max_steps=0, epochs=1.5) == (3, 5)
    assert plan_steps(5, grad_accum=2, max_steps=0, epochs=1) == (3, 3)
    assert plan_steps(5, grad_accum=2, max_steps=7, epochs=1) == (3, 7)


def test_learning_rate_schedules_warm_up_then_decay_to_zero():
    assert [lr_factor(s, 2, 10, "cosine") for s in (0, 1, 2)] == [0.0, 0.5, 1.0]
    assert lr_factor(6, 2, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(10, 2, 10, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(6, 2, 10, "linear") == pytest.approx(0.5)
    assert lr_factor(9, 2, 10, "constant") == 1.0
    with pytest.raises(ValueError, match="cosine, linear, constant"):
        lr_factor(0, 0, 10, "exponential")


def test_paged_optimizer_falls_back_on_cpu_with_one_clear_line(caplog):
    param = torch.nn.Parameter(torch.randn(64, 64, dtype=torch.bfloat16))
    with caplog.at_level(logging.WARNING, logger="qlora_lite"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer = build_optimizer([param], "paged_adamw_8bit", lr=1e-3, device_type="cpu")
        param.grad = torch.ones_like(param)
        optimizer.step()
    assert type(optimizer).__name__ == "AdamW8bit"
    assert not [w for w in caught if "aged" in str(w.message)]
    assert [r.message for r in caplog.records if "paged" in r.message] == [
        "paged_adamw_8bit needs a CUDA GPU (paging uses unified memory); using adamw_8bit on the cpu"]
    assert math.isfinite(float(param.detach().float().sum()))


def test_ctrl_c_says_which_checkpoint_to_resume_from(tiny_llama, tmp_path, monkeypatch, caplog, one_thread):
    data = write_chat_jsonl(tmp_path / "train.jsonl")
    _failing_loss(monkeypatch, on_call=5, error=KeyboardInterrupt())  # during step 3
    with caplog.at_level(logging.WARNING, logger="qlora_lite"), pytest.raises(KeyboardInterrupt):
        train(tiny_config(tiny_llama, data, tmp_path / "run"))
    assert any("interrupted during step 3" in r.message and "checkpoint-2" in r.message and "--resume" in r.message
               for r in caplog.records)


def test_training_setup_uses_no_deprecated_transformers_api(tiny_llama):
    """Loading, adding LoRA and preparing for training warns about nothing transformers deprecates."""
    from qlora_lite.model.build import build_model

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model = build_model(str(tiny_llama), bits=4, rank=4, gradient_checkpointing=True)
        model(input_ids=torch.tensor([[1, 5, 9, 12]]), labels=torch.tensor([[1, 5, 9, 12]])).loss.backward()
