"""Long context in a fixed budget: the longest sequence that trains one step within ``--budget``, for
qlora-lite and for the reference stack (transformers + peft + bitsandbytes at its best memory settings:
gradient checkpointing, SDPA attention, NF4 + double quant, batch 1), found by bisection over the length.

Each probe is one ``tools/bench_workers.py`` train job (load, then ``--warmup`` + 1 steps at batch 1 and
length L) in its own process. On the CPU the parent watches the child's RSS and kills it the moment it
passes the budget ("over budget"); a probe that finishes fits when its whole-process peak (load and
training VmHWM) is within the budget. On CUDA the worker caps its allocator at the budget
(``memory_budget`` in the job), so an over-budget probe fails with an out-of-memory error at once.

    python tools/bench_long_context.py --budget 8GiB                  # both stacks, generated 1.1B model
    python tools/bench_long_context.py --budget 3GiB --side ours      # what finishes in minutes on a CPU
    python tools/bench_long_context.py --budget 3GiB --side ours --repeat-at 2048 --repeat 3   # peak spread

Our search starts from ``qlora-lite estimate --budget``'s longest length, which the results compare with
the measured one. Writes ``OUT/long-context.json`` (OUT defaults to bench-out/long-context).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import make_bench_model  # noqa: E402

POLL_S = 0.02  # RSS rises by at most a few hundred MB in this time: the final VmHWM check catches the rest


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", default="8GiB", help="memory budget per process, e.g. 8GiB, 3GiB (bare number: GiB)")
    p.add_argument("--model", type=Path, help="model folder (default: generated 1.1B LLaMA shape, 128k positions)")
    p.add_argument("--side", choices=("ours", "reference", "both"), default="both")
    p.add_argument("--granularity", type=int, default=256, help="lengths are multiples of this")
    p.add_argument("--start", type=int, help="first length to try (default: ours from the estimate, the reference "
                                             "from 4x granularity)")
    p.add_argument("--max-len", type=int, default=1 << 17)
    p.add_argument("--grow", type=float, help="factor between probes before the bisection (default: ours 1.25 "
                                              "from the estimate, the reference 2 from a guess); 1.15 from the "
                                              "estimate brackets it against the 15%% target in few probes")
    p.add_argument("--warmup", type=int, default=0, help="steps before the measured one")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="torch threads per probe (default: all cores)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per probe")
    p.add_argument("--repeat-at", type=int, help="instead of searching, run the probe at this length --repeat times")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--policy", default="memory", help="our checkpoint policy (memory keeps least)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment of the probes (e.g. MALLOC_ARENA_MAX=2), to compare allocator settings")
    p.add_argument("--out", type=Path, default=ROOT / "bench-out" / "long-context")
    return p.parse_args(argv)


def rss_bytes(pid: int) -> int:
    """Current resident set of a process (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def probe(job: dict, budget: int, out: Path, name: str, timeout: int, env: dict) -> dict:
    """One worker process under a watchdog. Returns the worker's result with ``fits`` and ``peak_bytes``
    (whole process), or ``{"fits": False, "over_budget": True, "rss_at_kill": ...}`` when it was killed,
    or ``{"fits": False, "error": ...}`` when it failed otherwise."""
    job = {**job, "result": str(out / f"{name}.result.json"), "memory_budget": budget}
    Path(job["result"]).unlink(missing_ok=True)
    job_file = out / f"{name}.job.json"
    job_file.write_text(json.dumps(job, indent=1))
    started = time.perf_counter()
    env = {**os.environ, **env, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    with open(out / f"{name}.log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "bench_workers.py"), str(job_file)],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        highest, killed, timeline = 0, False, []  # timeline: (seconds, MB) every half second, to see the phases
        while proc.poll() is None:
            rss = rss_bytes(proc.pid)
            highest = max(highest, rss)
            if not timeline or time.perf_counter() - started - timeline[-1][0] >= 0.5:
                timeline.append((round(time.perf_counter() - started, 1), rss >> 20))
            if job.get("device") != "cuda" and rss > budget:
                proc.kill()
                killed = True
            elif time.perf_counter() - started > timeout:
                proc.kill()
            time.sleep(POLL_S)
        proc.wait()
    seconds = time.perf_counter() - started
    if killed:
        result = {"fits": False, "over_budget": True, "rss_at_kill": highest}
    elif proc.returncode != 0 or not Path(job["result"]).exists():
        tail = (out / f"{name}.log").read_text()[-1500:]
        oom = "out of memory" in tail.lower()
        result = {"fits": False, "over_budget": oom, "error": None if oom else f"exit {proc.returncode}: {tail}"}
    else:
        result = json.loads(Path(job["result"]).read_text())
        result["peak_bytes"] = max(result["load_peak_bytes"], result["train_peak_bytes"])
        result["fits"] = result["peak_bytes"] <= budget
        result["over_budget"] = not result["fits"]
    result.update(seq_len=job["seq_len"], wall_s=seconds, rss_timeline_mb=timeline)
    verdict = "fits" if result["fits"] else ("over budget" if result["over_budget"] else "ERROR")
    peak = result.get("peak_bytes") or result.get("rss_at_kill") or 0
    print(f"  {name}: {verdict}, peak {peak / 1e9:.2f} GB, {seconds:.0f}s", flush=True)
    if result.get("error"):
        raise RuntimeError(f"probe {name} failed: {result['error']}")
    return result


def longest(try_len, granularity: int, start: int, max_len: int, grow: float = 2.0) -> tuple[int, list[dict]]:
    """The longest multiple of ``granularity`` (up to ``max_len``) for which ``try_len`` fits: grow from
    ``start`` by ``grow`` until one fails (or shrink by ``grow`` until one fits), then bisect.

    ``try_len(length) -> result dict with "fits"``. Returns ``(length, probes)``; 0 when not even
    ``granularity`` fits.
    """
    probes = []

    def fits(length: int) -> bool:
        probes.append(try_len(length))
        return probes[-1]["fits"]

    length = max(granularity, start // granularity * granularity)
    if fits(length):
        low, high = length, None
        while high is None:
            nxt = min(max(low + granularity, int(grow * low) // granularity * granularity),
                      max_len // granularity * granularity)
            if nxt <= low:
                return low, probes
            low, high = (nxt, None) if fits(nxt) else (low, nxt)
    else:
        low, high = 0, length
        while low == 0 and high > granularity:
            nxt = max(granularity, int(high / grow) // granularity * granularity)
            low, high = (nxt, high) if fits(nxt) else (0, nxt)
        if low == 0:
            return 0, probes
    while high - low > granularity:
        mid = (low + high) // 2 // granularity * granularity
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low, probes


def estimated_longest(model: Path, budget: int, compute: str, device: str, rank: int) -> dict:
    """What ``qlora-lite estimate --budget`` says, exactly as a user runs it."""
    from click.testing import CliRunner

    from qlora_lite.cli import main

    args = ["estimate", "--model", str(model), "--budget", str(budget) + "B", "--json", "--device", device,
            "--compute-dtype", compute, "--rank", str(rank), "--batch-size", "1"]
    result = CliRunner().invoke(main, args)
    return json.loads(result.output[result.output.index("{"):])


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from qlora_lite.flag_values import parse_size
    from qlora_lite.model.precision import choose_compute_dtype, cpu_features

    budget = parse_size(args.budget, bare_unit="gib")
    model = args.model or ROOT / "bench-out" / "llama-1.1b-long"
    if args.model is None:
        make_bench_model.main([str(model), "--preset", "1.1b", "--context", str(args.max_len)])
    args.out.mkdir(parents=True, exist_ok=True)
    config = json.loads((model / "config.json").read_text())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    compute = choose_compute_dtype("auto", device).name
    env = dict(item.split("=", 1) for item in args.env)
    base = dict(kind="train", model=str(model), batch_size=1, rank=args.rank, warmup=args.warmup, steps=1,
                vocab_size=config["vocab_size"], threads=args.threads, compute_dtype=compute, device=device,
                checkpoint_policy=args.policy)
    results = {"command": " ".join(["python", "tools/bench_long_context.py", *(argv or sys.argv[1:])]),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "budget": budget, "device": device,
               "machine": cpu_features() if device == "cpu" else {"gpu": torch.cuda.get_device_name()},
               "compute_dtype": compute, "env": env, "load_avg_before": os.getloadavg()}
    estimate = estimated_longest(model, budget, compute, device, args.rank)
    results["estimate"] = {"longest_seq_len": estimate["longest_seq_len"], "breakdown": estimate["breakdown"]}
    print(f"{device} {results['machine']}, {compute}; budget {budget / 2**30:.2f} GiB; estimate: ours up to "
          f"{estimate['longest_seq_len']} tokens", flush=True)
    sides = ("ours", "reference") if args.side == "both" else (args.side,)
    for side in sides:
        def try_len(length: int, side=side, tag="") -> dict:
            job = {**base, "side": side, "seq_len": length}
            return probe(job, budget, args.out, f"{side}-{length}{tag}", args.timeout, env)

        if args.repeat_at:
            runs = [try_len(args.repeat_at, tag=f"-run{i}") for i in range(args.repeat)]
            peaks = [r.get("train_peak_bytes") for r in runs if r.get("train_peak_bytes")]
            results[side] = {"repeat_at": args.repeat_at, "probes": runs, "train_peaks": peaks,
                             "spread_bytes": max(peaks) - min(peaks) if peaks else None,
                             "median_bytes": statistics.median(peaks) if peaks else None}
            continue
        start = args.start or (estimate["longest_seq_len"] if side == "ours" else 4 * args.granularity)
        # from the estimate (meant to be within 15%), steps of 25%; from a guess, doublings
        grow = args.grow or (1.25 if side == "ours" else 2.0)
        length, probes = longest(try_len, args.granularity, start, args.max_len, grow)
        results[side] = {"longest_seq_len": length, "probes": probes}
        print(f"{side}: longest {length} tokens within {budget / 2**30:.2f} GiB", flush=True)
    if "ours" in results and "longest_seq_len" in results["ours"]:
        measured = results["ours"]["longest_seq_len"]
        results["estimate"]["error"] = (estimate["longest_seq_len"] - measured) / measured if measured else None
        if "reference" in results and results["reference"]["longest_seq_len"]:
            results["ratio"] = measured / results["reference"]["longest_seq_len"]
    results["load_avg_after"] = os.getloadavg()
    name = (f"long-context-{args.side}-{budget >> 20}MiB" + (f"-repeat{args.repeat_at}" if args.repeat_at else "")
            + "".join(f"-{k}{v}" for k, v in env.items()))  # runs under other allocator settings kept apart
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=1, default=str))
    print(json.dumps({k: v for k, v in results.items() if k not in sides}, indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
