"""Numbers and the markdown table of tools/benchmark.py: ratios to the reference, targets, floor."""

from __future__ import annotations

import platform
import statistics

from qlora_lite.train.estimate import estimate_memory, lora_targets, model_shape

GB = 1e9

# Targets on the CPU, as ratios to the reference measured in the same run (see BENCHMARKS.md).
TARGETS = {"train_peak": 0.5, "floor": 1.3, "tokens_per_s": 1.5, "mfu": 0.5, "load_peak": 0.5, "merge_peak": 0.35,
           "estimate": 0.15}


def design_floor(config: dict, seq_len: int, batch_size: int, rank: int) -> int:
    """The memory floor of ../shared/DESIGN.md: NF4+DQ linears (0.516 B/param), 16-bit embeddings and
    head, LoRA at 2+4+2 B/param, checkpointed inputs 2*L*B*T*H, one block 34*B*T*H, fp32 logits 4*B*T*V."""
    shape = model_shape(config)
    tokens = seq_len * batch_size
    lora = shape.layers * sum(rank * (i + o) for _, i, o in lora_targets(shape, "all-linear"))
    return int(shape.linear_params * 4.127 / 8 + 2 * shape.embedding_params + 8 * lora
               + 2 * shape.layers * tokens * shape.hidden + 34 * tokens * shape.hidden + 4 * tokens * shape.vocab)


def matmul_params(config: dict) -> int:
    """Parameters that take part in matmuls: every linear layer and the output head (6*N FLOPs/token)."""
    shape = model_shape(config)
    return shape.linear_params + shape.vocab * shape.hidden


def train_numbers(run: dict, base: dict, config: dict, peak_flops: float) -> dict:
    if not run or "error" in run:
        return {"error": (run or {}).get("error", "not run")}
    timed = run["step_s"][base["warmup"]:] or run["step_s"]
    tokens = base["seq_len"] * base["batch_size"]
    step_s = statistics.median(timed)
    tps = tokens / step_s
    # one thread: the CPU seconds of that thread (robust on shared cores); more: process CPU seconds
    # spread over the threads (inflated when a thread spins at a barrier waiting for a preempted one)
    key = "step_thread_s" if run["threads"] == 1 and "step_thread_s" in run else "step_cpu_s"
    cpu = run[key][base["warmup"]:] or run[key]
    cpu_step_s = statistics.median(cpu) / run["threads"]
    return {"load_s": run["load_s"], "load_peak": run["load_peak_bytes"], "train_peak": run["train_peak_bytes"],
            "step_s": step_s, "tokens_per_s": tps, "mfu": tps * 6 * matmul_params(config) / peak_flops,
            "cpu_step_s": cpu_step_s, "tokens_per_cpu_s": tokens / cpu_step_s,
            "cpu_mfu": tokens / cpu_step_s * 6 * matmul_params(config) / peak_flops,
            "losses": run["losses"]}


def estimate_check(config: dict, measured: int, base: dict) -> dict:
    est = estimate_memory(config, bits=4, seq_len=base["seq_len"], batch_size=base["batch_size"], rank=base["rank"],
                          optimizer="paged_adamw_8bit", checkpoint_policy=base.get("checkpoint_policy", "balanced"),
                          compute_dtype=base.get("compute_dtype", "bf16"))
    return {"params": est.base_params, "estimate": est.total, "measured": measured,
            "error": est.total / measured - 1, "breakdown": est.breakdown}


def summarize(results: dict, base: dict) -> dict:
    compute = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[results.get("compute_dtype", "bf16")]
    config, peak = results["config"], results["peak_flops"][compute]
    ref = train_numbers(results.get("reference"), base, config, peak)
    ours = train_numbers(results.get("ours"), base, config, peak)
    s = {"reference": ref, "ours": ours, "peak_flops": peak, "compute_dtype": results.get("compute_dtype", "bf16"),
         "matmul_params": matmul_params(config),
         "floor": design_floor(config, base["seq_len"], base["batch_size"], base["rank"]),
         "runtime": results.get("runtime", {}).get("runtime_peak_bytes")}
    for side in ("reference", "ours"):
        merge = results.get(f"{side}_merge") or {}
        s[side]["merge"] = merge if "error" not in merge else {"error": merge["error"]}
    checks = []
    if "error" not in ours:
        checks.append({"model": results["model"], **estimate_check(config, ours["train_peak"], base)})
    for folder, extra in results.get("estimate_models", {}).items():
        if "error" not in extra["ours"]:
            checks.append({"model": folder, **estimate_check(extra["config"], extra["ours"]["train_peak_bytes"], base)})
    s["estimate_checks"] = checks
    if "error" not in ref and "error" not in ours:
        n = min(len(ref["losses"]), len(ours["losses"]))
        s["loss_max_abs_diff"] = max(abs(a - b) for a, b in zip(ref["losses"][:n], ours["losses"][:n]))
    return s


def _gb(x) -> str:
    return "n/a" if x is None else f"{x / GB:.2f} GB"


def _row(name, ref, ours, fmt, target=None, better="lower"):
    if ref is None or ours is None:
        tgt = "" if target is None else f"{'<=' if better == 'lower' else '>='} {target}x"
        return f"| {name} | {fmt(ref) if ref is not None else 'not measured'} | " \
               f"{fmt(ours) if ours is not None else 'not measured'} | | {tgt} | |"
    ratio = ours / ref
    met = ""
    if target is not None:
        ok = ratio <= target if better == "lower" else ratio >= target
        met = "met" if ok else "**MISSED**"
    tgt = "" if target is None else f"{'<=' if better == 'lower' else '>='} {target}x"
    return f"| {name} | {fmt(ref)} | {fmt(ours)} | {ratio:.2f}x | {tgt} | {met} |"


def render_markdown(results: dict, s: dict, command: str) -> str:
    ref, ours = s["reference"], s["ours"]
    lines = [f"Model: `{results['model']}` ({s['matmul_params'] / 1e9:.2f}B matmul parameters), "
             f"batch {results['args']['batch_size']} x {results['args']['seq_len']} tokens, LoRA r={results['args']['rank']} "
             "all-linear, NF4 + double quantization, gradient checkpointing (qlora-lite policy "
             f"`{results['args'].get('checkpoint_policy', 'balanced')}`), paged AdamW 8-bit.",
             f"Machine: {platform.processor() or platform.machine()}, {_cores()} cores, {_cpu_class(results)}; "
             f"both stacks compute in {s['compute_dtype']} ({results.get('compute_reason', 'bf16 by default')}); "
             f"measured {s['compute_dtype']} matmul peak "
             f"{s['peak_flops'] / 1e12:.2f} TFLOP/s (fp32 {results['peak_flops']['float32'] / 1e12:.2f}) with "
             f"{_threads(results)} thread(s); "
             f"load average before/after: {_load(results['load_avg_before'])} / {_load(results['load_avg_after'])}.",
             f"Command: `{command}`", "",
             "| metric | reference | qlora-lite | ratio | target | |", "|---|---|---|---|---|---|"]
    g = lambda side, key: None if "error" in side else side.get(key)  # noqa: E731
    lines.append(_row("load peak memory", g(ref, "load_peak"), g(ours, "load_peak"), _gb, TARGETS["load_peak"]))
    lines.append(_row("load time", g(ref, "load_s"), g(ours, "load_s"), lambda x: f"{x:.1f} s"))
    lines.append(_row("training peak memory", g(ref, "train_peak"), g(ours, "train_peak"), _gb, TARGETS["train_peak"]))
    lines.append(_row("training tokens/s (median step)", g(ref, "tokens_per_s"), g(ours, "tokens_per_s"),
                      lambda x: f"{x:.1f}", TARGETS["tokens_per_s"], better="higher"))
    lines.append(_row("training tokens/s by CPU time (median step)", g(ref, "tokens_per_cpu_s"),
                      g(ours, "tokens_per_cpu_s"), lambda x: f"{x:.1f}", TARGETS["tokens_per_s"], better="higher"))
    lines.append(_row(f"MFU (6N FLOPs/token / {s['compute_dtype']} peak)", g(ref, "mfu"), g(ours, "mfu"), lambda x: f"{100 * x:.0f}%"))
    lines.append(_row("MFU by CPU time", g(ref, "cpu_mfu"), g(ours, "cpu_mfu"), lambda x: f"{100 * x:.0f}%"))
    for key, name, target in (("merge_peak_bytes", "merge peak memory", TARGETS["merge_peak"]),
                              ("merge_s", "merge time", None)):
        fmt = _gb if "peak" in key else (lambda x: f"{x:.1f} s")
        lines.append(_row(name, ref.get("merge", {}).get(key), ours.get("merge", {}).get(key), fmt, target))
    noverify = results.get("ours_merge_noverify") or {}
    if "merge_peak_bytes" in noverify:
        lines.append(_row("merge peak memory, qlora-lite --no-verify", ref.get("merge", {}).get("merge_peak_bytes"),
                          noverify["merge_peak_bytes"], _gb, TARGETS["merge_peak"]))
        lines.append(_row("merge time, qlora-lite --no-verify", ref.get("merge", {}).get("merge_s"),
                          noverify["merge_s"], lambda x: f"{x:.1f} s"))
    lines += _floor_lines(s, ours) + _loss_lines(s, ref, ours) + _cli_lines(results) + _estimate_lines(s)
    return "\n".join(lines) + "\n"


def _floor_lines(s, ours) -> list[str]:
    if "error" in ours:
        return ["", f"qlora-lite training failed: {ours['error'][:800]}"]
    floor, runtime, peak = s["floor"], s["runtime"] or 0, ours["train_peak"]
    mfu = max(ours["mfu"], ours["cpu_mfu"])
    mfu_met = "met" if mfu >= TARGETS["mfu"] else "**MISSED**"
    return ["", f"- Memory floor (DESIGN.md formula, no runtime): {_gb(floor)}; qlora-lite training peak is "
            f"{peak / floor:.2f}x of it (target <= {TARGETS['floor']}x: "
            f"{'met' if peak <= TARGETS['floor'] * floor else '**MISSED**'}). The bare runtime (torch, transformers, "
            f"bitsandbytes, peft imported, no model) holds {_gb(runtime)}; against floor + runtime the peak is "
            f"{peak / (floor + runtime):.2f}x.",
            f"- qlora-lite MFU {100 * ours['mfu']:.0f}% by wall time, {100 * ours['cpu_mfu']:.0f}% by CPU time "
            f"(target >= {100 * TARGETS['mfu']:.0f}%: {mfu_met}); median step {ours['step_s']:.2f} s wall, "
            f"{ours['cpu_step_s']:.2f} CPU s per thread."]


def _loss_lines(s, ref, ours) -> list[str]:
    if "loss_max_abs_diff" not in s:
        return []
    fmt = lambda xs: ", ".join(f"{x:.4f}" for x in xs)  # noqa: E731
    return [f"- Losses of the steps (same ids, same initial adapter): reference [{fmt(ref['losses'])}], "
            f"qlora-lite [{fmt(ours['losses'])}]; largest difference {s['loss_max_abs_diff']:.4f}."]


def _cli_lines(results) -> list[str]:
    cli = results.get("ours_cli")
    if not cli:
        return []
    if "error" in cli:
        return [f"- `qlora-lite train` run failed: {cli['error'][:600]}"]
    warm = int(results["args"]["warmup"])
    tps = statistics.median(cli["tokens_per_s"][warm:] or cli["tokens_per_s"])
    return [f"- `qlora-lite train` (the CLI users run, its own data pipeline and loop): median {tps:.1f} tokens/s, "
            f"process peak {_gb(cli['process_peak_bytes'])}, losses "
            f"[{', '.join(f'{x:.4f}' for x in cli['losses'])}]."]


def _estimate_lines(s) -> list[str]:
    lines = ["", "Estimate (`qlora-lite estimate`, config.json only) against the measured qlora-lite training peak:", "",
             "| model | params | estimate | measured | error | within 15% |", "|---|---|---|---|---|---|"]
    for c in s["estimate_checks"]:
        ok = "yes" if abs(c["error"]) <= TARGETS["estimate"] else "**no**"
        lines.append(f"| `{c['model']}` | {c['params'] / 1e9:.2f}B | {_gb(c['estimate'])} | {_gb(c['measured'])} | "
                     f"{100 * c['error']:+.1f}% | {ok} |")
    return lines


def _threads(results) -> str:
    threads = results["args"].get("threads", "0")
    return "all" if threads in ("0", "None") else threads


def _cpu_class(results: dict) -> str:
    """"CPU class AVX2 (no bf16 kernels)" and the like, from what torch reported in the run."""
    machine = results.get("machine") or {}
    if "gpu" in machine:
        return f"GPU {machine['gpu']}"
    if not machine:
        return "CPU class not recorded"
    kinds = [name for key, name in (("amx", "AMX"), ("avx512_bf16", "AVX512-BF16")) if machine.get(key)]
    kernels = ", ".join(kinds) if kinds else ("oneDNN bf16 emulation" if machine.get("onednn_bf16") else "no bf16 kernels")
    return f"CPU class {machine.get('capability')} ({kernels})"


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _load(avg) -> str:
    return "/".join(f"{x:.1f}" for x in avg)
