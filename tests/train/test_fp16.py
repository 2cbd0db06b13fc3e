"""fp16 training (GPUs without bf16: T4, older consumer cards): the gradient scaler's loss scale is
checkpointed as JSON and restored on resume; fp16 compute trains on the CPU; an fp32 PEFT adapter
trains further in the LoRA dtype, on the fused 4-bit path."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import write_chat_jsonl

from qlora_lite.checkpoint.folder import load_checkpoint, save_checkpoint
from qlora_lite.checkpoint.scaler import SCALER_JSON, load_scaler, scaler_json_bytes
from qlora_lite.config import load_config
from qlora_lite.errors import CheckpointError, ScalerStateError
from qlora_lite.kernels.lora_4bit import fast_lora_applies
from qlora_lite.model.build import build_model
from qlora_lite.model.lora import lora_layers
from qlora_lite.train.loop import train
from qlora_lite.train.metrics import read_metrics


def _used_scaler(init_scale=2.0**20, growth_interval=2, overflow_at=(1,), steps=5):
    """A CPU GradScaler after ``steps`` optimizer steps, overflowing (inf gradient) at ``overflow_at``:
    its scale, growth tracker and settings are all away from the defaults."""
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_factor=4.0, growth_interval=growth_interval)
    weight = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    for step in range(steps):
        factor = float("inf") if step in overflow_at else 1.0
        scaler.scale((weight * factor).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    return scaler


def _step_scale(scaler, factor: float) -> float:
    """One more step with gradient ``factor``; the scale afterwards."""
    weight = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scaler.scale((weight * factor).sum()).backward()
    scaler.step(optimizer)
    scaler.update()
    return scaler.get_scale()


def test_scaler_state_round_trips_exactly_through_json(tmp_path):
    scaler = _used_scaler()
    saved = scaler.state_dict()
    assert saved["scale"] != 2.0**20 and saved["_growth_tracker"] == 1  # moved away from the start

    (tmp_path / SCALER_JSON).write_bytes(scaler_json_bytes(scaler))
    assert json.loads((tmp_path / SCALER_JSON).read_text())["state"] == saved  # plain JSON numbers
    fresh = torch.amp.GradScaler("cpu")
    assert load_scaler(tmp_path, fresh)
    assert fresh.state_dict() == saved
    # Same state, same future: growth after the remaining good step, backoff on an overflow.
    assert _step_scale(fresh, 1.0) == _step_scale(scaler, 1.0) == saved["scale"] * 4.0
    assert _step_scale(fresh, float("inf")) == _step_scale(scaler, float("inf"))

    assert scaler_json_bytes(None) is None
    assert scaler_json_bytes(torch.amp.GradScaler("cpu", enabled=False)) is None
    assert not load_scaler(tmp_path / "elsewhere", torch.amp.GradScaler("cpu"))  # no file: caller decides


@pytest.mark.parametrize("damage, message", [
    ('{"class": "GradScaler", "state": {"scale": "big"}}', "scale is 'big', expected float"),
    ('{"class": "GradScaler", "state": {"scale": 2.0, "growth_factor": 2.0, "backoff_factor": 0.5, '
     '"growth_interval": true, "_growth_tracker": 0}}', "growth_interval is True, expected int"),
    ('{"class": "GradScaler", "state": {"scale": -1.0, "growth_factor": 2.0, "backoff_factor": 0.5, '
     '"growth_interval": 2, "_growth_tracker": 0}}', "scale -1.0"),
    ('{"class": "GradScaler", "sta', "not valid JSON"),
])
def test_damaged_scaler_state_is_refused_naming_the_file(tmp_path, damage, message):
    (tmp_path / SCALER_JSON).write_text(damage)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    with pytest.raises(ScalerStateError, match=message) as error:
        load_scaler(tmp_path, scaler)
    assert str(tmp_path / SCALER_JSON) in str(error.value)
    assert scaler.get_scale() == 8.0  # untouched


def _lora_model(path):
    return build_model(str(path), bits=4, rank=4, alpha=8, seed=0, gradient_checkpointing=False)


def test_checkpoint_restores_the_scaler_and_older_checkpoints_still_resume(tiny_llama, tmp_path):
    model = _lora_model(tiny_llama)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scaler = _used_scaler()
    with_scaler = save_checkpoint(tmp_path / "new", 5, model, optimizer, None, {"step": 5}, scaler=scaler)
    older = save_checkpoint(tmp_path / "old", 5, model, optimizer, None, {"step": 5})  # as before scaler.json
    assert (with_scaler / SCALER_JSON).is_file() and not (older / SCALER_JSON).exists()
    assert SCALER_JSON in json.loads((with_scaler / "COMPLETE").read_text())["files"]  # size-checked

    restored = torch.amp.GradScaler("cpu")
    assert load_checkpoint(with_scaler, model, optimizer, None, restored)["step"] == 5
    assert restored.state_dict() == scaler.state_dict()

    fresh = torch.amp.GradScaler("cpu", init_scale=1024.0)
    with pytest.warns(UserWarning, match="no fp16 loss scale .* restarts at 1024"):
        assert load_checkpoint(older, model, optimizer, None, fresh)["step"] == 5
    assert fresh.get_scale() == 1024.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a run without fp16 neither needs nor mentions it
        load_checkpoint(with_scaler, model, optimizer)

    copy = tmp_path / "damaged"
    shutil.copytree(with_scaler, copy)
    text = (copy / SCALER_JSON).read_text()
    saved = json.loads(text)
    saved["state"]["scale"] = -1.0
    (copy / SCALER_JSON).write_text(json.dumps(saved).ljust(len(text)))  # same size: passes the manifest check
    with pytest.raises(CheckpointError, match="scaler.json: (damaged scaler state|content differs)"):
        load_checkpoint(copy, model, optimizer, None, torch.amp.GradScaler("cpu"))


def _fp16_config(model, data, output, **overrides):
    values = dict(model=str(model), data=str(data), output=str(output), bits=4, rank=4, alpha=8,
                  compute_dtype="fp16", max_seq_len=64, batch_size=4, lr=1e-2, max_steps=6, save_steps=2, seed=3)
    return load_config(None, {**values, **overrides})


def test_fp16_compute_trains_a_4bit_model_on_the_cpu(tiny_llama, tmp_path, one_thread):
    data = write_chat_jsonl(tmp_path / "train.jsonl", n=16)
    result = train(_fp16_config(tiny_llama, data, tmp_path / "out", max_steps=3, save_steps=0, eval_fraction=0.25))
    losses = [r["loss"] for r in read_metrics(result.metrics_path)]
    assert result.steps == 3 and len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert torch.isfinite(torch.tensor(result.eval_metrics["eval_loss"]))
    assert json.loads((result.adapter_dir / "qlora_lite.json").read_text())["compute_dtype"] == "float16"
    weights = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert any(w.abs().max() > 0 for k, w in weights.items() if "lora_B" in k)  # it trained
    assert all(torch.isfinite(w.float()).all() for w in weights.values())


@pytest.fixture
def cpu_fp16_amp(monkeypatch):
    """fp16 mixed precision as accelerate runs it on a GPU (autocast + GradScaler), here on the CPU.

    accelerate makes no scaler on the CPU, so the Accelerator gets a real ``torch.amp.GradScaler("cpu")``
    and CPU fp16 autocast; train.py's calls (backward, clip, step, checkpoint) are the GPU ones. The
    large initial scale with growth every 2 steps makes the scale move (and steps overflow) in a few steps.
    """
    import accelerate

    class CpuFp16Accelerator(accelerate.Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "mixed_precision": "fp16"})
            self.native_amp = True
            self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20, growth_interval=2)

    from qlora_lite.train import loop

    monkeypatch.setattr(loop, "Accelerator", CpuFp16Accelerator)


def test_resumed_fp16_run_continues_the_loss_scale_exactly(tiny_llama, tmp_path, monkeypatch, cpu_fp16_amp,
                                                           one_thread, ctrl_c_after):
    data = write_chat_jsonl(tmp_path / "train.jsonl")
    settings = dict(lora_dtype="fp32")  # what train.py picks for fp16 on a GPU (the scaler refuses fp16 weights)
    full = train(_fp16_config(tiny_llama, data, tmp_path / "full", **settings))
    with ctrl_c_after(2), pytest.raises(KeyboardInterrupt):
        train(_fp16_config(tiny_llama, data, tmp_path / "resumed", **settings))
    resumed = train(_fp16_config(tiny_llama, data, tmp_path / "resumed", resume=True, **settings))
    assert resumed.resumed_from.name == "checkpoint-2"

    a, b = read_metrics(full.metrics_path), read_metrics(resumed.metrics_path)
    assert any(r["grad_norm"] != r["grad_norm"] for r in a)  # an overflow (NaN norm): a skipped step
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-6), ra["step"]
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], abs=1e-6, nan_ok=True), ra["step"]
    scales = [json.loads((run.output_dir / f"checkpoint-{s}" / SCALER_JSON).read_text())["state"]
              for run in (full, resumed) for s in (2, 6)]
    assert scales[0] != scales[1] and scales[2:] == scales[:2]
    wa = load_file(full.adapter_dir / "adapter_model.safetensors")
    wb = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _fp32_peft_adapter(base, folder):
    """An adapter as PEFT saves it by default: A and B upcast to fp32, lora_B random."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(folder)
    return folder


def test_fp32_peft_adapter_trains_in_bf16_on_the_fused_path(tiny_llama, tmp_path):
    folder = _fp32_peft_adapter(tiny_llama, tmp_path / "peft")
    saved = load_file(folder / "adapter_model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}

    model = build_model(str(tiny_llama), bits=4, adapter=str(folder), trainable=True, compute_dtype="bf16",
                        lora_dtype="bf16")
    layers = lora_layers(model)
    assert len(layers) == 4
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.bfloat16}
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    name, layer = next(iter(layers.items()))
    key = f"base_model.model.{name}.lora_B.weight"
    assert torch.equal(layer.lora_B.weight, saved[key].to(torch.bfloat16))
    x = torch.randn(2, 3, layer.lora_A.in_features, dtype=torch.bfloat16)
    assert layer.training and fast_lora_applies(layer, x)

    # Inference keeps the file's exact fp32 values.
    frozen = build_model(str(tiny_llama), bits=4, adapter=str(folder), trainable=False, compute_dtype="bf16")
    assert torch.equal(lora_layers(frozen)[name].lora_B.weight, saved[key])
