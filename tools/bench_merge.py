"""The merge alone, side by side: the reference (peft's merge_and_unload into the bf16 checkpoint,
save_pretrained) against ``qlora-lite merge`` with and without its check, each in its own process
(``benchmark.run_job``), timed by wall clock and by CPU seconds (which other jobs on shared
cores barely disturb, with ``--threads 1``).

    python tools/bench_merge.py --threads 1 --repeat 2

Without ``--model`` the 1.1B LLaMA shape is generated (``make_bench_model``) and, without
``--adapter``, a random r=16 all-linear adapter trained against its 4-bit base is written.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import make_bench_model
from benchmark import ROOT, run_job

SIDES = {"reference": {"side": "reference"}, "ours --no-verify": {"side": "ours", "verify": False},
         "ours (verified)": {"side": "ours"}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="model folder (default: generated 1.1B LLaMA shape)")
    parser.add_argument("--adapter", type=Path, help="adapter folder (default: a random one for --model)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process (default: all cores)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each side, interleaved")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out" / "merge")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.model or ROOT / "bench-out" / "llama-1.1b"
    if args.model is None and not (model / "config.json").exists():
        make_bench_model.main([str(model), "--preset", "1.1b"])
    adapter = args.adapter or args.out / "adapter"
    if args.adapter is None and not (adapter / "adapter_config.json").exists():
        from tiny_models import make_adapter  # noqa: PLC0415 (builds a 4-bit model: only when needed)

        make_adapter(model, adapter, targets="all-linear")
    import torch  # noqa: PLC0415 (after the model is written: the workers are what is measured)

    print(f"CPU class {torch.backends.cpu.get_cpu_capability()}, bf16 kernels "
          f"{torch.ops.mkldnn._is_mkldnn_bf16_supported()}, threads {args.threads or os.cpu_count()}")
    times = {name: [] for name in SIDES}
    for i in range(args.repeat):
        for name, side in SIDES.items():
            job = {**side, "kind": "merge", "model": str(model), "adapter": str(adapter), "threads": args.threads,
                   "output": str(args.out / f"merged-{side['side']}-{side.get('verify', True)}")}
            result = run_job(job, args.out, f"{name.split()[0]}-{side.get('verify', True)}-{i}")
            if "error" in result:
                raise SystemExit(f"{name}: {result['error']}")
            cpu = result["process_cpu_s"]
            times[name].append((cpu, result["merge_s"], result["merge_peak_bytes"]))
            print(f"  {name:18s} merge {result['merge_s']:6.1f} s wall, {cpu:6.1f} CPU s, peak "
                  f"{result['merge_peak_bytes'] / 1e9:.2f} GB (load average {os.getloadavg()[0]:.1f})", flush=True)
    best = {name: min(rows) for name, rows in times.items()}  # by CPU seconds
    ref_cpu = best["reference"][0]
    print("| side | merge (wall) | CPU seconds | ratio by CPU | peak |\n|---|---|---|---|---|")
    for name, (cpu, merge_s, peak) in best.items():
        print(f"| {name} | {merge_s:.1f} s | {cpu:.1f} s | {cpu / ref_cpu:.2f}x | {peak / 1e9:.2f} GB |")


if __name__ == "__main__":
    main()
