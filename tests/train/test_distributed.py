"""Several processes on the CPU (gloo): same losses and adapter as one process with the whole batch.

Two launches of two processes each (about 30 s apiece on 2 cores): a fresh DDP run through
``qlora-lite train --num-processes 2``, and an FSDP run under ``accelerate launch`` resuming a
one-process checkpoint. fp32 compute and LoRA weights and no dropout, so that the only difference
between 1 and 2 processes is the order of floating-point sums (about 1e-7).
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from tiny_models import write_chat_jsonl

from qlora_lite.checkpoint.resume import check_resume_compatible
from qlora_lite.cli import main
from qlora_lite.cli.train import command as train_command
from qlora_lite.config import load_config
from qlora_lite.errors import CheckpointError, LaunchError
from qlora_lite.train.distributed import (
    all_reduce_grads,
    check_same_checkpoint,
    launch_command,
    pad_to_equal_batches,
    rescale_position,
    store_4bit_as,
)
from qlora_lite.train.loop import train
from qlora_lite.train.metrics import read_metrics

STEPS = 4
# 24 examples: 19 train (global micro-batches of 4: 3 steps per epoch, so checkpoint-2 is mid-epoch;
# the last one holds 3, uneven between processes), 5 eval (3 and 2 per process: one gets padded).
SETTINGS = dict(bits=4, compute_dtype="fp32", lora_dtype="fp32", dropout=0.0, rank=4, alpha=8.0, max_seq_len=48,
                grad_accum=2, lr=1e-2, max_steps=STEPS, save_steps=2, eval_fraction=0.2, seed=3, optimizer="adamw")


def cli_args(model, data, output, **overrides) -> list[str]:
    values = {**SETTINGS, "model": model, "data": data, "output": output, **overrides}
    args = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        else:
            args += [flag, str(value)]
    return args


@pytest.fixture(scope="module")
def reference(tiny_llama, tmp_path_factory):
    """One process, batch 4: the run the two-process runs must reproduce."""
    root = tmp_path_factory.mktemp("distributed")
    data = write_chat_jsonl(root / "train.jsonl", n=24)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train(load_config(None, {**SETTINGS, "model": str(tiny_llama), "data": str(data),
                                           "output": str(root / "one"), "batch_size": 4}))
    finally:
        torch.set_num_threads(threads)
    return root, data, result


def assert_same_run(ref_dir, other_dir, steps=range(1, STEPS + 1)):
    """Per-step losses within 1e-5, the same eval loss and final adapter; returns the largest loss difference."""
    ref = {r["step"]: r for r in read_metrics(ref_dir / "metrics.jsonl")}
    other = read_metrics(other_dir / "metrics.jsonl")
    assert [r["step"] for r in other] == list(range(1, STEPS + 1))  # one writer: no line twice
    diffs = [abs(r["loss"] - ref[r["step"]]["loss"]) for r in other if r["step"] in steps]
    assert max(diffs) < 1e-5, diffs
    assert other[-1]["eval_loss"] == pytest.approx(ref[STEPS]["eval_loss"], abs=1e-5)
    wa = load_file(ref_dir / "adapter_model.safetensors")
    wb = load_file(other_dir / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], atol=1e-5, rtol=0)
    assert any(w.abs().max() > 0 for k, w in wa.items() if "lora_B" in k)  # it did train
    return max(diffs)


def resumable_copy(src, dst, step=2):
    """``src`` as a run interrupted after ``step``: later checkpoints removed."""
    shutil.copytree(src, dst)
    for folder in dst.glob("checkpoint-*"):
        if int(folder.name.split("-")[1]) > step:
            shutil.rmtree(folder)
    return dst


def test_two_processes_match_one_and_their_checkpoint_resumes_in_one(reference, tiny_llama, monkeypatch, capfd):
    root, data, ref = reference
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = cli_args(tiny_llama, data, root / "two", batch_size=2, num_processes=2)
    result = CliRunner().invoke(train_command, args)
    assert result.exit_code == 0, result.output + capfd.readouterr().err[-3000:]
    assert f"trained {STEPS} steps" in capfd.readouterr().out  # printed once, by the main process
    two = root / "two"
    assert sorted(p.name for p in two.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    print("max loss difference 1 vs 2 processes (DDP):", assert_same_run(ref.output_dir, two))

    # The 2-process checkpoint (mid-epoch), resumed by 1 process with the same global batch of 8 as
    # 2 sequences x 4 micro-batches: the position in the epoch is recounted in the smaller micro-batches.
    resumed = resumable_copy(two, root / "two-then-one")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = train(load_config(None, {**SETTINGS, "model": str(tiny_llama), "data": str(data),
                                       "output": str(resumed), "batch_size": 2, "grad_accum": 4, "resume": True}))
    finally:
        torch.set_num_threads(threads)
    assert out.resumed_from.name == "checkpoint-2"
    assert_same_run(ref.output_dir, resumed, steps=(3, 4))


def test_fsdp_resumes_a_one_process_checkpoint_in_two(reference, tiny_llama, monkeypatch):
    root, data, ref = reference
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    resumed = resumable_copy(ref.output_dir, root / "one-then-two-fsdp")
    argv, env = launch_command(2, ["train", *cli_args(tiny_llama, data, resumed, batch_size=2, fsdp=True,
                                                      resume=True)])
    run = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "FSDP: this process holds 50.0% of the" in run.stderr  # the frozen base is really sharded
    assert "resuming from" in run.stderr and "checkpoint-2" in run.stderr
    print("max loss difference 1 vs 2 processes (FSDP, resumed):", assert_same_run(ref.output_dir, resumed, (3, 4)))


FP = {"dataset_sha256": "a" * 64, "batch_size": 4, "grad_accum": 2, "seed": 1, "num_processes": 1,
      "examples_per_epoch": 19}


def test_resume_with_another_process_count_needs_the_same_global_batch():
    assert len(check_resume_compatible(FP, {**FP, "batch_size": 2, "num_processes": 2})) == 2  # two warnings
    assert check_resume_compatible({**FP, "batch_size": 1, "num_processes": 4}, FP)
    assert len(check_resume_compatible(FP, {**FP, "batch_size": 1, "num_processes": 2, "grad_accum": 4})) == 3
    with pytest.raises(CheckpointError, match="number of processes changed 1 -> 2.*batch-size x processes"):
        check_resume_compatible(FP, {**FP, "num_processes": 2})  # global batch 4 -> 8
    with pytest.raises(CheckpointError, match="examples per epoch"):  # another remainder dropped per epoch
        check_resume_compatible(FP, {**FP, "batch_size": 2, "num_processes": 2, "examples_per_epoch": 14})
    with pytest.raises(CheckpointError, match="grad accum"):
        check_resume_compatible(FP, {**FP, "batch_size": 2, "num_processes": 2, "grad_accum": 4})


def test_position_in_the_epoch_is_recounted_in_the_new_micro_batches():
    saved = {"batch_size": 2, "num_processes": 2}  # micro-batches of 4 sequences
    assert rescale_position(6, saved, {"batch_size": 2, "num_processes": 1}) == 12
    assert rescale_position(6, saved, {"batch_size": 8, "num_processes": 1}) == 3
    with pytest.raises(ValueError, match="cannot continue"):
        rescale_position(1, saved, {"batch_size": 8, "num_processes": 1})


def test_padding_gives_every_process_the_same_batches_without_scoring():
    shard = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}]
    padded = pad_to_equal_batches(shard, batch_size=2, num_batches=2, template=shard[0])
    assert len(padded) == 4 and padded[0] is shard[0]
    assert all(set(e["labels"]) == {-100} and e["input_ids"] for e in padded[1:])
    assert pad_to_equal_batches([], 2, 1, shard[0])[0]["labels"] == [-100] * 3
    assert pad_to_equal_batches(shard * 3, 2, 1, shard[0]) == shard * 3


def test_4bit_storage_as_float_keeps_the_weights(tiny_llama):
    from qlora_lite.model.bnb import dequantize_weight
    from qlora_lite.model.build import build_model

    model = build_model(str(tiny_llama), bits=4, compute_dtype="fp32", trainable=False)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    layer = model.model.layers[0].self_attn.q_proj
    before, logits = dequantize_weight(layer), model(input_ids=ids).logits
    assert store_4bit_as(model, torch.float32) == 14  # 7 linear layers per block, 2 blocks
    assert layer.weight.dtype == torch.float32 and layer.quant_state is layer.weight.quant_state
    assert torch.equal(dequantize_weight(layer), before)
    assert torch.equal(model(input_ids=ids).logits, logits)


def test_launch_command_runs_accelerate_with_gloo_on_the_cpu():
    argv, env = launch_command(3, ["train", "--config", "x.yaml"], port=29555)
    assert argv[1:4] == ["-m", "accelerate.commands.launch", "--multi_gpu"]
    assert argv[argv.index("--num_processes") + 1] == "3" and argv[argv.index("--main_process_port") + 1] == "29555"
    assert argv[-5:] == ["-m", "qlora_lite.cli", "train", "--config", "x.yaml"]
    if not torch.cuda.is_available():
        assert env["ACCELERATE_USE_CPU"] == "true" and int(env["OMP_NUM_THREADS"]) >= 1


def test_bad_settings_fail_before_any_process_starts(tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("launched despite invalid settings")

    monkeypatch.setattr("qlora_lite.train.distributed.relaunch", never)
    # through the group, as `qlora-lite` runs it: the group turns the ConfigError into the message
    result = CliRunner().invoke(main, ["train", "--num-processes", "2", "--data", str(tmp_path / "d.jsonl")])
    assert result.exit_code == 1 and "--model is required" in result.output
    result = CliRunner().invoke(main, ["train", "--num-processes", "2", "--fsdp", "--bits", "8", "--model", "m",
                                       "--data", "d.jsonl", "--output", str(tmp_path)])
    assert result.exit_code == 1 and "8-bit (LLM.int8) weights cannot be sharded" in result.output


def test_gradient_buckets_put_every_value_back_in_place(tmp_path):
    import torch.distributed as dist

    params = [torch.nn.Parameter(torch.randn(n, 3, dtype=dtype)) for n, dtype in
              [(4, torch.float32), (1, torch.bfloat16), (7, torch.float32), (2, torch.float32)]]
    for p in params[:2] + params[3:]:
        p.grad = torch.randn_like(p)
    expected = [None if p.grad is None else p.grad.clone() for p in params]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        all_reduce_grads(params, bucket_elements=8)  # buckets of 12, 3 and 6 values
    finally:
        dist.destroy_process_group()
    for p, grad in zip(params, expected):
        assert (p.grad is None) if grad is None else torch.equal(p.grad, grad)


def test_processes_that_see_different_checkpoints_refuse_to_start(tmp_path):
    class TwoMachines:  # process 1 runs on a machine whose --output holds no checkpoint
        device = torch.device("cpu")

        def gather(self, tensor):
            return torch.cat([tensor, torch.tensor([-1])])

    with pytest.raises(LaunchError, match="process 0: checkpoint-6, process 1: none.*filesystem they all share"):
        check_same_checkpoint(TwoMachines(), tmp_path / "checkpoint-6", tmp_path)
    check_same_checkpoint(TwoMachines(), None, tmp_path)  # neither resumes: fine


def test_inside_a_launch_num_processes_does_not_launch_again(monkeypatch, caplog):
    from qlora_lite.cli.train import _launch_processes

    monkeypatch.setattr("qlora_lite.train.distributed.relaunch", lambda *a: pytest.fail("launched from a launched process"))
    for var, value in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "4"}.items():
        monkeypatch.setenv(var, value)
    with caplog.at_level("WARNING", logger="qlora_lite"):
        assert _launch_processes(load_config(None, {"num_processes": 2})) is False
    assert "--num-processes 2 ignored: the launcher started 4 process(es)" in caplog.text


def test_fsdp_wrapping_shards_the_base_keeps_lora_whole_and_runs_under_autocast(tiny_llama, tmp_path):
    # One gloo process: the same wrapping as with several, checked in-process with bf16 autocast.
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from qlora_lite.model.build import build_model
    from qlora_lite.train.distributed import shard_frozen_base

    model = build_model(str(tiny_llama), bits=4, compute_dtype="bf16", rank=4, alpha=8, dropout=0.0, seed=0)
    lora = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in lora:
            p.normal_(0, 0.1)  # lora_B starts at zero: make the adapter matter
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(input_ids=ids).logits.float()
    autocasts = []

    class Accelerator:
        device, num_processes, mixed_precision = torch.device("cpu"), 1, "bf16"

        def autocast(self):
            autocasts.append(1)
            return torch.autocast("cpu", dtype=torch.bfloat16)

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        sharded = shard_frozen_base(model, Accelerator(), lora)
        logits = sharded(input_ids=ids).logits.float()
        logits.logsumexp(-1).sum().backward()
        base = [p for n, p in sharded.named_parameters() if "lora_" not in n]
        assert base and all(isinstance(p, DTensor) for p in base)
        assert all(not isinstance(p, DTensor) and p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
    finally:
        dist.destroy_process_group()
    assert autocasts  # the forward ran under the accelerator's autocast, as accelerator.prepare would arrange
    torch.testing.assert_close(logits, expected)  # the same bf16 computation, gathered block by block
