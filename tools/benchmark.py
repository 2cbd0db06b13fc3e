"""Side-by-side benchmark: qlora-lite against transformers + peft + bitsandbytes, same model and data.

Every measurement runs in its own process (tools/bench_workers.py): load + train for each stack,
``qlora-lite train`` as a user runs it, the merge of each stack, and our side again on a second
model size to check ``qlora_lite.train.estimate.estimate_memory`` against the measured peak.

    python tools/benchmark.py                  # 1.1B LLaMA shape, 1x512 tokens, r=16 all-linear, NF4+DQ
    python tools/benchmark.py --small          # a quick check on a small model
    python tools/benchmark.py --model DIR --seq-len 1024 --steps 10 --write BENCHMARKS.md

Writes ``OUT/results.json`` and ``OUT/results.md`` (OUT defaults to bench-out/<model name>).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import make_bench_model  # noqa: E402
from bench_report import render_markdown, summarize  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="model folder (default: generated 1.1B LLaMA shape)")
    p.add_argument("--small", action="store_true", help="quick check: small generated model, fewer steps")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed steps after the warmup")
    p.add_argument("--out", type=Path, help="results folder (default bench-out/<model>)")
    p.add_argument("--estimate-model", type=Path, action="append",
                   help="extra model folder(s) for the estimate check (default: a generated medium model)")
    p.add_argument("--no-merge", action="store_true", help="skip the merge measurements")
    p.add_argument("--no-cli", action="store_true", help="skip the `qlora-lite train` run")
    p.add_argument("--profile", action="store_true", help="add a torch.profiler table of one step per stack")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per process (default: all cores); with 1, steps are also timed in "
                        "CPU seconds of that thread, which other jobs on shared cores barely disturb")
    p.add_argument("--no-estimate-check", action="store_true", help="skip the second model size")
    p.add_argument("--checkpoint-policy", default="auto", choices=("auto", "memory", "balanced", "speed"),
                   help="what our checkpointing keeps (qlora-lite train --checkpoint-policy; auto decides as "
                        "training does, from the estimate and the free memory)")
    p.add_argument("--write", type=Path, help="also write the markdown to this file (e.g. BENCHMARKS.md)")
    return p.parse_args(argv)


def generated_model(preset: str) -> Path:
    folder = ROOT / "bench-out" / f"llama-{preset}"
    make_bench_model.main([str(folder), "--preset", preset])
    return folder


def run_job(job: dict, out: Path, name: str, timeout: int = 3600) -> dict:
    """Run one worker process; its JSON result, or ``{"error": ...}`` with the end of its stderr."""
    job = {**job, "result": str(out / f"{name}.result.json")}
    job_file = out / f"{name}.job.json"
    job_file.write_text(json.dumps(job, indent=1))
    started, children = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    with open(out / f"{name}.log", "w") as log:
        proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_workers.py"), str(job_file)],
                              stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"  {name}: exit {proc.returncode} after {time.perf_counter() - started:.0f}s", flush=True)
    if proc.returncode != 0 or not Path(job["result"]).exists():
        tail = (out / f"{name}.log").read_text()[-1500:]
        return {"error": f"exit {proc.returncode}: {tail}"}
    # CPU seconds of the whole worker process (user + system), which shared cores barely disturb
    cpu = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
    return {**json.loads(Path(job["result"]).read_text()), "process_cpu_s": cpu}


def matmul_peak(compute_dtype: str, threads: int = 0, seconds: float = 3.0) -> dict:
    """The machine's matmul peak in FLOP/s in fp32 and in ``compute_dtype``: best of repeated
    2048x2048x5632 products on the device the benchmark trains on (timed in CPU seconds of the thread
    when ``threads`` is 1; on CUDA, 8 products between synchronisations). A dtype the device has no
    fast kernel for is not timed (one such product takes tens of seconds on an AVX2 CPU)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    clock = time.thread_time if threads == 1 and not cuda else time.perf_counter
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    repeat = 8 if cuda else 1
    best = {}
    from qlora_lite.model.loading import DTYPES

    for dtype in {DTYPES[compute_dtype], torch.float32}:
        device = "cuda" if cuda else "cpu"
        a, b = (torch.randn(2048, 2048, dtype=dtype, device=device),
                torch.randn(2048, 5632, dtype=dtype, device=device))
        a @ b
        sync()
        rates, deadline = [], time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            t = clock()
            for _ in range(repeat):
                a @ b
            sync()
            rates.append(repeat * 2 * 2048 * 2048 * 5632 / max(clock() - t, 1e-9))
        best[str(dtype).removeprefix("torch.")] = max(rates)
    return best


def bf16_copy(adapter: Path, target: Path) -> Path:
    """The adapter folder with its tensors in bf16 (same layout and config)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(adapter / "adapter_config.json", target / "adapter_config.json")
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    save_file(tensors, target / "adapter_model.safetensors", metadata={"format": "pt"})
    return target


def write_cli_data(path: Path, steps: int, job: dict) -> None:
    """The benchmark ids as word-level text (token i is ``w{i}``); the data stage appends EOS."""
    import torch

    lines = []
    for step in range(steps):
        gen = torch.Generator().manual_seed(1000 + step)
        ids = torch.randint(3, job["vocab_size"], (job["batch_size"], job["seq_len"]), generator=gen)
        lines += [json.dumps({"text": " ".join(f"w{i}" for i in row[: job["seq_len"] - 1].tolist())}) for row in ids]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.small:
        args.warmup, args.steps = min(args.warmup, 1), min(args.steps, 3)
    model = args.model or generated_model("small" if args.small else "1.1b")
    out = args.out or ROOT / "bench-out" / f"results-{model.name}"
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((model / "config.json").read_text())
    import torch

    from qlora_lite.model.precision import choose_compute_dtype, cpu_features
    from qlora_lite.train.fit import available_memory, choose_checkpoint_policy

    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Both stacks run in the dtype this device is fast at: the reference at its best, not its worst.
    compute = choose_compute_dtype("auto", device)
    machine = cpu_features() if device == "cpu" else {"gpu": torch.cuda.get_device_name()}
    print(f"device {device} {machine}: compute dtype {compute.name} ({compute.reason})", flush=True)
    if args.checkpoint_policy == "auto":
        args.checkpoint_policy = choose_checkpoint_policy(
            config, available_memory(device), bits=4, seq_len=args.seq_len, batch_size=args.batch_size,
            rank=args.rank, device=device, compute_dtype=compute.name)[0]
        print(f"checkpoint policy auto -> {args.checkpoint_policy}", flush=True)
    base = dict(model=str(model), seq_len=args.seq_len, batch_size=args.batch_size, rank=args.rank,
                warmup=args.warmup, steps=args.steps, vocab_size=config["vocab_size"], profile=args.profile,
                threads=args.threads, checkpoint_policy=args.checkpoint_policy, compute_dtype=compute.name)
    print(f"benchmark of {model} -> {out}", flush=True)
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "model": str(model), "config": config,
               "device": device, "machine": machine, "compute_dtype": compute.name, "compute_reason": compute.reason,
               "load_avg_before": os.getloadavg(), "peak_flops": matmul_peak(compute.name, args.threads)}
    results["runtime"] = run_job({"kind": "baseline"}, out, "baseline")
    init = out / "init-adapter"
    results["reference"] = run_job({**base, "kind": "train", "side": "reference", "save_init_adapter": str(init),
                                    "save_adapter": str(out / "reference-adapter")}, out, "reference-train")
    # peft stores the adapter in fp32; ours trains A and B in the compute dtype (--lora-dtype auto), so
    # in bf16 it starts from the same values rounded to bf16.
    start = bf16_copy(init, out / "init-adapter-bf16") if compute.name == "bf16" else init
    results["ours"] = run_job({**base, "kind": "train", "side": "ours", "init_adapter": str(start),
                               "save_adapter": str(out / "ours-adapter")}, out, "ours-train")
    if not args.no_cli:
        data = out / "cli-data.jsonl"
        write_cli_data(data, args.warmup + args.steps, base)
        results["ours_cli"] = run_job({**base, "kind": "cli_train", "data": str(data),
                                       "output": str(out / "cli-run")}, out, "ours-cli-train")
    if not args.no_merge:
        for side in ("reference", "ours"):
            results[f"{side}_merge"] = run_job({**base, "kind": "merge", "side": side,
                                               "adapter": str(out / f"{side}-adapter"),
                                               "output": str(out / f"{side}-merged")}, out, f"{side}-merge")
        # the streaming merge alone (`qlora-lite merge --no-verify`): verification loads the merged model
        results["ours_merge_noverify"] = run_job({**base, "kind": "merge", "side": "ours", "verify": False,
                                                  "adapter": str(out / "ours-adapter"),
                                                  "output": str(out / "ours-merged-noverify")}, out, "ours-merge-noverify")
    results["estimate_models"] = {}
    extras = args.estimate_model or ([] if args.small or args.no_estimate_check else [generated_model("medium")])
    for extra in extras:
        extra_config = json.loads((extra / "config.json").read_text())
        job = {**base, "model": str(extra), "vocab_size": extra_config["vocab_size"], "warmup": 1, "steps": 2,
               "kind": "train", "side": "ours", "profile": False}
        results["estimate_models"][str(extra)] = {"config": extra_config,
                                                  "ours": run_job(job, out, f"ours-train-{extra.name}")}
    results["load_avg_after"] = os.getloadavg()
    summary = summarize(results, base)
    results["summary"] = summary
    markdown = render_markdown(results, summary, command=" ".join(["python", "tools/benchmark.py", *(argv or sys.argv[1:])]))
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "results.md").write_text(markdown)
    if args.write:
        args.write.write_text(markdown)
    print(markdown)
    return results


if __name__ == "__main__":
    main()
