"""``qlora-lite estimate``: predict peak training memory from config.json and check it fits a budget."""

from __future__ import annotations

import json

import click

from .options import config_options


@click.command("estimate")
@click.option("--model", "model", required=True, metavar="DIR_OR_CONFIG",
              help="A model folder or its config.json (only the config is read, never the weights).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="A training YAML file whose settings are used (flags override it).")
@click.option("--seq-len", "seq_len", type=int, default=None, help="Tokens per sequence  [default: --max-seq-len, 512]")
@config_options("bits", "compute_dtype", "batch_size", "rank", "target_modules", "gradient_checkpointing",
                "checkpoint_policy", "optimizer", "num_processes")
@click.option("--fsdp", is_flag=True, help="Shard the frozen weights over --num-processes (FSDP); adapters stay whole.")
@click.option("--loss-chunk", type=int, default=None,
              help="Tokens per chunk of the loss, 0 for full logits  [default: what training uses: chunks of "
                   "about 8M logits where the architecture allows it]")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where it runs: CPU peak is process RSS, CUDA peak is the allocator's.")
@click.option("--budget", default=None, help="Memory available, e.g. 8GiB or 6GB; says whether it fits and what would.")
@click.option("--json", "as_json", is_flag=True, help="Print the estimate as JSON.")
def command(model, config_file, seq_len, fsdp, loss_chunk, device, budget, as_json, **flags):
    """Predict peak memory of training MODEL with these settings, broken down by part.

    Nothing but config.json is read, so this answers in a second for any model size.
    """
    from ..config import ConfigError, load_config
    from ..memory import (
        EstimateError,
        available_memory,
        choose_checkpoint_policy,
        estimate_memory,
        estimate_settings,
        parse_size,
        suggest_settings,
    )

    try:
        cfg = load_config(config_file, flags).validate()
        settings = {**estimate_settings(cfg, device), "seq_len": seq_len or cfg.data.max_seq_len, "fsdp": fsdp,
                    "loss_chunk": "auto" if loss_chunk is None else (loss_chunk or None)}
        limit = parse_size(budget) if budget else None
        if settings["checkpoint_policy"] == "auto":  # the fastest that fits the budget, else as training decides
            others = {k: v for k, v in settings.items() if k != "checkpoint_policy"}
            settings["checkpoint_policy"] = choose_checkpoint_policy(
                model, limit or available_memory(device), share=1.0 if limit else None, **others)[0]
        estimate = estimate_memory(model, **settings)
        suggestion = suggest_settings(model, limit, **settings) if limit is not None else None
    except (ConfigError, EstimateError) as e:
        raise click.ClickException(str(e)) from None

    result = estimate.to_dict()
    if limit is not None:
        result["budget"] = limit
        result["fits"] = estimate.fits(limit)
        result["suggestion"] = (None if suggestion is None else
                                {"changes": suggestion[0], "total": suggestion[1].total})
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(_report(model, estimate, limit, suggestion))


def _report(model, estimate, limit, suggestion) -> str:
    gib = 1024**3
    s = estimate.settings
    lines = [f"Peak memory estimate for {model}",
             f"  {estimate.base_params / 1e9:.2f}B parameters, {s['bits']}-bit base, LoRA r={s['rank']} "
             f"({estimate.lora_params / 1e6:.1f}M trainable), {s['batch_size']}x{s['seq_len']} tokens, "
             f"checkpointing {s['checkpoint_policy'] if s['gradient_checkpointing'] else 'off'}, {s['optimizer']}, "
             f"{s['compute_dtype']} compute",
             estimate.table()]
    if limit is None:
        return "\n".join(lines)
    if estimate.fits(limit):
        lines.append(f"Fits the budget of {limit / gib:.2f} GiB ({(limit - estimate.total) / gib:.2f} GiB spare).")
    elif suggestion is None:
        lines.append(f"Does NOT fit {limit / gib:.2f} GiB, and no combination of checkpointing, 8-bit optimizer, "
                     "4-bit base, batch 1, shorter sequences and lower rank does: use a smaller model.")
    else:
        changes = " ".join(_flag(k, v) for k, v in suggestion[0].items())
        lines.append(f"Does NOT fit {limit / gib:.2f} GiB. These settings would ({suggestion[1].total / gib:.2f} "
                     f"GiB): {changes}")
    return "\n".join(lines)


def _flag(name: str, value) -> str:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else f"--no-{flag[2:]}"
    return f"{flag} {value}"
