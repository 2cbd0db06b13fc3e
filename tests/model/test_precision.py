"""The compute dtype follows what the device runs fast, and no command multiplies in a dtype it is slow at."""

from __future__ import annotations

import logging

import pytest
import torch
import yaml
from click.testing import CliRunner
from tiny_models import write_chat_jsonl
from torch.utils._python_dispatch import TorchDispatchMode

from qlora_lite.cli import main
from qlora_lite.config import load_config
from qlora_lite.model import precision
from qlora_lite.model.precision import (
    choose_compute_dtype,
    estimated_compute_dtype,
    lora_dtype_for,
    slow_dtype_warning,
)
from qlora_lite.train.loop import train

AVX2 = dict(capability="AVX2", onednn_bf16=False, avx512_bf16=False, amx=False, amx_fp16=False)
AVX512 = dict(AVX2, capability="AVX512", onednn_bf16=True)  # oneDNN emulates bf16: ambiguous
AVX512_BF16 = dict(AVX512, avx512_bf16=True)
SAPPHIRE_RAPIDS = dict(AVX512_BF16, amx=True, amx_fp16=True)
# bf16 instructions that oneDNN will not use (ONEDNN_MAX_CPU_ISA=AVX2, a VM masking them): measured here,
# a bf16 matmul ran at 0.013x the fp32 speed that way
CAPPED = dict(AVX512_BF16, capability="AVX2", onednn_bf16=False)


def fake_cpu(monkeypatch, features: dict, bf16_speedup: float = 1.0) -> None:
    monkeypatch.setattr(precision, "cpu_features", lambda: features)
    monkeypatch.setattr(precision, "matmul_speedup", lambda name, **kw: bf16_speedup)


@pytest.mark.parametrize("features,speedup,expected", [
    (AVX2, 0.02, "fp32"),             # no bf16 kernels: scalar fallback
    (AVX512, 0.6, "fp32"),            # ambiguous; the probe says bf16 is slower
    (AVX512, 1.3, "bf16"),            # ambiguous; the probe says bf16 is faster
    (AVX512_BF16, 0.01, "bf16"),      # bf16 instructions: no probe needed (its answer is ignored)
    (SAPPHIRE_RAPIDS, 0.01, "bf16"),
    (CAPPED, 0.013, "fp32"),          # the instructions are there, the kernels are not
])
def test_auto_on_the_cpu_picks_the_fast_dtype(monkeypatch, features, speedup, expected):
    fake_cpu(monkeypatch, features, speedup)
    choice = choose_compute_dtype("auto", "cpu")
    assert choice.name == expected
    assert features["capability"] in choice.reason  # the log line says why


def test_the_estimate_follows_a_capped_onednn(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor : 0\nflags : fpu sse2 avx2 avx512f avx512_bf16\n")
    assert estimated_compute_dtype("auto", "cpu", cpuinfo) == "bf16"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert estimated_compute_dtype("auto", "cpu", cpuinfo) == "fp32"


@pytest.mark.parametrize("bf16_supported,expected", [(True, "bf16"), (False, "fp16")])
def test_auto_on_a_gpu_uses_bf16_where_supported_else_fp16(monkeypatch, bf16_supported, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Some GPU")
    assert choose_compute_dtype("auto", "cuda").name == expected


def test_an_explicit_dtype_is_honoured_with_a_warning_where_slow(monkeypatch):
    fake_cpu(monkeypatch, AVX2, bf16_speedup=0.01)
    assert choose_compute_dtype("bf16", "cpu").name == "bf16"
    warning = slow_dtype_warning("bf16", "cpu")
    assert "100x slower than fp32" in warning and "AVX2" in warning
    assert slow_dtype_warning("fp32", "cpu") is None
    fake_cpu(monkeypatch, AVX512_BF16, bf16_speedup=4.0)
    assert slow_dtype_warning("bf16", "cpu") is None
    with pytest.raises(ValueError, match="compute dtype"):
        choose_compute_dtype("float8", "cpu")


def test_lora_dtype_auto_follows_the_compute_dtype_except_fp16():
    assert lora_dtype_for("auto", "bf16") == "bf16"
    assert lora_dtype_for("auto", "fp32") == "fp32"
    assert lora_dtype_for("auto", "fp16") == "fp32"  # the loss scaler needs fp32 master weights
    assert lora_dtype_for("bf16", "fp32") == "bf16"


def test_the_estimate_reads_the_same_answer_from_cpuinfo(tmp_path):
    laptop, server = tmp_path / "laptop", tmp_path / "server"
    laptop.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")
    server.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw avx512_bf16 amx_tile\n")
    assert estimated_compute_dtype("auto", "cpu", laptop) == "fp32"
    assert estimated_compute_dtype("auto", "cpu", server) == "bf16"
    assert estimated_compute_dtype("bf16", "cpu", laptop) == "bf16"
    assert estimated_compute_dtype("auto", "cuda", laptop) == "bf16"


class _LowPrecisionMatmuls(TorchDispatchMode):
    """Records every matmul (any size, LoRA and attention included) whose inputs are bf16 or fp16."""

    MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
               torch.ops.aten.baddbmm.default, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default}

    def __init__(self):
        super().__init__()
        self.seen, self.low = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.MATMULS:
            self.seen += 1
            dtypes = {a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()}
            if dtypes & {torch.bfloat16, torch.float16}:
                self.low.append((str(func), [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]))
        return func(*args, **(kwargs or {}))


def test_training_on_a_cpu_without_bf16_kernels_multiplies_only_in_fp32(tiny_llama, tmp_path, monkeypatch,
                                                                        caplog):
    """The default run (auto) on an AVX2 CPU: every matmul of every step, the recompute, the backward,
    the attention and the evaluation runs in fp32; the log and config.yaml say what was chosen."""
    fake_cpu(monkeypatch, AVX2, bf16_speedup=0.01)
    data = write_chat_jsonl(tmp_path / "train.jsonl", n=12)
    config = load_config(None, dict(model=str(tiny_llama), data=str(data), output=str(tmp_path / "run"), bits=4,
                                    rank=4, max_seq_len=32, batch_size=4, max_steps=2, eval_fraction=0.25,
                                    checkpoint_policy="speed"))
    with caplog.at_level(logging.INFO, logger="qlora_lite"), _LowPrecisionMatmuls() as matmuls:
        result = train(config)
    assert matmuls.seen > 100 and matmuls.low == []
    assert "compute dtype auto -> fp32" in caplog.text and "AVX2" in caplog.text
    saved = yaml.safe_load((result.output_dir / "config.yaml").read_text())
    assert (saved["model"]["compute_dtype"], saved["lora"]["lora_dtype"]) == ("fp32", "fp32")


def test_eval_and_generate_on_a_cpu_without_bf16_kernels_multiply_in_fp32(tiny_llama, tmp_path, monkeypatch):
    fake_cpu(monkeypatch, AVX2, bf16_speedup=0.01)
    data = write_chat_jsonl(tmp_path / "eval.jsonl", n=4)
    runner = CliRunner()
    with _LowPrecisionMatmuls() as matmuls:
        evaluated = runner.invoke(main, ["eval", "--model", str(tiny_llama), "--data", str(data), "--json"])
        generated = runner.invoke(main, ["generate", "--model", str(tiny_llama), "--prompt", "add 1 and 2",
                                         "--max-new-tokens", "4"])
    assert evaluated.exit_code == 0, evaluated.output
    assert generated.exit_code == 0, generated.output
    assert matmuls.seen > 10 and matmuls.low == []


def test_resume_keeps_the_dtype_the_run_was_trained_in(tiny_llama, tmp_path, monkeypatch, caplog):
    """A run started on a bf16 CPU and resumed (auto) on an AVX2 one continues in bf16, as it was
    trained, instead of refusing the changed LoRA dtype."""
    data = write_chat_jsonl(tmp_path / "train.jsonl", n=8)
    values = dict(model=str(tiny_llama), data=str(data), output=str(tmp_path / "run"), bits=4, rank=4,
                  max_seq_len=32, batch_size=4, save_steps=1)
    fake_cpu(monkeypatch, AVX512_BF16)
    train(load_config(None, dict(values, max_steps=1)))
    fake_cpu(monkeypatch, AVX2, bf16_speedup=0.01)
    with caplog.at_level(logging.INFO, logger="qlora_lite"):
        resumed = train(load_config(None, dict(values, max_steps=2, resume=True)))
    assert resumed.steps == 2
    assert "resume: compute dtype bf16, as the run was trained" in caplog.text
    assert "bf16 matmuls run 100x slower than fp32" in caplog.text
