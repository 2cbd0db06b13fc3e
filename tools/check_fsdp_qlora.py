"""Check multi-process QLoRA on a machine with 2+ CUDA GPUs: FSDP and DDP against one process.

Runs ``qlora-lite train`` three times on the same data and settings, 4-bit base, no dropout:

1. one process, batch 2B (the reference);
2. ``--num-processes 2`` (DDP), batch B per process;
3. ``--num-processes 2 --fsdp`` (the frozen 4-bit base sharded, stored as the compute dtype), batch B;

then compares the per-step losses and the final adapters with the reference, checks that FSDP really
halved the base each process holds, and prints the peak GPU memory of each run (main process).

    python tools/check_fsdp_qlora.py                      # tiny random llama, built here (seconds)
    python tools/check_fsdp_qlora.py --model /models/llama-2-7b --steps 5 --seq-len 512
    python tools/check_fsdp_qlora.py --cpu                # the same check on the CPU (gloo)

Exit status 0 when every check passes. On GPUs the kernels are not bit-deterministic across batch
splits, so the default tolerance is 1e-4 in fp32 compute (1e-5 holds on the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def make_data(path: Path, n: int) -> Path:
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            # Plain text: any model folder works, with or without a chat template.
            f.write(json.dumps({"text": f"{a} plus {b} equals {a + b}, and {b} plus {a} is {a + b} too."}) + "\n")
    return path


def make_tiny_model(folder: Path) -> Path:
    from tiny_models import make_tiny_model as make
    from tiny_models import train_tiny_tokenizer

    return make("llama", folder / "llama", train_tiny_tokenizer(folder / "tokenizer"))


def run_train(args: argparse.Namespace, model: Path, data: Path, output: Path, processes: int, fsdp: bool) -> str:
    """One ``qlora-lite train`` run; returns its stderr (log lines). Raises SystemExit if it fails."""
    batch = 2 * args.batch_size if processes == 1 else args.batch_size
    cmd = [sys.executable, "-m", "qlora_lite.cli", "train", "--model", str(model), "--data", str(data),
           "--output", str(output), "--bits", "4", "--compute-dtype", args.dtype, "--lora-dtype", args.dtype,
           "--dropout", "0", "--rank", "8", "--alpha", "16", "--max-seq-len", str(args.seq_len),
           "--batch-size", str(batch), "--grad-accum", "2", "--lr", "1e-3", "--max-steps", str(args.steps),
           "--optimizer", "adamw", "--seed", "1", "--num-processes", str(processes)]
    cmd += ["--fsdp"] if fsdp else []
    env = dict(os.environ)
    if args.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif processes == 1:
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    label = f"{processes} process(es)" + (" FSDP" if fsdp else "")
    print(f"--- {label}: {' '.join(cmd)}", flush=True)
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if run.returncode != 0:
        print(run.stdout[-3000:], run.stderr[-6000:], sep="\n")
        raise SystemExit(f"FAIL: the {label} run exited with {run.returncode}")
    return run.stderr


def read_run(output: Path) -> tuple[list[dict], dict]:
    from safetensors.torch import load_file

    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return metrics, load_file(output / "adapter_model.safetensors")


def compare(name: str, ref: Path, other: Path, tol: float) -> list[str]:
    """Problems found comparing ``other`` with ``ref`` (empty when they agree)."""
    (ma, wa), (mb, wb) = read_run(ref), read_run(other)
    problems = []
    if [r["step"] for r in ma] != [r["step"] for r in mb]:
        problems.append(f"{name}: steps {[r['step'] for r in mb]} differ from {[r['step'] for r in ma]}")
    loss_diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(ma, mb))
    weight_diff = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
    peak = mb[-1].get("peak_mem_bytes", 0) / 2**30
    print(f"{name}: max loss difference {loss_diff:.2e}, max adapter difference {weight_diff:.2e}, "
          f"peak memory (main process) {peak:.2f} GiB")
    if loss_diff > tol:
        problems.append(f"{name}: loss differs by {loss_diff:.2e} > {tol:g}")
    if weight_diff > 10 * tol:
        problems.append(f"{name}: adapter differs by {weight_diff:.2e} > {10 * tol:g}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model folder (default: a tiny random llama built here)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU with gloo instead of CUDA GPUs")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2, help="per process; the reference uses twice this")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="compute and LoRA dtype")
    parser.add_argument("--tol", type=float, default=None, help="loss tolerance (default 1e-4 GPU, 1e-5 CPU)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per training run")
    args = parser.parse_args()
    import torch

    if not args.cpu and torch.cuda.device_count() < 2:
        raise SystemExit(f"needs 2 CUDA GPUs, found {torch.cuda.device_count()} (use --cpu to check on the CPU)")
    tol = args.tol or (1e-5 if args.cpu else 1e-4)
    if args.dtype == "bf16":
        tol = max(tol, 2e-2)
    with tempfile.TemporaryDirectory(prefix="check-fsdp-") as tmp:
        tmp = Path(tmp)
        model = args.model or make_tiny_model(tmp)
        data = make_data(tmp / "train.jsonl", 16 * args.batch_size * args.steps)
        run_train(args, model, data, tmp / "one", 1, False)
        run_train(args, model, data, tmp / "ddp", 2, False)
        log = run_train(args, model, data, tmp / "fsdp", 2, True)
        problems = compare("DDP  vs 1 process", tmp / "one", tmp / "ddp", tol)
        problems += compare("FSDP vs 1 process", tmp / "one", tmp / "fsdp", tol)
        held = re.search(r"FSDP: this process holds ([\d.]+)% of the ([\d.]+) MB", log)
        if not held or abs(float(held.group(1)) - 50.0) > 1.0:
            problems.append(f"FSDP did not halve the base per process: {held.group(0) if held else 'no FSDP line'}")
        else:
            print(f"FSDP: the main process holds {held.group(1)}% of the {held.group(2)} MB 4-bit base")
    for problem in problems:
        print("FAIL:", problem)
    print("OK: FSDP-QLoRA and DDP match one process" if not problems else f"{len(problems)} check(s) failed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
