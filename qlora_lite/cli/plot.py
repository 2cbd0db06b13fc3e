"""``qlora-lite plot DIR``: draw the loss curve of a training output folder again."""

from __future__ import annotations

import click


@click.command("plot")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=True, dir_okay=True))
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None,
              help="PNG file to write.  [default: RUN_DIR/loss.png]")
def command(run_dir: str, output: str | None) -> None:
    """Draw training and eval loss from RUN_DIR/metrics.jsonl as a PNG."""
    from qlora_lite.train.metrics import plot_loss

    path = plot_loss(run_dir, output)
    click.echo(f"wrote {path}")
