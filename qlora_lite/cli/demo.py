"""``qlora-lite demo``: the whole pipeline, offline, on the bundled demo model and dataset."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("demo")
@click.option("--output", "-o", type=click.Path(file_okay=False), default="qlora-lite-demo", show_default=True,
              help="Folder for the adapter, merged model, GGUF file, metrics and loss plot. "
                   "A previous demo run there is replaced; any other non-empty folder is refused.")
@click.option("--max-steps", type=int, default=100, show_default=True,
              help="Training steps (the default is the measured full run; try 5 for a quick check).")
@click.option("--eval-limit", type=int, default=None, help="Evaluate only the first N held-out examples (all 100).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Training sequences per step.")
@click.option("--lr", type=float, default=3e-3, show_default=True, help="Peak learning rate.")
@click.option("--rank", type=int, default=16, show_default=True, help="LoRA rank.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed of the run.")
@click.option("--no-gguf", is_flag=True, help="Skip writing the GGUF file.")
@click.option("--threads", type=int, default=1, show_default=True,
              help="CPU threads (the tiny demo model gains little from more, and one thread is robust on a busy "
                   "CPU); 0 keeps torch's default.")
def command(output, max_steps, eval_limit, batch_size, lr, rank, seed, no_gguf, threads):
    """Fine-tune the bundled tiny model to reverse words, offline, in a few minutes on a laptop CPU.

    Evaluates the 4-bit base on held-out examples, trains a LoRA adapter on it (gradient
    checkpointing, 8-bit optimizer), evaluates again, merges the adapter, reloads the merged model
    with plain transformers to check it answers the same, writes a GGUF file, and prints a summary
    with the paths of everything it wrote.
    """
    from qlora_lite.demo.run import DemoSettings, run_demo

    if max_steps < 1 or batch_size < 1 or rank < 1 or lr <= 0 or (eval_limit is not None and eval_limit < 1):
        raise click.BadParameter("--max-steps, --batch-size, --rank, --eval-limit must be at least 1 and --lr positive")
    settings = DemoSettings(output=Path(output), max_steps=max_steps, eval_limit=eval_limit, batch_size=batch_size,
                            lr=lr, rank=rank, seed=seed, gguf=not no_gguf,
                            threads=threads or None)
    run_demo(settings, echo=click.echo)
