"""``qlora-lite train``: fine-tune a LoRA adapter; every option can also come from a YAML --config file."""

from __future__ import annotations

import logging

import click

from qlora_lite.cli.options import config_options

# Every config field a training run reads, in --help order (num_processes belongs to the launcher).
TRAIN_FIELDS = (
    "model", "data", "output", "eval_data", "eval_fraction", "format",
    "data_split", "eval_split", "data_config", "field_map",
    "method", "beta", "dpo_loss", "label_smoothing", "orpo_lambda",
    "bits", "quant_type", "double_quant", "compute_dtype",
    "rank", "alpha", "dropout", "target_modules", "rslora", "dora", "lora_dtype", "adapter",
    "max_seq_len", "drop_long", "packing", "train_on_inputs", "skip_bad_lines", "data_cache",
    "batch_size", "grad_accum", "lr", "weight_decay", "lora_plus_ratio", "max_grad_norm", "max_steps", "epochs",
    "warmup_steps",
    "lr_scheduler", "optimizer", "gradient_checkpointing", "checkpoint_policy",
    "save_steps", "eval_steps", "save_total_limit", "logging_steps", "report_to", "seed", "resume",
    "trust_remote_code", "allow_bin_weights", "num_processes", "fsdp",
)


def _launch_processes(config) -> bool:
    """With --num-processes N > 1 outside a launched process: run this training in N processes via
    accelerate's launcher (the resolved settings travel in a temporary YAML). Returns True if it did.

    Raises:
        click.ClickException: the processes failed.
    """
    import os
    import tempfile
    from pathlib import Path

    from qlora_lite.train.distributed import in_launched_process, relaunch

    n = config.train.num_processes
    if in_launched_process():
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if n > 1 and n != world and os.environ.get("RANK", "0") == "0":
            logging.getLogger("qlora_lite").warning("--num-processes %d ignored: the launcher started %d process(es)",
                                                    n, world)
        return False
    if n <= 1:
        if config.train.fsdp:
            logging.getLogger("qlora_lite").warning("--fsdp shards over several processes; with one process it "
                                                    "changes nothing (add --num-processes N)")
        return False
    config.validate(required=("model.model", "data.data", "train.output"))
    with tempfile.TemporaryDirectory(prefix="qlora-lite-launch-") as tmp:
        settings = Path(tmp) / "config.yaml"
        config.save(settings)
        code = relaunch(n, ["train", "--config", str(settings)])
    if code != 0:
        raise click.ClickException(f"the {n} training processes failed (exit code {code}); see their messages above")
    return True


def setup_logging() -> None:
    """Our log lines on stderr, plainly; transformers and bitsandbytes only when something is wrong."""
    logger = logging.getLogger("qlora_lite")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    for name in ("bitsandbytes", "transformers", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)


@click.command("train")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="YAML file with any of the settings below (sections model/lora/data/train or flat); "
                   "flags given on the command line override it.")
@config_options(*TRAIN_FIELDS)
def command(config_file: str | None, **values) -> None:
    """Fine-tune a LoRA adapter on a 4/8/16-bit frozen base from JSONL, JSON, Parquet, CSV or a dataset.

    \b
    Example:
      qlora-lite train --model ./my-model --data train.jsonl --output runs/first --max-steps 200
      qlora-lite train --model ./my-model --adapter runs/first --method dpo --data pairs.jsonl --output runs/dpo

    --method dpo|orpo trains on preference pairs ({"prompt", "chosen", "rejected"} per line):
    DPO against the base with the adapters off, or against the --adapter it starts from.

    The adapter (PEFT layout), metrics.jsonl, loss.png, config.yaml and checkpoint-STEP/ folders are
    written to --output. --resume continues from the newest complete checkpoint there.
    """
    from qlora_lite.config import load_config
    from qlora_lite.train.loop import train

    setup_logging()
    config = load_config(config_file, values)
    if _launch_processes(config):
        return
    result = train(config)
    if not result.main_process:
        return
    click.echo(f"trained {result.steps} steps; adapter in {result.adapter_dir}")
    metrics = result.eval_metrics
    if "eval_ppl" in metrics:
        click.echo(f"eval loss {metrics['eval_loss']:.4f}, perplexity {metrics['eval_ppl']:.2f}")
    elif "eval_rewards/accuracies" in metrics:
        click.echo(f"eval loss {metrics['eval_loss']:.4f}, reward accuracy {metrics['eval_rewards/accuracies']:.1%}, "
                   f"reward margin {metrics['eval_rewards/margins']:.4f}")
    click.echo(f"metrics: {result.metrics_path}" + (f"; loss curve: {result.plot_path}" if result.plot_path else ""))
    click.echo(f"try it: qlora-lite generate --model {config.model.model} --adapter {result.adapter_dir} "
               f"--bits {config.model.bits}")
