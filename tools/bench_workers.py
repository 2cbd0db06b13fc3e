"""One measurement per process, for tools/benchmark.py: ``python tools/bench_workers.py JOB.json``.

Each job loads, trains or merges with one stack and writes its numbers as JSON. Peak memory is the
process's peak RSS (VmHWM, reset between phases through /proc/self/clear_refs) on the CPU and
``torch.cuda.max_memory_allocated`` on CUDA.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

import torch  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def reset_peak() -> None:
    """Start a new peak measurement (the CPU peak restarts from the current RSS)."""
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux: the peak then covers the whole process


def peak_bytes() -> int:
    if CUDA:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def batch(step: int, job: dict) -> torch.Tensor:
    """The token ids of one step: the same on every stack (seeded by the step)."""
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randint(3, job["vocab_size"], (job["batch_size"], job["seq_len"]), generator=gen)


def load_reference(job: dict):
    """transformers BitsAndBytesConfig + peft prepare_model_for_kbit_training / get_peft_model."""
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qlora_lite.model.loading import DTYPES

    dtype = DTYPES[job.get("compute_dtype", "bf16")]  # what this device runs fast (benchmark.py decides)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(job["model"], quantization_config=quant, dtype=dtype,
                                                 device_map={"": DEVICE}, attn_implementation="sdpa")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    if job.get("init_adapter"):
        model = PeftModel.from_pretrained(model, job["init_adapter"], is_trainable=True)
    else:
        torch.manual_seed(0)
        config = LoraConfig(r=job["rank"], lora_alpha=2 * job["rank"], lora_dropout=0.0, target_modules="all-linear",
                            task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
    # from_pretrained returns the model in eval mode, and transformers checkpoints a decoder layer only in
    # training mode: without this the reference ran with no checkpointing at all (Trainer and TRL call train())
    model.train()
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    if not layers or not all(m.training for m in layers):
        raise RuntimeError("the reference model would train without gradient checkpointing")
    return model


def load_ours(job: dict):
    from qlora_lite.model.build import build_model

    model = build_model(job["model"], bits=4, rank=job["rank"], alpha=2 * job["rank"], dropout=0.0,
                        adapter=job.get("init_adapter"), gradient_checkpointing=True, seed=0, dora=job.get("dora", False),
                        checkpoint_policy=job.get("checkpoint_policy", "balanced"),
                        compute_dtype=job.get("compute_dtype", "auto"))
    return model.to(DEVICE) if CUDA else model


def step_loss(side: str, model, ids: torch.Tensor) -> torch.Tensor:
    if side == "reference":
        return model(input_ids=ids, labels=ids).loss
    from qlora_lite.kernels.chunked_loss import causal_lm_loss

    return causal_lm_loss(model, ids, ids)


def run_train(job: dict) -> dict:
    """Load, then warmup + timed steps of AdamW 8-bit (paged) on the same ids as the other stack."""
    import bitsandbytes as bnb

    side = job["side"]
    reset_peak()
    start = time.perf_counter()
    model = load_reference(job) if side == "reference" else load_ours(job)
    out = {"load_s": time.perf_counter() - start, "load_peak_bytes": peak_bytes()}
    if job.get("save_init_adapter"):
        model.save_pretrained(job["save_init_adapter"])
    params = [p for p in model.parameters() if p.requires_grad]
    out["trainable_params"] = sum(p.numel() for p in params)
    optimizer = bnb.optim.PagedAdamW8bit(params, lr=2e-4, weight_decay=0.0)
    reset_peak()
    losses, times, cpu_times, thread_times = [], [], [], []
    for step in range(job["warmup"] + job["steps"]):
        ids = batch(step, job).to(DEVICE)
        started, cpu_started, thread_started = time.perf_counter(), time.process_time(), time.thread_time()
        loss = step_loss(side, model, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if CUDA:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        # CPU seconds of all threads: far less disturbed than wall time when other jobs share the cores
        cpu_times.append(time.process_time() - cpu_started)
        thread_times.append(time.thread_time() - thread_started)
        losses.append(float(loss.detach()))
        print(f"[{side}] step {step} loss {losses[-1]:.4f} {times[-1]:.2f}s", file=sys.stderr, flush=True)
    out.update(train_peak_bytes=peak_bytes(), losses=losses, step_s=times, step_cpu_s=cpu_times,
               step_thread_s=thread_times,
               threads=torch.get_num_threads())
    if job.get("profile"):
        out["profile"] = profile_step(side, model, optimizer, job)
    if job.get("save_adapter"):
        if side == "reference":
            model.save_pretrained(job["save_adapter"])
        else:
            from qlora_lite.model.adapter import save_adapter

            save_adapter(model, job["save_adapter"])
    return out


def profile_step(side: str, model, optimizer, job: dict) -> str:
    """torch.profiler table of one more step: where the time goes, by operator."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        loss = step_loss(side, model, batch(0, job).to(DEVICE))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=40)


def run_cli_train(job: dict) -> dict:
    """``qlora-lite train`` in this process, as a user runs it; numbers from its metrics.jsonl."""
    from click.testing import CliRunner

    from qlora_lite.cli import main

    reset_peak()
    started = time.perf_counter()
    args = ["train", "--model", job["model"], "--data", job["data"], "--output", job["output"],
            "--max-seq-len", str(job["seq_len"]), "--batch-size", str(job["batch_size"]), "--rank", str(job["rank"]),
            "--alpha", str(2 * job["rank"]), "--dropout", "0", "--lr", "2e-4", "--lr-scheduler", "constant",
            "--max-steps", str(job["warmup"] + job["steps"]), "--optimizer", "paged_adamw_8bit",
            "--gradient-checkpointing", "--logging-steps", "1"]
    result = CliRunner().invoke(main, args, catch_exceptions=True)
    if result.exit_code != 0:
        return {"error": f"qlora-lite train failed ({result.exit_code}): {result.output[-2000:]} {result.exception!r}"}
    records = [json.loads(line) for line in (Path(job["output"]) / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "tokens_per_s" in r]
    return {"wall_s": time.perf_counter() - started, "process_peak_bytes": peak_bytes(),
            "losses": [r["loss"] for r in records], "tokens_per_s": [r["tokens_per_s"] for r in records],
            "logged_peak_bytes": max(r["peak_mem_bytes"] for r in records)}


def run_merge(job: dict) -> dict:
    """Merge the trained adapter into the base and save a plain model folder."""
    reset_peak()
    started = time.perf_counter()
    if job["side"] == "reference":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.bfloat16, device_map={"": DEVICE})
        merged = PeftModel.from_pretrained(base, job["adapter"]).merge_and_unload()
        merged.save_pretrained(job["output"])
    else:
        from qlora_lite.merge.write import merge_adapter

        merge_adapter(job["model"], job["adapter"], job["output"], verify=job.get("verify", True),
                      progress=False, overwrite=True, tolerance=job.get("tolerance"))
    return {"merge_s": time.perf_counter() - started, "merge_peak_bytes": peak_bytes()}


def run_baseline(job: dict) -> dict:
    """What the process holds before any model: torch, transformers, bitsandbytes, peft imported."""
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import qlora_lite.model.build  # noqa: F401

    return {"runtime_peak_bytes": peak_bytes()}


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    if CUDA and job.get("memory_budget"):  # an allocation past the budget fails at once (out of memory)
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, job["memory_budget"] / total))
    torch.manual_seed(0)
    kind = {"baseline": run_baseline, "train": run_train, "cli_train": run_cli_train, "merge": run_merge}[job["kind"]]
    result = kind(job)
    Path(job["result"]).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
