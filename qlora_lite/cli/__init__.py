"""The ``qlora-lite`` command line: a click group whose commands live one per module in this package.

Commands are imported only when run, so ``qlora-lite --help`` answers without importing torch.
"""

from __future__ import annotations

import importlib

import click

from qlora_lite import __version__
from qlora_lite.errors import QloraLiteError

# command name -> (module in qlora_lite.cli, one-line help shown in `qlora-lite --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "Run the whole pipeline offline on the bundled demo model: eval, train, eval, merge, GGUF."),
    "train": ("train", "Fine-tune a LoRA adapter on a 4/8/16-bit base from a JSONL file."),
    "generate": ("generate", "Generate text from a base model (plus adapter); a chat when no --prompt."),
    "eval": ("evaluate", "Loss, perplexity and exact-match of a model (plus adapter) on a JSONL file."),
    "merge": ("merge", "Merge an adapter into its base and write a plain Hugging Face model folder."),
    "export-gguf": ("export_gguf", "Write a GGUF file for llama.cpp / Ollama (optionally merging an adapter)."),
    "estimate": ("estimate", "Predict peak training memory from config.json alone and check it fits a budget."),
    "plot": ("plot", "Draw the loss curve of a training output folder as a PNG."),
}


class LazyGroup(click.Group):
    """A group that imports a command's module only when that command is invoked or asked for help."""

    def list_commands(self, ctx):
        return [name for name, (module, _) in COMMANDS.items() if importlib.util.find_spec(f"{__name__}.{module}")]

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module_name, _ = COMMANDS[name]
        try:
            module = importlib.import_module(f"{__name__}.{module_name}")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{module_name}":
                return None
            raise
        return module.command

    def invoke(self, ctx):
        """Run the command; any QloraLiteError (whatever stage raised it) becomes one ``Error: ...`` line
        and exit status 1, so commands need no catch lists and a new error class needs no CLI change."""
        try:
            return super().invoke(ctx)
        except QloraLiteError as e:
            raise click.ClickException(str(e)) from None

    def format_commands(self, ctx, formatter):
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="qlora-lite")
def main():
    """qlora-lite: fine-tune large language models with QLoRA on one consumer machine.

    The base model is loaded frozen in 4-bit (NF4/FP4) or 8-bit through bitsandbytes; only small
    LoRA adapters are trained. Start with `qlora-lite demo`, then `qlora-lite train --help`.
    """
