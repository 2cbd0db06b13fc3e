"""``qlora-lite estimate``: predict peak training memory from config.json and check it fits a budget."""

from __future__ import annotations

import json

import click

from qlora_lite.cli.options import config_options


@click.command("estimate")
@click.option("--model", "model", required=True, metavar="DIR",
              help="A model folder or its config.json (only the config is read, never the weights); `demo` is "
                   "the bundled demo model.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="A training YAML file whose settings are used (flags override it).")
@click.option("--seq-len", "seq_len", type=int, default=None, help="Tokens per sequence  [default: max_seq_len of the --config file, else 512]")
@config_options("bits", "compute_dtype", "batch_size", "rank", "dora", "target_modules", "gradient_checkpointing",
                "checkpoint_policy", "optimizer", "num_processes", "method")
@click.option("--fsdp", is_flag=True, help="Shard the frozen weights over --num-processes (FSDP); adapters stay whole.")
@click.option("--loss-chunk", type=int, default=None,
              help="Tokens per chunk of the loss, 0 for full logits  [default: what training uses: chunks of "
                   "about 8M logits where the architecture allows it]")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where it runs: CPU peak is process RSS, CUDA peak is the allocator's.")
@click.option("--budget", default=None, metavar="SIZE",
              help="Memory available, e.g. 8GiB, 6GB or 8 (a bare number is GiB); says whether it fits and what "
                   "would. The command exits with status 1 when it does not fit.")
@click.option("--json", "as_json", is_flag=True, help="Print the estimate as JSON.")
def command(model, config_file, seq_len, fsdp, loss_chunk, device, budget, as_json, **flags):
    """Predict peak memory of training MODEL with these settings, broken down by part.

    Nothing but config.json is read, so this answers in a second for any model size.
    """
    from qlora_lite.config import load_config
    from qlora_lite.flag_values import parse_size
    from qlora_lite.train.estimate import estimate_memory, read_config
    from qlora_lite.train.fit import (
        available_memory,
        choose_checkpoint_policy,
        estimate_settings,
        longest_sequence,
        suggest_settings,
    )

    cfg = load_config(config_file, flags).validate()
    settings = {**estimate_settings(cfg, device), "seq_len": seq_len or cfg.data.max_seq_len, "fsdp": fsdp,
                "loss_chunk": "auto" if loss_chunk is None else (loss_chunk or None)}
    limit = parse_size(budget, bare_unit="gib") if budget else None
    auto_policy = settings["checkpoint_policy"] == "auto"
    if auto_policy:  # the fastest that fits the budget, else as training decides
        others = {k: v for k, v in settings.items() if k != "checkpoint_policy"}
        settings["checkpoint_policy"] = choose_checkpoint_policy(
            model, limit or available_memory(device), share=1.0 if limit else None, **others)[0]
    estimate = estimate_memory(model, **settings)
    suggestion = suggest_settings(model, limit, **settings) if limit is not None else None
    longest = None
    if limit is not None:  # under auto, a long sequence trains with the policy that keeps least
        frugal = {**settings, "checkpoint_policy": "memory", "gradient_checkpointing": True} if auto_policy else settings
        context = int(read_config(model)[0].get("max_position_embeddings") or 1 << 20)
        longest = longest_sequence(model, limit, limit=context, **frugal)
        longest = (longest, longest == context)

    result = estimate.to_dict()
    if limit is not None:
        result["budget"] = limit
        result["fits"] = estimate.fits(limit)
        result["suggestion"] = (None if suggestion is None else
                                {"changes": suggestion[0], "total": suggestion[1].total})
        result["longest_seq_len"] = longest[0]
    click.echo(json.dumps(result, indent=2) if as_json else _report(model, estimate, limit, suggestion, longest,
                                                                    auto_policy))
    if limit is not None and not estimate.fits(limit):
        raise SystemExit(1)  # scripts can ask "does it fit?" by the exit status


def _report(model, estimate, limit, suggestion, longest: tuple[int, bool] | None = None,
            auto_policy: bool = False) -> str:
    gib = 1024**3
    s = estimate.settings
    lines = [f"Peak memory estimate for {model}",
             f"  {count(estimate.base_params)} parameters, {s['bits']}-bit base, LoRA r={s['rank']} "
             f"({count(estimate.lora_params)} trainable), {s['batch_size']}x{s['seq_len']} tokens"
             f"{' x2 (chosen and rejected of each pair)' if s.get('sequences_per_example', 1) > 1 else ''}, "
             f"checkpointing {s['checkpoint_policy'] if s['gradient_checkpointing'] else 'off'}, "
             f"{_optimizer_run(s['optimizer'], s['device'])}, {s['compute_dtype']} compute",
             estimate.table()]
    if limit is None:
        return "\n".join(lines)
    if estimate.fits(limit):
        lines.append(f"Fits the budget of {limit / gib:.2f} GiB ({(limit - estimate.total) / gib:.2f} GiB spare).")
    elif limit <= estimate.breakdown["runtime"]:
        lines.append(f"Does NOT fit {limit / gib:.2f} GiB: that is not more than the "
                     f"{estimate.breakdown['runtime'] / gib:.2f} GiB the process itself takes on the {s['device']} "
                     "(torch and its libraries) before any model is loaded, so no model fits; give a larger "
                     "--budget (a bare number is GiB).")
    elif suggestion is None:
        lines.append(f"Does NOT fit {limit / gib:.2f} GiB, and no combination of checkpointing, 8-bit optimizer, "
                     "4-bit base, batch 1, shorter sequences and lower rank does: use a smaller model.")
    else:
        changes = " ".join(_flag(k, v) for k, v in suggestion[0].items())
        lines.append(f"Does NOT fit {limit / gib:.2f} GiB. These settings would ({suggestion[1].total / gib:.2f} "
                     f"GiB): {changes}")
    if longest and longest[0]:
        whole = " (the model's whole context, max_position_embeddings)" if longest[1] else ""
        lines.append(f"Longest sequence within {limit / gib:.2f} GiB: about {longest[0]} tokens{whole} (--max-seq-len), "
                     "as estimated with these settings" + (" and the policy auto falls back to (memory)" if auto_policy
                                                           else "") + ".")
    return "\n".join(lines)


def count(n: int) -> str:
    """A parameter count a person reads at a glance: 950, 295.0K, 3.2M, 1.10B."""
    for scale, unit, digits in ((1e9, "B", 2), (1e6, "M", 1), (1e3, "K", 1)):
        if n >= scale:
            return f"{n / scale:.{digits}f}{unit}"
    return str(n)


def _optimizer_run(name: str, device: str) -> str:
    """The optimizer training runs: paged ones need CUDA and fall back to their plain twin (optim.py)."""
    if device != "cuda" and name.startswith("paged_"):
        return f"{name.removeprefix('paged_')} ({name} falls back on the {device})"
    return name


def _flag(name: str, value) -> str:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else f"--no-{flag[2:]}"
    return f"{flag} {value}"
