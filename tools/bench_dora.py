"""Side by side: DoRA against LoRA in qlora-lite, same model, data and settings (step time, peaks).

    python tools/bench_dora.py [--model DIR] [--warmup 2] [--steps 3] [--seq-len 512]

Both runs are separate processes of ``tools/bench_workers.py`` (the benchmark's own worker), on the
generated 1.1B LLaMA shape by default. Prints a markdown table with the DoRA / LoRA ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import benchmark  # noqa: E402  (tools/ is the script's folder)

from qlora_lite.model.precision import choose_compute_dtype, cpu_features  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out" / "dora")
    args = parser.parse_args(argv)
    model = args.model or benchmark.generated_model("1.1b")
    args.out.mkdir(parents=True, exist_ok=True)
    config = json.loads((model / "config.json").read_text())
    compute = choose_compute_dtype("auto", "cpu")
    base = dict(model=str(model), seq_len=args.seq_len, batch_size=1, rank=args.rank, warmup=args.warmup,
                steps=args.steps, vocab_size=config["vocab_size"], profile=False, threads=None,
                checkpoint_policy="speed", compute_dtype=compute.name, kind="train", side="ours")
    runs = {name: benchmark.run_job({**base, "dora": name == "dora"}, args.out, f"{name}-train")
            for name in ("lora", "dora")}
    rows = []
    for label, key, scale, unit in (("median step (wall)", "step_s", 1, "s"), ("median step (CPU)", "step_cpu_s", 1, "s"),
                                    ("load peak", "load_peak_bytes", 1e-9, "GB"),
                                    ("training peak", "train_peak_bytes", 1e-9, "GB"),
                                    ("trainable parameters", "trainable_params", 1e-6, "M")):
        lora, dora = (runs[n][key] for n in ("lora", "dora"))
        if isinstance(lora, list):
            lora, dora = statistics.median(lora[args.warmup:]), statistics.median(dora[args.warmup:])
        rows.append(f"| {label} | {lora * scale:.2f} {unit} | {dora * scale:.2f} {unit} | {dora / lora:.2f}x |")
    print(f"CPU {cpu_features()}, compute {compute.name}; {model.name}, 1 x {args.seq_len} tokens, r={args.rank} "
          f"all-linear, NF4 + DQ, checkpoint policy speed")
    print("| metric | LoRA | DoRA | DoRA / LoRA |\n|---|---|---|---|\n" + "\n".join(rows))


if __name__ == "__main__":
    sys.exit(main())
